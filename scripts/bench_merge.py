"""Benchmark `lora merge` against the usual peft recipe on the embedded default model (SmolLM2-135M).

    LORA_CACHE_DIR=/tmp/loracache python scripts/bench_merge.py [--repeats 3] [--rank 8]

Each merge runs in a fresh subprocess; its peak RSS comes from the kernel (os.wait4's rusage), its wall
time is measured around the whole process (interpreter start and imports included, as a user sees it).
The adapter is r=8 on all linear layers with random non-zero weights, so every target really changes.
Prints a markdown table of medians to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "imports": "baseline: python with torch, transformers, peft and safetensors imported; nothing merged",
    "lora merge --no-check": "lora_cli.merge.merge(check=False): streamed shard by shard",
    "lora merge": "the same with its self-check (loads base + adapter and the merged model, one after the other)",
    "peft merge_and_unload": "from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained",
}


def worker(mode: str, adapter: str, out: str) -> None:
    """One merge, in this (fresh) process, importing only what that method needs."""
    if mode == "imports":
        import peft  # noqa: F401
        import safetensors  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return
    if mode.startswith("lora merge"):
        from lora_cli import merge

        merge.merge(adapter, out, dtype="fp32", overwrite=True, check=mode == "lora merge")
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def make_adapter(base: Path, folder: Path, rank: int) -> None:
    """An r=`rank` all-linear LoRA adapter with random non-zero A and B (B starts at zero in training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cli.targets import PRESETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PRESETS["all-linear"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    model.save_pretrained(folder)


def run_once(mode: str, adapter: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one fresh process doing `mode`."""
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child cannot fill it and stall
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--worker", mode, "--adapter", str(adapter),
                                 "--out", str(out)], stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max over all children
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{mode} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest |difference| between the tensors both merged folders hold (a sanity check of the two)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                found.update({key: (shard, key) for key in f.keys()})
        return found

    ta, tb = tensors(a), tensors(b)
    worst = 0.0
    for key in sorted(set(ta) & set(tb)):
        with safe_open(str(ta[key][0]), "pt") as fa, safe_open(str(tb[key][0]), "pt") as fb:
            worst = max(worst, (fa.get_tensor(key).float() - fb.get_tensor(key).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--adapter")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.adapter, args.out)

    os.environ.setdefault("LORA_CACHE_DIR", "/tmp/loracache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lora_cli.default_model import ensure_default_model

    base = ensure_default_model()
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = Path(tmp)
        make_adapter(base, root / "adapter", args.rank)
        results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:  # interleaved, so that load on the machine spreads over all modes
                results[mode].append(run_once(mode, root / "adapter", root / mode.replace(" ", "-")))
                print(f"repeat {repeat + 1} {mode}: {results[mode][-1][0]:.1f} s, {results[mode][-1][1]:.0f} MiB",
                      file=sys.stderr)
        same = max_weight_difference(root / "lora-merge", root / "peft-merge_and_unload")

    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    peft_s, peft_mb = (statistics.median(v) for v in zip(*results["peft merge_and_unload"]))
    print(f"Merge of a random r={args.rank} all-linear LoRA into {base.name} ({size:.0f} MiB fp32 safetensors), "
          f"fp32 output, medians of {args.repeats} fresh processes each; CPU threads: {os.cpu_count()}.\n")
    print("| method | wall time (s) | peak RSS (MiB) | time vs peft | RSS vs peft |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        seconds, mib = (statistics.median(v) for v in zip(*results[mode]))
        print(f"| {mode} | {seconds:.1f} | {mib:.0f} | {seconds / peft_s:.2f}x | {mib / peft_mb:.2f}x |")
    print("\n" + "\n".join(f"- {mode}: {what}" for mode, what in MODES.items()))
    print(f"- largest weight difference between the lora merge and peft outputs: {same:.1e}")


if __name__ == "__main__":
    main()
