"""The one typed configuration of `lora train`: defaults, YAML loading, flag overrides, validation.

Data flows one way: dataclass defaults < YAML file < command-line flags -> `TrainConfig` -> the
functions that build the model, the data and the Trainer. Field names are the ones of the library
they feed (`r`, `lora_alpha`, `learning_rate`...) so values pass through without translation;
`FLAGS` maps each field to the user's word for it on the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
FORMATS = ("auto", "instruction", "chat", "sharegpt", "completion", "text")
TEMPLATES = ("auto", "chat", "alpaca")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class ModelConfig:
    """Which base model, and how its frozen weights are held in memory."""

    name: str = DEFAULT_MODEL  # a short name (llama-7b), a hub id, or a local folder
    revision: str | None = None  # hub branch, tag or commit
    use_4bit: bool = False  # QLoRA: NF4 with double quantization (bitsandbytes)
    use_8bit: bool = False  # LLM.int8() frozen weights (bitsandbytes)
    # auto = bf16 where the hardware computes it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32.
    precision: str = "auto"
    # The input gradients of the frozen projections through int8 matmuls; the forward stays exact.
    # None = auto: on for fp32 training on a CPU whose int8 matmuls are fast (lora_cli/int8_backward.py).
    int8_backward: bool | None = None
    trust_remote_code: bool = False  # never run code from a model repository unless asked
    allow_pickle_weights: bool = False  # weights load from safetensors only: unpickling can run code

    @property
    def quantization(self) -> str | None:
        """"4bit", "8bit" or None: the bitsandbytes mode of the frozen weights."""
        return "4bit" if self.use_4bit else "8bit" if self.use_8bit else None


@dataclass
class LoraSettings:
    """The adapter: fields are peft.LoraConfig's own names."""

    r: int = 8
    # alpha = 2r is the common choice; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).
    lora_alpha: int = 16
    # No dropout by default: on CPU its Bernoulli masks cost 40% of a training step on the default model
    # (0.89 vs 1.48 s), and the embedded facts are still learned (README, Performance).
    lora_dropout: float = 0.0
    # All linear layers: on small data, adapting q/v only barely learns (FACTS.md: 0 vs 8 of 30 facts at 2e-4).
    target_modules: str = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


@dataclass
class DataConfig:
    """What to train on and how rows become token sequences."""

    path: str | None = None  # None: the embedded default dataset
    format: str = "auto"  # detected from the columns unless named
    template: str = "auto"  # the tokenizer's chat template when it has one, else alpaca
    max_seq_len: int = 512
    # Packing concatenates examples into one row with restarting position ids and no attention
    # across examples: no padding at all (FACTS.md: 273 vs 208 real tok/s in fp32).
    packing: bool = True
    train_on_inputs: bool = False  # False: the loss covers only responses and their EOS
    eval_data: str | None = None  # a held-out file; the embedded dataset brings its own
    eval_split: float = 0.0  # else a fraction of the training rows held out for evaluation


@dataclass
class TrainingConfig:
    """Optimisation and bookkeeping: fields are transformers.TrainingArguments' own names."""

    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    # None = auto: 1e-3 below one billion parameters, 2e-4 above (the QLoRA paper's rate for 7B+).
    # Small models on small data barely move at 2e-4 (FACTS.md: 0 of 30 facts; 30 of 30 at 1e-3).
    learning_rate: float | None = None
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # a float below 1 is a share of the total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 5
    save_steps: int = 200
    eval_steps: int | None = None  # None: evaluate whenever a checkpoint is saved
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    report_to: str = "none"


@dataclass
class TrainConfig:
    """Everything `lora train` needs, resolved once and recorded in the run's manifest."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str | None = None  # None: runs/<timestamp>-<model>
    resume: bool = False
    overwrite: bool = False
    push_to_hub: str | None = None  # a hub repository the finished adapter is uploaded to

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_record(self) -> dict[str, Any]:
        """to_dict with local paths made absolute: what the manifest keeps, so that `--resume` finds
        the model and the data from any working directory."""
        record = self.to_dict()
        for key in PATH_KEYS:
            section, name = key.split(".")
            record[section][name] = absolute_if_local(record[section][name])
        return record


# Options that may name local files or folders (a model name may also be a hub id or a short name).
PATH_KEYS = ("model.name", "data.path", "data.eval_data")


def absolute_if_local(value: Any) -> Any:
    """An existing local path made absolute; anything else (a hub id, a short name, None) as it is."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


