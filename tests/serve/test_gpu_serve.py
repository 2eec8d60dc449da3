"""The dry run of scripts/gpu_serve.py (the GPU check of continuous batching) on the CPU: the engine's
answers equal alone with the KV cache and the bank as device values, and the server's too."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_serve_dry_run_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_serve.py"), "--folder", folder("llama-bank"),
                           "--provider", "cpu", "--requests", "8", "--server-requests", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "gpu_serve.json") as f:
        report = json.load(f)
    engine = report["engine"]
    assert engine["wrong"] == [] and set(engine["finish"]) <= {"length", "stop"}
    assert engine["kv_devices"] == ["cpu"] and engine["bank_devices"] == ["cpu"]
    assert report["server"]["wrong"] == [] and report["failed"] == []
