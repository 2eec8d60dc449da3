"""ONNX export: merged (adapters folded), swappable (vectors as overridable inputs) and bank
(per-row adapters by Gather). `export_model` is the API; `ia3-export export` calls it."""
from .build import DEFAULT_OPSET, EXPORTERS, export_model
from .quantize import QuantizeOptions

__all__ = ["export_model", "DEFAULT_OPSET", "EXPORTERS", "QuantizeOptions"]
