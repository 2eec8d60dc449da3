"""Outputs, from the outside (issue 13): no command destroys or writes inside its inputs (symlinks
included, --force or not); of two runs racing for one output exactly one wins and the other says
so; outputs follow the umask; a failed write names the real output and the OS reason, never a
temporary; an internal error or Ctrl-C is one line too (exit 3 / 130), `--debug` shows the traceback.

Each command runs as the installed console script; run_cli's `preload` (a sitecustomize in the
child; the package has no test hooks) adds from the outside what a test needs: a file-size limit
(RLIMIT_FSIZE: a write past it fails with EFBIG as a full disk fails with ENOSPC), a barrier at the
first temporary each racing run creates (an audit hook: both runs have passed the up-front check
before either commits), or a command whose body raises (how an unforeseen bug or Ctrl-C arrives).
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from output_targets import HOSTILE, hostile
from safetensors.numpy import load_file
from test_reliability import tree  # relative path -> sha256 of every file under a folder

OUT_EXISTS_IN_RACE = "appeared while this run was writing it"
K_PROJ = "model.layers.0.self_attn.k_proj"

BARRIER = """
import os, sys, time

def barrier(event, args, state={{"waited": False}}):
    if state["waited"] or event not in ("os.mkdir", "open") or not args or ".tmp-" not in str(args[0]):
        return
    state["waited"] = True
    open(os.path.join({folder!r}, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir({folder!r})) < {count} and time.monotonic() < deadline:
        time.sleep(0.01)

sys.addaudithook(barrier)
"""

FSIZE = 1024  # bytes: every output below holds a bigger file, every input was written before
FILE_SIZE_LIMIT = f"import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE}, resource.RLIM_INFINITY))\n"

BROKEN_INSPECT = """
import os, signal, time
import ia3_export.cli.inspect as target

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started in the background

def broken(*args, **kwargs):
    if {error!r} == "SIGINT":  # a real Ctrl-C, delivered by the kernel
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    raise {error}

target.command.callback = broken
"""


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
    from ia3_export.examples.shipped import data_file

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


# Cases the target rules (formats/atomic.check_target) refuse as the command line is parsed, before the
# inputs are known: a link is never an output, nor a folder holding files we did not write.
TARGET_REFUSED = {"merge-over-a-link-to-the-model": "is a symbolic link",
                  "merge-over-a-folder-holding-the-model": "which ia3-export did not write",
                  "train-over-a-folder-holding-the-data": "holds rows.jsonl, which ia3-export did not write"}


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
    assert TARGET_REFUSED.get(case, f"the input {source.format(**where)};") in line, line
    assert {p: tree(p) for p in before} == before  # nothing destroyed, nothing written


def _race(commands, barrier_folder) -> list:
    """Run every command at once; they meet at the barrier before any of them commits."""
    os.makedirs(barrier_folder)
    preload = BARRIER.format(folder=str(barrier_folder), count=len(commands))
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda c: run_cli(*c, preload=preload), commands))


def _hidden(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".")]



def _fold(model: str, adapter: str) -> np.ndarray:
    """k_proj's weight with the adapter folded in, in float64 numpy: rows scaled by the vector."""
    base = load_file(os.path.join(model, "model.safetensors"))[f"{K_PROJ}.weight"].astype(np.float64)
    return base * load_file(os.path.join(adapter, "adapter_model.safetensors"))[f"base_model.model.{K_PROJ}.ia3_l"]


def test_two_merges_racing_for_one_output_one_wins_the_other_says_so(llama, tmp_path):
    out = tmp_path / "out" / "merged"
    adapters = [llama["a1"], llama["a2"]]
    results = _race([["merge", llama["model"], a, "--out", out] for a in adapters], tmp_path / "barrier")
    assert sorted(r.exit_code for r in results) == [0, 2], [r.output for r in results]
    winner = adapters[[r.exit_code for r in results].index(0)]
    loser = next(r for r in results if r.exit_code == 2)
    line = assert_one_line_error(loser, 2, OUT_EXISTS_IN_RACE)
    assert f"output {out} " in line and ".tmp-" not in line, line
    merged = load_file(os.path.join(out, "model.safetensors"))[f"{K_PROJ}.weight"]  # the winner's, whole
    np.testing.assert_allclose(merged, _fold(llama["model"], winner), rtol=1e-6, atol=1e-7)
    assert _hidden(out.parent) == []  # no temporary left behind


def test_two_converts_racing_for_one_file(llama, swappable, tmp_path):
    from ia3_export.formats.onnx_adapter import read_onnx_adapter

    out = tmp_path / "a.onnx_adapter"
    adapters = [llama["a1"], llama["a2"]]
    results = _race([["convert", a, "--model", swappable, "--out", out] for a in adapters], tmp_path / "barrier")
    assert sorted(r.exit_code for r in results) == [0, 2], [r.output for r in results]
    winner = adapters[[r.exit_code for r in results].index(0)]
    line = assert_one_line_error(next(r for r in results if r.exit_code == 2), 2, OUT_EXISTS_IN_RACE)
    assert f"output {out} " in line, line
    stored = read_onnx_adapter(str(out))[f"{K_PROJ}.ia3_l"]
    expected = load_file(os.path.join(winner, "adapter_model.safetensors"))[f"base_model.model.{K_PROJ}.ia3_l"]
    np.testing.assert_array_equal(stored.reshape(-1), expected.reshape(-1))
    assert _hidden(tmp_path) == []


def test_two_forced_merges_racing_both_finish_and_leave_one_whole_output(llama, tmp_path):
    out = tmp_path / "merged"
    adapters = [llama["a1"], llama["a2"]]
    results = _race([["merge", llama["model"], a, "--out", out, "--force"] for a in adapters], tmp_path / "barrier")
    assert [r.exit_code for r in results] == [0, 0], [r.output for r in results]
    merged = load_file(os.path.join(out, "model.safetensors"))[f"{K_PROJ}.weight"]
    assert any(np.allclose(merged, _fold(llama["model"], a), rtol=1e-6, atol=1e-7) for a in adapters)
    assert sorted(os.listdir(out)) == sorted(os.listdir(llama["model"]))  # one output, not two mixed
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("portable", [False, True], ids=["renameat2", "portable-fallback"])
@pytest.mark.parametrize("folder", [True, False], ids=["folder", "file"])
def test_an_output_that_appears_meanwhile_is_kept(tmp_path, monkeypatch, portable, folder):
    """In one process, both ways the final rename refuses a target that exists by now."""
    from ia3_export.formats import atomic
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
def test_a_full_disk_names_the_output_and_the_reason(case, work):
    args, out = WRITES[case]
    before = tree(work["root"])
    result = run_cli(*[a.format(**work) for a in args], preload=FILE_SIZE_LIMIT)
    line = assert_one_line_error(result, 2, f"cannot write {out.format(**work)}")
    assert "File too large" in line and ".tmp-" not in line, line
    assert tree(work["root"]) == before


INTERNAL = "rerun with --debug (or IA3_EXPORT_DEBUG=1) for the traceback, and please report it"


@pytest.mark.parametrize("how", ["plain", "--debug", "IA3_EXPORT_DEBUG"])
def test_an_internal_error_is_one_line_and_exit_3(how):
    result = run_cli(*(["--debug"] if how == "--debug" else []), "inspect", "anything",
                     env={"IA3_EXPORT_DEBUG": "1"} if how == "IA3_EXPORT_DEBUG" else {},
                     preload=BROKEN_INSPECT.format(error="KeyError('x')"))
    assert result.exit_code == 3, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: internal error (KeyError: 'x'); {INTERNAL}", result.stderr
    if how == "plain":
        assert result.stderr.strip() == last  # no traceback
    else:
        assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'x'" in result.stderr


def test_an_os_error_without_a_path_says_what_happened():
    result = run_cli("inspect", "anything", preload=BROKEN_INSPECT.format(error="OSError(28, 'No space left on device')"))
    line = assert_one_line_error(result, 2, "error: No space left on device; check the path")
    assert "error: :" not in line


def test_ctrl_c_is_one_line_and_exit_130():
    result = run_cli("inspect", "anything", preload=BROKEN_INSPECT.format(error="SIGINT"))
    assert_one_line_error(result, 130, "interrupted")
    assert "Traceback" not in result.stderr


def output_parameters():
    """(command, parameter) for every output of every command: the parameters typed `OutputPath`.
    Declaring a new output with that type puts it in this walk; nothing here names the commands."""
    from ia3_export.cli import COMMANDS, _load
    from ia3_export.cli.options import OutputPath

    return [(name, p) for name, (module, _) in COMMANDS.items() for p in _load(module).params
            if isinstance(p.type, OutputPath)]


def _argv(name: str, output, target: str, placeholder: str) -> list[str]:
    """A command line for `name` with `target` as the output (first, so it is parsed first), a
    placeholder for every other required value and --force where the command has it: the output
    check must refuse before anything else is looked at."""
    import click

    from ia3_export.cli import COMMANDS, _load

    command = _load(COMMANDS[name][0])
    head = [target] if isinstance(output, click.Argument) else [output.opts[0], target]
    rest = []
    for p in command.params:
        if p is output or not p.required:
            continue
        value = p.type.choices[0] if isinstance(p.type, click.Choice) else placeholder
        rest += [value] if isinstance(p, click.Argument) else [p.opts[0], value]
    force = ["--force"] if any(p.name == "force" for p in command.params) else []
    return [name, *head, *force, *rest]


def test_the_output_walk_sees_every_output():
    """A floor for the walk below (it must not pass by finding nothing)."""
    found = {(name, p.name) for name, p in output_parameters()}
    assert {("export", "out_dir"), ("merge", "out_dir"), ("train", "out_dir"), ("convert", "out"),
            ("parity", "json_path"), ("parity", "junit_path"), ("demo", "workdir")} <= found


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("name,output", output_parameters(), ids=lambda v: getattr(v, "name", v))
def test_every_output_option_refuses_hostile_targets(name, output, case, tmp_path):
    """Issue 22: `parity --json /dev/null` replaced the machine's /dev/null as root, `--json link`
    replaced the link, `merge --out . --force` deleted a user's files. One line naming what the
    target is, exit 2, and the target as it was, --force or not."""
    target, message, untouched = hostile(tmp_path, case)
    if case == "folder-not-ours" and output.type.kind == "workdir":
        return  # a workdir is written into, beside the user's files (test_writers.py: test_a_workdir_...)
    if case == "folder-not-ours" and output.type.kind == "file":
        message = "is a folder; this output is a file"
    result = run_cli(*_argv(name, output, target, str(tmp_path / "missing")))
    assert_one_line_error(result, 2, f"output {target} {message}")
    assert untouched()
