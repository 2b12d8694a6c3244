"""Several processes: 2 ranks on CPU through torchrun, and the accelerate configs we ship."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import logged_steps, tiny_train_args

ACCELERATE_CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_config_parses_and_starts_with_its_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision == "bf16"
    header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"accelerate launch --config_file configs/accelerate/{path.name}" in header and "-m lora_cli train" in header


def _train(launcher: list[str], args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_two_cpu_processes_train_one_adapter_equal_to_one_process(tiny_model_dir, facts_file, tmp_path):
    """torchrun with 2 ranks x batch 2 against 1 process x batch 4: same global batches, same adapter."""
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    common = ["--max-steps", "8", "--save-steps", "100"]
    two = _train([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                  "--standalone", "-m", "lora_cli"],
                 [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "two", *common), "--batch-size", "2"], env, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train([sys.executable, "-m", "lora_cli"],
                 [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "one", *common), "--batch-size", "4"],
                 env, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    manifest = json.loads((tmp_path / "two" / "lora_run.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["config"]["training"]["per_device_train_batch_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("adapter_model*.safetensors")) == ["adapter_model.safetensors"]

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    # step by step, the loss and the gradient norm agree too: a gradient scaled wrongly across ranks
    # barely moves AdamW's weights, but it shows in the norm at once
    logs = [[row for row in map(json.loads, (tmp_path / name / "train_log.jsonl").read_text().splitlines())
             if "loss" in row] for name in ("two", "one")]
    assert [row["step"] for row in logs[0]] == [row["step"] for row in logs[1]] == list(range(1, 9))
    for mine, theirs in zip(*logs):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


def test_two_process_run_resumes_from_its_checkpoint(tiny_model_dir, facts_file, tmp_path):
    """A 2-rank run stopped after its checkpoint at step 4 continues with --resume to the 8-step adapter."""
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_RUNS_DIR": str(tmp_path / "runs")}
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                "--standalone", "-m", "lora_cli"]  # --standalone: a free port, whatever else runs here
    # a constant schedule makes "4 steps, then 4 more" the same optimisation as "8 steps"
    common = ["--batch-size", "2", "--save-steps", "4", "--scheduler", "constant", "--warmup", "0"]
    whole = _train(torchrun, [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "whole", *common),
                              "--max-steps", "8"], env, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _train(torchrun, [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "split", *common),
                              "--max-steps", "4"], env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert logged_steps(tmp_path / "split") == [1, 2, 3, 4]
    lines_before = len((tmp_path / "split" / "train_log.jsonl").read_text().splitlines())
    resumed = _train(torchrun, [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "split", *common),
                                "--max-steps", "8", "--resume"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(tmp_path / "split", lines_before) == [5, 6, 7, 8]  # from the checkpoint, not from step 0

    from safetensors.torch import load_file

    manifest = json.loads((tmp_path / "split" / "lora_run.json").read_text())
    assert manifest["world_size"] == 2 and manifest["metrics"]["global_step"] == 8
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
