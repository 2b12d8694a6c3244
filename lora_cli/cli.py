"""The command line: parse -> build the config -> call one function -> print the result.

The only module that prints errors or exits. Heavy libraries are imported inside the commands so
that `lora --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from lora_cli import __version__
from lora_cli.config import default as D
from lora_cli.errors import LoraError

app = typer.Typer(
    name="lora",
    help="Fine-tune LLaMA-family models with LoRA and QLoRA, then merge, try and evaluate the adapter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """lora: the shortest path from "I have data" to "I have a good adapter"."""
    state["debug"] = debug or os.environ.get("LORA_DEBUG") == "1"
    _setup_logging(state["debug"])
    from lora_cli import cpu

    cpu.configure_process()


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("lora_cli")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also silences transformers' load bars
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import warnings

        warnings.filterwarnings("ignore")
        # bitsandbytes logs at import that an optional CPU kernel package is missing: harmless here
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _lean_start_for(adapter: str | None, model: str | None, as_trained: bool = True,
                    adapter_required: bool = False) -> None:
    """For a command that loads a trained adapter (or a plain model) as its run recorded it: leave out
    the libraries it cannot use before anything imports them (in a `lora` process only). `as_trained`
    False: the base's full-precision weights, whatever the adapter was trained against."""
    from lora_cli import startup

    if startup.command_process:
        from lora_cli import adapters

        plan = adapters.plan_load(adapter, model, adapter_required)
        startup.leave_out_bitsandbytes(plan.base_name, plan.trained.get("revision"),
                                       plan.quantization if as_trained else None,
                                       plan.trained.get("trust_remote_code", False))


def errors_as_one_line(func: Callable[..., Any]) -> Callable[..., Any]:
    """Our exceptions become `error: ...` on stderr and an exit status; --debug prints their traceback too."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LoraError as exc:
            if state["debug"]:  # the traceback, and still the exit status that says what kind of error it was
                traceback.print_exc()
            # bad input (exit 2) is the same for every process of a multi-process run: said once, by rank 0
            if _is_main_process() or exc.exit_code != 2:
                typer.echo(f"error: {exc}", err=True)
            else:
                _let_rank_zero_say_it(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None
        except (OSError, RuntimeError) as exc:
            full = _disk_full(exc)
            if full is None:
                raise
            if state["debug"]:
                traceback.print_exc()
            typer.echo(f"error: {full}; free some space (or write elsewhere) and run the command again", err=True)
            raise typer.Exit(1) from None

    return wrapper


# How long another rank waits, on bad input, for the launcher to stop it once rank 0 has said the error.
RANK_ZERO_GRACE_S = 30


def _let_rank_zero_say_it(exc: LoraError) -> None:
    """Bad input on a rank other than 0: rank 0 meets the same error and says it. Leaving at once could have
    the launcher stop rank 0 first (it stops every process when one fails), and the error went unsaid; so
    this rank waits to be stopped, and says the error itself if no stop comes."""
    try:
        time.sleep(RANK_ZERO_GRACE_S)
    except KeyboardInterrupt:  # the launcher's SIGTERM (lora turns it into this): rank 0 has failed
        return
    typer.echo(f"error: {exc}", err=True)


def _leave_process_group() -> None:
    """End this process's part of a multi-process run's group once its training is over, rather than at the
    interpreter's exit, where gloo's threads were now and then torn down mid-flight: the process aborted
    ("terminate called without an active exception") after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _disk_full(exc: BaseException) -> str | None:
    """What a write that ran out of room says, in one line; None for any other error. torch.save reports
    a short write as a RuntimeError of its zip writer, not as the OSError beneath it."""
    import errno

    for found in (exc, exc.__cause__, exc.__context__):
        if isinstance(found, OSError) and found.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" writing {found.filename}" if found.filename else ""
            if found.errno == errno.EFBIG:  # a file size limit (ulimit -f), or FAT32's 4 GiB
                return f"a file grew past what this filesystem or process allows{where} ({found.strerror})"
            return f"no room left{where} ({found.strerror})"
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter failed" in text or "unexpected pos" in text):
        return f"a checkpoint could not be written whole ({text.splitlines()[0][:120]}); the disk may be full"
    return None


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _help(key: str, text: str) -> str:
    return f"{text} (default: {D(key)})"


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe, or a run's lora_run.json to train it again; flags override it.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else there.")]


