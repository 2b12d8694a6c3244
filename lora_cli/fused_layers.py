"""bf16 training on a CPU: RMSNorm, the rotary embedding and LoRA's added product in fewer passes over memory.

After the matmuls, a bf16 training step on a CPU is hundreds of small elementwise kernels, each a pass
over a (tokens x hidden) tensor, and the passes, not the arithmetic, are what they cost:
- transformers' RMSNorm casts to fp32, squares, averages, multiplies, casts back and multiplies by the
  weight, and its autograd backward takes about ten passes;
- the rotary embedding builds `rotate_half(x)` from two slices, a negation and a concatenation, and the
  slices' backward writes a zero tensor for each half;
- PEFT's LoRA casts its input to fp32 (autocast casts it back to bf16 for the matmul), then scales the
  product and adds it to the frozen layer's output in two more passes, forward and backward.

Here each is one autograd function or one fused kernel, with the same math:
- RMSNorm: one fp32-accumulated pass for the norm, the normalized values rounded to bf16 as
  transformers rounds them, times the weight (3 passes); the backward in 6, in fp32 from the input.
  Where the compiled kernels build (lora_cli/cpu_kernels.py), it is one pass over each row either way;
- the rotary embedding: `x*cos + roll(x)*sin'`, the sign of `rotate_half` folded into `sin'` once per
  forward (3 passes, `addcmul` rounding once where transformers rounds twice); the backward is
  `g*cos + roll(g)*sin''` (3 passes);
- LoRA: `addmm(base(x), x @ A.T, B.T, alpha=scaling)` in the compute dtype (the product accumulated
  in fp32 and rounded once);
- the MLP's `silu(gate) * up`: one compiled pass forward and one backward, where the kernels build
  (lora_cli/cpu_kernels.py), and the rotary embedding one compiled pass each way there too.

Only code that is transformers' own Llama code (compared by bytecode) and plain LoRA layers (one adapter,
no dropout, no DoRA) are touched; anything else keeps its forward. `disable` puts every forward back.
"""

from __future__ import annotations

import functools
import sys
from typing import Any


def applies(precision: str, quantization: str | None, device: str) -> bool:
    """bf16 training on a CPU with plain (not quantized or sharded) layers: where this was measured to pay."""
    from lora_cli.models import sharded_engine

    return device == "cpu" and precision == "bf16" and quantization is None and not sharded_engine()


def enable(model: Any) -> dict[str, int]:
    """Give the model's RMSNorms, rotary embeddings and LoRA layers their fused forms; returns how many of each.

    The rotary embedding is a function of the modeling module (`modeling_llama.apply_rotary_pos_emb`), not
    of a layer: that module's function is replaced, for every model of that architecture in this process,
    until `disable`. It computes the same values, so a model that was not enabled loses nothing.
    """
    from lora_cli import cpu_kernels

    counts = {"norms": 0, "rotary": 0, "lora": 0, "mlp": 0}
    for module in model.modules():
        if _is_llama_rms_norm(module):
            module.forward = functools.partial(_rms_norm_forward, module)
            counts["norms"] += 1
        elif _is_llama_silu_mlp(module) and cpu_kernels.available():  # PyTorch's own ops otherwise: as they are
            module.forward = functools.partial(_mlp_forward, module)
            counts["mlp"] += 1
        elif _is_plain_lora_linear(module):
            module.forward = functools.partial(_lora_forward, module, module.active_adapters[0])
            counts["lora"] += 1
    llama_rotary = _replaced_rotary.get(_llama(), _llama().apply_rotary_pos_emb)
    for code in _modeling_modules(model):
        if code.__dict__.get("apply_rotary_pos_emb") is _rotary:
            counts["rotary"] += 1
        elif _same_code(getattr(code, "apply_rotary_pos_emb", None), llama_rotary) \
                and _same_code(getattr(code, "rotate_half", None), _llama().rotate_half):
            _replaced_rotary[code] = code.apply_rotary_pos_emb
            code.apply_rotary_pos_emb = _rotary
            counts["rotary"] += 1
    return counts


def disable(model: Any) -> int:
    """Every fused forward back to its own; returns how many layers and functions were changed."""
    from lora_cli.models import restore_forwards

    restored = restore_forwards(model, (_rms_norm_forward, _lora_forward, _mlp_forward))
    for code in _modeling_modules(model):
        if code in _replaced_rotary:
            code.apply_rotary_pos_emb = _replaced_rotary.pop(code)
            restored += 1
    _last_sines.clear()
    return restored


_replaced_rotary: dict[Any, Any] = {}  # modeling module -> its own apply_rotary_pos_emb


