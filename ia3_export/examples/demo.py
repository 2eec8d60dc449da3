"""The main job end to end on the embedded default, as one command: `ia3-export demo`.

Each stage checks its own result against an independent reference and the demo fails
(exit 1) if any check fails, so it doubles as a smoke test of a fresh install.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

from ..errors import CheckFailed, IA3Error
from ..formats.manifest import BANK, FOLDSWAP, MERGED, SWAPPABLE


class Report:
    """Rows of (stage, result, check) printed as a table at the end. On a terminal each row also shows
    as its stage ends (progress); piped, the table alone says it, once (as `progress` stays silent)."""

    def __init__(self):
        self.rows: list[tuple[str, str, bool]] = []
        self.live = sys.stdout.isatty()

    def add(self, stage: str, result: str, ok: bool = True) -> None:
        self.rows.append((stage, result, ok))
        if self.live:
            print(f"[{'ok' if ok else 'FAIL'}] {stage}: {result}", flush=True)

    def render(self) -> str:
        width = max(len(s) for s, _, _ in self.rows)
        lines = [f"{'stage':<{width}}  check  result", f"{'-' * width}  -----  ------"]
        lines += [f"{s:<{width}}  {'ok' if ok else 'FAIL':<5}  {r}" for s, r, ok in self.rows]
        return "\n".join(lines)

    @property
    def failed(self) -> list[str]:
        return [stage for stage, _, ok in self.rows if not ok]

    def add_total(self, result: str) -> None:
        """The last row: whether every stage above passed, and which did not."""
        failed = self.failed
        verdict = (f"{len(failed)} of {len(self.rows)} stages failed: {', '.join(failed)}" if failed
                   else f"all {len(self.rows)} stages passed")
        self.add("total", f"{verdict}; {result}", not failed)


def core_stage(workdir: str, report: Report, quick: bool) -> dict:
    """Tiny Llama: add an adapter, save it in PEFT's format, reload it, fold it."""
    import torch

    from ..core.config import IA3Config
    from ..core.loading import load_base_model
    from ..core.model import IA3Model
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


