"""Fixtures for the JavaScript checks (onnxruntime-node, transformers.js, headless Chromium).

Run by scripts/web_check.sh, which installs the npm packages pinned by the root package.json
(`npm ci`) and Debian's chromium, then sets IA3_WEB=1; skipped otherwise. Node scripts live beside
the tests (tests/web/*.mjs) so that Node resolves `onnxruntime-node` etc. from the root node_modules.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WEB = os.environ.get("IA3_WEB") == "1"
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for job_helpers
from job_helpers import skip_folder_unless  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_folder_unless(items, HERE, WEB, "set IA3_WEB=1 (scripts/web_check.sh does, after npm ci) to run the JavaScript checks")


@pytest.fixture(scope="session")
def node():
    """node(script, *args, timeout=300) -> the JSON object the script printed last on stdout; a script
    that exits non-zero fails the test with its stderr. `script` is a file name in tests/web."""

    def run(script: str, *args, timeout: float = 300, check: bool = True):
        done = subprocess.run(["node", os.path.join(HERE, script), *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"node {script} exited {done.returncode}:\n{done.stderr[-4000:]}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return (json.loads(lines[-1]) if lines else None) if check else done

    return run