@functools.cache
def _llama() -> Any:
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _same_code(function: Any, reference: Any) -> bool:
    """The same bytecode, names and constants (docstrings aside): transformers' "Copied from" functions are."""
    code, ref = getattr(function, "__code__", None), reference.__code__
    if code is None:
        return False

    def constants(c: Any) -> tuple:
        return tuple(value for value in c.co_consts if not isinstance(value, str))

    return code.co_code == ref.co_code and code.co_names == ref.co_names and constants(code) == constants(ref)


def _modeling_modules(model: Any) -> list[Any]:
    names = {type(module).__module__ for module in model.modules()}
    return [sys.modules[name] for name in sorted(names) if name in sys.modules]


# --- RMSNorm -------------------------------------------------------------------------------------------

def _is_llama_rms_norm(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return (_same_code(type(module).forward, _llama().LlamaRMSNorm.forward)
            and hasattr(module, "variance_epsilon") and weight is not None and not weight.requires_grad
            and "forward" not in vars(module))


def _rms_norm_forward(module: Any, hidden: Any) -> Any:
    return _rms_norm_function().apply(hidden, module.weight, module.variance_epsilon)


@functools.cache
def _rms_norm_function() -> Any:
    import torch
    from torch.autograd.function import once_differentiable

    from lora_cli import cpu_kernels

    class RMSNorm(torch.autograd.Function):
        """weight * bf16(x / rms(x)), the rms in fp32: transformers' LlamaRMSNorm, for a frozen weight."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, eps: float) -> Any:
            # the same values in one pass over each row where the compiled kernels can be used
            ctx.compiled = weight.shape == x.shape[-1:] and cpu_kernels.handles(x, weight)
            if ctx.compiled:
                x = x.contiguous()
                out, inverse_rms = cpu_kernels.rms_norm(x, weight, eps)
                ctx.save_for_backward(x, inverse_rms, weight)
                return out
            width = x.shape[-1]
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
            inverse_rms = torch.rsqrt(norm.square_().div_(width).add_(eps))
            # the fp32 product written straight into x's dtype: one pass, the rounding transformers does
            normalized = torch.mul(x, inverse_rms, out=torch.empty_like(x))
            # x, not the rounded normalized values: with a gradient along n, g' - n * mean(g' * n) cancels
            # almost exactly, and n rounded to bf16 would leave 1% of g' where fp32 leaves nothing
            ctx.save_for_backward(x, inverse_rms, weight)
            return weight * normalized

        @staticmethod
        @once_differentiable  # the compiled backward is not itself differentiable
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None]:
            x, inverse_rms, weight = ctx.saved_tensors
            if ctx.compiled and cpu_kernels.handles(grad):
                return cpu_kernels.rms_norm_backward(grad, x, inverse_rms, weight), None, None
            # d/dx of n = x * r: r * (g' - n * mean(g' * n)), with g' = grad * weight, all in fp32
            normalized = torch.mul(x, inverse_rms)
            scaled = torch.mul(grad, weight.float())
            mean = torch.mul(scaled, normalized).sum(-1, keepdim=True).div_(x.shape[-1])
            scaled.addcmul_(normalized, mean, value=-1)
            return torch.mul(scaled, inverse_rms, out=torch.empty_like(x)), None, None

    return RMSNorm


# --- the MLP's SwiGLU -------------------------------------------------------------------------------------

def _is_llama_silu_mlp(module: Any) -> bool:
    import torch
    from transformers.activations import SiLUActivation

    return (_same_code(type(module).forward, _llama().LlamaMLP.forward) and "forward" not in vars(module)
            and type(getattr(module, "act_fn", None)) in (torch.nn.SiLU, SiLUActivation))


def _mlp_forward(module: Any, x: Any) -> Any:
    """LlamaMLP's forward, its `act_fn(gate) * up` through the compiled kernel where it takes the tensors."""
    from lora_cli import cpu_kernels

    gate, up = module.gate_proj(x), module.up_proj(x)
    if gate.shape == up.shape and cpu_kernels.handles(gate, up):
        return module.down_proj(_swiglu_function().apply(gate, up))
    return module.down_proj(module.act_fn(gate) * up)


@functools.cache
def _swiglu_function() -> Any:
    import torch
    from torch.autograd.function import once_differentiable

    from lora_cli import cpu_kernels

    class SwiGLU(torch.autograd.Function):
        """silu(gate) * up, with PyTorch's roundings, keeping gate and up (autograd keeps silu(gate) too)."""

        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            gate, up = gate.contiguous(), up.contiguous()
            ctx.save_for_backward(gate, up)
            return cpu_kernels.swiglu(gate, up)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad: Any) -> tuple[Any, Any]:
            gate, up = ctx.saved_tensors
            return cpu_kernels.swiglu_backward(grad.to(gate.dtype), gate, up)

    return SwiGLU


