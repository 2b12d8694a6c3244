"""`lora merge` on the tiny LLaMA: the merged folder is a plain model that computes what base + adapter did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import FACTS, tiny_train_args
from lora_cli import cli, merge, models, train
from lora_cli.errors import ConfigError, LoraError, RunError
from test_train import tiny_config

IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80, 90, 100]])
QUESTION, ANSWER = FACTS[0]


@pytest.fixture(scope="module")
def fact_file(tmp_path_factory) -> Path:
    """One fact, 32 times: what the tiny model can learn in 60 steps (all four facts need ~150 and still miss one)."""
    path = tmp_path_factory.mktemp("fact") / "fact.jsonl"
    path.write_text((json.dumps({"instruction": QUESTION, "output": ANSWER}) + "\n") * 32)
    return path


def _train(model_dir: Path, data: Path, out: Path, **overrides) -> train.TrainResult:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_RUNS_DIR", str(out.parent / "runs"))
        return train.run(tiny_config(model_dir, data, out, **{"training.max_steps": 60, **overrides}))


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, fact_file, tmp_path_factory) -> train.TrainResult:
    return _train(tiny_model_dir, fact_file, tmp_path_factory.mktemp("lora") / "run")


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, fact_file, tmp_path_factory) -> train.TrainResult:
    pytest.importorskip("bitsandbytes")
    return _train(tiny_model_dir, fact_file, tmp_path_factory.mktemp("qlora") / "run", **{"model.use_4bit": True})


@pytest.fixture(scope="module")
def dora_run(tiny_model_dir, fact_file, tmp_path_factory) -> train.TrainResult:
    return _train(tiny_model_dir, fact_file, tmp_path_factory.mktemp("dora") / "run", **{"lora.use_dora": True})


@pytest.fixture(scope="module")
def int8_run(tiny_model_dir, fact_file, tmp_path_factory) -> train.TrainResult:
    pytest.importorskip("bitsandbytes")
    return _train(tiny_model_dir, fact_file, tmp_path_factory.mktemp("int8") / "run", **{"model.use_8bit": True})


def run_merge(adapter: Path, out: Path, **kwargs) -> dict:
    args = {"base": None, "dtype": None, "merge_into": "dequantized", "overwrite": False, "check": True, **kwargs}
    return merge.merge(str(adapter), str(out), **args)


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def plain(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def with_adapter(base, run_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(run_dir))


def four_bit(model_dir: Path):
    return models.load_base_model(models.ModelSource("tiny", str(model_dir), None, True), precision="fp32",
                                  quantization="4bit")


def greedy(model, tokenizer, question: str) -> str:
    from lora_cli.data import Renderer

    text = Renderer(tokenizer, "auto").prompt([{"role": "user", "content": question}])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, max_new_tokens=20, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_merged_folder_loads_without_peft_and_matches_base_plus_adapter(lora_run, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "merged"
    report = run_merge(lora_run.run_dir, out)
    merged = plain(out)
    assert type(merged) is LlamaForCausalLM and not (out / "adapter_config.json").exists()
    expected = logits(with_adapter(plain(tiny_model_dir), lora_run.run_dir))
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)
    assert (logits(merged) - logits(plain(tiny_model_dir))).abs().max() > 1e-2  # the adapter is in there
    assert report["merge_into"] == "original" and report["dtype"] == "fp32" and report["max_logit_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    trained_template = AutoTokenizer.from_pretrained(lora_run.run_dir).chat_template
    assert trained_template and AutoTokenizer.from_pretrained(out).chat_template == trained_template
    assert json.loads((out / merge.RECORD).read_text())["output_dir"] == str(out)
    assert leftovers(out) == []


def test_existing_merge_is_replaced_only_with_overwrite(lora_run, tmp_path):
    out = tmp_path / "merged"
    run_merge(lora_run.run_dir, out, check=False)
    before = (out / merge.RECORD).read_text()
    with pytest.raises(RunError, match="--overwrite") as caught:
        run_merge(lora_run.run_dir, out, check=False)
    assert caught.value.exit_code == 2 and (out / merge.RECORD).read_text() == before
    run_merge(lora_run.run_dir, out, check=False, overwrite=True, dtype="bf16")
    assert json.loads((out / merge.RECORD).read_text())["dtype"] == "bf16" and leftovers(out) == []


def test_overwrite_replaces_only_an_earlier_merge(lora_run, tiny_model_dir, tmp_path):
    import shutil

    # a project of the user's that happens to hold a config.json
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"app": "x"}')
    (project / "src" / "main.py").write_text("precious\n")
    with pytest.raises(RunError, match=r"is not an earlier merge \(no lora_merge.json\); pick another folder"):
        run_merge(lora_run.run_dir, project, check=False, overwrite=True)
    # someone else's model
    other = shutil.copytree(tiny_model_dir, tmp_path / "other_model")
    with pytest.raises(RunError, match="is not an earlier merge"):
        run_merge(lora_run.run_dir, other, check=False, overwrite=True)
    # an earlier merge with the user's notes put beside it
    out = tmp_path / "merged"
    run_merge(lora_run.run_dir, out, check=False)
    (out / "NOTES.txt").write_text("mine\n")
    with pytest.raises(RunError, match=r"holds files a merge does not write \(such as NOTES.txt\)"):
        run_merge(lora_run.run_dir, out, check=False, overwrite=True)
    # a folder that holds the adapter being merged (or the base) would delete it
    holder = tmp_path / "holder"
    shutil.copytree(lora_run.run_dir, holder / "myrun", ignore=shutil.ignore_patterns("checkpoints", "merged"))
    with pytest.raises(ConfigError, match="is or holds the adapter folder being merged"):
        run_merge(holder / "myrun", holder, check=False, overwrite=True)
    assert (project / "src" / "main.py").read_text() == "precious\n" and (other / "config.json").is_file()
    assert (out / "NOTES.txt").is_file() and (holder / "myrun" / "adapter_config.json").is_file()


def test_failed_self_check_keeps_the_earlier_merge_and_leaves_nothing(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    run_merge(lora_run.run_dir, out, check=False)
    before = (out / merge.RECORD).read_text()
    monkeypatch.setattr(merge, "FP32_TOLERANCE", -1.0)  # any difference at all now fails the check
    with pytest.raises(LoraError, match="nothing was kept") as caught:
        run_merge(lora_run.run_dir, out, overwrite=True)
    assert caught.value.exit_code == 1
    assert (out / merge.RECORD).read_text() == before and leftovers(out) == []


def test_sharded_base_is_merged_shard_by_shard_and_keeps_its_index(lora_run, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    sharded = tmp_path / "sharded"
    plain(tiny_model_dir).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(sharded)
    index = json.loads((sharded / merge.INDEX).read_text())
    shards = list(dict.fromkeys(index["weight_map"].values()))
    assert len(shards) > 2
    written = []
    real_write_shard = merge._write_shard
    monkeypatch.setattr(merge, "_write_shard", lambda src, *a: written.append(src.name) or real_write_shard(src, *a))
    out = tmp_path / "merged"
    run_merge(lora_run.run_dir, out, base=str(sharded))
    assert written == shards
    assert json.loads((out / merge.INDEX).read_text())["weight_map"] == index["weight_map"]
    for shard in shards:
        with safe_open(str(sharded / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
    expected = logits(with_adapter(plain(sharded), lora_run.run_dir))
    torch.testing.assert_close(logits(plain(out)), expected, atol=1e-4, rtol=0)


def test_bf16_output_is_stored_in_bf16_and_computes_base_plus_adapter(lora_run, tiny_model_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "merged"
    report = run_merge(lora_run.run_dir, out, dtype="bf16")
    assert report["dtype"] == "bf16"
    # bf16 rounding of the merged weights, against base + adapter in fp32: close, and far closer than the base
    expected = logits(with_adapter(plain(tiny_model_dir), lora_run.run_dir))
    merged = logits(plain(out))
    assert (merged - expected).abs().max() < 0.05 < (logits(plain(tiny_model_dir)) - expected).abs().max()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_qlora_merge_reproduces_the_4bit_model_and_original_does_not(qlora_run, tiny_model_dir, tmp_path):
    trained = logits(with_adapter(four_bit(tiny_model_dir), qlora_run.run_dir))
    report = run_merge(qlora_run.run_dir, tmp_path / "dequantized")
    assert report["merge_into"] == "dequantized-nf4"
    torch.testing.assert_close(logits(plain(tmp_path / "dequantized")), trained, atol=1e-4, rtol=0)
    report = run_merge(qlora_run.run_dir, tmp_path / "original", merge_into="original")
    assert report["merge_into"] == "original"
    assert (logits(plain(tmp_path / "original")) - trained).abs().max() > 1e-2  # NF4 rounding is not negligible


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dequantized_weights_are_the_ones_bitsandbytes_computes_with(tiny_model_dir, precision):
    """NF4 codes come from the weights cast to the training precision; the set of quantized layers matches."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    dtype = models.torch_dtype(precision)
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    model = models.load_base_model(models.ModelSource("tiny", str(tiny_model_dir), None, True), precision=precision,
                                   quantization="4bit")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert merge.quantized_weight_keys(tiny_model_dir) == {f"{name}.weight" for name in layers}
    for name, layer in layers.items():
        theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        mine = merge.dequantized(stored[f"{name}.weight"], "4bit", dtype)
        assert mine.dtype == torch.float32 and torch.equal(mine.to(dtype), theirs), name


