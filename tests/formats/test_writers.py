"""The one writer (formats/atomic.py, issue 22), tested by guard:

- a STATIC walk of the package: no module but atomic.py deletes, renames or opens a file for
  writing, and library writers (save_pretrained, onnx.save_model, torch.save, ...) run inside an
  output block; the exceptions are listed in `ALLOWED`, each with its reason, and an entry that no
  longer matches anything fails too (the list cannot go stale);
- the target rules for every output the API writes (`atomic_output_dir` / `atomic_output_file`,
  which every writer uses by the walk above): links, devices, FIFOs and sockets refused by name and
  left as they were; `--force` replaces a folder only if everything in it was written by us;
- non-finite values are refused where tensors are written, and JSON is strict.
The same target rules are walked over every output option of every command in
tests/cli/test_outputs.py (`test_every_output_option_refuses_hostile_targets`).
"""
from __future__ import annotations

import ast
import json
import os
import stat

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli, strict_json
from output_targets import HOSTILE, hostile

import ia3_export
from ia3_export.errors import IA3Error
from ia3_export.formats import atomic
from ia3_export.formats.atomic import MARKER, atomic_output_dir, atomic_output_file, check_finite, open_for_writing
from ia3_export.formats.jsonfile import dumps

PACKAGE = os.path.dirname(os.path.abspath(ia3_export.__file__))

# -- the static walk ------------------------------------------------------------------------------
REMOVERS = {("shutil", "rmtree"), ("shutil", "move"), ("os", "remove"), ("os", "unlink"), ("os", "replace"),
            ("os", "rename"), ("os", "renames"), ("os", "rmdir"), ("os", "removedirs")}
# Library calls that write files: inside an output block (lexically), or allowed below.
LIBRARY_WRITERS = {"save_pretrained", "save_file", "save_model", "save", "export_adapter", "savefig", "to_json_file",
                   "write_text", "write_bytes", "copy2", "copyfile", "copytree"}
OUTPUT_BLOCKS = {"atomic_output_dir", "atomic_output_file"}

# (module, function) -> why that write is not a hole in the one writer.
INSIDE = "writes inside the temporary folder of the output block its caller opened"
ALLOWED = {
    ("export/fused.py", "make"): f"the model builder's input and scratch files: {INSIDE} (export_model)",
    ("export/fused.py", "genai_files"): f"drops the builder's genai_config.json when genai cannot serve the mode: {INSIDE}",
    ("export/graph.py", "save"): f"onnx.save_model, the graph writer every export step calls: {INSIDE}",
    ("export/pipeline.py", "_trace"): f"a traced graph and its scratch folder: {INSIDE} (export_model)",
    ("export/pipeline.py", "write_side_files"): f"generation_config.json: {INSIDE} (export_model)",
    ("export/pipeline.py", "write_runtime_tokenizer"): f"tokenizer.json: {INSIDE} (export_model)",
    ("export/quantize.py", "quantize_graph"): f"the quantized graph: {INSIDE} (export_model)",
    ("export/quantize.py", "_quantize"): "onnxruntime's quantize_dynamic reads files: a TemporaryDirectory of its own",
    ("export/modes/foldswap.py", "fold_from"): f"fold.onnx: {INSIDE} (export_model)",
    ("examples/shipped.py", "_pretrain_base"): f"the toy base model: {INSIDE} (tiny_causal_lm)",
    ("train/report.py", "plot_loss"): f"loss_curve.png: {INSIDE} (train's final write)",
    ("core/loading.py", "copy_side_files"): f"tokenizer and generation files: {INSIDE} (merge, export)",
    ("serve/stub.py", "_rewrite"): "pytriton's stub files in Triton's model repository (pytriton's workspace, which the "
                                   "server made and removes; never a user's file)",
    ("serve/process.py", "__init__"): "the log of a server started for tests and benchmarks, at a path its caller "
                                      "chose (not a command's output; serve/ is owned by the serving work)",
}


def _call_name(func) -> tuple[str | None, str | None]:
    if isinstance(func, ast.Attribute):
        return (func.value.id if isinstance(func.value, ast.Name) else None), func.attr
    if isinstance(func, ast.Name):
        return None, func.id
    return None, None


