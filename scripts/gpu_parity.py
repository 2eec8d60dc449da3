#!/usr/bin/env python3
"""The CUDA parity matrix: every tiny architecture x merged, swappable, bank x fp32 (TF32 on and
off) and fp16, on ONNX Runtime's CUDAExecutionProvider, against the float64 PyTorch reference; and
the same for `--graph fused` exports (onnxruntime-genai's builder: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3 with head
size 16; the fp16 one is the builder's CUDA graph) where --prepare has the builder installed.

Two steps, because the GPU machine may lack what exporting needs (onnxscript, this torch):

    # here, on the CPU machine (~10 minutes on 2 cores): tiny models, adapters, every export, and
    # .gpu-parity.tar.xz beside the folder (~2 MB: the exports share weights) to carry to the GPU
    python scripts/gpu_parity.py --prepare .gpu-parity
    # there (torch + transformers for the reference, onnxruntime-gpu for the graphs; ~4 min):
    python3 scripts/gpu_parity.py --run .gpu-parity.tar.xz --out "$OUT"
    # the same run on the CPU provider, to check the script itself without a GPU:
    python scripts/gpu_parity.py --run .gpu-parity --provider cpu --out runs/gpu_parity_cpu

`--run` writes gpu_parity.json (every check, every number) and gpu_parity.md (one row per export
and TF32 setting) and exits 1 if any check failed. A case that cannot run (an export that failed
in --prepare, a missing provider) is a FAILED row with its reason, never left out.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the GPU machine runs from a copy of the repo, not an installed package

MODES = ("merged", "swappable", "bank")
DTYPES = ("fp32", "fp16")
GRAPHS = ("traced", "fused")
MATRIX_FILE = "matrix.json"


def architectures() -> list[str]:
    from ia3_export.examples.tiny import DECODERS, ENCODERS, SEQ2SEQ

    return [*DECODERS, *ENCODERS, *SEQ2SEQ]


# -- --prepare (CPU machine) ------------------------------------------------------------------
def prepare(folder: str, archs: list[str], modes: list[str], dtypes: list[str], graphs: list[str]) -> list[dict]:
    """Tiny model + two adapters per architecture (and graph), then every export; failures are recorded, not fatal."""
    import torch

    from ia3_export.core.config import IA3Config
    from ia3_export.errors import IA3Error
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.export.fused import FUSED_TYPES

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(folder, exist_ok=True)
    entries = []
    for arch, graph in [(a, g) for a in archs for g in graphs if g == "traced" or a in FUSED_TYPES]:
        name = arch if graph == "traced" else f"{arch}-h64"  # the fused graph's CPU kernel: head size 16
        model_dir = os.path.join(folder, "models", name)
        if not os.path.isdir(model_dir):
            save_tiny(model_dir, arch, **({} if graph == "traced" else {"hidden_size": 64, "head_dim": 16, "max_position_embeddings": 4096}))
        adapters = []
        for seed in (1, 2):
            path = os.path.join(folder, "adapters", f"{name}-a{seed}")
            if not os.path.isdir(path):
                ia3 = IA3Model(load_base_model(model_dir), IA3Config())
                randomize_adapter(ia3, "default", seed=seed)
                ia3.save_adapter(path)
            adapters.append(path)
        for mode in modes:
            for dtype in dtypes:
                used = adapters[:1] if mode == "merged" else adapters
                out = os.path.join(folder, "exports", f"{arch}-{mode}-{dtype}" + ("-fused" if graph == "fused" else ""))
                entry = {"arch": arch, "graph": graph, "mode": mode, "dtype": dtype, "model": rel(model_dir, folder),
                         "adapters": [rel(a, folder) for a in used], "export": rel(out, folder), "error": None}
                start = time.perf_counter()
                try:
                    export_model(model_dir, out, mode=mode, adapters=used, dtype=dtype, graph=graph, force=True)
                except (IA3Error, RuntimeError, ValueError) as e:
                    entry["error"] = f"export failed: {str(e).splitlines()[0][:300]}"
                print(f"{arch:9s} {graph:6s} {mode:9s} {dtype}: {entry['error'] or 'exported'} "
                      f"({time.perf_counter() - start:.1f} s)",
                      flush=True)
                entries.append(entry)
    done = {key(e) for e in entries}  # a re-prepared subset replaces its rows only
    kept = [e for e in read_matrix(folder) if key(e) not in done]
    with open(os.path.join(folder, MATRIX_FILE), "w", encoding="utf-8") as f:
        json.dump({"entries": sorted(kept + entries, key=matrix_order)}, f, indent=2)
    with tarfile.open(archive_path(folder), "w:xz") as tar:
        tar.add(folder, arcname=os.path.basename(os.path.normpath(folder)))
    return entries


def read_matrix(folder: str) -> list[dict]:
    path = os.path.join(folder, MATRIX_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)["entries"]


def key(entry: dict) -> tuple[str, str, str, str]:
    """One export of the matrix (rows of a matrix prepared before the graph column are traced)."""
    return entry["arch"], entry.get("graph", "traced"), entry["mode"], entry["dtype"]


def matrix_order(entry: dict) -> tuple:
    archs = architectures()
    arch = archs.index(entry["arch"]) if entry["arch"] in archs else len(archs)
    _, graph, mode, dtype = key(entry)
    return arch, entry["arch"], GRAPHS.index(graph), MODES.index(mode), DTYPES.index(dtype)


def archive_path(folder: str) -> str:
    return os.path.normpath(folder) + ".tar.xz"


def unpack(archive: str, target: str) -> str:
    """The matrix folder inside a --prepare archive, extracted into `target`."""
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(target, filter="data")
        top = tar.getnames()[0].split("/")[0]
    return os.path.join(target, top)


def rel(path: str, folder: str) -> str:
    return os.path.relpath(path, folder)


# -- --run (GPU machine) ----------------------------------------------------------------------
def variants(provider: str, dtype: str) -> list[bool | None]:
    """TF32 settings to check: on (the CUDA provider's default) and off for CUDA fp32; else one run."""
    return [True, False] if provider == "cuda" and dtype == "fp32" else [None]


def run_entry(folder: str, entry: dict, provider: str, steps: int) -> list[dict]:
    """One export, every TF32 variant: a result row each (runs in a worker process)."""
    rows = []
    for tf32 in variants(provider, entry["dtype"]):
        row = dict(zip(("arch", "graph", "mode", "dtype"), key(entry))) | {"provider": provider, "tf32": tf32}
        start = time.perf_counter()
        if entry.get("error"):
            rows.append(row | {"passed": False, "error": entry["error"], "seconds": 0.0})
            continue
        try:
            from ia3_export.parity import ParityOptions, check_parity

            report = check_parity(os.path.join(folder, entry["model"]), os.path.join(folder, entry["export"]),
                                  [os.path.join(folder, a) for a in entry["adapters"]],
                                  ParityOptions(provider=provider, tf32=bool(tf32), greedy_steps=steps))
            worst = max(report.outputs, key=lambda o: o.excess)
            row |= {"passed": report.passed, "atol": report.atol, "rtol": report.rtol, "summary": report.summary(),
                    "worst": worst.line(), "max_abs": max(o.comparison.max_abs for o in report.outputs),
                    "greedy_identical": sum(g.reference == g.actual for g in report.greedy), "greedy": len(report.greedy),
                    "failures": [f.line() for f in report.failures()[:5]], "report": report.as_dict()}
        except Exception as e:  # any error is a failed row with its reason (IA3Error: one line)
            row |= {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                    "traceback": traceback.format_exc(limit=4)}
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    return rows


def _worker_init(provider: str) -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: processes, not threads, use the cores
    if provider == "cuda":
        import onnxruntime

        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()  # CUDA 13 / cuDNN 9 from the torch wheel, before any CUDA session


def run(folder: str, provider: str, out: str, workers: int, steps: int, archs, modes, dtypes, graphs) -> int:
    if folder.endswith(".tar.xz"):
        with tempfile.TemporaryDirectory(prefix="gpu-parity-") as tmp:
            return run(unpack(folder, tmp), provider, out, workers, steps, archs, modes, dtypes, graphs)
    entries = [e for e in read_matrix(folder) if e["arch"] in archs and key(e)[1] in graphs and e["mode"] in modes
               and e["dtype"] in dtypes]
    start = time.perf_counter()
    rows = []
    os.makedirs(out, exist_ok=True)
    partial = open(os.path.join(out, "gpu_parity_rows.jsonl"), "w", encoding="utf-8")  # survives a time-out
    for row in _run_all(folder, entries, provider, workers, steps):
        rows.append(row)
        partial.write(json.dumps({k: v for k, v in row.items() if k != "report"}, default=str) + "\n")
        partial.flush()
        print(f"{'ok  ' if row['passed'] else 'FAIL'} {row['arch']:9s} {row['graph']:6s} {row['mode']:9s} {row['dtype']} "
              f"tf32={row['tf32']}: {row.get('error') or row['summary']}", flush=True)
    partial.close()
    order = {key(e): i for i, e in enumerate(entries)}
    rows.sort(key=lambda r: (order[key(r)], r["tf32"] is False))
    environment = _environment(provider)
    result = {"environment": environment, "seconds": round(time.perf_counter() - start, 1),
              "passed": all(r["passed"] for r in rows), "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_parity.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(out, "gpu_parity.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))
    failed = sum(not r["passed"] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} passed in {result['seconds']} s; wrote {out}/gpu_parity.json and .md")
    return 1 if failed or not rows else 0


