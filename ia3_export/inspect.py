"""What is in an adapter folder: targets, shapes, parameter count, vector statistics (torch-free)."""
from __future__ import annotations

import json

import numpy as np

from .adapter_format import read_adapter
from .config import describe


def adapter_summary(path: str) -> dict:
    adapter = read_adapter(path)
    vectors = adapter.vectors()
    ff = adapter.feedforward()
    rows = []
    for module, v in sorted(vectors.items()):
        rows.append({
            "module": module, "scales": "input" if ff[module] else "output", "dim": int(v.size),
            "min": float(v.min()), "mean": float(v.mean()), "max": float(v.max()),
            "zeros": int((v == 0).sum()), "non_finite": int((~np.isfinite(v)).sum()),
        })
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


def inspect_path(path: str, as_json: bool = False) -> str:
    summary = adapter_summary(path)
    if as_json:
        return json.dumps(summary, indent=2)
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
