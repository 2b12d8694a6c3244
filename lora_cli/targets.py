"""Target-module presets: the user's words (`qv`, `attention`, `all-linear`) to PEFT module names."""

from __future__ import annotations

from lora_cli.errors import ConfigError

# LLaMA-architecture projection names; the MLP ones are what "all-linear" adds to attention.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "attention": ATTENTION,
    "mlp": MLP,
    "all-linear": ATTENTION + MLP,
}


# Models that fuse projections (Phi-3: qkv_proj, gate_up_proj) have no separate q/k/v or gate/up layer:
# a preset naming one of those adapts the fused layer that holds it.
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def for_model(spec: str | list[str], available: set[str]) -> tuple[list[str], list[str]]:
    """The module names to adapt in a model whose linear layers are `available`, and a note for each
    fused layer a preset's names went to ("qkv_proj (for q_proj, k_proj, v_proj)"). Names the user listed are taken as given
    (add_lora refuses the missing ones); presets follow the model."""
    names = expand_target_modules(spec)
    if not (isinstance(spec, str) and spec in PRESETS):
        return names, []
    resolved: list[str] = []
    held: dict[str, list[str]] = {}
    for name in names:
        fused = FUSED.get(name)
        chosen = fused if name not in available and fused in available else name
        if chosen != name:
            held.setdefault(chosen, []).append(name)
        if chosen not in resolved:
            resolved.append(chosen)
    return resolved, [f"{fused} (for {', '.join(parts)})" for fused, parts in held.items()]


def check_present(targets: list[str], available: set[str]) -> None:
    """Every named module must exist: PEFT only refuses a list that matches nothing at all."""
    missing = [t for t in targets if t not in available]
    if missing:
        held = [f"{t} is inside {FUSED[t]}" for t in missing if FUSED.get(t) in available]
        raise ConfigError(f"--target-modules {','.join(missing)} not found in this model"
                          + (f" ({'; '.join(held)})" if held else "") + "; it has: " + ", ".join(sorted(available)))


def expand_target_modules(spec: str | list[str]) -> list[str]:
    """Turn a preset name or a comma list into the module names PEFT's `target_modules` takes."""
    if isinstance(spec, list):
        return [name.strip() for name in spec if name.strip()]
    if spec in PRESETS:
        return list(PRESETS[spec])
    return [name.strip() for name in spec.split(",") if name.strip()]
