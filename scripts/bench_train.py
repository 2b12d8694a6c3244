"""Training speed: the usual tutorial recipe against `lora train`, one after the other, same data and model.

    python scripts/bench_train.py                          # 7-15 minutes on a 2-core CPU; prints a markdown table
    python scripts/bench_train.py --random-model llama-1b  # a 1.1B LLaMA with random weights (for a GPU)
    python scripts/bench_train.py --random-model smollm2-135m --tokenizer DIR   # no default model needed

(a) tutorial: fp32, every example padded to max length, plain HF Trainer + PEFT, r=8 on q/v, lr 2e-4.
(b) lora train with its defaults for everything the tutorial does not fix (bf16 where it is the fast dtype,
    packing, the automatic learning rate), and the same r=8 on q/v, batch 4, max length 256, one epoch.

Each runs in its own process, on the CUDA GPU when there is one (both recipes), else on the CPU.
Reported: real (non-pad) tokens/s in steady state (after the first 10% of steps), whole-process wall
time, the start-up (seconds from the process's start to the first step), peak memory (RSS on a CPU,
`torch.cuda.max_memory_allocated` on a GPU), response-token loss on held-out rows (the same evaluator
for both), and model FLOP/s (4 x parameters per token: forward plus
backward through frozen weights) as a share of the matmul rate measured on the spot: bf16 on a GPU; on a
CPU the faster of bf16 and fp32 (bf16 is 7x faster with AMX, but slower than fp32 on CPUs without it).
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
    """Trainer callback: wall time and tokens seen at every step end, and the start-up (process start to first step)."""

    def __init__(self, path: Path):
        self.path, self.rows, self.first_step_after = path, [], None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step_after is None:
            import psutil

            self.first_step_after = time.time() - psutil.Process().create_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        self.path.write_text(json.dumps({"steps": self.rows, "gpu_peak_bytes": gpu_peak,
                                         "first_step_after": self.first_step_after}))


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
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                             disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    timing = Timing(out / "timing.json")
    Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
            callbacks=[timing]).train()
    model.save_pretrained(out / "adapter")


def worker_lora(base: str, train: Path, out: Path) -> None:
    from lora_cli import startup

    startup.command_process = True  # start as the `lora` command does, before any heavy import
    startup.leave_out_bitsandbytes(base, None, None)
    from lora_cli import train as training
    from lora_cli.config import build_config

    cfg = build_config(None, {"model.name": base, "data.path": str(train),
                              "lora.r": HYPER["r"], "lora.lora_alpha": HYPER["alpha"],
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


def matmul_rate(dtype_name: str = "bf16", seconds: float = 3.0) -> tuple[float, str]:
    """The rate of one large matmul on the device the benchmark trains on, and its size."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 2048  # large enough to reach the device's own rate
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # GPU matmuls return before they finish
    for _ in range(3):
        a @ b
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        sync()
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - started), f"{size}x{size}"


# Random-weight LLaMAs for measuring throughput at a size the default model does not reach (on a GPU).
# They use the default model's tokenizer, so the data and the evaluator stay the same.
RANDOM_MODELS = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3,
                     "tie_word_embeddings": True},  # the default model's shape, without its weights
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4},  # TinyLlama-1.1B's shape
    "llama-tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},  # for trying the script itself
}


def build_random_model(preset: str, tokenizer_from: str, folder: Path) -> str:
    """Save a LLaMA of the preset's shape with random (seed 0) weights and the given tokenizer; returns the folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    shape = {"tie_word_embeddings": False, **RANDOM_MODELS[preset]}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def steady_rate(rows: list) -> float:
    first = max(1, len(rows) // 10)
    (t0, n0), (t1, n1) = rows[first], rows[-1]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-train", help="working folder")
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS),
                        help="train a LLaMA of this shape with random weights instead of the default model")
    parser.add_argument("--tokenizer", help="with --random-model: a folder holding the default model's tokenizer, "
                        "for a machine that has not got (and cannot download) the default model itself")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.tokenizer and not ns.random_model:
        parser.error("--tokenizer goes with --random-model")
    if ns.worker:
        kind, *rest = ns.worker
        if kind == "tutorial":
            worker_tutorial(rest[0], Path(rest[1]), Path(rest[2]))
        elif kind == "lora":
            worker_lora(rest[0], Path(rest[1]), Path(rest[2]))
        else:
            worker_heldout_loss(rest[0], Path(rest[1]), Path(rest[2]), Path(rest[3]))
        return

    import torch

    from lora_cli.default_model import ensure_default_model

    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = ns.tokenizer or str(ensure_default_model())
    if ns.random_model:
        base = build_random_model(ns.random_model, base, out / f"random-{ns.random_model}")
    train, test = make_data(out)
    on_gpu = torch.cuda.is_available()
    rates = {name: matmul_rate(name) for name in (("bf16",) if on_gpu else ("bf16", "fp32"))}
    fastest = max(rates, key=lambda name: rates[name][0])
    matmul, matmul_size = rates[fastest]
    from lora_cli import estimate

    # the estimate counts the model on the meta device (tied weights once): nothing is loaded
    n_params = estimate.estimate(estimate.load_model_config(base), r=HYPER["r"],
                                 target_modules=",".join(HYPER["targets"]))["base_params"]
    results = {}
    for name in ("tutorial", "lora"):
        folder = out / name
        folder.mkdir(exist_ok=True)
        wall, rss = run_worker(name, base, str(train), str(folder))
        timing = json.loads((folder / "timing.json").read_text())
        rate = steady_rate(timing["steps"])
        run_worker("loss", base, str(folder / "adapter"), str(test), str(folder / "loss.json"))
        loss = json.loads((folder / "loss.json").read_text())["loss"]
        peak = timing["gpu_peak_bytes"] if on_gpu else rss
        results[name] = {"tok_s": rate, "wall_s": wall, "first_step_s": timing["first_step_after"],
                         "peak_memory_gb": peak / 1e9, "heldout_loss": loss,
                         "flops_share": 4 * n_params * rate / matmul}
    a, b = results["tutorial"], results["lora"]
    device = torch.cuda.get_device_name() if on_gpu else f"{os.cpu_count()} CPU cores"
    memory = "peak GPU memory allocated (GB)" if on_gpu else "peak RSS (GB)"
    measured = ", ".join(f"{name} {rate / 1e12:.2f}" for name, (rate, _) in rates.items())
    print(f"\nMachine: {device}, torch {torch.__version__}, matmul TFLOP/s ({matmul_size}, measured now): {measured}; "
          f"model {Path(base).name}, {n_params:,} parameters\n")
    print(f"| recipe | real tok/s (steady) | wall time (s) | first step after (s) | {memory} | held-out loss "
          f"| share of the {fastest} matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("tutorial", "tutorial: fp32, pad to max length"), ("lora", "`lora train` defaults")):
        r = results[name]
        print(f"| {label} | {r['tok_s']:.0f} | {r['wall_s']:.0f} | {r['first_step_s']:.1f} | {r['peak_memory_gb']:.2f} "
              f"| {r['heldout_loss']:.3f} | {100 * r['flops_share']:.0f}% |")
    print(f"| ratio lora / tutorial | {b['tok_s'] / a['tok_s']:.2f}x | {a['wall_s'] / b['wall_s']:.2f}x faster "
          f"| {a['first_step_s'] / b['first_step_s']:.2f}x sooner | {b['peak_memory_gb'] / a['peak_memory_gb']:.2f}x | | |")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
