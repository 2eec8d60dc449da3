"""The element types: one table of how numpy, ONNX, ONNX Runtime, PyTorch and safetensors name them.

The short names (fp32, fp16, bf16, fp64) are what the CLI, the manifest and the tolerance tables
say. Torch and onnx are not imported here (the lean runtime has neither): torch dtypes are looked
up by name when asked for, and ONNX's element types are TensorProto's numbers.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .errors import IA3Error


@dataclasses.dataclass(frozen=True)
class DType:
    short: str  # fp32, fp16, bf16, fp64, int64, ...
    numpy: str | None  # numpy's name; None where numpy has no such type (bfloat16)
    onnx: int  # onnx.TensorProto's element type number
    ort: str  # ONNX Runtime's type string (NodeArg.type)
    torch: str  # the attribute of the torch module
    safetensors: str  # the safetensors header's name
    itemsize: int  # bytes per value

    @property
    def np(self) -> np.dtype:
        if self.numpy is None:
            raise IA3Error(f"numpy has no {self.short} type; use fp32")
        return np.dtype(self.numpy)

    def to_torch(self):
        """The torch dtype (imports torch: only the torch side calls this)."""
        import torch

        return getattr(torch, self.torch)


DTYPES: dict[str, DType] = {d.short: d for d in (
    DType("fp64", "float64", 11, "tensor(double)", "float64", "F64", 8),
    DType("fp32", "float32", 1, "tensor(float)", "float32", "F32", 4),
    DType("fp16", "float16", 10, "tensor(float16)", "float16", "F16", 2),
    DType("bf16", None, 16, "tensor(bfloat16)", "bfloat16", "BF16", 2),
    DType("int64", "int64", 7, "tensor(int64)", "int64", "I64", 8),
    DType("int32", "int32", 6, "tensor(int32)", "int32", "I32", 4),
    DType("int16", "int16", 5, "tensor(int16)", "int16", "I16", 2),
    DType("int8", "int8", 3, "tensor(int8)", "int8", "I8", 1),
    DType("uint8", "uint8", 2, "tensor(uint8)", "uint8", "U8", 1),
    DType("bool", "bool", 9, "tensor(bool)", "bool", "BOOL", 1),
    DType("uint16", "uint16", 4, "tensor(uint16)", "uint16", "U16", 2),
    DType("uint32", "uint32", 12, "tensor(uint32)", "uint32", "U32", 4),
    DType("uint64", "uint64", 13, "tensor(uint64)", "uint64", "U64", 8),
    DType("complex64", "complex64", 14, "tensor(complex64)", "complex64", "C64", 8),
    DType("fp8e4m3", None, 17, "tensor(float8e4m3fn)", "float8_e4m3fn", "F8_E4M3", 1),
    DType("fp8e5m2", None, 19, "tensor(float8e5m2)", "float8_e5m2", "F8_E5M2", 1),
    DType("fp8e8m0", None, 24, "tensor(float8e8m0)", "float8_e8m0fnu", "F8_E8M0", 1),
)}
EXPORT_DTYPES = ("fp32", "fp16")  # what an ONNX export's weights and activations can be
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")  # autocast precisions of training
REFERENCE_DTYPES = ("fp64", "fp32")  # parity's PyTorch reference

_BY_ORT = {d.ort: d for d in DTYPES.values()}
SAFETENSORS = {d.safetensors: d for d in DTYPES.values()}  # the header's dtype names


def dtype(short: str, choices=tuple(DTYPES)) -> DType:
    """The entry of a short name; an unknown one is refused."""
    if short not in choices:
        raise IA3Error(f"unknown dtype {short!r}; use one of {', '.join(choices)}")
    return DTYPES[short]


def numpy_dtype(short: str) -> np.dtype:
    """numpy's dtype of a short name (fp16 -> float16)."""
    return dtype(short).np


def torch_dtype(short: str):
    """torch's dtype of a short name (bf16 -> torch.bfloat16); imports torch."""
    return dtype(short).to_torch()


def of_ort(type_string: str) -> DType | None:
    """The entry of an ONNX Runtime type string ("tensor(float)"); None for a type not in the table."""
    return _BY_ORT.get(type_string)


