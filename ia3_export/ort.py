"""Which ONNX Runtime an install has. `onnxruntime` (CPU) and `onnxruntime-gpu` (and the other
builds) all own the `onnxruntime` module, so two of them overwrite each other's files; ORT's
maintainers say to install exactly one, and the package's `cpu` and `gpu` extras give one each."""
from __future__ import annotations

from importlib import metadata

DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn")
INSTALL = "pip install 'ia3-export[cpu]' (or 'ia3-export[gpu]' for CUDA)"


def installed() -> list[str]:
    """The ONNX Runtime distributions installed in this environment."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def missing_message(error: ImportError) -> str:
    return f"ONNX Runtime cannot be imported ({error}); install exactly one: {INSTALL}"


def clash_message(found: list[str]) -> str | None:
    """A warning when several builds share the module (the one imported is whichever wrote last)."""
    if len(found) < 2:
        return None
    return (f"{' and '.join(found)} are all installed and overwrite each other's `onnxruntime` module; keep one: "
            f"pip uninstall -y {' '.join(found)}, then {INSTALL}")