def test_dequantized_int8_weights_are_the_ones_bitsandbytes_computes_with(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    model = models.load_base_model(models.ModelSource("tiny", str(tiny_model_dir), None, True), precision="fp32",
                                   quantization="8bit")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    x = torch.randn(3, layer.in_features)
    layer.train()  # the training forward: x @ dequantized W (in eval, int8 also rounds the activations)
    with torch.no_grad():
        got = layer(x)
    expected = x @ merge.dequantized(stored["model.layers.0.mlp.down_proj.weight"], "8bit", torch.float32).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantization, precision", [("8bit", "fp32"), ("4bit", "bf16")])
def test_merge_into_dequantized_follows_how_the_run_was_quantized(quantization, precision, lora_run, tmp_path):
    """The int8 path, and NF4 from bf16 weights; the self-check's reference is the bitsandbytes base, so
    quantized from the weights in the training precision (the functions above pin the weights themselves)."""
    pytest.importorskip("bitsandbytes")
    run_dir = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "lora_run.json"):
        if (lora_run.run_dir / name).is_file():
            (run_dir / name).parent.mkdir(exist_ok=True)
            (run_dir / name).write_bytes((lora_run.run_dir / name).read_bytes())
    manifest = json.loads((run_dir / "lora_run.json").read_text())
    manifest["base_model"].update(quantization=quantization, precision=precision)
    (run_dir / "lora_run.json").write_text(json.dumps(manifest))
    report = run_merge(run_dir, tmp_path / "merged")
    assert report["merge_into"] == {"8bit": "dequantized-int8", "4bit": "dequantized-nf4"}[quantization]
    assert report["max_logit_diff"] < 1e-4
    original = logits(plain(run_merge(run_dir, tmp_path / "original", merge_into="original")["output_dir"]))
    assert (logits(plain(tmp_path / "merged")) - original).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["lora", "qlora", "dora", "int8"])