def _run_all(folder: str, entries: list[dict], provider: str, workers: int, steps: int):
    """Rows as they finish: in worker processes, or in this process when workers is 0."""
    if workers == 0:
        _worker_init(provider)
        for entry in entries:
            yield from run_entry(folder, entry, provider, steps)
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                initargs=(provider,)) as pool:
        futures = [pool.submit(run_entry, folder, e, provider, steps) for e in entries]
        for future in concurrent.futures.as_completed(futures):
            yield from future.result()


def _environment(provider: str) -> dict:
    import onnxruntime
    import torch
    import transformers

    env = {"provider": provider, "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
           "providers": onnxruntime.get_available_providers()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Parity matrix on {env.get('gpu', env['provider'])}", "",
             f"{env['provider']} provider; onnxruntime {env['onnxruntime']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, Python {env['python']}; reference: float64 PyTorch, each row alone. "
             f"{sum(r['passed'] for r in result['rows'])}/{len(result['rows'])} passed in {result['seconds']} s.", "",
             "| architecture | mode | dtype | TF32 | result | max abs | atol / rtol | greedy identical | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tf32 = "-" if r["tf32"] is None else ("on" if r["tf32"] else "off")
        if r.get("error"):
            verdict, max_abs, tol, greedy = f"FAIL: {r['error'][:120]}", "-", "-", "-"
        else:
            verdict = "pass" if r["passed"] else "FAIL: " + (r["failures"][0][:120] if r["failures"] else "")
            max_abs, tol = f"{r['max_abs']:.2e}", f"{r['atol']:g} / {r['rtol']:g}"
            greedy = f"{r['greedy_identical']}/{r['greedy']}" if r["greedy"] else "-"
        arch = r["arch"] if r["graph"] == "traced" else f"{r['arch']} (fused)"
        lines.append(f"| {arch} | {r['mode']} | {r['dtype']} | {tf32} | {verdict.replace('|', '/')} | {max_abs} | "
                     f"{tol} | {greedy} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--prepare", metavar="DIR", help="export the matrix into DIR (CPU machine)")
    step.add_argument("--run", metavar="DIR", help="check the exports in DIR or DIR.tar.xz (GPU machine)")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_parity"),
                        help="folder for gpu_parity.json and .md (default: $OUT, else runs/gpu_parity)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes for --run (0: run in this process)")
    parser.add_argument("--steps", type=int, default=8, help="greedy tokens compared per row")
    parser.add_argument("--arch", action="append", help="only these architectures (repeatable)")
    parser.add_argument("--mode", action="append", choices=MODES, help="only these modes (repeatable)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes (repeatable)")
    parser.add_argument("--graph", action="append", choices=GRAPHS,
                        help="only these graphs (repeatable; fused: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3; needs onnxruntime-genai)")
    args = parser.parse_args(argv)
    archs, modes, dtypes = args.arch or architectures(), args.mode or list(MODES), args.dtype or list(DTYPES)
    graphs = args.graph or list(GRAPHS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prepare:
        entries = prepare(args.prepare, archs, modes, dtypes, graphs)
        failed = [e for e in entries if e["error"]]
        print(f"prepared {len(entries) - len(failed)}/{len(entries)} exports in {args.prepare} and "
              f"{archive_path(args.prepare)}")
        return 0
    return run(args.run, args.provider, args.out, max(0, args.workers), args.steps, archs, modes, dtypes, graphs)


if __name__ == "__main__":
    sys.exit(main())
