"""Process-wide settings for training and inference on a CPU."""

from __future__ import annotations

import os

# oneDNN, the library under torch's CPU matmuls, caches a compiled kernel with its buffers for every
# matrix shape it meets, about 1 MB each and up to 1,024 of them. Packed rows change length every
# step, so a training run grew by over a GB (1.7 -> 3.0 GB in 80 steps on the default model). A
# step uses a few dozen shapes; 64 entries keep every hit within a step and bound the memory.
ONEDNN_CACHE_ENTRIES = "64"


def bound_matmul_caches() -> None:
    """Cap oneDNN's shape caches. Takes effect only before the process's first CPU matmul; a user's own setting wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
    os.environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)  # ideep's cache, one level above oneDNN's
