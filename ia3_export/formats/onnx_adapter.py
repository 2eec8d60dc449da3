"""ONNX Runtime's adapter files (`.onnx_adapter`): named tensors that bind to graph inputs by name.

Written with `onnxruntime.AdapterFormat`. Its OrtValues BORROW numpy memory, so every array is
kept alive in a local dict until the file is written (temporaries here produced garbage values).
Torch-free: the serving install converts adapters too.
"""
from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_output_file
from ..errors import IA3Error
from ..ort import onnxruntime

SUFFIX = ".onnx_adapter"


def write_onnx_adapter(path: str, tensors: dict[str, np.ndarray], adapter_version: int = 1,
                       model_version: int = 1, force: bool = False, inputs=()) -> str:
    """Write tensors (name -> array) as an .onnx_adapter file, atomically."""
    ort = onnxruntime()

    if not tensors:
        raise IA3Error(f"refusing to write {path}: the adapter has no tensors")
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}  # kept alive below
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(adapter_version)
    adapter.set_model_version(model_version)
    adapter.set_parameters(values)
    with atomic_output_file(path, force=force, inputs=inputs) as tmp:
        adapter.export_adapter(tmp)
    del values, arrays
    return path


def read_onnx_adapter(path: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The tensors of an .onnx_adapter file (copied out of ORT's buffers). ORT reads the whole file,
    so `max_bytes` (what the model's vectors can need) is checked against its size first."""
    ort = onnxruntime()

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise IA3Error(f"{path}: cannot read ({e.strerror})") from None
    if max_bytes is not None and size > max_bytes:
        raise IA3Error(f"{path}: {size} bytes, more than the {max_bytes} an adapter for this model can need; "
                       "is it the adapter of another model?")
    try:
        adapter = ort.AdapterFormat.read_adapter(path)
        return {name: np.array(value.numpy(), copy=True) for name, value in adapter.get_parameters().items()}
    except Exception as e:  # ORT raises a bare RuntimeError/Fail for any malformed file
        raise IA3Error(f"{path}: not a readable .onnx_adapter file ({str(e).splitlines()[0][:200]})") from None
