"""Attention over packed rows that never looks across examples and never computes across them either.

Packing puts several examples in one row. transformers then builds a block-diagonal causal mask and
SDPA computes the whole row x row score matrix, masking most of it away: on a CPU that is a third
of a training step (packed rows of ~500 tokens, 4 examples). This attention takes the example
boundaries the packing collator hands over (`cu_seq_lens_q`, the same kwargs FlashAttention uses)
and runs plain causal attention on each example alone, which is the same result for a quarter of
the work. Anything that is not a packed row (padded batches, generation with a cache) goes to
transformers' own SDPA attention with its usual mask.
"""

from __future__ import annotations

from typing import Any

NAME = "lora_packed_sdpa"

# Up to this many tokens an example's attention is done with two matmuls and a softmax, which beat
# the CPU flash kernel at these sizes (its backward is slow: 7% of a step on the default model);
# above it the flash kernel's O(n) memory matters more (eager keeps n^2 scores a head).
# (lora_cli/estimate.py reads this value.)
EAGER_MAX_TOKENS = 256


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
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    bounds = bounds.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if end - start <= EAGER_MAX_TOKENS:
            outputs.append(_eager_causal(q, k, v, groups, scale, dropout))
        else:
            outputs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=groups > 1))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _eager_causal(q: Any, k: Any, v: Any, groups: int, scale: float, dropout: float) -> Any:
    import torch

    batch, kv_heads, length, dim = k.shape
    # Grouped-query attention without copying the keys: fold each group's query heads into rows.
    q = q.reshape(batch, kv_heads, groups * length, dim)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = scores.view(batch, kv_heads, groups, length, length)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.view(batch, kv_heads, groups * length, length), v)
    return out.view(batch, kv_heads * groups, length, dim)
