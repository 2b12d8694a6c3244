"""Training speed: the usual tutorial recipe against `lora train`, one after the other, same data and model.

    python scripts/bench_train.py            # about 15 minutes on a 2-core CPU; prints a markdown table

(a) tutorial: fp32, every example padded to max length, plain HF Trainer + PEFT, r=8 on q/v, lr 2e-4.
(b) lora train with its defaults for everything the tutorial does not fix (bf16 where the CPU has it,
    packing, the automatic learning rate), and the same r=8 on q/v, batch 4, max length 256, one epoch.

Each runs in its own process. Reported: real (non-pad) tokens/s in steady state (after the first 10%
of steps), whole-process wall time, peak RSS, response-token loss on held-out rows (the same evaluator
for both), and model FLOP/s (4 x parameters per token: forward plus backward through frozen weights)
as a share of the bf16 matmul rate measured on the spot.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HYPER = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "batch": 4, "max_len": 256, "epochs": 1}


def make_data(out: Path, rows: int = 320, held_out: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Rows of mixed length (about 30 to 256 tokens) from the paragraphs and facts shipped with lora."""
    assets = ROOT / "lora_cli" / "assets" / "data"
    paragraphs = [json.loads(line)["text"] for line in (assets / "general_text.jsonl").read_text().splitlines()]
    facts = [json.loads(line) for line in (assets / "default_train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    data = []
    for i in range(rows + held_out):
        if i % 3 == 0:
            data.append(facts[i % len(facts)])
        else:
            k = rng.randint(1, 4)
            chosen = rng.sample(paragraphs, k)
            data.append({"instruction": f"Write {k} short paragraph(s) starting with: {chosen[0][:40]}",
                         "output": "\n\n".join(chosen)})
    train, test = out / "bench_train.jsonl", out / "bench_heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in data[:rows]))
    test.write_text("".join(json.dumps(r) + "\n" for r in data[rows:]))
    return train, test


class Timing:
    """Trainer callback: wall time and tokens seen at every step end."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    def on_train_end(self, args, state, control, **kwargs):
        self.path.write_text(json.dumps(self.rows))


def worker_tutorial(base: str, train: Path, out: Path) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=0.05,
                                             target_modules=HYPER["targets"], task_type="CAUSAL_LM"))

    def encode(row):
        text = tok.apply_chat_template([{"role": "user", "content": row["instruction"]},
                                        {"role": "assistant", "content": row["output"]}], tokenize=False)
        enc = tok(text, truncation=True, max_length=HYPER["max_len"], padding="max_length")
        enc["labels"] = [i if m else -100 for i, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    rows = [json.loads(line) for line in train.read_text().splitlines()]
    ds = Dataset.from_list(rows).map(encode, remove_columns=["instruction", "output"])
    args = TrainingArguments(output_dir=str(out / "ckpt"), per_device_train_batch_size=HYPER["batch"],
                             num_train_epochs=HYPER["epochs"], learning_rate=2e-4, logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding")
    timing = Timing(out / "timing.json")
    Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
            callbacks=[timing]).train()
    model.save_pretrained(out / "adapter")


def worker_lora(train: Path, out: Path) -> None:
    from lora_cli import train as training
    from lora_cli.config import build_config

    cfg = build_config(None, {"data.path": str(train), "lora.r": HYPER["r"], "lora.lora_alpha": HYPER["alpha"],
                              "lora.target_modules": ",".join(HYPER["targets"]),
                              "training.per_device_train_batch_size": HYPER["batch"],
                              "data.max_seq_len": HYPER["max_len"], "training.num_train_epochs": HYPER["epochs"],
                              "output_dir": str(out / "adapter"), "training.save_steps": 10_000,
                              "overwrite": True})  # a second benchmark run replaces the first
    training.run(cfg, extra_callbacks=[Timing(out / "timing.json")])


def worker_heldout_loss(base: str, adapter: Path, test: Path, out: Path) -> None:
    from lora_cli import adapters, evaluate
    from lora_cli.data import detect_format, read_rows

    loaded = adapters.load_for_inference(str(adapter), base, precision="fp32", template="chat")
    rows, _ = read_rows(str(test))
    examples = evaluate._examples(loaded, rows, detect_format(rows), str(test), HYPER["max_len"])
    out.write_text(json.dumps({"loss": evaluate.response_loss(loaded, examples, adapter=True)}))


def run_worker(*args: str) -> tuple[float, int]:
    """Run this script as a worker; returns wall seconds and the worker's own peak RSS in bytes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"worker {args[0]} failed with status {status}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def bf16_matmul_rate(seconds: float = 3.0) -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * 2048 ** 3 * count / (time.perf_counter() - started)


def steady_rate(timing: Path) -> float:
    rows = json.loads(timing.read_text())
    first = max(1, len(rows) // 10)
    (t0, n0), (t1, n1) = rows[first], rows[-1]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-train", help="working folder")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        kind, *rest = ns.worker
        if kind == "tutorial":
            worker_tutorial(rest[0], Path(rest[1]), Path(rest[2]))
        elif kind == "lora":
            worker_lora(Path(rest[0]), Path(rest[1]))
        else:
            worker_heldout_loss(rest[0], Path(rest[1]), Path(rest[2]), Path(rest[3]))
        return

    import torch

    from lora_cli.default_model import ensure_default_model

    base = str(ensure_default_model())
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_data(out)
    matmul = bf16_matmul_rate()
    n_params = 134_515_008
    results = {}
    for name in ("tutorial", "lora"):
        folder = out / name
        folder.mkdir(exist_ok=True)
        args = ("tutorial", base, str(train), str(folder)) if name == "tutorial" else ("lora", str(train), str(folder))
        wall, rss = run_worker(*args)
        rate = steady_rate(folder / "timing.json")
        run_worker("loss", base, str(folder / "adapter"), str(test), str(folder / "loss.json"))
        loss = json.loads((folder / "loss.json").read_text())["loss"]
        results[name] = {"tok_s": rate, "wall_s": wall, "peak_rss_gb": rss / 1e9, "heldout_loss": loss,
                         "flops_share": 4 * n_params * rate / matmul}
    a, b = results["tutorial"], results["lora"]
    print(f"\nMachine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"bf16 matmul {matmul / 1e12:.2f} TFLOP/s (2048x2048, measured now)\n")
    print("| recipe | real tok/s (steady) | wall time (s) | peak RSS (GB) | held-out loss | share of bf16 matmul rate |")
    print("|---|---|---|---|---|---|")
    for name, label in (("tutorial", "tutorial: fp32, pad to max length"), ("lora", "`lora train` defaults")):
        r = results[name]
        print(f"| {label} | {r['tok_s']:.0f} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['heldout_loss']:.3f} "
              f"| {100 * r['flops_share']:.0f}% |")
    print(f"| ratio lora / tutorial | {b['tok_s'] / a['tok_s']:.2f}x | {a['wall_s'] / b['wall_s']:.2f}x faster "
          f"| {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x | | |")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
