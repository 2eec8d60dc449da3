"""Parity for decoder folders with ONE KV buffer shared by past and present (manifest
`cache.kv_layout == "shared"`, `--graph fused`): no `position_ids`, GroupQueryAttention, batches
RIGHT-padded (export/fused.py's graph contract).

The traced layout's cases feed a random past; here the past is what the graph itself wrote into the
shared buffer, so a case is a whole request: a prefill (full logits, `logits_to_keep` left at its
default), then decode steps that feed given tokens through the runtime's own generation loop
(`runtime.generation`, the fast path users run: buffers bound once as past and present). The
reference is each row alone over its whole sequence (prompt + fed tokens, no cache: a causal model's
logits at a position depend only on the tokens up to it), cut to the positions each run computed by
compare's real-positions rule with right padding.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..compare import compare_rows, row_index, row_keep
from ..formats.manifest import ADAPTER_IDS
from ..runtime.generation import decoder_logits, empty_cache, position_ids
from ..runtime.session import Graph
from .report import OutputCheck

# (prompt lengths, decode steps): batch 1, and a right-padded batch of different lengths.
CASES = (((5,), 3), ((6, 3, 4), 3))


def onnx_spec(graph):
    """The graph's names in this layout: the traced spec without `position_ids` (for `_check_layout`)."""
    return dataclasses.replace(graph, inputs=[n for n in graph.inputs if n != "position_ids"])


def shared_kv_checks(reference, session, graph, seed: int, atol: float, rtol: float,
                     defaults_on: str | None = None, provider_options: dict | None = None) -> list[OutputCheck]:
    """Every case and scenario: prefill logits (every real position), the prefill's last positions and each
    decode step through the shared buffer. `defaults_on` (a provider): also the graph with nothing fed."""
    folder, model = reference.folder, session.graphs[graph.key]
    rng = np.random.default_rng(seed)
    checks = []
    for index, (lengths, steps) in enumerate(CASES):
        prompts = [rng.integers(4, reference.shape.vocab_size, n).tolist() for n in lengths]
        fed = rng.integers(4, reference.shape.vocab_size, (len(prompts), steps)).astype(np.int64)
        case = f"batch {len(prompts)}, prompts {','.join(map(str, lengths))} (right-padded), {steps} decode steps"
        whole = _reference_feeds(_right_padded(prompts, fed, folder.pad_id()), model, folder)
        prefill = _right_padded(prompts, fed[:, :0], folder.pad_id())
        prefill.update(empty_cache(model, len(prompts), folder.dtype, folder.cache))
        for label, rows in reference.scenarios(len(prompts), index):
            expected = reference.per_row(graph, whole, rows)["logits"]
            got = session.run(prefill, graph=graph.key, adapters=reference.ort_rows(rows), outputs=["logits"])["logits"]
            checks.append(OutputCheck(graph.file, case, f"{label}, prefill", _compare(graph, prefill, expected, got, atol, rtol)))
            checks += [OutputCheck(graph.file, case, f"{label}, {run} (shared KV buffer)", comparison) for run, comparison
                       in _generation_runs(session, reference.ort_rows(rows), prompts, fed, graph, expected, atol, rtol)]
        if defaults_on and index == len(CASES) - 1:  # the padded batch
            checks += _graph_defaults(reference, graph, whole, prefill, case, defaults_on, provider_options, atol, rtol)
    return checks


def _right_padded(prompts, fed: np.ndarray, pad: int) -> dict:
    """Each row's prompt and fed tokens from column 0, padding behind: ids and attention mask."""
    width = max(map(len, prompts)) + fed.shape[1]
    ids, mask = np.full((len(prompts), width), pad, np.int64), np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        sequence = [*prompt, *fed[row]]
        ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
    return {"input_ids": ids, "attention_mask": mask}


def _reference_feeds(whole: dict, model: Graph, folder) -> dict:
    """The traced layout's inputs for the whole sequences (empty past): what the reference wrapper takes."""
    return {**whole, "position_ids": position_ids(whole["attention_mask"]),
            **empty_cache(model, len(whole["input_ids"]), folder.dtype, folder.cache)}


def _generation_runs(session, adapters, prompts, fed: np.ndarray, graph, expected, atol: float, rtol: float):
    """The runtime's generation loop fed `fed` instead of its own choices: (run, comparison) for the
    prefill's last positions and each decode step. The feeds each run saw (one new token per row after
    the prompt, the mask one column wider per step) say, by the right-padding rule, which position it computed."""
    lengths, width = np.array([len(p) for p in prompts]), max(map(len, prompts))
    loop = decoder_logits(session, prompts, adapters, fed.shape[1] + 1)
    try:
        logits = next(loop)
        for step in range(fed.shape[1] + 1):
            seen = {"input_ids": np.zeros((len(prompts), 1), np.int64),
                    "attention_mask": (np.arange(width + step) < (lengths + step)[:, None]).astype(np.int64)}
            run = f"decode step {step}" if step else "prefill, last positions"
            yield run, _compare(graph, seen, expected, np.array(logits)[:, None, :], atol, rtol)
            if step < fed.shape[1]:
                logits = loop.send(fed[:, step])
    finally:
        loop.close()


def _compare(graph, feeds: dict, expected: list, got: np.ndarray, atol: float, rtol: float):
    """One run's logits vs each row's whole-sequence reference at the positions this run computed."""
    rows = []
    for row, (_, value) in enumerate(expected):
        keep = row_keep(graph, feeds, row, right_padded=True)
        start = int(keep["past_sequence_length"].sum())
        rows.append((row_index(graph.dynamic_axes["logits"], keep, row, got.ndim),
                     value[:, start + np.flatnonzero(keep["sequence_length"])]))
    return compare_rows("logits", rows, got, atol, rtol)


def _graph_defaults(reference, graph, whole: dict, prefill: dict, case: str, provider: str,
                    provider_options: dict | None, atol: float, rtol: float) -> list[OutputCheck]:
    """The prefill with NO vectors fed must be the base model (the initializers of ones, bank row 0)."""
    plain = Graph(reference.folder.graph_file(graph.key), provider, None, provider_options)
    feeds = dict(prefill)
    if ADAPTER_IDS in plain.inputs:
        feeds[ADAPTER_IDS] = np.zeros(len(prefill["input_ids"]), dtype=np.int64)
    got = plain.run(feeds, ["logits"])["logits"].numpy()
    expected = reference.per_row(graph, whole, [None] * len(got))["logits"]
    return [OutputCheck(graph.file, case, "nothing fed (graph defaults), prefill", _compare(graph, prefill, expected, got, atol, rtol))]
