"""Checks on adapter files: an adapter is only called written when it is non-trivial, finite and loadable."""

from __future__ import annotations

from pathlib import Path

from lora_cli.errors import LoraError


def verify_adapter(folder: Path) -> int:
    """Raise unless the folder's adapter holds LoRA tensors that are all finite; returns the tensor count."""
    import torch
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise LoraError(f"the adapter in {folder} is incomplete: adapter_config.json or its weights are missing")
    count = 0
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise LoraError(f"the adapter in {folder} holds NaN or infinite values in {key}; it was not kept")
            count += "lora_" in key
    if count == 0:
        raise LoraError(f"the adapter in {folder} holds no LoRA weights (an empty adapter); it was not kept")
    return count
