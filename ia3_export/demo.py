"""The main job end to end on the embedded default, as one command: `ia3-export demo`.

Each stage checks its own result against an independent reference and the demo fails
(exit 1) if any check fails, so it doubles as a smoke test of a fresh install.
"""
from __future__ import annotations

import os
import time

from .errors import CheckFailed


class Report:
    """Rows of (stage, result, check) printed as a table at the end."""

    def __init__(self):
        self.rows: list[tuple[str, str, bool]] = []

    def add(self, stage: str, result: str, ok: bool = True) -> None:
        self.rows.append((stage, result, ok))
        print(f"[{'ok' if ok else 'FAIL'}] {stage}: {result}", flush=True)

    def render(self) -> str:
        width = max(len(s) for s, _, _ in self.rows)
        lines = [f"{'stage':<{width}}  check  result", f"{'-' * width}  -----  ------"]
        lines += [f"{s:<{width}}  {'ok' if ok else 'FAIL':<5}  {r}" for s, r, ok in self.rows]
        return "\n".join(lines)

    @property
    def passed(self) -> bool:
        return all(ok for _, _, ok in self.rows)


def core_stage(workdir: str, report: Report) -> dict:
    """Tiny Llama: add an adapter, save it in PEFT's format, reload it, fold it."""
    import torch

    from .config import IA3Config
    from .loading import load_base_model
    from .model import IA3Model
    from .tiny import randomize_adapter, save_tiny

    model_dir = save_tiny(os.path.join(workdir, "tiny-llama"), "llama")
    model = IA3Model(load_base_model(model_dir), IA3Config(task_type="CAUSAL_LM"))
    randomize_adapter(model, "default", seed=1)
    report.add("add adapter", model.trainable_report())
    adapter_dir = model.save_adapter(os.path.join(workdir, "tiny-llama-adapter"), force=True)
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapters():
            base = model(input_ids=ids).logits
    reloaded = IA3Model(load_base_model(model_dir))
    reloaded.load_adapter(adapter_dir)
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    diff = (again - adapted).abs().max().item()
    report.add("save + reload (PEFT format)", f"max abs diff {diff:.2e} (adapter changes logits by {(adapted - base).abs().max().item():.3f})", diff <= 1e-6)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        folded = merged(input_ids=ids).logits
    diff = (folded - adapted).abs().max().item()
    report.add("fold into weights", f"max abs diff vs unfolded {diff:.2e}", diff <= 1e-5)
    return {"model_dir": model_dir, "adapter_dir": adapter_dir}


STAGES = [core_stage]


def run_demo(workdir: str) -> Report:
    os.makedirs(workdir, exist_ok=True)
    report = Report()
    state: dict = {}
    start = time.perf_counter()
    for stage in STAGES:
        state |= stage(workdir, report) or {}
    report.add("total", f"{time.perf_counter() - start:.1f} s, outputs in {workdir}")
    print()
    print(report.render())
    if not report.passed:
        raise CheckFailed("the demo found a difference; see the table above")
    return report
