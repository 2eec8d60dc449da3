"""What an ONNX graph file declares, read from its protobuf bytes without onnx or ONNX Runtime.

Before ONNX Runtime (or onnx, or onnxruntime-genai) is handed a graph, `check_graph` walks its
wire format: ModelProto -> graph (and functions) -> initializers, sparse initializers, nodes ->
attributes (tensors and subgraphs, to any depth up to MAX_GRAPH_DEPTH). Every tensor whose data
lives in another file (`external_data`, key "location") must name a regular file inside the
graph's own folder, holding the bytes the tensor's dims declare: an absolute path, a `..`
component, a symlink resolving outside the folder, a FIFO or device, or a range past the end of
the file is refused by name. ONNX Runtime refuses some of these only since 1.21 (the package
accepts 1.20, where `../secret.txt` ran and its bytes came out as logits), so the check is ours.
The walk also returns the top graph's declared inputs and initializers (dims and backing bytes),
so a manifest's sizes are checked against the bytes that back them before anything is allocated.
The lean serving install has neither torch nor onnx: this is plain Python over a read-only map.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import os

from ..dtypes import DTYPES
from ..errors import IA3Error
from .jsonfile import shown
from .reader import check_regular, open_regular, registers

MAX_GRAPH_DEPTH = 32  # subgraphs (If/Loop/Scan bodies) nest a few levels; protobuf itself stops at 100
MAX_DIMS = 16
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
ITEMSIZE = {d.onnx: d.itemsize for d in DTYPES.values()}
HALF_BYTE = (21, 22, 23)  # UINT4, INT4, FLOAT4E2M1: two values per byte


@dataclasses.dataclass(frozen=True)
class Tensor:
    """An initializer as the graph declares it: element type, dims, and the bytes that hold its data
    (raw or external; None where it is stored in typed fields, which ONNX Runtime checks itself)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    nbytes: int | None

    @property
    def count(self) -> int:
        return math.prod(self.dims)


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    """The top graph's inputs (name -> declared dims: an int, or None for a symbolic one) and
    initializers (name -> Tensor); every external data file of the whole model was checked."""

    inputs: dict[str, list[int | None]]
    initializers: dict[str, Tensor]


class _Malformed(Exception):
    pass


