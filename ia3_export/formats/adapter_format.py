"""PEFT's IA3 adapter folder, read without torch: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.ia3_l` with shape (out, 1) for output scaling and
(1, in) for feed-forward input scaling; `modules_to_save` tensors are stored in full under
`base_model.model.<module path>.<param>`. Pickled `.bin` adapters are refused: loading a pickle
runs code from the file.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from .adapter_names import name_for
from .atomic import atomic_output_dir, check_finite
from ..core.config import IA3Config
from ..errors import IA3Error
from .jsonfile import read_json, write_json
from .reader import present, registers
from .safetensors_io import read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
VECTOR_SUFFIX = ".ia3_l"


@dataclasses.dataclass
class AdapterFile:
    """An IA3 adapter as stored: its config and its tensors under PEFT's keys."""

    config: IA3Config
    tensors: dict[str, np.ndarray]
    path: str = ""

    @property
    def name(self) -> str:
        """The folder's name, made a valid adapter name (`adapter_names.name_for`)."""
        return name_for(self.path) if self.path else "adapter"

    def vectors(self) -> dict[str, np.ndarray]:
        """Module path -> 1-D float32 vector."""
        return {
            module_path(k): v.reshape(-1).astype(np.float32)
            for k, v in self.tensors.items()
            if k.endswith(VECTOR_SUFFIX)
        }

    def feedforward(self) -> dict[str, bool]:
        """Module path -> whether the vector scales the input (shape (1, in))."""
        return {module_path(k): v.ndim == 2 and v.shape[0] == 1 and v.shape[1] != 1
                for k, v in self.tensors.items() if k.endswith(VECTOR_SUFFIX)}

    def saved_tensors(self) -> dict[str, np.ndarray]:
        """The full tensors of modules_to_save, keyed by their path in the model."""
        return {k[len(PREFIX):]: v for k, v in self.tensors.items() if not k.endswith(VECTOR_SUFFIX)}

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.tensors.values()))


def module_path(key: str) -> str:
    """`base_model.model.a.b.ia3_l` -> `a.b`."""
    return key[len(PREFIX):-len(VECTOR_SUFFIX)]


def vector_key(path: str) -> str:
    return f"{PREFIX}{path}{VECTOR_SUFFIX}"


@registers("adapter_dir", (CONFIG_NAME, "json"), (WEIGHTS_NAME, "safetensors"))
def read_adapter(path: str, max_bytes: int | None = None) -> AdapterFile:
    """Read and check a PEFT IA3 adapter folder; every problem is an IA3Error naming the file.
    `max_bytes` caps the tensor data a caller can use (checked against the header before reading)."""
    if not os.path.isdir(path):
        what = "is not a folder" if present(path) else "does not exist"
        raise IA3Error(f"adapter folder {path} {what} (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not present(config_path):
        raise IA3Error(f"{path} has no {CONFIG_NAME}; is it a PEFT adapter folder?")
    if not present(weights_path):
        if present(os.path.join(path, PICKLE_NAME)):
            raise IA3Error(
                f"{os.path.join(path, PICKLE_NAME)} is a pickle, which can run code when loaded; refusing it. "
                "Re-save the adapter as safetensors (PEFT: save_pretrained(..., safe_serialization=True)) "
                "from a trusted environment"
            )
        raise IA3Error(f"{path} has no {WEIGHTS_NAME}")
    config = read_config(path)
    tensors = read_safetensors(weights_path, max_bytes)
    adapter = AdapterFile(config=config, tensors=tensors, path=path)
    _check_tensors(adapter, weights_path)
    return adapter


@registers("adapter_dir", (CONFIG_NAME, "json"))
def read_config(path: str) -> IA3Config:
    """The adapter folder's adapter_config.json alone (what it is, before any tensor is read)."""
    config_path = os.path.join(path, CONFIG_NAME)
    return IA3Config.from_peft_dict(read_json(config_path), source=config_path)


def write_adapter(path: str, config: IA3Config, tensors: dict, force: bool = False) -> str:
    """Write a PEFT adapter folder atomically. `tensors` are numpy arrays (torch-free) or torch
    tensors (needed for bfloat16 heads), under PEFT's keys; a tensor holding inf or NaN is refused."""
    check_finite(tensors, path)
    with atomic_output_dir(path, force=force) as tmp:
        weights = os.path.join(tmp, WEIGHTS_NAME)
        if any(type(v).__module__.startswith("torch") for v in tensors.values()):
            from safetensors.torch import save_file
        else:
            from safetensors.numpy import save_file
        save_file(tensors, weights, metadata={"format": "pt"})
        write_json(os.path.join(tmp, CONFIG_NAME), config.to_peft_dict(), indent=2, sort_keys=True)
    return path


def _check_tensors(adapter: AdapterFile, weights_path: str) -> None:
    if not adapter.tensors:
        raise IA3Error(f"{weights_path} holds no tensors")
    for key, value in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise IA3Error(f"{weights_path}: key {key!r} does not start with {PREFIX!r}; not a PEFT adapter")
        if key.endswith(VECTOR_SUFFIX):
            if value.ndim != 2 or 1 not in value.shape:
                raise IA3Error(f"{weights_path}: {key} has shape {tuple(value.shape)}; IA3 vectors are (out, 1) or (1, in)")
            if not np.issubdtype(value.dtype, np.floating):
                raise IA3Error(f"{weights_path}: {key} has dtype {value.dtype}; IA3 vectors are floating point")
