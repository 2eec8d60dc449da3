"""Edits and facts on ONNX graphs: overridable initializers, saving with external data, op counts."""
from __future__ import annotations

import collections
import os

import numpy as np

from ..dtypes import numpy_dtype
from ..errors import IA3Error
from ..formats.onnx_graph import check_graph

# Protobuf cannot hold 2 GB; weights go to external data above this (with headroom for the graph).
EXTERNAL_DATA_ABOVE = 2 ** 31 - 2 ** 26


def load(path: str):
    """The model at `path` with its external data, after `check_graph` confined that data to its folder."""
    import onnx

    check_graph(path)
    return onnx.load(path, load_external_data=True)


def add_overridable_ones(model, name: str, shape: tuple[int, ...], dtype: str) -> None:
    """Give graph input `name` a same-name initializer of ones: the graph runs as the base model
    when nothing is fed, and ONNX Runtime's adapter API (and plain feeds) can override it."""
    from onnx import numpy_helper

    if name not in {i.name for i in model.graph.input}:
        raise IA3Error(f"internal error: the traced graph has no input {name!r} (was the vector unused?)")
    ones = np.ones(shape, dtype=numpy_dtype(dtype))
    model.graph.initializer.append(numpy_helper.from_array(ones, name))


def drop_noop_casts(model, names: list[str]) -> int:
    """Remove Casts of the vector inputs (and of rows gathered from them) to the type they already
    have: `vector.to(x.dtype)` traces to a Cast even when nothing changes. Returns how many."""
    known = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name in names}
    alias, keep = {}, []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        source = node.input[0] if node.input else None
        if node.op_type == "Cast" and source in known and next(a.i for a in node.attribute if a.name == "to") == known[source]:
            alias[node.output[0]] = source
            continue
        if node.op_type in ("Gather", "Unsqueeze", "Reshape", "Identity") and source in known:
            known[node.output[0]] = known[source]
        keep.append(node)
    for output in model.graph.output:
        if output.name in alias:  # never the case for our graphs; keep the name rather than rewire it
            return 0
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(alias)


def save(model, path: str) -> list[str]:
    """Write the model; weights past 2 GB go to `<file>_data` beside it (as optimum does). Returns the files."""
    import onnx

    size = sum(t.ByteSize() for t in model.graph.initializer)
    files = [os.path.basename(path)]
    if size > EXTERNAL_DATA_ABOVE:
        data = os.path.basename(path) + "_data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        files.append(data)
    else:
        onnx.save_model(model, path)
    return files


def check(path: str) -> None:
    """onnx's full check (including shape inference); reads external data from the file's folder."""
    import onnx

    check_graph(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        from ..errors import CheckFailed

        raise CheckFailed(f"{os.path.basename(path)} fails onnx.checker: {str(e).splitlines()[0][:300]}") from None


def op_histogram(model_or_path) -> dict[str, int]:
    """Node count per op type (subgraphs included): equal histograms mean no added ops."""
    model = load(model_or_path) if isinstance(model_or_path, str) else model_or_path
    counts = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return dict(sorted(counts.items()))


def io_names(model) -> tuple[list[str], list[str]]:
    """Graph inputs (overridable initializers included) and outputs, in order."""
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]
