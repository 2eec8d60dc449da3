"""An exported folder as the runtime sees it: the manifest, its graphs, vectors, tokens, adapters.

Only the JSON is read here (no ONNX Runtime), so `inspect` and `convert` can describe or check
a folder without loading its weights.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import os

from ..dtypes import DTYPES
from ..errors import IA3Error
from ..formats.jsonfile import read_json
from ..formats.manifest import MANIFEST_NAME, Fields, confined, graph_path, read_manifest
from .bindings import binding_class

GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"


def max_positions(config: dict) -> int | None:
    """The most positions a model takes (config.json's max_position_embeddings, GPT-2's n_positions);
    None where the config sets no limit (T5's relative positions)."""
    text = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions"):
        value = text.get(key)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return None


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

    def check_inputs(self, declared: dict[str, dict[str, list]]) -> None:
        """Every vector (and foldswap weight) the manifest lists is an input of its graph with the size
        the graph declares (graph -> input name -> shape), checked before any of them is allocated:
        a forged dim must not decide how much memory a session takes."""
        where = os.path.join(self.path, MANIFEST_NAME)
        expected = [(name, spec.graph, [spec.dim]) for name, spec in self.vectors.items()]
        expected += [(w["name"], w["graph"], w["shape"]) for w in self.manifest.get("weights") or []]
        for name, graph, shape in expected:
            inputs = declared.get(graph, {})
            if name not in inputs:
                raise IA3Error(f"{where}: the manifest lists input {name} but graph {graph!r} has no such input; "
                               "re-export the model")
            actual = list(inputs[name])
            if actual[-len(shape):] != shape or len(actual) > len(shape) + self.stacked:
                raise IA3Error(f"{where}: the manifest gives {name} the shape {shape} but graph {graph!r} declares "
                               f"{actual}; re-export the model")

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
        if not os.path.isfile(path):
            return {}
        data = read_json(path)
        if not isinstance(data, dict):
            raise IA3Error(f"{path}: expected a JSON object, got {type(data).__name__}; restore the file")
        return data

    def _generation_token(self, key: str):
        """A token id (or list of ids) from generation_config.json, checked like the manifest's."""
        value = self.generation_config.get(key)
        Fields(os.path.join(self.path, GENERATION_CONFIG)).token_ids(value, key, many=key == "eos_token_id")
        return value


def open_folder(path: str) -> ExportedFolder:
    """Read and check an exported folder's manifest; every problem names the file and the fix."""
    if not os.path.isdir(path):
        raise IA3Error(f"exported folder {path} does not exist")
    manifest = read_manifest(path)
    where = os.path.join(path, MANIFEST_NAME)
    folder = ExportedFolder(os.path.abspath(path), manifest)
    for name in manifest["graphs"]:
        if not os.path.isfile(graph_path(folder.path, manifest, name)):
            raise IA3Error(f"{where}: graph {name!r} names {manifest['graphs'][name].get('file')}, which is missing; "
                           "re-export the model")
    return folder