@registers("graph_file", ("", "graph"))
def check_graph(path: str) -> GraphFacts:
    """The facts of the ONNX graph at `path` after checking every tensor's external data (see the
    module's docstring); a file that is not an ONNX model is an IA3Error naming it."""
    with open_regular(path, "graph") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise IA3Error(f"{path}: empty file, not an ONNX graph; re-export the model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            walk = _Walk(path, memoryview(buf))
            try:
                facts = walk.model()
            except _Malformed:
                raise IA3Error(f"{path}: not an ONNX graph (its protobuf is malformed or truncated); re-export the "
                               "model") from None
            finally:
                walk.buf.release()
    return facts


class _Walk:
    def __init__(self, path: str, buf: memoryview):
        self.path, self.buf = path, buf
        self.folder = os.path.dirname(os.path.abspath(path))
        self.inputs: dict[str, list[int | None]] = {}
        self.initializers: dict[str, Tensor] = {}

    def model(self) -> GraphFacts:
        graphs = 0
        for number, wire, value in self.fields(0, len(self.buf)):
            if number == 7 and wire == 2:  # ModelProto.graph
                graphs += 1
                self.graph(value, 0)
            elif number == 25 and wire == 2:  # ModelProto.functions
                for node in self.sub(value, 7):  # FunctionProto.node
                    self.node(node, 0)
            elif number == 20 and wire == 2:  # ModelProto.training_info: initialization (1), algorithm (2)
                for graph in self.sub(value, 1) + self.sub(value, 2):
                    self.graph(graph, 1)
        if not graphs:
            raise _Malformed
        return GraphFacts(self.inputs, self.initializers)

    def graph(self, span, depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise IA3Error(f"{self.path}: subgraphs nested deeper than {MAX_GRAPH_DEPTH} levels; the graph is "
                           "corrupted or hostile, re-export the model")
        for number, wire, value in self.fields(*span):
            if wire != 2:
                continue
            if number == 1:  # GraphProto.node
                self.node(value, depth)
            elif number == 5:  # GraphProto.initializer
                tensor = self.tensor(value)
                if depth == 0:
                    self.initializers[tensor.name] = tensor
            elif number == 15:  # GraphProto.sparse_initializer
                self.sparse(value)
            elif number == 11 and depth == 0:  # GraphProto.input (ValueInfoProto)
                name, dims = self.value_info(value)
                self.inputs[name] = dims

    def node(self, span, depth: int) -> None:
        for number, wire, value in self.fields(*span):
            if number == 5 and wire == 2:  # NodeProto.attribute
                self.attribute(value, depth)

    def attribute(self, span, depth: int) -> None:
        for number, wire, value in self.fields(*span):
            if wire != 2:
                continue
            if number in (5, 10):  # AttributeProto.t, .tensors
                self.tensor(value)
            elif number in (6, 11):  # AttributeProto.g, .graphs
                self.graph(value, depth + 1)
            elif number in (22, 23):  # AttributeProto.sparse_tensor, .sparse_tensors
                self.sparse(value)

    def sparse(self, span) -> None:
        for number, wire, value in self.fields(*span):
            if number in (1, 2) and wire == 2:  # SparseTensorProto.values, .indices
                self.tensor(value)

    def value_info(self, span) -> tuple[str, list[int | None]]:
        name, dims = "", []
        for number, wire, value in self.fields(*span):
            if number == 1 and wire == 2:
                name = self.text(value)
            elif number == 2 and wire == 2:  # TypeProto -> tensor_type (1) -> shape (2) -> dim (1)
                for shape in self.sub(value, 1, 2):
                    for dim in self.sub(shape, 1):
                        dims.append(next((v for n, w, v in self.fields(*dim) if n == 1 and w == 0), None))
        return name, dims

    def sub(self, span, *path: int):
        """The spans of the messages at field numbers `path` below `span` (each level repeated)."""
        spans = [span]
        for field in path:
            spans = [v for s in spans for n, w, v in self.fields(*s) if n == field and w == 2]
        return spans

    def tensor(self, span) -> Tensor:
        name, data_type, dims, raw, location, external = "", 0, [], None, 0, {}
        for number, wire, value in self.fields(*span):
            if number == 1:  # dims: varints, or packed
                dims += [value] if wire == 0 else list(self.varints(value))
            elif number == 2 and wire == 0:
                data_type = value
            elif number == 8 and wire == 2:
                name = self.text(value)
            elif number == 9 and wire == 2:
                raw = value[1] - value[0]
            elif number == 13 and wire == 2:  # external_data: StringStringEntryProto (key 1, value 2)
                entry = {n: self.text(v) for n, w, v in self.fields(*value) if w == 2}
                external[entry.get(1, "")] = entry.get(2, "")
            elif number == 14 and wire == 0:
                location = value
        dims = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)  # int64 as varint
        where = f"{self.path}: tensor {shown(name)}"
        if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
            raise IA3Error(f"{where} declares dims {shown(list(dims))}; the graph is corrupted, re-export the model")
        needed = self.needed(data_type, dims)
        if external or location == EXTERNAL:
            raw = self.external(where, external, needed)
        elif raw is not None and needed is not None and raw != needed:
            raise IA3Error(f"{where} declares dims {list(dims)} ({needed} bytes) but holds {raw} bytes; the graph is "
                           "corrupted, re-export the model")
        return Tensor(name, data_type, dims, raw)

    @staticmethod
    def needed(data_type: int, dims: tuple[int, ...]) -> int | None:
        count = math.prod(dims)
        if data_type in HALF_BYTE:
            return (count + 1) // 2
        return count * ITEMSIZE[data_type] if data_type in ITEMSIZE else None

    def external(self, where: str, entries: dict, needed: int | None) -> int:
        """The bytes an external tensor's `location` holds for it, checked as the module says."""
        location = entries.get("location", "")
        fix = "re-export the model, or restore the file"
        if not location:
            raise IA3Error(f"{where} keeps its data in an external file but names none; {fix}")
        parts = location.replace("\\", "/").split("/")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
            raise IA3Error(f"{where}: external data location {shown(location)} is an absolute path; a graph's data "
                           f"must be a file in its own folder; {fix}")
        if ".." in parts or "\0" in location:
            raise IA3Error(f"{where}: external data location {shown(location)} leaves the graph's folder (..); "
                           f"a graph's data must be a file in its own folder; {fix}")
        root = os.path.realpath(self.folder)
        full = os.path.realpath(os.path.join(root, location))
        if not full.startswith(root + os.sep):
            raise IA3Error(f"{where}: external data location {shown(location)} resolves to {full}, outside the "
                           f"graph's folder {root} (a symlink out?); a graph's data must be a file in its own folder")
        try:
            size = check_regular(full, "external_data").st_size
        except IA3Error as e:  # named with the graph and tensor that point at it
            raise IA3Error(f"{where}: external data {e}") from None
        offset, length = (self.number(where, entries, key) for key in ("offset", "length"))
        offset = offset or 0
        length = size - offset if length is None else length
        if offset + length > size or length < 0:
            raise IA3Error(f"{where}: external data {shown(location)} bytes {offset}..{offset + length} lie past the "
                           f"end of the file ({size} bytes; truncated?); {fix}")
        if needed is not None and length != needed:
            raise IA3Error(f"{where}: external data holds {length} bytes but the tensor's dims need {needed}; {fix}")
        return length

    @staticmethod
    def number(where: str, entries: dict, key: str) -> int | None:
        value = entries.get(key)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or len(value) > 20:
            raise IA3Error(f"{where}: external data {key} {shown(value)} is not a byte count; re-export the model")
        return int(value)

    # -- the wire format ----------------------------------------------------------------------
    def fields(self, start: int, end: int):
        """(field number, wire type, value) of one message's fields: an int for varint and fixed
        fields, a (start, end) span for length-delimited ones."""
        buf, pos = self.buf, start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = self.varint(pos, end)
            elif wire in (1, 5):
                width = 8 if wire == 1 else 4
                if pos + width > end:
                    raise _Malformed
                value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
            elif wire == 2:
                n, pos = self.varint(pos, end)
                if pos + n > end:
                    raise _Malformed
                value, pos = (pos, pos + n), pos + n
            else:  # groups (3, 4) are not in ONNX's schema
                raise _Malformed
            if number == 0:
                raise _Malformed
            yield number, wire, value

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf, result, shift = self.buf, 0, 0
        while True:
            if pos >= end or shift > 63:
                raise _Malformed
            byte = buf[pos]
            result |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return result, pos

    def varints(self, span):
        pos, end = span
        while pos < end:
            value, pos = self.varint(pos, end)
            yield value

    def text(self, span) -> str:
        try:
            return bytes(self.buf[span[0]:span[1]]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed from None
