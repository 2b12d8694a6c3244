"""Process-wide settings for training and inference on a CPU."""

from __future__ import annotations

import functools
import os
import time

# oneDNN, the library under torch's CPU matmuls, caches a compiled kernel with its buffers for every
# matrix shape it meets, about 1 MB each and up to 1,024 of them. Packed rows change length every
# step, so a training run grew by over a GB (1.7 -> 3.0 GB in 80 steps on the default model). A
# step uses a few dozen shapes; 64 entries keep every hit within a step and bound the memory.
ONEDNN_CACHE_ENTRIES = "64"


def bound_matmul_caches() -> None:
    """Cap oneDNN's shape caches. Takes effect only before the process's first CPU matmul; a user's own setting wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
    os.environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)  # ideep's cache, one level above oneDNN's


@functools.lru_cache(maxsize=None)
def bf16_beats_fp32() -> bool:
    """Whether this CPU multiplies bf16 matrices at least about as fast as fp32 ones, timed on the spot.

    The CPU flags do not settle it. With AMX, bf16 runs 7x faster than fp32 (2.3 vs 0.32 TFLOP/s on
    a 2-core Xeon); with AVX512-BF16 but no AMX (a Xeon whose virtual machine hides AMX) oneDNN's
    bf16 kernel ran at 0.15 TFLOP/s against fp32's 0.25, and `lora train` in bf16 was 1.6x slower.
    A near tie goes to bf16, which halves the memory. The timing costs about 0.1 s, once per process.
    """
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    bound_matmul_caches()  # this may be the process's first matmul

    def fastest(dtype: torch.dtype) -> float:
        # a linear layer of the shape a LoRA step runs: 512 tokens through a 1024 x 1024 weight
        x, weight = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        torch.nn.functional.linear(x, weight)  # the first call builds the kernel
        times = []
        for _ in range(5):
            started = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times.append(time.perf_counter() - started)
        return min(times)

    return fastest(torch.bfloat16) <= 1.1 * fastest(torch.float32)
