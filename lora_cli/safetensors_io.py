"""Streaming safetensors I/O: one tensor in memory at a time, for merging models bigger than the RAM."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

from lora_cli.errors import LoraError, ModelInputError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header

# safetensors dtype codes -> (bytes per element, torch dtype name)
SAFETENSORS_DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
                      "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
                      "U8": (1, "uint8"), "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"),
                      "F8_E5M2": (1, "float8_e5m2")}


# Why not safetensors' own safe_open/save_file here: safe_open memory-maps the file, and every page read
# through the map stays in the process's resident memory until the file is closed (a whole shard), while
# save_file needs all tensors of a shard in memory at once. The format is simple enough to stream: an
# 8-byte little-endian header length, a JSON header of dtype, shape and [start, end) data offsets per
# tensor, then the raw little-endian tensor bytes.

def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The file's metadata and {name: {dtype, shape, data_offsets}}, in the order the data lies."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            # a damaged length must not make us read a whole shard (safetensors' own limit is 100 MB)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        tensors = dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
        for info in tensors.values():
            info["start"] = 8 + length + info["data_offsets"][0]
    except (struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ModelInputError(f"{path} is damaged or not a safetensors file ({reason}); restore it, or download "
                              "the model again") from None
    return metadata, tensors


def read_tensor(path: Path, key: str, infos: dict[str, dict[str, Any]]) -> Any:
    """One tensor, read with plain file I/O into its own buffer (freed with the tensor)."""
    import torch

    info = infos[key]
    begin, end = info["data_offsets"]
    buffer = bytearray(end - begin)
    with open(path, "rb") as f:
        f.seek(info["start"])
        if f.readinto(buffer) != len(buffer):
            raise ModelInputError(f"{path} is truncated: {key} is cut short; the base's files are damaged")
    dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]][1])
    if not buffer:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def write_safetensors(path: Path, entries: list[tuple[str, str, list[int]]], produce: Callable[[str], Any],
                      metadata: dict[str, str]) -> int:
    """Write a safetensors file whose tensors come one at a time from `produce(name)`; returns the data size.

    Larger elements first, as safetensors itself orders them, so that every tensor stays aligned.
    """
    import math

    import torch

    entries = sorted(entries, key=lambda e: -SAFETENSORS_DTYPES[e[1]][0])
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, code, shape in entries:
        size = math.prod(shape) * SAFETENSORS_DTYPES[code][0]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, code, shape in entries:
            tensor = produce(name).contiguous()
            if list(tensor.shape) != shape or tensor.element_size() != SAFETENSORS_DTYPES[code][0]:
                raise LoraError(f"internal error: {name} came out as {tuple(tensor.shape)} {tensor.dtype}")
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset
