"""Training data per task: read JSONL/CSV rows, check them, tokenize, pad into batches.

Every bad row is reported with its file and line before any output is written. Examples are
tokenized once, unpadded; a batch is padded on the right to its own longest example, so a
causal LM sees the same positions whatever the batch it lands in.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re

import torch

from ..errors import IA3Error
from ..formats.jsonfile import parse_json, shown
from ..formats.reader import read_text
from ..tasks import TASKS as TASK_TABLE, TRAIN_TASKS, task_named

TASKS = {name: TASK_TABLE[name] for name in TRAIN_TASKS}  # the tasks training knows (fields, head, metric)
IGNORE = -100  # label id that the loss skips (padding, prompt tokens)


@dataclasses.dataclass
class Row:
    fields: dict
    where: str  # "file:line", for messages


def check_task(task: str) -> None:
    task_named(task, TRAIN_TASKS)


def read_rows(path: str, task: str) -> list[Row]:
    """Rows of a .jsonl/.json-lines or .csv file, each checked for the fields its task needs."""
    check_task(task)
    if not os.path.lexists(path):
        raise IA3Error(f"data file {path} does not exist; pass a JSONL or CSV file")
    text = read_text(path, "data")  # a regular file within the data cap, UTF-8
    rows = _read_csv(path, text) if path.lower().endswith((".csv", ".tsv")) else _read_jsonl(path, text)
    if not rows:
        raise IA3Error(f"{path}: no rows; the data set is empty")
    choices = TASKS[task].train_fields
    for row in rows:
        if not any(all(_present(row.fields, f) for f in fields) for fields in choices):
            raise IA3Error(_misfit(row, task, choices))
        if TASKS[task].labelled and not _is_label(row.fields["label"]):
            raise IA3Error(f"{row.where}: label is {shown(row.fields['label'])}; a label is a string or a number")
    return rows


def _misfit(row: Row, task: str, choices) -> str:
    """Why a row fits none of its task's field sets: a field of the wrong type where every field is
    there (say which, its type and what is expected), else the fields it lacks."""
    for fields in choices:
        if all(row.fields.get(f) is not None for f in fields):
            for f in fields:
                if not _present(row.fields, f):
                    value = row.fields[f]
                    got = "an empty string" if value == "" else f"{type(value).__name__} {shown(value, 40)}"
                    wanted = "a non-empty string or a number" if f == "label" else "non-empty text (a string)"
                    return f"{row.where}: field '{f}' is {got}; {task} needs '{f}' as {wanted}"
    need = " or ".join(" + ".join(f"'{f}'" for f in fields) for fields in choices)
    have = ", ".join(k if k.isprintable() else repr(k) for k in sorted(row.fields)) or "none"  # one line
    return f"{row.where}: the row needs {need} for {task} (its fields: {have})"


def _is_label(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _present(fields: dict, name: str) -> bool:
    value = fields.get(name)
    return value is not None and (name == "label" or isinstance(value, str)) and value != ""


def _read_jsonl(path: str, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        value = parse_json(line, f"{path}:{number}")
        if not isinstance(value, dict):
            raise IA3Error(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")
        rows.append(Row(value, f"{path}:{number}"))
    return rows


def _read_csv(path: str, text: str) -> list[Row]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    rows = []
    # csv refuses fields over 128 KB by default ("field larger than field limit"): the file's own size
    # bounds every field, and the reader has capped that
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        for fields in reader:
            if None in fields:
                raise IA3Error(f"{path}:{reader.line_num}: more values than the header has columns; quote fields that hold '{delimiter}'")
            rows.append(Row({k: v for k, v in fields.items() if v is not None}, f"{path}:{reader.line_num}"))
    except csv.Error as e:
        raise IA3Error(f"{path}: malformed CSV ({e})") from None
    return rows


def split_rows(rows: list[Row], fraction: float, seed: int, path: str) -> tuple[list[Row], list[Row]]:
    """A held-out evaluation split, the same for a seed."""
    if len(rows) < 2:
        raise IA3Error(f"{path}: only {len(rows)} row; a held-out split needs at least 2 (or pass --eval-data)")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def label_names(train: list[Row], eval_rows: list[Row]) -> list[str]:
    """Label names in a stable order (numeric order for integer labels); eval labels must be known."""
    names = sorted({str(r.fields["label"]) for r in train}, key=_label_order)
    if len(names) < 2:
        raise IA3Error(f"{train[0].where.rsplit(':', 1)[0]}: only one label ({names[0]!r}); classification needs at least 2")
    for row in eval_rows:
        if str(row.fields["label"]) not in names:
            raise IA3Error(f"{row.where}: label {row.fields['label']!r} does not occur in the training data (labels: {', '.join(names)})")
    return names


def _label_order(name: str) -> tuple:
    """Integers first, in numeric order ("-1", "2", "10"), then the other names. Only ASCII digits make an
    integer: str.isdigit also accepts "²", which int() refuses."""
    integer = re.fullmatch(r"-?[0-9]+", name)
    return (integer is None, int(name) if integer else 0, name)


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels, or a class id
    decoder_labels: list[int] | None = None


def encode(rows: list[Row], task: str, tokenizer, max_length: int, labels: list[str] | None = None) -> list[Example]:
    """Tokenize rows for a task; rows left with nothing to learn after truncation are dropped."""
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        f = row.fields
        if task == "text-classification":
            ids = tokenizer(f["text"], truncation=True, max_length=max_length)["input_ids"]
            examples.append(Example(ids, labels.index(str(f["label"]))))
        elif task == "text2text-generation":
            source = tokenizer(f["source"], truncation=True, max_length=max_length)["input_ids"]
            target = _with_eos(tokenizer(text_target=f["target"])["input_ids"], eos)[:max_length]
            examples.append(Example(source, IGNORE, target))
        elif "text" in f and _present(f, "text"):
            ids = _with_eos(tokenizer(f["text"])["input_ids"], eos)[:max_length]
            examples.append(Example(ids, list(ids)))
        else:
            prompt = tokenizer(f["prompt"])["input_ids"]
            completion = _with_eos(tokenizer(f["completion"], add_special_tokens=False)["input_ids"], eos)
            ids = (prompt + completion)[:max_length]
            examples.append(Example(ids, ([IGNORE] * len(prompt) + completion)[:max_length]))
    return [e for e in examples if e.input_ids and _targets(e) > 0]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _targets(example: Example) -> int:
    """How many loss terms an example adds (tokens predicted, or 1 for a class)."""
    if example.decoder_labels is not None:
        return len(example.decoder_labels)
    if isinstance(example.labels, int):
        return 1
    return sum(1 for label in example.labels[1:] if label != IGNORE)  # the first token is never predicted


def count_targets(examples: list[Example]) -> int:
    return sum(_targets(e) for e in examples)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (and decoder labels for seq2seq)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    first = examples[0]
    if first.decoder_labels is not None:
        batch["labels"] = _pad([e.decoder_labels for e in examples], IGNORE)
    elif isinstance(first.labels, int):
        batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        batch["labels"] = _pad([e.labels for e in examples], IGNORE, width)
    return batch


def _pad(rows: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out
