"""bf16 training on a CPU: the frozen projections multiply through weights oneDNN has laid out once.

A bf16 matmul on a CPU runs in oneDNN, which wants the weight in its own blocked layout. Handed a
plain `nn.Linear` weight, it copies the weight into that layout again on every call: twice a step
for each frozen projection (the forward, `x @ W.T`, and the input gradient, `grad @ W`), some 200 MB
of weights read and rewritten per pass on the default model. Here each frozen projection gets both
layouts made once, and its forward and input gradient run on them: the same kernels, so the same
numbers bit for bit, for 2x the projections' bf16 weights in memory (lora_cli/estimate.py counts them).

Inference (`lora generate`, `lora eval`) packs the forward layout only, where the copy fits in the memory
that is free. There the repacking matters most: a token generated multiplies one row by every weight,
and repacking a weight costs more than multiplying one row by it (a 576 x 1536 projection, one row:
80 against 50 us).
"""

from __future__ import annotations

import functools
from typing import Any

# oneDNN picks the blocking for a typical number of rows; any number of rows still works. A packed
# row of the default benchmark holds about 500 tokens.
ROWS_HINT = 512


def applies(precision: str, quantization: str | None, device: str) -> bool:
    """bf16 training on a CPU whose oneDNN has native bf16 kernels, with plain (not quantized or sharded) weights."""
    if device != "cpu" or precision != "bf16" or quantization is not None:
        return False
    import torch

    from lora_cli.models import sharded_engine

    if sharded_engine() or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return (all(hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def enable(model: Any, training: bool = True) -> int:
    """Give every frozen bf16 `nn.Linear` but the output layer its packed weights; returns how many.

    The output layer runs inside the chunked loss (lora_cli/loss.py): in training, its two layouts are
    kept on it for that loss to multiply through (not counted in the number returned). LoRA's A and B are
    trained, so their weights change every step. `training=False`: the forward layout only, for a model that
    computes no gradients. `disable` undoes it (before anything changes the base weights, a merge say).
    """
    import torch

    changed = 0
    for module in _frozen_projections(model, training):
        weight = module.weight.detach()
        if training:
            module.forward = functools.partial(_forward, module, *_layouts(weight))
        else:
            module.forward = functools.partial(_forward_only, module,
                                               torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT))
        changed += 1
    if training:
        _pack_output_layer(model)
    return changed


def _pack_output_layer(model: Any) -> None:
    """The frozen bf16 output layer's two layouts, for the chunked loss (lora_cli/loss.py) to multiply through:
    the logits chunk by chunk, then their gradient back to the hidden states (8-12% faster per chunk than
    `torch.matmul`, which lays the 28M-cell weight out anew on every call)."""
    import torch

    from lora_cli.loss import HEAD_LAYOUTS, supports_chunked_loss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_output_embeddings") or not supports_chunked_loss(base):
        return
    head = base.get_output_embeddings()
    if head.weight.dtype != torch.bfloat16 or head.weight.device.type != "cpu":
        return
    setattr(head, HEAD_LAYOUTS, _layouts(head.weight.detach()))


def _layouts(weight: Any) -> tuple[Any, Any]:
    """A frozen weight in oneDNN's layout twice: the forward multiplies by W.T, the input gradient by W."""
    import torch

    reorder = torch.ops.mkldnn._reorder_linear_weight
    return reorder(weight, ROWS_HINT), reorder(weight.t(), ROWS_HINT)


def enable_for_inference(model: Any, precision: str, quantization: str | None) -> int:
    """The forward layout for a model that only runs forward (generate, eval), where packing applies and
    the copy leaves a quarter of the free memory free; returns how many projections were packed."""
    import psutil
    import torch

    if not applies(precision, quantization, "cuda" if torch.cuda.is_available() else "cpu"):
        return 0
    copy_bytes = sum(module.weight.numel() * module.weight.element_size()
                     for module in _frozen_projections(model, training=False))
    if copy_bytes > 0.75 * psutil.virtual_memory().available:
        return 0
    return enable(model, training=False)


def _frozen_projections(model: Any, training: bool) -> list[Any]:
    """The bf16 `nn.Linear`s on the CPU but the output layer; in training, only the frozen ones (a model
    that only runs forward may not have marked its weights frozen: a plain or merged model)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [module for module in model.modules()
            if type(module) is torch.nn.Linear and module is not head
            and not (training and module.weight.requires_grad)
            and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"]


def disable(model: Any) -> int:
    """Back to plain `nn.Linear` forwards, the packed copies freed; returns how many were packed."""
    from lora_cli.loss import HEAD_LAYOUTS
    from lora_cli.models import restore_forwards

    for module in model.modules():
        if HEAD_LAYOUTS in module.__dict__:
            delattr(module, HEAD_LAYOUTS)
    return restore_forwards(model, (_forward, _forward_only))


def _forward(module: Any, forward_layout: Any, backward_layout: Any, x: Any) -> Any:
    import torch

    # under autocast an input may come in fp32 (F.linear would cast it): the packed weights are bf16
    return _function().apply(x.to(torch.bfloat16), module.weight, module.bias, forward_layout, backward_layout)


def _forward_only(module: Any, forward_layout: Any, x: Any) -> Any:
    import torch

    return multiply(x.to(torch.bfloat16), forward_layout, module.bias)


def multiply(x: Any, layout: Any, bias: Any = None) -> Any:
    """`x` (bf16) times a weight in one of the layouts `_layouts` makes: oneDNN's packed matmul, plus `bias`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, layout, bias, "none", [], "")


@functools.cache
def _function() -> Any:
    """The autograd function, built on first use so that importing this module does not import torch."""
    import torch

    class PackedLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, forward_layout: Any, backward_layout: Any) -> Any:
            ctx.backward_layout = backward_layout
            return multiply(x, forward_layout, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None, None, None]:
            # the weight is frozen: only the input's gradient, grad @ W
            return multiply(grad.to(torch.bfloat16), ctx.backward_layout), None, None, None, None

    return PackedLinear
