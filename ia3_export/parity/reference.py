"""The parity check's PyTorch side: the model folder + PEFT adapters, unmerged, in float64 by
default, each batch row run alone without its padding (`per_row`), on the shared reference
harness (export/reference.py: loading, sample inputs, the wrappers' eager outputs)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from ..formats import adapter_format as fmt
from ..compare import row_index, row_keep, take_row
from ..dtypes import numpy_dtype, torch_dtype
from ..errors import IA3Error
from ..export.modes import export_mode
from ..export.reference import (adapter_sha256, load_model, probe_shape, running, sample_feeds, torch_outputs)
from ..export.tasks import TASKS, graph_specs
from ..export.wrappers import graph_wrappers
from ..core.loading import adapters_task_type, check_task, read_model_config
from ..core.merge import adapter_names, fold_adapters, with_adapters
from .quantized import load_dequantized_folder


class Reference:
    """The PyTorch side of `parity`: the model folder + PEFT adapters, unmerged, in float64 (or float32)."""

    def __init__(self, model_dir: str, folder, adapter_dirs: list[str], reference_dtype: str,
                 trust_remote_code: bool = False, dequantize: bool = True):
        manifest = folder.manifest
        config = read_model_config(model_dir)
        if config["model_type"] != manifest["model_type"]:
            raise IA3Error(f"{model_dir} is a {config['model_type']} model but {folder.path} was exported from a "
                           f"{manifest['model_type']} model; pass the model folder the export was made from")
        if manifest["task"] not in TASKS:
            raise IA3Error(f"{folder.path}: unknown task {manifest['task']!r} in the manifest; re-export the model")
        self.folder, self.mode, self.task = folder, export_mode(folder.mode), TASKS[manifest["task"]]
        self.adapters = [fmt.read_adapter(p) for p in adapter_dirs]
        check_task(manifest["task"], *adapters_task_type(self.adapters), source="the export's task",
                   hint=f"check {folder.path} with adapters trained for its task")
        self.names = adapter_names(self.adapters, "two --adapter folders have the same name; the folder name is the "
                                                  "adapter's name, so rename one")
        self._check_folded()
        self.float_type = numpy_dtype(reference_dtype).type
        model = load_model(model_dir, self.task.auto_class, self.adapters, trust_remote_code=trust_remote_code,
                           dtype=torch_dtype(reference_dtype))
        self.ia3 = None
        quantized = dequantize and manifest.get("quantization") is not None
        if quantized and self.mode.folds_adapters:  # folded as the export folds (modules_to_save included)
            model = fold_adapters(model, self.adapters)
        elif self.adapters:
            self.ia3 = with_adapters(model, self.adapters, active=self.names if self.mode.folds_adapters else ())
        if quantized:  # then the graph's own weights, de-quantized, in place of the float ones
            load_dequantized_folder(model, folder)
        self.model = self.ia3.model if self.ia3 is not None else model
        self.shape = probe_shape(self.model, self.task, manifest["dtype"])
        base_inputs = manifest["graphs"][next(iter(manifest["graphs"]))]["inputs"]
        self.graphs = graph_specs(self.task, self.shape.num_layers, token_type_ids="token_type_ids" in base_inputs)
        self.wrappers = {key: wrapper for key, (wrapper, _) in graph_wrappers(self.model, self.task, self.shape, None,
                                                                          self.graphs).items()}

    @property
    def generates(self) -> bool:
        return self.task.kind == "seq2seq" or (self.task.kind == "decoder" and self.task.output == "logits")

    def _check_folded(self) -> None:
        """A merged export must be compared with the adapters it folded (the manifest keeps their sha256)."""
        if not self.mode.folds_adapters:
            return
        folded = {a["sha256"]: a["name"] for a in self.folder.manifest.get("adapters") or [] if a.get("sha256")}
        given = {adapter_sha256(a): a.name for a in self.adapters}
        if set(folded) != set(given):
            want = ", ".join(sorted(folded.values())) or "none"
            got = ", ".join(sorted(given.values())) or "none"
            raise IA3Error(f"{self.folder.path} is a merged export with adapters folded in ({want}) but --adapter gave "
                           f"{got}; pass exactly the adapter folders it was exported with")

    def ort_sources(self) -> dict[str, str]:
        """Adapter name -> what the ONNX side loads: the file shipped in the export when it was made from
        this very adapter (what a server loads), else the PEFT folder."""
        if self.mode.folds_adapters:
            return {}
        shipped = {a["name"]: a for a in self.folder.manifest.get("adapters") or [] if a.get("file")}
        sources = {}
        for a in self.adapters:
            entry = shipped.get(a.name)
            same = entry is not None and entry.get("sha256") == adapter_sha256(a)
            sources[a.name] = os.path.join(self.folder.path, entry["file"]) if same else os.path.abspath(a.path)
        return sources

    def ort_rows(self, rows: list[str | None]) -> list[str | None] | None:
        """Adapter names per row for the session (a merged export has none: they are in the weights)."""
        return None if self.mode.folds_adapters else rows

    def scenarios(self, batch: int, index: int) -> list[tuple[str, list[str | None]]]:
        """[(label, adapter name per row)] for a case. Merged: the folded adapters. Swappable, foldswap: no
        adapter, then each adapter for the whole batch. Bank: rows mixed, rotating with the case index."""
        if self.mode.folds_adapters:
            return [("folded " + (",".join(self.names) or "none"), [None] * batch)]
        choices = [None, *self.names]
        if self.mode.per_row:
            assignments = [[choices[(row + index) % len(choices)] for row in range(batch)]]
        else:
            assignments = [[name] * batch for name in choices]
        return [("adapters " + ",".join(r or "-" for r in rows), rows) for rows in assignments]

    @contextlib.contextmanager
    def running(self, adapter: str | None):
        """The model as the base (None) or with one adapter (its own parameters); merged: as loaded."""
        if self.mode.folds_adapters:
            yield
            return
        with running(self.ia3, adapter):
            yield

    def cases(self, graph, seed: int):
        """The validation's cases, with padded positions holding the pad token as a tokenizer writes them
        (a decoder classifier finds its last real token by the pad id)."""
        cases = sample_feeds(graph, self.task, self.shape, seed=seed)
        pad = self.folder.pad_id()
        for _, feeds in cases:
            if "input_ids" in feeds and "attention_mask" in feeds:
                ids = feeds["input_ids"]
                feeds["input_ids"] = np.where(feeds["attention_mask"][:, -ids.shape[1]:] == 0, pad, ids)
        return cases

    def per_row(self, graph, feeds: dict, rows: list[str | None]) -> dict[str, list]:
        """Output name -> [(index arrays into the batch output, row output)] for every row run alone."""
        wrapper = self.wrappers[graph.key]
        results = {name: [] for name in graph.outputs}
        for row, adapter in enumerate(rows):
            keep = row_keep(graph, feeds, row)
            row_feeds = {name: self._cast(take_row(value, graph.dynamic_axes.get(name, {}), keep, row))
                         for name, value in feeds.items()}
            with self.running(adapter):
                outputs = torch_outputs(wrapper, graph.inputs, row_feeds)
            for name, value in zip(graph.outputs, outputs):
                results[name].append((row_index(graph.dynamic_axes.get(name, {}), keep, row, value.ndim), value))
        return results

    def _cast(self, value: np.ndarray) -> np.ndarray:
        return value.astype(self.float_type) if np.issubdtype(value.dtype, np.floating) else value

    def greedy(self, prompt: list[int], adapter: str | None, steps: int, eos: set[int], start: int | None):
        """Greedy tokens for one prompt alone, recomputing the whole sequence each step (no cache: an
        independent path from the graph's), with the reference logits of every step."""
        tokens, logits_per_step = [], []
        ids = torch.tensor([prompt])
        with torch.no_grad(), self.running(adapter):
            for _ in range(steps):
                if self.task.kind == "seq2seq":
                    dec = torch.tensor([[start, *tokens]])
                    logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
                else:
                    seq = torch.tensor([[*prompt, *tokens]])
                    logits = self.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
                last = logits[0, -1].double().numpy()
                logits_per_step.append(last)
                tokens.append(int(last.argmax()))
                if tokens[-1] in eos:
                    break
        return tokens, logits_per_step


