"""A shorter start for the `lora` command: leave out bitsandbytes when the run cannot use it.

peft imports bitsandbytes whenever it is installed, and bitsandbytes wraps its kernels in
`torch.compile` as it is imported, which imports torch's whole compiler: about 1.4 s of every start
(a one-step `lora train` of the default model: 8.3 -> 6.7 s wall, medians of 3, 2-core Xeon). A run
that quantizes nothing and whose base is not stored quantized never calls it, so the `lora` command
marks it absent the way Python documents it, with None in `sys.modules`: peft, transformers and
accelerate then take it as not installed (`importlib.util.find_spec` answers None).

Only a process the `lora` command started does this (`command_process`): a program that imports
lora_cli, or a test runner calling the CLI in-process, may still need bitsandbytes afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


# True in a process the `lora` command started for one job (set by cli.run); False where lora_cli is a
# library in someone else's process (a notebook, a test runner), whose age says nothing about a run.
command_process = False


def leave_out_bitsandbytes(model: str | None, revision: str | None, quantization: str | None,
                           trust_remote_code: bool = False) -> bool:
    """Mark bitsandbytes absent for this process when the run can do without it; True when it did.

    It can when nothing is to be quantized and the base's config.json, read from this machine, holds
    no `quantization_config` (a checkpoint stored in 4-bit needs bitsandbytes to load). A base not
    downloaded yet keeps bitsandbytes: its config is unknown, and the download dwarfs the saving. So
    does a model with its own code, which may import bitsandbytes itself.
    """
    if not command_process or quantization or trust_remote_code or "bitsandbytes" in sys.modules:
        return False
    config = config_on_disk(model, revision)
    if config is None or stored_quantized(config):
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    return True


def stored_quantized(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config says its weights are stored quantized: at the top, or in the text
    model's part of a composite config, both of which transformers reads."""
    parts = [config] + [config.get(key) for key in ("text_config", "decoder", "generator")]
    return any(isinstance(part, dict) and part.get("quantization_config") for part in parts)


def config_on_disk(model: str | None, revision: str | None) -> dict[str, Any] | None:
    """The base model's config.json if this machine already has it (a folder, the converted default, or
    the hub cache), read without touching the network; None when it is not here or cannot be read."""
    from lora_cli import models

    name = model or models.EMBEDDED
    if models.is_embedded(name):
        from lora_cli.default_model import DONE_MARKER, default_model_dir

        folder = default_model_dir()
        path = folder / "config.json" if (folder / DONE_MARKER).is_file() else None
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(models.SHORT_NAMES.get(name.lower(), name), "config.json",
                                           revision=revision)
        except Exception:  # not a valid hub id: loading the model reports it properly
            return None
        path = Path(found) if isinstance(found, str) else None
    from lora_cli.runs import read_json_object

    return read_json_object(path) if path else None
