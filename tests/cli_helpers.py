"""Run the installed `ia3-export` console script, as a user does.

CLI tests go through the script the package installs next to the interpreter (not click's
in-process runner), so a broken entry point, a missing import or a package-data file absent from
the wheel fails a test. `run_cli` returns an object with click's CliRunner result names
(`exit_code`, `stdout`, `stderr`, `output`) so assertions read the same either way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

EXE = os.path.join(os.path.dirname(sys.executable), "ia3-export")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args, env: dict | None = None, input: str | None = None, cwd=None, timeout: float = 600,
            preload: str | None = None) -> CliResult:
    """`ia3-export ARGS...` in a subprocess; env adds to (not replaces) the current environment.

    preload: Python source run in the child before the command (a `sitecustomize` on PYTHONPATH),
    for tests that must make a library fail inside the real console script."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory() as site:
        if preload:
            with open(os.path.join(site, "sitecustomize.py"), "w") as f:
                f.write(preload)
            full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, full_env.get("PYTHONPATH")]))
        done = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=full_env, input=input,
                              cwd=cwd, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: CliResult, code: int, message: str) -> str:
    """The command failed with `code` and said exactly one `error: ...` line containing `message`."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    return lines[0]


def strict_json(text: str):
    """Parse JSON as strict parsers (jq, JavaScript) do: a bare NaN or Infinity fails the test."""
    def refuse(constant):
        raise AssertionError(f"not JSON: bare {constant}")

    return json.loads(text, parse_constant=refuse)