def _opens_for_writing(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def writes(source: str) -> list[tuple[str, str]]:
    """(function, what) for every delete, rename, open for writing or library write outside an
    output block in a module's source."""
    found = []

    def visit(node, function, in_block):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function, in_block = node.name, False
        if isinstance(node, (ast.With, ast.AsyncWith)) and any(
                isinstance(i.context_expr, ast.Call) and _call_name(i.context_expr.func)[1] in OUTPUT_BLOCKS
                for i in node.items):
            for item in node.items:
                visit(item.context_expr, function, in_block)
            for statement in node.body:
                visit(statement, function, True)
            return
        if isinstance(node, ast.Call):
            base, name = _call_name(node.func)
            if (base, name) in REMOVERS:
                found.append((function, f"{base}.{name}"))
            elif name == "open" and base in (None, "io", "os") and _opens_for_writing(node):
                found.append((function, "open for writing"))
            elif name in LIBRARY_WRITERS and not in_block:
                found.append((function, name))
        for child in ast.iter_child_nodes(node):
            visit(child, function, in_block)

    visit(ast.parse(source), "<module>", False)
    return found


def test_the_walk_finds_what_it_guards():
    """The walk itself: each kind of write is found, an output block exempts library writers only."""
    source = '''
import os, shutil
def f(p):
    shutil.rmtree(p)
    os.replace(p, p)
    open(p, "w")
    open(p, mode="ab")
    open(p)
    model.save_pretrained(p)
    with atomic_output_dir(p) as tmp:
        model.save_pretrained(tmp)
        open(tmp, "w")
'''
    assert writes(source) == [("f", "shutil.rmtree"), ("f", "os.replace"), ("f", "open for writing"),
                              ("f", "open for writing"), ("f", "save_pretrained"), ("f", "open for writing")]


def test_nothing_writes_beside_the_one_writer():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            path = os.path.join(folder, name)
            module = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
            if name.endswith(".py") and module != "formats/atomic.py":
                with open(path, encoding="utf-8") as f:
                    for function, what in writes(f.read()):
                        found.setdefault((module, function), []).append(what)
    holes = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not holes, ("write through formats/atomic.py (atomic_output_dir/file, open_for_writing, remove_output), "
                       f"or add an entry with its reason to ALLOWED: {holes}")
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"ALLOWED entries that no longer write anything (remove them): {stale}"


# -- target rules, for both kinds of API output -------------------------------------------------


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("folder", [True, False], ids=["folder", "file"])
def test_api_outputs_refuse_hostile_targets_even_with_force(tmp_path, case, folder):
    path, message, untouched = hostile(tmp_path, case)
    if case == "folder-not-ours" and not folder:
        message = "is a folder; this output is a file"
    writer = atomic_output_dir if folder else atomic_output_file
    with pytest.raises(IA3Error, match=f"^output {path} {message}"):
        with writer(path, force=True) as tmp:
            with open_for_writing(os.path.join(tmp, "f") if folder else tmp) as f:
                f.write("new")
    assert untouched()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n] == []


def test_a_hostile_target_that_appears_while_writing_is_refused_at_the_commit(tmp_path):
    path = tmp_path / "out"
    with pytest.raises(IA3Error, match=f"^output {path} is a FIFO"):
        with atomic_output_file(str(path), force=True):
            os.mkfifo(path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def _write(path, force=False, **files):
    with atomic_output_dir(str(path), force=force) as tmp:
        for name, text in files.items():
            with open_for_writing(os.path.join(tmp, name)) as f:
                f.write(text)


def test_force_replaces_a_folder_only_while_everything_in_it_is_ours(tmp_path):
    out = tmp_path / "out"
    _write(out, a="1", b="2")
    assert json.loads((out / MARKER).read_text())["files"] == ["a", "b"]
    _write(out, force=True, a="3")  # ours: replaced
    assert sorted(os.listdir(out)) == [MARKER, "a"] and (out / "a").read_text() == "3"
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(IA3Error, match=f"output {out} holds sub, which ia3-export did not write; --force replaces only"):
        _write(out, force=True, a="4")
    assert (out / "sub" / "notes.txt").read_text() == "mine" and (out / "a").read_text() == "3"


def test_an_empty_folder_and_a_folder_of_our_folders_are_replaced(tmp_path):
    """Nothing to lose in an empty folder; a folder holding only our outputs (training's checkpoints,
    the demo's workdir) and temporaries a kill left is ours too, and `remove_output` removes it,
    but not with a user's file."""
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", force=True, a="1")
    parent = tmp_path / "checkpoints"
    _write(parent / "step-1", a="1")
    _write(parent / "step-2", a="2")
    (parent / "step-2" / "notes.txt").write_text("mine")
    assert atomic.remove_output(str(parent / "step-1")) and not (parent / "step-1").exists()
    assert not atomic.remove_output(str(parent)) and (parent / "step-2" / "notes.txt").exists()
    (parent / "step-2" / "notes.txt").unlink()
    (parent / ".step-3.tmp-x1y2").mkdir()  # what a kill while writing step 3 leaves
    (parent / ".step-3.tmp-x1y2" / "adapter_model.safetensors").write_bytes(b"half")
    assert atomic.remove_output(str(parent)) and os.listdir(tmp_path) == ["empty"]


def test_an_export_from_before_the_marker_is_recognised_by_its_manifest(tmp_path):
    old = tmp_path / "old-export"
    old.mkdir()
    (old / "model.onnx").write_bytes(b"graph")
    (old / "ia3_export.json").write_text(json.dumps({"format": "ia3-export"}))
    _write(old, force=True, a="1")
    assert sorted(os.listdir(old)) == [MARKER, "a"]
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "ia3_export.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(IA3Error, match="holds ia3_export.json, which ia3-export did not write"):
        _write(forged, force=True, a="1")


def test_a_workdir_is_written_into_never_replaced(tmp_path):
    """The demo's --workdir and training's checkpoints folder: outputs go inside, beside a user's files."""
    (tmp_path / "notes.txt").write_text("mine")
    atomic.check_output(str(tmp_path), inputs=(), kind="workdir")
    _write(tmp_path / "run", a="1")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "run"]
    with pytest.raises(IA3Error, match=f"output {tmp_path / 'notes.txt'} is a file; this output is a folder"):
        atomic.check_output(str(tmp_path / "notes.txt"), kind="workdir")


