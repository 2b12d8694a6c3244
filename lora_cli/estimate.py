"""`lora estimate`: parameter counts and a training-memory breakdown from a model config alone.

The model is built on the meta device (nothing allocated), wrapped with PEFT's LoRA exactly as
training would, and counted the way PEFT counts (`get_nb_trainable_parameters`). Memory is then
worked out by arithmetic from the module shapes. Heavy imports stay inside functions.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from lora_cli.errors import ConfigError, ModelError, first_line
from lora_cli.packed_attention import (COMPILED_MAX_SCRATCH_BYTES, EAGER_MAX_TOKENS,  # torch-free at import, like this module
                                      compiled_scratch_bytes, compiled_shape_fits)
from lora_cli.targets import check_present, for_model

CONFIG_DIR = Path(__file__).parent / "assets" / "model_configs"
GPU_SIZES_GB = (8, 12, 16, 24, 40, 80)  # GPU sizes as sold; taken as GiB (an "80GB" card has ~80 GiB)
GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZATIONS = (None, "4bit", "8bit")
# What lora_cli/loss.py uses (it imports torch, this module must not; tests hold the two equal):
# the architectures whose loss runs the output layer a chunk at a time, and a chunk's cells.
CHUNKED_LOSS_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
LOSS_CHUNK_ELEMENTS = 1 << 24
# Overheads (see _overhead): CUDA context + caching-allocator slack; on CPU the resident size of a
# process that has imported torch, transformers, peft and datasets (measured 0.47 GiB), oneDNN's
# bounded kernel cache and the loss's kept chunk buffers (about 0.1 GiB together) + malloc slack.
CUDA_CONTEXT_BYTES, CUDA_ALLOCATOR_SLACK = int(0.75 * GIB), 0.05
CPU_BASELINE_BYTES, CPU_MALLOC_SLACK = int(0.6 * GIB), 0.1
# Which tensor a LLaMA projection reads: projections reading the same tensor share a saved input.
INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
NF4_BLOCK, NESTED_BLOCK = 64, 256
# Per quantized tensor: NF4 code (16 fp32), nested 8-bit code (256 fp32), nested offset (1 fp32).
NF4_TENSOR_CONSTANTS = (16 + 256 + 1) * 4


def shipped_models() -> list[str]:
    """The short names that have a config shipped with lora (no download needed)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _shipped_name(model: str) -> str | None:
    """The shipped config for a short name or for the hub id a short name stands for."""
    from lora_cli.models import SHORT_NAMES  # light module: no torch at import

    by_hub_id = {hub_id.lower(): short for short, hub_id in SHORT_NAMES.items()}
    name = model.lower()
    name = by_hub_id.get(name, name)
    return name if (CONFIG_DIR / f"{name}.json").is_file() else None


def load_model_config(model: str):
    """A transformers config for a short name (or its hub id), a local folder with config.json, or a hub id."""
    from transformers import AutoConfig

    choices = ", ".join(shipped_models())
    shipped = _shipped_name(model)
    if shipped:
        config = AutoConfig.for_model(**json.loads((CONFIG_DIR / f"{shipped}.json").read_text()))
        config.name_or_path = shipped  # names the model in the report
        return config
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"Model folder '{model}' has no config.json; point --model at a transformers "
                             f"model folder or use one of: {choices}.")
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:  # a damaged config.json, or one transformers cannot map
            raise ConfigError(f"Model folder '{model}': its config.json cannot be read ({first_line(exc)}); restore it, "
                              f"or use one of: {choices}.") from None
    if path.is_file():
        raise ConfigError(f"--model {model} is a file; give the model's folder (config.json), a hub id or one of: "
                          f"{choices}.")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"Model folder '{model}' does not exist; give an existing model folder, a hub id "
                         f"or one of: {choices}.")
    from lora_cli.models import check_hub

    check_hub(model, model, None)  # one quick look instead of half a minute of retries
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as exc:  # offline, unknown id, gated repo: one answer for the user
        raise ModelError(
            f"Cannot get a config for model '{model}': it is not a shipped short name or a local folder, and "
            f"the Hugging Face Hub is unreachable or has no such model id ({type(exc).__name__}); use one of "
            f"{choices}, or a local model folder with config.json."
        ) from exc


