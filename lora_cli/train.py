"""`lora train`: config -> data -> model -> Trainer -> a finished run folder. Reads top to bottom."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.config import TrainConfig
from lora_cli.errors import LoraError, RunError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    manifest: dict[str, Any]
    interrupted: bool = False
    model: Any = None  # the trained PeftModel, for callers in the same process
    signalled: bool = False  # a stop was asked in the last step or while the finished run was written


def auto_learning_rate(num_params: int) -> float:
    """1e-3 below a billion parameters, 2e-4 above (FACTS.md: small models barely move at 2e-4)."""
    return 1e-3 if num_params < 1_000_000_000 else 2e-4


def reentrant_checkpointing(world_size: int) -> bool:
    """Whether --gradient-checkpointing recomputes with torch's reentrant checkpoint (a CPU run in one process).

    The non-reentrant one records an autograd graph in the forward pass: thousands of small nodes that live
    until the backward. On a CPU they land in the holes that each layer's freed temporaries leave in
    glibc's heap, the holes cannot be reused whole, and the heap grew by 0.4 GB over a step of the default
    model (peak RSS 1.81 against 1.50 GiB, batch 4 x 256 tokens, all linear layers, bf16; the same loss).
    The reentrant one runs the forward without a graph. Elsewhere the non-reentrant one stays: GPU memory
    does not hold those nodes, and DDP and FSDP document it as the one they support.
    """
    import torch

    return world_size == 1 and not torch.cuda.is_available()


def run(cfg: TrainConfig, extra_callbacks: list[Any] | None = None) -> TrainResult:
    """Fine-tune cfg.model with a LoRA adapter on cfg.data and write the run folder.

    `extra_callbacks` are Trainer callbacks for callers embedding `lora` in their own code.
    """
    from lora_cli import cpu, runs

    cpu.configure_process()
    _check_reporter(cfg.training.report_to)
    # 1. Where the run goes (every process must agree on the folder, so rank 0 picks it), and which
    # model: both are checked before torch and transformers are even imported.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_dir, reserved = _agree_on_run_dir(cfg, world_size, is_main)
    try:
        return _train(cfg, run_dir, world_size, is_main, extra_callbacks)
    except BaseException:
        if is_main:  # a run that failed before writing anything leaves no trace in the runs folder
            runs.remove_if_empty(run_dir, remove_folder=reserved)
        raise
    finally:
        if is_main:
            runs.release_run(run_dir)


def _train(cfg: TrainConfig, run_dir: Path, world_size: int, is_main: bool,
           extra_callbacks: list[Any] | None) -> TrainResult:
    from lora_cli import models, runs

    runs.check_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                       inputs=(cfg.data.path, cfg.data.eval_data))
    if is_main and run_dir.is_dir():  # held from here: another `lora train` into this folder is refused
        runs.lock_run(run_dir)
    source = models.resolve_model(cfg.model.name, cfg.model.revision)

    import torch
    from transformers import TrainingArguments

    from lora_cli import callbacks, data, fused_layers, int8_backward, manifest, packed_attention, packed_weights
    from lora_cli.loss import LoraTrainer

    # 2. Tokenizer and data before the weights: bad data fails in seconds, not after a model load.
    tokenizer = models.load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)
    prepared = data.prepare(cfg.data, tokenizer, cfg.training.seed)
    resume_from = runs.newest_checkpoint(run_dir) if cfg.resume else None
    at_end = False
    if resume_from:
        check_same_data(run_dir, prepared.identity)
        at_end = check_goes_further(cfg, run_dir, Path(resume_from), len(prepared.train), world_size)
        before = (runs.read_manifest(run_dir) or {}).get("world_size")
        if is_main and before and before != world_size:
            per_process = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
            log.warning("this run was trained with %d processes (effective batch %d); resumed with %d, its steps "
                        "take %d rows each from here on", before, per_process * before, world_size,
                        per_process * world_size)

    # 3. The frozen base in the fastest precision the hardware has, then the adapter on top.
    precision = models.resolve_precision(cfg.model.precision)
    quantization = cfg.model.quantization
    # resolved into the config, so the manifest records what ran
    cfg.model.int8_backward = models.resolve_int8_backward(cfg.model.int8_backward, precision, quantization)
    # every rank: a refusal on rank 0 alone would leave the others waiting for it
    packed = check_memory(cfg, source, precision, longest_step(prepared.train, cfg), announce=is_main)
    if quantization and precision == "fp16":
        log.warning("fp16 with %s weights often overflows; --precision bf16 is safer where the GPU has it",
                    quantization)
    model = models.load_base_model(source, precision=precision, quantization=quantization,
                                   trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                                   allow_pickle_weights=cfg.model.allow_pickle_weights)
    # With a KV cache, transformers skips the block-diagonal mask of packed rows and examples attend
    # to each other (tests/test_data.py checks the packed logits); training never needs the cache.
    model.config.use_cache = False
    if cfg.data.packing and not torch.cuda.is_available() and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(packed_attention.register())
    base_params = models.count_parameters(model)
    if cfg.training.learning_rate is None:
        cfg.training.learning_rate = auto_learning_rate(base_params)
    from transformers import set_seed

    set_seed(cfg.training.seed)  # LoRA's A matrices are drawn here: the same seed gives the same adapter
    model = models.add_lora(model, cfg.lora, quantized=bool(quantization),
                            gradient_checkpointing=cfg.training.gradient_checkpointing)
    int8_projections = int8_backward.enable(model) if cfg.model.int8_backward else 0
    packed_projections = packed_weights.enable(model) if packed else 0
    trainable, total = model.get_nb_trainable_parameters()
    if world_size > 1:  # every rank has checked the folder before rank 0 creates it
        _ranks().wait_for_everyone()
    if is_main:  # only now, with data and model known good, does anything get written
        runs.create_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
        # the options, for --resume (kept when resuming); the finished record replaces it at the end
        if not cfg.resume or runs.read_manifest(run_dir) is None:
            runs.write_json_atomic(run_dir / runs.MANIFEST, manifest.started(cfg, source, world_size,
                                                                             prepared.identity))
        if resume_from:  # the log keeps what led up to the checkpoint; the steps after it are taken again
            runs.trim_log(run_dir, checkpoint_step(Path(resume_from)))

    # 4. The Trainer, with the options named as TrainingArguments names them.
    t = cfg.training
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        # accelerate launch exports its config file's mixed_precision, which TrainingArguments adopts when
        # neither bf16 nor fp16 is set: --precision decides, as it does without a launcher
        os.environ["ACCELERATE_MIXED_PRECISION"] = precision if precision in ("bf16", "fp16") else "no"
    args = TrainingArguments(
        output_dir=str(run_dir / runs.CHECKPOINTS),
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if prepared.eval is not None else "no", eval_steps=t.eval_steps or t.save_steps,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": reentrant_checkpointing(world_size)}
        if t.gradient_checkpointing else None,
        report_to=[] if t.report_to == "none" else [t.report_to],
        # A packed row has no padding, and counting "non-padding" there would drop every real token equal
        # to the pad id (often the EOS, which ends every example): count them all. Padded batches carry
        # an attention mask, which the Trainer counts instead.
        include_num_input_tokens_seen="all" if cfg.data.packing else "non_padding", remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation reports the loss; gathering every logit would only cost memory
        logging_nan_inf_filter=False,  # the default hides a NaN loss behind the running average
        ddp_find_unused_parameters=False, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not is_main,
    )
    progress, guard, interrupt = callbacks.LoraProgress(), callbacks.StopOnNonFiniteLoss(), callbacks.SaveOnInterrupt()
    last_eval = callbacks.LastEvaluation()
    trainer = LoraTrainer(
        model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
        data_collator=data.make_collator(tokenizer, cfg.data.packing), processing_class=tokenizer,
        callbacks=[guard, interrupt, last_eval, callbacks.JsonlLog(run_dir / runs.TRAIN_LOG),
                   *(extra_callbacks or [])],
    )
    trainer.remove_callback(callbacks.ProgressCallback)
    trainer.add_callback(progress)
    # 5. Train; Ctrl-C saves a checkpoint and stops, a NaN loss stops before anything is saved. The
    # handler stays until the run folder is written: a signal there waits for the writing to end.
    started = time.perf_counter()
    fused: dict[str, int] = {}
    interrupt.install()
    try:
        # inside the try: the rotary embedding is a module-level function, and the `finally` puts it back
        if fused_layers.applies(precision, quantization, "cuda" if torch.cuda.is_available() else "cpu"):
            fused = fused_layers.enable(model)
        if is_main:
            effective = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
            shown = models.describe_precision(cfg.model.precision, precision)
            shown += f" + {quantization}" if quantization else ""
            shown += f", input gradients of {int8_projections} frozen projections in int8" if int8_projections else ""
            shown += f", {packed_projections} frozen projections packed for oneDNN" if packed_projections else ""
            parts = [f"{fused[k]} {label}" for k, label in (("norms", "RMSNorms"), ("mlp", "SwiGLUs"), ("lora", "LoRA layers"))
                     if fused.get(k)]
            parts += ["the rotary embedding"] if fused.get("rotary") else []
            shown += ", fused: " + ", ".join(parts) if parts else ""
            if packed_attention.compiled_applies(model, precision, "cuda" if torch.cuda.is_available() else "cpu"):
                shown += ", attention within examples compiled"
            log.info("Training %s on %d rows (%s, %s): %s trainable of %s parameters (%.2f%%), "
                     "%s, effective batch %d, lr %g -> %s", source.name, len(prepared.train), prepared.format,
                     data.describe_rendering(prepared.format, prepared.template), f"{trainable:,}", f"{total:,}",
                     100 * trainable / total, shown, effective, t.learning_rate, run_dir)
        try:
            result = None if at_end else trainer.train(resume_from_checkpoint=resume_from)
            if at_end:
                _load_checkpoint(trainer, Path(resume_from))
        except torch.OutOfMemoryError:
            raise LoraError(f"out of GPU memory at step {trainer.state.global_step}; lower --batch-size (raise "
                            "--grad-accum to keep the effective batch) or --max-seq-len, or add --use-4bit or "
                            "--gradient-checkpointing (`lora estimate` shows what fits); checkpoints so far are kept "
                            f"in {run_dir / runs.CHECKPOINTS}") from None
        except RuntimeError as exc:
            if not (cfg.resume and "size mismatch" in str(exc)):
                raise
            raise RunError(f"--resume: the checkpoint in {run_dir / runs.CHECKPOINTS} was made with other options "
                           "(rank, target modules or model); resume with the options the run started with") from None
        elapsed = time.perf_counter() - started
        if guard.bad_step is not None:
            # resuming would replay the same steps into the same NaN: the way on is a new start with other settings
            saved = sorted((run_dir / runs.CHECKPOINTS).glob("checkpoint-*"))
            kept = f"checkpoints before it are kept in {run_dir / runs.CHECKPOINTS}" if saved else "no checkpoint was saved"
            raise LoraError(f"training stopped at step {guard.bad_step}: the loss became NaN or infinite ({kept}); "
                            f"start again with a lower --lr (or --precision fp32) and --overwrite")
        # Ctrl-C in the last step: training is complete, only the writing is left, so it is done now
        if interrupt.interrupted and trainer.state.global_step < trainer.state.max_steps:
            return TrainResult(run_dir, {"status": "interrupted", "step": trainer.state.global_step},
                               interrupted=True, model=model)

        # 6. Final numbers, then the adapter (whole, then renamed into place) and the manifest last.
        train_loss = result.training_loss if result else None
        if not progress.steps:  # resumed from a checkpoint at the run's end: no step here, the run's logged losses
            train_loss = logged_mean_loss(trainer.state.log_history)
        metrics = {"train_loss": train_loss, "train_runtime_s": round(elapsed, 2),
                   "global_step": trainer.state.global_step,
                   "tokens_seen": int(trainer.state.num_input_tokens_seen),
                   "tokens_per_second": round(progress.tokens_per_second(trainer.state, trainer.eval_seconds), 1),
                   "eval_seconds": round(trainer.eval_seconds, 2),  # inside train_runtime_s, outside tokens_per_second
                   # imports, model and data loading: from the command to this process's first step
                   "seconds_to_first_step": None if progress.first_step_after is None
                   else round(progress.first_step_after, 2),
                   "trainable_params": trainable, "total_params": total}
        if prepared.eval is not None:
            metrics["eval_loss"] = final_eval_loss(trainer, last_eval)
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        record = manifest.build(cfg, source, base_params, precision, quantization, prepared, metrics, world_size)
        if trainer.is_world_process_zero():
            _write_finished_run(cfg, run_dir, record, model, tokenizer)
    finally:
        interrupt.uninstall()
        # the model goes back to callers as a plain one: a merge into its weights must not meet stale packed copies
        try:
            packed_weights.disable(model)
        finally:
            fused_layers.disable(model)
    return TrainResult(run_dir, record, model=model, signalled=interrupt.signalled)


def logged_mean_loss(history: list[dict[str, Any]]) -> float | None:
    """The mean training loss over the steps a Trainer's log covers: each logged loss is the mean of the
    steps since the one logged before it, so each counts for that many steps."""
    total, steps, previous = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and entry.get("step", 0) > previous:
            total += entry["loss"] * (entry["step"] - previous)
            steps, previous = entry["step"], entry["step"]
    return total / steps if steps else None


def _load_checkpoint(trainer: Any, checkpoint: Path) -> None:
    """The adapter weights and the Trainer's state of a checkpoint, without a step (see check_goes_further)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    # rank 0 wrote the file: every process would take itself for rank 0 (train() resets these itself)
    state.is_world_process_zero, state.is_local_process_zero = trainer.is_world_process_zero(), \
        trainer.is_local_process_zero()
    trainer.state = state