@app.command()
@errors_as_one_line
def train(
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option(help=_help("model.name", "Short name, hub id or local folder."))] = None,
    data: Annotated[Optional[str], typer.Option(help="JSONL/JSON/CSV/Parquet file, folder, or hub dataset id. "
                                                      "(default: the embedded dataset)")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Run folder. (default: runs/<time>-<model>)")] = None,
    rank: Annotated[Optional[int], typer.Option(help=_help("lora.r", "LoRA rank r."))] = None,
    alpha: Annotated[Optional[int], typer.Option(help=_help("lora.lora_alpha", "LoRA alpha (scale alpha/r)."))] = None,
    dropout: Annotated[Optional[float], typer.Option(help=_help("lora.lora_dropout", "LoRA dropout."))] = None,
    target_modules: Annotated[Optional[str], typer.Option(
        help=_help("lora.target_modules", "qv, attention, mlp, all-linear, or a comma list of module names."))] = None,
    use_4bit: Annotated[Optional[bool], typer.Option("--use-4bit/--no-use-4bit", help="QLoRA: NF4 base weights.")] = None,
    use_8bit: Annotated[Optional[bool], typer.Option("--use-8bit/--no-use-8bit", help="int8 base weights.")] = None,
    dora: Annotated[Optional[bool], typer.Option("--dora/--no-dora", help="Weight-decomposed LoRA (DoRA).")] = None,
    rslora: Annotated[Optional[bool], typer.Option("--rslora/--no-rslora", help="Rank-stabilised scale alpha/sqrt(r).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help=_help("training.num_train_epochs", "Epochs."))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_help("training.per_device_train_batch_size", "Rows per device per step."))] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help=_help("training.gradient_accumulation_steps", "Gradient accumulation steps."))] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. (default: 1e-3 below 1B parameters, 2e-4 above)")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=_help("training.lr_scheduler_type", "Learning-rate schedule."))] = None,
    warmup: Annotated[Optional[float], typer.Option(help=_help("training.warmup_steps", "Warmup steps, or a share of all steps if below 1."))] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=_help("training.weight_decay", "AdamW weight decay."))] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help=_help("training.max_grad_norm", "Gradient clipping (0 = off)."))] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help=_help("data.max_seq_len", "Longest example in tokens; longer ones are cut."))] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Pack examples without padding. (default: packing)")] = None,
    train_on_inputs: Annotated[Optional[bool], typer.Option("--train-on-inputs/--no-train-on-inputs",
                                                            help="Train on prompt tokens too. (default: responses only)")] = None,
    data_format: Annotated[Optional[str], typer.Option("--format", help=_help("data.format", "instruction, chat, sharegpt, completion, text."))] = None,
    template: Annotated[Optional[str], typer.Option(help=_help("data.template", "chat (the tokenizer's), alpaca."))] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="Held-out file evaluated during training.")] = None,
    eval_split: Annotated[Optional[float], typer.Option(help=_help("data.eval_split", "Share of training rows held out."))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_help("training.seed", "Random seed."))] = None,
    save_steps: Annotated[Optional[int], typer.Option(help=_help("training.save_steps", "Checkpoint (and evaluate) every N steps."))] = None,
    save_total_limit: Annotated[Optional[int], typer.Option(help=_help("training.save_total_limit", "Checkpoints kept."))] = None,
    eval_steps: Annotated[Optional[int], typer.Option(help="Evaluate every N steps. (default: with each checkpoint)")] = None,
    logging_steps: Annotated[Optional[int], typer.Option(help=_help("training.logging_steps", "Log every N steps."))] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue the run in --output-dir (or the newest unfinished one) from its newest checkpoint, with its own options.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Replace a finished run in --output-dir.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                                                                   help="Recompute activations: less memory, ~15% slower.")] = None,
    precision: Annotated[Optional[str], typer.Option(help=_help("model.precision", "auto, bf16, fp16, fp32."))] = None,
    int8_backward: Annotated[Optional[bool], typer.Option("--int8-backward/--no-int8-backward",
                                                          help="Frozen layers' input gradients in int8 (CPU, fp32). "
                                                               "(default: auto, where int8 matmuls are fast)")] = None,
    report_to: Annotated[Optional[str], typer.Option(help=_help("training.report_to", "none, tensorboard, wandb."))] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub branch, tag or commit of the model.")] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code/--no-trust-remote-code",
                                                                        help="Allow code from the model repository.")] = None,
    allow_pickle_weights: Annotated[Optional[bool], typer.Option("--allow-pickle-weights/--no-allow-pickle-weights",
                                                                 help="Allow .bin (pickle) weights; unpickling can run code.")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Upload the finished adapter to this hub repository.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a model with LoRA or QLoRA; writes a run folder and points runs/latest at it.

    Example: lora train --model llama-7b --rank 8 --use-4bit --data my.jsonl
    """
    from lora_cli.config import build_config

    flags = {
        "model.name": model, "data.path": data, "output_dir": output_dir, "lora.r": rank, "lora.lora_alpha": alpha,
        "lora.lora_dropout": dropout, "lora.target_modules": target_modules, "model.use_4bit": use_4bit,
        "model.use_8bit": use_8bit, "lora.use_dora": dora, "lora.use_rslora": rslora,
        "training.num_train_epochs": epochs, "training.max_steps": max_steps,
        "training.per_device_train_batch_size": batch_size, "training.gradient_accumulation_steps": grad_accum,
        "training.learning_rate": lr, "training.lr_scheduler_type": scheduler, "training.warmup_steps": warmup,
        "training.weight_decay": weight_decay, "training.max_grad_norm": max_grad_norm,
        "data.max_seq_len": max_seq_len, "data.packing": packing, "data.train_on_inputs": train_on_inputs,
        "data.format": data_format, "data.template": template, "data.eval_data": eval_data,
        "data.eval_split": eval_split, "training.seed": seed, "training.save_steps": save_steps,
        "training.eval_steps": eval_steps, "training.save_total_limit": save_total_limit,
        "training.logging_steps": logging_steps, "resume": resume, "overwrite": overwrite,
        "training.gradient_checkpointing": gradient_checkpointing, "model.precision": precision,
        "model.int8_backward": int8_backward, "training.report_to": report_to, "model.revision": revision,
        "model.trust_remote_code": trust_remote_code, "model.allow_pickle_weights": allow_pickle_weights,
        "push_to_hub": push_to_hub,
    }
    cfg = build_config(config, flags)
    if cfg.resume:  # the run's own options, as it recorded them when it started
        from lora_cli import runs

        run_dir = runs.resume_dir(cfg.output_dir)
        recorded = (runs.read_manifest(run_dir) or {}).get("config")
        if recorded:
            cfg = build_config(config, {**flags, "output_dir": str(run_dir)}, recorded=recorded)
        elif run_dir.is_dir():
            logging.getLogger("lora_cli").warning(
                "%s records no options (an older lora made it): resuming with the options given now, which "
                "must be the ones it started with", run_dir)
    from lora_cli import startup

    startup.leave_out_bitsandbytes(cfg.model.name, cfg.model.revision, cfg.model.quantization,
                                   cfg.model.trust_remote_code)
    from lora_cli.hub import check_push_target

    check_push_target(cfg.push_to_hub)
    from lora_cli import train as training

    result = training.run(cfg)
    _leave_process_group()
    if result.interrupted:
        if _is_main_process():
            typer.echo(f"Interrupted at step {result.manifest['step']}; a checkpoint is saved. Continue with: "
                       f"lora train --resume --output-dir {shlex.quote(str(result.run_dir))}", err=True)
        raise typer.Exit(130)
    if not _is_main_process():
        raise typer.Exit(130 if result.signalled else 0)
    if cfg.push_to_hub and not result.signalled:
        from lora_cli.hub import push

        typer.echo(f"Uploaded to {push(result.run_dir, cfg.push_to_hub, run=True)}", err=True)
    if as_json:
        _print_json(result.manifest)
    else:
        typer.echo(_train_summary(result.run_dir, result.manifest), err=True)
    if result.signalled:  # asked to stop as the run ended: it is whole; what came after it is not done
        typer.echo("Stopped by a signal as the run ended; the run is finished and written"
                   + (f", the upload skipped (upload it with: hf upload {cfg.push_to_hub} {result.run_dir} "
                      "--exclude 'checkpoints/*')" if cfg.push_to_hub else ""), err=True)
        raise typer.Exit(130)


def _train_summary(run_dir: Path, manifest: dict[str, Any]) -> str:
    m = manifest["metrics"]
    started = f", first step {m['seconds_to_first_step']:.1f} s after the command" \
        if m.get("seconds_to_first_step") is not None else ""
    lines = [
        f"Done in {m['train_runtime_s']:.0f} s{_evaluating(m)}: {m['global_step']} steps, "
        f"{m['tokens_per_second']:.0f} tokens/s{started}.",
        f"  trainable parameters  {m['trainable_params']:,} of {m['total_params']:,} "
        f"({100 * m['trainable_params'] / m['total_params']:.2f}%)",
        f"  mean train loss       {m['train_loss']:.4f}",
    ]
    if "eval_loss" in m:
        lines.append(f"  eval loss             {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f})")
    lines += [f"  adapter               {run_dir}",
              'Next: lora generate --prompt "..."   (or lora eval, lora merge)']
    return "\n".join(lines)


def _evaluating(metrics: dict[str, Any]) -> str:
    """The share of the run spent evaluating, which tokens/s leaves out (older manifests lack it)."""
    seconds = metrics.get("eval_seconds") or 0
    return f" ({seconds:.0f} s of it evaluating)" if seconds >= 1 else ""


def _command_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """--config for the commands other than train: a YAML mapping of their options (`max_new_tokens: 64`,
    `no-general: true`), which become the defaults that flags override (click's `default_map`)."""
    if value is None:
        return value
    import yaml

    if not value.is_file():
        raise typer.BadParameter(f"file not found: {value}")
    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise typer.BadParameter(f"{value} is not valid YAML") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of option names to values")
    # every spelling of an option: its flag words (--no-general, --json), its parameter name, and the
    # off side of an on/off switch (no-check: true is check: false)
    names = {opt.lstrip("-").replace("-", "_"): (p.name, False) for p in ctx.command.params if p.name != "config"
             for opt in [*p.opts, p.name] if not opt.startswith("-") or opt.startswith("--")}
    names.update({opt.lstrip("-").replace("-", "_"): (p.name, True) for p in ctx.command.params
                  for opt in getattr(p, "secondary_opts", []) if opt.startswith("--")})
    defaults = {}
    for key, item in data.items():
        name, inverted = names.get(str(key).replace("-", "_"), (None, False))
        if name is None:
            raise typer.BadParameter(f"unknown key '{key}' in {value}; `lora {ctx.command.name} --help` lists the options")
        if isinstance(item, (dict, list)) or (inverted and not isinstance(item, bool)):
            raise typer.BadParameter(f"'{key}' in {value} must be a single value, got {item!r}")
        defaults[name] = (not item) if inverted else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


CommandConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", is_eager=True, callback=_command_config, help="YAML of this command's options; flags override it.")]
AdapterOpt = Annotated[Optional[str], typer.Option(help="Run or adapter folder. (default: runs/latest)")]
ModelOpt = Annotated[Optional[str], typer.Option(help="A merged or plain model folder (or hub id); with --adapter, "
                                                     "the base to put it on.")]
EvalModelOpt = Annotated[Optional[str], typer.Option(help="The base to put --adapter on (default: the one it was "
                                                         "trained on); eval always compares base and adapted.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto, bf16, fp16, fp32.")]


@app.command()
@errors_as_one_line
def generate(
    config: CommandConfigOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="What to ask.")] = None,
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens (0 = all).")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help="Above 1 discourages repeats, below 1 encourages "
                                                           "them; must be above 0.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system prompt, as training rows give one (--prompts-file "
                                                       "rows with their own keep it).")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Chat, keeping the history.")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option(help="JSONL of prompts to answer in one go.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Where --prompts-file answers go (JSONL).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output file.")] = False,
    compare_base: Annotated[bool, typer.Option("--compare", help="Show the base model's answer beside the adapted one.")] = False,
    precision: PrecisionOpt = "auto",
) -> None:
    """Generate from base + adapter (default runs/latest) or from a merged folder; streams to stdout.

    Example: lora generate --prompt "What is the capital of Tarvossa?"
    """
    from lora_cli.errors import ConfigError

    modes = sum([prompt is not None, interactive, prompts_file is not None])
    if modes != 1:
        raise ConfigError("give exactly one of --prompt TEXT, --interactive, or --prompts-file FILE --output FILE")
    if prompts_file is not None and output is None:
        raise ConfigError("--prompts-file needs --output FILE for the answers")
    if prompts_file is not None and not prompts_file.is_file():
        raise ConfigError(f"--prompts-file {prompts_file} does not exist")
    if output is not None:
        from lora_cli.runs import check_can_create

        if output.is_dir():
            raise ConfigError(f"--output {output} is a folder; name a file for the answers")
        if output.exists() and not overwrite:
            raise ConfigError(f"--output {output} already exists; name a new file, or pass --overwrite to replace it")
        check_can_create(output, "--output")
    if compare_base and (model and not adapter):
        raise ConfigError("--compare needs an adapter: it compares the base with base + adapter")
    from lora_cli.config import check_precision

    check_precision(precision)
    from lora_cli import generate as gen

    sampling = gen.Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    _lean_start_for(adapter, model)
    from lora_cli import adapters

    if system is not None and raw:
        raise ConfigError("--system has no place in a --raw prompt; drop one of them")
    from lora_cli.data import RAW_FORMATS

    raw_text = ("--system has no place here: this model was trained on raw text (prompt/completion or text rows), "
                "so prompts are sent as they are; drop --system")
    # known from the run folder (or a merged folder's record): refused before the weights load
    if system is not None and adapters.trained_format(adapter, model) in RAW_FORMATS:
        raise ConfigError(raw_text)
    loaded = adapters.load_for_inference(adapter, model, precision=precision)
    if system is not None and gen.uses_raw_prompts(loaded):  # where only the loaded model tells
        raise ConfigError(raw_text)
    if prompts_file is not None:
        count = gen.batch(loaded, prompts_file, output, sampling, raw, system)
        typer.echo(f"Wrote {count} answer{'s' if count != 1 else ''} to {output}", err=True)
    elif interactive:
        gen.interactive(loaded, sampling, raw, system=system)
    elif compare_base:
        gen.compare(loaded, prompt, sampling, raw, system=system)
    else:
        gen.stream_answer(loaded, prompt, sampling, raw, system=system)


