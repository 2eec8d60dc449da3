"""An exported folder as the runtime sees it: the manifest, its graphs, vectors, tokens, adapters.

No ONNX Runtime here, so `inspect` and `convert` can describe or check a folder without loading
its weights: the JSON files are read and checked field by field, and each graph's protobuf is
walked (formats/onnx_graph.py) for its external data and for the inputs and initializers it
declares, against which the manifest's sizes are checked before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

from ..dtypes import DTYPES
from ..errors import IA3Error
from ..formats.jsonfile import read_json
from ..formats.manifest import MANIFEST_NAME, Fields, confined, graph_path, read_manifest
from ..formats.model_config import check_model_config
from ..formats.onnx_graph import GraphFacts, check_graph
from ..formats.reader import present, registers
from .bindings import binding_class

GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"


def max_positions(config: dict) -> int | None:
    """The most positions a model takes (config.json's max_position_embeddings, GPT-2's n_positions);
    None where the config sets no limit (T5's relative positions). The config was checked
    (formats/model_config.py): a value present is a positive integer within its ceiling."""
    text = config.get("text_config") or config
    return next((text[key] for key in ("max_position_embeddings", "n_positions") if text.get(key) is not None), None)


@dataclasses.dataclass(frozen=True)
class VectorSpec:
    """One IA3 vector the model takes as a graph input (a [dim] input, or a [num_adapters, dim] bank)."""

    name: str
    graph: str
    dim: int
    feedforward: bool


@dataclasses.dataclass
class ExportedFolder:
    path: str
    manifest: dict

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def stacked(self) -> bool:
        """Whether vector inputs are banks ([num_adapters, dim]) rather than one adapter's [dim]."""
        return binding_class(self.mode).stacked

    @property
    def task(self) -> str:
        return self.manifest.get("task", "")

    @property
    def dtype(self) -> str:
        """numpy name of the float type of the graph's activations and vectors."""
        return DTYPES[self.manifest["dtype"]].numpy

    @property
    def graphs(self) -> dict[str, dict]:
        return self.manifest["graphs"]

    def graph_file(self, graph: str) -> str:
        return graph_path(self.path, self.manifest, graph)

    @property
    def cache(self) -> dict | None:
        return self.manifest.get("cache")

    @property
    def vectors(self) -> dict[str, VectorSpec]:
        return {v["name"]: VectorSpec(v["name"], v.get("graph", "model"), v["dim"], v.get("feedforward", False))
                for v in self.manifest.get("vectors") or []}

    def check_inputs(self, facts: dict[str, GraphFacts]) -> None:
        """Every vector (and foldswap weight) the manifest lists is an input of its graph with the size
        the graph declares, and all of them together are backed by the values the graphs' initializers
        hold (the ones a vector starts from, the base weights a fold scales), checked before any of
        them is allocated: a forged dim must not decide how much memory a session takes."""
        where = os.path.join(self.path, MANIFEST_NAME)
        expected = [(name, spec.graph, [spec.dim]) for name, spec in self.vectors.items()]
        expected += [(w["name"], w["graph"], w["shape"]) for w in self.manifest.get("weights") or []]
        for name, graph, shape in expected:
            inputs = facts[graph].inputs
            if name not in inputs:
                raise IA3Error(f"{where}: the manifest lists input {name} but graph {graph!r} has no such input; "
                               "re-export the model")
            actual = list(inputs[name])
            if actual[-len(shape):] != shape or len(actual) > len(shape) + self.stacked:
                raise IA3Error(f"{where}: the manifest gives {name} the shape {shape} but graph {graph!r} declares "
                               f"{actual}; re-export the model")
        declared = sum(math.prod(shape) for _, _, shape in expected)
        backed = sum(t.count for f in facts.values() for t in f.initializers.values() if t.nbytes is not None)
        if declared > 2 * backed:  # foldswap: weights + vectors <= 2 x the base weights; else vectors <= the ones
            raise IA3Error(f"{where}: the manifest declares {declared} vector and weight values but the graphs hold "
                           f"only {backed} values to back them; the folder is forged or truncated, re-export the model")

    @property
    def adapters(self) -> dict[str, str]:
        """Adapter name -> file path of the adapters shipped inside the folder."""
        return {a["name"]: os.path.join(self.path, a["file"]) for a in self.manifest.get("adapters") or [] if a.get("file")}

    def adapter_file(self, name: str) -> str:
        """The real path of a shipped adapter, confined to the folder like the graphs."""
        entry = next(a for a in self.manifest.get("adapters") or [] if a["name"] == name and a.get("file"))
        return confined(self.path, entry["file"], os.path.join(self.path, MANIFEST_NAME), f"adapter {name!r}")

    @property
    def tokens(self) -> dict:
        return self.manifest.get("tokens") or {}

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: generation_config.json's (it may list several), else the manifest's."""
        eos = self._generation_token("eos_token_id")
        if eos is None:
            eos = self.tokens.get("eos")
        if eos is None:
            return []
        return eos if isinstance(eos, list) else [eos]

    def pad_id(self) -> int:
        pad = self.tokens.get("pad")
        if pad is None:
            pad = self._generation_token("pad_token_id")
        if pad is None:
            eos = self.eos_ids()
            pad = eos[0] if eos else 0
        return pad

    @functools.cached_property
    def config(self) -> dict:
        """The export's config.json ({} without one), read once: a session's folder does not change."""
        return self._json(MODEL_CONFIG)

    @functools.cached_property
    def generation_config(self) -> dict:
        return self._json(GENERATION_CONFIG)

    @functools.cached_property
    def max_positions(self) -> int | None:
        return max_positions(self.config)

    def _json(self, name: str) -> dict:
        path = os.path.join(self.path, name)
        if not present(path):
            return {}
        data = read_json(path)
        if name == MODEL_CONFIG:
            return check_model_config(data, path)
        if not isinstance(data, dict):
            raise IA3Error(f"{path}: expected a JSON object, got {type(data).__name__}; restore the file")
        return data

    def _generation_token(self, key: str):
        """A token id (or list of ids) from generation_config.json, checked like the manifest's."""
        value = self.generation_config.get(key)
        Fields(os.path.join(self.path, GENERATION_CONFIG)).token_ids(value, key, many=key == "eos_token_id")
        return value


@registers("export_dir", (MANIFEST_NAME, "json"), ("model.onnx", "graph"), (MODEL_CONFIG, "json"),
           (GENERATION_CONFIG, "json"))
def open_folder(path: str) -> ExportedFolder:
    """Read and check an exported folder: its manifest, each graph (external data confined, sizes
    against the manifest's, see `check_inputs`) and its JSON files; every problem names the file and
    the fix. ONNX Runtime (or genai) is handed a graph only after this."""
    if not os.path.isdir(path):
        raise IA3Error(f"exported folder {path} is not a folder" if present(path) else
                       f"exported folder {path} does not exist")
    manifest = read_manifest(path)
    where = os.path.join(path, MANIFEST_NAME)
    folder = ExportedFolder(os.path.abspath(path), manifest)
    facts = {}
    for name in manifest["graphs"]:
        file = graph_path(folder.path, manifest, name)
        if not present(file):
            raise IA3Error(f"{where}: graph {name!r} names {manifest['graphs'][name].get('file')}, which is missing; "
                           "re-export the model")
        facts[name] = check_graph(file)
    folder.check_inputs(facts)
    folder.config, folder.generation_config  # read and checked now, not in the middle of a request
    return folder