def _write_finished_run(cfg: TrainConfig, run_dir: Path, record: dict[str, Any], model: Any, tokenizer: Any) -> None:
    """The adapter (whole, then renamed into place) and the manifest last. A finished run trained further
    is first marked unfinished: its adapter is about to be replaced, and until the new manifest is written
    the folder must not pass for the run it was."""
    from lora_cli import model_card, runs
    from lora_cli.report import plot_loss_curve

    if runs.is_finished(run_dir):
        runs.write_json_atomic(run_dir / runs.MANIFEST, {**record, "status": "started"})
    card = model_card.adapter_card(record, cfg.push_to_hub or str(run_dir), published=bool(cfg.push_to_hub))
    save_adapter(model, tokenizer, run_dir, card)
    try:
        plot_loss_curve(run_dir)
    except Exception as exc:  # a picture: never worth the run
        log.warning("the loss curve was not drawn (%s)", exc)
    runs.write_json_atomic(run_dir / runs.MANIFEST, record)
    runs.update_latest(run_dir)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a complete checkpoint was saved at (runs.checkpoint_is_complete has parsed this file)."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0))


def check_same_data(run_dir: Path, identity: dict[str, Any]) -> None:
    """A resumed run trains on the data it started with: its steps after the checkpoint would otherwise
    come from other rows, and the finished record would name only the new data."""
    from lora_cli import runs

    started = (runs.read_manifest(run_dir) or {}).get("data") or {}
    for name, before, now in (("--data", started.get("sha256"), identity.get("sha256")),
                              ("--eval-data", (started.get("eval") or {}).get("sha256"),
                               (identity.get("eval") or {}).get("sha256"))):
        if before and now and before != now:
            raise RunError(f"--resume: {name} is not what {run_dir} started with (its contents changed); resume "
                           "with the data it started with, or start the run again with --overwrite")


