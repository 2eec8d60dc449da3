"""ia3-export: train IA3 adapters and ship them to ONNX Runtime.

Heavy modules (torch, transformers) are imported lazily so that `ia3_export.runtime`
and the command line's `--help` stay fast and torch-free.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "IA3Config": "ia3_export.core.config",
    "IA3Model": "ia3_export.core.model",
    "IA3Error": "ia3_export.errors",
    "read_adapter": "ia3_export.formats.adapter_format",
    "write_adapter": "ia3_export.formats.adapter_format",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ia3_export' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
