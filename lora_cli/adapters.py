"""Checks on adapter files: an adapter is only called written when it is non-trivial, finite and loadable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import ConfigError, LoraError, ModelError, RunError, first_line


def check_adapter_files(folder: Path) -> None:
    """Fail in one line, before any model loads, when an adapter folder's config or weights cannot be read."""
    from lora_cli.runs import read_json_object

    config_path = folder / "adapter_config.json"
    if read_json_object(config_path) is None:
        raise RunError(f"{config_path} is damaged (not a JSON object); restore it, or train the adapter again")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():  # an older PEFT adapter: PEFT reads it itself
            return
        raise RunError(f"{folder} has no adapter_model.safetensors; restore it, or train the adapter again")
    from lora_cli.safetensors_io import read_header  # the header only, and no torch import (`lora info`)

    try:
        read_header(weights)
    except ModelError:
        raise RunError(f"{weights} is damaged (its header cannot be read); restore it, or train the adapter "
                       "again") from None


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


@dataclass
class LoadedModel:
    """A model ready to run: base plus adapter (or a plain/merged model), its tokenizer and prompt renderer."""

    model: Any
    tokenizer: Any
    renderer: Any
    adapter_dir: Path | None
    manifest: dict[str, Any] | None
    base_location: str
    data_format: str | None = None  # the row format it was trained on (run or merge record), if known


def tokenizer_folder(adapter_dir: Path | None, base_location: str) -> str:
    """Where to load the tokenizer from: the run's own (it carries the chat template training used), else the base's."""
    if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file():
        return str(adapter_dir)
    return base_location


