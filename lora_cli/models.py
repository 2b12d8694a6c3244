"""Finding, loading and preparing base models: names, the embedded default, precision, quantization, LoRA."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli import hub
from lora_cli.errors import ConfigError, ModelError, ModelInputError, first_line

log = logging.getLogger(__name__)

# Short names users type, and the hub repositories they stand for.
SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
}
EMBEDDED = "smollm2-135m"
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class ModelSource:
    """Where a base model comes from: `location` is what `from_pretrained` is given."""

    name: str  # what the user asked for
    location: str  # a local folder or a hub id
    hub_id: str | None  # the hub repository it stands for, if any
    local: bool


def cache_dir() -> Path:
    """The user cache of converted models; LORA_CACHE_DIR overrides it."""
    root = os.environ.get("LORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-cli"
    )
    return Path(root)


def is_embedded(name: str | None) -> bool:
    """Whether a model name is the embedded default's (in any case)."""
    return str(name or "").lower() == EMBEDDED


def resolve_model(name: str | None, revision: str | None = None) -> ModelSource:
    """A short name, a local folder or a hub id -> where to load it from; no weights are read."""
    name = name or EMBEDDED
    if is_embedded(name):
        from lora_cli.default_model import ensure_default_model

        return ModelSource(name, str(ensure_default_model()), SHORT_NAMES[EMBEDDED], local=True)
    path = Path(name).expanduser()
    if path.is_file():
        raise ConfigError(f"--model {name} is a file; give the model's folder (config.json and weights), a hub id "
                          "or one of: " + ", ".join(SHORT_NAMES))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {name} is a folder without config.json; point it at a transformers model folder")
        from lora_cli.runs import read_json_object

        if read_json_object(path / "config.json") is None:
            raise ConfigError(f"--model {name}: its config.json is damaged (not a JSON object); restore it, or "
                              "download the model again")
        from lora_cli.safetensors_io import read_header

        for weights in sorted(path.glob("*.safetensors")):  # headers only: a damaged file fails now, in one line
            read_header(weights)
        if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
            raise ConfigError(f"--model {name} holds no weight files ({', '.join(WEIGHT_FILES)}); "
                              "point it at a complete model folder")
        return ModelSource(name, str(path.resolve()), None, local=True)
    hub_id = SHORT_NAMES.get(name.lower(), name)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and hub_id.count("/") != 1
    if looks_like_path or hub_id.count("/") > 1:
        raise ConfigError(f"--model {name}: no such folder; give an existing model folder, a hub id or one of: "
                         + ", ".join(SHORT_NAMES))
    check_hub(name, hub_id, revision)
    return ModelSource(name, hub_id, hub_id, local=False)