def _build_peft_model(config, r, lora_alpha, targets, use_dora, lora_dropout, dtype):
    import logging
    import warnings

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lora_cli.models import linear_module_names

    quiet = logging.getLogger("bitsandbytes")  # peft imports bitsandbytes, which warns about CPU kernels
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from peft import LoraConfig, get_peft_model
    finally:
        quiet.setLevel(level)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    # torch.device("meta") on top of init_empty_weights makes transformers skip weight init and makes
    # PEFT create the adapters on meta too: ~1 s for a 70B model, nothing allocated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch_dtype)
        model.tie_weights()  # under init_empty_weights tied embeddings stay untied; count them once
        # presets follow the model as lora train makes them (fused q/k/v, gate/up)
        available = linear_module_names(model)
        targets, _ = for_model(targets, available)
        check_present(targets, available)
        with torch.device("meta"):
            counts = _count(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, use_dora=use_dora,
                                              lora_dropout=lora_dropout, task_type="CAUSAL_LM"), get_peft_model)
        return (*counts, targets)


def _count(model, lora_config, get_peft_model):
    """Base parameters, quantizable linears, LoRA-wrapped modules and PEFT's (trainable, all) counts."""
    import torch

    base_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    linears = [(name, m.in_features, m.out_features, m.bias is not None)
               for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head"]
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError:
        names = ",".join(sorted(lora_config.target_modules))
        available = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, *_ in linears}))
        raise ConfigError(f"--target-modules {names} match no layer of this model; it has: {available}.") from None
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted = [(name.removeprefix("base_model.model."), m.in_features, m.out_features)
               for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]
    return base_params, linears, adapted, int(trainable), int(total)


