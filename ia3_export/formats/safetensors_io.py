"""A small, strict safetensors reader on numpy alone (the serving install has no torch).

The header is untrusted: it is checked whole against the file before anything is allocated
(`read_header`), with the format's own rules: every entry's dtype, shape and byte range agree,
the ranges do not overlap and cover the data exactly, so the memory a file can make us use is
the size of its data and no more. Tensors are then read by offset, one range each, never the
whole file. bfloat16 is widened to float32 (numpy has no bfloat16); IA3 vectors are float32.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ..errors import IA3Error
from ..dtypes import SAFETENSORS
from .jsonfile import parse_json, shown
from .reader import open_regular, registers

# What this reader turns into numpy arrays (bfloat16 read as its raw 16 bits, then widened).
READABLE = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS = 16  # the product of a longer forged shape would be slow to compute


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor as the header declares it; start/end are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Header:
    path: str
    entries: dict[str, Entry]
    data_start: int  # file offset of the data section
    data_bytes: int


def read_header(path: str) -> Header:
    """The checked header of a .safetensors file (no tensor data is read)."""
    try:
        with open_regular(path, "safetensors") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise IA3Error(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > min(MAX_HEADER, size - 8):
                raise IA3Error(f"{path}: corrupted safetensors header (declares {header_len} bytes, file has {size})")
            header_bytes = f.read(header_len)
    except OSError as e:
        raise IA3Error(f"{path}: cannot read ({e.strerror})") from None
    header = parse_json(header_bytes, f"{path}: corrupted safetensors header")
    if not isinstance(header, dict):
        raise IA3Error(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise IA3Error(f"{path}: corrupted safetensors header (__metadata__ must map names to strings)")
    data_bytes = size - 8 - header_len
    entries = {name: _entry(path, name, info, data_bytes) for name, info in header.items()}
    _check_layout(path, entries, data_bytes)
    return Header(path, entries, 8 + header_len, data_bytes)


def _entry(path: str, name: str, info, data_bytes: int) -> Entry:
    where = f"{path}: corrupted safetensors entry for {shown(name)}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise IA3Error(f"{where}: not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS:
        raise IA3Error(f"{where}: unknown dtype {shown(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise IA3Error(f"{where}: shape {shown(shape)} is not a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise IA3Error(f"{where}: data_offsets {shown(offsets)} are not [start, end] with start <= end")
    entry = Entry(name, dtype, tuple(shape), offsets[0], offsets[1])
    needed = entry.count * SAFETENSORS[dtype].itemsize  # Python integers: a forged shape cannot overflow and wrap
    if needed > data_bytes or entry.end > data_bytes or entry.end - entry.start != needed:
        raise IA3Error(f"{path}: tensor {shown(name)} needs {needed} bytes at {entry.start}..{entry.end} but the file holds "
                       f"{data_bytes} data bytes (truncated or corrupted file); its header declares shape {list(shape)} "
                       f"of {dtype}, re-save or re-download it")
    return entry


def _check_layout(path: str, entries: dict[str, Entry], data_bytes: int) -> None:
    """The format's rule: byte ranges follow each other without overlap or hole and cover the data."""
    position, previous = 0, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start < position:
            raise IA3Error(f"{path}: tensor {shown(entry.name)} at bytes {entry.start}..{entry.end} overlaps tensor "
                           f"{shown(previous.name)} at {previous.start}..{previous.end} (corrupted or forged file)")
        if entry.start > position:
            raise IA3Error(f"{path}: bytes {position}..{entry.start} of the data belong to no tensor (corrupted file)")
        position, previous = entry.end, entry
    if position != data_bytes:
        raise IA3Error(f"{path}: the data holds {data_bytes} bytes but its tensors cover {position} "
                       "(corrupted file, or data appended to it)")


@registers("safetensors_file", ("", "safetensors"))
def read_safetensors(path: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (bfloat16 widened to float32), each read
    by its own offset. `max_bytes` caps the data a caller expects (checked before reading)."""
    header = read_header(path)
    if max_bytes is not None and header.data_bytes > max_bytes:
        raise IA3Error(f"{path}: holds {header.data_bytes} bytes of tensors, more than the {max_bytes} expected "
                       "here; is it the right file?")
    for entry in header.entries.values():
        if entry.dtype not in READABLE:
            raise IA3Error(f"{path}: tensor {shown(entry.name)} has dtype {entry.dtype!r}, which this reader does not "
                           f"support ({', '.join(READABLE)}); re-save it as float32")
        if entry.count == 0:
            raise IA3Error(f"{path}: tensor {shown(entry.name)} has shape {entry.shape} and holds no values; "
                           "the file is corrupted")
    try:
        with open_regular(path, "safetensors") as f:
            return {entry.name: _read(f, header, entry) for entry in header.entries.values()}
    except OSError as e:
        raise IA3Error(f"{path}: cannot read ({e.strerror})") from None


def _read(f, header: Header, entry: Entry) -> np.ndarray:
    buffer = bytearray(entry.end - entry.start)
    f.seek(header.data_start + entry.start)
    if f.readinto(buffer) != len(buffer):
        raise IA3Error(f"{header.path}: the file got shorter while it was read")
    array = np.frombuffer(buffer, dtype=np.uint16 if entry.dtype == "BF16" else SAFETENSORS[entry.dtype].np)
    array = array.reshape(entry.shape)
    if entry.dtype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
