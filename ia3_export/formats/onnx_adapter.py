"""ONNX Runtime's adapter files (`.onnx_adapter`): named tensors that bind to graph inputs by name.

Written with `onnxruntime.AdapterFormat`. Its OrtValues BORROW numpy memory, so every array is
kept alive in a local dict until the file is written (temporaries here produced garbage values).
Torch-free: the serving install converts adapters too.
"""
from __future__ import annotations

import numpy as np

from .atomic import atomic_output_file, check_finite
from ..errors import IA3Error
from .reader import check_regular, pinned, registers
from ..ort import onnxruntime

SUFFIX = ".onnx_adapter"


def write_onnx_adapter(path: str, tensors: dict[str, np.ndarray], adapter_version: int = 1,
                       model_version: int = 1, force: bool = False, inputs=()) -> str:
    """Write tensors (name -> array) as an .onnx_adapter file, atomically; inf or NaN is refused."""
    ort = onnxruntime()

    if not tensors:
        raise IA3Error(f"refusing to write {path}: the adapter has no tensors")
    check_finite(tensors, path)
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


@registers("onnx_adapter_file", ("", "onnx_adapter"))
def read_onnx_adapter(path: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The tensors of an .onnx_adapter file (copied out of ORT's buffers). ORT reads the whole file,
    so it is handed the regular file checked here (`reader.pinned`), and `max_bytes` (what the
    model's vectors can need) is checked against its size first."""
    ort = onnxruntime()

    size = check_regular(path, "onnx_adapter").st_size
    if max_bytes is not None and size > max_bytes:
        raise IA3Error(f"{path}: {size} bytes, more than the {max_bytes} an adapter for this model can need; "
                       "is it the adapter of another model?")
    try:
        with pinned(path, "onnx_adapter") as readable:
            adapter = ort.AdapterFormat.read_adapter(readable)
        return {name: np.array(value.numpy(), copy=True) for name, value in adapter.get_parameters().items()}
    except IA3Error:
        raise
    except Exception as e:  # ORT raises a bare RuntimeError/Fail for any malformed file
        raise IA3Error(f"{path}: not a readable .onnx_adapter file ({str(e).splitlines()[0][:200]})") from None
