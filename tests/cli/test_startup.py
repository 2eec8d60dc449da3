"""Start-up stays lean: the runtime and the command line's help never import torch or transformers
(a serving container has neither). Checked in a fresh interpreter, where sys.modules is honest."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "onnx", "peft")


def modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint('MODULES', ' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.rsplit("MODULES", 1)[1].split())  # the help text printed before may name modules too


def test_runtime_import_pulls_no_torch():
    loaded = modules_after("import ia3_export.runtime")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_help_pulls_no_torch():
    for args in (["--help"], ["generate", "--help"], ["convert", "--help"], ["inspect", "--help"]):
        code = f"import sys\nfrom ia3_export.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code"
        loaded = modules_after(code)
        assert not loaded & set(HEAVY), (args, sorted(loaded & set(HEAVY)))