@app.command(name="eval")
@errors_as_one_line
def eval_command(
    config: CommandConfigOpt = None,
    adapter: AdapterOpt = None,
    model: EvalModelOpt = None,
    data: Annotated[Optional[str], typer.Option(help="Rows to evaluate. (default: the embedded held-out split)")] = None,
    general: Annotated[Optional[str], typer.Option(help="General text for the forgetting check. "
                                                        "(default: a sample shipped with lora)")] = None,
    no_general: Annotated[bool, typer.Option("--no-general", help="Skip the forgetting check.")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N rows.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(min=1, help="Cut rows at N tokens. (default: the run's "
                                                                   "--max-seq-len, as training scored them)")] = None,
    data_format: Annotated[str, typer.Option("--format", help="instruction, chat, sharegpt, completion, text "
                                                             "(default: detected from the columns).")] = "auto",
    tasks: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks (comma list), run on base and "
                                                      "adapted; needs the \\[eval] extra.")] = None,
    include_path: Annotated[Optional[str], typer.Option(help="Folder of local lm-eval task definitions.")] = None,
    precision: PrecisionOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Loss, perplexity and exact match of the base and the adapted model, side by side.

    Example: lora eval --data held_out.jsonl --json
    """
    from lora_cli import evaluate
    from lora_cli.config import check_precision

    check_precision(precision)
    if tasks:
        from lora_cli import adapters, runs

        run_dir = runs.find_run(adapter)
        manifest = runs.read_manifest(run_dir) or {}
        base = model or adapters.base_of(run_dir, manifest)
        chat = manifest.get("data", {}).get("template", "chat") == "chat" and \
            manifest.get("data", {}).get("format") not in ("text", "completion")
        results = evaluate.harness(tasks, base, run_dir, include_path, limit, chat_template=chat)
        typer.echo(json.dumps(results, indent=2) if as_json else evaluate.format_harness(results))
        return
    _lean_start_for(adapter, model)
    report = evaluate.evaluate(adapter, model, data, None if no_general else (general or "default"), limit,
                               max_seq_len=max_seq_len, precision=precision, data_format=data_format)
    if as_json:
        _print_json(report)
    else:
        typer.echo(evaluate.format_report(report))


@app.command()
@errors_as_one_line
def merge(
    config: CommandConfigOpt = None,
    run_or_adapter: Annotated[Optional[str], typer.Argument(help="Run or adapter folder (default: runs/latest).")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Where the merged model goes (default: <run>/merged).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", "--model", help="Base model: short name, hub id or folder "
                                                                          "(default: the run's).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (default: the base's stored dtype).")] = None,
    merge_into: Annotated[str, typer.Option(help="dequantized: for a QLoRA/8-bit adapter, the dequantized weights it "
                                                 "was trained against; original: the full-precision weights.")] = "dequantized",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier merge in --output-dir.")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare the merged model's logits with base + "
                                                                   "adapter (needs memory for one full model).")] = True,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Upload the merged model to this hub repository.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold an adapter into its base and save a standard model folder (loads without peft).

    Example: lora merge runs/latest --dtype bf16
    """
    _lean_start_for(run_or_adapter, base, as_trained=merge_into == "dequantized", adapter_required=True)
    from lora_cli import merge as merging
    from lora_cli.hub import check_push_target

    check_push_target(push_to_hub)
    report = merging.merge(run_or_adapter, output_dir, base, dtype, merge_into, overwrite, check, push_to_hub)
    if push_to_hub:
        from lora_cli.hub import push

        typer.echo(f"Uploaded to {push(Path(report['output_dir']), push_to_hub, run=False)}", err=True)
    if as_json:
        _print_json(report)
        return
    checked = (f", largest logit difference to base + adapter {report['max_logit_diff']:.1e}"
               if report["max_logit_diff"] is not None else ", not checked (--no-check)")
    typer.echo(f"Merged ({report['merge_into']} weights, {report['dtype']}) in {report['seconds']:.0f} s{checked}.\n"
               f"  model  {report['output_dir']}\n"
               f"Next: lora generate --model {shlex.quote(str(report['output_dir']))} --prompt \"...\"", err=True)


