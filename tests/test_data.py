"""Reading, format detection, prompt rendering and label masking, checked token by token."""

from __future__ import annotations

import hashlib
import json

import pytest

from lora_cli import data
from lora_cli.data import IGNORE_INDEX, Renderer, detect_format, read_rows, tokenize
from lora_cli.errors import DataError, LoraError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def alpaca_tokenizer(tiny_alpaca_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_alpaca_model_dir)


def trained_text(example, tok) -> str:
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_chat_template_trains_exactly_the_response_and_its_eos(tokenizer):
    row = {"instruction": "What is the capital of Veloria?", "output": "The capital of Veloria is Quillmont."}
    example = tokenize(Renderer(tokenizer).render(row, "instruction", "row 1"), tokenizer, 512, False)
    ids, labels = example["input_ids"], example["labels"]
    assert trained_text(example, tokenizer) == "The capital of Veloria is Quillmont.<|im_end|>"
    # labels equal ids wherever they are trained, and the prompt is masked to the last token of its header
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}], tokenize=False,
                                           add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt] == ids[n_prompt]


def test_eos_equal_to_pad_stays_trained(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this test is about
    row = {"instruction": "Hi", "output": "Hello"}
    example = tokenize(Renderer(tokenizer).render(row, "instruction", "r"), tokenizer, 512, False)
    eos_positions = [k for k, i in enumerate(example["input_ids"]) if i == tokenizer.eos_token_id]
    trained_eos = [k for k in eos_positions if example["labels"][k] != IGNORE_INDEX]
    assert len(trained_eos) == 1  # the response's EOS; the user turn's EOS is prompt
    # the template's newline after the final EOS is not trained
    assert example["labels"][-1] == IGNORE_INDEX and trained_eos[0] == len(example["input_ids"]) - 2


def test_multi_turn_chat_trains_every_assistant_turn_only(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye"}]}
    example = tokenize(Renderer(tokenizer).render(row, "chat", "r"), tokenizer, 512, False)
    assert trained_text(example, tokenizer) == "Hello<|im_end|>Goodbye<|im_end|>"


def test_alpaca_template_when_the_tokenizer_has_no_chat_template(alpaca_tokenizer):
    renderer = Renderer(alpaca_tokenizer)
    assert renderer.template == "alpaca"
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    rendered = renderer.render(row, "instruction", "r")
    assert "### Input:\n2 and 3\n\n### Response:\n5<|im_end|>" in rendered.text
    example = tokenize(rendered, alpaca_tokenizer, 512, False)
    assert trained_text(example, alpaca_tokenizer) == "5<|im_end|>"


def test_train_on_inputs_trains_every_token(tokenizer):
    row = {"instruction": "Hi", "output": "Hello"}
    example = tokenize(Renderer(tokenizer).render(row, "instruction", "r"), tokenizer, 512, True)
    assert example["labels"] == example["input_ids"]


def test_completion_rows_train_the_completion_and_eos(tokenizer):
    example = tokenize(Renderer(tokenizer).render({"prompt": "2+2=", "completion": "4"}, "completion", "r"),
                       tokenizer, 512, False)
    assert trained_text(example, tokenizer) == "4<|im_end|>"


def test_text_rows_train_everything_and_end_with_eos(tokenizer):
    example = tokenize(Renderer(tokenizer).render({"text": "Paris is in France."}, "text", "r"), tokenizer, 512, False)
    assert trained_text(example, tokenizer) == "Paris is in France.<|im_end|>"


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_truncation_drops_rows_whose_response_is_cut_off(tokenizer, train_on_inputs):
    renderer = Renderer(tokenizer)
    rows = [{"instruction": "What is the capital of Veloria? " * 5, "output": "Quillmont."}, {"instruction": "Hi", "output": "Yo"}]
    examples, dropped = data.tokenize_rows(rows, "instruction", renderer, 24, train_on_inputs, "f")
    assert dropped == 1 and len(examples) == 1  # with --train-on-inputs too: a prompt without its answer teaches nothing
    assert all(len(e["input_ids"]) <= 24 for e in examples)
    assert "assistant\nYo<|im_end|>" in tokenizer.decode(examples[0]["input_ids"])


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "a", "output": "b"}, "instruction"),
    ({"instruction": "a", "input": "c", "output": "b"}, "instruction"),
    ({"messages": []}, "chat"),
    ({"conversations": []}, "sharegpt"),
    ({"prompt": "a", "completion": "b"}, "completion"),
    ({"text": "a"}, "text"),
])
def test_format_is_detected_from_columns(row, expected):
    assert detect_format([row]) == expected


