"""`lora eval`: the base and the adapted model side by side on the same rows.

Loss and perplexity cover the response tokens only (the tokens training was scored on), exact match
compares the greedy answer with the reference response, and a forgetting check measures perplexity on
general text that has nothing to do with the task.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lora_cli.errors import ConfigError, DataError
from lora_cli.generate import stop_ids

GENERAL_TEXT = "general_text.jsonl"


def _examples(loaded: Any, rows: list[dict[str, Any]], fmt: str, source: str, max_seq_len: int,
              identity: dict[str, Any] | None = None) -> list[dict]:
    from lora_cli.data import tokenize_rows

    examples, _ = tokenize_rows(rows, fmt, loaded.renderer, max_seq_len, False, source, identity)
    if not examples:
        raise DataError(f"{source}: no row has a response to score (blank, or cut away within {max_seq_len} "
                        "tokens)")
    return examples


def response_loss(loaded: Any, examples: list[dict], adapter: bool, batch_size: int = 8) -> float:
    """Mean cross-entropy per trained token (summed over tokens, not averaged per row)."""
    import contextlib

    import torch

    from lora_cli.data import IGNORE_INDEX, make_collator
    from lora_cli.loss import supports_chunked_loss, trained_positions_loss

    collate = make_collator(loaded.tokenizer, packing=False)
    model = loaded.model
    use_adapter = adapter or loaded.adapter_dir is None
    # As in training, the output layer runs only on the scored positions: a batch's full logits
    # (8 x 1024 x vocab in fp32: 1.6 GB at 49k, 4 GB at 128k) would dwarf the rest of the pass.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if supports_chunked_loss(model, training=False) else None
    total, count = 0.0, 0
    with torch.no_grad(), (contextlib.nullcontext() if use_adapter else model.disable_adapter()):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size])
            inputs = {"input_ids": batch["input_ids"].to(model.device),
                      "attention_mask": batch["attention_mask"].to(model.device)}
            labels = batch["labels"].to(model.device)
            if head is not None:
                losses, trained = trained_positions_loss(model, head, inputs, labels)
            else:
                logits = model(**inputs).logits.float()
                losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                           ignore_index=IGNORE_INDEX, reduction="sum")
                trained = (labels[:, 1:] != IGNORE_INDEX).sum()
            total += losses.item()
            count += int(trained)
    return total / max(count, 1)


def references(rows: list[dict[str, Any]], fmt: str) -> list[tuple[list[dict[str, str]] | str, str]] | None:
    """(prompt, reference answer) pairs where the format carries a reference; None for plain text."""
    from lora_cli.data import is_blank, text_of, to_messages

    if fmt == "text":
        return None
    if fmt == "completion":
        return [(text_of(r["prompt"]), text_of(r["completion"])) for r in rows if not is_blank(r, fmt)]
    pairs = []
    for number, row in enumerate(rows, start=1):
        if is_blank(row, fmt):  # left out of the losses too: no reference to match
            continue
        messages = to_messages(row, fmt, f"row {number}")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if messages[last]["content"].strip():  # a conversation ending in a tool call has no answer to match
            pairs.append((messages[:last], messages[last]["content"]))
    return pairs


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(loaded: Any, pairs: list, adapter: bool, batch_size: int = 8) -> tuple[float, list[str]]:
    """Share of greedy answers equal to the reference (whitespace normalised); also the answers themselves."""
    import contextlib

    import torch

    tok = loaded.tokenizer
    model = loaded.model
    # a completion prompt starts as its training rows did: with the BOS where the tokenizer adds one
    prompts = [loaded.renderer.continuation(p) if isinstance(p, str) else loaded.renderer.prompt(p) for p, _ in pairs]
    answers: list[str] = []
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right end of every row
    use_adapter = adapter or loaded.adapter_dir is None
    try:
        with torch.no_grad(), (contextlib.nullcontext() if use_adapter else model.disable_adapter()):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                refs = [r for _, r in pairs[start:start + batch_size]]
                longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs)
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                out = model.generate(**enc, do_sample=False, max_new_tokens=longest + 8,
                                     pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(loaded))
                answers += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    hits = sum(normalise(a) == normalise(r) for a, (_, r) in zip(answers, pairs))
    return hits / len(pairs), answers


def _side(loss: float, em: float | None) -> dict[str, float]:
    result = {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}
    if em is not None:
        result["exact_match"] = round(em, 4)
    return result


def evaluate(adapter: str | None = None, model: str | None = None, data: str | None = None,
             general: str | None = "default", limit: int | None = None, max_seq_len: int | None = None,
             precision: str = "auto", data_format: str = "auto") -> dict[str, Any]:
    """Base and adapted side by side on `data` (default: the embedded held-out split). `max_seq_len`:
    where rows are cut, by default the run's own --max-seq-len (the tokens training scored), else 1024."""
    from lora_cli import adapters, models, runs
    from lora_cli.data import ASSETS, check_rows, default_data_path, detect_format, read_rows

    # a merged folder is the adapted model already; its base and adapter are what eval compares
    merged_from = adapters.merged_adapter(models.resolve_model(model, None)) if model and Path(model).is_dir() else None
    # no adapter fails first; the data is checked before anything loads
    run_dir = runs.find_run(adapter) if adapter or not model else None
    if merged_from and (run_dir is None or run_dir.resolve() == merged_from):
        raise ConfigError(f"--model {model} is {merged_from} merged into its base: `lora eval --adapter "
                          f"{merged_from}` compares that base with the adapter, which the merged model equals")
    if run_dir is None:
        raise DataError("lora eval compares base and adapted: name an adapter with --adapter (or train one first)")
    if max_seq_len is None:
        recorded = (runs.read_manifest(run_dir) or {}).get("config", {})
        max_seq_len = (recorded.get("data") or {}).get("max_seq_len") or 1024
    spec = data or str(default_data_path("heldout"))
    rows, identity = read_rows(spec, split="eval")
    rows = rows[:limit] if limit else rows
    from lora_cli.config import FORMATS

    if data_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    fmt = detect_format(rows, data_format, f"--data {data}" if data else "the embedded held-out split", identity)
    general_spec = None
    if general:  # read and checked before the model loads, not after the comparison has run
        general_spec = str(Path(str(ASSETS / "data" / GENERAL_TEXT))) if general == "default" else general
        general_rows, _ = read_rows(general_spec, flag="--general")
        check_rows(general_rows, "text", f"--general {general_spec}")
    loaded = adapters.load_for_inference(adapter, model, precision=precision)
    examples = _examples(loaded, rows, fmt, spec, max_seq_len, identity)
    pairs = references(rows, fmt)
    # every row is scored, or left out as training leaves it out: a blank response, or one cut away by the length
    report: dict[str, Any] = {"rows": len(examples), "left_out_rows": len(rows) - len(examples), "data": spec,
                              "adapter": str(loaded.adapter_dir)}
    if pairs:  # answers are generated for rows the length limit cut from the losses too
        report["exact_match_rows"] = len(pairs)
    for name, on in (("base", False), ("adapted", True)):
        em = exact_match(loaded, pairs, on)[0] if pairs else None
        report[name] = _side(response_loss(loaded, examples, on), em)
    if general_spec:
        general_examples = _examples(loaded, general_rows, "text", general_spec, max_seq_len)
        base_ppl = math.exp(response_loss(loaded, general_examples, False))
        adapted_ppl = math.exp(response_loss(loaded, general_examples, True))
        report["general"] = {"data": general_spec, "base_perplexity": round(base_ppl, 3),
                             "adapted_perplexity": round(adapted_ppl, 3),
                             "perplexity_increase": round(adapted_ppl / base_ppl - 1, 4)}
    return report


