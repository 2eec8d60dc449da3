"""pytest plugin: parity checks for your exports in a few lines of CI.

    # test_export.py  (pip install 'ia3-export[export]' pytest; the plugin loads itself)
    def test_export_matches_pytorch(ia3_parity):
        ia3_parity("models/base", "exports/onnx", adapters=["adapters/support", "adapters/sales"])

`ia3_parity(model_dir, onnx_dir, adapters=(), provider=None, **options)` runs the same check as
`ia3-export parity` and fails the test with the worst differences named; options are those of
`ia3_export.parity.ParityOptions` (reference_dtype, atol, rtol, tf32, greedy_steps, seed).
Command-line options: `--ia3-provider cuda` (default cpu) and `--ia3-parity-reports DIR` (a JSON
report per test). A CUDA check where ONNX Runtime has no CUDA provider is SKIPPED with the reason,
never passed silently.

Registered under the `pytest11` entry point, so it loads in every pytest run where ia3-export is
installed: this module imports only pytest, and adds nothing unless the fixture is used.
"""
from __future__ import annotations

import os
import re

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("ia3-export", "ia3-export parity checks")
    group.addoption("--ia3-provider", choices=("cpu", "cuda"), default=None,
                    help="ONNX Runtime provider for ia3_parity checks that do not name one (default: cpu)")
    group.addoption("--ia3-parity-reports", metavar="DIR", default=None,
                    help="write each ia3_parity check's JSON report into DIR")


@pytest.fixture
def ia3_parity(request):
    """A function that checks an exported folder against its PyTorch model; returns the ParityReport."""

    def check(model_dir, onnx_dir, adapters=(), provider=None, **options):
        from ia3_export.errors import IA3Error
        from ia3_export.parity import ParityOptions, check_parity

        provider = provider or request.config.getoption("ia3_provider") or "cpu"
        if provider == "cuda":
            _skip_without_cuda()
        try:
            report = check_parity(str(model_dir), str(onnx_dir), [str(a) for a in adapters],
                                  ParityOptions(provider=provider, **options))
        except IA3Error as e:
            pytest.fail(f"ia3-export parity could not run: {e}", pytrace=False)
        folder = request.config.getoption("ia3_parity_reports")
        if folder:
            os.makedirs(folder, exist_ok=True)
            report.write_json(os.path.join(folder, re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name) + ".json"),
                              force=True)
        if not report.passed:
            lines = [report.header(), *(f.line() for f in report.failures()[:20]), report.summary()]
            pytest.fail("\n".join(lines), pytrace=False)
        return report

    return check


def _skip_without_cuda() -> None:
    from ..ort import onnxruntime

    ort = onnxruntime()
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        pytest.skip(f"CUDAExecutionProvider is not available (onnxruntime {ort.__version__} offers "
                    f"{', '.join(providers)}); install onnxruntime-gpu on a GPU machine to run CUDA parity")
