"""Process-wide settings for training and inference on a CPU."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

# oneDNN, the library under torch's CPU matmuls, caches a compiled kernel with its buffers for every
# matrix shape it meets, about 1 MB each and up to 1,024 of them. Packed rows change length every
# step, so a training run grew by over a GB (1.7 -> 3.0 GB in 80 steps on the default model). A
# step uses a few dozen shapes; 64 entries keep every hit within a step and bound the memory.
ONEDNN_CACHE_ENTRIES = "64"


def bound_matmul_caches() -> None:
    """Cap oneDNN's shape caches. Takes effect only before the process's first CPU matmul; a user's own setting wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
    os.environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)  # ideep's cache, one level above oneDNN's


# glibc's malloc gives freed memory back to the kernel (a block over its mmap threshold is unmapped at
# once; free space at the top of the heap is trimmed), and the next allocation of that size faults
# every 4 KB page in again, zero-filled. Packed rows change length every step, so activations of a new
# size came and went all through a run: 200k to 1,050k page faults in 30 steps of the default model,
# 1 to 6 s of system time, and a 3 MB product in the MLP took 5 to 7 ms instead of 0.15. Keeping what
# was freed for reuse cut the faults to about 15k and trained 10% faster (median 303 -> 333 tok/s, 2-core
# Xeon; the demo's run, with longer rows, neither gained nor lost). Blocks over 32 MB (glibc's largest
# threshold) are still mapped and unmapped each time.
MMAP_THRESHOLD = 32 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse rather than return it to the kernel.

    The resident size stays at its peak instead of going down between steps; the peak itself moved by
    -1% (benchmark) to +2.5% (demo). Does nothing (returns False) without glibc, or when the user tunes
    malloc themselves.
    """
    import ctypes

    if not _glibc() or any(name in os.environ for name in _USER_MALLOC_SETTINGS) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        # Setting either one also turns off glibc's own threshold adjustment, so both are set.
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def configure_process() -> None:
    """The process-wide settings every `lora` command, and `train.run` for callers embedding lora, apply first."""
    bound_matmul_caches()
    keep_freed_memory()


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return False


# Where the measured choice is remembered, in the user cache (LORA_CACHE_DIR); deleting it re-measures.
PRECISION_FILE = "cpu-precision.json"
# The /proc/cpuinfo fields that identify a CPU model (x86 and ARM), not one core's clock or numbering.
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags",
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")


@functools.lru_cache(maxsize=None)
def bf16_beats_fp32() -> bool:
    """Whether this CPU multiplies bf16 matrices at least about as fast as fp32 ones.

    The CPU flags do not settle it. With AMX, bf16 runs 7x faster than fp32 (2.3 vs 0.32 TFLOP/s on
    a 2-core Xeon); with AVX512-BF16 but no AMX (a Xeon whose virtual machine hides AMX) oneDNN's
    bf16 kernel ran at 0.15 TFLOP/s against fp32's 0.25, and `lora train` in bf16 was 1.6x slower.
    So it is timed per CPU model, torch version and thread count, and the answers are kept in the user
    cache: the first three single-process runs on the machine time it once each, and from then on every
    run, and every process of a multi-process run, trains in the precision most of them found faster.
    """
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    # ranks that could not share the answer and timed apart could disagree: every rank takes bf16,
    # which the CPU supports
    return _measured_once("", _time_bf16_against_fp32, if_ranks_cannot_share=True)


@functools.lru_cache(maxsize=None)
def int8_beats_fp32() -> bool:
    """Whether this CPU's int8 matmuls, quantizing included, run at least 1.5x as fast as fp32 ones.

    With VNNI, `torch._int_mm` runs at 4x the fp32 rate (1.0 against 0.25 TOP/s on a 2-core Xeon
    without AMX); without it, int8 can be slower than fp32. Timed once and kept, as bf16_beats_fp32.
    """
    return _measured_once("int8 input gradients | ", _time_int8_against_fp32, if_ranks_cannot_share=False)


# How many timings, each in its own single-process run, settle a choice for good: the majority of
# three, so that one timing taken in a noisy moment (another job starting up beside it) is outvoted.
# On a 2-core AMD EPYC (Zen 4) bf16 ran at 2.4x fp32's speed, but a first timing taken while other
# processes started had kept fp32, and every later run trained 1.36x slower for it.
TIMINGS = 3


def _measured_once(kind: str, measure: Any, if_ranks_cannot_share: bool) -> bool:
    """A timing's answer, per CPU model, torch version and thread count, kept in the cache: the majority
    of up to TIMINGS timings, the newest deciding a tie. A single-process run adds a timing until there
    are TIMINGS; the processes of a multi-process run only read the answer (all of them the same one),
    timing once where there is none yet."""
    import torch
    from filelock import FileLock

    from lora_cli.models import cache_dir

    key = f"{kind}{_cpu_identity()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_dir() / PRECISION_FILE
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            try:
                known = json.loads(path.read_text())
            except (OSError, ValueError):
                known = {}
            if not isinstance(known, dict):
                known = {}
            found = known.get(key)
            answers = [found] if isinstance(found, bool) else found  # a single answer, as lora kept it before
            if not (isinstance(answers, list) and answers and all(isinstance(a, bool) for a in answers)):
                answers = []
            if not answers or (len(answers) < TIMINGS and not several):
                known[key] = answers = [*answers, measure()]
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(known, indent=1))
                os.replace(tmp, path)
            return _majority(answers)
    except OSError:  # a cache folder that cannot be written
        if several:
            return if_ranks_cannot_share
        return measure()


def _majority(answers: list[bool]) -> bool:
    yes = sum(answers)
    return answers[-1] if 2 * yes == len(answers) else 2 * yes > len(answers)


def _cpu_identity() -> str:
    """A short fingerprint of the CPU model: its /proc/cpuinfo identity fields where there are some."""
    import hashlib
    import platform

    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = [line for line in first.splitlines() if line.split(":")[0].strip() in _CPU_FIELDS]
    except OSError:
        fields = []
    name = next((line.split(":", 1)[1].strip() for line in fields if line.startswith("model name")),
                platform.processor() or platform.machine())
    digest = hashlib.sha256("\n".join(fields or [platform.platform()]).encode()).hexdigest()[:12]
    return f"{name} [{digest}]"


def _time_bf16_against_fp32() -> bool:
    """True when a bf16 linear layer runs at least 1/1.1 as fast as fp32 (a near tie goes to bf16,
    which halves the memory)."""
    return bf16_time_ratio() <= 1.1


def bf16_time_ratio(rounds: int = 3) -> float:
    """bf16 time / fp32 time of a linear layer of the shape a LoRA step runs (512 tokens through a
    1024 x 1024 weight), each the fastest of `rounds` x 5 runs, taken in turns. About 0.2 s."""
    import torch

    bound_matmul_caches()  # this may be the process's first matmul

    def linear(dtype: torch.dtype) -> Any:
        x, weight = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        return lambda: torch.nn.functional.linear(x, weight)

    return _in_turns(linear(torch.bfloat16), linear(torch.float32), rounds)


def _time_int8_against_fp32() -> bool:
    """True when this CPU's int8 matmul is exact and a frozen layer's input gradient through it
    (quantizing the gradient, the int8 matmul, scaling back) takes at most 1/1.5 of fp32's time."""
    return int8_matmul_is_exact() and int8_speedup() >= 1.5


