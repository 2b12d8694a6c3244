"""Interruption and faults: kill -9 and Ctrl-C lose at most the steps since a checkpoint; resume is exact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import logged_steps, tiny_train_args
from lora_cli import runs
from lora_cli.errors import RunError

# Runs `lora train` in-process with a callback that slows each step down, so a test can interrupt it
# at a known point. The product code is untouched; only the pace changes.
SLOW_TRAIN = """
import sys, time
from transformers import TrainerCallback
from lora_cli import train as training
original = training.run
class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.4)
training.run = lambda cfg, extra_callbacks=None: original(cfg, [Slow()])
from lora_cli.cli import app
app(sys.argv[1:])
"""


def start_slow(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if runs.checkpoint_is_complete(run_dir / "checkpoints" / f"checkpoint-{step}"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before checkpoint {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint {step} within {timeout} s")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lora_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4)


@pytest.fixture
def steps():
    return ["--max-steps", "12", "--save-steps", "4"]


def test_kill_9_then_resume_gives_the_uninterrupted_adapter(workdir, tiny_model_dir, facts_file, steps):
    reference = run_cli(tiny_train_args(tiny_model_dir, facts_file, workdir / "ref", *steps), workdir)
    assert reference.returncode == 0, reference.stderr[-2000:]

    args = tiny_train_args(tiny_model_dir, facts_file, workdir / "killed", *steps)
    proc = start_slow(args, workdir)
    wait_for_checkpoint(workdir / "killed", 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not runs.is_finished(workdir / "killed")
    assert not (workdir / "killed" / "adapter_model.safetensors").exists()
    checkpoint_step = int(Path(runs.newest_checkpoint(workdir / "killed")).name.split("-")[1])
    with (workdir / "killed" / "train_log.jsonl").open("a") as log:  # a line the kill cut off
        log.write('{"step": 11, "epoch": 1.1, "lo')

    # the options are the run's own: a conflicting one is refused, and none need repeating
    conflicting = run_cli(["train", "--resume", "--output-dir", str(workdir / "killed"), "--rank", "8"], workdir)
    assert conflicting.returncode == 2 and conflicting.stderr.count("\n") == 1, conflicting.stderr[-2000:]
    assert "--resume continues a run with its own options; drop --rank 8 (the run has 4)" in conflicting.stderr
    resumed = run_cli(["train", "--resume", "--output-dir", str(workdir / "killed")], workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert runs.is_finished(workdir / "killed")
    # it went on from the checkpoint (starting again from step 0 would give the same adapter, and log steps
    # 1 to 4 twice); the log holds every step once: the killed process's steps past the checkpoint and the
    # cut-off line are gone
    assert checkpoint_step == 4 and logged_steps(workdir / "killed") == list(range(1, 13))
    assert_same_adapter(workdir / "ref", workdir / "killed")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(workdir, tiny_model_dir, facts_file, signum):
    args = tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--max-steps", "200", "--save-steps", "100")
    proc = start_slow(args, workdir)
    deadline = time.time() + 300
    while not (workdir / "run" / "train_log.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signum)  # SIGTERM: what a scheduler sends before it kills a job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume --output-dir" in err
    checkpoints = list((workdir / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and runs.checkpoint_is_complete(checkpoints[0])
    assert int(checkpoints[0].name.split("-")[1]) < 100  # saved where it stopped, not at a scheduled save
    assert not runs.is_finished(workdir / "run")


def test_a_failure_while_saving_leaves_no_adapter(workdir, tiny_model_dir, facts_file, monkeypatch):
    from lora_cli import adapters, train
    from lora_cli.errors import LoraError

    def broken(folder):
        raise LoraError("disk full (simulated)")

    monkeypatch.setattr(adapters, "verify_adapter", broken)
    from test_train import tiny_config

    with pytest.raises(LoraError, match="simulated"):
        train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run"))
    assert not (workdir / "run" / "adapter_model.safetensors").exists()
    assert not (workdir / "run" / ".adapter.tmp").exists()  # nor a half-written copy beside it
    assert runs.read_manifest(workdir / "run")["status"] == "started" and not runs.is_finished(workdir / "run")
    with pytest.raises(Exception, match="is an unfinished run"):
        runs.find_run(str(workdir / "run"))


def test_ctrl_c_while_the_finished_run_is_written_waits_for_the_writing(workdir, tiny_model_dir, facts_file,
                                                                        monkeypatch):
    from lora_cli import adapters, train
    from test_train import tiny_config

    verify = adapters.verify_adapter

    def interrupted_while_saving(folder):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, in the middle of the writing
        verify(folder)

    monkeypatch.setattr(adapters, "verify_adapter", interrupted_while_saving)
    result = train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run", **{"training.max_steps": 2}))
    assert not result.interrupted and runs.is_finished(workdir / "run")
    assert (workdir / "run" / "adapter_model.safetensors").is_file() and not (workdir / "run" / ".adapter.tmp").exists()


def test_a_finished_run_trained_further_is_unfinished_until_its_new_adapter_is_written(
        workdir, tiny_model_dir, facts_file, monkeypatch):
    from lora_cli import adapters, train
    from lora_cli.errors import LoraError
    from test_train import tiny_config

    train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run", **{"training.max_steps": 4,
                                                                          "training.save_steps": 4}))

    def broken(folder):
        raise LoraError("disk full (simulated)")

    monkeypatch.setattr(adapters, "verify_adapter", broken)
    with pytest.raises(LoraError, match="simulated"):
        train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run", **{"training.max_steps": 8, "resume": True}))
    # the 4-step record must not stand beside an adapter that may already be the 8-step one
    assert not runs.is_finished(workdir / "run")
    with pytest.raises(Exception, match="is an unfinished run"):
        runs.find_run(str(workdir / "run"))


def test_a_resume_from_a_checkpoint_at_the_runs_end_reports_the_runs_loss(workdir, tiny_model_dir, facts_file):
    """A kill while the finished run was written leaves its last checkpoint: resuming writes the adapter
    from it, with the losses the run logged, not the 0.0 of the no steps taken in this process."""
    from lora_cli import train
    from test_train import tiny_config

    cfg = {"training.max_steps": 4, "training.save_steps": 4}
    first = train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run", **cfg))
    record = runs.read_manifest(workdir / "run")
    runs.write_json_atomic(workdir / "run" / runs.MANIFEST, {**record, "status": "started"})
    (workdir / "run" / "adapter_model.safetensors").unlink()
    again = train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run", **cfg, resume=True))
    assert runs.is_finished(workdir / "run") and again.manifest["metrics"]["global_step"] == 4
    logged = [row["loss"] for row in map(json.loads, (workdir / "run" / "train_log.jsonl").read_text().splitlines())
              if "loss" in row]
    assert again.manifest["metrics"]["train_loss"] == pytest.approx(sum(logged) / len(logged))
    assert again.manifest["metrics"]["train_loss"] == pytest.approx(first.manifest["metrics"]["train_loss"], rel=1e-5)
    assert_same_adapter(workdir / "run", workdir / "run" / "checkpoints" / "checkpoint-4")


def test_the_mean_loss_of_a_log_counts_each_logged_loss_for_the_steps_it_covers():
    from lora_cli.train import logged_mean_loss

    # logging every 5 steps: step 1 alone, then steps 2-5, 6-10; evaluations carry no training loss
    history = [{"step": 1, "loss": 4.0}, {"step": 5, "loss": 2.0}, {"step": 5, "eval_loss": 9.0},
               {"step": 10, "loss": 1.0}]
    assert logged_mean_loss(history) == pytest.approx((4.0 * 1 + 2.0 * 4 + 1.0 * 5) / 10)
    assert logged_mean_loss([{"step": 3, "eval_loss": 1.0}]) is None


def test_an_unfinished_run_with_no_checkpoint_is_only_offered_a_new_start(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)  # the Trainer makes it at once; killed before the first save
    runs.write_json_atomic(run_dir / runs.MANIFEST, {"status": "started", "config": {}})
    with pytest.raises(RunError, match=r"an unfinished run with no complete checkpoint to resume from; pick another "
                                       r"folder or pass --overwrite$"):
        runs.check_run_dir(run_dir, resume=False, overwrite=False)
    with pytest.raises(RunError, match=r"no complete checkpoint in .*; start the run again with --overwrite"):
        runs.check_run_dir(run_dir, resume=True, overwrite=False)


def test_a_runs_folder_that_cannot_take_the_latest_pointer_costs_a_warning_not_the_run(
        workdir, tiny_model_dir, facts_file, monkeypatch, caplog):
    from lora_cli import train
    from test_train import tiny_config

    blocked = workdir / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("LORA_RUNS_DIR", str(blocked))
    with caplog.at_level("WARNING", logger="lora_cli"):
        train.run(tiny_config(tiny_model_dir, facts_file, workdir / "run", **{"training.max_steps": 1}))
    assert runs.is_finished(workdir / "run") and "latest was not pointed at" in caplog.text

    monkeypatch.setenv("LORA_RUNS_DIR", str(workdir / "runs"))
    (workdir / "runs" / "latest").mkdir(parents=True)  # the user's own folder: refused before any work
    with pytest.raises(RunError, match="latest is a real folder; move it away"):
        train.run(tiny_config(tiny_model_dir, facts_file, workdir / "other", **{"training.max_steps": 1}))
    assert not (workdir / "other").exists()


def test_bare_resume_picks_the_newest_unfinished_run_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_RUNS_DIR", str(tmp_path))
    from safetensors.torch import save_file

    # d: failed before its first checkpoint (the Trainer makes checkpoints/ at once), newest of all
    for name, finished, checkpoint in (("a-old", False, True), ("b-done", True, True), ("c-new", False, True),
                                       ("d-failed-early", False, False)):
        (tmp_path / name / runs.CHECKPOINTS).mkdir(parents=True)
        runs.write_json_atomic(tmp_path / name / runs.MANIFEST, {"status": "finished" if finished else "started"})
        for file in runs.ADAPTER_FILES if finished else ():
            (tmp_path / name / file).write_text("{}")
        if checkpoint:
            saved = tmp_path / name / runs.CHECKPOINTS / "checkpoint-4"
            saved.mkdir()
            (saved / "trainer_state.json").write_text("{}")
            for file in ("optimizer.pt", "scheduler.pt"):
                torch.save({"state": torch.zeros(2)}, saved / file)
            save_file({"a": torch.zeros(2)}, str(saved / "adapter_model.safetensors"))
        time.sleep(0.02)
    os.utime(tmp_path / "a-old" / runs.CHECKPOINTS, (1, 1))
    (tmp_path / "c-new" / runs.MANIFEST).write_text("[1, 2]")  # damaged: not taken, and the scan goes on
    assert runs.resume_dir(None) == tmp_path / "a-old"
    runs.write_json_atomic(tmp_path / "c-new" / runs.MANIFEST, {"status": "started"})
    assert runs.resume_dir(None) == tmp_path / "c-new"
    assert runs.resume_dir(str(tmp_path / "a-old")) == tmp_path / "a-old"  # a named run is taken as named
    # a run another process is training right now is neither picked nor resumed into
    fcntl = pytest.importorskip("fcntl")

    with open(tmp_path / "c-new" / runs.LOCK, "a+") as other:
        other.write("4242\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert runs.resume_dir(None) == tmp_path / "a-old"
        with pytest.raises(RunError, match=r"c-new is being trained by another lora process \(pid 4242\); wait"):
            runs.lock_run(tmp_path / "c-new")
    assert runs.resume_dir(None) == tmp_path / "c-new"


def test_a_live_runs_lock_is_never_taken_over(tmp_path):
    """A second process that fails next to a live run leaves its lock alone, and one that gets to write
    re-checks under the lock: a run started meanwhile is refused, not overwritten."""
    fcntl = pytest.importorskip("fcntl")
    folder = tmp_path / "x"
    folder.mkdir()
    with open(folder / runs.LOCK, "a+") as other:  # the live run's process
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match="being trained by another lora process"):
            runs.create_run_dir(folder, resume=False, overwrite=True)
        runs.remove_if_empty(folder, remove_folder=False)  # the failed process cleans up after itself
        assert (folder / runs.LOCK).is_file() and runs.is_locked(folder)
    runs.write_json_atomic(folder / runs.MANIFEST, {"status": "finished"})  # a run that ended meanwhile
    with pytest.raises(RunError, match="now holds a run started meanwhile"):
        runs.create_run_dir(folder, resume=False, overwrite=False)
    runs.release_run(folder)
    runs.create_run_dir(folder, resume=False, overwrite=True)  # asked for: the contents go, the lock stays
    assert [p.name for p in folder.iterdir()] == [runs.LOCK]
    runs.release_run(folder)


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(time, "strftime", lambda *args: "20260101-120000")
    first, second = runs.new_run_dir("org/model"), runs.new_run_dir("org/model")
    assert (first.name, second.name) == ("20260101-120000-model", "20260101-120000-model-2")
    assert first.is_dir() and second.is_dir()
    runs.remove_if_empty(first, remove_folder=True)  # its run failed before writing anything
    assert not first.exists() and second.is_dir()


def test_a_new_run_removes_folders_that_runs_killed_at_start_left_behind(tmp_path, monkeypatch):
    """A folder holding only a lock file no process holds, older than LEFTOVER_AGE_S, is what a run killed
    before it wrote anything leaves: the next new run folder takes it away, and nothing else."""
    root = tmp_path / "runs"
    monkeypatch.setenv("LORA_RUNS_DIR", str(root))
    old = time.time() - runs.LEFTOVER_AGE_S - 60
    folders = {}
    for name, entries in (("leftover", [runs.LOCK]), ("recent", [runs.LOCK]), ("held", [runs.LOCK]),
                          ("with a log", [runs.LOCK, runs.TRAIN_LOG]), ("no lock", ["notes.txt"])):
        folders[name] = root / name
        folders[name].mkdir(parents=True)
        for entry in entries:
            (folders[name] / entry).write_text("1\n")
            if name != "recent":
                os.utime(folders[name] / entry, (old, old))
    # another process holds "held"'s lock, as a run loading its model does
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"h = open({str(folders['held'] / runs.LOCK)!r}, 'a')\n"
                               "fcntl.flock(h, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        made = runs.new_run_dir("org/model")
    finally:
        holder.kill()
        holder.wait()
    assert not folders["leftover"].exists()
    assert all(folders[name].is_dir() for name in ("recent", "held", "with a log", "no lock"))
    assert made.is_dir() and (made / runs.LOCK).is_file()
    assert runs.remove_leftovers(root) == [folders["held"]]  # its holder gone, it is a leftover too
    runs.release_run(made)


def test_a_run_that_fails_before_writing_leaves_no_folder(workdir, tiny_model_dir, monkeypatch):
    from lora_cli import train
    from lora_cli.errors import DataError
    from test_train import tiny_config

    monkeypatch.setenv("LORA_RUNS_DIR", str(workdir / "runs"))
    bad = workdir / "bad.jsonl"
    bad.write_text('{"instruction": "Hi"}\n')
    cfg = tiny_config(tiny_model_dir, bad, workdir / "unused")
    cfg.output_dir = None
    with pytest.raises(DataError):
        train.run(cfg)
    assert not (workdir / "runs").exists()  # nor the runs folder it made for the run

    monkeypatch.chdir(workdir)  # the same with a relative runs folder, as the default `runs` is
    monkeypatch.setenv("LORA_RUNS_DIR", "made/runs")
    with pytest.raises(DataError):
        train.run(cfg)
    assert not (workdir / "made").exists()


def test_resume_refuses_data_that_changed_since_the_run_started(workdir, tiny_model_dir, facts_file):
    from lora_cli import train
    from test_train import tiny_config

    data = workdir / "data.jsonl"
    data.write_text(facts_file.read_text())
    first = train.run(tiny_config(tiny_model_dir, data, workdir / "run", **{"training.max_steps": 2,
                                                                            "training.save_steps": 2}))
    assert first.manifest["data"]["sha256"]
    record = runs.read_manifest(workdir / "run")
    runs.write_json_atomic(workdir / "run" / runs.MANIFEST, {**record, "status": "started"})
    data.write_text(facts_file.read_text().replace("Quillmont", "Ravensholm"))
    with pytest.raises(RunError, match=r"^--resume: --data is not what .*run started with \(its contents changed\)"):
        train.run(tiny_config(tiny_model_dir, data, workdir / "run", **{"training.max_steps": 2,
                                                                        "training.save_steps": 2}, resume=True))


def test_incomplete_checkpoint_is_skipped_on_resume(tmp_path):
    folder = tmp_path / "checkpoints"
    good, broken = folder / "checkpoint-4", folder / "checkpoint-8"
    for path in (good, broken):
        path.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(good / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({"state": torch.zeros(64)}, good / name)
    (good / "trainer_state.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"")  # killed while writing
    assert runs.newest_checkpoint(tmp_path) == str(good)
    # complete but for an optimizer state cut off on the way to disk (a full disk, a copy interrupted)
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "adapter_model.safetensors"):
        (broken / name).write_bytes((good / name).read_bytes())
    assert runs.newest_checkpoint(tmp_path) == str(broken)
    whole = (broken / "optimizer.pt").read_bytes()
    (broken / "optimizer.pt").write_bytes(whole[: len(whole) // 2])
    assert runs.newest_checkpoint(tmp_path) == str(good)


def test_nan_loss_stops_the_run_keeps_the_last_checkpoint_and_no_adapter(workdir, tiny_model_dir, facts_file):
    from transformers import TrainerCallback

    from lora_cli import train
    from lora_cli.errors import LoraError
    from test_train import tiny_config

    class Diverge(TrainerCallback):  # what a too-high learning rate does, made certain
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    cfg = tiny_config(tiny_model_dir, facts_file, workdir / "run", **{"training.save_steps": 4})
    with pytest.raises(LoraError, match="NaN or infinite") as info:
        train.run(cfg, extra_callbacks=[Diverge()])
    assert "step 6" in str(info.value) and "checkpoints before it are kept" in str(info.value)
    assert "--overwrite" in str(info.value)  # a resume would replay the same steps into the same NaN
    assert not (workdir / "run" / "adapter_model.safetensors").exists()
    checkpoints = sorted(p.name for p in (workdir / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4"]  # the last good one, and nothing saved after the NaN

    # diverging before the first checkpoint: the message does not promise one
    cfg = tiny_config(tiny_model_dir, facts_file, workdir / "early", **{"training.save_steps": 100})
    with pytest.raises(LoraError, match="no checkpoint was saved"):
        train.run(cfg, extra_callbacks=[Diverge()])


def test_a_failure_inside_a_streamed_generation_reaches_the_caller(tiny_model_dir):
    """generate() runs in a thread while its text streams; if it raises, the caller must get the error, not wait forever."""
    import threading

    from lora_cli import adapters
    from lora_cli.generate import Sampling, generate_one

    loaded = adapters.load_for_inference(None, str(tiny_model_dir), precision="fp32")
    sampling = Sampling(max_new_tokens=4)
    sampling.repetition_penalty = 0.0  # past the check at construction: transformers refuses it inside generate()
    outcome: list[BaseException | str] = []

    def call() -> None:
        try:
            outcome.append(generate_one(loaded, "Hello", sampling, on_text=lambda piece: None))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=120)
    assert not caller.is_alive(), "the streamed generation never returned"
    assert isinstance(outcome[0], ValueError) and "penalty" in str(outcome[0])
    sampling.repetition_penalty = 1.0  # and a sound request still streams its text
    pieces: list[str] = []
    assert generate_one(loaded, "Hello", sampling, on_text=pieces.append) == "".join(pieces)


def test_ctrl_c_in_the_last_step_finishes_the_run(workdir, tiny_model_dir, facts_file):
    """Training is complete after the last step: only the writing is left, so Ctrl-C there finishes the run
    instead of leaving a checkpoint at the very end to resume from."""
    from transformers import TrainerCallback

    from lora_cli import train as training
    from lora_cli.config import build_config

    class CtrlCInLastStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps - 1:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = build_config(None, {"model.name": str(tiny_model_dir), "data.path": str(facts_file),
                              "output_dir": str(workdir / "run"), "training.max_steps": 4, "lora.r": 4,
                              "model.precision": "fp32", "training.save_steps": 100})
    result = training.run(cfg, extra_callbacks=[CtrlCInLastStep()])
    assert not result.interrupted and runs.is_finished(workdir / "run")
    assert result.signalled  # the command then skips an upload and exits 130
    assert result.manifest["metrics"]["global_step"] == 4


def test_hints_name_folders_as_a_shell_reads_them(tmp_path):
    """A path with a space or a non-ASCII letter, pasted from a hint, is one argument."""
    import shlex

    run_dir = tmp_path / "my runs" / "rün 1"
    (run_dir / runs.CHECKPOINTS).mkdir(parents=True)
    runs.write_json_atomic(run_dir / runs.MANIFEST, {"status": "started"})
    (run_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(RunError) as caught:
        runs.find_run(str(run_dir))
    command = str(caught.value).split("`")[1]
    assert shlex.split(command) == ["lora", "train", "--resume", "--output-dir", str(run_dir)]


def test_a_full_disk_is_one_line_not_a_traceback(workdir, tiny_model_dir, facts_file):
    resource = pytest.importorskip("resource")

    def small_files():  # files past 60 kB cannot be written, as on a full disk: the checkpoint's optimizer state (89 kB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    args = tiny_train_args(tiny_model_dir, facts_file, workdir / "run", "--max-steps", "4", "--save-steps", "2")
    result = subprocess.run([sys.executable, "-m", "lora_cli", *args], cwd=workdir, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=small_files)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = re.findall(r"error: .*", result.stderr)  # after the progress bar's carriage return
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the disk may be full" in errors[0] or "no room left" in errors[0]
    assert errors[0].endswith("free some space (or write elsewhere) and run the command again")
    assert not runs.is_finished(workdir / "run")


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "out.json").write_text("old")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        runs.write_text_atomic(tmp_path / "out.json", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and (tmp_path / "out.json").read_text() == "old"


def test_runs_latest_survives_moving_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_RUNS_DIR", str(tmp_path / "runs"))
    run = tmp_path / "runs" / "20260101-120000-model"
    run.mkdir(parents=True)
    runs.update_latest(run)
    assert os.readlink(tmp_path / "runs" / "latest") == run.name
    (tmp_path / "runs").rename(tmp_path / "moved")
    monkeypatch.setenv("LORA_RUNS_DIR", str(tmp_path / "moved"))
    assert runs.latest_run() == (tmp_path / "moved" / run.name).resolve()


def test_lora_info_shows_how_far_an_unfinished_run_got_and_how_to_go_on(workdir, tiny_model_dir, facts_file,
                                                                        monkeypatch):
    """A run stopped before its end is described, not refused: its last logged step and loss, its newest
    checkpoint and the command that resumes it; while a process trains it, it says so."""
    from typer.testing import CliRunner

    from lora_cli import adapters, train
    from lora_cli.cli import app
    from lora_cli.errors import LoraError
    from test_train import tiny_config

    def broken(folder):
        raise LoraError("disk full (simulated)")

    monkeypatch.setattr(adapters, "verify_adapter", broken)
    run = workdir / "run"
    with pytest.raises(LoraError, match="simulated"):
        train.run(tiny_config(tiny_model_dir, facts_file, run, **{"training.max_steps": 4, "training.save_steps": 3}))
    monkeypatch.undo()
    import shutil

    shutil.rmtree(run / "checkpoints" / "checkpoint-4")  # as if killed while saving the last one: step 3's remains
    last = [row for row in runs.read_log(run) if "loss" in row][-1]
    result = CliRunner().invoke(app, ["info", str(run)])
    assert result.exit_code == 0, result.output
    assert f"{run} (not finished)" in result.output
    assert f"resume from its checkpoint at step 3: lora train --resume --output-dir {run}" in result.output
    assert f"step 4 (epoch {last['epoch']:.2f}), train loss {last['loss']:.4f}" in result.output
    as_json = json.loads(CliRunner().invoke(app, ["info", str(run), "--json"]).output)
    assert as_json["status"] == "started"
    assert as_json["progress"] == {"training_now": False, "step": 4, "epoch": last["epoch"], "train_loss": last["loss"],
                                   "eval_loss": None, "checkpoint_step": 3}

    # a run that stopped on a NaN loss is not offered a resume, which would replay the same steps into it
    with open(run / "train_log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"step": 5, "epoch": 0.6, "loss": float("nan")}) + "\n")
    output = CliRunner().invoke(app, ["info", str(run)]).output
    assert "the loss became NaN or infinite; start again with a lower --lr" in output and "--resume" not in output

    # another process holding the run's lock is a training in progress
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(run / runs.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "training now" in CliRunner().invoke(app, ["info", str(run)]).output
    finally:
        holder.kill()
        holder.wait()


def test_lora_info_on_a_finished_run_missing_its_adapter_is_one_line(workdir, tiny_model_dir, facts_file):
    from typer.testing import CliRunner

    from lora_cli import train
    from lora_cli.cli import app
    from test_train import tiny_config

    run = workdir / "run"
    train.run(tiny_config(tiny_model_dir, facts_file, run, **{"training.max_steps": 2}))
    (run / "adapter_config.json").unlink()
    result = CliRunner().invoke(app, ["info", str(run)])
    # its adapter counts as unfinished business, as every other command says: one line, no traceback
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert "is an unfinished run; finish it with `lora train --resume" in result.output
