"""Target-module presets: the user's words (`qv`, `attention`, `all-linear`) to PEFT module names."""

from __future__ import annotations

# LLaMA-architecture projection names; the MLP ones are what "all-linear" adds to attention.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "attention": ATTENTION,
    "mlp": MLP,
    "all-linear": ATTENTION + MLP,
}


def expand_target_modules(spec: str | list[str]) -> list[str]:
    """Turn a preset name or a comma list into the module names PEFT's `target_modules` takes."""
    if isinstance(spec, list):
        return [name.strip() for name in spec if name.strip()]
    if spec in PRESETS:
        return list(PRESETS[spec])
    return [name.strip() for name in spec.split(",") if name.strip()]
