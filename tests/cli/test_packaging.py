"""The product as it reaches users: the installed console script, the wheel's extras, and what a
user sees when the install lacks (or doubles) ONNX Runtime."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error, run_cli

from ia3_export.cli import COMMANDS

WHEEL = os.environ.get("IA3_WHEEL")  # set by scripts/test.sh to the wheel it built and installed

HIDE = """
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == {0!r} or name.startswith({0!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, _Hide())
"""
NO_ONNXRUNTIME = HIDE.format("onnxruntime")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_answers_help_from_the_installed_script(command):
    """A console script runs in a fresh interpreter: a missing import there breaks every command."""
    result = run_cli(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ia3-export"), result.stdout


def test_missing_onnxruntime_is_one_line_naming_both_extras(tmp_path):
    (tmp_path / "a.onnx_adapter").write_bytes(b"\0" * 64)
    result = run_cli("inspect", tmp_path / "a.onnx_adapter", preload=NO_ONNXRUNTIME)
    line = assert_one_line_error(result, 2, "ONNX Runtime cannot be imported")
    assert "ia3-export[cpu]" in line and "ia3-export[gpu]" in line


def test_missing_torch_says_to_install_the_cpu_build_first(tmp_path, model_dir):
    """PyPI's default Linux torch is the multi-GB CUDA build: the line gives the README's CPU index first."""
    result = run_cli("export", model_dir("llama"), "--out", tmp_path / "out", "--mode", "merged", preload=HIDE.format("torch"))
    line = assert_one_line_error(result, 2, "this command needs torch; install torch's CPU build first")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in line
    assert "pip install 'ia3-export[export,cpu]'" in line


def test_two_onnxruntime_builds_are_named_in_a_warning(tmp_path):
    """A second build's dist-info on the path is what `pip install onnxruntime-gpu` next to
    onnxruntime leaves behind; the command still runs, with one warning line first."""
    info = tmp_path / "site" / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    result = run_cli("inspect", tmp_path / "nope", env={"PYTHONPATH": str(tmp_path / "site")})
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: onnxruntime and onnxruntime-gpu are all installed"), warning
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in warning
    assert error.startswith("error: ") and result.exit_code == 2


def _resolved(requirement: str) -> set[str]:
    """Names pip would install for `requirement` in an empty environment (no download of wheels)."""
    report = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                             "--report", "-", requirement], capture_output=True, text=True, check=True).stdout
    return {item["metadata"]["name"].lower() for item in json.loads(report)["install"]}


@pytest.mark.skipif(not WHEEL, reason="needs the built wheel (scripts/test.sh sets IA3_WHEEL)")
@pytest.mark.parametrize("extras,runtime", [("export,gpu,dev,optimum", "onnxruntime-gpu"),
                                            ("export,cpu,dev,optimum", "onnxruntime"),
                                            ("export,cpu,fused,dev", "onnxruntime")])
def test_each_install_resolves_exactly_one_onnxruntime(extras, runtime):
    """onnxruntime-genai (the `fused` extra) is a library on top of ONNX Runtime, not a second runtime;
    it depends on the CPU `onnxruntime`, which is why `fused` never comes with `gpu` or `dev`."""
    names = _resolved(f"{WHEEL}[{extras}]")
    assert {n for n in names if n.startswith("onnxruntime")} - {"onnxruntime-genai"} == {runtime}, sorted(names)
    assert ("onnxruntime-genai" in names) == ("fused" in extras.split(","))


@pytest.mark.parametrize("command", ["export", "generate", "convert", "parity"])
def test_help_names_every_export_mode(command):
    """Each command that reads or writes an exported folder names all four modes in its help."""
    from ia3_export.formats.manifest import MODES

    text = run_cli(command, "--help").stdout
    assert all(mode in text for mode in MODES), (command, [m for m in MODES if m not in text])


def test_runtime_session_docstring_names_every_mode():
    from ia3_export.formats.manifest import MODES
    from ia3_export.runtime import IA3Session

    assert all(mode in IA3Session.__doc__ for mode in MODES)