def _weights_bytes(base_params: int, linears, quantization, p: int) -> int:
    """Frozen base weights: all in compute dtype, or every nn.Linear but lm_head quantized.

    Quantized, the rest (embeddings, norms, lm_head) is fp32: `lora train` calls PEFT's
    prepare_model_for_kbit_training, which upcasts every non-quantized parameter to fp32.
    """
    if quantization is None:
        return base_params * p
    total, quantized = 0, 0
    for _name, fan_in, fan_out, _bias in linears:
        n = fan_in * fan_out
        quantized += n
        if quantization == "4bit":  # NF4 4 bits/param; absmax per 64 as uint8 (double quant) + fp32 per 256 blocks
            blocks = math.ceil(n / NF4_BLOCK)
            total += math.ceil(n / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NF4_TENSOR_CONSTANTS
        else:  # LLM.int8: int8 weight + one fp32 scale per output row
            total += n + fan_out * 4
    return total + (base_params - quantized) * 4


def _activation_parts(shape, adapted, *, batch, seq, p, r, quantization, use_dora, lora_dropout, packing,
                      checkpointing, cpu, chunked_loss, fused=False, compiled=False,
                      compiled_attention=False) -> dict:
    """Peak activation memory of one training step of a LLaMA decoder with SDPA attention, as `lora train` runs it.

    Formula: the tensors autograd saves in transformers' LlamaDecoderLayer, counted one by one and
    checked against `torch.autograd.graph.saved_tensors_hooks` and a measured peak on SmolLM2 (to
    ~3%). It follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models" (per layer s*b*h*(34 + 5*a*s/h) bytes for GPT), redone for LLaMA: SwiGLU,
    RMSNorm, SDPA (no s*s scores kept, unlike eager attention) and frozen weights (a frozen linear
    keeps no input, a LoRA linear does). Per token and layer, p = bytes of the compute dtype:
      RMSNorm x2: its fp32 copy of the input, 2*h*4 | attention: q, k, v (the mask makes SDPA repeat
      k/v to all heads), output 4*h*p; logsumexp a*4; the additive mask row, s*p (packing: one
      row of b*s tokens, so b*s*p); on a CPU with packing `lora train` attends within each example
      instead (lora_cli/packed_attention.py): no mask, but examples of up to 256 tokens keep their
      softmax output (compute dtype), a*min(s, 256)*p at most; through the compiled kernel
      (`compiled_attention`) nothing but the output and the log-sum-exp, counted above | SwiGLU: gate, silu, up
      outputs 3*I*p; gate and up, 2*I*p, through the compiled kernel (`compiled`, lora_cli/cpu_kernels.py)
      LoRA, per adapted module: its input (under bf16/fp16 autocast a fresh p-byte copy per module;
      in fp32 one shared fp32 tensor) + lora_A output r*4; dropout adds its fp32 output (fp32 runs)
      and its mask (bool on CUDA, an fp32 noise tensor on CPU); DoRA adds base and LoRA outputs.
      8-bit base linears keep their input (bitsandbytes MatMul8bitLt); 4-bit ones keep none.
    Logits: in fp32 the log-softmax output, its gradient and the logits' gradient: T*V*12, the
    peak at the start of the backward pass. With `lora train`'s chunked loss only one chunk of rows
    exists at a time (logits p, log-probabilities 4, probabilities p bytes a cell) plus the saved
    gradient of the hidden states, T*h*p. Plus one layer's worth for the backward pass itself.
    `fused` (lora_cli/fused_layers.py, bf16 on a CPU): each RMSNorm keeps its normalized input in the
    compute dtype and one fp32 scale a token, h*p + 4, and plain LoRA layers (no dropout, no DoRA) keep
    the input they share with their neighbours, p bytes, once a layer and group, as in fp32.
    Gradient checkpointing keeps only each layer's input, T*h (fp32 when quantized: the upcast
    embeddings make the residual stream fp32), and recomputes one layer at a time.
    """
    h, inter, heads, layers = shape["hidden_size"], shape["intermediate_size"], shape["heads"], shape["layers"]
    attn = heads * shape["head_dim"]
    tokens = batch * seq
    mask_row = tokens if packing else seq
    attention = heads * min(seq, EAGER_MAX_TOKENS) * p if cpu and packing else mask_row * p
    if cpu and packing and compiled_attention:
        attention = 0
    norm = h * p + 4 if fused and p != 4 else h * 4
    base = 2 * norm + 4 * 4 + 4 * attn * p + heads * 4 + attention + (2 if compiled else 3) * inter * p
    shared_inputs = p == 4 or (fused and lora_dropout == 0 and not use_dora)
    mask_bytes = 4 if cpu else 1
    extra: dict[str, int] = {}
    kept: set[tuple[str, str]] = set()  # (layer, tensor) an fp32 run already keeps: shared inputs count once
    dora_peak = 0
    for name, fan_in, fan_out in adapted:
        parts = name.split(".")
        layer = ".".join(parts[:-2]) if "layers" in parts else "outside"
        group = INPUT_GROUP.get(parts[-1], name)
        add = r * 4
        if not shared_inputs:
            add += fan_in * p
        elif lora_dropout > 0 or (layer, group) not in kept:
            kept.add((layer, group))
            add += fan_in * p
        if lora_dropout > 0:
            add += fan_in * mask_bytes
        if use_dora:
            add += fan_out * (p + 4)
            dora_peak = max(dora_peak, fan_in * fan_out * 8)  # weight + B@A in fp32, one module at a time
        extra[layer] = extra.get(layer, 0) + add
    if quantization == "8bit":  # norm outputs are fp32 (upcast norms), attention and MLP products are p
        width = {"attn_in": (h, 4), "o_in": (attn, p), "mlp_in": (h, 4), "down_in": (inter, p)}
        for i in range(layers):
            layer = f"model.layers.{i}"
            extra[layer] = extra.get(layer, 0) + sum(w * b for g, (w, b) in width.items() if (layer, g) not in kept)
    in_layers = [v for k, v in extra.items() if k != "outside"]
    one_layer = tokens * (base + max(in_layers, default=0))
    shared = tokens * (norm + mask_row + extra.get("outside", 0))  # final norm input, bool mask, non-layer LoRA
    if checkpointing:
        kept_layers = layers * tokens * h * (4 if quantization else p) + one_layer
    else:
        kept_layers = tokens * (layers * base + sum(in_layers))
    vocab = shape["vocab_size"]
    if chunked_loss:
        logits = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // vocab)) * vocab * (2 * p + 4) + tokens * h * p
    else:
        logits = tokens * vocab * 12
    return {"layers": kept_layers + shared, "logits": logits, "backward": one_layer + dora_peak}


def _model_shape(config) -> dict:
    heads = config.num_attention_heads
    return {
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
    }


def _overhead(kind: str, activations: int) -> int:
    """CUDA: context + caching-allocator slack. CPU: process baseline + what glibc malloc keeps resident.

    On CPU, some freed activation memory stays in the process (glibc's heap fragments and keeps
    it): peak RSS runs about 10% of the activations above the live peak (measured on SmolLM2; with
    oneDNN's shape caches bounded, see lora_cli/cpu.py, it no longer grows with the steps).
    """
    if kind == "cpu":
        return CPU_BASELINE_BYTES + int(CPU_MALLOC_SLACK * activations)
    return CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * activations)