@app.command()
@errors_as_one_line
def estimate(
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option(help=_help("model.name", "Short name, hub id or local folder."))] = None,
    rank: Annotated[Optional[int], typer.Option(help=_help("lora.r", "LoRA rank r."))] = None,
    alpha: Annotated[Optional[int], typer.Option(help=_help("lora.lora_alpha", "LoRA alpha."))] = None,
    target_modules: Annotated[Optional[str], typer.Option(help=_help("lora.target_modules", "qv, attention, mlp, all-linear, or a comma list of module names."))] = None,
    use_4bit: Annotated[Optional[bool], typer.Option("--use-4bit/--no-use-4bit", help="NF4 base weights.")] = None,
    use_8bit: Annotated[Optional[bool], typer.Option("--use-8bit/--no-use-8bit", help="int8 base weights.")] = None,
    dora: Annotated[Optional[bool], typer.Option("--dora/--no-dora", help="DoRA.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_help("training.per_device_train_batch_size", "Rows per device."))] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help=_help("data.max_seq_len", "Tokens per row."))] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Packed rows.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                                                                   help="Recompute activations.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="bf16, fp16, fp32 (auto = bf16 on cuda; on cpu, what `lora train` would pick on this CPU).")] = None,
    device: Annotated[str, typer.Option(help="cuda or cpu: what the overhead is counted for.")] = "cuda",
    as_json: JsonOpt = False,
) -> None:
    """Trainable parameters and the memory a training needs, from the model's config alone (offline for short names).

    Example: lora estimate --model llama-7b --rank 8 --use-4bit
    """
    from lora_cli.config import build_config
    from lora_cli.errors import ConfigError

    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--device must be cuda or cpu, got {device!r}")
    cfg = build_config(config, {
        "model.name": model, "lora.r": rank, "lora.lora_alpha": alpha, "lora.target_modules": target_modules,
        "model.use_4bit": use_4bit, "model.use_8bit": use_8bit, "lora.use_dora": dora,
        "training.per_device_train_batch_size": batch_size, "data.max_seq_len": max_seq_len, "data.packing": packing,
        "training.gradient_checkpointing": gradient_checkpointing, "model.precision": precision})
    from lora_cli import estimate as est

    compute_dtype = cfg.model.precision
    if device == "cpu" and compute_dtype == "fp16":  # as `lora train` refuses it
        raise ConfigError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    if compute_dtype == "auto":  # as `lora train` would choose: on a CPU, this CPU's faster dtype
        from lora_cli.models import cpu_precision

        compute_dtype = "bf16" if device == "cuda" else cpu_precision()
    report = est.estimate_run(cfg, est.load_model_config(cfg.model.name), device=device, compute_dtype=compute_dtype)
    if as_json:
        _print_json(report)
    else:
        typer.echo(est.format_estimate(report))


