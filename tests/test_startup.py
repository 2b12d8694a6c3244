"""The `lora` process leaves bitsandbytes out when a run cannot use it, and only then."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import tiny_train_args
from lora_cli import startup

# Runs the `lora` entry point as the console script does, then says what became of bitsandbytes.
PROBE = """
import atexit, sys
def said():
    state = sys.modules.get("bitsandbytes", "never")
    print("bitsandbytes:", "left out" if state is None else "never" if state == "never" else "imported", file=sys.stderr)
atexit.register(said)
sys.argv = ["lora", *sys.argv[1:]]
from lora_cli.cli import run
run()
"""


def lora_process(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "LORA_RUNS_DIR": str(cwd / "runs")}, timeout=600)


def test_a_plain_run_trains_and_generates_without_bitsandbytes(tmp_path, tiny_model_dir, facts_file):
    run = tmp_path / "run"
    started = time.time()
    trained = lora_process(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "3"), cwd=tmp_path)
    wall = time.time() - started
    assert trained.returncode == 0, trained.stderr
    assert "bitsandbytes: left out" in trained.stderr
    manifest = json.loads((run / "lora_run.json").read_text())
    assert manifest["base_model"]["quantization"] is None and manifest["status"] == "finished"
    # the start-up the run reports: imports and loading, inside the process's own lifetime
    first_step = manifest["metrics"]["seconds_to_first_step"]
    assert 1.0 < first_step < wall - manifest["metrics"]["train_runtime_s"] + 0.5
    assert f"first step {first_step:.1f} s after the command" in trained.stderr
    answered = lora_process("generate", "--adapter", str(run), "--prompt", "What is the capital of Veloria?",
                            "--max-new-tokens", "4", cwd=tmp_path)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() and "bitsandbytes: left out" in answered.stderr
    merged = lora_process("merge", str(run), "--output-dir", str(tmp_path / "merged"), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file() and "bitsandbytes: left out" in merged.stderr


def test_a_4bit_run_keeps_bitsandbytes(tmp_path, tiny_model_dir, facts_file):
    run = tmp_path / "run"
    trained = lora_process(*tiny_train_args(tiny_model_dir, facts_file, run, "--max-steps", "2", "--use-4bit"),
                           cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "bitsandbytes: imported" in trained.stderr
    assert json.loads((run / "lora_run.json").read_text())["base_model"]["quantization"] == "4bit"
    answered = lora_process("generate", "--adapter", str(run), "--prompt", "Hi", "--max-new-tokens", "2", cwd=tmp_path)
    assert answered.returncode == 0, answered.stderr
    assert "bitsandbytes: imported" in answered.stderr  # the adapter runs on the 4-bit base it was trained on
    # merged into the dequantized NF4 weights it was trained against: bitsandbytes quantizes them (the run
    # named by runs/latest, with the base given: a base alone does not mean "no adapter" to merge)
    merged = lora_process("merge", "--base", str(tiny_model_dir), "--output-dir", str(tmp_path / "merged"),
                          cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert "bitsandbytes: imported" in merged.stderr


@pytest.fixture
def bitsandbytes_unimported(monkeypatch):
    """As in a fresh `lora` process: bitsandbytes not imported yet (this test process has imported it:
    it is set aside, and put back afterwards)."""
    monkeypatch.setattr(startup, "command_process", True)
    saved = sys.modules.pop("bitsandbytes", None)
    yield
    if saved is not None:
        sys.modules["bitsandbytes"] = saved
    else:
        sys.modules.pop("bitsandbytes", None)


def test_left_out_only_for_an_unquantized_base_whose_config_is_here(tmp_path, tiny_model_dir, copy_dir,
                                                                    bitsandbytes_unimported, monkeypatch):
    assert not startup.leave_out_bitsandbytes(str(tiny_model_dir), None, "4bit")
    monkeypatch.setattr(startup, "command_process", False)  # lora_cli inside another program's process
    assert not startup.leave_out_bitsandbytes(str(tiny_model_dir), None, None)
    monkeypatch.setattr(startup, "command_process", True)
    assert not startup.leave_out_bitsandbytes("someone/not-downloaded", None, None)  # its config is unknown
    assert not startup.leave_out_bitsandbytes("not a hub id!", None, None)
    stored_4bit = copy_dir(tiny_model_dir, tmp_path / "stored-4bit")
    config = json.loads((stored_4bit / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (stored_4bit / "config.json").write_text(json.dumps(config))
    assert not startup.leave_out_bitsandbytes(str(stored_4bit), None, None)
    nested = copy_dir(tiny_model_dir, tmp_path / "nested-4bit")  # a composite config: transformers reads this too
    config = json.loads((nested / "config.json").read_text())
    config["text_config"] = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    (nested / "config.json").write_text(json.dumps(config))
    assert not startup.leave_out_bitsandbytes(str(nested), None, None)
    # a model with its own code may import bitsandbytes itself
    assert not startup.leave_out_bitsandbytes(str(tiny_model_dir), None, None, trust_remote_code=True)
    assert "bitsandbytes" not in sys.modules

    assert startup.leave_out_bitsandbytes(str(tiny_model_dir), None, None)
    assert sys.modules["bitsandbytes"] is None and importlib.util.find_spec("bitsandbytes") is None
    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401
