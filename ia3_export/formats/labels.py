"""A classifier adapter's label names: `labels.json` beside PEFT's two files.

PEFT's adapter format has no place for the class names a head was trained with, and the base
model's config.json often names a bare encoder (MiniLM's says `BertModel`, no `id2label`). So
`train` writes the names to `labels.json` in the adapter folder, in transformers' own layout:

    {"id2label": {"0": "negative", "1": "positive"}}

merge, export and parity read it and build the head with `num_labels`, `id2label` and
`label2id`, so merged and exported config.json files carry the names that pipelines and optimum
show. PEFT ignores the extra file. Without it, the base config's id2label is used when it has
as many labels as the adapter's head has outputs. Torch-free: plain JSON and array shapes.
"""
from __future__ import annotations

import os
import re

from ..errors import IA3Error
from .jsonfile import read_json, write_json
from .reader import present, registers

LABELS_NAME = "labels.json"
# The output layer of a saved classification head (PEFT's `classifier`/`score`, RoBERTa's
# `classifier.out_proj`): its weight has one row per label.
_HEAD_OUTPUT = re.compile(r"(^|\.)(classifier|score)(\.out_proj)?\.weight$")


def write_labels(folder: str, names: list[str]) -> str:
    return write_json(os.path.join(folder, LABELS_NAME), {"id2label": {str(i): name for i, name in enumerate(names)}},
                      indent=2, ensure_ascii=False)


@registers("adapter_dir", (LABELS_NAME, "json"))
def read_labels(adapter_dir: str) -> list[str] | None:
    """The names in an adapter folder's labels.json, by class id; None when there is no such file."""
    path = os.path.join(adapter_dir or "", LABELS_NAME)
    if not adapter_dir or not present(path):  # an adapter built in memory has no folder
        return None
    data = read_json(path)
    id2label = data.get("id2label") if isinstance(data, dict) else None
    if not isinstance(id2label, dict) or not id2label:
        raise IA3Error(f'{path}: expected {{"id2label": {{"0": "name", ...}}}}; fix or delete the file')
    ids = sorted(id2label, key=lambda k: int(k) if str(k).isdigit() else -1)
    names = [id2label[k] for k in ids]
    if ids != [str(i) for i in range(len(ids))]:
        raise IA3Error(f"{path}: id2label keys must be the class ids 0..{len(ids) - 1}, got {', '.join(map(str, ids))}")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise IA3Error(f"{path}: label names must be distinct non-empty strings, got {names}")
    return names


def head_outputs(adapter) -> int | None:
    """How many classes the adapter's saved head predicts (rows of its output weight), if it saves one."""
    rows = {v.shape[0] for k, v in adapter.saved_tensors().items() if _HEAD_OUTPUT.search(k) and v.ndim == 2}
    return rows.pop() if len(rows) == 1 else None


def label_config(adapters: list, base_config: dict) -> dict:
    """from_pretrained overrides (num_labels, id2label, label2id) for the head the adapters trained.

    {} when no adapter saves a head or names labels: the base config's head stands as it is."""
    names, num, source = None, None, None
    for adapter in adapters:
        own, rows = read_labels(adapter.path), head_outputs(adapter)
        if own is not None and rows is not None and len(own) != rows:
            raise IA3Error(f"{os.path.join(adapter.path, LABELS_NAME)}: names {len(own)} labels but the adapter's head "
                           f"has {rows} outputs; fix or delete {LABELS_NAME}")
        if own is not None and names is not None and own != names:
            raise IA3Error(f"adapters {source} and {adapter.path} name different labels ({', '.join(names)} vs "
                           f"{', '.join(own)}); merge or export them separately")
        if own is not None:
            names, source = own, adapter.path
        num = num or (len(own) if own is not None else rows)
    if num is None:
        return {}
    if names is None:
        base = base_config.get("id2label") or {}
        if len(base) != num:
            return {"num_labels": num}
        names = [base[k] for k in sorted(base, key=int)]
    return {"num_labels": num, "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def label_fields(config) -> dict:
    """A classifier config's num_labels, id2label and label2id as config.json stores them (string ids)."""
    id2label = {str(i): name for i, name in sorted((int(k), v) for k, v in config.id2label.items())}
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": {n: int(i) for i, n in id2label.items()}}