def int8_matmul_is_exact() -> bool:
    """Whether `torch._int_mm` gives the exact int32 product here. Without VNNI, oneDNN's int8 kernels
    saturate int16 intermediates (AVX2, AVX512 without VNNI): the gradients would be wrong, not rounded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 1024), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (1024, 64), dtype=torch.int8, generator=generator)
    return bool(torch.equal(torch._int_mm(a, b), a.to(torch.int32) @ b.to(torch.int32)))


def int8_speedup(rounds: int = 3) -> float:
    """fp32 time / int8 time for a frozen layer's input gradient, each the fastest of `rounds` x 5 runs,
    the two sides taken in turns so that a noisy moment cannot slow one side only. About 0.3 s.
    (The answer is kept for good: one unlucky timing must not cost every later run its speed-up.)"""
    import torch

    from lora_cli.int8_backward import quantize

    configure_process()  # as training runs: without kept memory, page faults double the int8 side's time
    grad, weight = torch.randn(512, 1024), torch.randn(1024, 1024)
    weight_int8 = weight.to(torch.int8)

    def int8() -> Any:
        values, scale = quantize(grad, dim=1)
        return torch._int_mm(values, weight_int8).mul(scale)

    return _in_turns(lambda: grad @ weight, int8, rounds)


def _in_turns(first: Any, second: Any, rounds: int) -> float:
    """first's time / second's time, each the fastest of its runs, the two timed in turns."""
    times = [float("inf"), float("inf")]
    for _ in range(rounds):
        times = [min(times[0], _fastest(first)), min(times[1], _fastest(second))]
    return times[0] / times[1]


def _fastest(run: Any) -> float:
    run()  # the first call builds the kernel
    times = []
    for _ in range(5):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)
