"""Parity: an exported folder on ONNX Runtime vs its PyTorch model, with documented tolerances.

One engine (`check_parity`) serves the `ia3-export parity` command, the pytest plugin and
scripts/gpu_parity.py. Importing this package is cheap: torch loads only when a check runs.
"""
from .check import ParityOptions, check_parity
from .report import ParityReport
from ..tolerances import TOLERANCES, Tolerance, tolerance

__all__ = ["ParityOptions", "ParityReport", "TOLERANCES", "Tolerance", "check_parity", "tolerance"]
