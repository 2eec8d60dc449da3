"""Parity (issue 6): the CPU matrix over every tiny architecture and export mode, the command's
exit codes and reports, the tolerances, and the pytest plugin.

The reference is independent of the graph: the float64 PyTorch model running each row alone,
unpadded, with its own adapter through our IA3 layer (see ia3_export/parity/check.py).
"""
from __future__ import annotations

import json
import os

import pytest

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.parity import TOLERANCES, check_parity, tolerance
from ia3_export.examples.tiny import DECODERS, ENCODERS, SEQ2SEQ

pytest_plugins = ["pytester"]

MODES = ("merged", "swappable", "bank")
ARCHITECTURES = [*DECODERS, *ENCODERS, *SEQ2SEQ]
# Every architecture once, the modes rotating (each mode meets decoders, encoders and seq2seq);
# llama also gets the other two modes in test_llama_every_mode.
MATRIX = [(arch, MODES[i % 3]) for i, arch in enumerate(ARCHITECTURES)]
_EXPORTS: dict = {}


def export_for(tmp_path_factory, model_dir, adapter_dir, arch: str, mode: str, dtype: str = "fp32") -> tuple[str, list[str]]:
    """(export folder, adapter folders) for one tiny model, exported once per test session."""
    from ia3_export.export import export_model

    key = (arch, mode, dtype)
    if key not in _EXPORTS:
        adapters = [adapter_dir(arch, seed=1)] + ([adapter_dir(arch, seed=2)] if mode != "merged" else [])
        out = str(tmp_path_factory.mktemp(f"parity-{arch}-{mode}-{dtype}") / "onnx")
        export_model(model_dir(arch), out, mode=mode, adapters=adapters, dtype=dtype)
        _EXPORTS[key] = (out, adapters)
    return _EXPORTS[key]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core runner torch's thread pool makes
    each small matmul ~100x slower; restored afterwards for other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_parity(*args: str):
    result = run_cli("parity", *args)
    return result.exit_code, result.output


@pytest.mark.parametrize("arch,mode", MATRIX, ids=[f"{a}-{m}" for a, m in MATRIX])
def test_cpu_matrix(arch, mode, tmp_path_factory, model_dir, adapter_dir):
    onnx_dir, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, arch, mode)
    report = check_parity(model_dir(arch), onnx_dir, adapters)
    assert report.passed, "\n".join(f.line() for f in report.failures()[:5])
    # Every case ran: padding and (with a cache) past > 0; bank mixes adapters across rows.
    cases = {o.case for o in report.outputs}
    assert len(cases) >= 2
    if mode == "bank":
        assert any(len({r for r in o.scenario.split(" ", 1)[1].split(",")}) == 3 for o in report.outputs)
    if mode != "merged":
        assert any(o.scenario.startswith("nothing fed") for o in report.outputs)
    generates = arch in DECODERS or arch in SEQ2SEQ
    assert bool(report.greedy) == generates
    assert all(g.reference == g.actual or "near-tie" in g.note for g in report.greedy)


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_llama_every_mode(mode, tmp_path_factory, model_dir, adapter_dir):
    onnx_dir, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", mode)
    report = check_parity(model_dir("llama"), onnx_dir, adapters)
    assert report.passed, "\n".join(f.line() for f in report.failures()[:5])
    # The shipped .onnx_adapter files are what the ONNX side loaded (the export was made from these folders).
    assert {g.adapter for g in report.greedy} >= {"adapter1", "adapter2"}


