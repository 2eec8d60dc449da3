"""Greedy generation through the runtime against the PyTorch reference, row by row: the parity
check's verdict on generators, and (with zero tolerance) the quantized export's agreement."""
from __future__ import annotations

import numpy as np

from ..runtime.generation import GenerationOptions, generate_ids
from .report import GreedyCheck


def greedy_checks(reference, session, options, atol: float, rtol: float) -> list[GreedyCheck]:
    """Greedy generation through the runtime (KV cache, left padding, batch) vs the reference one row at
    a time. A different token is a failure unless the reference itself has a near-tie there: two logits
    within the tolerance of each other, where either choice is correct."""
    folder = reference.folder
    rng = np.random.default_rng(options.seed + 7)
    prompts = [rng.integers(4, reference.shape.vocab_size, n).tolist() for n in (5, 3, 7)]
    eos = set(folder.eos_ids())
    start = folder.tokens.get("decoder_start")
    checks = []
    generate = getattr(session, "generate_ids", None) or (lambda *args: generate_ids(session, *args))  # node: its own
    for label, rows in reference.scenarios(len(prompts), 1):
        actual = generate(prompts, reference.ort_rows(rows), GenerationOptions(max_new_tokens=options.greedy_steps))
        for row, (prompt, adapter) in enumerate(zip(prompts, rows)):
            tokens, logits = reference.greedy(prompt, adapter, options.greedy_steps, eos, start)
            passed, note = _judge_tokens(tokens, actual[row], logits, atol, rtol)
            checks.append(GreedyCheck(label, row, adapter, tokens, actual[row], passed, note))
    return checks


def _judge_tokens(reference: list[int], actual: list[int], logits: list[np.ndarray], atol: float, rtol: float):
    for step, (want, got) in enumerate(zip(reference, actual)):
        if want != got:
            gap = abs(float(logits[step][want] - logits[step][got]))
            bound = 2 * (atol + rtol * abs(float(logits[step][want])))
            if gap <= bound:
                return True, (f"step {step}: token {got} instead of {want}, a near-tie in the reference "
                              f"(logit gap {gap:.3g} <= {bound:.3g}); later steps not compared")
            return False, f"step {step}: token {got} instead of {want} (reference logit gap {gap:.3g} > {bound:.3g})"
    if len(reference) != len(actual):
        return False, f"lengths differ: reference {len(reference)} tokens, ONNX Runtime {len(actual)}"
    return True, ""