# The command-line word for each field, used for flags and in every error message.
FLAGS: dict[str, str] = {
    "model.name": "--model",
    "model.revision": "--revision",
    "model.use_4bit": "--use-4bit",
    "model.use_8bit": "--use-8bit",
    "model.precision": "--precision",
    "model.int8_backward": "--int8-backward",
    "model.trust_remote_code": "--trust-remote-code",
    "model.allow_pickle_weights": "--allow-pickle-weights",
    "lora.r": "--rank",
    "lora.lora_alpha": "--alpha",
    "lora.lora_dropout": "--dropout",
    "lora.target_modules": "--target-modules",
    "lora.use_dora": "--dora",
    "lora.use_rslora": "--rslora",
    "data.path": "--data",
    "data.format": "--format",
    "data.template": "--template",
    "data.max_seq_len": "--max-seq-len",
    "data.packing": "--packing",
    "data.train_on_inputs": "--train-on-inputs",
    "data.eval_data": "--eval-data",
    "data.eval_split": "--eval-split",
    "training.num_train_epochs": "--epochs",
    "training.max_steps": "--max-steps",
    "training.per_device_train_batch_size": "--batch-size",
    "training.gradient_accumulation_steps": "--grad-accum",
    "training.learning_rate": "--lr",
    "training.lr_scheduler_type": "--scheduler",
    "training.warmup_steps": "--warmup",
    "training.weight_decay": "--weight-decay",
    "training.max_grad_norm": "--max-grad-norm",
    "training.seed": "--seed",
    "training.logging_steps": "--logging-steps",
    "training.save_steps": "--save-steps",
    "training.eval_steps": "--eval-steps",
    "training.save_total_limit": "--save-total-limit",
    "training.gradient_checkpointing": "--gradient-checkpointing",
    "training.report_to": "--report-to",
    "output_dir": "--output-dir",
    "resume": "--resume",
    "overwrite": "--overwrite",
    "push_to_hub": "--push-to-hub",
}


def flag(key: str) -> str:
    """How a field is named in messages: by its flag (the YAML key is listed beside it in FLAGS and --help)."""
    return FLAGS.get(key, key)