@app.command()
@errors_as_one_line
def info(
    run_dir: Annotated[Optional[str], typer.Argument(help="Run or adapter folder. (default: runs/latest)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What a run is: base model, adapter, data, metrics and size; for a run not finished, how far it got.

    Example: lora info runs/latest
    """
    from lora_cli import report, runs

    path = runs.find_run(run_dir, unfinished=True)
    manifest = runs.read_manifest(path)
    # started, or being trained right now (a finished run trained further keeps its old record until the end)
    if manifest and (manifest.get("status") != "finished" or runs.is_locked(path)):
        progress = report.progress(path)
        if as_json:
            _print_json({**manifest, "progress": progress})
        else:
            typer.echo(report.describe_unfinished(path, manifest, progress))
    elif as_json:
        _print_json(manifest or {"adapter": str(path)})
    else:
        typer.echo(report.describe(path, manifest))


def run() -> None:
    """Console-script entry point. Usage errors (a mistyped option, a value of the wrong type) get one
    line like every other error, where typer would draw a six-line box."""
    from lora_cli import startup

    startup.command_process = True
    # SIGTERM (kill, a scheduler's notice) unwinds like Ctrl-C: a merge removes its unfinished folder, a
    # training saves a checkpoint (lora_cli/callbacks.py), where the default would just end the process
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
    except Exception as exc:  # typer's usage errors come from its private copy of click: matched by shape
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `lora`: typer has printed the help already
            sys.exit(2)
        if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        context = getattr(exc, "ctx", None)
        where = f" (see `{context.command_path} --help`)" if context is not None else ""
        typer.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
