"""Trainer callbacks: a progress bar with loss and tokens/s, a training log file, and the safety stops."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback, TrainerCallback


class LoraProgress(ProgressCallback):
    """The Trainer's progress bar, showing loss and real tokens per second instead of printing dicts.

    Tokens per second count training time only: evaluations, which see no training token, are left out
    (LoraTrainer times them, and its log's train_tokens_per_second leaves them out as well)."""

    def __init__(self) -> None:
        super().__init__()
        self.start_time: float | None = None
        self.start_tokens = 0
        self.first_step_after: float | None = None  # seconds from the command to this process's first step
        self.steps = 0  # optimizer steps taken by this process (a resume from the last checkpoint takes none)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.start_time, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step_after is None:
            self.first_step_after = seconds_since_process_start()

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.steps += 1

    def tokens_per_second(self, state: Any, eval_seconds: float) -> float:
        elapsed = time.perf_counter() - (self.start_time or time.perf_counter()) - eval_seconds
        return (state.num_input_tokens_seen - self.start_tokens) / elapsed if elapsed > 0 else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        if "loss" in logs:
            rate = logs.get("train_tokens_per_second", 0.0)
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        if "eval_loss" in logs:
            # tqdm.write goes to stdout by default; stdout is kept for results (--json)
            self.training_bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}", file=sys.stderr)


def seconds_since_process_start() -> float | None:
    """How long ago the operating system started this `lora` process; None where it cannot say, or where
    lora_cli runs inside a process started for something else."""
    from lora_cli import startup

    if not startup.command_process:
        return None
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # psutil missing, or a platform without process start times
        return None


class JsonlLog(TrainerCallback):
    """Append every Trainer log entry to a JSON-lines file: the run's training log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN or infinite loss, before a checkpoint of broken weights can be written."""

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step = state.global_step
            control.should_training_stop = True
            control.should_save = False


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C (or SIGTERM, which schedulers send before they kill) finishes the current step, saves a
    resumable checkpoint and stops; a second Ctrl-C aborts. Installed until the run folder is written: a
    signal while the finished adapter and manifest are written lets them finish first."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signalled = False  # a signal reached this process (set by the handler, at any moment)
        self.interrupted = False  # training stopped for one (under several processes, all agreed to)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        # only a second Ctrl-C aborts: a SIGTERM may come twice (the scheduler to every process, and
        # torchrun passing its own on), and must still get its checkpoint
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signalled
        if args.world_size > 1:
            # Every process stops at the same step, or the ones still training wait forever in the next
            # step's collectives for the ones saving: a signal that reached only some ranks (a kill to one
            # pid) or reached them a step apart is shared here. The handler's flag is only read: a signal
            # landing during the exchange counts at the next step instead of being overwritten.
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True


class LastEvaluation(TrainerCallback):
    """The step and eval loss of the newest evaluation this process ran (not one read back from a checkpoint)."""

    def __init__(self):
        self.step: int | None = None
        self.eval_loss: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.step, self.eval_loss = state.global_step, metrics["eval_loss"]
