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

from lora_cli.errors import ConfigError, ModelError
from lora_cli.targets import expand_target_modules

CONFIG_DIR = Path(__file__).parent / "assets" / "model_configs"
GPU_SIZES_GB = (8, 12, 16, 24, 40, 80)  # GPU sizes as sold; taken as GiB (an "80GB" card has ~80 GiB)
GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZATIONS = (None, "4bit", "8bit")
# CUDA context + caching-allocator slack; on CPU the resident size of a process that has imported
# torch, transformers, peft and datasets (measured ~0.47 GiB) plus tokenizer/data and malloc slack.
OVERHEAD_BYTES = {"cuda": int(0.75 * GIB), "cpu": int(0.6 * GIB)}
# Which tensor a LLaMA projection reads: projections reading the same tensor share a saved input.
INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
NF4_BLOCK, NESTED_BLOCK = 64, 256
# Per quantized tensor: NF4 code (16 fp32), nested 8-bit code (256 fp32), nested offset (1 fp32).
NF4_TENSOR_CONSTANTS = (16 + 256 + 1) * 4


def shipped_models() -> list[str]:
    """The short names that have a config shipped with lora (no download needed)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(model: str):
    """A transformers config for a short name, a local folder with config.json, or a hub id."""
    from transformers import AutoConfig

    shipped = CONFIG_DIR / f"{model}.json"
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(**data)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"Model folder '{model}' has no config.json; point --model at a "
                             f"Hugging Face model folder or use one of: {', '.join(shipped_models())}.")
        return AutoConfig.from_pretrained(str(path))
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as exc:  # offline, unknown id, gated repo, bad path: one answer for the user
        raise ModelError(
            f"Cannot get a config for model '{model}': it is not a shipped short name, not a local folder "
            f"with config.json, and the Hugging Face Hub is unreachable or has no such model id "
            f"({type(exc).__name__}); use one of {', '.join(shipped_models())} or a local model folder."
        ) from exc


def _build_peft_model(config, r, lora_alpha, targets, use_dora, lora_dropout, dtype):
    import logging
    import warnings

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

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
        with torch.device("meta"):
            return _count(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, use_dora=use_dora,
                                            lora_dropout=lora_dropout, task_type="CAUSAL_LM"), get_peft_model)


def _count(model, lora_config, get_peft_model):
    """Base parameters, quantizable linears, LoRA-wrapped modules and PEFT's (trainable, all) counts."""
    import torch

    base_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    linears = [(name, m.in_features, m.out_features, m.bias is not None)
               for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head"]
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        names = ",".join(sorted(lora_config.target_modules))
        raise ConfigError(f"Target modules {names} do not fit this model: {exc}") from exc
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted = [(name.removeprefix("base_model.model."), m.in_features, m.out_features)
               for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]
    return base_params, linears, adapted, int(trainable), int(total)


def _weights_bytes(base_params: int, linears, quantization, p: int) -> int:
    """Frozen base weights. Quantized: every nn.Linear but lm_head; the rest stays in compute dtype."""
    if quantization is None:
        return base_params * p
    total, quantized = 0, 0
    for _name, fan_in, fan_out, bias in linears:
        n = fan_in * fan_out
        quantized += n
        total += fan_out * p if bias else 0
        if quantization == "4bit":  # NF4 4 bits/param; absmax per 64 as uint8 (double quant) + fp32 per 256 blocks
            blocks = math.ceil(n / NF4_BLOCK)
            total += math.ceil(n / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NF4_TENSOR_CONSTANTS
        else:  # LLM.int8: int8 weight + one fp32 scale per output row
            total += n + fan_out * 4
    return total + (base_params - quantized) * p


def _activation_bytes(shape, adapted, *, batch, seq, p, quantization, use_dora, lora_dropout, r,
                      checkpointing: bool, cpu: bool = False) -> dict:
    """Peak saved-for-backward memory of one training step for a LLaMA decoder (SDPA attention).

    Counted from the tensors autograd saves in transformers' LlamaDecoderLayer (checked against
    `torch.autograd.graph.saved_tensors_hooks` on a small model), in the spirit of Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (s*b*h*(34+5as/h)),
    adapted to LLaMA: SwiGLU MLP, RMSNorm, SDPA (no s^2 scores, unlike eager attention), frozen
    weights (a frozen linear keeps no input; a LoRA linear does). Per token and layer, p = compute bytes:
      2 RMSNorms: fp32 copy of their input, 2*h*4        | attention: q, k, v, out, 4*h*p (padded
      batches carry a mask, so k/v are repeated to all heads) + logsumexp a*4 + mask s*p
      MLP: gate out, silu out, up out, 3*I*p             | LoRA: input in fp32 (adapters are fp32,
      so PEFT casts it: one copy per module unless p is fp32), lora_A out r*4; dropout adds an
      fp32 output + bool mask per module; DoRA keeps base and LoRA outputs, out*(p+4)
      8-bit base linears keep their input (bitsandbytes MatMul8bitLt); 4-bit ones do not.
    Logits: lm_head output in compute dtype plus, in fp32, the log-softmax output, its gradient
    and the logits gradient: T*V*(p+12). Plus one layer's worth for the backward pass' gradients.
    With gradient checkpointing only each layer's input (T*h*p) is kept and one layer is recomputed.
    """
    h, inter, heads, head_dim = shape["hidden_size"], shape["intermediate_size"], shape["heads"], shape["head_dim"]
    layers, vocab = shape["layers"], shape["vocab_size"]
    tokens = batch * seq
    attn_width = heads * head_dim
    width = {"attn_in": h, "o_in": attn_width, "mlp_in": h, "down_in": inter}
    base = (2 * h * 4 + 2 * 2 * 4  # RMSNorm fp32 inputs + rsqrt terms
            + 4 * attn_width * p + heads * 4 + seq * p  # q, k, v, out, logsumexp, mask row
            + 3 * inter * p)  # SwiGLU
    extra_by_layer: dict[str, int] = {}
    kept: set[tuple[str, str]] = set()  # (layer, tensor) already kept: shared inputs count once
    dora_peak = 0
    for name, fan_in, fan_out in adapted:
        parts = name.split(".")
        layer = ".".join(parts[:-2]) if "layers" in parts else "outside"
        group = INPUT_GROUP.get(parts[-1], name)
        add = r * 4
        if lora_dropout > 0:  # dropout output in fp32 + its mask (bool on CUDA, an fp32 noise tensor on CPU)
            add += fan_in * (8 if cpu else 5)
        elif p != 4:
            add += fan_in * 4
        elif (layer, group) not in kept:
            kept.add((layer, group))
            add += fan_in * 4
        if use_dora:
            add += fan_out * (p + 4)
            dora_peak = max(dora_peak, fan_in * fan_out * 8)  # weight + BA in fp32, one module at a time
        extra_by_layer[layer] = extra_by_layer.get(layer, 0) + add
    if quantization == "8bit":
        for layer_idx in range(layers):
            layer = f"model.layers.{layer_idx}"
            missing = sum(w * p for group, w in width.items() if (layer, group) not in kept)
            extra_by_layer[layer] = extra_by_layer.get(layer, 0) + missing
    in_layers = {k: v for k, v in extra_by_layer.items() if k != "outside"}
    per_layer_extra = max(in_layers.values(), default=0)
    outside = extra_by_layer.get("outside", 0)
    one_layer = tokens * (base + per_layer_extra)
    logits = tokens * vocab * (p + 12)
    final_norm = tokens * h * 4
    if checkpointing:
        kept_layers = layers * tokens * h * p + one_layer
    else:
        kept_layers = tokens * (layers * base + sum(in_layers.values()))
    return {"layers": kept_layers + tokens * outside + final_norm, "logits": logits,
            "backward": one_layer + dora_peak}


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


def estimate(model_config, *, r: int = 8, lora_alpha: int = 16, target_modules: str | list[str] = "all-linear",
             quantization: str | None = None, use_dora: bool = False, batch_size: int = 4,
             max_seq_len: int = 512, gradient_checkpointing: bool = False, compute_dtype: str = "bf16",
             device: str = "cuda", lora_dropout: float = 0.0, model: str | None = None) -> dict:
    """Parameter counts and peak training memory for LoRA/QLoRA on `model_config` (a transformers config)."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"Quantization must be 4bit, 8bit or none, not '{quantization}'.")
    if compute_dtype not in DTYPE_BYTES:
        raise ConfigError(f"Compute dtype must be one of {', '.join(DTYPE_BYTES)}, not '{compute_dtype}'.")
    if r < 1 or batch_size < 1 or max_seq_len < 1:
        raise ConfigError("LoRA rank, batch size and sequence length must all be at least 1.")
    kind = "cpu" if str(device).startswith("cpu") else "cuda"
    targets = expand_target_modules(target_modules)
    shape = _model_shape(model_config)
    p = DTYPE_BYTES[compute_dtype]
    base_params, linears, adapted, trainable, total = _build_peft_model(
        model_config, r, lora_alpha, targets, use_dora, lora_dropout, compute_dtype)

    def activations(batch: int, checkpointing: bool) -> int:
        return sum(_activation_bytes(shape, adapted, batch=batch, seq=max_seq_len, p=p, quantization=quantization,
                                     use_dora=use_dora, lora_dropout=lora_dropout,
                                     r=r, checkpointing=checkpointing, cpu=kind == "cpu").values())

    act_ckpt, act_full = activations(batch_size, True), activations(batch_size, False)
    memory = {
        "weights_bytes": _weights_bytes(base_params, linears, quantization, p),
        "lora_bytes": trainable * 4,
        "gradients_bytes": trainable * 4,
        "optimizer_bytes": trainable * 8,
        "activations_bytes": act_ckpt if gradient_checkpointing else act_full,
        "overhead_bytes": OVERHEAD_BYTES[kind],
    }
    memory["total_bytes"] = sum(memory.values())
    # Activations are linear in the batch, so the largest batch that fits has a closed form.
    # The GPU table always assumes CUDA (its context and allocator overhead), whatever `device` is.
    act_one = activations(1, gradient_checkpointing)
    act_zero = 2 * act_one - activations(2, gradient_checkpointing)  # batch-independent part
    per_sample = act_one - act_zero
    fixed = memory["total_bytes"] - memory["activations_bytes"] - memory["overhead_bytes"] + OVERHEAD_BYTES["cuda"]
    fits = []
    for gb in GPU_SIZES_GB:
        room = gb * GIB - fixed - act_zero
        max_batch = max(0, room // per_sample) if per_sample > 0 else 0
        fits.append({"gpu_gb": gb, "fits": bool(fixed + act_zero + per_sample * batch_size <= gb * GIB),
                     "max_batch_size": int(max_batch)})
    return {
        "model": model or getattr(model_config, "name_or_path", "") or shape["architecture"],
        **{k: v for k, v in shape.items()},
        "r": r, "lora_alpha": lora_alpha, "target_modules": targets, "use_dora": bool(use_dora),
        "lora_dropout": float(lora_dropout), "quantization": quantization, "batch_size": batch_size,
        "max_seq_len": max_seq_len, "gradient_checkpointing": bool(gradient_checkpointing),
        "compute_dtype": compute_dtype, "device": kind,
        "base_params": base_params, "total_params": total, "trainable_params": trainable,
        "trainable_share": trainable / total,
        "memory": memory,
        "activations_bytes_with_checkpointing": act_ckpt,
        "activations_bytes_without_checkpointing": act_full,
        "fits": fits,
    }


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_estimate(report: dict) -> str:
    """A compact plain-text breakdown for the terminal (GiB = 2**30 bytes)."""
    m = report["memory"]
    quant = {None: f"{report['compute_dtype']} weights", "4bit": "4-bit NF4 (double quant)",
             "8bit": "8-bit LLM.int8"}[report["quantization"]]
    act_note = "with" if report["gradient_checkpointing"] else "without"
    other = report["activations_bytes_without_checkpointing" if report["gradient_checkpointing"]
                   else "activations_bytes_with_checkpointing"]
    lines = [
        f"Model        {report['model']} ({report['architecture']}, {report['layers']} layers, "
        f"hidden {report['hidden_size']}, vocab {report['vocab_size']})",
        f"LoRA         r={report['r']}, alpha={report['lora_alpha']}, {'DoRA, ' if report['use_dora'] else ''}"
        f"targets {','.join(report['target_modules'])}; base {quant}",
        f"Parameters   total {report['total_params']:,}   trainable {report['trainable_params']:,} "
        f"({report['trainable_share'] * 100:.4f}%)",
        "",
        f"Memory on {report['device']}, batch {report['batch_size']} x {report['max_seq_len']} tokens, "
        f"{report['compute_dtype']} activations          GiB",
        f"  base weights (frozen)                     {_gib(m['weights_bytes'])}",
        f"  LoRA adapters (fp32)                      {_gib(m['lora_bytes'])}",
        f"  gradients (fp32)                          {_gib(m['gradients_bytes'])}",
        f"  optimizer states (AdamW, 2 x fp32)        {_gib(m['optimizer_bytes'])}",
        f"  activations ({act_note} checkpointing)      {_gib(m['activations_bytes'])}"
        f"   ({'without' if act_note == 'with' else 'with'}: {other / GIB:.2f})",
        f"  overhead ({'CUDA context' if report['device'] == 'cuda' else 'process baseline'})"
        f"{' ' * (21 if report['device'] == 'cuda' else 17)}{_gib(m['overhead_bytes'])}",
        f"  total                                     {_gib(m['total_bytes'])}",
        "",
        "Fits on a CUDA GPU of   fits   largest batch",
    ]
    for row in report["fits"]:
        lines.append(f"  {row['gpu_gb']:>3} GB                {'yes' if row['fits'] else 'no ':>5}   "
                     f"{row['max_batch_size']:>8}")
    return "\n".join(lines)