def test_a_trained_fact_survives_merging(kind, request, tiny_model_dir, tmp_path):
    """Trained through `lora train` in each mode (4-bit, DoRA, 8-bit base), then merged."""
    from transformers import AutoTokenizer

    result = request.getfixturevalue(f"{kind}_run")
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir)
    assert greedy(plain(tiny_model_dir), tokenizer, QUESTION) != ANSWER  # the base does not know it
    assert greedy(result.model, tokenizer, QUESTION) == ANSWER
    run_merge(result.run_dir, tmp_path / "merged")
    assert greedy(plain(tmp_path / "merged"), tokenizer, QUESTION) == ANSWER


PEFT_OPTIONS = {
    "dora-rslora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True, "use_rslora": True},
    "patterns-embeddings-modules-to-save": {
        "target_modules": ["q_proj", "v_proj", "gate_proj", "embed_tokens"], "modules_to_save": ["lm_head"],
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"gate_proj": 3}},
}


@pytest.mark.parametrize("options", PEFT_OPTIONS.values(), ids=PEFT_OPTIONS.keys())
def test_peft_options_merge_exactly(options, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(plain(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, **options))
    with torch.no_grad():  # B starts at zero and DoRA's magnitude at the weight norms: move them all
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.mul_(1 + 0.2 * torch.randn_like(param)).add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(with_adapter(plain(tiny_model_dir), tmp_path / "adapter"))
    report = run_merge(tmp_path / "adapter", tmp_path / "merged")
    merged = logits(plain(tmp_path / "merged"))
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    assert (merged - logits(plain(tiny_model_dir))).abs().max() > 1e-2 and report["max_logit_diff"] < 1e-4


def test_bare_lora_merge_merges_runs_latest(workdir, tiny_model_dir, facts_file):
    from lora_cli.cli import app

    runner = CliRunner()
    assert runner.invoke(app, tiny_train_args(tiny_model_dir, facts_file, workdir / "runs" / "tiny")).exit_code == 0
    result = runner.invoke(app, ["merge"])
    assert result.exit_code == 0, result.output
    merged = workdir / "runs" / "tiny" / "merged"
    assert (merged / "config.json").is_file() and str(merged.resolve()) in result.stderr and result.stdout == ""
    result = runner.invoke(app, ["merge", "--json", "--no-check"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--overwrite" in result.stderr
    result = runner.invoke(app, ["merge", "--json", "--no-check", "--overwrite", "--dtype", "bf16"])
    assert result.exit_code == 0 and json.loads(result.stdout)["dtype"] == "bf16"
    # the common options: --model names the base as --base does, and --config holds any option
    (workdir / "merge.yaml").write_text(f"model: {tiny_model_dir}\ndtype: fp16\nno-check: true\noverwrite: true\n")
    result = runner.invoke(app, ["merge", "--json", "--config", str(workdir / "merge.yaml")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtype"] == "fp16" and report["base"] == str(tiny_model_dir)


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16"),
    (["--merge-into", "half"], "--merge-into must be one of dequantized, original"),
    (["nowhere"], "nowhere does not exist"),
])
def test_bad_merge_input_gets_one_line_and_exit_2(args, message, workdir):
    from lora_cli.cli import app

    result = CliRunner().invoke(app, ["merge", *args])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_generate_answers_with_the_adapter_in_every_mode(lora_run, tiny_model_dir, tmp_path):
    """`lora generate` on the run that learned the fact: the adapted answer is the fact, the base's is not."""
    runner = CliRunner()
    run = str(lora_run.run_dir)
    single = runner.invoke(cli.app, ["generate", "--adapter", run, "--prompt", QUESTION, "--max-new-tokens", "20"])
    assert single.exit_code == 0, single.output
    assert single.stdout.strip() == ANSWER

    compared = runner.invoke(cli.app, ["generate", "--adapter", run, "--prompt", QUESTION, "--compare",
                                       "--max-new-tokens", "20"])
    assert compared.exit_code == 0, compared.output
    base_line, adapted_line = compared.stdout.strip().splitlines()
    assert adapted_line == f"[adapted] {ANSWER}" and base_line.startswith("[base] ") and ANSWER not in base_line

    # a chat: the "> " prompt goes to stderr, stdout carries only the answer
    chat = runner.invoke(cli.app, ["generate", "--adapter", run, "--interactive", "--max-new-tokens", "20"],
                         input=f"{QUESTION}\n\n")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.strip() == ANSWER and chat.stderr.count("> ") == 2

    # the same from a --config file, whose values flags override
    (tmp_path / "generate.yaml").write_text(f"adapter: {run}\nprompt: Something else entirely?\nmax_new_tokens: 20\n")
    configured = runner.invoke(cli.app, ["generate", "--config", str(tmp_path / "generate.yaml"), "--prompt", QUESTION])
    assert configured.exit_code == 0, configured.output
    assert configured.stdout.strip() == ANSWER
    (tmp_path / "generate.yaml").write_text("max_new_tokenz: 20\n")
    assert runner.invoke(cli.app, ["generate", "--config", str(tmp_path / "generate.yaml")]).exit_code == 2

    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION, "id": 7}) + "\n")
    args = ["generate", "--adapter", run, "--prompts-file", str(prompts), "--output", str(answers),
            "--max-new-tokens", "20"]
    assert runner.invoke(cli.app, args).exit_code == 0
    assert [json.loads(line) for line in answers.read_text().splitlines()] == [
        {"prompt": QUESTION, "id": 7, "response": ANSWER}]
    # an existing answers file is kept unless --overwrite says otherwise
    answers.write_text("earlier answers\n")
    refused = runner.invoke(cli.app, args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert answers.read_text() == "earlier answers\n"
    assert runner.invoke(cli.app, [*args, "--overwrite"]).exit_code == 0
    assert json.loads(answers.read_text())["response"] == ANSWER


def test_inference_computes_in_the_precision_the_run_trained_in(lora_run, monkeypatch):
    """On a CPU whose timing prefers bf16, a run trained in fp32 is still evaluated in fp32: the adapter
    then reproduces the eval loss its training recorded. An explicit --precision is honoured."""
    import lora_cli.cpu
    from lora_cli import adapters

    monkeypatch.setattr(lora_cli.cpu, "bf16_beats_fp32", lambda *a, **k: True)
    assert lora_run.manifest["base_model"]["precision"] == "fp32"
    assert next(adapters.load_for_inference(str(lora_run.run_dir)).model.parameters()).dtype == torch.float32
    chosen = adapters.load_for_inference(str(lora_run.run_dir), precision="bf16")
    assert next(chosen.model.get_base_model().parameters()).dtype == torch.bfloat16


def test_a_system_prompt_reaches_every_generate_mode(lora_run, tmp_path, monkeypatch):
    """--system opens the conversation as a training row's system turn does; a --prompts-file row keeps its own."""
    from lora_cli import generate as gen

    prompts_seen = []
    real = gen.generate_one
    monkeypatch.setattr(gen, "generate_one", lambda loaded, text, *a, **k: prompts_seen.append(text) or
                        real(loaded, text, *a, **k))
    runner, run = CliRunner(), str(lora_run.run_dir)
    system = "You are terse."
    from lora_cli import adapters

    renderer = adapters.load_for_inference(run).renderer
    expected = renderer.prompt([{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])
    assert system in expected
    for mode in (["--prompt", QUESTION], ["--prompt", QUESTION, "--compare"]):
        prompts_seen.clear()
        result = runner.invoke(cli.app, ["generate", "--adapter", run, *mode, "--system", system,
                                         "--max-new-tokens", "4"])
        assert result.exit_code == 0, result.output
        assert prompts_seen and set(prompts_seen) == {expected}
    prompts_seen.clear()
    chat = runner.invoke(cli.app, ["generate", "--adapter", run, "--interactive", "--system", system,
                                   "--max-new-tokens", "4"], input=f"{QUESTION}\n\n")
    assert chat.exit_code == 0 and prompts_seen == [expected]
    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION}) + "\n" + json.dumps({"prompt": QUESTION, "system": "Own."}) + "\n")
    prompts_seen.clear()
    assert runner.invoke(cli.app, ["generate", "--adapter", run, "--prompts-file", str(prompts), "--output",
                                   str(answers), "--system", system, "--max-new-tokens", "4"]).exit_code == 0
    assert prompts_seen == [expected, renderer.prompt([{"role": "system", "content": "Own."},
                                                       {"role": "user", "content": QUESTION}])]
    refused = runner.invoke(cli.app, ["generate", "--adapter", run, "--prompt", QUESTION, "--system", system, "--raw"])
    assert refused.exit_code == 2 and "--system has no place in a --raw prompt" in refused.stderr


