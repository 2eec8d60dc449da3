"""What is in an adapter folder, an `.onnx_adapter` file or an exported folder: targets, shapes,
parameter count, vector statistics (torch-free)."""
from __future__ import annotations

import numpy as np

from ..formats.adapter_format import read_adapter
from ..core.config import describe
from ..errors import IA3Error
from ..formats.jsonfile import dumps
from ..tasks import EXPORT_TASKS, task_named
from .generation import GENERATIVE


def adapter_summary(path: str) -> dict:
    adapter = read_adapter(path)
    vectors = adapter.vectors()
    ff = adapter.feedforward()
    rows = [{"module": module, "scales": "input" if ff[module] else "output", "dim": int(v.size), **_stats(v)}
            for module, v in sorted(vectors.items())]
    return {
        "path": path,
        "task_type": adapter.config.task_type,
        "target_modules": describe(adapter.config.target_modules),
        "feedforward_modules": describe(adapter.config.feedforward_modules),
        "modules_to_save": sorted(adapter.saved_tensors()),
        "num_vectors": len(vectors),
        "num_parameters": adapter.num_parameters(),
        "vectors": rows,
    }


def _stats(v: np.ndarray) -> dict:
    """What a user checks first in a vector: its range, and zeros or non-finite values."""
    finite = v[np.isfinite(v)]
    return {"min": float(finite.min()) if finite.size else float("nan"), "mean": float(finite.mean()) if finite.size else
            float("nan"), "max": float(finite.max()) if finite.size else float("nan"),
            "zeros": int((v == 0).sum()), "non_finite": int(v.size - finite.size)}


def onnx_adapter_summary(path: str) -> dict:
    """An `.onnx_adapter` file: its tensors (graph input names), shapes, dtypes and statistics."""
    from ..formats.onnx_adapter import read_onnx_adapter

    tensors = read_onnx_adapter(path)
    rows = [{"name": name, "shape": list(v.shape), "dtype": str(v.dtype), **_stats(v.astype(np.float64))}
            for name, v in sorted(tensors.items())]
    return {"path": path, "num_tensors": len(rows), "num_parameters": sum(int(v.size) for v in tensors.values()),
            "tensors": rows}


def _onnx_adapter_lines(s: dict) -> list[str]:
    lines = [f"onnx adapter: {s['path']}", f"tensors: {s['num_tensors']}   parameters: {s['num_parameters']:,}",
             f"{'graph input':<60} {'shape':<12} {'dtype':<8} {'min':>8} {'mean':>8} {'max':>8} {'zeros':>6}"]
    for r in s["tensors"]:
        flag = "  NON-FINITE" if r["non_finite"] else ""
        lines.append(f"{r['name']:<60} {'x'.join(map(str, r['shape'])):<12} {r['dtype']:<8} {r['min']:>8.4f} "
                     f"{r['mean']:>8.4f} {r['max']:>8.4f} {r['zeros']:>6}{flag}")
    return lines


def export_summary(path: str) -> dict:
    """An exported folder, from its manifest alone (no model load): mode, graphs, vectors, adapters."""
    import os

    from ..formats.reader import check_regular, present
    from .folder import open_folder

    folder = open_folder(path)
    m = folder.manifest
    adapters = [{"name": a["name"], "file": a.get("file"), "source_sha256": a.get("sha256"),
                 "present": bool(a.get("file")) and present(os.path.join(folder.path, a["file"]))}
                for a in m.get("adapters") or []]
    vectors = folder.vectors
    return {
        "path": folder.path, "mode": folder.mode, "task": m.get("task"), "model_type": m.get("model_type"),
        "dtype": m.get("dtype"), "opset": m.get("opset"), "exporter": m.get("exporter"),
        "graphs": {k: {"file": g.get("file"), "inputs": len(g.get("inputs") or []), "outputs": len(g.get("outputs") or []),
                       "bytes": check_regular(folder.graph_file(k), "graph").st_size} for k, g in folder.graphs.items()},
        "cache": m.get("cache"), "num_vectors": len(vectors), "vector_values": sum(v.dim for v in vectors.values()),
        "feedforward_vectors": sum(v.feedforward for v in vectors.values()),
        "adapters": adapters, "tokens": m.get("tokens"), "versions": m.get("versions"),
        "quantization": _quantization(m),
        "genai": m.get("genai"),
    }