def classifier_stage(workdir: str, report: Report, quick: bool) -> dict:
    """MiniLM-L6 + shipped reviews: train IA3 + head, export merged, score the ONNX model."""
    import numpy as np

    from ..export import export_model
    from ..runtime import IA3Session
    from ..runtime.tokenizer import TextTokenizer
    from ..train.data import read_rows
    from .shipped import minilm_classifier

    trained = minilm_classifier(os.path.join(workdir, "minilm-reviews-adapter"), quick=quick, force=True)
    before, after = trained["accuracy_before"], trained["accuracy_after"]
    report.add("train MiniLM-L6 classifier", f"eval accuracy {before:.3f} -> {after:.3f} (40 held-out reviews)", after > before)
    onnx_dir = os.path.join(workdir, "minilm-reviews-merged")
    manifest = export_model(trained["model_dir"], onnx_dir, mode=MERGED, adapters=[trained["adapter_dir"]],
                            task="text-classification", force=True)
    report.add("export merged (validated)", f"{manifest['graphs']['model']['nodes']} nodes, {onnx_dir}")
    rows = [r.fields for r in read_rows(trained["eval_file"], "text-classification")]
    session, tok = IA3Session(onnx_dir), TextTokenizer(onnx_dir)
    labels = trained["labels"]
    correct = 0
    for row in rows:  # one review at a time: no padding questions, the plain serving path
        ids = np.array([tok.encode(row["text"])], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        logits = session.run(feeds)["logits"]
        correct += labels[int(logits[0].argmax())] == str(row["label"])
    onnx_accuracy = correct / len(rows)
    report.add("ONNX Runtime accuracy", f"{onnx_accuracy:.3f} (PyTorch {after:.3f})", abs(onnx_accuracy - after) < 1e-9)
    return {}


def generator_stage(workdir: str, report: Report, quick: bool) -> dict:
    """Tiny Llama on a toy world: train an adapter, export swappable + bank, generate on ORT."""
    from ..export import export_model
    from ..parity import check_parity
    from ..runtime import IA3Session
    from .shipped import tiny_causal_lm

    lm = tiny_causal_lm(os.path.join(workdir, "tiny-lm"), force=True)
    report.add("train tiny causal LM adapter",
               f"says the animal's sound: base {lm['says_sound_base']:.0%} -> adapter {lm['says_sound_adapter']:.0%} "
               f"(held-out animals included)", lm["says_sound_adapter"] > lm["says_sound_base"])
    swappable = os.path.join(workdir, "tiny-lm-swappable")
    export_model(lm["base_dir"], swappable, mode=SWAPPABLE, adapters=[lm["adapter_dir"]], force=True)
    session = IA3Session(swappable)
    name = session.load_shipped_adapters()[0]
    same = 0
    for sample in lm["samples"]:
        base = session.generate(sample["prompt"], adapter=None, max_new_tokens=12)
        adapted = session.generate(sample["prompt"], adapter=name, max_new_tokens=12)
        same += base == sample["base"] and adapted == sample["adapter"]
    report.add("swappable export: one session, adapter on/off",
               f"greedy text equals PyTorch for {same}/{len(lm['samples'])} prompts, e.g. "
               f"{lm['samples'][-1]['prompt']!r} -> {adapted!r}", same == len(lm["samples"]))
    bank = os.path.join(workdir, "tiny-lm-bank")
    export_model(lm["base_dir"], bank, mode=BANK, adapters=[lm["adapter_dir"]], force=True)
    session = IA3Session(bank)
    name = session.load_shipped_adapters()[0]
    requests = [(s["prompt"], adapter) for s in lm["samples"] for adapter in (None, name)]
    outputs = session.generate_batch(requests, max_new_tokens=12)
    expected = [s[key] for s in lm["samples"] for key in ("base", "adapter")]
    matches = sum(a == b for a, b in zip(outputs, expected))
    report.add("bank export: one batch, adapter per row", f"{matches}/{len(expected)} rows equal PyTorch", matches == len(expected))
    foldswap = os.path.join(workdir, "tiny-lm-foldswap")
    export_model(lm["base_dir"], foldswap, mode=FOLDSWAP, adapters=[lm["adapter_dir"]], force=True)
    session = IA3Session(foldswap)
    name = session.load_shipped_adapters()[0]
    outputs = [session.generate(s["prompt"], adapter=adapter, max_new_tokens=12)
               for s in lm["samples"] for adapter in (None, name)]
    matches = sum(a == b for a, b in zip(outputs, expected))
    report.add("foldswap export: weights re-folded on switch", f"{matches}/{len(expected)} generations equal PyTorch",
               matches == len(expected))
    parity = check_parity(lm["base_dir"], swappable, adapters=[lm["adapter_dir"]])
    worst = max((c.comparison.max_abs for c in parity.outputs), default=0.0)
    report.add("parity vs float64 PyTorch (ORT CPU)",
               f"{len(parity.outputs)} output checks, worst max abs {worst:.1e}, greedy tokens identical: "
               f"{all(g.passed for g in parity.greedy)}", parity.passed)
    return {}


STAGES = (core_stage, classifier_stage, generator_stage)


def run_demo(workdir: str, quick: bool = False) -> Report:
    """Run every stage (one that raises is a failed row; the others still run), print the table,
    and raise CheckFailed (exit 1) naming the failed stages."""
    from ..formats.atomic import check_output
    from .shipped import data_file, minilm_dir

    inputs = [os.path.dirname(data_file("x"))]
    with contextlib.suppress(IA3Error):  # without MiniLM, its stage fails as a row of its own
        inputs.append(minilm_dir())
    check_output(workdir, inputs=inputs, kind="workdir")  # the demo writes its own outputs inside, replacing only those
    os.makedirs(workdir, exist_ok=True)
    report = Report()
    start = time.perf_counter()
    for stage in STAGES:
        try:
            stage(workdir, report, quick)
        except ImportError:  # a missing extra is a set-up problem: the CLI names what to install
            raise
        except Exception as e:  # a smoke test reports every stage, so one broken stage stops no other
            traceback.print_exc(file=sys.stdout)
            report.add(stage.__name__.replace("_", " "), f"stopped: {type(e).__name__}: {' '.join(str(e).split())}", False)
    failed, stages = report.failed, len(report.rows)
    report.add_total(f"{time.perf_counter() - start:.1f} s, outputs in {workdir}")
    print()
    print(report.render())
    if failed:
        raise CheckFailed(f"the demo failed {len(failed)} of {stages} stages ({', '.join(failed)}); see the table above")
    return report