@pytest.mark.parametrize("mode", MODES)
def test_cuda_matrix(mode, tmp_path_factory, model_dir, adapter_dir):
    """The CUDA cases run where onnxruntime-gpu and a GPU exist; elsewhere a visible skip, never a pass."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"CUDAExecutionProvider is not available (onnxruntime {ort.__version__} offers "
                    f"{', '.join(ort.get_available_providers())}); run scripts/gpu_parity.py on a GPU machine")
    onnx_dir, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", mode)
    for tf32 in (True, False):
        report = check_parity(model_dir("llama"), onnx_dir, adapters, provider="cuda", tf32=tf32)
        assert report.passed, "\n".join(f.line() for f in report.failures()[:5])


def test_command_reports_and_exit_0(tmp_path, tmp_path_factory, model_dir, adapter_dir):
    onnx_dir, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", "bank")
    json_path, junit_path = tmp_path / "r.json", tmp_path / "r.xml"
    code, out = run_parity(model_dir("llama"), onnx_dir, *[a for p in adapters for a in ("--adapter", p)],
                        "--json", str(json_path), "--junit", str(junit_path))
    assert code == 0, out
    assert "PASS" in out and "logits" in out and "greedy" in out
    report = json.loads(json_path.read_text())
    assert report["passed"] and report["reference_dtype"] == "fp64" and report["atol"] == 1e-4
    worst = {w["name"] for w in report["worst_per_output"]}
    assert worst == {"logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"}
    for w in report["worst_per_output"]:  # per output: max abs, max rel, the worst position
        assert {"max_abs", "max_rel", "worst_index"} <= set(w) and len(w["worst_index"]) == w["shape"].__len__()
    import xml.etree.ElementTree as ET

    suite = ET.parse(junit_path).getroot().find("testsuite")
    assert int(suite.get("tests")) == len(report["outputs"]) + len(report["greedy"]) and suite.get("failures") == "0"
    # A rerun in the same CI workspace replaces its reports, as pytest's --junitxml does.
    json_path.write_text("stale")
    code, out = run_parity(model_dir("llama"), onnx_dir, *[a for p in adapters for a in ("--adapter", p)],
                           "--json", str(json_path), "--steps", "2")
    assert code == 0, out
    assert json.loads(json_path.read_text())["passed"]


def test_bad_usage_exits_2(tmp_path_factory, model_dir, adapter_dir):
    merged, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", "merged")
    code, out = run_parity(model_dir("llama"), merged)  # the folded adapter not given
    assert code == 2 and "adapter1" in out and "--adapter" in out
    code, out = run_parity(model_dir("gpt2"), merged, "--adapter", adapters[0])  # another model
    assert code == 2 and "gpt2" in out and "llama" in out
    code, out = run_parity(model_dir("llama"), merged, "--adapter", adapters[0], "--atol", "1e-3")
    assert code == 2 and "--rtol" in out
    code, out = run_parity(model_dir("llama"), str(tmp_path_factory.mktemp("empty")), "--adapter", adapters[0])
    assert code == 2 and "ia3_export.json" in out


def test_fp16_needs_its_tolerance(tmp_path_factory, model_dir, adapter_dir):
    """fp16 passes the documented fp16 bound, and its error is real: the fp32 bound rejects it."""
    onnx_dir, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", "merged", dtype="fp16")
    report = check_parity(model_dir("llama"), onnx_dir, adapters, greedy_steps=0)
    assert report.passed and (report.atol, report.rtol) == (tolerance("cpu", "fp16").atol, tolerance("cpu", "fp16").rtol)
    code, out = run_parity(model_dir("llama"), onnx_dir, "--adapter", adapters[0], "--atol", "1e-6", "--rtol", "1e-6",
                        "--steps", "0")
    assert code == 1 and "FAIL" in out


def test_tolerances_documented():
    """Every provider/dtype the checks accept has a bound and a reason; TF32 only matters for CUDA fp32."""
    for provider in ("cpu", "cuda"):
        for dtype in ("fp32", "fp16"):
            assert tolerance(provider, dtype).why
    assert tolerance("cuda", "fp32", tf32=True).atol > tolerance("cuda", "fp32", tf32=False).atol
    assert tolerance("cpu", "fp32", tf32=True) == tolerance("cpu", "fp32")
    assert tolerance("cuda", "fp16", tf32=True) == tolerance("cuda", "fp16")
    assert len(TOLERANCES) == 5


def test_pytest_plugin(pytester, tmp_path_factory, model_dir, adapter_dir):
    """The documented copy-paste example, run by pytest itself: one passing, one failing check."""
    onnx_dir, adapters = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", "swappable")
    pytester.makepyfile(f"""
        MODEL, ONNX, ADAPTERS = {model_dir('llama')!r}, {onnx_dir!r}, {adapters!r}

        def test_export_matches(ia3_parity):
            ia3_parity(MODEL, ONNX, adapters=ADAPTERS, greedy_steps=2)

        def test_too_strict(ia3_parity):
            ia3_parity(MODEL, ONNX, adapters=ADAPTERS, atol=0.0, rtol=0.0, greedy_steps=0)

        def test_cuda(ia3_parity):
            ia3_parity(MODEL, ONNX, adapters=ADAPTERS, provider="cuda")
    """)
    # The plugin loads through its pytest11 entry point (named explicitly only where autoload is off).
    explicit = ["-p", "ia3_export.parity.pytest_plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    result = pytester.runpytest_inprocess(*explicit, "-rs",
                                          f"--ia3-parity-reports={pytester.path / 'reports'}")
    cuda = _has_cuda()
    result.assert_outcomes(passed=2 if cuda else 1, failed=1, skipped=0 if cuda else 1)
    if not cuda:
        result.stdout.fnmatch_lines(["*SKIPPED*CUDAExecutionProvider is not available*"])
    result.stdout.fnmatch_lines(["*FAIL*logits*"])
    assert (pytester.path / "reports" / "test_export_matches.json").is_file()


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_gpu_script_prepare_and_cpu_run(tmp_path):
    """scripts/gpu_parity.py end to end on the CPU provider (the GPU run is the same code with --provider cuda)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_parity", os.path.join(os.path.dirname(__file__), "..", "..", "scripts",
                                                                             "gpu_parity.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    matrix, out = str(tmp_path / "matrix"), str(tmp_path / "out")
    fused = importlib.util.find_spec("onnxruntime_genai") is not None  # the builder makes the fused graph
    assert script.main(["--prepare", matrix, "--arch", "gpt2", "--mode", "bank", "--dtype", "fp16"]
                       + (["--arch", "llama", "--graph", "traced", "--graph", "fused"] if fused else [])) == 0
    archive = matrix + ".tar.xz"  # what travels to the GPU machine
    assert script.main(["--run", archive, "--provider", "cpu", "--out", out, "--workers", "0", "--steps", "2"]) == 0
    result = json.loads(open(os.path.join(out, "gpu_parity.json")).read())
    rows = {(r["arch"], r["graph"]): r for r in result["rows"]}
    assert set(rows) == {("gpt2", "traced")} | ({("llama", "traced"), ("llama", "fused")} if fused else set())
    for row in rows.values():
        assert row["passed"] and row["dtype"] == "fp16" and row["tf32"] is None
        assert row["atol"] == tolerance("cpu", "fp16").atol and row["greedy_identical"] == row["greedy"] > 0
    table = open(os.path.join(out, "gpu_parity.md")).read()
    assert "| gpt2 | bank | fp16 | - | pass |" in table
    assert not fused or "| llama (fused) | bank | fp16 | - | pass |" in table
    # Without a GPU the CUDA run fails every row with the reason (exit 1), never passes.
    if not _has_cuda():
        assert script.main(["--run", matrix, "--out", out, "--workers", "0"]) == 1
        row = json.loads(open(os.path.join(out, "gpu_parity.json")).read())["rows"][0]
        assert not row["passed"] and "CUDAExecutionProvider" in row["error"]


