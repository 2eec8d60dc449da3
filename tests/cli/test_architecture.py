"""The package's shape: no import cycle between its modules (function-level imports count: a lazy
import that only dodges a cycle is still a cycle), and the torch-free floors import no torch-bound
module. Read from the source files with `ast`, the same way for every module."""
from __future__ import annotations

import ast
import os

import ia3_export

PACKAGE = os.path.dirname(os.path.abspath(ia3_export.__file__))
TORCH_FREE = ("ia3_export.formats", "ia3_export.runtime", "ia3_export.serve", "ia3_export.errors",
              "ia3_export.progress", "ia3_export.ort")


def modules() -> dict[str, str]:
    """module name -> file, for every module of the installed package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                parts = ["ia3_export", *os.path.relpath(path, PACKAGE)[:-3].split(os.sep)]
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != module and not module.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_torch_free_floors_import_nothing_torch_bound():
    """What the lean install runs (formats, runtime, serve) reaches only torch-free modules, transitively."""
    edges = graph()
    bound = {m for m, p in modules().items() if _needs_torch(p)}
    for start in [m for m in edges if m.startswith(TORCH_FREE)]:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
        assert not seen & bound, f"{start} reaches {sorted(seen & bound)}"


def _needs_torch(path: str) -> bool:
    """Imports torch or transformers when it is imported (at module level, not in a function)."""
    names = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return bool(names & {"torch", "transformers"})


ONNXRUNTIME = ("onnxruntime", "onnxruntime_genai")


def test_onnxruntime_is_imported_only_through_ia3_export_ort():
    """ia3_export.ort switches telemetry off before ONNX Runtime loads and quiets its log: a module that
    imports onnxruntime (or onnxruntime_genai, or a submodule) itself would skip both."""
    found = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{module}:{node.lineno} {n}" for n in names if n.split(".")[0] in ONNXRUNTIME]
    assert all(f.startswith("ia3_export.ort:") for f in found), [f for f in found if not f.startswith("ia3_export.ort:")]
    assert found, "ia3_export.ort imports onnxruntime"
