"""ONNX export: one loop (export/pipeline.py) and one class per mode (export/modes/): merged
(adapters folded), swappable (vectors as overridable inputs), bank (per-row adapters by Gather),
foldswap (targeted weights re-folded on a switch). `export_model` is the API; `ia3-export export`
calls it."""
from .pipeline import DEFAULT_OPSET, EXPORTERS, export_model
from .quantize import QuantizeOptions

__all__ = ["export_model", "DEFAULT_OPSET", "EXPORTERS", "QuantizeOptions"]