def check_hub(name: str, hub_id: str, revision: str | None) -> None:
    """Fail in a second with one sentence when the hub id cannot be reached, instead of 30 s of retries."""
    from huggingface_hub import try_to_load_from_cache

    if not hub.is_repo_id(hub_id):
        raise ConfigError(f"--model {name!r} is neither a model folder, a hub id (org/name) nor one of: "
                          + ", ".join(SHORT_NAMES))
    if isinstance(try_to_load_from_cache(hub_id, "config.json", revision=revision), str):
        return  # already downloaded: transformers can use the local copy
    asked = f"'{name}'" + (f" ({hub_id})" if hub_id != name else "")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        embedded = f" (or --model {EMBEDDED}, the embedded default: this model from a 4-bit GGUF, offline)" \
            if hub_id == SHORT_NAMES[EMBEDDED] else ""
        raise ModelError(f"model {asked} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                         f"unset HF_HUB_OFFLINE or pass a local folder with --model{embedded}")
    answer = hub.ask(hub_id, "model", revision)
    if answer == hub.GATED:
        raise ModelError(f"model {asked} is gated on the Hugging Face hub; accept its licence on the hub and "
                         "log in with `hf auth login`, or pass a local folder with --model")
    if answer == hub.NOT_FOUND:
        raise ModelError(f"model {asked} was not found on the Hugging Face hub (unknown id or revision, or private); "
                         "check the name, log in with `hf auth login`, or pass a local folder with --model")
    if answer:
        raise ModelError(f"cannot reach the Hugging Face hub to download model {asked} ({answer}); "
                         "check your network, or pass a local folder with --model")


def resolve_precision(precision: str) -> str:
    """auto -> bf16 where the hardware computes it fast, else fp16 on older GPUs, else fp32."""
    import torch

    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cpu_precision()


def cpu_precision() -> str:
    """bf16 on CPUs that multiply it at least as fast as fp32 (with AMX: 7x faster), else fp32."""
    from lora_cli.cpu import bf16_beats_fp32

    return "bf16" if bf16_beats_fp32() else "fp32"


def resolve_int8_backward(asked: bool | None, precision: str, quantization: str | None,
                          device: str | None = None) -> bool:
    """None (auto) -> on for fp32 training on a CPU whose int8 matmuls are fast; asked -> as asked, where it applies.

    `device`: cuda or cpu, where the training runs (None: this machine's).
    """
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    applies = device == "cpu" and precision == "fp32" and quantization is None
    if asked and not applies:
        raise ConfigError("--int8-backward applies to fp32 training on the CPU, without --use-4bit or --use-8bit; "
                          "drop it, or train with --precision fp32 on the CPU")
    if asked is None:
        from lora_cli.cpu import int8_beats_fp32

        return applies and int8_beats_fp32()
    return asked


def describe_precision(requested: str, resolved: str) -> str:
    """The precision for the log, saying why `auto` left bf16 aside on a CPU that supports it."""
    import torch

    if (requested == "auto" and resolved == "fp32" and not torch.cuda.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "fp32 (auto: this CPU multiplies bf16 more slowly)"
    return resolved


def torch_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The tokenizer, with a pad token that adds nothing to the vocabulary."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.location, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if source.local and not any((Path(source.location) / f).is_file() for f in TOKENIZER_FILES):
            raise ModelInputError(f"{source.location} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the "
                                  "model's tokenizer files in beside its weights") from None
        raise ModelError(f"cannot load the tokenizer of '{source.name}': {' '.join(str(exc).split())[:300]}") from None
    if tok.pad_token is None:
        # Reuse an existing token rather than add one: a new token means resizing the embeddings.
        # Labels are built before padding, so pad == eos never masks the real EOS.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def restore_forwards(model: Any, functions: tuple[Any, ...]) -> int:
    """Drop every per-layer `forward` that is a `functools.partial` of one of `functions`, so that each layer runs
    its class's forward again (lora_cli/packed_weights.py and lora_cli/fused_layers.py set them); returns how many."""
    import functools

    restored = 0
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(forward, functools.partial) and forward.func in functions:
            del module.forward
            restored += 1
    return restored


def sharded_engine() -> bool:
    """True under `accelerate launch` with FSDP or DeepSpeed ZeRO-3, which shard the weights themselves."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def device_map_for_quantized() -> dict[str, Any]:
    """Each process keeps its quantized copy on its own device: never `auto` under data parallelism."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_base_model(source: ModelSource, *, precision: str, quantization: str | None = None,
                    trust_remote_code: bool = False, revision: str | None = None,
                    allow_pickle_weights: bool = False) -> Any:
    """The frozen base in the compute precision, optionally NF4 or int8 through bitsandbytes."""
    from safetensors import SafetensorError  # a damaged weights file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        hf_logging.disable_progress_bar()  # the env var is read once, at transformers' import
    dtype = torch_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code,
                              "use_safetensors": None if allow_pickle_weights else True}
    if quantization:
        from transformers import BitsAndBytesConfig

        sharded = sharded_engine()
        if quantization == "4bit":
            # FSDP and ZeRO-3 shard parameters of one dtype: NF4 packed into the compute dtype (FSDP-QLoRA).
            storage = {"bnb_4bit_quant_storage": dtype} if sharded else {}
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, **storage)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if not sharded:  # the sharding engine places the weights itself
            kwargs["device_map"] = device_map_for_quantized()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, ImportError, SafetensorError) as exc:
        hint = ""
        if isinstance(exc, SafetensorError):
            hint = "; a weights file is damaged: restore it, or download the model again"
        elif not allow_pickle_weights and "safetensors" in str(exc).lower():
            hint = ("; it has no safetensors weights: pass --allow-pickle-weights to load .bin files "
                    "(unpickling can run code: only for sources you trust)")
        raise ModelError(f"cannot load model '{source.name}': {first_line(exc)}{hint}") from None
    if quantization == "4bit":
        keep_4bit_trainable_on_cpu(model)
    return model


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into an inference-only layout on AVX512-BF16 CPUs.

    Without this, the first no-grad forward (an evaluation, a generate) repacks every Linear4bit,
    after which LoRA gradients are silently None and the loss stops moving (FACTS.md).
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def linear_module_names(model: Any) -> set[str]:
    """The leaf names of the linear layers LoRA could target (lm_head left out)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and leaf != "lm_head":
            names.add(leaf)
    return names


def add_lora(model: Any, settings: Any, *, quantized: bool, gradient_checkpointing: bool) -> Any:
    """Wrap the frozen base with a PEFT LoRA adapter; unknown target modules are a usage error."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from lora_cli.targets import check_present, for_model

    available = linear_module_names(model)
    targets, fused = for_model(settings.target_modules, available)
    if fused:
        log.info("This model fuses projections: --target-modules %s adapts %s", settings.target_modules,
                 " and ".join(fused))
    check_present(targets, available)
    _warn_rank_above_width(model, targets, settings.r)
    if quantized:
        # Casts norms to fp32 for stability and wires input gradients for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets, use_dora=settings.use_dora, use_rslora=settings.use_rslora,
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _warn_rank_above_width(model: Any, targets: list[str], rank: int) -> None:
    """A rank above min(in, out) of a layer is valid but buys nothing there: its update's rank cannot
    exceed that width, while its parameters and compute still grow with r."""
    widths = {}
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in targets and hasattr(module, "in_features") and hasattr(module, "out_features"):
            widths[leaf] = min(widths.get(leaf, rank), module.in_features, module.out_features)
    narrow = {name: width for name, width in widths.items() if width < rank}
    if narrow:
        listed = ", ".join(f"{name} ({width})" for name, width in sorted(narrow.items()))
        log.warning("--rank %d is above the width of %s: the update there cannot use more than that rank, "
                    "so the extra rank only adds parameters and time; a rank of 8 to 64 is usual", rank, listed)


def count_parameters(model: Any) -> int:
    """Parameters of the base model as published: 4-bit weights count their unpacked shape."""
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        total += quant_state.shape.numel() if quant_state is not None else param.numel()
    return total