def estimate(model_config, *, r: int = 8, lora_alpha: int = 16, target_modules: str | list[str] = "all-linear",
             quantization: str | None = None, use_dora: bool = False, batch_size: int = 4,
             max_seq_len: int = 512, gradient_checkpointing: bool = False, compute_dtype: str = "bf16",
             device: str = "cuda", lora_dropout: float = 0.05, packing: bool = True,
             chunked_loss: bool | None = None, model: str | None = None, int8_backward: bool = False,
             packed_weights: bool = False, fused_layers: bool = False,
             compiled_kernels: bool = False) -> dict:
    """Parameter counts and peak training memory of `lora train` for LoRA/QLoRA on a transformers config.

    `lora_dropout` and `packing` default to `lora train`'s defaults; bf16/fp16 compute is taken to
    run under autocast (as `lora train` does), fp32 without. `chunked_loss`: whether the loss runs
    the output layer in chunks (None: as `lora train` decides for this architecture, unsharded).
    `model` names the model in the report. `int8_backward`: an int8 copy of each frozen projection
    (and a scale per input feature) for the input gradients (lora_cli/int8_backward.py). `packed_weights`:
    two copies of each frozen bf16 projection (and of the output layer, with the chunked loss) in oneDNN's
    layout, for bf16 on a CPU (lora_cli/packed_weights.py).
    `fused_layers`: RMSNorm and LoRA as lora_cli/fused_layers.py runs them (bf16 on a CPU), and with
    `compiled_kernels` (they build on this machine) SwiGLU and packed rows' attention through lora_cli/cpu_kernels.py.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"Quantization must be 4bit, 8bit or none, not '{quantization}'.")
    if compute_dtype not in DTYPE_BYTES:
        raise ConfigError(f"Compute dtype must be one of {', '.join(DTYPE_BYTES)}, not '{compute_dtype}'.")
    if r < 1 or batch_size < 1 or max_seq_len < 1:
        raise ConfigError("LoRA rank, batch size and sequence length must all be at least 1.")
    kind = "cpu" if str(device).startswith("cpu") else "cuda"
    shape = _model_shape(model_config)
    p = DTYPE_BYTES[compute_dtype]
    if chunked_loss is None:
        chunked_loss = getattr(model_config, "model_type", None) in CHUNKED_LOSS_MODEL_TYPES
    base_params, linears, adapted, trainable, total, targets = _build_peft_model(
        model_config, r, lora_alpha, target_modules, use_dora, lora_dropout, compute_dtype)

    silu = getattr(model_config, "hidden_act", None) in ("silu", "swish")  # the compiled kernel's SwiGLU
    # the compiled attention (lora_cli/packed_attention.py): bf16, heads it takes, scratch under the cap
    compiled_attention = (fused_layers and compiled_kernels and p == 2
                          and compiled_shape_fits(shape["heads"], shape["kv_heads"], shape["head_dim"])
                          and compiled_scratch_bytes(shape["heads"], [max_seq_len] * batch_size)
                          <= COMPILED_MAX_SCRATCH_BYTES)

    def activations(batch: int, checkpointing: bool = gradient_checkpointing, cpu: bool = kind == "cpu") -> int:
        return sum(_activation_parts(shape, adapted, batch=batch, seq=max_seq_len, p=p, r=r, quantization=quantization,
                                     use_dora=use_dora, lora_dropout=lora_dropout, packing=packing,
                                     checkpointing=checkpointing, cpu=cpu, chunked_loss=chunked_loss,
                                     fused=fused_layers and cpu,
                                     compiled=fused_layers and cpu and compiled_kernels and silu,
                                     compiled_attention=compiled_attention).values())

    act_ckpt, act_full = activations(batch_size, True), activations(batch_size, False)
    memory = {
        "weights_bytes": _weights_bytes(base_params, linears, quantization, p)
        + (sum(fan_in * fan_out + fan_in * 4 for _name, fan_in, fan_out, _bias in linears) if int8_backward else 0)
        + (2 * sum(fan_in * fan_out * 2 for _name, fan_in, fan_out, _bias in linears) if packed_weights else 0)
        # and the output layer's, for the chunked loss
        + (2 * shape["vocab_size"] * shape["hidden_size"] * 2 if packed_weights and chunked_loss else 0),
        "lora_bytes": trainable * 4,
        "gradients_bytes": trainable * 4,
        "optimizer_bytes": trainable * 8,
        "activations_bytes": act_ckpt if gradient_checkpointing else act_full,
    }
    memory["overhead_bytes"] = _overhead(kind, memory["activations_bytes"])
    memory["total_bytes"] = sum(memory.values())
    fixed = sum(memory[k] for k in ("weights_bytes", "lora_bytes", "gradients_bytes", "optimizer_bytes"))

    def fits_on(gpu_gb: int, batch: int) -> bool:  # the GPU table always assumes CUDA, whatever `device` is
        act = activations(batch, cpu=False)
        return fixed + act + _overhead("cuda", act) <= gpu_gb * GIB

    fits = []
    for gb in GPU_SIZES_GB:
        lo, hi = 0, 1  # memory grows with the batch: double to an upper bound, then bisect
        while fits_on(gb, hi) and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits_on(gb, mid) else (lo, mid)
        fits.append({"gpu_gb": gb, "fits": fits_on(gb, batch_size), "max_batch_size": lo})
    return {
        "model": model or getattr(model_config, "name_or_path", "") or shape["architecture"],
        **shape,
        "r": r, "lora_alpha": lora_alpha, "target_modules": targets, "use_dora": bool(use_dora),
        "lora_dropout": float(lora_dropout), "quantization": quantization, "batch_size": batch_size,
        "max_seq_len": max_seq_len, "packing": bool(packing), "gradient_checkpointing": bool(gradient_checkpointing),
        "compute_dtype": compute_dtype, "device": kind, "int8_backward": bool(int8_backward),
        "packed_weights": bool(packed_weights), "fused_layers": bool(fused_layers),
        "compiled_kernels": bool(fused_layers and compiled_kernels),
        "base_params": base_params, "total_params": total, "trainable_params": trainable,
        "trainable_share": trainable / total,
        "memory": memory,
        "activations_bytes_with_checkpointing": act_ckpt,
        "activations_bytes_without_checkpointing": act_full,
        "fits": fits,
    }


def format_estimate(report: dict) -> str:
    """A compact plain-text breakdown for the terminal (GiB = 2**30 bytes)."""
    m = report["memory"]
    base = {None: f"{report['compute_dtype']}", "4bit": "NF4 + double quant",
            "8bit": "int8"}[report["quantization"]]
    base += " + 2 packed copies" if report.get("packed_weights") else ""
    ckpt = "with" if report["gradient_checkpointing"] else "no"
    overhead = "CUDA context + allocator" if report["device"] == "cuda" else "process + malloc slack"
    rows = [(f"base weights, frozen ({base})", m["weights_bytes"]), ("LoRA adapters (fp32)", m["lora_bytes"]),
            ("gradients (fp32)", m["gradients_bytes"]), ("optimizer, AdamW (2 x fp32)", m["optimizer_bytes"]),
            (f"activations ({ckpt} checkpointing)", m["activations_bytes"]), (f"overhead ({overhead})",
                                                                            m["overhead_bytes"])]
    lines = [
        f"Model       {report['model']}: {report['architecture']}, {report['layers']} layers, "
        f"hidden {report['hidden_size']}, vocab {report['vocab_size']:,}",
        f"Adapter     {'DoRA' if report['use_dora'] else 'LoRA'} r={report['r']} alpha={report['lora_alpha']} "
        f"on {','.join(report['target_modules'])}",
        f"Parameters  {report['total_params']:,} total, {report['trainable_params']:,} trainable "
        f"({report['trainable_share'] * 100:.4f}%)",
        "",
        f"Training memory on {report['device']}: batch {report['batch_size']} x {report['max_seq_len']} tokens, "
        f"{report['compute_dtype']}{', packed' if report['packing'] else ''}",
    ]
    lines += [f"  {label:<44}{size / GIB:>8.2f} GiB" for label, size in rows]
    lines += [f"  {'total':<44}{m['total_bytes'] / GIB:>8.2f} GiB",
              f"  activations without / with gradient checkpointing: "
              f"{report['activations_bytes_without_checkpointing'] / GIB:.2f} / "
              f"{report['activations_bytes_with_checkpointing'] / GIB:.2f} GiB",
              "", "  GPU     fits   largest batch (CUDA)"]
    lines += [f"  {row['gpu_gb']:>2} GB   {'yes' if row['fits'] else 'no':<5}  {row['max_batch_size']:>6}"
              for row in report["fits"]]
    return "\n".join(lines)


def estimate_run(cfg: Any, model_config: Any, *, compute_dtype: str, device: str, model: str | None = None,
                 max_seq_len: int | None = None, packed_weights: bool | None = None) -> dict:
    """The estimate for a `lora train` configuration: the one place its options become estimate() arguments.
    `max_seq_len` replaces --max-seq-len where the data is known to be shorter. `packed_weights`: None counts
    them where they apply (`lora train` leaves them out where they would not leave room, train.check_memory)."""
    from lora_cli import cpu_kernels, fused_layers
    from lora_cli import packed_weights as packed
    from lora_cli.models import resolve_int8_backward, sharded_engine

    int8_backward = resolve_int8_backward(cfg.model.int8_backward, compute_dtype, cfg.model.quantization, device)
    fused = fused_layers.applies(compute_dtype, cfg.model.quantization, device)
    return estimate(model_config, r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, target_modules=cfg.lora.target_modules,
                    quantization=cfg.model.quantization, use_dora=cfg.lora.use_dora,
                    batch_size=cfg.training.per_device_train_batch_size, max_seq_len=max_seq_len or cfg.data.max_seq_len,
                    gradient_checkpointing=cfg.training.gradient_checkpointing, compute_dtype=compute_dtype,
                    device=device, lora_dropout=cfg.lora.lora_dropout, packing=cfg.data.packing,
                    chunked_loss=False if sharded_engine() else None, model=model or cfg.model.name,
                    int8_backward=int8_backward,
                    packed_weights=packed.applies(compute_dtype, cfg.model.quantization, device)
                    if packed_weights is None else packed_weights,
                    fused_layers=fused, compiled_kernels=fused and cpu_kernels.available())
