#!/usr/bin/env python
"""Start-up cost of the serving path, each measured in a fresh process (median of repeats):
`ia3-export --help`, `ia3-export generate --help`, `import ia3_export.runtime`, and the first
generated token from a cold start (open folder, load adapter, generate one token), next to
`optimum-cli --help` where optimum is installed. JSON goes to runs/.

    .venv/bin/python scripts/bench_startup.py [--python .venv-lean/bin/python] [--folder ONNX_DIR --adapter NAME]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_TOKEN = """
from ia3_export.runtime import IA3Session
s = IA3Session({folder!r})
s.set_adapter(s.load_adapter({adapter!r}) if {adapter!r} else None)
s.generate("hello", adapter=s.active, max_new_tokens=1)
"""


def wall(cmd: list[str], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=tempfile.gettempdir())  # not the source tree
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeats}


def tiny_export() -> tuple[str, str]:
    """A tiny swappable llama export with one adapter (needs the full environment)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    work = tempfile.mkdtemp(prefix="bench_startup-")
    base = save_tiny(os.path.join(work, "base"), "llama")
    model = IA3Model(load_base_model(base), IA3Config())
    randomize_adapter(model, "default")
    adapter = model.save_adapter(os.path.join(work, "adapter1"))
    export_model(base, os.path.join(work, "onnx"), mode="swappable", adapters=[adapter])
    return os.path.join(work, "onnx"), "adapter1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="Interpreter to measure (e.g. the lean venv's).")
    parser.add_argument("--folder", help="Exported folder for the first-token timing (default: a tiny export made now).")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    folder, adapter = (args.folder, args.adapter) if args.folder else tiny_export()
    py = os.path.abspath(args.python) if os.sep in args.python else args.python
    exe = os.path.join(os.path.dirname(py), "ia3-export")  # the installed console script, as users run it
    cases = {
        "python_startup": [py, "-c", "pass"],
        "ia3-export --help": [exe, "--help"],
        "ia3-export generate --help": [exe, "generate", "--help"],
        "import ia3_export.runtime": [py, "-c", "import ia3_export.runtime"],
        "first_token_cold": [py, "-c", FIRST_TOKEN.format(folder=folder, adapter=adapter)],
    }
    optimum = shutil.which("optimum-cli", path=os.path.dirname(py) + os.pathsep + os.environ.get("PATH", ""))
    if optimum:
        cases["optimum-cli --help"] = [optimum, "--help"]
    results = {"python": py, "folder": folder, "timings": {name: wall(cmd, args.repeats) for name, cmd in cases.items()}}
    for name, r in results["timings"].items():
        print(f"{name:<28} {r['median_s'] * 1e3:8.1f} ms  (min {r['min_s'] * 1e3:.1f}, max {r['max_s'] * 1e3:.1f})")
    if not optimum:
        print("optimum-cli: not installed here")
    write_result(args.out, "bench_startup", results)


if __name__ == "__main__":
    sys.exit(main())
