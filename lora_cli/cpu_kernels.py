"""Compiled kernels for bf16 training on a CPU where PyTorch runs many small passes over memory.

In a bf16 step of the default model on a 2-core CPU, the RMSNorms cost about 1.2 ms each (61 of them,
forward and backward): a dozen PyTorch kernels each, several mixing bf16 and fp32, which PyTorch runs
on a slow path. The same math as one pass over each row, forward and backward, takes 0.25 ms, and the
step ran 5 to 7% faster. The MLP's `silu(gate) * up` is one pass forward and one backward too, where
autograd runs five and keeps one more tensor (1 to 2% of a step), and so is the rotary embedding of q
and k, read and written in the projections' own layout (3%).

The kernels are plain C (cpu_kernels.c, no PyTorch headers), built on first use with the system's C
compiler for this CPU (`-march=native`), in well under a second, and kept in the user cache
(LORA_CACHE_DIR) under a name that hashes the source, the compiler, the flags, lora's version and the
CPU. Where there is no
compiler, or the build fails, `library()` is None and the callers keep PyTorch's own kernels, which
compute the same values. `LORA_CPU_KERNELS=0` keeps PyTorch's kernels too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SWITCH = "LORA_CPU_KERNELS"  # "0" leaves every layer on PyTorch's kernels
BUILD_TIMEOUT_S = 120


def available() -> bool:
    """Whether the compiled kernels can be used in this process (built and loaded now if need be)."""
    return library() is not None


@functools.cache
def library() -> Any:
    """The loaded kernels (a ctypes library), or None where they are switched off or cannot be built."""
    if switched_off():
        return None
    compiler = find_compiler()
    if not compiler:
        log.debug("No C compiler found: PyTorch's own kernels are used")
        return None
    try:
        lib = _load(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("The CPU kernels could not be built or loaded (%s): PyTorch's own kernels are used", error)
        return None
    pointer, size, real, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.rms_norm_forward.argtypes = [pointer, pointer, pointer, pointer, size, size, real, count]
    lib.rms_norm_backward.argtypes = [pointer, pointer, pointer, pointer, pointer, size, size, count]
    lib.swiglu_forward.argtypes = [pointer, pointer, pointer, size, count]
    lib.swiglu_backward.argtypes = [pointer, pointer, pointer, pointer, pointer, size, count]
    lib.rotary.argtypes = [pointer, size, size, size, pointer, pointer, size, pointer, size, size, size,
                           size, size, size, size, count]
    for function in (lib.rms_norm_forward, lib.rms_norm_backward, lib.swiglu_forward, lib.swiglu_backward,
                     lib.rotary):
        function.restype = None
    strided = [pointer, size, size]  # a (tokens, heads, dim) tensor: its data, token stride and head stride
    lib.attention_forward.argtypes = [*strided, *strided, *strided, pointer, size, size, size, size, real, pointer,
                                      pointer, count]
    lib.attention_backward.argtypes = [pointer, *strided, *strided, *strided, pointer, pointer, pointer, size, size,
                                       size, size, real, pointer, pointer, pointer, count]
    lib.attention_forward.restype = lib.attention_backward.restype = ctypes.c_int
    return lib


def switched_off() -> bool:
    """Whether LORA_CPU_KERNELS turns the kernels off ("0", "false", "no" or "off")."""
    return os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def find_compiler() -> list[str]:
    """The C compiler's command: CC (split as a shell would), else the first of cc, gcc and clang on PATH;
    empty where there is none."""
    return shlex.split(os.environ.get("CC", "")) or [
        found for found in (shutil.which(name) for name in ("cc", "gcc", "clang")) if found][:1]


def rms_norm(x: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    """transformers' LlamaRMSNorm of bf16 `x` with a bf16 weight: (output, inverse rms per row in fp32)."""
    import torch

    x, weight = x.contiguous(), weight.contiguous()
    width = x.shape[-1]
    out = torch.empty_like(x)
    inverse_rms = torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
    library().rms_norm_forward(x.data_ptr(), weight.data_ptr(), out.data_ptr(), inverse_rms.data_ptr(),
                               x.numel() // width, width, eps, torch.get_num_threads())
    return out, inverse_rms


def rms_norm_backward(grad: Any, x: Any, inverse_rms: Any, weight: Any) -> Any:
    """The input gradient of `rms_norm`, from its contiguous input and inverse rms."""
    import torch

    grad, weight = grad.contiguous(), weight.contiguous()  # held here: the kernel reads them after data_ptr()
    width = x.shape[-1]
    grad_x = torch.empty_like(x)
    library().rms_norm_backward(grad.data_ptr(), x.data_ptr(), inverse_rms.data_ptr(), weight.data_ptr(),
                                grad_x.data_ptr(), x.numel() // width, width, torch.get_num_threads())
    return grad_x


def swiglu(gate: Any, up: Any) -> Any:
    """`silu(gate) * up` for bf16 tensors of one shape, rounded as PyTorch rounds it."""
    import torch

    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    library().swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


def swiglu_backward(grad: Any, gate: Any, up: Any) -> tuple[Any, Any]:
    """The gradients of `swiglu` for its contiguous inputs: (grad_gate, grad_up)."""
    import torch

    grad = grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    library().swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(),
                              grad_up.data_ptr(), gate.numel(), torch.get_num_threads())
    return grad_gate, grad_up


def rotary(x: Any, cos: Any, sin: Any) -> Any | None:
    """`x * cos + roll(x) * sin` (roll: the halves of the last dim swapped) for bf16 x of shape (batch, heads,
    length, dim) and cos, sin of shape (batch or 1, 1, length, dim), the result in x's layout; None where the
    layouts are not the kernel's (the last dim not contiguous, cos and sin not contiguous blocks, dim odd)."""
    import torch

    if x.dim() != 4:
        return None
    batch, heads, length, dim = x.shape
    if (dim % 2 or x.stride(-1) != 1 or cos.shape != sin.shape or cos.shape[1:] != (1, length, dim)
            or cos.shape[0] not in (1, batch) or not (cos.is_contiguous() and sin.is_contiguous())):
        return None
    out = torch.empty_like(x)  # x's strides where x is dense, as PyTorch's elementwise ops keep them
    if out.stride(-1) != 1:
        return None
    library().rotary(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
                     length * dim if cos.shape[0] > 1 else 0, out.data_ptr(), out.stride(0), out.stride(1),
                     out.stride(2), batch, heads, length, dim, torch.get_num_threads())
    return out


# Attention's head width must be a whole number of the kernel's 64-float blocks (64 and 128: the Llama family).
ATTENTION_DIM_BLOCK = 64


def attention_takes(query: Any, key: Any, value: Any, starts: list[int]) -> bool:
    """Whether `attention` takes these (batch, heads, tokens, dim) tensors and example starts: one bf16 row on a
    CPU, each head's dims contiguous, whole 64-wide blocks, query heads a multiple of the key heads, and starts
    that cover the row exactly (from 0, never back, to its length): the kernel reads and writes every token
    between them and no other."""
    return (query.dim() == 4 and query.shape[0] == 1 and key.shape == value.shape and key.shape[0] == 1
            and query.shape[2] == key.shape[2] and query.shape[3] == key.shape[3]
            and query.shape[3] % ATTENTION_DIM_BLOCK == 0 and query.shape[1] % key.shape[1] == 0
            and len(starts) > 0 and starts[0] == 0 and starts[-1] == query.shape[2]
            and all(a <= b for a, b in zip(starts, starts[1:]))
            and all(t.stride(3) == 1 for t in (query, key, value)) and handles(query, key, value))


def attention(query: Any, key: Any, value: Any, starts: Any, scale: float) -> tuple[Any, Any]:
    """Causal attention within each example of one packed row, for tensors `attention_takes`: `starts` (int64)
    holds each example's first token and the row's length. Returns the output, (1, tokens, heads, dim) contiguous
    bf16, and each row's log-sum-exp, (heads, tokens) fp32, which `attention_backward` needs."""
    import torch

    _, heads, tokens, dim = query.shape
    out = torch.empty((1, tokens, heads, dim), dtype=query.dtype)
    lse = torch.empty((heads, tokens), dtype=torch.float32)
    status = library().attention_forward(*_strided(query), *_strided(key), *_strided(value), starts.data_ptr(),
                                         starts.numel() - 1, heads, key.shape[1], dim, scale, out.data_ptr(),
                                         lse.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("Out of memory for the attention kernel's buffers")
    return out, lse


def attention_backward(grad: Any, query: Any, key: Any, value: Any, out: Any, lse: Any, starts: Any,
                       scale: float) -> tuple[Any, Any, Any]:
    """The gradients of `attention` for the gradient of its output: those of query, key and value, each
    (1, heads, tokens, dim) seen over a contiguous (1, tokens, heads, dim) tensor, the projections' layout."""
    import torch

    grad = grad.to(out.dtype).contiguous()  # held here: the kernel reads it after data_ptr()
    _, heads, tokens, dim = query.shape
    grad_query = torch.empty((1, tokens, heads, dim), dtype=query.dtype)
    grad_key = torch.empty((1, tokens, key.shape[1], dim), dtype=key.dtype)
    grad_value = torch.empty_like(grad_key)
    status = library().attention_backward(grad.data_ptr(), *_strided(query), *_strided(key), *_strided(value),
                                          out.data_ptr(), lse.data_ptr(), starts.data_ptr(), starts.numel() - 1,
                                          heads, key.shape[1], dim, scale, grad_query.data_ptr(),
                                          grad_key.data_ptr(), grad_value.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("Out of memory for the attention kernel's buffers")
    return grad_query.transpose(1, 2), grad_key.transpose(1, 2), grad_value.transpose(1, 2)


def _strided(x: Any) -> tuple[int, int, int]:
    """A (1, heads, tokens, dim) tensor as the kernels read it: data pointer, token stride, head stride."""
    return x.data_ptr(), x.stride(2), x.stride(1)


def handles(*tensors: Any) -> bool:
    """Whether these tensors are what the kernels take (bf16, on a CPU) and the kernels can be used here."""
    import torch

    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors) and available()


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in turn: OpenMP (PyTorch's own runtime at run time) and this CPU's
    instructions; without OpenMP (single-threaded kernels); without either."""
    tuned = {"x86_64": ["-march=native"], "amd64": ["-march=native"], "aarch64": ["-mcpu=native"],
             "arm64": ["-mcpu=native"]}.get(platform.machine().lower(), [])
    return [["-fopenmp", *tuned], tuned, []]


def _load(compiler: list[str]) -> Any:
    """The kernels for this source, compiler, flags and CPU: from the cache, else built into it (or, where the
    cache cannot be written, into a private folder of this process's own)."""
    from lora_cli import __version__
    from lora_cli.cpu import _cpu_identity
    from lora_cli.models import cache_dir

    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(compiler).encode(), repr(_flag_sets()).encode(),
                                     __version__.encode(), platform.machine().encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    cached = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if cached.exists():
        try:
            return ctypes.CDLL(str(cached))
        except OSError:  # a damaged file (a machine that stopped mid-write): built again below
            cached.unlink(missing_ok=True)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _compile(compiler, cached)
    except OSError as error:  # the folder, not the compiler (that is a SubprocessError): never built twice
        log.debug("Building the CPU kernels in %s failed (%s): building them in a private folder", cached.parent,
                  error)
        cached = Path(tempfile.mkdtemp(prefix="lora-kernels-")) / cached.name
        _compile(compiler, cached)
    return ctypes.CDLL(str(cached))


def _compile(compiler: list[str], target: Path) -> None:
    """Compile into a temporary file beside the target and rename it: processes building at once each put
    a whole library in place, and a failed build leaves nothing."""
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".tmp")
    os.close(handle)
    failure = ""
    try:
        for flags in _flag_sets():
            try:
                done = subprocess.run([*compiler, "-O3", "-std=c11", "-shared", "-fPIC", *flags, "-o", partial,
                                       str(SOURCE), "-lm"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except OSError as error:  # no such compiler: not the folder's fault
                raise subprocess.SubprocessError(f"{' '.join(compiler)} cannot be run: {error}") from error
            if done.returncode == 0:
                os.replace(partial, target)
                log.debug("Built the CPU kernels (%s) into %s", " ".join(flags) or "no flags", target)
                return
            said = (done.stderr or done.stdout).strip().splitlines()
            failure = said[-1] if said else f"exit status {done.returncode}"
    finally:
        Path(partial).unlink(missing_ok=True)
    raise subprocess.SubprocessError(f"{' '.join(compiler)} failed: {failure}")
