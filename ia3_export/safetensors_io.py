"""A small, strict safetensors reader on numpy alone (the serving install has no torch).

It checks the header against the file before allocating anything, so a truncated or forged
file gives a clear error instead of a crash or a huge allocation. bfloat16 is widened to
float32 (numpy has no bfloat16); IA3 vectors are float32 anyway.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import IA3Error

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (bfloat16 widened to float32)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise IA3Error(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > min(MAX_HEADER, size - 8):
                raise IA3Error(f"{path}: corrupted safetensors header (declares {header_len} bytes, file has {size})")
            header_bytes = f.read(header_len)
            data = f.read()
    except OSError as e:
        raise IA3Error(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise IA3Error(f"{path}: corrupted safetensors header (not a JSON object)") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        tensors[name] = _tensor(path, name, info, data)
    return tensors


def _tensor(path: str, name: str, info, data: bytes) -> np.ndarray:
    try:
        dtype_name, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        if not all(_is_count(d) for d in shape) or not (_is_count(start) and _is_count(end) and start <= end):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise IA3Error(f"{path}: corrupted safetensors entry for {name!r}") from None
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise IA3Error(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which this reader does not support "
                       f"({', '.join(_DTYPES)}); re-save it as float32")
    dtype = _DTYPES[dtype_name]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if end > len(data) or end - start != count * np.dtype(dtype).itemsize:
        raise IA3Error(
            f"{path}: tensor {name!r} needs {count * np.dtype(dtype).itemsize} bytes at {start}..{end} "
            f"but the file holds {len(data)} data bytes (truncated or corrupted file)"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
    if dtype_name == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy()


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