def test_the_legacy_manifest_names_are_the_manifests():
    from ia3_export.formats import manifest

    assert (atomic.LEGACY_MANIFEST, atomic.LEGACY_FORMAT) == (manifest.MANIFEST_NAME, manifest.FORMAT)


def test_opening_for_writing_outside_an_output_block_is_a_bug(tmp_path):
    with pytest.raises(RuntimeError, match="not inside an output block"):
        open_for_writing(str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


# -- non-finite values -------------------------------------------------------------------------
@pytest.mark.parametrize("value,dtype,message", [
    (np.nan, None, r"\.ia3_l holds nan \(not a finite number\): the adapter is broken"),
    (np.inf, None, r"\.ia3_l holds inf \(not a finite number\)"),
    (1e5, np.float16, r"\.ia3_l holds 100000, beyond float16's range \(\+-65504\): it would be stored as inf; keep "
                      r"the adapter in float32"),
])
def test_check_finite_names_the_tensor_the_value_and_the_fix(value, dtype, message):
    tensors = {"ok": np.ones(3, np.float32), "k.ia3_l": np.array([1.0, value, 1.0], np.float32)}
    with pytest.raises(IA3Error, match="^where: k" + message):
        check_finite(tensors, "where", dtype)
    check_finite({"ok": np.full(3, 65504.0, np.float32)}, "where", np.float16)  # the largest float16 is fine


def test_adapter_writers_refuse_non_finite_tensors(tmp_path):
    from ia3_export.core.config import IA3Config
    from ia3_export.formats.adapter_format import write_adapter
    from ia3_export.formats.onnx_adapter import write_onnx_adapter

    bad = {"base_model.model.layer.k.ia3_l": np.array([[1.0], [np.nan]], np.float32)}
    with pytest.raises(IA3Error, match=r"layer\.k\.ia3_l holds nan"):
        write_adapter(str(tmp_path / "peft"), IA3Config(), bad)
    with pytest.raises(IA3Error, match=r"k\.ia3_l holds inf"):
        write_onnx_adapter(str(tmp_path / "a.onnx_adapter"), {"k.ia3_l": np.array([np.inf], np.float32)})
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory, model_dir, adapter_dir):
    """A llama adapter with one k_proj entry of 1e5 (fine in float32, inf in float16) and an fp16 swappable export."""
    from ia3_export.export import export_model
    from ia3_export.formats.adapter_format import read_adapter, write_adapter

    source = read_adapter(adapter_dir("llama", seed=1))
    tensors = {k: v.copy() for k, v in source.tensors.items()}
    key = next(k for k in sorted(tensors) if "k_proj" in k)
    tensors[key].reshape(-1)[3] = 1e5
    path = str(tmp_path_factory.mktemp("overflow") / "big")
    write_adapter(path, source.config, tensors)
    folder = str(tmp_path_factory.mktemp("fp16") / "onnx")
    export_model(model_dir("llama"), folder, mode="swappable", dtype="fp16")
    return {"model": model_dir("llama"), "adapter": path, "fp16": folder, "key": key}


OVERFLOW = "holds 100000, beyond float16's range (+-65504): it would be stored as inf; keep the adapter in float32"


def test_fp16_export_and_convert_refuse_values_beyond_float16(overflowing, tmp_path):
    """Issue 22: both wrote adapters of inf (convert with exit 0; export failed its own validation)."""
    o = overflowing
    line = assert_one_line_error(run_cli("convert", o["adapter"], "--model", o["fp16"], "--out",
                                         tmp_path / "a.onnx_adapter"), 2, OVERFLOW)
    assert o["key"].removeprefix("base_model.model.") in line
    for mode in ("merged", "swappable"):
        line = assert_one_line_error(run_cli("export", o["model"], "--mode", mode, "--dtype", "fp16", "--adapter",
                                             o["adapter"], "--out", tmp_path / mode), 2, OVERFLOW)
        assert o["key"] in line
    assert os.listdir(tmp_path) == []


# -- strict JSON ---------------------------------------------------------------------------------
def test_dumps_writes_null_for_non_finite_numbers():
    value = {"a": float("nan"), "b": [float("inf"), -np.inf, np.float32(1.5), np.int64(3)], "c": (1.0, "x")}
    assert strict_json(dumps(value)) == {"a": None, "b": [None, None, 1.5, 3], "c": [1.0, "x"]}
