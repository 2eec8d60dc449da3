"""kill -9 in the middle of `export`, `merge`, `convert` and a training save leaves the complete old
output, no output, or the complete new output, never a partial one; training resumes from the last
complete checkpoint.

Each case runs the real command in a child process that SIGKILLs itself just before its k-th file
operation under the output's folder (an audit hook sees every open-for-writing, mkdir, rename,
remove, copy and rmtree Python does). A first, uninterrupted run lists those operations, and the
kill points are chosen from them: the middle, the renames that commit (old output aside, new one
in place) and the last operation. Children fork from a server that has already imported torch and
transformers, so a case costs the command's work, not the imports.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal

import numpy as np
import pytest

WRITE_EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile",
                "tempfile.mkdtemp", "tempfile.mkstemp", "os.truncate"}


def _writes(event: str, args: tuple, root: str) -> bool:
    if event not in WRITE_EVENTS or not args:
        return False
    if event == "open":
        mode, flags = (args + (None, None))[1:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing:
            return False
    paths = [a for a in args[:2] if isinstance(a, str)]
    return any(os.path.abspath(p).startswith(root) for p in paths)


def _child(argv: list[str], root: str, kill_at: int | None, log: str) -> None:
    """Run the command; SIGKILL this process just before write operation number `kill_at` under
    `root`. Without kill_at, write the list of operations to `log`."""
    import sys

    seen: list[list[str]] = []  # [event, the last path it touches, relative to root]

    def hook(event, args):
        if _writes(event, args, root):
            seen.append([event, os.path.relpath([a for a in args[:2] if isinstance(a, str)][-1], root)])
            if len(seen) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from ia3_export.cli import main

    try:
        main(argv, standalone_mode=False)
    finally:
        if kill_at is None:
            events = list(seen)  # before the log's own open is seen
            with open(log, "w") as f:
                json.dump(events, f)


# Imported once by the fork server (a module that is missing is skipped): lazy imports inside
# transformers and the commands would otherwise cost each child seconds.
PRELOAD = ["torch", "torch.onnx", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.bert.modeling_bert", "transformers.models.bert.tokenization_bert",
           "transformers.models.auto.tokenization_auto", "tokenizers", "safetensors.torch", "onnx", "onnxruntime",
           "matplotlib.pyplot", "ia3_export.cli", "ia3_export.core.model", "ia3_export.core.loading", "ia3_export.core.merge",
           "ia3_export.export.pipeline", "ia3_export.train.loop", "ia3_export.runtime.session",
           *(f"ia3_export.cli.options.{c}" for c in ("export", "convert", "merge", "train"))]


@pytest.fixture(scope="module")
def fork():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    def run(argv, root, kill_at=None, log=os.devnull) -> int:
        p = ctx.Process(target=_child, args=(argv, root, kill_at, log))
        p.start()
        p.join(600)
        return p.exitcode

    return run


def snapshot(path: str) -> dict[str, bytes] | None:
    """relative file -> bytes of everything under path (None when there is no output)."""
    if not os.path.exists(path):
        return None
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def kill_points(events: list[list[str]], out: str) -> list[int]:
    """1-based operation numbers: the middle, the commit points (renames of the old output aside and
    of the new one into place) and the last one."""
    name = os.path.basename(out)
    commits = {i for i, (e, path) in enumerate(events, start=1)
               if e == "os.rename" and (path == name or path.startswith(f".{name}.old-"))}
    return sorted({len(events) // 2, len(events)} | commits)


def check_interrupted(fork, argv, out, tmp_path, same_as_new):
    """Run argv (which writes `out`, with --force over an old output) to the end once, then kill it
    at each chosen point: what is left must be the old output, nothing, or the complete new one."""
    root = os.path.dirname(os.path.abspath(out))
    log = str(tmp_path / "events.json")
    make_old(out)
    assert fork(argv, root, None, log) == 0
    new = snapshot(out)
    events = json.load(open(log))
    points = kill_points(events, out)
    assert any(e == "os.rename" and path == os.path.basename(out) for e, path in events)  # committed by a rename
    outcomes = set()
    for k in points:
        shutil.rmtree(out, ignore_errors=True) if os.path.isdir(out) else None
        if os.path.isfile(out):
            os.remove(out)
        old = make_old(out)
        assert fork(argv, root, k) == -signal.SIGKILL, f"not killed at operation {k} ({events[k - 1]})"
        left = snapshot(out)
        if left == old:
            outcomes.add("old")
        elif left is None:
            outcomes.add("none")
        else:
            assert same_as_new(left, new), f"partial output after a kill at operation {k} ({events[k - 1]}): {sorted(left)}"
            outcomes.add("new")
    if out.endswith(".onnx_adapter"):  # one atomic rename: the old file or the new one, never none
        assert "old" in outcomes and outcomes <= {"old", "new"}, outcomes
    else:  # two renames (old aside, new in place): the points reach every state
        assert outcomes == {"old", "none", "new"}, outcomes


def make_old(out: str) -> dict:
    """A previous output the interrupted --force run must not half-destroy (one it wrote: --force
    replaces no other folder)."""
    from ia3_export.formats.atomic import atomic_output_dir

    if out.endswith(".onnx_adapter"):
        with open(out, "wb") as f:
            f.write(b"old adapter")
    else:
        with atomic_output_dir(out) as tmp, open(os.path.join(tmp, "old.txt"), "w") as f:
            f.write("the previous output")
    return snapshot(out)


def same_files(volatile=()):
    """Complete = the same files as the uninterrupted run, byte for byte (except files that hold times)."""
    def check(left, new):
        return left.keys() == new.keys() and all(left[k] == new[k] for k in new if os.path.basename(k) not in volatile)
    return check


@pytest.fixture(scope="module")
def llama(model_dir, adapter_dir):
    return model_dir("llama"), adapter_dir("llama", seed=1)


def test_kill_merge(fork, llama, tmp_path):
    base, adapter = llama
    out = str(tmp_path / "merged")
    check_interrupted(fork, ["merge", base, adapter, "--out", out, "--force"], out, tmp_path, same_files())


def test_kill_export(fork, llama, tmp_path):
    base, adapter = llama
    out = str(tmp_path / "onnx")
    argv = ["export", base, "--out", out, "--mode", "swappable", "--adapter", adapter, "--force"]
    check_interrupted(fork, argv, out, tmp_path, same_files(volatile=("ia3_export.json",)))


def test_kill_convert(fork, llama, tmp_path_factory, tmp_path):
    from runtime_helpers import export_once

    base, adapter = llama
    folder = export_once(tmp_path_factory, base, "swappable", [adapter])
    out = str(tmp_path / "a.onnx_adapter")
    check_interrupted(fork, ["convert", adapter, "--model", folder, "--out", out, "--force"], out, tmp_path,
                      lambda left, new: left == new)


TRAIN_ROWS = "".join(json.dumps({"text": f"{w} {a}", "label": "pos" if w == "good" else "neg"}) + "\n"
                     for a in ["cat", "dog", "cow", "owl"] for w in ("good", "bad"))


def train_argv(model, data, out, *extra):
    return ["train", model, "--data", data, "--task", "text-classification", "--out", out, "--max-steps", "4",
            "--batch-size", "4", "--lr", "0.05", "--seed", "3", "--quiet", *extra]


def test_kill_training_save(fork, model_dir, tmp_path):
    model = model_dir("bert", "feature-extraction")
    data = tmp_path / "d.jsonl"
    data.write_text(TRAIN_ROWS)
    out = str(tmp_path / "adapter")
    check_interrupted(fork, train_argv(model, str(data), out, "--force"), out, tmp_path,
                      same_files(volatile=("train_args.json", "train_log.jsonl", "loss_curve.png")))


def test_kill_during_a_checkpoint_resumes_from_the_last_complete_one(fork, model_dir, tmp_path):
    """Killed while writing the step-3 checkpoint: --resume continues from step 2 and ends with the
    adapter an uninterrupted run writes."""
    from ia3_export.formats.safetensors_io import read_safetensors

    model = model_dir("bert", "feature-extraction")
    data = tmp_path / "d.jsonl"
    data.write_text(TRAIN_ROWS)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    checkpoints = cut + ".checkpoints"
    log = str(tmp_path / "events.json")
    assert fork(train_argv(model, str(data), whole, "--save-steps", "1"), whole + ".checkpoints", None, log) == 0
    events = json.load(open(log))
    commits = [i for i, (e, name) in enumerate(events, start=1) if e == "os.rename" and name == "step-00000003"]
    assert len(commits) == 1
    kill_at = commits[0]  # the hook runs before the rename: the step-3 checkpoint is written, not committed
    assert fork(train_argv(model, str(data), cut, "--save-steps", "1"), checkpoints, kill_at) == -signal.SIGKILL
    assert not os.path.exists(cut)
    assert [d for d in sorted(os.listdir(checkpoints)) if not d.startswith(".")] == ["step-00000001", "step-00000002"]
    assert fork(train_argv(model, str(data), cut, "--save-steps", "1", "--resume"), checkpoints) == 0
    a = read_safetensors(os.path.join(whole, "adapter_model.safetensors"))
    b = read_safetensors(os.path.join(cut, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(v - 1).max() > 1e-3 for k, v in a.items() if k.endswith("ia3_l"))
