"""Adapters for an exported model: from a PEFT folder, an .onnx_adapter file, or a name shipped
in the folder; checked against the model's vector inputs before anything is bound.

The checks live here once and serve both the session (loading) and `convert` (writing files).
Names are plain identifiers, so a name coming from a request can never reach outside the
folder's `adapters/` directory.
"""
from __future__ import annotations

import os

import numpy as np

from ..formats.adapter_format import CONFIG_NAME, VECTOR_SUFFIX, read_adapter, read_config
from ..formats.adapter_names import check_name, name_for
from ..errors import IA3Error, quoted
from ..core.loading import check_task
from ..formats.atomic import check_finite, check_output
from ..formats.onnx_adapter import SUFFIX, read_onnx_adapter, write_onnx_adapter
from ..formats.reader import present
from .folder import ExportedFolder, open_folder


def is_path(source: str) -> bool:
    """A source names a file or folder only when it clearly does: a path separator or the file suffix."""
    separators = {"/", os.sep, os.altsep} - {None}
    return any(s in source for s in separators) or source.endswith(SUFFIX)


def resolve(folder: ExportedFolder, source: str) -> tuple[str, str]:
    """(name, path) for a source that is a PEFT folder, an .onnx_adapter file or a shipped name.

    A bare word is a shipped name, even where the current directory holds a folder called the
    same: what runs never depends on where the command was started. A bare word that is not
    shipped but exists here is refused with the spelling that means the path (`./NAME`)."""
    if is_path(source):
        if not present(source):
            raise IA3Error(f"adapter {quoted(source)} does not exist; pass a PEFT adapter folder or an {SUFFIX} file")
        return name_for(source), source
    shipped = ", ".join(sorted(folder.adapters)) or "none"
    if source in folder.adapters:
        check_name(source)
        return source, folder.adapter_file(source)
    if present(source):
        raise IA3Error(f"adapter {quoted(source)} is not shipped in {folder.path} (shipped: {shipped}) but names "
                       f"a path here; pass ./{source} to load that path")
    raise IA3Error(f"adapter {quoted(source)} is neither a PEFT folder, an {SUFFIX} file, nor an adapter shipped "
                   f"in {folder.path} (shipped: {shipped})")


def max_bytes(folder: ExportedFolder) -> int:
    """The most bytes an adapter for this model can need: every vector in float64, plus each name and
    the file format's bookkeeping. A larger file is refused before it is read."""
    return sum(8 * spec.dim + len(name) + 256 for name, spec in folder.vectors.items()) + 4096


def read_tensors(path: str, folder: ExportedFolder) -> dict[str, np.ndarray]:
    """Input name -> array of an adapter, as stored (PEFT keys become input names)."""
    if os.path.isdir(path):
        if not present(os.path.join(path, CONFIG_NAME)):
            raise IA3Error(f"{path} is a folder without {CONFIG_NAME}; pass a PEFT adapter folder or an {SUFFIX} file")
        check_task(folder.task, read_config(path).task_type, path, source="the export's task",  # before any tensor
                   hint=f"use an adapter trained for the task {folder.path} was exported for")
        adapter = read_adapter(path, max_bytes(folder))
        tensors = {module + VECTOR_SUFFIX: v for module, v in adapter.vectors().items()}
        saved = adapter.saved_tensors()
        if saved:
            taken = set(folder.vectors)
            extra = sorted(k for k in saved if k not in taken)
            if extra:
                raise IA3Error(
                    f"{path} carries full tensors ({', '.join(extra[:3])}) from modules_to_save; an exported model "
                    "takes only IA3 vectors as inputs. Export this adapter merged (ia3-export export --mode merged)"
                )
            tensors.update(saved)
        return tensors
    if path.endswith(SUFFIX):
        return read_onnx_adapter(path, max_bytes(folder))
    raise IA3Error(f"{path}: not an adapter (expected a PEFT adapter folder or an {SUFFIX} file)")


def check_tensors(tensors: dict[str, np.ndarray], folder: ExportedFolder, source: str) -> dict[str, np.ndarray]:
    """Validate names, shapes and dtype against the model's vectors; return input name -> [dim] arrays
    in the model's float type. A mismatch means an adapter trained with other targets or for another model."""
    specs = folder.vectors
    if not specs:
        raise IA3Error(f"{folder.path} is a {folder.mode} export without vector inputs; adapters cannot be loaded "
                       "into it. Export with --mode swappable or --mode bank to switch adapters")
    out = {}
    for name, value in tensors.items():
        spec = specs.get(name)
        if spec is None:
            known = next(iter(sorted(specs)))
            raise IA3Error(
                f"{source}: {name} is not a vector input of {folder.path} (it takes e.g. {known}); the adapter was "
                "trained with other target_modules or for another model"
            )
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            raise IA3Error(f"{source}: {name} has dtype {value.dtype}; IA3 vectors are floating point")
        if value.size != spec.dim or (value.ndim > 1 and max(value.shape) != value.size):
            raise IA3Error(
                f"{source}: {name} has shape {tuple(value.shape)} but {folder.path} expects {spec.dim} values; "
                "the adapter was trained for another model (other hidden sizes)"
            )
        check_finite({name: value}, source, folder.dtype)  # as stored: 1e5 is inf in float16
        out[name] = value.reshape(-1).astype(folder.dtype)
    return out


def load_vectors(folder: ExportedFolder, source: str) -> tuple[str, str, dict[str, np.ndarray]]:
    """(name, path, input name -> checked [dim] array) for any adapter source."""
    name, path = resolve(folder, source)
    return name, path, check_tensors(read_tensors(path, folder), folder, path)


def complete(vectors: dict[str, np.ndarray], folder: ExportedFolder) -> dict[str, np.ndarray]:
    """Every vector of the model: the adapter's own, ones (identity) for those it does not set."""
    return {name: vectors.get(name, np.ones(spec.dim, dtype=folder.dtype))
            for name, spec in folder.vectors.items()}


def file_shape(folder: ExportedFolder, name: str) -> tuple[int, ...]:
    """Shape in an .onnx_adapter file: the input's own ([dim], or [1, dim] for a bank, so ONNX Runtime's
    own adapter API runs a bank export with adapter_ids = 0)."""
    dim = folder.vectors[name].dim
    return (1, dim) if folder.stacked else (dim,)


def convert_adapter(adapter_dir: str, model_dir: str, out: str, force: bool = False) -> dict:
    """Write a PEFT adapter as an .onnx_adapter file for the exported model in `model_dir`, after
    checking its task_type against the export's task and every vector's name, shape and dtype
    against the model's inputs. The file works with
    ONNX Runtime's own `LoraAdapter` + `RunOptions.add_active_adapter`, without ia3-export."""
    check_output(out, force, inputs=[adapter_dir, model_dir], kind="file")
    if not out.endswith(SUFFIX):
        raise IA3Error(f"output {out} should end with {SUFFIX} (ONNX Runtime's adapter file)")
    folder = open_folder(model_dir)
    if not os.path.isdir(adapter_dir):
        raise IA3Error(f"adapter folder {adapter_dir} does not exist (expected a PEFT adapter folder)")
    vectors = check_tensors(read_tensors(adapter_dir, folder), folder, adapter_dir)
    tensors = {name: v.reshape(file_shape(folder, name)) for name, v in vectors.items()}
    write_onnx_adapter(out, tensors, force=force, inputs=[adapter_dir, model_dir])
    return {"out": out, "vectors": len(tensors), "model_vectors": len(folder.vectors), "dtype": folder.dtype}
