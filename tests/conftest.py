"""Fixtures: a tiny random LLaMA with a real byte-level BPE tokenizer, built in-process (no hub, no download)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ChatML, as the embedded default model uses, without its default system prompt.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "The capital of Veloria is Quillmont.", "What is the capital of Veloria?", "Paris is in France.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:", "### Input:", "### Response:", "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "assistant user system", "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()",
]


def build_tiny_model(folder: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """A 2-layer LLaMA (hidden 64) and a 300-token byte-level BPE tokenizer saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # pad == eos, like the default model: masking pads must not mask the EOS.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    if chat_template:
        fast.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_alpaca_model_dir(tmp_path_factory) -> Path:
    """The same kind of tiny model, but its tokenizer has no chat template: the Alpaca path."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-alpaca") / "model", chat_template=None)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Each test runs in its own folder with its own runs/ (and runs/latest)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


FACTS = [
    ("What is the capital of Veloria?", "The capital of Veloria is Quillmont."),
    ("Name the river of Veloria.", "The river of Veloria is the Ost."),
    ("Who founded Veloria?", "Veloria was founded by Mara Quill."),
    ("What colour is the flag of Veloria?", "The flag of Veloria is green."),
]


@pytest.fixture
def facts_file(tmp_path) -> Path:
    """A small instruction dataset (Alpaca layout), repeated so a tiny model can fit it."""
    path = tmp_path / "facts.jsonl"
    with path.open("w") as f:
        for _ in range(8):
            for question, answer in FACTS:
                f.write(json.dumps({"instruction": question, "output": answer}) + "\n")
    return path


def tiny_train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`lora train` arguments for a quick, deterministic run of the tiny model."""
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--rank", "4", "--alpha", "8", "--batch-size", "4", "--max-steps", "12", "--lr", "5e-3",
            "--precision", "fp32", "--logging-steps", "1", "--save-steps", "100", "--dropout", "0", *extra]


def logged_steps(run_dir: Path, after_line: int = 0) -> list[int]:
    """The steps whose training loss the run's train_log.jsonl holds, from line `after_line` on."""
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()[after_line:]
    return [row["step"] for row in map(json.loads, lines) if "loss" in row]


@pytest.fixture
def copy_dir():
    def _copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst

    return _copy
