"""Attention over packed rows that never looks across examples and never computes across them either.

Packing puts several examples in one row. transformers then builds a block-diagonal causal mask and
SDPA computes the whole row x row score matrix, masking most of it away: on a CPU that is a third
of a training step (packed rows of ~500 tokens, 4 examples). This attention takes the example
boundaries the packing collator hands over (`cu_seq_lens_q`, the same kwargs FlashAttention uses)
and runs plain causal attention on each example alone, which is the same result for a quarter of
the work. Anything that is not a packed row (padded batches, generation with a cache) goes to
transformers' own SDPA attention with its usual mask.

In bf16, where the compiled CPU kernels build (lora_cli/cpu_kernels.py), a packed row's attention is one
compiled call forward and one backward, for all its examples: causal blocks only, in fp32, where PyTorch
runs a dozen kernels per example over the whole square of scores.
"""

from __future__ import annotations

import functools
from typing import Any

NAME = "lora_packed_sdpa"

# Up to this many tokens an example's attention is done with two matmuls and a softmax, which beat
# the CPU flash kernel at these sizes (its backward is slow: 7% of a step on the default model);
# above it the flash kernel's O(n) memory matters more (eager keeps n^2 scores a head).
# (lora_cli/estimate.py reads this value.)
EAGER_MAX_TOKENS = 256

# The compiled kernel's backward holds two fp32 (tokens x tokens) blocks per head and example (the
# probabilities and their gradients): rows whose examples need more take the path above instead.
COMPILED_MAX_SCRATCH_BYTES = 256 * 2**20


def register() -> str:
    """Make NAME a valid `attn_implementation` (idempotent); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    # The usual SDPA mask is still built, for the inputs that are not packed rows.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def packed_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Same contract as transformers' `sdpa_attention_forward`: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    starts = bounds.tolist() if bounds is not None else []
    lengths = [end - start for start, end in zip(starts, starts[1:])]
    # A sliding window shorter than an example (Mistral v0.1, Gemma) goes to transformers' SDPA too, whose
    # mask for packed rows has it. The layer says so in its kwargs, else (some models) as an attribute.
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    if (bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or (window and max(lengths) > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # bounds that do not cover the row exactly (the collator's always do) go to the split below, which refuses them
    if not dropout and _compiled_takes(query, key, value, starts):
        return _compiled_function().apply(query, key, value, bounds, scale), None
    groups = query.shape[1] // key.shape[1]
    # split, not slicing: the backward of a split is one concatenation, where each slice's backward
    # would write a whole-row zero tensor and add it into the gradient.
    outputs = []
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        if q.shape[2] <= EAGER_MAX_TOKENS:
            out = _eager_causal(q, k, v, groups, scale, dropout)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=groups > 1)
        outputs.append(out.transpose(1, 2))
    # concatenating (batch, seq, heads, dim) views gives the contiguous output layout in one copy
    return torch.cat(outputs, dim=1), None


def _eager_causal(q: Any, k: Any, v: Any, groups: int, scale: float, dropout: float) -> Any:
    """Causal attention on one example: (1, heads, seq, dim) in and out, in as few kernels as it takes."""
    import torch

    batch, kv_heads, length, dim = k.shape
    # Grouped-query attention without copying the keys: fold each group's query heads into rows.
    # The scale goes on q (seq x dim) rather than the scores (seq x seq); the causal mask is added by
    # the matmul itself (baddbmm), which saves a masked_fill and a multiply, forward and backward.
    q = (q * scale).reshape(batch * kv_heads, groups * length, dim)
    k = k.reshape(batch * kv_heads, length, dim)
    scores = torch.baddbmm(_causal_bias(length, groups, q.dtype, q.device), q, k.transpose(1, 2))
    probs = torch.softmax(scores, dim=-1)  # the CPU and CUDA kernels accumulate bf16/fp16 in fp32
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.bmm(probs, v.reshape(batch * kv_heads, length, dim))
    return out.view(batch, kv_heads * groups, length, dim)


@functools.lru_cache(maxsize=64)
def _causal_bias(length: int, groups: int, dtype: Any, device: Any) -> Any:
    """0 on and below the diagonal, -inf above, repeated for the query heads that share a key head."""
    import torch

    bias = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)
    return bias.repeat(groups, 1)


def compiled_applies(model: Any, precision: str, device: str) -> bool:
    """Whether this model's packed rows will go through the compiled kernel in training: its attention is this
    module's, bf16 on a CPU where the kernels build, no attention dropout, heads `compiled_shape_fits` (each call
    still checks its own tensors, and takes the other path where they differ)."""
    from lora_cli import cpu_kernels

    config = model.config
    heads = getattr(config, "num_attention_heads", 0) or 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return (getattr(config, "_attn_implementation", None) == NAME and device == "cpu" and precision == "bf16"
            and not getattr(config, "attention_dropout", 0.0) and compiled_shape_fits(heads, kv_heads, head_dim)
            and cpu_kernels.available())


def compiled_shape_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the compiled kernel takes attention of this shape: whole 64-wide head blocks, query heads a
    multiple of the key heads (lora_cli/estimate.py asks too)."""
    from lora_cli.cpu_kernels import ATTENTION_DIM_BLOCK

    return heads > 0 and kv_heads > 0 and heads % kv_heads == 0 and head_dim % ATTENTION_DIM_BLOCK == 0


def _compiled_takes(query: Any, key: Any, value: Any, starts: list[int]) -> bool:
    from lora_cli import cpu_kernels

    lengths = [end - start for start, end in zip(starts, starts[1:])]
    return compiled_scratch_bytes(query.shape[1], lengths) <= COMPILED_MAX_SCRATCH_BYTES \
        and cpu_kernels.attention_takes(query, key, value, starts)


def compiled_scratch_bytes(heads: int, lengths: list[int]) -> int:
    """About what the compiled backward holds for examples of these lengths (rows and keys padded to blocks)."""
    return sum(2 * heads * (n + 24) * (n + 64) * 4 for n in lengths)


@functools.cache
def _compiled_function() -> Any:
    import torch
    from torch.autograd.function import once_differentiable

    from lora_cli import cpu_kernels

    class CompiledAttention(torch.autograd.Function):
        """Causal attention within each example of a packed row, through the compiled kernels."""

        @staticmethod
        def forward(ctx: Any, query: Any, key: Any, value: Any, bounds: Any, scale: float) -> Any:
            starts = bounds.to(device="cpu", dtype=torch.int64).contiguous()
            out, lse = cpu_kernels.attention(query, key, value, starts, scale)
            ctx.save_for_backward(query, key, value, out, lse, starts)
            ctx.scale = scale
            return out

        @staticmethod
        @once_differentiable  # the compiled backward is not itself differentiable
        def backward(ctx: Any, grad: Any) -> tuple[Any, Any, Any, None, None]:
            query, key, value, out, lse, starts = ctx.saved_tensors
            return (*cpu_kernels.attention_backward(grad, query, key, value, out, lse, starts, ctx.scale), None, None)

    return CompiledAttention
