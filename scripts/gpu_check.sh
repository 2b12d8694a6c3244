#!/usr/bin/env bash
# The CUDA measurements, in one command, on a GPU machine that has PyTorch but cannot reach the network.
#
#   bash scripts/gpu_check.sh --prepare   # on a machine with network: wheels into .gpu/whl and the
#                                         # default model's tokenizer into .gpu/tokenizer (59 MB in all)
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root, with .gpu beside it
#
# What it runs there (about 5 minutes on one H200), writing logs into $OUT (or gpu-check/):
# 1. scripts/bench_train.py, tutorial recipe against `lora train`, on random-weight LLaMAs of the
#    default model's shape and of TinyLlama-1.1B's shape: tokens/s, wall time, peak GPU memory and model
#    FLOP utilisation against the bf16 matmul rate it measures. (Random weights train at the speed the
#    real ones would; only the held-out losses mean nothing here.)
# 2. `lora train` in bf16 and with --use-4bit (QLoRA, NF4 on CUDA) on the 1.1B shape, 40 steps each:
#    tokens/s and peak GPU memory next to `lora estimate --device cuda` for the same setup.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    # the pins of requirements.txt for what the GPU machine's image lacks or holds in another version
    pins=$(grep -E '^(transformers|peft|datasets|bitsandbytes)==' requirements.txt)
    mkdir -p .gpu/whl .gpu/tokenizer
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
    # the GPU machine's python3 is CPython 3.12 (multiprocess ships one wheel per Python version)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl $pins dill==0.4.1 multiprocess==0.70.19
    model=$(.venv/bin/python -c "from lora_cli.default_model import ensure_default_model; print(ensure_default_model())")
    cp "$model"/tokenizer.json "$model"/tokenizer_config.json "$model"/chat_template.jinja .gpu/tokenizer/
    du -sh .gpu
    echo "Now, on the GPU machine: bash scripts/gpu_check.sh   (carry .gpu)"
    exit 0
fi

out="${OUT:-gpu-check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    LORA_CACHE_DIR=/tmp/lora-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"

for model in smollm2-135m llama-1b; do
    python3 scripts/bench_train.py --random-model "$model" --tokenizer .gpu/tokenizer --out "/tmp/bench-$model" \
        > "$out/bench-$model.log" 2>&1 || { tail -30 "$out/bench-$model.log"; exit 1; }
    grep -E '^\||^Machine' "$out/bench-$model.log" || true
done

python3 - <<'EOF' 2>&1 | tee "$out/train-1b.log" | { grep -E '^\{|Error|error' || true; }
import gc
import json
import torch
from lora_cli import estimate
from lora_cli import train as training
from lora_cli.config import build_config

base, data = "/tmp/bench-llama-1b/random-llama-1b", "/tmp/bench-llama-1b/bench_train.jsonl"
for use_4bit in (False, True):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = build_config(None, {"model.name": base, "data.path": data, "model.use_4bit": use_4bit,
                              "training.max_steps": 40, "training.per_device_train_batch_size": 4,
                              "data.max_seq_len": 256, "training.save_steps": 10_000,
                              "output_dir": f"/tmp/train-1b-{'4bit' if use_4bit else 'bf16'}", "overwrite": True})
    result = training.run(cfg)
    report = estimate.estimate_run(cfg, estimate.load_model_config(base), compute_dtype="bf16", device="cuda")
    print(json.dumps({"use_4bit": use_4bit, "tokens_per_second": result.manifest["metrics"]["tokens_per_second"],
                      "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                      "estimate_gib": round(report["memory"]["total_bytes"] / 2**30, 2)}))
    print(estimate.format_estimate(report))
    del result
EOF
