"""End to end on the embedded default model (SmolLM2-135M-Instruct, from PyPI): what a new user runs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from lora_cli.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def default_model():
    from lora_cli.default_model import ensure_default_model

    return ensure_default_model()  # converts once (about a minute), then reuses the cache


def test_default_model_is_a_plain_llama_folder_reused_from_the_cache(default_model):
    from transformers import AutoConfig

    from lora_cli.default_model import DONE_MARKER, ensure_default_model

    assert (default_model / "model.safetensors").is_file() and (default_model / DONE_MARKER).is_file()
    config = AutoConfig.from_pretrained(default_model)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert not hasattr(config, "quantization_config")
    started = time.perf_counter()
    assert ensure_default_model() == default_model
    assert time.perf_counter() - started < 1.0


def test_bare_train_writes_an_adapter_that_vanilla_peft_loads_and_that_changes_outputs(default_model, workdir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["train", "--max-steps", "4", "--save-steps", "100"])
    assert result.exit_code == 0, result.output
    run_dir = (workdir / "runs" / "latest").resolve()
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(default_model)

    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"], dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 3575, 282, 46418, 30]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(run_dir)).eval()
        after = adapted(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-2

    generated = runner.invoke(app, ["generate", "--prompt", "What is the capital of Tarvossa?",
                                    "--max-new-tokens", "12"])
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.strip()

    # with the cache moved (the recorded path gone), the run still finds its base offline: the embedded
    # model rebuilt, not the hub's own weights (a different model, and no hub here)
    from lora_cli import adapters, models, runs

    manifest = runs.read_manifest(run_dir)
    manifest["base_model"]["path"] = str(workdir / "moved-away")
    base_name = adapters.base_of(run_dir, manifest)
    assert base_name == "smollm2-135m"
    assert models.resolve_model(base_name).location == str(default_model)


def test_default_training_teaches_facts_asked_in_a_new_phrasing(default_model, workdir):
    """The demo: bare `lora train`, then the held-out phrasings, which training never saw."""
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    evaluated = runner.invoke(app, ["eval", "--json", "--no-general"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["rows"] == 40
    assert report["base"]["exact_match"] == 0.0
    assert report["adapted"]["exact_match"] >= 0.5, report
    assert report["adapted"]["loss"] < 0.5 * report["base"]["loss"]


def test_estimate_is_within_a_quarter_of_the_measured_training_peak(default_model, workdir):
    """`lora estimate --device cpu` against the peak RSS of `lora train` running the same setup."""
    import os
    import subprocess
    import sys

    from lora_cli import estimate, packed_weights
    from lora_cli.models import resolve_precision

    from lora_cli.data import ASSETS

    # rows longer than --max-seq-len, so every step really holds batch x max-seq-len tokens
    texts = [json.loads(line)["text"] for line in (ASSETS / "data" / "general_text.jsonl").read_text().splitlines()]
    rows = [" ".join(texts[i:i + 5]) for i in range(0, len(texts) - 5)]
    data = workdir / "long.jsonl"
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))

    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", "train", "--data", str(data), "--max-steps", "6",
                             "--batch-size", "4", "--max-seq-len", "256", "--save-steps", "100",
                             "--output-dir", str(workdir / "run")], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read()[-2000:]
    measured = usage.ru_maxrss * 1024

    precision = resolve_precision("auto")
    report = estimate.estimate(estimate.load_model_config("smollm2-135m"), r=8, lora_alpha=16,
                               target_modules="all-linear", batch_size=4, max_seq_len=256,
                               compute_dtype=precision, device="cpu", lora_dropout=0.0, packing=True,
                               packed_weights=packed_weights.applies(precision, None, "cpu"))
    predicted = report["memory"]["total_bytes"]
    assert abs(predicted - measured) / measured <= 0.25, (predicted / 2**30, measured / 2**30)