def test_compare_where_skips_undefined_positions():
    """Padded positions hold undefined values: outside `where` they neither fail nor become the worst."""
    import numpy as np

    from ia3_export.compare import compare

    reference = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    actual = reference + np.array([[9.0, 0.0, 1e-3], [np.nan, 2e-3, 0.0]])
    real = np.array([[False, True, True], [False, True, True]])
    c = compare("x", reference, actual, 1e-4, 0.0, where=real)
    assert not c.passed and c.worst_index == (1, 1) and c.max_abs == pytest.approx(2e-3) and not c.note
    assert compare("x", reference, actual, 1e-2, 0.0, where=real).passed
    assert not compare("x", reference, actual, 1e-2, 0.0).passed  # without it, the padded 9.0 and NaN fail


def test_json_report_stays_strict_json(tmp_path):
    """A wrong-shaped output compares as inf: the report must still load in strict JSON readers (null)."""
    import numpy as np

    from ia3_export.compare import compare
    from ia3_export.parity.report import OutputCheck, ParityReport

    report = ParityReport("f", "merged", "text-generation-with-past", "llama", "cpu", "fp32", "fp64", None, 1e-4, 1e-4, "")
    report.outputs.append(OutputCheck("model.onnx", "case", "folded none", compare("logits", np.zeros((2, 3)), np.zeros((2, 4)), 1e-4, 1e-4)))
    report.write_json(str(tmp_path / "r.json"))
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert not data["passed"] and data["outputs"][0]["max_abs"] is None and "shape" in data["outputs"][0]["note"]


def test_plugin_import_is_cheap():
    """pytest loads the plugin in every run where ia3-export is installed: it must not pull torch,
    transformers or onnxruntime (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, ia3_export.parity.pytest_plugin; "
            "print([m for m in ('torch', 'transformers', 'onnxruntime', 'onnx') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("overrides,field", [({"num_hidden_layers": 3}, "num_hidden_layers"),
                                             ({"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2},
                                              "hidden_size")])
def test_a_model_folder_of_other_sizes_is_named_as_the_wrong_folder(tmp_path, tmp_path_factory, model_dir, adapter_dir,
                                                                    overrides, field):
    """Before: "model.onnx has no input 'past_key_values.2.key'" or ONNX Runtime's dimension error."""
    from ia3_export.examples.tiny import save_tiny

    merged, _ = export_for(tmp_path_factory, model_dir, adapter_dir, "llama", "merged")
    other = save_tiny(str(tmp_path / "other"), "llama", **overrides)
    result = run_cli("parity", other, merged)
    line = assert_one_line_error(result, 2, f"is not the model {merged} was exported from: its {field} is")
    assert "pass the model folder the export was made from" in line
