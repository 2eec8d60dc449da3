"""swappable: each IA3 vector is a graph input [dim] with an initializer of ones (ONNX Runtime's
adapter API and ia3-export's runtime feed one adapter per batch). The defaults of `ExportMode`."""
from __future__ import annotations

from ...formats.manifest import SWAPPABLE
from .base import ExportMode


class Swappable(ExportMode):
    name = SWAPPABLE