def format_report(report: dict[str, Any]) -> str:
    """A small side-by-side table for the terminal."""
    keys = [k for k in ("loss", "perplexity", "exact_match") if k in report["base"]]
    left_out = report.get("left_out_rows") or 0
    note = f" ({left_out} left out: blank responses, or responses cut away by the length limit)" if left_out else ""
    rows = f"{report['rows']} row" + ("s" if report["rows"] != 1 else "")
    lines = [f"{rows} of {report['data']}{note}", f"{'':14}{'base':>12}{'adapted':>12}"]
    for key in keys:
        lines.append(f"{key:14}{report['base'][key]:>12.4f}{report['adapted'][key]:>12.4f}")
    matched = report.get("exact_match_rows")
    if matched is not None and matched != report["rows"]:
        lines.append(f"(exact match over {matched} row{'s' if matched != 1 else ''}: rows the length limit cuts "
                     "from the losses are still answered; conversations ending in a tool call are not)")
    if "general" in report:
        g = report["general"]
        lines.append(f"general text perplexity {g['base_perplexity']:.3f} -> {g['adapted_perplexity']:.3f} "
                     f"({100 * g['perplexity_increase']:+.1f}%: how much the adapter changed unrelated text)")
    return "\n".join(lines)


def harness(tasks: str, base: str, adapter: Path, include_path: str | None = None, limit: int | None = None,
            device: str | None = None, chat_template: bool = True) -> dict[str, dict[str, Any]]:
    """Run lm-evaluation-harness tasks on the base and the adapted model; {task: {"base": ..., "adapted": ...}}.

    lm-eval is an optional extra (`pip install ".[eval]"`); local task definitions work offline.
    """
    import importlib.util
    import json as jsonlib
    import os
    import subprocess
    import sys
    import tempfile

    from lora_cli.errors import ConfigError, LoraError

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError('--tasks needs lm-evaluation-harness: pip install ".[eval]" (or pip install lm-eval==0.4.13)')
    results: dict[str, dict[str, Any]] = {}
    for side, model_args in (("base", f"pretrained={base}"), ("adapted", f"pretrained={base},peft={adapter}")):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", tasks,
                   "--device", device, "--output_path", out]
            if include_path:
                cmd += ["--include_path", include_path]
            if limit:
                cmd += ["--limit", str(limit)]
            if chat_template:  # prompt the models the way the adapter was trained
                cmd += ["--apply_chat_template"]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise LoraError(f"lm-eval failed on the {side} model: {tail}")
            for path in Path(out).rglob("results*.json"):
                for task, metrics in jsonlib.loads(path.read_text())["results"].items():
                    clean = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))
                             and "stderr" not in k and k != "sample_len"}
                    results.setdefault(task, {})[side] = clean
    return results


def format_harness(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'task':24}{'metric':16}{'base':>10}{'adapted':>10}"]
    for task, sides in results.items():
        for metric, value in sides.get("base", {}).items():
            adapted = sides.get("adapted", {}).get(metric, float("nan"))
            lines.append(f"{task:24}{metric:16}{value:>10.4f}{adapted:>10.4f}")
    return "\n".join(lines)