def check_goes_further(cfg: TrainConfig, run_dir: Path, checkpoint: Path, train_rows: int, world_size: int) -> bool:
    """A resumed run must not end before the step it resumes from: the Trainer would mark it finished
    with no step taken and a loss of 0. A finished run must go past its end, or it would only have its
    adapter replaced by a copy trained a step past it (the Trainer takes one more step from a checkpoint
    at the last step). Returns whether the checkpoint is the end of an unfinished run (a kill while the
    finished run was written): it is written out as it is, with no step."""
    from lora_cli import runs

    finished = runs.is_finished(run_dir)
    if finished:
        done = (runs.read_manifest(run_dir) or {}).get("metrics", {}).get("global_step", 0)
    else:
        done = checkpoint_step(checkpoint)
    t = cfg.training
    if t.max_steps > 0:
        target, fix = t.max_steps, f"a --max-steps above {done}"
    else:  # as the Trainer counts an epoch: batches of the data, then optimizer steps of --grad-accum batches
        batches = math.ceil(train_rows / (t.per_device_train_batch_size * world_size))
        target = math.ceil(t.num_train_epochs * math.ceil(batches / t.gradient_accumulation_steps))
        fix = f"more --epochs than {t.num_train_epochs:g}"
    if finished and target <= done:
        raise RunError(f"--resume: {run_dir} is finished ({done} steps); to train it further pass {fix}, "
                       "or start a new run")
    if not finished and target < done:
        goal = f"--max-steps {t.max_steps}" if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs ({target} steps)"
        raise RunError(f"--resume: {run_dir} resumes from its checkpoint at step {done}, past the end {goal} sets; "
                       f"pass {fix}, or start a new run")
    return not finished and target == done


