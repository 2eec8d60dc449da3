"""An exported folder as the runtime sees it: the manifest, its graphs, vectors, tokens, adapters.

Only the JSON is read here (no ONNX Runtime), so `inspect` and `convert` can describe or check
a folder without loading its weights.
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import IA3Error
from ..jsonfile import read_json
from ..manifest import MANIFEST_NAME, MODES, NUMPY_DTYPES, graph_path, read_manifest


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
    def task(self) -> str:
        return self.manifest.get("task", "")

    @property
    def dtype(self) -> str:
        """numpy name of the float type of the graph's activations and vectors."""
        return NUMPY_DTYPES[self.manifest["dtype"]]

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
        return {v["name"]: VectorSpec(v["name"], v.get("graph", "model"), int(v["dim"]), bool(v.get("feedforward", False)))
                for v in self.manifest.get("vectors") or []}

    @property
    def adapters(self) -> dict[str, str]:
        """Adapter name -> file path of the adapters shipped inside the folder."""
        return {a["name"]: os.path.join(self.path, a["file"]) for a in self.manifest.get("adapters") or [] if a.get("file")}

    @property
    def tokens(self) -> dict:
        return self.manifest.get("tokens") or {}

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: generation_config.json's (it may list several), else the manifest's."""
        eos = self._json("generation_config.json").get("eos_token_id")
        if eos is None:
            eos = self.tokens.get("eos")
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def pad_id(self) -> int:
        pad = self.tokens.get("pad")
        if pad is None:
            pad = self._json("generation_config.json").get("pad_token_id")
        if pad is None:
            eos = self.eos_ids()
            pad = eos[0] if eos else 0
        return int(pad)

    def _json(self, name: str) -> dict:
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            return {}
        data = read_json(path)
        return data if isinstance(data, dict) else {}


def open_folder(path: str) -> ExportedFolder:
    """Read and check an exported folder's manifest; every problem names the file and the fix."""
    if not os.path.isdir(path):
        raise IA3Error(f"exported folder {path} does not exist")
    manifest = read_manifest(path)
    where = os.path.join(path, MANIFEST_NAME)
    if manifest["mode"] not in MODES:
        raise IA3Error(f"{where}: mode {manifest['mode']!r} is not one of {', '.join(MODES)}; re-export the model")
    if manifest["dtype"] not in NUMPY_DTYPES:
        raise IA3Error(f"{where}: dtype {manifest['dtype']!r} is not one of {', '.join(NUMPY_DTYPES)}; re-export the model")
    if not isinstance(manifest["graphs"], dict) or not manifest["graphs"]:
        raise IA3Error(f"{where}: no graphs; re-export the model")
    folder = ExportedFolder(os.path.abspath(path), manifest)
    for name in manifest["graphs"]:
        if not os.path.isfile(graph_path(folder.path, manifest, name)):
            raise IA3Error(f"{where}: graph {name!r} names {manifest['graphs'][name].get('file')}, which is missing; "
                           "re-export the model")
    return folder
