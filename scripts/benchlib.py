"""What every benchmark script shares: writing its result as JSON where the docs can quote it, and
ONNX Runtime's telemetry off before a benchmark imports onnxruntime itself (ia3_export/ort.py)."""
from __future__ import annotations

import datetime
import json
import os

from ia3_export.ort import telemetry_off

telemetry_off()


def write_result(out_dir: str, name: str, result: dict, stamp: bool = True) -> str:
    """Write `result` to OUT_DIR/NAME[-UTC timestamp].json, print and return the path."""
    os.makedirs(out_dir, exist_ok=True)
    suffix = f"-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}" if stamp else ""
    path = os.path.join(out_dir, f"{name}{suffix}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print("wrote", path)
    return path