# --- rotary embedding ------------------------------------------------------------------------------------

def _rotary(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> tuple[Any, Any]:
    """transformers' `apply_rotary_pos_emb` for Llama: `x * cos + rotate_half(x) * sin` for q and k."""
    # never in these models (cos and sin are constants, heads are even): the plain formula keeps it right
    if cos.requires_grad or sin.requires_grad or q.shape[-1] % 2:
        cos, sin, rotate_half = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim), _llama().rotate_half
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    cos, forward_sin, backward_sin = _signed_sines(cos, sin, unsqueeze_dim)
    rotate = _rotary_function().apply
    return rotate(q, cos, forward_sin, backward_sin), rotate(k, cos, forward_sin, backward_sin)


_last_sines: list[Any] = []  # (cos, sin, unsqueeze_dim, results): every layer of one forward shares them


def _signed_sines(cos: Any, sin: Any, unsqueeze_dim: int) -> tuple[Any, Any, Any]:
    """cos, and sin with rotate_half's sign and swap folded in: rotate_half(x) * sin = roll(x) * forward_sin,
    and its transpose, roll(g * forward_sin) = roll(g) * backward_sin (roll swaps the halves of the last dim)."""
    import torch

    if _last_sines and _last_sines[0] is cos and _last_sines[1] is sin and _last_sines[2] == unsqueeze_dim:
        return _last_sines[3]
    first, second = sin.chunk(2, dim=-1)
    results = (cos.unsqueeze(unsqueeze_dim), torch.cat((-first, second), dim=-1).unsqueeze(unsqueeze_dim),
               torch.cat((second, -first), dim=-1).unsqueeze(unsqueeze_dim))
    _last_sines[:] = [cos, sin, unsqueeze_dim, results]
    return results


def _roll_halves(x: Any) -> Any:
    import torch

    first, second = x.chunk(2, dim=-1)
    return torch.cat((second, first), dim=-1)


@functools.cache
def _rotary_function() -> Any:
    import torch
    from torch.autograd.function import once_differentiable

    from lora_cli import cpu_kernels

    def rotate(x: Any, cos: Any, sin: Any) -> Any:
        # one compiled pass where the kernels take the tensors, else three of PyTorch's, the same values
        out = cpu_kernels.rotary(x, cos, sin) if cpu_kernels.handles(x, cos, sin) else None
        return torch.addcmul(x * cos, _roll_halves(x), sin) if out is None else out

    class Rotary(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, cos: Any, forward_sin: Any, backward_sin: Any) -> Any:
            ctx.save_for_backward(cos, backward_sin)
            return rotate(x, cos, forward_sin)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None, None]:
            cos, backward_sin = ctx.saved_tensors
            return rotate(grad, cos, backward_sin), None, None, None

    return Rotary


# --- LoRA ------------------------------------------------------------------------------------------------

def _is_plain_lora_linear(module: Any) -> bool:
    """A PEFT LoRA layer on an nn.Linear with one active adapter and nothing but A and B: no dropout, no
    variant of LoRA's forward (DoRA and the others PEFT keeps in `lora_variant`), no LoRA bias; the fused
    forward computes exactly PEFT's sum for it."""
    import torch
    from peft.tuners.lora import Linear

    if type(module) is not Linear or "forward" in vars(module) or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    return (type(module.base_layer) is torch.nn.Linear and not module.fan_in_fan_out
            and name in module.lora_A and isinstance(module.lora_dropout[name], torch.nn.Identity)
            and not module.use_dora.get(name, False) and name not in getattr(module, "lora_variant", {})
            and not getattr(module, "lora_bias", {}).get(name, False)
            and module.lora_A[name].bias is None and module.lora_B[name].bias is None)


def _lora_forward(module: Any, name: str, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    # merged, disabled, another adapter set active, or per-row adapters asked for: PEFT's own forward
    if (args or kwargs or module.merged or module.disable_adapters or module.active_adapters != [name]
            or name in getattr(module, "lora_variant", {})):
        return type(module).forward(module, x, *args, **kwargs)
    out = module.base_layer(x)
    dtype = out.dtype
    low_rank = torch.nn.functional.linear(x.to(dtype), module.lora_A[name].weight.to(dtype))
    summed = torch.addmm(out.reshape(-1, out.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                         module.lora_B[name].weight.to(dtype).t(), alpha=module.scaling[name])
    return summed.view(out.shape)
