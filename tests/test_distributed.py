"""Several processes: 2 ranks on CPU through torchrun, and the accelerate configs we ship."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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
    # exact arithmetic: int8 input gradients round each value to one of 255 steps, where a last-bit difference
    # between kernels chosen for batch 2 and batch 4 (some CPUs' fp32 matmuls) can move a value a whole step
    common = ["--max-steps", "8", "--save-steps", "100", "--no-int8-backward"]
    two = _train([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                  "--standalone", "-m", "lora_cli"],
                 [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "two", *common), "--batch-size", "2"], env, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("Estimated peak memory") == 1  # every rank checks the memory, rank 0 says it
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


def _torchrun() -> list[str]:
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--standalone",
            "-m", "lora_cli"]


def test_a_signal_that_reaches_one_rank_stops_both_at_the_same_checkpoint(tiny_model_dir, facts_file, tmp_path):
    """A kill to one worker's pid: that rank saving while the other trains on would leave both waiting in
    collectives until the 30-minute timeout. Both stop at one step and save one complete checkpoint."""
    import signal
    import time

    import psutil

    from lora_cli import runs

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_RUNS_DIR": str(tmp_path / "runs")}
    args = tiny_train_args(tiny_model_dir, facts_file, tmp_path / "run", "--max-steps", "100000", "--save-steps",
                           "100000", "--batch-size", "2")
    # the output to a file: a pipe nobody reads fills up with the progress bar and blocks the ranks
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([*_torchrun(), *args], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "train_log.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1, (tmp_path / "stderr.txt").read_text()[-3000:]
    workers[0].send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        raise AssertionError("the ranks did not stop together: the run hung after one of them was signalled")
    err = (tmp_path / "stderr.txt").read_text()
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and runs.checkpoint_is_complete(checkpoints[0]), err[-3000:]
    assert {p.name for p in checkpoints[0].glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert err.count("Interrupted at step") == 1  # said by rank 0 only
    assert not runs.is_finished(tmp_path / "run")


def test_bad_input_is_said_once_under_two_processes(tiny_model_dir, facts_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_RUNS_DIR": str(tmp_path / "runs")}
    result = _train(_torchrun(), [*tiny_train_args(tiny_model_dir, facts_file, tmp_path / "run"), "--rank", "0"],
                    env, tmp_path)
    assert result.returncode != 0 and result.stderr.count("error: --rank must be a positive integer") == 1, \
        result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_launchers_mixed_precision_does_not_override_the_precision_asked(tiny_model_dir, facts_file, tmp_path,
                                                                          monkeypatch):
    """accelerate launch exports its config's mixed_precision (bf16 in every file we ship); TrainingArguments
    adopts it when bf16 and fp16 are off, so --precision fp32 silently trained under bf16 autocast."""
    from transformers import TrainerCallback

    from lora_cli import train
    from test_train import tiny_config

    seen = {}

    class Precision(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["mixed_precision"] = args.mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("LORA_RUNS_DIR", str(tmp_path / "runs"))
    train.run(tiny_config(tiny_model_dir, facts_file, tmp_path / "run", **{"training.max_steps": 1}),
              extra_callbacks=[Precision()])
    assert seen == {"mixed_precision": "no"}


_NAME_A_RUN = """
import json, os, sys, time
from lora_cli import train
from lora_cli.config import build_config

cfg = build_config(None, {"model.name": "tiny", "data.path": sys.argv[1]})
import accelerate, torch.distributed  # imported before the agreed moment, which is then the same second
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
path, made_here = train._agree_on_run_dir(cfg, 2, os.environ["RANK"] == "0")
# a file per rank: the launcher mixes the ranks' output, and two lines can come out as one
with open(f"{sys.argv[3]}-{os.environ['RANK']}.json", "w") as out:
    json.dump([str(path), made_here, path.is_dir()], out)
torch.distributed.barrier()  # rank 0 keeps the folder's lock until its partner has looked
# left before exit, as lora's own processes leave it (lora_cli/cli.py): gloo's threads still up at the
# interpreter's exit can abort a rank ("terminate called without an active exception")
torch.distributed.destroy_process_group()
"""


def test_two_launches_started_in_the_same_second_get_a_run_folder_each(facts_file, tmp_path):
    """Without --output-dir, rank 0 makes and locks the dated folder and hands its name to the other rank: two
    2-process launches naming their folders at the same moment must not share one."""
    launcher = _torchrun()[:-2]  # torchrun, 2 processes, standalone: a rendezvous of its own for each launch
    worker = tmp_path / "name_a_run.py"
    worker.write_text(_NAME_A_RUN)
    runs_root = tmp_path / "runs"
    env = {**os.environ, "LORA_RUNS_DIR": str(runs_root), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    start = float(int(time.time()) + 20) + 0.1  # a moment well inside one second, once every process has imported
    procs = [subprocess.Popen([*launcher, str(worker), str(facts_file), str(start), str(tmp_path / f"launch{i}")],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [proc.communicate(timeout=180) for proc in procs]
    for proc in procs:
        assert proc.returncode == 0, "\n".join(err[:3000] for _out, err in results)
    launches = [sorted(json.loads((tmp_path / f"launch{i}-{rank}.json").read_text()) for rank in (0, 1))
                for i in range(2)]
    for ranks in launches:  # one answer per rank; they agree, and rank 0 (only) made the folder
        assert len(ranks) == 2 and ranks[0][0] == ranks[1][0], launches
        assert sorted(made for _path, made, _exists in ranks) == [False, True] and all(e for *_, e in ranks)
    assert launches[0][0][0] != launches[1][0][0]  # the launches do not share one
    assert sorted(p.name for p in runs_root.iterdir()) == sorted(Path(r[0][0]).name for r in launches)