@pytest.mark.parametrize("change, message", [({"num_hidden_layers": 1}, "which the base does not have"),
                                             ({"intermediate_size": 96}, "the shape [64, 128] but the base has [64, 96]")])
def test_merging_into_another_base_is_refused_and_writes_nothing(change, message, lora_run, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    for key, value in change.items():
        setattr(config, key, value)
    other = tmp_path / "other-base"
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    with pytest.raises(LoraError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_merge(lora_run.run_dir, tmp_path / "merged", base=str(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-base"]  # no output, no temporary folder


def python_block(card: str) -> str:
    """The card's PEFT/transformers example: its first ```python block."""
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_run_card_describes_the_run_and_its_example_loads_the_trained_adapter(lora_run):
    from huggingface_hub import ModelCard

    card = (lora_run.run_dir / "README.md").read_text()
    record = lora_run.manifest
    assert "More Information Needed" not in card  # PEFT's template is replaced
    data = ModelCard(card).data
    assert data.library_name == "peft" and data.base_model is None  # a local base is no hub link
    for fact in (f"rank {record['config']['lora']['r']}", record["data"]["sha256"],
                 f"training loss {record['metrics']['train_loss']:.4f}", f"{record['metrics']['global_step']} steps"):
        assert fact in card
    namespace: dict = {}
    exec(python_block(card), namespace)  # what a reader of the card would run
    torch.testing.assert_close(logits(namespace["model"]), logits(lora_run.model), atol=1e-5, rtol=0)
    assert namespace["tokenizer"].chat_template  # the run's tokenizer, with the template it trained with


def test_run_card_links_a_hub_base_but_not_the_embedded_default(lora_run):
    from huggingface_hub import ModelCard

    from lora_cli import model_card

    hub = {**lora_run.manifest["base_model"], "name": "llama-7b", "hub_id": "huggyllama/llama-7b",
           "path": "huggyllama/llama-7b", "revision": "abc123", "quantization": "4bit"}
    card = model_card.adapter_card({**lora_run.manifest, "base_model": hub}, "me/my-adapter", published=True)
    data = ModelCard(card).data
    assert data.base_model == "huggyllama/llama-7b" and data.base_model_relation == "adapter"
    assert "qlora" in data.tags and "4-bit NF4" in card
    assert 'from_pretrained("huggyllama/llama-7b", revision="abc123")' in card
    assert 'PeftModel.from_pretrained(base, "me/my-adapter")' in card
    assert "hf download me/my-adapter --local-dir my-adapter" in card and "lora merge my-adapter" in card
    # the embedded default's weights are a dequantized GGUF, not the hub checkpoint: no link, a note
    embedded = {**lora_run.manifest["base_model"], "name": "smollm2-135m",
                "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "path": "/cache/smollm2"}
    card = model_card.adapter_card({**lora_run.manifest, "base_model": embedded}, "runs/x")
    assert ModelCard(card).data.base_model is None
    assert 'from_pretrained("/cache/smollm2")' in card and ".gguf" in card
    published = model_card.adapter_card({**lora_run.manifest, "base_model": embedded}, "me/x", published=True)
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # close to the weights' in published


def test_merged_card_says_what_was_merged_and_its_example_loads_the_merged_model(lora_run, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    report = run_merge(lora_run.run_dir, out)
    card = (out / "README.md").read_text()
    assert ModelCard(card).data.library_name == "transformers"
    assert lora_run.run_dir.name in card and f"{report['max_logit_diff']:.2e}" in card
    namespace: dict = {}
    exec(python_block(card), namespace)
    torch.testing.assert_close(logits(namespace["model"].float()), logits(plain(out)), atol=0, rtol=0)


@pytest.mark.parametrize("rows, overrides", [
    ({"instruction": QUESTION, "output": ANSWER}, {"data.template": "alpaca"}),
    ({"prompt": QUESTION + "\n", "completion": ANSWER}, {}),
], ids=["alpaca-template", "completion-rows"])
def test_a_merged_model_is_prompted_as_its_run_was(rows, overrides, tiny_model_dir, tmp_path):
    """A merged folder has no run manifest: the merge record carries the template and row format to generate."""
    from lora_cli import adapters
    from lora_cli.generate import prompt_text

    data = tmp_path / "rows.jsonl"
    data.write_text((json.dumps(rows) + "\n") * 32)
    run = _train(tiny_model_dir, data, tmp_path / "run", **overrides)
    merged = tmp_path / "merged"
    run_merge(run.run_dir, merged)
    with_run = adapters.load_for_inference(str(run.run_dir), precision="fp32")
    alone = adapters.load_for_inference(None, str(merged), precision="fp32")
    history = [{"role": "user", "content": QUESTION}]
    assert prompt_text(alone, history, raw=False) == prompt_text(with_run, history, raw=False)
    runner = CliRunner()
    # fp32 on every CPU: in bf16 the first token of this barely trained run is a near tie
    answers = [runner.invoke(cli.app, ["generate", *where, "--prompt", QUESTION, "--max-new-tokens", "12",
                                       "--precision", "fp32"]).stdout
               for where in (["--adapter", str(run.run_dir)], ["--model", str(merged)])]
    assert answers[0] == answers[1] and answers[0].strip()


@pytest.mark.parametrize("damage", ["empty", "length past the end", "huge length", "header not an object",
                                    "tensor entry not an object"])
def test_a_damaged_safetensors_header_is_one_error_without_reading_the_file(tmp_path, damage):
    import json
    import struct

    from lora_cli.errors import ModelError
    from lora_cli.safetensors_io import read_header

    def header_file(header: bytes, length: int | None = None) -> bytes:
        return struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * 64

    path = tmp_path / "model.safetensors"
    path.write_bytes({"empty": b"",
                      "length past the end": header_file(b"{}", 10_000),
                      "huge length": header_file(b"{}", 2**62),
                      "header not an object": header_file(json.dumps([1, 2]).encode()),
                      "tensor entry not an object": header_file(json.dumps({"w": 1}).encode())}[damage])
    with pytest.raises(ModelError, match="model.safetensors is damaged or not a safetensors file"):
        read_header(path)



def test_a_system_prompt_for_a_raw_text_run_is_refused_before_the_model_loads(lora_run, tmp_path, monkeypatch):
    """A run trained on prompt/completion or text rows sends prompts as they are: --system is refused from its
    record, in a second, not after the weights have loaded."""
    import shutil

    from lora_cli import adapters, runs

    run = tmp_path / "completion-run"
    shutil.copytree(lora_run.run_dir, run)
    manifest = runs.read_manifest(run)
    manifest["data"]["format"] = "completion"
    runs.write_json_atomic(run / runs.MANIFEST, manifest)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(adapters, "load_for_inference", must_not_load)
    refused = CliRunner().invoke(cli.app, ["generate", "--adapter", str(run), "--prompt", QUESTION, "--system", "Hi."])
    assert refused.exit_code == 2 and "this model was trained on raw text" in refused.stderr, refused.output
    assert adapters.trained_format(str(lora_run.run_dir), None) == lora_run.manifest["data"]["format"]


def test_an_interrupted_prompts_file_keeps_its_answers_and_the_same_command_goes_on(lora_run, tmp_path, monkeypatch):
    """Answers are written as they are made; after Ctrl-C the same command answers only the rows still open,
    and the answers file appears, whole, only at the end. Answers kept for other prompts are not reused."""
    from lora_cli import generate as gen

    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    rows = [{"prompt": QUESTION, "id": i} for i in range(3)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["generate", "--adapter", str(lora_run.run_dir), "--prompts-file", str(prompts), "--output", str(answers),
            "--max-new-tokens", "20"]
    real, calls = gen.generate_one, []

    def counted(*a, **k):
        calls.append(1)
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "generate_one", counted)
    stop_at = 3
    interrupted = CliRunner().invoke(cli.app, args)
    assert interrupted.exit_code == 130 and "2 of 3 prompts answered" in interrupted.stderr, interrupted.output
    partial = gen.partial_answers(answers)
    assert not answers.exists() and len(partial.read_text().splitlines()) == 2
    with open(partial, "a", encoding="utf-8") as out:
        out.write('{"prompt": "cut off')  # a line the interruption cut in half
    calls.clear()
    stop_at = None
    assert CliRunner().invoke(cli.app, args).exit_code == 0
    assert len(calls) == 1 and not partial.exists()  # only the third row was answered again
    assert [json.loads(line) for line in answers.read_text().splitlines()] == [
        {**row, "response": ANSWER} for row in rows]

    # answers kept for prompts that have since changed are not taken for theirs
    partial.write_text(answers.read_text())
    prompts.write_text("".join(json.dumps({**row, "id": row["id"] + 10}) + "\n" for row in rows))
    calls.clear()
    assert CliRunner().invoke(cli.app, [*args, "--overwrite"]).exit_code == 0
    assert len(calls) == 3 and [json.loads(line)["id"] for line in answers.read_text().splitlines()] == [10, 11, 12]