def final_eval_loss(trainer: Any, last_eval: Any) -> float:
    """The eval loss of the trained adapter. The Trainer already evaluates at the last step of a
    step-scheduled run; evaluating again would give the same number for another pass over the eval set.
    Only an evaluation run by this process counts: a resumed run's history may hold one made on other eval data."""
    if last_eval.step == trainer.state.global_step:  # None when this process has not evaluated
        return last_eval.eval_loss
    return trainer.evaluate()["eval_loss"]


def longest_step(train: Any, cfg: TrainConfig) -> int:
    """Tokens in the largest batch this data can make, a bound on what the estimate must cover: the
    `batch` longest examples packed into one row, or the longest example padded `batch` times."""
    import pyarrow.compute as pc

    batch = cfg.training.per_device_train_batch_size
    lengths = sorted(pc.list_value_length(train.data.column("input_ids")).to_pylist())  # the table under any split
    return sum(lengths[-batch:]) if cfg.data.packing else batch * lengths[-1]


# Packed weights (lora_cli/packed_weights.py) only where the run, with their copies, stays within this
# share of the RAM: they buy speed with memory, and a run that must swap loses more than they gain.
PACKED_WEIGHTS_RAM_SHARE = 0.8


def check_memory(cfg: TrainConfig, source: Any, precision: str, tokens: int, announce: bool = True) -> bool:
    """Print what the run will need (where `announce`: rank 0), and refuse at once when it clearly cannot fit
    the GPU (or the RAM) it has. `tokens` is the largest step the data makes (`longest_step`).

    Returns whether the frozen projections get packed weights: where they apply and leave room.
    """
    import torch

    from lora_cli import estimate, packed_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed = packed_weights.applies(precision, cfg.model.quantization, device)
    batch = cfg.training.per_device_train_batch_size
    seq = min(cfg.data.max_seq_len, -(-tokens // batch))
    try:
        config = estimate.load_model_config(source.location)
        report = estimate.estimate_run(cfg, config, compute_dtype=precision, device=device, model=source.name,
                                       max_seq_len=seq, packed_weights=packed)
    except Exception as exc:  # an estimate is advice; an architecture it cannot model must not stop training
        log.debug("no memory estimate: %s", exc)
        return False  # nor is memory spent on speed without knowing that it is there
    # the processes of a run on one CPU machine share its RAM; each GPU process has a GPU of its own
    processes = 1 if torch.cuda.is_available() else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = report["memory"]["total_bytes"] * processes
    if torch.cuda.is_available():
        where, have = "the GPU", torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    else:
        where, have = "this machine", os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if packed and need > PACKED_WEIGHTS_RAM_SHARE * have:
        packed = False
        report = estimate.estimate_run(cfg, config, compute_dtype=precision, device=device, model=source.name,
                                       max_seq_len=seq, packed_weights=False)
        need = report["memory"]["total_bytes"] * processes
    # only refuse when clearly too big: the estimate is within about 25%, so allow for that
    if need > 1.5 * have:
        shared = f" ({processes} processes)" if processes > 1 else ""
        raise LoraError(f"this setup needs about {need / 2**30:.1f} GiB{shared} but {where} has {have / 2**30:.1f} "
                        "GiB; lower --batch-size, --max-seq-len or --rank, or add --use-4bit or --gradient-checkpointing")
    if announce:
        together = f", {processes} processes together" if processes > 1 else ""
        log.info("Estimated peak memory: %.1f GiB (the largest step this data makes, %d tokens%s; `lora estimate` "
                 "has the breakdown)", need / 2**30, tokens, together)
    return packed


def _check_reporter(report_to: str) -> None:
    """--report-to needs its package; say so before anything loads (the Trainer would fail much later)."""
    import importlib.util

    from lora_cli.errors import ConfigError

    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"--report-to {report_to} needs the {report_to} package: pip install \".[{report_to}]\"")


def _agree_on_run_dir(cfg: TrainConfig, world_size: int, is_main: bool) -> tuple[Path, bool]:
    """The run folder, and whether it was made here (a new one, named by the date, made and locked at once
    so that runs started in the same second get folders of their own)."""
    from lora_cli import runs

    if cfg.output_dir or cfg.resume:
        # several processes each look for the run: rank 0's lock must not hide it from the others
        return runs.resume_dir(cfg.output_dir, skip_locked=world_size == 1), False
    if world_size == 1:
        return runs.new_run_dir(cfg.model.name), True
    # Rank 0 makes and locks the folder, as one process does (two launches in the same second must not
    # share one), and hands its name to the others; a runs folder that cannot take it stops every rank
    # with rank 0's message at once, rather than leaving the others waiting for a name.
    from accelerate.utils import broadcast_object_list

    if _ranks().num_processes != world_size:  # nothing to hand the name over with
        raise RunError(f"WORLD_SIZE is {world_size} but the processes are not joined; start them with "
                       "`accelerate launch` or `torchrun`, or pass --output-dir")
    answer: list[Any] = [None]
    failure = None
    if is_main:
        try:
            answer[0] = str(runs.new_run_dir(cfg.model.name))
        except Exception as exc:  # every rank stops with it, none waits for a name that never comes
            failure, answer[0] = exc, RunError(f"rank 0 could not make the run folder: {exc}")
    broadcast_object_list(answer, from_process=0)
    if failure is not None:
        raise failure
    if isinstance(answer[0], RunError):
        raise answer[0]
    return Path(answer[0]), is_main


def _ranks() -> Any:
    """accelerate's view of the processes of this run, joined before the Trainer joins them.

    On a CPU accelerate joins the ranks (gloo) only when told it runs on the CPU: a plain PartialState()
    there is one process on its own, whose broadcasts and waits do nothing.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _readable_as_umask_allows(folder: Path) -> None:
    """safetensors writes its files owner-only (0600); an adapter is shared as every other file is: with
    the mode a new file gets here (read off a probe, not by setting the process's umask)."""
    probe = folder / ".mode-probe"
    os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for item in folder.iterdir():
        if item.is_file():
            os.chmod(item, mode)


def save_adapter(model: Any, tokenizer: Any, run_dir: Path, card: str | None = None) -> None:
    """Write the adapter into a temporary folder, check it, and only then move it into the run folder.
    `card` replaces the template README.md that PEFT writes (lora_cli/model_card.py)."""
    from lora_cli.adapters import verify_adapter

    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        verify_adapter(tmp)
        _readable_as_umask_allows(tmp)
        # weights last: adapter_model.safetensors present means the adapter is whole
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "adapter_model.safetensors"):
            os.replace(item, run_dir / item.name)
    finally:  # also on an error or a second Ctrl-C: no half-written copy left beside the run
        shutil.rmtree(tmp, ignore_errors=True)