def test_unknown_columns_name_the_known_formats():
    with pytest.raises(DataError, match="known formats are .*instruction"):
        detect_format([{"question": "a", "answer": "b"}])


def test_sharegpt_roles_are_mapped(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    example = tokenize(Renderer(tokenizer).render(row, "sharegpt", "r"), tokenizer, 512, False)
    assert trained_text(example, tokenizer) == "Hello<|im_end|>"


def test_jsonl_csv_parquet_and_folders_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "d" / "b.csv").write_text("text\nthree\n")
    pq.write_table(pa.table({"text": ["four"]}), tmp_path / "d" / "c.parquet")
    (tmp_path / "e.json").write_text(json.dumps([{"text": "five"}]))
    rows, identity = read_rows(str(tmp_path / "d"))
    assert [r["text"] for r in rows] == ["one", "two", "three", "four"]
    assert len(identity["sha256"]) == 64
    assert read_rows(str(tmp_path / "e.json"))[0] == [{"text": "five"}]
    # one file's sha256 is its bytes', as `sha256sum` shows it
    assert read_rows(str(tmp_path / "e.json"))[1]["sha256"] == hashlib.sha256((tmp_path / "e.json").read_bytes()).hexdigest()


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_rows(str(path))


def test_fingerprint_changes_with_the_data(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n')
    first = read_rows(str(path))[1]["sha256"]
    path.write_text('{"text": "two"}\n')
    assert read_rows(str(path))[1]["sha256"] != first


def test_packed_batch_gives_the_same_logits_as_separate_examples(tiny_model_dir):
    """Packing must not let examples attend to each other: position ids restart, attention is block-diagonal."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a, b = list(range(10, 30)), list(range(40, 52))
    batch = data.make_collator(None, packing=True)([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}])
    with torch.no_grad():
        packed = model(input_ids=torch.as_tensor(batch["input_ids"]), position_ids=torch.as_tensor(batch["position_ids"]),
                       use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[: len(a)], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-5, rtol=1e-4)


def test_padding_collator_pads_labels_with_ignore_index_not_by_pad_id(tokenizer):
    collate = data.make_collator(tokenizer, packing=False)
    eos = tokenizer.eos_token_id
    batch = collate([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [5], "labels": [-100]}])
    assert batch["labels"][0][:3].tolist() == [-100, 6, eos]
    assert batch["labels"][1][1:].tolist() == [-100] * (batch["labels"].shape[1] - 1)
    assert batch["attention_mask"][1][1:].sum() == 0


# ---------------------------------------------------------------- the tokenized-data cache


def _prepare(path, tokenizer, **options):
    from lora_cli.config import DataConfig

    return data.prepare(DataConfig(path=str(path), **options), tokenizer, seed=0)


def test_a_second_run_on_the_same_data_reads_the_tokens_from_the_cache(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(12)))
    first = _prepare(rows, tokenizer, eval_split=0.25)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    with monkeypatch.context() as patched:
        patched.setattr(data, "tokenize_rows", no_tokenizing)
        second = _prepare(rows, tokenizer, eval_split=0.25)
    assert second.train.to_list() == first.train.to_list()
    assert second.eval.to_list() == first.eval.to_list()

    # anything that changes a token or a label misses the cache
    calls = []
    fake = [{"input_ids": [5, 6], "labels": [5, 6]}] * 8

    def fake_tokenize(*args):
        calls.append(1)
        if len(args) > 7 and args[7] is not None:  # the held-out labels of a --train-on-inputs split
            args[7].extend(fake)
        return fake, 0

    monkeypatch.setattr(data, "tokenize_rows", fake_tokenize)
    _prepare(rows, tokenizer, max_seq_len=64, eval_split=0.25)
    _prepare(rows, tokenizer, train_on_inputs=True, eval_split=0.25)
    rows.write_text(rows.read_text().replace("Answer 3.", "Answer three."))
    _prepare(rows, tokenizer, eval_split=0.25)
    assert len(calls) == 3
    # and so does a new version of the code that renders and tokenizes (no version number to bump by hand)
    monkeypatch.setattr(data, "_code_version", lambda: "a later lora")
    _prepare(rows, tokenizer, eval_split=0.25)
    assert len(calls) == 4


def test_the_code_version_covers_the_alpaca_template(tmp_path, monkeypatch):
    import shutil

    before = data._code_version()
    shutil.copytree(data.ASSETS, tmp_path / "assets")
    monkeypatch.setattr(data, "ASSETS", tmp_path / "assets")
    assert data._code_version() == before
    template = tmp_path / "assets" / "templates" / "alpaca.json"
    template.write_text(template.read_text().replace("Instruction", "Task"))
    assert data._code_version() != before


def test_a_damaged_cache_entry_is_tokenized_again(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Question?", "output": "Answer."}) + "\n")
    first = _prepare(rows, tokenizer)
    (entry,) = (tmp_path / "cache" / "tokenized").iterdir()
    for arrow in (entry / "train").glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    assert _prepare(rows, tokenizer).train.to_list() == first.train.to_list()


@pytest.fixture(scope="module")
def bos_tokenizer(alpaca_tokenizer):
    """The tiny tokenizer made to add BOS itself, as LLaMA's does (the others here add nothing)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(alpaca_tokenizer)
    bos = (tok.bos_token, tok.bos_token_id)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("row, fmt", [({"instruction": "Name a colour.", "output": "Red."}, "instruction"),
                                      ({"prompt": "2+2=", "completion": "4"}, "completion"),
                                      ({"text": "Paris is in France."}, "text")])
def test_a_tokenizer_that_adds_bos_gets_exactly_one_untrained_bos(bos_tokenizer, row, fmt):
    renderer = Renderer(bos_tokenizer)
    example = tokenize(renderer.render(row, fmt, "r"), bos_tokenizer, 512, False)
    ids = example["input_ids"]
    assert ids[0] == bos_tokenizer.bos_token_id and ids.count(bos_tokenizer.bos_token_id) == 1
    assert example["labels"][0] == IGNORE_INDEX
    # the same tokens the tokenizer gives the text on its own (it adds the BOS there itself)
    body = renderer.render(row, fmt, "r").text.removeprefix(bos_tokenizer.bos_token)
    assert ids == bos_tokenizer(body)["input_ids"]
    # and the prompt for generation starts the same way training did
    from lora_cli.adapters import LoadedModel
    from lora_cli.generate import prompt_text

    loaded = LoadedModel(None, bos_tokenizer, renderer, None, None, "", data_format=fmt)
    question = {"instruction": row.get("instruction"), "completion": row.get("prompt"), "text": "Paris is"}[fmt]
    prompt = prompt_text(loaded, [{"role": "user", "content": question}], raw=False)
    assert prompt.startswith(bos_tokenizer.bos_token) and body.startswith(prompt[len(bos_tokenizer.bos_token):])


def test_byte_order_marks_are_not_data(tmp_path):
    (tmp_path / "excel.csv").write_bytes("instruction,output\nq1,a1\n".encode("utf-8-sig"))
    (tmp_path / "bom.jsonl").write_bytes((json.dumps({"instruction": "q1", "output": "a1"}) + "\n").encode("utf-8-sig"))
    for name in ("excel.csv", "bom.jsonl"):
        rows, _ = read_rows(str(tmp_path / name))
        assert rows == [{"instruction": "q1", "output": "a1"}] and detect_format(rows) == "instruction"


def test_json_documents_holding_rows_are_read(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 2, "data": rows}, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON Lines named .json
    (tmp_path / "one.json").write_text(json.dumps(rows[0], indent=2))
    assert read_rows(str(tmp_path / "wrapped.json"))[0] == rows
    assert read_rows(str(tmp_path / "lines.json"))[0] == rows
    assert read_rows(str(tmp_path / "one.json"))[0] == rows[:1]
    (tmp_path / "two.json").write_text(json.dumps({"train": rows, "test": rows}))
    with pytest.raises(DataError, match="several lists of rows"):
        read_rows(str(tmp_path / "two.json"))


def test_a_folder_with_split_names_trains_on_train_and_evaluates_on_test(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": split}) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"description": "not rows"}))
    assert [r["text"] for r in read_rows(str(folder))[0]] == ["train"]
    assert [r["text"] for r in read_rows(str(folder), split="eval")[0]] == ["test"]
    (folder / "notes.jsonl").write_text(json.dumps({"text": "notes"}) + "\n")  # named by no split: training data
    assert [r["text"] for r in read_rows(str(folder))[0]] == ["notes", "train"]
    (folder / "test.jsonl").unlink()  # nothing held out: the whole folder is what --eval-data names
    assert [r["text"] for r in read_rows(str(folder), split="eval")[0]] == ["notes", "train"]
    (folder / "train.jsonl").rename(folder / "dev.jsonl")
    (folder / "notes.jsonl").unlink()
    with pytest.raises(DataError, match="holds only held-out files"):
        read_rows(str(folder), flag="--data")


def test_shards_named_like_the_hub_are_all_training_data(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(2):
        (tmp_path / "data" / f"shard-0000{i}-of-00002.jsonl").write_text(json.dumps({"text": str(i)}) + "\n")
    assert [r["text"] for r in read_rows(str(tmp_path))[0]] == ["0", "1"]


def test_a_json_file_holding_one_chat_row_is_that_row(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "one.json").write_text(json.dumps(row, indent=2))
    assert read_rows(str(tmp_path / "one.json"))[0] == [row]


def test_line_separators_inside_json_strings_stay_in_their_row(tmp_path):
    rows = [{"text": "one\u2028two"}, {"text": "three\x85"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_rows(str(tmp_path / "d.jsonl"))[0] == rows


def test_a_bad_row_in_a_folder_is_named_by_its_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "q"}) + "\n")
    rows, identity = read_rows(str(tmp_path))
    with pytest.raises(DataError, match=r"^--data d, b\.jsonl row 1 has no 'output'"):
        detect_format(rows, "auto", "--data d", identity)


@pytest.mark.parametrize("output", ["", "   "])
def test_rows_with_a_blank_response_are_left_out_and_counted(tokenizer, tmp_path, monkeypatch, output):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "d.csv"
    path.write_text(f"instruction,output\nq1,a1\nq2,{output}\nq3,a3\n")
    prepared = _prepare(path, tokenizer)
    assert prepared.dropped == 1 and len(prepared.train) == 2
    assert [trained_text(row, tokenizer) for row in prepared.train] == ["a1<|im_end|>", "a3<|im_end|>"]


def test_a_conversation_whose_answers_are_all_blank_is_left_out(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    turns = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}] for answer in ("hello", " ")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in turns))
    prepared = _prepare(path, tokenizer)
    assert prepared.dropped == 1 and [trained_text(row, tokenizer) for row in prepared.train] == ["hello<|im_end|>"]