def base_of(adapter_dir: Path, manifest: dict[str, Any] | None) -> str:
    """The base model an adapter was trained on: the manifest's record, else the adapter's own config."""
    if manifest:
        base = manifest["base_model"]
        if base.get("path") and Path(base["path"]).is_dir():
            return base["path"]
        from lora_cli.models import is_embedded

        if is_embedded(base["name"]):  # rebuilt offline where the cache lost it, not the hub's own weights
            return base["name"]
        return base.get("hub_id") or base["name"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config.get("base_model_name_or_path") or ""


@dataclass
class LoadPlan:
    """What load_for_inference will load, known from the run folder before any model library is imported."""

    adapter_dir: Path | None
    manifest: dict[str, Any] | None
    base_name: str
    trained: dict[str, Any]  # the run's model options (revision, permissions); {} when --model overrides the base
    quantization: str | None  # the bitsandbytes mode the adapter was trained against


def plan_load(adapter: str | None, model: str | None, adapter_required: bool = False) -> LoadPlan:
    """The adapter folder (default runs/latest) and the base it goes on, or only `model` when no adapter is
    named (unless `adapter_required`: then no adapter named means runs/latest, as for merge)."""
    from lora_cli import runs

    adapter_dir = None if (model and not adapter and not adapter_required) else runs.find_run(adapter)
    manifest = runs.read_manifest(adapter_dir) if adapter_dir else None
    base_name = model or base_of(adapter_dir, manifest)
    if not base_name:
        raise ConfigError(f"cannot tell which base model {adapter_dir} belongs to; pass it with --model")
    # the base exactly as training loaded it: same revision, same permissions
    trained = (manifest or {}).get("config", {}).get("model", {}) if not model else {}
    return LoadPlan(adapter_dir, manifest, base_name, trained,
                    (manifest or {}).get("base_model", {}).get("quantization"))


def load_for_inference(adapter: str | None = None, model: str | None = None, *, precision: str = "auto",
                       quantization: str | None = "as-trained", template: str = "auto") -> LoadedModel:
    """Base + adapter (`adapter`, default runs/latest), or a plain model folder when only `model` is given.

    `model` with `adapter` overrides the base recorded in the run. A QLoRA adapter is run on the 4-bit
    base it was trained against unless `quantization` says otherwise.
    """
    from lora_cli import models
    from lora_cli.data import Renderer

    plan = plan_load(adapter, model)
    adapter_dir, manifest, trained = plan.adapter_dir, plan.manifest, plan.trained
    revision = trained.get("revision")
    source = models.resolve_model(plan.base_name, revision)
    if adapter_dir and merged_adapter(source) == adapter_dir.resolve():
        raise ConfigError(f"--model {source.name} already holds the adapter {adapter_dir} (lora merge folded it in); "
                          "drop --adapter to use it as it is, or give the base model with --model")
    if quantization == "as-trained":
        quantization = plan.quantization
    resolved = run_precision(manifest) if precision == "auto" else None
    resolved = resolved or models.resolve_precision(precision)
    home = tokenizer_folder(adapter_dir, source.location)
    tokenizer = models.load_tokenizer(source if home == source.location else
                                      models.ModelSource(home, home, None, local=True))
    base = models.load_base_model(source, precision=resolved, quantization=quantization, revision=revision,
                                  trust_remote_code=trained.get("trust_remote_code", False),
                                  allow_pickle_weights=trained.get("allow_pickle_weights", False))
    if adapter_dir:
        loaded = attach_adapter(base, adapter_dir, source.name,
                                "pass the base it was trained on with --model, or retrain it")
    else:
        loaded = base
    loaded.eval()
    from lora_cli import packed_weights

    packed_weights.enable_for_inference(loaded, resolved, quantization)
    # how training rendered its rows: the run's manifest, or for a merged folder the merge record
    trained_data = (manifest or {}).get("data") or merged_from(source)
    renderer = Renderer(tokenizer, template if template != "auto" else (trained_data.get("template") or "auto"))
    return LoadedModel(loaded, tokenizer, renderer, adapter_dir, manifest, source.location,
                       trained_data.get("format"))


def run_precision(manifest: dict[str, Any] | None) -> str | None:
    """The precision a run trained in, for `--precision auto` on the kind of device it trained on: the
    adapter then computes what training measured (its eval loss), whatever this machine's own timing says."""
    import torch

    record = manifest or {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if record.get("status") != "finished" or record.get("device") != device:
        return None
    precision = (record.get("base_model") or {}).get("precision")
    if device == "cpu" and precision == "bf16":  # a run from an AMX machine: bf16 only where it is fast here
        from lora_cli.models import cpu_precision

        return "bf16" if cpu_precision() == "bf16" else None
    return precision if precision in ("fp32", "bf16", "fp16") and not (device == "cpu" and precision == "fp16") \
        else None


def attach_adapter(base: Any, adapter_dir: Path, base_name: str, fix: str) -> Any:
    """PEFT's base + adapter; an adapter that does not fit the base (module names, shapes, its files) is
    one line that ends with `fix`. Running out of memory, or a missing library, is left as it is."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:
        if isinstance(exc, (ImportError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError":
            raise
        raise RunError(f"the adapter in {adapter_dir} does not fit the base {base_name} ({first_line(exc)}); "
                       f"{fix}") from exc


def trained_format(adapter: str | None, model: str | None) -> str | None:
    """The row format the model to be loaded was trained on, read before any weights load: from the run's
    manifest, or from a local merged folder's record; None where neither tells (a hub model, say)."""
    from lora_cli.models import ModelSource

    plan = plan_load(adapter, model)
    trained = (plan.manifest or {}).get("data")
    if trained is None and Path(plan.base_name).expanduser().is_dir():
        folder = str(Path(plan.base_name).expanduser())
        trained = merged_from(ModelSource(folder, folder, None, local=True))
    return (trained or {}).get("format")


def merged_from(source: Any) -> dict[str, Any]:
    """The template and row format a merged folder's adapter was trained with (its `lora_merge.json`), or {}."""
    return _merge_record(source).get("trained_on") or {}


def merged_adapter(source: Any) -> Path | None:
    """The adapter folder a merged model folder was made from, if it is one (as an absolute path: a
    relative one would be read against whatever folder the command runs in)."""
    adapter = _merge_record(source).get("adapter_path")
    return Path(adapter) if adapter and Path(adapter).is_absolute() else None


def _merge_record(source: Any) -> dict[str, Any]:
    """A merged folder's `lora_merge.json` ({} for any other model)."""
    from lora_cli.merge import RECORD
    from lora_cli.runs import read_json_object

    return (read_json_object(Path(source.location) / RECORD) if source.local else None) or {}
