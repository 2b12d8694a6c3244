"""The input gradients of the frozen projections through int8 matmuls, on CPUs where those are fast.

LoRA freezes the base weights, so the backward of a frozen projection computes one thing: the gradient
of its input, `grad @ W`, which carries the error down to the adapters beneath it. On CPUs with VNNI,
int8 matmuls run at 4x the fp32 rate (1.0 against 0.25 TOP/s on a 2-core Xeon without AMX), so on such
a CPU, when training runs in fp32, that product is computed from int8: the gradient quantized with one
scale per row (token), the weight with one scale per input channel, multiplied exactly in int32 and
scaled back. The forward stays exact, so the adapter is fitted to the model it will be used with; only
the gradients carry the rounding, as in SwitchBack (Wortsman et al., 2023), which also moves the
forward to int8. That costs quality here (README, Performance: "tried and not kept"), this does not.
"""

from __future__ import annotations

import functools
from typing import Any


def quantize(values: Any, dim: int) -> tuple[Any, Any]:
    """fp32 -> int8 values and the fp32 scales that bring them back: the largest magnitude over `dim`
    maps to 127 (dim=1: one scale per row, dim=0: one per column; kept as a size-1 dimension, so that
    multiplying by it broadcasts)."""
    import torch

    scale = values.abs().amax(dim=dim, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny).div_(127)
    return torch.div(values, scale).round_().to(torch.int8), scale


def enable(model: Any) -> int:
    """Route the input gradient of every frozen fp32 `nn.Linear` but the output layer through int8.

    Returns how many projections it changed. The output layer is left alone: the chunked loss runs
    its own matmuls (lora_cli/loss.py). Trainable layers (LoRA's A and B) and bitsandbytes' quantized
    layers are not plain frozen fp32 `nn.Linear`s and are left alone too.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = 0
    for module in model.modules():
        if (type(module) is not torch.nn.Linear or module is head or module.weight.requires_grad
                or module.weight.dtype != torch.float32):
            continue
        # one scale per input feature (a column of W): the columns of grad @ W are the input features
        weight_int8, column_scale = quantize(module.weight.detach(), dim=0)
        module.forward = functools.partial(_forward, module, weight_int8, column_scale)
        changed += 1
    return changed


def _forward(module: Any, weight_int8: Any, column_scale: Any, x: Any) -> Any:
    import torch

    if not (torch.is_grad_enabled() and x.requires_grad):  # evaluation, or nothing below needs a gradient
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return _function().apply(x, module.weight, module.bias, weight_int8, column_scale)


@functools.cache
def _function() -> Any:
    """The autograd function, built on first use so that importing this module does not import torch."""
    import torch

    class Int8InputGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, weight_int8: Any, column_scale: Any) -> Any:
            ctx.weight_int8, ctx.column_scale = weight_int8, column_scale
            return torch.nn.functional.linear(x, weight, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None, None, None]:
            values, row_scale = quantize(grad.reshape(-1, grad.shape[-1]), dim=1)  # one scale per token
            grad_x = torch._int_mm(values, ctx.weight_int8).mul(row_scale).mul_(ctx.column_scale)
            return grad_x.view(*grad.shape[:-1], -1), None, None, None, None

    return Int8InputGradient