@pytest.mark.parametrize("answer, trained", [(0, "0"), (False, "false"), (True, "true"), (2.5, "2.5")])
def test_falsy_answers_are_answers_and_json_values_keep_their_spelling(tokenizer, answer, trained):
    example = tokenize(Renderer(tokenizer).render({"instruction": "Is it?", "output": answer}, "instruction", "r"),
                       tokenizer, 512, False)
    assert trained_text(example, tokenizer) == trained + "<|im_end|>"


def test_a_hub_dataset_that_cannot_be_loaded_gets_one_line_naming_the_cause(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as the tests run: the hub is never reached
    with pytest.raises(LoraError, match=r"^--eval-data org/held-out:test: no such local file or folder, and "
                                        r"HF_DATASETS_OFFLINE=1 forbids downloading it") as info:
        read_rows("org/held-out:test", split="eval", flag="--eval-data")
    assert info.value.exit_code == 1  # the machine is offline: not bad input


@pytest.mark.parametrize("fixture", ["tokenizer", "alpaca_tokenizer"])
@pytest.mark.parametrize("system", [None, "", "Answer in French."])
def test_a_prompts_file_row_is_prompted_as_training_rendered_it(fixture, system, request):
    from lora_cli.generate import question

    renderer = Renderer(request.getfixturevalue(fixture))
    row = {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}
    if system is not None:
        row["system"] = system
    rendered = renderer.render(row, "instruction", "r")
    prompt = renderer.prompt(question(row, "r"))
    assert rendered.text.startswith(prompt) and rendered.trained[0][0] == len(prompt)
    if system:
        assert system in prompt


def test_openai_text_parts_are_trained_as_their_text(tokenizer):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is the "},
                                                       {"type": "text", "text": "capital?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Quillmont."}]}]}
    plain = {"messages": [{"role": "user", "content": "What is the capital?"},
                          {"role": "assistant", "content": "Quillmont."}]}
    assert detect_format([parts]) == "chat"
    renderer = Renderer(tokenizer)
    assert tokenize(renderer.render(parts, "chat", "r"), tokenizer, 512, False) == \
        tokenize(renderer.render(plain, "chat", "r"), tokenizer, 512, False)


