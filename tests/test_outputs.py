"""Outputs, from the outside (issue 13): no command destroys or writes inside its inputs (symlinks
included, --force or not); of two runs racing for one output exactly one wins and the other says
so; outputs follow the umask; a failed write names the real output and the OS reason, never a
temporary; an internal error or Ctrl-C is one line too (exit 3 / 130), `--debug` shows the traceback.

Each command runs as the installed console script. A `sitecustomize.py` put on the child's
PYTHONPATH (written below; nothing in the package knows about it) adds what a test needs to the
child, from the outside: a file-size limit (RLIMIT_FSIZE: a write past it fails with EFBIG as a
full disk fails with ENOSPC), a barrier on the first temporary each racing run creates (an audit
hook: both runs have passed the up-front check before either commits), or a command whose body
raises (how an unforeseen bug or Ctrl-C arrives).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import EXE, assert_one_line_error, run_cli
from safetensors.numpy import load_file
from test_reliability import tree  # relative path -> sha256 of every file under a folder

SITECUSTOMIZE = r'''
import os, sys, time

if os.environ.get("TEST_FSIZE"):  # every file this process writes is cut at TEST_FSIZE bytes
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["TEST_FSIZE"]), resource.RLIM_INFINITY))

if os.environ.get("TEST_BARRIER"):  # "folder count": wait for count runs at their first temporary
    folder, count = os.environ["TEST_BARRIER"].split()
    state = {"waited": False}

    def barrier(event, args):
        if state["waited"] or event not in ("os.mkdir", "open") or not args or ".tmp-" not in str(args[0]):
            return
        state["waited"] = True
        open(os.path.join(folder, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < int(count) and time.monotonic() < deadline:
            time.sleep(0.01)

    sys.addaudithook(barrier)

if os.environ.get("TEST_RAISE"):  # the `inspect` command's body raises this instead of running
    import signal
    import ia3_export.commands.inspect as target

    def broken(*args, **kwargs):
        if os.environ["TEST_RAISE"] == "SIGINT":  # a real Ctrl-C, delivered by the kernel
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        raise eval(os.environ["TEST_RAISE"])

    target.command.callback = broken
'''

OUT_EXISTS_IN_RACE = "appeared while this run was writing it"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("site")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def llama(model_dir, adapter_dir):
    return {"model": model_dir("llama"), "a1": adapter_dir("llama", seed=1), "a2": adapter_dir("llama", seed=2)}


@pytest.fixture(scope="module")
def swappable(tmp_path_factory, llama):
    from runtime_helpers import export_once

    return export_once(tmp_path_factory, llama["model"], "swappable", [llama["a1"], llama["a2"]])


@pytest.fixture
def work(tmp_path, llama, swappable):
    """Copies of the inputs in tmp_path (the test may try to destroy them), a symlink to the model
    and a data file."""
    paths = {name: str(shutil.copytree(src, tmp_path / name)) for name, src in
             [("model", llama["model"]), ("adapter", llama["a1"]), ("onnx", swappable)]}
    os.symlink(paths["model"], tmp_path / "link")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
    return {**paths, "link": str(tmp_path / "link"), "data": str(tmp_path / "data" / "rows.jsonl"), "root": str(tmp_path)}


def _embedded_data():
    from ia3_export.train.examples import data_file

    return os.path.dirname(data_file("x"))


# case -> (arguments with {placeholders} from `work`, the output, the input the line must name)
OVERLAPS = {
    "train-over-model": (["train", "{model}", "--data", "{data}", "--task", "text-generation", "--out", "{model}",
                          "--force"], "{model}", "{model}"),
    "train-over-a-folder-holding-the-data": (["train", "{model}", "--data", "{data}", "--task", "text-generation",
                                              "--out", "{root}/data", "--force"], "{root}/data", "{data}"),
    "merge-over-adapter": (["merge", "{model}", "{adapter}", "--out", "{adapter}", "--force"], "{adapter}", "{adapter}"),
    "merge-inside-model": (["merge", "{model}", "{adapter}", "--out", "{model}/merged"], "{model}/merged", "{model}"),
    "merge-over-a-folder-holding-the-model": (["merge", "{model}", "{adapter}", "--out", "{root}", "--force"],
                                              "{root}", "{model}"),
    "merge-over-a-link-to-the-model": (["merge", "{model}", "{adapter}", "--out", "{link}", "--force"], "{link}",
                                       "{model}"),
    "export-from-a-link-over-the-model": (["export", "{link}", "--out", "{model}", "--force"], "{model}", "{link}"),
    "export-foldswap-over-adapter": (["export", "{model}", "--mode", "foldswap", "--adapter", "{adapter}", "--out",
                                      "{adapter}", "--force"], "{adapter}", "{adapter}"),
    "convert-inside-the-export": (["convert", "{adapter}", "--model", "{onnx}", "--out", "{onnx}/a.onnx_adapter"],
                                  "{onnx}/a.onnx_adapter", "{onnx}"),
    "parity-json-inside-the-export": (["parity", "{model}", "{onnx}", "--adapter", "{adapter}", "--json",
                                       "{onnx}/manifest.json"], "{onnx}/manifest.json", "{onnx}"),
    "parity-junit-over-a-model-file": (["parity", "{model}", "{onnx}", "--junit", "{model}/config.json"],
                                       "{model}/config.json", "{model}"),
    "demo-inside-its-embedded-data": (["demo", "--workdir", "{embedded}/runs"], "{embedded}/runs", "{embedded}"),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_no_output_is_inside_or_over_an_input(case, work):
    args, out, source = OVERLAPS[case]
    where = {**work, "embedded": _embedded_data()}
    before = {p: tree(p) for p in (work["root"], where["embedded"])}
    out_path = out.format(**where)
    try:
        result = run_cli(*[a.format(**where) for a in args])
    finally:  # a command that wrongly ran may not leave its output in the package's own data
        if out_path.startswith(where["embedded"]) and os.path.exists(out_path):
            shutil.rmtree(out_path)
    line = assert_one_line_error(result, 2, f"output {out_path} ")
    assert f"the input {source.format(**where)};" in line, line
    assert {p: tree(p) for p in before} == before  # nothing destroyed, nothing written


def _barrier_env(site, folder, count=2):
    os.makedirs(folder)
    return {**site, "TEST_BARRIER": f"{folder} {count}"}


def _race(commands, env) -> list[subprocess.CompletedProcess]:
    """Start every command at once; they meet at the barrier before any commits."""
    procs = [subprocess.Popen([EXE, *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}) for c in commands]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def _hidden(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".")]


K_PROJ = "model.layers.0.self_attn.k_proj"


def test_two_merges_racing_for_one_output_one_wins_the_other_says_so(llama, site, tmp_path):
    out = tmp_path / "out" / "merged"
    env = _barrier_env(site, str(tmp_path / "barrier"))
    results = _race([["merge", llama["model"], a, "--out", out] for a in (llama["a1"], llama["a2"])], env)
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [(r.returncode, r.stderr) for r in results]
    winner, loser = sorted(results, key=lambda r: r.returncode)
    assert loser.stderr.strip().splitlines() == [loser.stderr.strip()] and OUT_EXISTS_IN_RACE in loser.stderr
    assert str(out) in loser.stderr and ".tmp-" not in loser.stderr
    # the output is the winner's whole fold: its k_proj rows are the base's scaled by the winner's vector
    adapter = llama["a1"] if llama["a1"] in winner.args else llama["a2"]
    base = load_file(os.path.join(llama["model"], "model.safetensors"))[f"{K_PROJ}.weight"].astype(np.float64)
    vector = load_file(os.path.join(adapter, "adapter_model.safetensors"))[f"base_model.model.{K_PROJ}.ia3_l"]
    merged = load_file(os.path.join(out, "model.safetensors"))[f"{K_PROJ}.weight"]
    np.testing.assert_allclose(merged, base * vector.astype(np.float64), rtol=1e-6, atol=1e-7)
    assert _hidden(out.parent) == []  # no temporary left behind


def test_two_converts_racing_for_one_file(llama, swappable, site, tmp_path):
    from ia3_export.onnx_adapter import read_onnx_adapter

    out = tmp_path / "a.onnx_adapter"
    env = _barrier_env(site, str(tmp_path / "barrier"))
    results = _race([["convert", a, "--model", swappable, "--out", out] for a in (llama["a1"], llama["a2"])], env)
    assert sorted(r.returncode for r in results) == [0, 2], [(r.returncode, r.stderr) for r in results]
    winner, loser = sorted(results, key=lambda r: r.returncode)
    assert OUT_EXISTS_IN_RACE in loser.stderr and f"output {out} " in loser.stderr
    adapter = llama["a1"] if llama["a1"] in winner.args else llama["a2"]
    stored = read_onnx_adapter(str(out))[f"{K_PROJ}.ia3_l"]
    expected = load_file(os.path.join(adapter, "adapter_model.safetensors"))[f"base_model.model.{K_PROJ}.ia3_l"]
    np.testing.assert_array_equal(stored.reshape(-1), expected.reshape(-1))
    assert _hidden(tmp_path) == []


def test_two_forced_merges_racing_both_finish_and_leave_one_whole_output(llama, site, tmp_path):
    out = tmp_path / "merged"
    env = _barrier_env(site, str(tmp_path / "barrier"))
    results = _race([["merge", llama["model"], a, "--out", out, "--force"] for a in (llama["a1"], llama["a2"])], env)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    vector = {a: load_file(os.path.join(llama[a], "adapter_model.safetensors"))[f"base_model.model.{K_PROJ}.ia3_l"]
              for a in ("a1", "a2")}
    base = load_file(os.path.join(llama["model"], "model.safetensors"))[f"{K_PROJ}.weight"].astype(np.float64)
    merged = load_file(os.path.join(out, "model.safetensors"))[f"{K_PROJ}.weight"]
    assert any(np.allclose(merged, base * v, rtol=1e-6, atol=1e-7) for v in vector.values())
    assert sorted(os.listdir(out)) == sorted(os.listdir(llama["model"]))  # one output, not two mixed
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("portable", [False, True], ids=["renameat2", "portable-fallback"])
@pytest.mark.parametrize("folder", [True, False], ids=["folder", "file"])
def test_an_output_that_appears_meanwhile_is_kept(tmp_path, monkeypatch, portable, folder):
    """In one process, both ways the final rename refuses a target that exists by now."""
    from ia3_export import atomic
    from ia3_export.errors import IA3Error

    if portable:
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    elif atomic._renameat2() is None:
        pytest.skip("no renameat2 here")
    writer = atomic.atomic_output_dir if folder else atomic.atomic_output_file
    out = tmp_path / "out"

    def fill(tmp, text):
        with open(os.path.join(tmp, "f") if folder else tmp, "w") as f:
            f.write(text)

    with pytest.raises(IA3Error, match=OUT_EXISTS_IN_RACE):
        with writer(str(out)) as first:
            fill(first, "first")
            with writer(str(out)) as second:
                fill(second, "second")
    assert (out / "f" if folder else out).read_text() == "second"
    assert os.listdir(tmp_path) == ["out"]
    with writer(str(out), force=True) as third:  # --force still replaces it
        fill(third, "third")
    assert (out / "f" if folder else out).read_text() == "third"
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_outputs_follow_the_umask(llama, swappable, tmp_path, umask):
    old = os.umask(umask)
    try:
        merged = run_cli("merge", llama["model"], llama["a1"], "--out", tmp_path / "merged")
        converted = run_cli("convert", llama["a1"], "--model", swappable, "--out", tmp_path / "a.onnx_adapter")
    finally:
        os.umask(old)
    assert merged.exit_code == 0 and converted.exit_code == 0, merged.output + converted.output
    modes = {}  # relative path -> (its mode, the mode the umask gives)
    for folder, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            modes[os.path.relpath(full, tmp_path)] = (oct(os.stat(full).st_mode & 0o777),
                                                      oct((0o777 if name in dirs else 0o666) & ~umask))
    assert len(modes) > 3 and all(got == want for got, want in modes.values()), modes


FSIZE = 1024  # bytes: every output below holds a bigger file, every input was written before
WRITES = {  # case -> arguments ({placeholders} from `work`), the output
    "merge": (["merge", "{model}", "{adapter}", "--out", "{root}/merged"], "{root}/merged"),
    "merge-into-new-folders": (["merge", "{model}", "{adapter}", "--out", "{root}/new/folders/merged"],
                               "{root}/new/folders/merged"),  # the folders made for it go too
    "export": (["export", "{model}", "--mode", "merged", "--adapter", "{adapter}", "--out", "{root}/onnx2"],
               "{root}/onnx2"),
    "convert": (["convert", "{adapter}", "--model", "{onnx}", "--out", "{root}/a.onnx_adapter"], "{root}/a.onnx_adapter"),
    "train": (["train", "{model}", "--data", "{data}", "--task", "text-generation", "--out", "{root}/trained",
               "--max-steps", "1", "--quiet"], "{root}/trained"),
    "train-checkpoint": (["train", "{model}", "--data", "{data}", "--task", "text-generation", "--out",
                          "{root}/trained", "--max-steps", "2", "--save-steps", "1", "--quiet"],
                         "{root}/trained.checkpoints/step-00000001"),
}


@pytest.mark.parametrize("case", list(WRITES))
def test_a_full_disk_names_the_output_and_the_reason(case, work, site):
    args, out = WRITES[case]
    before = tree(work["root"])
    result = run_cli(*[a.format(**work) for a in args], env={**site, "TEST_FSIZE": str(FSIZE)})
    line = assert_one_line_error(result, 2, f"cannot write {out.format(**work)}")
    assert "File too large" in line and ".tmp-" not in line, line
    assert tree(work["root"]) == before


INTERNAL = "rerun with --debug (or IA3_EXPORT_DEBUG=1) for the traceback, and please report it"


@pytest.mark.parametrize("how", ["plain", "--debug", "IA3_EXPORT_DEBUG"])
def test_an_internal_error_is_one_line_and_exit_3(site, how):
    env = {**site, "TEST_RAISE": "KeyError('x')"} | ({"IA3_EXPORT_DEBUG": "1"} if how == "IA3_EXPORT_DEBUG" else {})
    result = run_cli(*(["--debug"] if how == "--debug" else []), "inspect", "anything", env=env)
    assert result.exit_code == 3, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: internal error (KeyError: 'x'); {INTERNAL}", result.stderr
    if how == "plain":
        assert result.stderr.strip() == last  # no traceback
    else:
        assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'x'" in result.stderr


def test_an_os_error_without_a_path_says_what_happened(site):
    result = run_cli("inspect", "anything", env={**site, "TEST_RAISE": "OSError(28, 'No space left on device')"})
    line = assert_one_line_error(result, 2, "error: No space left on device; check the path")
    assert "error: :" not in line


def test_ctrl_c_is_one_line_and_exit_130(site):
    result = run_cli("inspect", "anything", env={**site, "TEST_RAISE": "SIGINT"})
    assert_one_line_error(result, 130, "interrupted")
    assert "Traceback" not in result.stderr
