"""`lora merge`: fold a LoRA adapter into full-precision base weights and save a plain transformers folder.

The base is streamed one safetensors shard at a time, and within it one tensor at a time: each tensor
is read, merged and written before the next is read, so memory stays near the base's largest tensor
plus the adapter, never a whole shard or the whole model; the shard layout and index are kept. A QLoRA
adapter is folded into the dequantized weights it was trained against, never into quantized ones
(FACTS.md: merging into 4-bit weights moves logits by 30). A self-check compares the written folder's
logits with base + adapter before the folder is renamed into place.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lora_cli.errors import ConfigError, LoraError, ModelError, ModelInputError, RunError
from lora_cli.safetensors_io import SAFETENSORS_DTYPES, read_header, read_tensor, write_safetensors

log = logging.getLogger(__name__)

DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}  # --dtype -> safetensors code
MERGE_INTO = ("dequantized", "original")
FLOAT_CODES = ("F64", "F32", "F16", "BF16")  # stored tensors that take the output dtype; others pass through
INDEX = "model.safetensors.index.json"
RECORD = "lora_merge.json"  # written into the merged folder: what was merged, how, and how well it checked
PROBE = "The quick brown fox jumps over the lazy dog. LoRA adds a low-rank update: W + (alpha / r) B A. 0123456789"
FP32_TOLERANCE = 1e-3
# bf16/fp16 files: storing SmolLM2-135M's own weights in bf16 moves its logits by 0.23 of 34 (0.84 x bf16's
# machine epsilon, relative), in fp16 by 0.038 (1.1 x fp16's epsilon); allow 4 x epsilon x the largest logit.
LOW_PRECISION_EPS_FACTOR = 4.0
# adapter_config.json keys naming features whose forward is not W + scale * B A (+ DoRA): refused, not guessed.
UNSUPPORTED = {"fan_in_fan_out": "fan_in_fan_out (Conv1D) layers", "lora_bias": "LoRA biases",
               "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens",
               "target_parameters": "LoRA on parameters", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
               "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
               "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA"}


@dataclass
class Delta:
    """One LoRA pair: W' = W + scale * B A (transposed for embeddings), rescaled row-wise for DoRA."""

    A: Any
    B: Any
    scale: float
    embedding: bool = False
    magnitude: Any = None  # DoRA's learned row norms

    def apply(self, weight: Any) -> Any:
        import torch

        delta = (self.B.float() @ self.A.float()) * self.scale
        merged = weight + (delta.T if self.embedding else delta)
        if self.magnitude is None:
            return merged
        # DoRA (peft's merge): the direction W + scale B A, rescaled so each output row has the learned norm.
        return (self.magnitude.float() / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged


@dataclass
class Plan:
    """What happens to each base tensor (by its key in the shards)."""

    deltas: dict[str, Delta] = field(default_factory=dict)
    replace: dict[str, Any] = field(default_factory=dict)  # modules_to_save: the adapter's full tensor
    roundtrip: set[str] = field(default_factory=set)  # quantized in training: merge into the dequantized weight
    quantization: str | None = None
    train_dtype: Any = None

    def touches(self, key: str) -> bool:
        return key in self.deltas or key in self.replace or key in self.roundtrip

    def tensor(self, key: str, stored: Any) -> Any:
        weight = self.replace.get(key, stored).float()
        if key in self.roundtrip:
            weight = dequantized(weight, self.quantization, self.train_dtype)
        return self.deltas[key].apply(weight) if key in self.deltas else weight


def merge(adapter: str | None = None, output_dir: str | None = None, base: str | None = None,
          dtype: str | None = None, merge_into: str = "dequantized", overwrite: bool = False,
          check: bool = True, published_as: str | None = None) -> dict[str, Any]:
    """Merge `adapter` (default runs/latest) into its base; returns the report (also written as lora_merge.json).
    `published_as` is the hub repository the merged model will be uploaded to, for its model card."""
    from lora_cli import adapters, model_card, models, runs

    started = time.perf_counter()
    if merge_into not in MERGE_INTO:
        raise ConfigError(f"--merge-into must be one of {', '.join(MERGE_INTO)}, got {merge_into!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    # 1. What to merge into what, and where it goes; refuse to clobber before any weight is read.
    adapter_dir = runs.find_run(adapter)
    adapters.verify_adapter(adapter_dir)
    manifest = runs.read_manifest(adapter_dir)
    base_name = base or adapters.base_of(adapter_dir, manifest)
    if not base_name:
        raise ModelInputError(f"cannot tell which base model {adapter_dir} belongs to; pass it with --base")
    source = models.resolve_model(base_name)
    base_dir = _local_folder(source, None if base else (manifest or {}).get("base_model", {}).get("revision"))
    out = Path(output_dir).expanduser() if output_dir else adapter_dir / "merged"
    _refuse_to_clobber(out, overwrite, adapter_dir, base_dir)
    runs.check_can_create(out, "--output-dir")

    # 2. The weights the adapter was trained against: dequantized NF4/int8 for QLoRA, unless asked otherwise.
    trained = (manifest or {}).get("base_model", {})
    quantization = trained.get("quantization") if merge_into == "dequantized" else None
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise ModelInputError(f"the base {base_dir} is stored quantized; merge into a full-precision copy of it (--base)")
    layout = _read_layout(base_dir)
    train_dtype = models.torch_dtype(trained.get("precision") or "fp32")
    plan = _plan(adapter_dir, base_dir, layout, config, quantization, train_dtype)
    out_code = DTYPES[dtype] if dtype else layout.stored
    out_name = {code: name for name, code in DTYPES.items()}[out_code]
    tokenizer = _tokenizer(adapter_dir, base_dir)
    _check_vocab(tokenizer, layout, config)
    got = {"4bit": "dequantized-nf4", "8bit": "dequantized-int8"}.get(quantization or "", "original")
    log.info("Merging %s into %s: %s", adapter_dir, source.name, _describe(got, trained.get("quantization"), manifest))

    # 3. Write everything into a temporary folder beside the target, check it, then rename it into place.
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sizes = {shard: _write_shard(base_dir / shard, tmp / shard, plan, out_code) for shard in layout.shards}
        if (base_dir / INDEX).is_file():
            index = json.loads((base_dir / INDEX).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": sum(sizes.values())}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config["dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(out_code, config.get("dtype"))
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (base_dir / "generation_config.json").is_file():
            shutil.copyfile(base_dir / "generation_config.json", tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        diff = tolerance = None
        if check:
            diff, tolerance = self_check(tmp, base_dir, adapter_dir, tokenizer, plan, out_code)
            log.info("Self-check: largest logit difference to base + adapter %.2e (allowed %.1e for %s)",
                     diff, tolerance, out_name)
            if diff > tolerance:
                raise LoraError(f"the merged model's logits differ from base + adapter by {diff:.3g} (more than "
                                f"{tolerance:.1e}); nothing was kept. Please report this with the adapter's config")
        report = {"output_dir": str(out), "adapter": str(adapter_dir), "adapter_path": str(adapter_dir.resolve()),
                  "base": source.location,
                  "merge_into": got, "dtype": out_name, "shards": len(layout.shards),
                  "max_logit_diff": diff, "tolerance": tolerance,
                  "seconds": round(time.perf_counter() - started, 2),
                  # so that generate and eval prompt the merged model as training prompted base + adapter
                  "trained_on": {key: (manifest or {}).get("data", {}).get(key) for key in ("template", "format")}}
        runs.write_json_atomic(tmp / RECORD, report)
        recorded = trained if not base and trained else {"name": source.name, "hub_id": source.hub_id,
                                                          "path": source.location}
        (tmp / "README.md").write_text(model_card.merged_card(report, manifest, recorded, published_as or str(out)),
                                       encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _describe(got: str, trained_with: str | None, manifest: dict[str, Any] | None) -> str:
    """Tell the user which weights they got, and how to get the others."""
    if got == "dequantized-nf4":
        return "into the dequantized NF4 weights it was trained against (--merge-into original for the originals)"
    if got == "dequantized-int8":
        return "into the dequantized int8 weights it was trained against (--merge-into original for the originals)"
    if trained_with:
        return f"into the original full-precision weights, as asked (it was trained against {trained_with} weights)"
    if manifest is None:
        return "into the original full-precision weights (no run manifest: assuming it was trained on them)"
    return "into the original full-precision weights it was trained against"


def _local_folder(source: Any, revision: str | None) -> Path:
    """The base as a local folder: a hub id is fetched (or found in the hub cache) without the .bin duplicates."""
    if source.local:
        return Path(source.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.location, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as exc:  # network and hub errors come from several libraries
        raise ModelError(f"cannot fetch the base model '{source.name}' ({type(exc).__name__}); "
                         "pass a local folder with --base") from None


# What a merge writes into its folder; --overwrite replaces only a folder of an earlier merge holding
# nothing else (a model, notes or code of the user's beside it are never deleted).
MERGE_ENTRIES = (RECORD, "config.json", "generation_config.json", "*.safetensors", INDEX, "tokenizer*",
                 "tokenization_*.py", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken", "tekken.json",
                 "README.md")


def _refuse_to_clobber(out: Path, overwrite: bool, adapter_dir: Path, base_dir: Path) -> None:
    from lora_cli.runs import foreign_entry

    for name, folder in (("adapter", adapter_dir), ("base", base_dir)):
        if folder.resolve().is_relative_to(out.resolve()):  # the folder itself, or one inside it
            raise ConfigError(f"--output-dir {out} is or holds the {name} folder being merged; pick a new folder")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / RECORD).is_file():
        raise RunError(f"--output-dir {out} exists and is not an earlier merge (no {RECORD}); pick another folder "
                       "(--overwrite only replaces merges)")
    foreign = foreign_entry(out, MERGE_ENTRIES)
    if foreign is not None:
        raise RunError(f"--output-dir {out} holds files a merge does not write (such as {foreign}); move them "
                       "away or pick another folder")
    if not overwrite:
        raise RunError(f"--output-dir {out} already holds a merged model; pass --overwrite to replace it, "
                       "or pick another --output-dir")


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder in: an earlier merge is moved aside first and removed only afterwards."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Layout:
    """The base's weight files: shard names in order, tensor -> shard, tensor shapes, stored float dtype."""

    shards: list[str]
    weight_map: dict[str, str]
    shapes: dict[str, list[int]]
    stored: str


def _read_layout(base_dir: Path) -> Layout:
    if (base_dir / INDEX).is_file():
        shards = list(dict.fromkeys(json.loads((base_dir / INDEX).read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ModelInputError(f"the base {base_dir} has no safetensors weights; re-save it with save_pretrained() "
                              "(safetensors is the default) and pass that folder with --base")
    weight_map, shapes, codes = {}, {}, []
    for shard in shards:  # headers only: no weight is read here
        for key, info in read_header(base_dir / shard)[1].items():
            weight_map[key], shapes[key] = shard, info["shape"]
            codes.append(info["dtype"])
    unknown = sorted(set(codes) - set(SAFETENSORS_DTYPES))
    if unknown:
        raise ModelInputError(f"the base {base_dir} stores tensors as {unknown[0]}, which lora merge cannot read")
    stored = next((code for code in codes if code in FLOAT_CODES), "F32")
    return Layout(shards, weight_map, shapes, "F32" if stored == "F64" else stored)


def _plan(adapter_dir: Path, base_dir: Path, layout: Layout, config: dict[str, Any], quantization: str | None,
          train_dtype: Any) -> Plan:
    """Pair the adapter's tensors with the base tensors they change; refuse what would merge wrongly."""
    import math
    import re

    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelInputError(f"{adapter_dir} is a {cfg.get('peft_type')} adapter; lora merge folds in LoRA adapters only")
    used = [what for key, what in UNSUPPORTED.items() if cfg.get(key)]
    if used:
        raise ModelInputError(f"{adapter_dir} uses {', '.join(used)}, which lora merge cannot fold in; "
                              "merge it with peft's merge_and_unload instead")
    parts: dict[str, dict[str, Any]] = {}
    plan = Plan(quantization=quantization, train_dtype=train_dtype)
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        name = key.removeprefix("base_model.model.")
        for marker, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                             (".lora_embedding_B", "B"), (".lora_magnitude_vector.weight", "m"),
                             (".lora_magnitude_vector", "m")):
            if name.endswith(marker):
                parts.setdefault(name[: -len(marker)], {"embedding": "embedding" in marker})[role] = tensor
                break
        else:
            if "lora_" in name:
                raise ModelInputError(f"{adapter_dir} holds {key}, a LoRA tensor lora merge does not know; "
                                      "merge it with peft's merge_and_unload instead")
            plan.replace[name.replace(".base_layer.", ".")] = tensor  # modules_to_save, saved embeddings
    patterns = cfg.get("alpha_pattern") or {}
    # peft's own matching (peft.utils.other.get_pattern_key), without importing peft (5 s) for three lines
    pattern = {module: next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)
               for module in parts}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ModelInputError(f"{adapter_dir} lacks lora_A or lora_B for {module}; the adapter is damaged")
        if p["embedding"] and "m" in p:
            raise ModelInputError(f"{adapter_dir} uses DoRA on the embedding {module}, which lora merge cannot fold in; "
                                  "merge it with peft's merge_and_unload instead")
        r = p["A"].shape[0]  # rank_pattern gives some modules another r; their tensors say which
        alpha = patterns.get(pattern[module], cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        plan.deltas[module + ".weight"] = Delta(p["A"], p["B"], scale, p["embedding"], p.get("m"))
    _check_targets(plan, layout, config, adapter_dir)
    if quantization:
        plan.roundtrip = quantized_weight_keys(base_dir) & set(layout.weight_map)
    return plan


def _check_targets(plan: Plan, layout: Layout, config: dict[str, Any], adapter_dir: Path) -> None:
    changed = sorted(set(plan.deltas) | set(plan.replace))
    missing = [key for key in changed if key not in layout.shapes]
    if missing:
        raise ModelInputError(f"the adapter {adapter_dir} changes {missing[0]}, which the base does not have; "
                              "is --base the model it was trained on?")
    if config.get("tie_word_embeddings") and any(k.endswith(("embed_tokens.weight", "lm_head.weight"))
                                                  for k in changed):
        raise ModelInputError(f"the adapter {adapter_dir} changes the embeddings, which this base ties to its output "
                              "layer, so merging would change both; use it unmerged (lora generate --adapter)")
    for key in changed:
        if key in plan.deltas:
            d = plan.deltas[key]
            got = [d.A.shape[1], d.B.shape[0]] if d.embedding else [d.B.shape[0], d.A.shape[1]]
        else:
            got = list(plan.replace[key].shape)
        if got != layout.shapes[key]:
            raise ModelInputError(f"the adapter {adapter_dir} gives {key} the shape {got} but the base has "
                                  f"{layout.shapes[key]}: is --base the model it was trained on "
                                  "(or were its embeddings resized?)")


def quantized_weight_keys(base_dir: Path) -> set[str]:
    """The weights transformers quantizes with bitsandbytes: every nn.Linear but those its quantizer skips."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):  # the module tree without any weight
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
    skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    return {f"{name}.weight" for name, module in skeleton.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)}


def dequantized(weight: Any, quantization: str, train_dtype: Any) -> Any:
    """The weight as the quantized training forward saw it, in fp32.

    Quantized from the weight cast to the training precision, as `from_pretrained(dtype=...)` did before
    bitsandbytes quantized it: NF4 codes and scales taken from bf16 and from fp32 weights differ. Evaluated
    in fp32, which is what `Linear4bit` computes with fp32 compute (tests/test_merge.py checks both).
    """
    import torch
    from bitsandbytes import functional as F

    source = weight.to(train_dtype)
    if quantization == "4bit":
        packed, state = F.quantize_4bit(source, quant_type="nf4", compress_statistics=True, blocksize=64)
        state.dtype = torch.float32
        return F.dequantize_4bit(packed, state)
    # Int8Params: row-wise absmax of the fp16 weight; MatMul8bitFp multiplies back by absmax / 127.
    codes, absmax, _ = F.int8_vectorwise_quant(source.to(torch.float16))
    return codes.to(torch.float32).mul_(absmax.unsqueeze(1).mul(1.0 / 127.0))


def _write_shard(src: Path, dst: Path, plan: Plan, out_code: str) -> int:
    """Merge one shard tensor by tensor: read it, change it if the plan says so, write it, let it go.

    The output header (names, dtypes, shapes, offsets) follows from the source header, so nothing is
    collected in memory first; returns the size of the tensor data written.
    """
    import torch

    metadata, infos = read_header(src)
    entries = [(key, out_code if info["dtype"] in FLOAT_CODES else info["dtype"], info["shape"])
               for key, info in infos.items()]
    target = getattr(torch, SAFETENSORS_DTYPES[out_code][1])

    def produce(key: str) -> Any:
        tensor = read_tensor(src, key, infos)
        if plan.touches(key):
            tensor = plan.tensor(key, tensor)
        return tensor.to(target) if tensor.is_floating_point() else tensor

    return write_safetensors(dst, entries, produce, metadata or {"format": "pt"})


def _tokenizer(adapter_dir: Path, base_dir: Path) -> Any:
    """The run's tokenizer (it may carry the chat template training used), else the base's."""
    from transformers import AutoTokenizer

    from lora_cli.adapters import tokenizer_folder

    home = tokenizer_folder(adapter_dir, str(base_dir))
    try:
        return AutoTokenizer.from_pretrained(str(home))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {home}: {str(exc).strip().splitlines()[0]}") from None


def _check_vocab(tokenizer: Any, layout: Layout, config: dict[str, Any]) -> None:
    """Every token id the tokenizer can produce must have an embedding row, or generation indexes past the end."""
    rows = next((shape[0] for key, shape in layout.shapes.items() if key.endswith("embed_tokens.weight")),
                config.get("vocab_size"))
    if rows is not None and len(tokenizer) > rows:
        raise ModelInputError(f"the tokenizer has {len(tokenizer)} tokens but the base's embeddings only {rows} rows "
                              "(tokens were added without resizing them); lora merge cannot fold that in")


def self_check(folder: Path, base_dir: Path, adapter_dir: Path, tokenizer: Any, plan: Plan,
               out_code: str) -> tuple[float, float]:
    """Largest |logit| difference on a fixed probe between the merged folder and base + adapter, both in fp32.

    The reference is what was trained: for a merge into dequantized weights, the 4-bit or 8-bit base
    quantized as in training. The two models are loaded one after the other, to need memory for one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora_cli.adapters import attach_adapter

    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :64]
    fix = "its adapter_config.json does not match its weights or this base (nothing was kept)"
    expected = _probe(lambda: attach_adapter(_reference_base(base_dir, plan), adapter_dir, str(base_dir), fix), ids)
    got = _probe(lambda: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), ids)
    diff = (got - expected).abs().max().item()
    if out_code == "F32":
        return diff, FP32_TOLERANCE
    eps = torch.finfo(torch.bfloat16 if out_code == "BF16" else torch.float16).eps
    return diff, max(FP32_TOLERANCE, LOW_PRECISION_EPS_FACTOR * eps * expected.abs().max().item())


def _probe(load: Callable[[], Any], ids: Any) -> Any:
    """The fp32 logits of a model on `ids`; the model is gone when this returns (any tensor of it kept alive
    would keep the whole memory-mapped file it was loaded from resident)."""
    import torch

    model = load().eval()
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            module.train()  # eval-mode int8 also rounds the activations; training computed x @ dequantized W
    del module
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    del model
    gc.collect()
    return logits


def _reference_base(base_dir: Path, plan: Plan) -> Any:
    """The base the adapter runs on unmerged, in fp32: quantized exactly as in training where it was."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_cli import models

    if not plan.quantization:
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    import bitsandbytes as bnb

    source = models.ModelSource(str(base_dir), str(base_dir), None, local=True)
    model = models.load_base_model(source, precision="fp32", quantization=plan.quantization)
    layout = _read_layout(base_dir)
    for name, module in model.named_modules():
        if plan.train_dtype == torch.float32 or not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        # Training quantized the weights cast to its precision: do the same (fp32 loading quantizes fp32 ones).
        shard = base_dir / layout.weight_map[name + ".weight"]
        weight = read_tensor(shard, name + ".weight", read_header(shard)[1]).to(plan.train_dtype)
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                              blocksize=64, module=module).to("cpu")
            module.weight.quant_state.dtype = torch.float32
        else:
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    return model