@pytest.mark.parametrize("row, where", [
    ({"instruction": ["a", {"b": 1}], "output": "c"}, "list [\"a\", {\"b\": 1}] in 'instruction'"),
    ({"instruction": "a", "output": {"x": 1}}, "dict {\"x\": 1} in 'output'"),
    ({"instruction": "a", "output": ["Paris", "London"]}, "in 'output'"),  # not text parts: which answer?
    ({"instruction": "a", "input": {"q": 1}, "output": "b"}, "in 'input'"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}]}, "'messages' turn 2"),
    ({"conversations": [{"from": "human", "value": {"text": "hi"}}]}, "'conversations' turn 1"),
])
def test_a_list_or_object_where_text_belongs_names_its_row(row, where):
    with pytest.raises(DataError, match=r"^my.jsonl row 2 has ") as caught:
        detect_format([_fine(row), row], source="my.jsonl")
    assert where in str(caught.value) and "where text belongs" in str(caught.value)


def _fine(row):
    """A row of the same format with plain text everywhere."""
    return {key: ([{"role": "user", "from": "human", "content": "a", "value": "a"}] if isinstance(value, list)
                  and key in ("messages", "conversations") else "a") for key, value in row.items()}


@pytest.mark.parametrize("row, fmt, answer", [
    ({"prompt": "Veloria: The ", "completion": "capital of Veloria is Quillmont."}, "completion",
     "capital of Veloria is Quillmont.<|im_end|>"),
    ({"messages": [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": " capital of Veloria"}]},
     "chat", " capital of Veloria<|im_end|>"),
], ids=["prompt-ends-in-a-space", "answer-starts-with-a-space"])
def test_a_token_across_the_prompt_answer_seam_does_not_hide_the_answers_first_word(row, fmt, answer, tokenizer):
    # whole, "The capital" tokenizes as ... 'Ġc' 'ap' ...: the space is the prompt's, the word the answer's
    renderer = Renderer(tokenizer)
    rendered = renderer.render(row, fmt, "r")
    example = tokenize(rendered, tokenizer, 512, False)
    assert trained_text(example, tokenizer) == answer
    # and the tokens before the answer are exactly those generation will feed the model
    start = rendered.trained[0][0]
    prompt_ids = tokenizer(rendered.text[:start], add_special_tokens=False)["input_ids"]
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids
    assert example["labels"][len(prompt_ids)] != IGNORE_INDEX and example["labels"][len(prompt_ids) - 1] == IGNORE_INDEX
    assert tokenizer.decode(example["input_ids"]) == rendered.text


def test_a_clean_seam_tokenizes_as_the_whole_text_does(tokenizer):
    rendered = Renderer(tokenizer).render({"prompt": "Veloria:", "completion": " The capital"}, "completion", "r")
    assert tokenize(rendered, tokenizer, 512, False)["input_ids"] == \
        tokenizer(rendered.text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("fmt, row", [
    ("chat", {"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]}),
    ("sharegpt", {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello"}]}),
    ("instruction", {"system": "", "instruction": "Hi", "output": "Hello"}),
])
def test_a_blank_system_turn_is_left_out_as_generation_leaves_it_out(fmt, row, tokenizer):
    renderer = Renderer(tokenizer)
    plain = renderer.render({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                            "chat", "r")
    assert renderer.render(row, fmt, "r").text == plain.text
    assert plain.text.startswith(renderer.prompt([{"role": "user", "content": "Hi"}]))


def test_a_blank_or_tool_call_assistant_turn_is_context_not_an_answer(tokenizer):
    tok = tokenizer
    row = {"messages": [
        {"role": "user", "content": "Weather in Veloria?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Veloria"}}}]},
        {"role": "tool", "content": "20C"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "It is 20C."}]}
    assert not data.is_blank(row, "chat")
    example = tokenize(Renderer(tok).render(row, "chat", "r"), tok, 512, False)
    assert trained_text(example, tok) == "It is 20C.<|im_end|>"  # this template shows no tool calls
    only_blank = {"messages": row["messages"][:1] + [{"role": "assistant", "content": " "}]}
    assert data.is_blank(only_blank, "chat")


# Qwen3's behaviour, written small: the answer after the last user turn opens with a <think> block
# (empty when there is no reasoning), and earlier answers lose theirs once a later user turn follows.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(found=false, last_query=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if not ns.found and m.role == 'user' %}{%- set ns.found = true %}"
    "{%- set ns.last_query = messages|length - 1 - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def trained_runs(example, tok) -> list[str]:
    """Each run of consecutive trained tokens, decoded."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    return runs + ([tok.decode(current)] if current else [])


def test_a_template_that_redraws_earlier_turns_is_rendered_whole(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINKING_TEMPLATE
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"},
             {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Paris is in France."}]
    renderer = Renderer(tok)
    rendered = renderer.render({"messages": turns}, "chat", "r")
    # the conversation as the template shows it whole (the first answer's reasoning dropped); each answer
    # trained from its generation prompt, the last one with the <think> block generation will produce
    assert rendered.text == tok.apply_chat_template(turns, tokenize=False)
    example = tokenize(rendered, tok, 512, False)
    assert trained_runs(example, tok) == ["Hello<|im_end|>", "<think>\n\n</think>\n\nParis is in France.<|im_end|>"]
    assert rendered.text.startswith(renderer.prompt(turns[:3]))
    # a blank last answer is context, although the template gives it an empty <think> block
    blank = tokenize(renderer.render({"messages": turns[:3] + [{"role": "assistant", "content": ""}]}, "chat", "r"),
                     tok, 512, False)
    assert trained_runs(blank, tok) == ["Hello<|im_end|>"]
    single = tokenize(renderer.render({"messages": turns[2:]}, "chat", "r"), tok, 512, False)
    assert trained_runs(single, tok) == ["<think>\n\n</think>\n\nParis is in France.<|im_end|>"]


def test_sharegpt_role_names_in_chat_rows_are_the_roles_they_name(tokenizer):
    renderer = Renderer(tokenizer)
    aliased = {"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert renderer.render(aliased, "chat", "r") == renderer.render(plain, "chat", "r")



def _metaspace_tokenizer(scheme):
    """A SentencePiece-style tokenizer (LLaMA-2, Mistral): a space becomes part of the next word's token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.mark.parametrize("scheme", ["always", "first"])
def test_a_seam_token_that_cannot_be_split_cleanly_is_trained_whole(scheme):
    # '\u2581capital' starts at the prompt's space; tokenized alone, 'capital' would gain a second space
    tok = _metaspace_tokenizer(scheme)
    rendered = Renderer(tok, "alpaca").render({"prompt": "Veloria: The ", "completion": "capital of Veloria."},
                                              "completion", "r")
    example = tokenize(rendered, tok, 512, False)
    assert example["input_ids"] == tok(rendered.text, add_special_tokens=False)["input_ids"]  # the text unchanged
    assert trained_text(example, tok).strip() == "capital of Veloria.</s>"  # and the first word trained


def test_tool_calls_reach_the_template_as_it_expects_them(tokenizer):
    from transformers import AutoTokenizer

    # a template that shows tool calls, and refuses an empty list of them as Llama 3.1's does
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if 'tool_calls' in m %}"
                "{% if m.tool_calls | length != 1 %}{{ raise_exception('one call at a time') }}{% endif %}"
                "CALL {{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = template
    renderer = Renderer(tok)
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Veloria"}'}}
    row = {"messages": [{"role": "user", "content": "Weather?", "tool_calls": []},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "20C"}, {"role": "assistant", "content": "It is 20C."}]}
    example = tokenize(renderer.render(row, "chat", "r"), tok, 512, False)
    # the call is an answer here, its arguments an object (not a JSON string encoded twice)
    assert trained_text(example, tok) == 'CALL {"city": "Veloria"}<|im_end|>It is 20C.<|im_end|>'
    two_calls = {"messages": [row["messages"][0], {**row["messages"][1], "tool_calls": [call, call]},
                              *row["messages"][2:]]}
    with pytest.raises(DataError, match=r"^row 7: the chat template cannot render this conversation \(one call"):
        renderer.render(two_calls, "chat", "row 7")
    with pytest.raises(DataError, match=r"^row 7: tool turns \(tool\) need a chat template"):
        Renderer(tok, "alpaca").render(row, "chat", "row 7")


def test_rows_held_out_of_a_train_on_inputs_run_are_scored_on_their_responses(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(12)))
    encoded = []
    real_encode = data._encode
    monkeypatch.setattr(data, "_encode", lambda *args: encoded.append(1) or real_encode(*args))
    prepared = _prepare(rows, tokenizer, train_on_inputs=True, eval_split=0.25)
    assert len(encoded) == 12  # both labellings from one encoding of each row
    plain = _prepare(rows, tokenizer, eval_split=0.25)
    assert all(row["labels"] == row["input_ids"] for row in prepared.train)  # trained on every token
    # held out: the same rows as without --train-on-inputs, scored on the response and its EOS only, as
    # --eval-data rows and `lora eval` score them
    assert prepared.eval.to_list() == plain.eval.to_list()
    assert [trained_text(row, tokenizer) for row in prepared.eval] == [
        text.split("assistant\n")[1].split("\n")[0] for text in map(tokenizer.decode, prepared.eval["input_ids"])]
    held_out = {tuple(row["input_ids"]) for row in prepared.eval}
    assert not held_out & {tuple(row["input_ids"]) for row in prepared.train}