def _quantization(m: dict) -> dict | None:
    """The manifest's quantization entry, its `lm_head` option replaced by the model's real head and
    what became of it (the option is recorded for every export, a classifier's too)."""
    q = m.get("quantization")
    if not q:
        return None
    task = m.get("task")
    found = task_named(task) if task in EXPORT_TASKS else None
    if found is not None and found.family in GENERATIVE:
        head = f"lm_head {q.get('method') if q.get('lm_head') else 'float'}"
    elif found is not None and found.heads:
        sources = {name.split(".")[0] for g in (q.get("graphs") or {}).values() for src in (g.get("weights") or {}).values()
                   for name in ([src] if isinstance(src, str) else [part[0] for part in src])}
        head = f"classifier {q.get('method') if sources & set(found.heads) else 'float'}"
    else:
        head = "none"
    return {"method": q.get("method"), "head": head,
            **{k: v for k, v in q.items() if k not in ("method", "lm_head", "graphs")}}


def _export_lines(s: dict) -> list[str]:
    lines = [f"exported folder: {s['path']}",
             f"mode: {s['mode']}   task: {s['task']}   model_type: {s['model_type']}   dtype: {s['dtype']}   "
             f"opset: {s['opset']}   exporter: {s['exporter']}"]
    for name, g in s["graphs"].items():
        lines.append(f"graph {name}: {g['file']} ({g['bytes'] / 1e6:.1f} MB, {g['inputs']} inputs, {g['outputs']} outputs)")
    if s["cache"]:
        c = s["cache"]
        lines.append(f"kv cache: {c.get('num_layers')} layers x {c.get('num_kv_heads')} heads x {c.get('head_dim')}")
    lines.append(f"vector inputs: {s['num_vectors']} ({s['vector_values']:,} values, {s['feedforward_vectors']} feed-forward)")
    for a in s["adapters"]:
        where = "folded into the weights" if not a["file"] else a["file"] + ("" if a["present"] else " [MISSING]")
        lines.append(f"adapter {a['name']}: {where} (source sha256 {str(a['source_sha256'])[:12]})")
    lines.append(f"tokens: {s['tokens']}")
    if s["quantization"]:
        q = s["quantization"]
        lines.append(f"quantized: {q.get('method')} ({', '.join(f'{k} {v}' for k, v in q.items() if k != 'method')})")
    genai = s["genai"] or {}
    lines.append("onnxruntime-genai: " + (f"og.Model(folder) loads it ({', '.join(genai.get('files') or [])})"
                                          if genai.get("supported") else f"not served ({genai.get('reason', 'no entry')})"))
    return lines


def inspect_path(path: str, as_json: bool = False) -> str:
    import os

    from ..formats.manifest import MANIFEST_NAME
    from ..formats.onnx_adapter import SUFFIX
    from ..formats.reader import present

    if path.endswith(SUFFIX) or not os.path.isdir(path):
        if not present(path):
            raise IA3Error(f"{path} does not exist; pass an adapter folder, an {SUFFIX} file or an exported folder")
        summary = onnx_adapter_summary(path)  # a FIFO, device or socket is refused by name there
        return dumps(summary, indent=2) if as_json else "\n".join(_onnx_adapter_lines(summary))
    if present(os.path.join(path, MANIFEST_NAME)):
        summary = export_summary(path)
        return dumps(summary, indent=2) if as_json else "\n".join(_export_lines(summary))
    summary = adapter_summary(path)
    if as_json:
        return dumps(summary, indent=2)  # strict JSON: non-finite numbers are null
    lines = [
        f"adapter: {summary['path']}",
        f"task_type: {summary['task_type']}",
        f"target_modules: {summary['target_modules']}  (feed-forward: {summary['feedforward_modules'] or 'none'})",
        f"vectors: {summary['num_vectors']}   parameters: {summary['num_parameters']:,}",
    ]
    if summary["modules_to_save"]:
        lines.append(f"modules_to_save tensors: {', '.join(summary['modules_to_save'])}")
    lines.append(f"{'module':<50} {'scales':<7} {'dim':>6} {'min':>8} {'mean':>8} {'max':>8} {'zeros':>6}")
    for r in summary["vectors"]:
        flag = "  NON-FINITE" if r["non_finite"] else ""
        lines.append(f"{r['module']:<50} {r['scales']:<7} {r['dim']:>6} {r['min']:>8.4f} {r['mean']:>8.4f} {r['max']:>8.4f} {r['zeros']:>6}{flag}")
    return "\n".join(lines)
