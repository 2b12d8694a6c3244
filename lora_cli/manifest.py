"""The run manifest `lora_run.json`: everything needed to trust, reproduce and reuse a run.

merge, generate and eval read it back, so the user never repeats the base model or the template.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any

from lora_cli import __version__

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"lora": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def started(cfg: Any, source: Any, world_size: int, data_identity: dict[str, Any]) -> dict[str, Any]:
    """The record of a run that has begun: its resolved options, which `--resume` restores, and the data
    it trains on, which `--resume` checks."""
    return {
        "status": "started",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_record(),
        "base_model": {"name": source.name, "path": source.location, "hub_id": source.hub_id,
                       "revision": cfg.model.revision},
        "data": data_identity,
        "world_size": world_size,
    }


def build(cfg: Any, source: Any, base_params: int, precision: str, quantization: str | None, prepared: Any,
          metrics: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The finished-run record; written last, so its presence with status `finished` marks a whole run."""
    import torch

    return {
        "status": "finished",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_record(),
        "base_model": {
            "name": source.name,
            "path": source.location,
            "hub_id": source.hub_id,
            "revision": cfg.model.revision,
            "parameters": base_params,
            "precision": precision,
            "quantization": quantization,
        },
        "data": {**prepared.identity, "format": prepared.format, "template": prepared.template,
                 "train_examples": len(prepared.train),
                 "eval_examples": len(prepared.eval) if prepared.eval is not None else 0,
                 "dropped_rows": prepared.dropped},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "world_size": world_size,
        "versions": library_versions(),
        "metrics": metrics,
    }
