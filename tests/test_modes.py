"""Modes are strategies over one export loop: one list of names, one class per mode, and a fifth
mode is one new class. Also: the package's imports form no cycle."""
from __future__ import annotations

import ast
import os

import numpy as np

import ia3_export

PACKAGE = os.path.dirname(ia3_export.__file__)


def test_one_list_of_modes_feeds_registry_bindings_and_cli():
    from ia3_export.commands.export import command
    from ia3_export.export.modes import EXPORT_MODES, ExportMode
    from ia3_export.manifest import MODES
    from ia3_export.runtime.bindings import BINDINGS

    choices = next(p for p in command.params if p.name == "mode").type.choices
    assert tuple(EXPORT_MODES) == MODES == tuple(BINDINGS) == tuple(choices)
    for name, mode in EXPORT_MODES.items():
        assert issubclass(mode, ExportMode) and mode.name == name


def test_a_fifth_mode_is_one_class(monkeypatch, model_dir, adapter_dir, tmp_path):
    """A mode registered under a new name that reuses swappable's hooks exports, validates and ships
    its adapter file with no other change: nothing in the loop tests a mode's name. Its graph fed the
    shipped adapter file computes what the swappable export computes (onnxruntime, numpy)."""
    import onnxruntime as ort

    from ia3_export import manifest
    from ia3_export.export import export_model
    from ia3_export.export.modes import EXPORT_MODES
    from ia3_export.export.modes.swappable import Swappable
    from ia3_export.onnx_adapter import read_onnx_adapter

    class Toy(Swappable):
        name = "toy"

    monkeypatch.setattr(manifest, "MODES", (*manifest.MODES, Toy.name))
    monkeypatch.setitem(EXPORT_MODES, Toy.name, Toy)
    model, adapter = model_dir("bert"), adapter_dir("bert")
    toy = export_model(model, str(tmp_path / "toy"), mode="toy", adapters=[adapter])
    swappable = export_model(model, str(tmp_path / "swappable"), mode="swappable", adapters=[adapter])
    assert toy["mode"] == "toy" and toy["vectors"] == swappable["vectors"] and toy["vectors"]
    assert toy["validation"]["comparisons"] == swappable["validation"]["comparisons"] > 0
    [entry] = toy["adapters"]
    vectors = read_onnx_adapter(str(tmp_path / "toy" / entry["file"]))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(4, 90, (2, 6)), "attention_mask": np.ones((2, 6), np.int64),
             "token_type_ids": np.zeros((2, 6), np.int64)}
    outputs = []
    for folder in ("toy", "swappable"):
        session = ort.InferenceSession(str(tmp_path / folder / "model.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds | vectors)[0])
        base = session.run(None, feeds)[0]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-6)
    assert np.abs(outputs[0] - base).max() > 1e-5  # the adapter's vectors moved the logits, far past 1e-6


def _module_name(path: str, package: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(package))[:-3].replace(os.sep, ".")
    return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def import_graph(package: str = PACKAGE, inside_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the in-package modules its module-level statements import. A submodule import also
    runs the __init__ of its packages, so those count too, except the importer's own packages (they
    are already being imported) and the root package (lazy)."""
    files = {}
    for root, _, names in os.walk(package):
        files.update({_module_name(os.path.join(root, n), package): os.path.join(root, n) for n in names if n.endswith(".py")})
    graph = {}
    for module, path in files.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges = set()
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree) if inside_functions else tree.body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target.startswith("ia3_export.") and not module.startswith(target + ".") and target != module:
                    if target in files:
                        edges.add(target)
                    target = target.rpartition(".")[0]
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    """Counting imports inside functions too: an import moved into a function to dodge a cycle is
    still a cycle (main had export/build.py <-> export/foldswap.py)."""
    graph = import_graph(inside_functions=True)
    assert "ia3_export.export.pipeline" in graph["ia3_export.export"]  # the walker sees package imports
    assert "ia3_export.export" in graph["ia3_export.parity.reference"]  # ... and the packages a submodule runs
    assert not any(m.startswith("ia3_export.parity") for m in graph["ia3_export.export.pipeline"])  # export < parity
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
