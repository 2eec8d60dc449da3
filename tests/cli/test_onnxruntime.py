"""ONNX Runtime as the package starts it (ia3_export/ort.py): no telemetry written or sent, and its
own log kept off stderr unless --debug. Each test runs the installed console script, as a user does,
and checks its control case (opted in, or --debug) shows what the default must not."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from runtime_helpers import export_once


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dir):
    return export_once(tmp_path_factory, model_dir("llama"), "merged", [])


def _files_written(folder: str, tmp_path, env: dict) -> list[str]:
    """What a `generate` run leaves in its home, XDG and temporary folders (all empty before)."""
    dirs = {name: tmp_path / name.lower() for name in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
                                                       "XDG_STATE_HOME", "TMPDIR")}
    for d in dirs.values():
        d.mkdir()
    env = {**{k: str(v) for k, v in dirs.items()}, "ORT_DISABLE_TELEMETRY": "", **env}
    result = run_cli("generate", folder, "--prompt", "hi", "--max-new-tokens", "2", env=env)
    assert result.exit_code == 0, result.output
    return sorted(os.path.relpath(os.path.join(root, f), tmp_path) for d in dirs.values() for root, _, files in os.walk(d)
                  for f in files)


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "IA3_EXPORT_TELEMETRY=1"])
def test_no_telemetry_files_unless_opted_in(exported, tmp_path, opt_in):
    written = _files_written(exported, tmp_path, {"IA3_EXPORT_TELEMETRY": "1"} if opt_in else {})
    if not opt_in:
        assert written == []
    elif not any(f.endswith("onnxruntime.db") for f in written):
        pytest.skip(f"this onnxruntime build keeps no telemetry queue (wrote {written})")


def _failing_graph(folder: str, out) -> str:
    """A copy of the export whose logits end in a Reshape that fails at run time (ORT logs it, then raises)."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    copy = shutil.copytree(folder, out)
    model = onnx.load(os.path.join(copy, "model.onnx"))
    logits = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [o + "_raw" if o == logits else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([7, -1, 5], np.int64), "impossible_shape"))
    model.graph.node.append(helper.make_node("Reshape", [logits + "_raw", "impossible_shape"], [logits]))
    onnx.save(model, os.path.join(copy, "model.onnx"))
    return str(copy)


def test_onnxruntime_log_stays_off_stderr_unless_debug(exported, tmp_path):
    broken = _failing_graph(exported, tmp_path / "broken")
    args = ["generate", broken, "--prompt", "hi", "--max-new-tokens", "2"]
    assert_one_line_error(run_cli(*args), 2, "ONNX Runtime failed to run the model")
    debug = run_cli("--debug", *args)
    assert debug.exit_code == 2 and "[E:onnxruntime" in debug.stderr, debug.stderr


def test_a_provider_onnxruntime_could_not_start_is_refused_not_run_on_the_cpu(exported):
    """With its log quiet, ORT's fallback to the CPU (CUDA libraries missing, or a CPU-only build) would
    be silent: the session says which providers it got, and a missing one is an error."""
    import warnings

    from ia3_export.errors import IA3Error
    from ia3_export.ort import onnxruntime
    from ia3_export.runtime.session import Graph

    if "CUDAExecutionProvider" in onnxruntime().get_available_providers():
        pytest.skip("this onnxruntime starts CUDA")
    with warnings.catch_warnings(), pytest.raises(IA3Error, match="could not start CUDAExecutionProvider and fell back "
                                                                  "to CPUExecutionProvider; rerun with --debug"):
        warnings.simplefilter("ignore")  # ORT's own UserWarning about the provider list
        Graph(os.path.join(exported, "model.onnx"), "cuda")


def test_a_session_whose_threads_sleep_between_runs_gives_the_same_tokens(exported):
    """The server opens its session with spin=False (ONNX Runtime's idle threads sleep, leaving the cores to
    Triton and pytriton): that option reaches ONNX Runtime and changes nothing but scheduling."""
    from ia3_export.ort import session_options
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids

    quiet = session_options(spin=False)
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    options = GenerationOptions(max_new_tokens=12)
    prompts = [[5, 6, 7, 8], [9, 10]]
    default, sleeping = IA3Session(exported), IA3Session(exported, session_options=quiet)
    assert generate_ids(sleeping, prompts, [None, None], options) == generate_ids(default, prompts, [None, None], options)