def default(key: str) -> Any:
    """The default value of a dotted field, for help texts: defaults live only in the dataclasses."""
    return _get(TrainConfig(), key)


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _flatten_yaml(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Nested YAML sections -> dotted keys, rejecting unknown keys with a suggestion."""
    known = set(FLAGS)
    sections = {k.split(".")[0] for k in known if "." in k}
    flat: dict[str, Any] = {}
    problems = []
    # a leaf name typed without its section, or a flag name typed as a key
    leaf = {k.split(".")[-1]: k for k in known}
    by_flag = {v.lstrip("-").replace("-", "_"): k for k, v in FLAGS.items()}
    for top, value in data.items():
        if top in sections and value is None:  # a section whose keys are all commented out
            continue
        if top in sections and not isinstance(value, dict):
            example = next(k.split(".", 1)[1] for k in FLAGS if k.startswith(f"{top}."))
            problems.append(f"'{top}' in {source} must be a section of keys (such as {top}: {{{example}: ...}}), "
                            f"not {type(value).__name__} {value!r}")
            continue
        if top in sections:
            items = [(f"{top}.{k}", v) for k, v in value.items()]
        else:
            items = [(str(top), value)]
        for key, val in items:
            if key in known:
                if val is not None:  # `key:` with no value, or null, leaves the default (as leaving it out does)
                    flat[key] = val
                continue
            # a misspelt section (modle:, trainig:) is matched against the sections first, then any key
            section = difflib.get_close_matches(key, sections, n=1, cutoff=0.6) \
                if "." not in key and (isinstance(value, dict) or key not in leaf) else []
            close = section or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = close[0] if close else leaf.get(key.split(".")[-1]) or by_flag.get(key.split(".")[-1])
            problems.append(f"unknown key '{key}' in {source}" + (f" (did you mean '{hint}'?)" if hint else ""))
    if problems:
        raise ConfigError("; ".join(problems))
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe, or a run's lora_run.json, into dotted keys; a missing or malformed file is a usage error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"--config {path} is not valid YAML{where}; fix the file or check its indentation") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of sections (model:, lora:, data:, training:)")
    if isinstance(data.get("config"), dict) and "status" in data:
        # a run's manifest (lora_run.json, JSON being YAML): its recorded options as the recipe of a new run,
        # less where and how that run was started and the speed choice made for its machine
        flat = _flatten_yaml(data["config"], f"{path} (its 'config')")
        return {key: value for key, value in flat.items() if key not in NOT_RESTORED}
    return _flatten_yaml(data, str(path))


def _coerce(key: str, value: Any, template: Any) -> Any:
    """Check one value against the type of its default; YAML gives ints for floats and the like."""
    expected = type(template)
    if value is None:
        return None
    if isinstance(template, bool) or key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{flag(key)} must be true or false, got {value!r}")
    if key in _FLOAT_KEYS or expected is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text; it is a number to anyone writing it
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):  # inf and nan read as floats, and break training later
            raise ConfigError(f"{flag(key)} must be a finite number, got {value!r}")
        return number
    if expected is int or key in _INT_KEYS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{flag(key)} must be an integer, got {value!r}")
    if isinstance(value, list) and key == "lora.target_modules":
        return ",".join(str(v) for v in value)
    if isinstance(value, (list, dict)) or (isinstance(value, (int, float)) and key != "model.name"):
        one = " (one file or a folder of files)" if key.startswith("data.") else ""
        raise ConfigError(f"{flag(key)} must be text{one}, got {value!r}")
    return str(value)


_INT_KEYS = {"training.eval_steps"}
_BOOL_KEYS = {"model.int8_backward"}  # true, false, or left out for auto
_FLOAT_KEYS = {"training.learning_rate", "training.warmup_steps", "data.eval_split", "lora.lora_dropout"}


# What a resumed run may change: how long it goes on and how it is watched. Everything else (the model,
# the adapter's shape, the data, the optimisation) is the run's own, restored from its manifest.
RESUMABLE = {"training.num_train_epochs", "training.max_steps", "training.save_steps", "training.save_total_limit",
             "training.logging_steps", "training.eval_steps", "training.report_to", "push_to_hub"}
# Never restored: where and how this command runs, a speed choice made for the machine at hand, and an
# upload (asked again where wanted: a resume offline must not fail on it).
NOT_RESTORED = {"output_dir", "resume", "overwrite", "model.int8_backward", "push_to_hub"}


def build_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 recorded: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML < flags, then validation of the whole; flags left unset are None and ignored.

    `recorded` is the configuration a run started with (`TrainConfig.to_record()`, from its manifest): a
    resumed run takes it as it was, and YAML or flags may only change what RESUMABLE lists.
    """
    cfg = TrainConfig()
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if recorded is not None:
        values = _resumed(values, recorded)
    for key, value in values.items():
        if key not in FLAGS:
            raise ConfigError(f"unknown option '{key}'")
        _set(cfg, key, _coerce(key, value, _get(TrainConfig(), key)))
    validate(cfg)
    return cfg


def _resumed(asked: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded options, with what YAML and flags ask on top; asking to change any other is refused."""
    restored = {key: _get_dict(recorded, key) for key in FLAGS if key not in NOT_RESTORED}
    restored = {key: value for key, value in restored.items() if value is not _MISSING}
    asked = {key: absolute_if_local(value) if key in PATH_KEYS else value for key, value in asked.items()}
    conflicts = [f"{flag(key)} {value!r} (the run has {restored[key]!r})" for key, value in asked.items()
                 if key in restored and key not in RESUMABLE
                 and _coerce(key, value, _get(TrainConfig(), key)) != restored[key]]
    if conflicts:
        raise ConfigError("--resume continues a run with its own options; drop " + ", ".join(conflicts)
                          + ", or start a new run without --resume")
    epochs = asked.get("training.num_train_epochs")
    if (epochs is not None and "training.max_steps" not in asked
            and _coerce("training.num_train_epochs", epochs, 0.0) != restored.get("training.num_train_epochs")):
        # a new --epochs asks for a length in epochs, whatever the run had; the recipe's own count
        # (the same YAML given again) leaves a --max-steps run as it was
        asked = {**asked, "training.max_steps": -1}
    return {**restored, **asked}


_MISSING = object()


def _get_dict(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def check_precision(precision: str) -> None:
    """The --precision of the commands that only load a model (train checks its own in validate)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def validate(cfg: TrainConfig) -> None:
    """Collect every problem, then fail once with all of them on one line."""
    problems: list[str] = []

    def check(ok: bool, key: str, need: str) -> None:
        if not ok:
            problems.append(f"{flag(key)} must be {need}, got {_get(cfg, key)!r}")

    check(cfg.lora.r > 0, "lora.r", "a positive integer")
    check(cfg.lora.lora_alpha > 0, "lora.lora_alpha", "a positive number")
    check(0 <= cfg.lora.lora_dropout < 1, "lora.lora_dropout", "in [0, 1)")
    check(bool(cfg.lora.target_modules.strip(",; ")), "lora.target_modules", "a preset (qv, attention, mlp, all-linear) or a comma list")
    check(cfg.model.precision in PRECISIONS, "model.precision", "one of " + ", ".join(PRECISIONS))
    check(cfg.data.format in FORMATS, "data.format", "one of " + ", ".join(FORMATS))
    check(cfg.data.template in TEMPLATES, "data.template", "one of " + ", ".join(TEMPLATES))
    check(cfg.data.max_seq_len > 0, "data.max_seq_len", "a positive integer")
    check(0 <= cfg.data.eval_split < 1, "data.eval_split", "in [0, 1)")
    t = cfg.training
    check(t.num_train_epochs > 0, "training.num_train_epochs", "positive")
    check(t.max_steps == -1 or t.max_steps > 0, "training.max_steps", "a positive integer (or -1 for epochs)")
    check(t.per_device_train_batch_size > 0, "training.per_device_train_batch_size", "a positive integer")
    check(t.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps", "a positive integer")
    check(t.learning_rate is None or t.learning_rate > 0, "training.learning_rate", "a positive number")
    check(t.lr_scheduler_type in SCHEDULERS, "training.lr_scheduler_type", "one of " + ", ".join(SCHEDULERS))
    check(t.warmup_steps >= 0, "training.warmup_steps", "a step count or a share below 1")
    check(t.weight_decay >= 0, "training.weight_decay", "zero or positive")
    check(t.max_grad_norm >= 0, "training.max_grad_norm", "zero or positive")
    check(0 <= t.seed < 2**32, "training.seed", "an integer from 0 to 2**32 - 1")
    check(t.logging_steps > 0, "training.logging_steps", "a positive integer")
    check(t.save_steps > 0, "training.save_steps", "a positive integer")
    check(t.eval_steps is None or t.eval_steps > 0, "training.eval_steps", "a positive integer")
    check(t.save_total_limit > 0, "training.save_total_limit", "a positive integer")
    check(t.report_to in ("none", "tensorboard", "wandb"), "training.report_to", "one of none, tensorboard, wandb")
    if cfg.model.use_4bit and cfg.model.use_8bit:
        problems.append("--use-4bit and --use-8bit exclude each other; pick one")
    if cfg.data.eval_data and cfg.data.eval_split:
        problems.append("--eval-data and --eval-split exclude each other; pick one")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it")
    if problems:
        raise ConfigError("; ".join(problems))
