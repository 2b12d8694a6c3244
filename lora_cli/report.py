"""Run summaries for people: the loss-curve picture written into each run, and `lora info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_cli.data import describe_rendering
from lora_cli.runs import checkpoint_number, complete_checkpoints, is_locked, read_log

LOSS_CURVE = "loss_curve.png"


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Training (and evaluation) loss against the step, as a PNG in the run folder; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = read_log(run_dir)
    train = [(row["step"], row["loss"]) for row in log if "loss" in row]
    evals = [(row["step"], row["eval_loss"]) for row in log if "eval_loss" in row]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = run_dir / LOSS_CURVE
    fig.savefig(target)
    plt.close(fig)
    return target


def describe(run_dir: Path, manifest: dict[str, Any] | None) -> str:
    """`lora info`: what a run is, what it was trained on, how it went, and how big it is."""
    size = sum(p.stat().st_size for p in run_dir.glob("adapter_model*.safetensors"))
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    lines = [f"run         {run_dir}"]
    if manifest:
        base, data, cfg, m = manifest["base_model"], manifest["data"], manifest["config"], manifest["metrics"]
        quant = f" + {base['quantization']}" if base.get("quantization") else ""
        lines += [
            f"base model  {base['name']} ({base.get('hub_id') or base['path']}), {base['parameters']:,} parameters, "
            f"{base['precision']}{quant}",
            f"adapter     r={adapter['r']} alpha={adapter['lora_alpha']} on {', '.join(sorted(adapter['target_modules']))}"
            f"{' (DoRA)' if adapter.get('use_dora') else ''}{' (rsLoRA scale alpha/sqrt(r))' if adapter.get('use_rslora') else ''}"
            f", {m['trainable_params']:,} trainable, {_size(size)}",
            f"data        {data['source']}: {data['train_examples']} examples ({data['format']}, "
            f"{describe_rendering(data['format'], data['template'])}), sha256 {str(data.get('sha256') or data.get('fingerprint'))[:12]}",
            f"training    {m['global_step']} steps, lr {cfg['training']['learning_rate']}, "
            f"{m['train_runtime_s']:.0f} s, {m['tokens_per_second']:.0f} tokens/s, world size {manifest['world_size']}",
            f"metrics     train loss {m['train_loss']:.4f}" + (f", eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""),
            f"created     {manifest['created']} with lora {manifest['versions']['lora']}",
        ]
    else:
        lines += [f"base model  {adapter.get('base_model_name_or_path')}",
                  f"adapter     r={adapter['r']} alpha={adapter['lora_alpha']}, {_size(size)} (a PEFT adapter "
                  "without a lora manifest)"]
    return "\n".join(lines)


def progress(run_dir: Path) -> dict[str, Any]:
    """How far an unfinished run got: its last logged step and losses, its checkpoints, and whether a
    `lora train` is training it right now (it holds the run's lock)."""
    log = read_log(run_dir)
    steps = [row for row in log if "loss" in row and "step" in row]
    evals = [row for row in log if "eval_loss" in row]
    checkpoints = complete_checkpoints(run_dir)
    return {"training_now": is_locked(run_dir),
            "step": steps[-1]["step"] if steps else 0,
            "epoch": steps[-1].get("epoch") if steps else None,
            "train_loss": steps[-1]["loss"] if steps else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "checkpoint_step": checkpoint_number(checkpoints[-1]) if checkpoints else None}


def describe_unfinished(run_dir: Path, manifest: dict[str, Any], progress: dict[str, Any]) -> str:
    """`lora info` on a run that has not finished: what it trains, how far it got, and how to go on."""
    import math
    import shlex

    base, data = manifest.get("base_model") or {}, manifest.get("data") or {}
    folder = shlex.quote(str(run_dir))
    if progress["training_now"]:
        status = "training now (a `lora train` process holds it)"
    elif progress["train_loss"] is not None and not math.isfinite(progress["train_loss"]):
        # resuming would replay the same steps into the same NaN (as `lora train` says when it stops)
        status = (f"stopped: the loss became NaN or infinite; start again with a lower --lr (or --precision fp32): "
                  f"lora train ... --output-dir {folder} --overwrite")
    elif progress["checkpoint_step"] is not None:
        status = (f"stopped; resume from its checkpoint at step {progress['checkpoint_step']}: "
                  f"lora train --resume --output-dir {folder}")
    else:
        status = f"stopped before its first checkpoint; start it again: lora train ... --output-dir {folder} " \
                 "--overwrite"
    reached = f"step {progress['step']}"
    if progress["epoch"] is not None:
        reached += f" (epoch {progress['epoch']:.2f})"
    if progress["train_loss"] is not None:
        reached += f", train loss {progress['train_loss']:.4f}"  # nan and inf print as such
    if progress["eval_loss"] is not None:
        reached += f", eval loss {progress['eval_loss']:.4f}"
    lines = [f"run         {run_dir} (not finished)", f"status      {status}",
             f"base model  {base.get('name')} ({base.get('hub_id') or base.get('path')})",
             f"data        {data.get('source') or '?'}: {data.get('rows', '?')} rows, "
             f"sha256 {str(data.get('sha256') or data.get('fingerprint'))[:12]}",
             f"progress    {reached if progress['step'] else 'no step logged yet'}",
             f"started     {manifest.get('created')}"]
    return "\n".join(lines)


def _size(size: int) -> str:
    """Bytes as MB, or KB below a tenth of a MB (a tiny adapter is not "0.0 MB")."""
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} KB"
