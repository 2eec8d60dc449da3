#!/usr/bin/env python
"""Fuzz the inputs users hand us: adapter folders (config JSON + safetensors bytes), .onnx_adapter
files, training data files, exported folders' manifests, model configs, tokenizer files and
safetensors headers, and every reader registered with formats/reader.py (`registers`). The only
acceptable outcomes are success or one clean IA3Error line; any other exception (MemoryError
included), a hang (an alarm per case) or a crash (the process dies) is a bug.

Byte-level cases start from valid files and mutate them (flips, truncation, forged headers and
entries, random JSON values, random text), so most of them get past the first checks. The
manifest and safetensors targets are structure-aware: they build the document field by field
(hostile values where ints, names and paths go, shapes that overflow int64, ranges that overlap,
nesting bombs) and the run is capped with RLIMIT_AS (--memory-mb above what the process already
maps), so a header that decides how much memory is used fails the run instead of the machine.
A safetensors file our reader accepts must read the same through the `safetensors` library.
The config and tokenizer targets edit config.json / tokenizer_config.json / tokenizer.json field by
field (hostile sizes, wrong types, nested sub-configs, huge strings, nesting bombs) and feed each
registered reader that reads that file; the `readers` target mutates, for EVERY registered reader,
each file it declares (bytes, or JSON trees), so a reader registered later is fuzzed untold.
tests/formats/test_fuzz.py runs the same targets with a few hundred cases; this script runs thousands,
or as many as fit in --seconds (CI: a bounded run under a memory cap):

    .venv/bin/python scripts/fuzz.py [--examples 2000] [--seconds S] [--target adapter|onnx_adapter|data|manifest|
                                     config|tokenizer|readers|safetensors] [--seed N] [--memory-mb 1024]
                                     [--onnx EXPORTED_FOLDER]
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import resource
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ia3_export.errors import IA3Error

HANG_SECONDS = 30
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
NAMES = st.sampled_from(["../../escape", "/abs", "base_model.model.", "base_model.model.model.layers.0.self_attn.k_proj.ia3_l",
                         "base_model.model.model.layers.9.mlp.down_proj.ia3_l", "base_model.model.score.weight",
                         "__metadata__", "", "a" * 300]) | st.text(max_size=30)


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I8", "BOOL", "U8", "F8_E4M3"]


class Hang(Exception):
    pass


def mutate_bytes(data, raw: bytes) -> bytes:
    """A damaged copy of raw: flipped bytes, a cut, an insertion, a forged length, or random bytes."""
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "length", "random", "keep"]))
    if op == "flip" and raw:
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
        return bytes(out)
    if op == "truncate":
        return raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))]
    if op == "insert":
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=64)) + raw[at:]
    if op == "length":
        return data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + raw[8:]
    if op == "random":
        return data.draw(st.binary(max_size=512))
    return raw


def mutate_json(data, value):
    """A changed copy of a JSON object: a key dropped or set to a random value, or another value."""
    op = data.draw(st.sampled_from(["drop", "set", "replace", "keep"]))
    if op in ("drop", "set") and isinstance(value, dict) and value:
        value = dict(value)
        key = data.draw(st.sampled_from(sorted(value)))
        if op == "drop":
            del value[key]
        else:
            value[key] = data.draw(JSON | st.lists(NAMES, max_size=3) | NAMES)
        return value
    if op == "replace":
        return data.draw(JSON)
    return value


def forge_safetensors(data, raw: bytes) -> bytes:
    """A safetensors file whose header (entries, dtypes, shapes, offsets, names) was edited."""
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "rename", "add", "drop"]))
        name = data.draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):  # gone or already replaced by an earlier edit
            continue
        if op == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(DTYPES) | JSON)
        elif op == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(-2, 2**40), max_size=4) | JSON)
        elif op == "offsets":
            entry["data_offsets"] = data.draw(st.lists(st.integers(-8, 2**62), min_size=2, max_size=2) | JSON)
        elif op == "entry":
            header[name] = data.draw(JSON)
        elif op == "rename":
            header[data.draw(NAMES)] = header.pop(name)
        elif op == "add":
            header[data.draw(NAMES)] = dict(entry)
        elif op == "drop":
            del header[name]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _write(path: str, raw: bytes) -> None:
    with open(path, "wb") as f:
        f.write(raw)


def clean(fn) -> None:
    """Run fn: success and IA3Error (one line) pass; anything else propagates as the bug it is."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        fn()
    except IA3Error as e:
        text = str(e)
        assert text and "\n" not in text and "Traceback" not in text, f"unclear error: {text!r}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _alarm(*_):
    raise Hang(f"no answer in {HANG_SECONDS} s")


class Targets:
    """Valid inputs to mutate and the API calls that must answer cleanly. What a target needs is
    built on first use, so the manifest and safetensors targets run without a PyTorch model."""

    def __init__(self, model_dir: str | None, adapter_dir: str | None, onnx_dir: str, work: str):
        self.model_dir, self.adapter_dir, self.onnx_dir, self.work = model_dir, adapter_dir, onnx_dir, work
        self.folder = os.path.join(work, "fuzz_adapter")
        os.makedirs(self.folder, exist_ok=True)

    @functools.cached_property
    def config(self) -> dict:
        with open(os.path.join(self.adapter_dir, "adapter_config.json")) as f:
            return json.load(f)

    @functools.cached_property
    def weights(self) -> bytes:
        with open(os.path.join(self.adapter_dir, "adapter_model.safetensors"), "rb") as f:
            return f.read()

    @functools.cached_property
    def onnx_adapter_bytes(self) -> bytes:
        from ia3_export.runtime.adapters import convert_adapter

        valid = os.path.join(self.work, "valid.onnx_adapter")
        if not os.path.exists(valid):
            convert_adapter(self.adapter_dir, self.onnx_dir, valid)
        with open(valid, "rb") as f:
            return f.read()

    @functools.cached_property
    def session(self):
        from ia3_export.runtime import IA3Session

        return IA3Session(self.onnx_dir)

    @functools.cached_property
    def model(self):
        from ia3_export.core.loading import load_base_model
        from ia3_export.core.model import IA3Model

        return IA3Model(load_base_model(self.model_dir))

    @functools.cached_property
    def export(self) -> tuple[str, dict]:
        """A private copy of the exported folder (its manifest is rewritten per case) and its manifest;
        `link` inside it is a symlink to the original folder, a way out that only realpath sees."""
        copy = os.path.join(self.work, "fuzz_export")
        if not os.path.isdir(copy):
            shutil.copytree(self.onnx_dir, copy)
            os.symlink(os.path.abspath(self.onnx_dir), os.path.join(copy, "link"))
        with open(os.path.join(self.onnx_dir, "ia3_export.json")) as f:
            return copy, json.load(f)

    def adapter(self, data) -> None:
        """A PEFT folder: read, loaded into a PyTorch model, loaded into an ONNX Runtime session."""
        from ia3_export.formats.adapter_format import read_adapter

        config = mutate_json(data, self.config)
        config_raw = json.dumps(config).encode() if data.draw(st.booleans()) else mutate_bytes(data, json.dumps(config).encode())
        weights = forge_safetensors(data, self.weights) if data.draw(st.booleans()) else mutate_bytes(data, self.weights)
        _write(os.path.join(self.folder, "adapter_config.json"), config_raw)
        _write(os.path.join(self.folder, "adapter_model.safetensors"), weights)
        clean(lambda: read_adapter(self.folder))
        clean(self._load_into_model)
        clean(lambda: self.session.unload_adapter(self.session.load_adapter(self.folder, name="fuzz")))

    def _load_into_model(self) -> None:
        name = self.model.load_adapter(self.folder, name="fuzz")
        self.model.delete_adapter(name)

    def onnx_adapter(self, data) -> None:
        """An .onnx_adapter file: read, and loaded into a session (names, shapes, dtypes checked)."""
        from ia3_export.formats.onnx_adapter import read_onnx_adapter

        path = os.path.join(self.work, "fuzz.onnx_adapter")
        _write(path, mutate_bytes(data, self.onnx_adapter_bytes))
        clean(lambda: read_onnx_adapter(path))
        clean(lambda: self.session.unload_adapter(self.session.load_adapter(path, name="fuzz")))

    def training_data(self, data) -> None:
        """A JSONL or CSV file: rows read and checked for a task, split, labelled."""
        from ia3_export.train import data as D

        suffix = data.draw(st.sampled_from([".jsonl", ".csv", ".tsv", ".txt"]))
        task = data.draw(st.sampled_from([*D.TASKS, "summarize"]))
        fields = ["text", "label", "prompt", "completion", "source", "target"]
        if suffix in (".csv", ".tsv"):
            sep = "," if suffix == ".csv" else "\t"
            header = data.draw(st.lists(st.sampled_from(fields) | st.text(string.printable, max_size=6), max_size=4))
            lines = [sep.join(header)] + data.draw(st.lists(st.text(max_size=40), max_size=8))
            raw = "\n".join(lines).encode()
        else:
            rows = data.draw(st.lists(st.dictionaries(st.sampled_from(fields) | st.text(max_size=5), JSON, max_size=4)
                                      | JSON, max_size=8))
            raw = "\n".join(json.dumps(r) for r in rows).encode()
        raw = mutate_bytes(data, raw) if data.draw(st.booleans()) else raw
        path = os.path.join(self.work, "fuzz_data" + suffix)
        _write(path, raw)

        def read():
            rows = D.read_rows(path, task)
            train, evaluation = D.split_rows(rows, 0.25, 0, path) if len(rows) > 1 else (rows, [])
            if task == "text-classification":
                D.label_names(train, evaluation)

        clean(read)


    def manifest(self, data) -> None:
        """An exported folder whose manifest was edited field by field: opened, described, served."""
        folder, valid = self.export
        raw = data.draw(st.sampled_from(["tree", "tree", "tree", "bomb"]))
        text = depth_bomb(data.draw) if raw == "bomb" else json.dumps(mutate_tree(data, valid, MANIFEST_VALUES))
        _write(os.path.join(folder, "ia3_export.json"), text.encode())
        clean(lambda: _serve(folder))

    def safetensors(self, data) -> None:
        """A safetensors file built entry by entry with hostile dtypes, shapes, ranges and bombs."""
        from ia3_export.formats.safetensors_io import read_safetensors

        path = os.path.join(self.work, "fuzz.safetensors")
        raw, zeros = data.draw(safetensors_files())
        _write(path, raw)
        os.truncate(path, len(raw) + zeros)  # zero bytes added by the file system, not held by hypothesis
        clean(lambda: _agrees_with_safetensors(path, read_safetensors(path)))

    # -- model configs, tokenizer files, and every registered reader --------------------------------
    @functools.cached_property
    def samples(self) -> dict[str, str]:
        """A valid example of each argument kind a registered reader takes (reader.ARGUMENTS); kinds
        this run has nothing for (no model without torch) are left out, and their readers skipped."""
        from ia3_export.formats import reader

        folder, _ = self.export
        out = {"export_dir": folder, "graph_file": os.path.join(folder, "model.onnx")}
        json_file = os.path.join(self.work, "sample.json")
        _write(json_file, b'{"a": [1, 2, {"b": "c"}]}')
        out["json_file"] = json_file
        shipped = [os.path.join(folder, "adapters", f) for f in sorted(os.listdir(os.path.join(folder, "adapters")))]
        if shipped:
            out["onnx_adapter_file"] = shipped[0]
        model = self.model_dir or self.export_model_dir
        out["model_dir"] = model
        if self.adapter_dir:
            out["adapter_dir"] = self.adapter_dir
            out["safetensors_file"] = os.path.join(self.adapter_dir, "adapter_model.safetensors")
        return {k: v for k, v in out.items() if k in reader.ARGUMENTS}

    @functools.cached_property
    def export_model_dir(self) -> str:
        """Without a model folder (torch-free runs): the export's own JSON files stand in for one, which
        is all the torch-free model readers read (config.json, generation and tokenizer files)."""
        folder = os.path.join(self.work, "model_from_export")
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
                if os.path.exists(os.path.join(self.onnx_dir, name)):
                    shutil.copy(os.path.join(self.onnx_dir, name), folder)
        return folder

    @functools.cached_property
    def readers(self) -> list:
        """(reader, argument sample) for every registered reader this run has a sample for."""
        import importlib
        import pkgutil

        import ia3_export
        from ia3_export.formats import reader

        for module in pkgutil.walk_packages(ia3_export.__path__, "ia3_export."):
            if not module.name.endswith("__main__") and not module.name.startswith(("ia3_export.cli", "ia3_export.serve")):
                try:
                    importlib.import_module(module.name)
                except ImportError:  # torch-free runs: modules that need torch register nothing here
                    pass
        return [(entry, self.samples[entry.argument]) for _, entry in sorted(reader.READERS.items())
                if entry.argument in self.samples]

    def feed(self, data, names: tuple[str, ...] | None, mutate) -> None:
        """Replace one file a registered reader declares (any, or one of `names`) in a private copy of
        its argument with mutate(valid bytes), and call the reader: success or one IA3Error line."""
        cases = [(entry, sample, file, kind) for entry, sample in self.readers for file, kind in entry.files
                 if names is None or file in names]
        if not cases:
            return
        entry, sample, file, kind = data.draw(st.sampled_from(cases))
        copy = os.path.join(self.work, "fed")
        if os.path.lexists(copy):
            shutil.rmtree(copy) if os.path.isdir(copy) and not os.path.islink(copy) else os.remove(copy)
        if os.path.isdir(sample):
            shutil.copytree(sample, copy, symlinks=True)
            target = os.path.join(copy, file)
        else:
            target = copy = copy + os.path.splitext(sample)[1]
            shutil.copy(sample, copy)
        original = b""
        if os.path.isfile(target):
            with open(target, "rb") as f:
                original = f.read()
        _write(target, mutate(data, original, kind, file))
        clean(lambda: entry.function(copy))

    def model_config(self, data) -> None:
        """config.json edited field by field: read where a model folder's and an export's are read."""
        self.feed(data, ("config.json",), lambda d, raw, kind, file: _json_case(d, raw, CONFIG_VALUES))

    def tokenizer(self, data) -> None:
        """tokenizer_config.json / tokenizer.json: nested, huge, wrong types, bombs."""
        self.feed(data, TOKENIZER_FILES, lambda d, raw, kind, file: _json_case(d, raw, TOKENIZER_VALUES))

    def registered(self, data) -> None:
        """Any file of any registered reader: JSON trees edited, or bytes flipped, cut, forged."""
        def mutate(d, raw, kind, file):
            if kind in ("json", "tokenizer") and d.draw(st.booleans()):
                return _json_case(d, raw, MANIFEST_VALUES)
            return mutate_bytes(d, raw)
        self.feed(data, None, mutate)


def _serve(folder: str) -> None:
    """What the runtime does with a folder: open, describe (inspect), token ids, a session, one token."""
    from ia3_export.runtime.inspect import export_summary
    from ia3_export.runtime import IA3Session, open_folder

    opened = open_folder(folder)
    export_summary(folder)
    opened.eos_ids(), opened.pad_id()
    session = IA3Session(opened)
    if "model" in session.graphs:
        session.generate("a b", max_new_tokens=1)


def _agrees_with_safetensors(path: str, ours: dict) -> None:
    """A file our reader accepts opens in the safetensors library (the reference) with the same
    names, and every tensor numpy can hold reads the same (numpy has no bfloat16; ours widens it)."""
    import numpy as np
    from safetensors import safe_open

    with open(path, "rb") as f:  # accepted by our reader, so its header is a small valid JSON object
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    dtypes = {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    with safe_open(path, framework="numpy") as f:
        assert set(f.keys()) == set(ours), (sorted(f.keys()), sorted(ours))
        for name in ours:
            if dtypes[name] != "BF16":
                theirs = f.get_tensor(name)
                assert theirs.shape == ours[name].shape and np.array_equal(theirs, ours[name], equal_nan=True), name


HOSTILE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**32 + 16, 2**63, 2**64 + 1, 10**30, 500_000_000, 16, 64])
PATHS = st.sampled_from(["model.onnx", "../onnx/model.onnx", "/etc/hostname", "link/model.onnx", "adapters/../model.onnx",
                         "", ".", "adapters", "nul\0.onnx", "fold.onnx", "adapters/adapter.onnx_adapter", "a" * 300])
MANIFEST_VALUES = (JSON | HOSTILE_INTS | PATHS | NAMES | st.sampled_from(["1", "abc", 1.5, 1e300, True, [], {}, [16], ["x"]])
                   | st.lists(HOSTILE_INTS, max_size=3))


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
CONFIG_VALUES = (HOSTILE_INTS | st.sampled_from(["2048", "abc", 1.5, 1e300, True, None, [], {}, [16], {"vocab_size": 0},
                                                 {"num_attention_heads": "8"}, {"text_config": "x"}, 10**12, 0, -5])
                 | JSON)
TOKENIZER_VALUES = (JSON | st.sampled_from(["a" * 1_000_000, "{" * 5000, 10**30, None, [], {}, [[["x"]]], True, -1])
                    | st.lists(st.text(max_size=5), max_size=50) | st.dictionaries(st.text(max_size=8), JSON, max_size=20))


def _json_case(data, raw: bytes, leaves) -> bytes:
    """A valid JSON file edited as a tree (mostly), a nesting bomb, a duplicate key, or another file."""
    op = data.draw(st.sampled_from(["tree", "tree", "tree", "bomb", "duplicate", "other"]))
    try:
        valid = json.loads(raw) if raw else {}
    except ValueError:
        valid = {}
    if op == "bomb":
        return depth_bomb(data.draw).encode()
    if op == "duplicate" and isinstance(valid, dict) and valid:
        key = data.draw(st.sampled_from(sorted(valid)))
        return json.dumps(valid)[:-1].encode() + b", " + json.dumps({key: data.draw(leaves)})[1:].encode()
    if op == "other":
        return json.dumps(data.draw(leaves)).encode()
    return json.dumps(mutate_tree(data, valid, leaves)).encode()


def mutate_tree(data, value, leaves, depth: int = 0):
    """A copy of a JSON document with 1-3 edits at random places: a value replaced by a hostile one,
    a key dropped, a list entry duplicated, or a nested bomb."""
    for _ in range(data.draw(st.integers(1, 3))):
        value = _edit(data, value, leaves, depth)
    return value


def _edit(data, value, leaves, depth: int):
    if isinstance(value, dict) and value and (depth == 0 or data.draw(st.integers(0, 3)) > 0):
        key = data.draw(st.sampled_from(sorted(value)))
        op = data.draw(st.sampled_from(["descend", "descend", "descend", "drop"]))
        out = dict(value)
        if op == "drop":
            del out[key]
        else:
            out[key] = _edit(data, value[key], leaves, depth + 1)
        return out
    if isinstance(value, list) and value and (depth == 0 or data.draw(st.integers(0, 3)) > 0):
        i = data.draw(st.integers(0, len(value) - 1))
        op = data.draw(st.sampled_from(["descend", "descend", "duplicate", "drop"]))
        out = list(value)
        if op == "duplicate":
            out.append(value[i])
        elif op == "drop":
            del out[i]
        else:
            out[i] = _edit(data, value[i], leaves, depth + 1)
        return out
    if data.draw(st.integers(0, 15)) == 0:
        return json.loads("[" * 60 + "]" * 60)  # deep, yet within what the reader accepts
    return data.draw(leaves)


def depth_bomb(draw) -> str:
    """JSON nested past the reader's limit (up to 200,000 levels), arrays or objects with a string of
    brackets that does not count, under a valid-looking prefix. `draw` is hypothesis's draw."""
    depth = draw(st.sampled_from([65, 1000, 200_000]))
    inner = ('{"a":' * depth + '"]]]"' + "}" * depth) if draw(st.booleans()) else "[" * depth + "]" * depth
    return '{"format": "ia3-export", "graphs": ' + inner + "}"


# Bytes per value of the format's dtypes, written from its specification, not taken from the reader
# under test (so the fuzzer runs against an older reader too).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@st.composite
def safetensors_files(draw) -> tuple[bytes, int]:
    """A safetensors file: consistent entries first, then 0-3 forgeries of the header or the data.
    Returns the bytes and a count of zero bytes to append (large values drawn here stay in
    hypothesis's memory, so the bomb's 4 MB of zeros are appended when the file is written)."""
    entries, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        entries[draw(NAMES) + str(i)] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data, zeros = draw(st.binary(min_size=offset, max_size=offset)), 0
    header: dict = dict(entries)
    names = sorted(entries)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["shape", "offsets", "dtype", "overlap", "hole", "trailing", "truncate",
                                   "metadata", "entry", "bomb", "overlap_bomb", "depth_bomb"]))
        name = draw(st.sampled_from(names)) if names else None
        entry = header.get(name) if name else None
        if op == "shape" and isinstance(entry, dict):  # overflowing, wrapping, negative, long or junk shapes
            entry["shape"] = draw(st.lists(HOSTILE_INTS | st.integers(-2, 2**64), max_size=20) | JSON)
        elif op == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(HOSTILE_INTS | st.integers(-8, 2**64), min_size=0, max_size=3) | JSON)
        elif op == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from([*DTYPE_SIZES, "F4", "f32"]) | JSON)
        elif op == "overlap" and isinstance(entry, dict):
            header[name + ".again"] = dict(entry)
        elif op == "hole":
            data += b"\0" * draw(st.integers(1, 16))
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
                entry["data_offsets"] = [o + 8 if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif op == "trailing":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "truncate" and data:
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif op == "metadata":
            header["__metadata__"] = draw(JSON)
        elif op == "entry" and name:
            header[name] = draw(JSON)
        elif op == "overlap_bomb":  # 400 entries on one 4 MB range: 1.6 GB if each were copied
            header = {f"bomb{i}": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 1024**2]}
                      for i in range(400)}
            data, zeros = b"", 4 * 1024**2
        elif op == "bomb":  # a huge declared tensor over a small file
            header = {"big": {"dtype": "F32", "shape": [draw(HOSTILE_INTS), 1024], "data_offsets": [0, len(data)]}}
    text = depth_bomb(draw) if draw(st.integers(0, 20)) == 0 else json.dumps(header)
    return len(text.encode()).to_bytes(8, "little") + text.encode() + data, zeros


TARGETS = {"adapter": "adapter", "onnx_adapter": "onnx_adapter", "data": "training_data", "manifest": "manifest",
           "config": "model_config", "tokenizer": "tokenizer", "readers": "registered", "safetensors": "safetensors"}
TORCH_FREE = ("manifest", "config", "tokenizer", "readers", "safetensors")  # need only an exported folder


def run(targets: Targets, target: str, examples: int, seed: int | None = None) -> None:
    """Run one target for `examples` cases (hypothesis shrinks and re-raises the first failure)."""
    method = getattr(targets, TARGETS[target])
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                    suppress_health_check=list(HealthCheck))(given(st.data())(lambda data: method(data)))
    if seed is not None:
        from hypothesis import seed as with_seed

        test = with_seed(seed)(test)
    test()


def run_for(targets: Targets, target: str, examples: int, seconds: float | None, seed: int | None = None) -> int:
    """`run` for `examples` cases, or, with `seconds`, in batches from successive seeds until either
    runs out (a bounded CI run). Returns how many cases ran."""
    if seconds is None:
        run(targets, target, examples, seed)
        return examples
    start, done, batch = time.monotonic(), 0, 0
    while done < examples and time.monotonic() - start < seconds:
        count = min(50, examples - done)
        run(targets, target, count, (seed or 0) + batch)
        done, batch = done + count, batch + 1
    return done


def build(work: str) -> tuple[str, str, str]:
    """A tiny llama, a random adapter and its swappable export (reused when already in work)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    model, adapter, onnx_dir = (os.path.join(work, n) for n in ("model", "adapter", "onnx"))
    if not os.path.isdir(onnx_dir):
        save_tiny(model, "llama")
        ia3 = IA3Model(load_base_model(model), IA3Config())
        randomize_adapter(ia3, "default")
        ia3.save_adapter(adapter)
        export_model(model, onnx_dir, mode="swappable", adapters=[adapter])
    return model, adapter, onnx_dir


M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
NEEDS = {"adapter": ("config", "weights", "model", "session"), "onnx_adapter": ("onnx_adapter_bytes", "session"),
         "data": (), "manifest": ("export", "session"), "config": ("export", "readers"),
         "tokenizer": ("export", "readers"), "readers": ("export", "readers"), "safetensors": ()}


def prepare(targets: Targets, names: list[str]) -> None:
    """Build what the targets use and import what they import, before the memory cap is set."""
    import safetensors.numpy  # noqa: F401  (the reference reader)

    import ia3_export.runtime.inspect  # noqa: F401
    if any(n not in TORCH_FREE for n in names):
        import ia3_export.train.data  # noqa: F401  (imports torch)
    for name in names:
        for attribute in NEEDS[name]:
            getattr(targets, attribute)


def mapped_bytes() -> int:
    """The address space this process maps now (VmSize)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def limit_memory(headroom_mb: int) -> int:
    """Cap this process's address space at what it maps now plus headroom_mb (RLIMIT_AS): an
    allocation a forged header asks for raises MemoryError (a failed case) instead of swapping the
    machine to a halt. Returns the cap in bytes.

    glibc reserves 64 MB of address space for each new malloc arena (one per thread, up to 8 per
    core), and every ONNX Runtime session starts threads: without a cap on arenas, thousands of
    sessions exhaust the address space with nothing allocated (measured: +290 MB per 300 sessions)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
    except OSError:  # not glibc: no arenas to cap
        pass
    cap = mapped_bytes() + headroom_mb * 1024**2
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per target")
    parser.add_argument("--seconds", type=float, default=None, help="stop each target after about this long")
    parser.add_argument("--target", choices=list(TARGETS), action="append", help="default: all")
    parser.add_argument("--seed", type=int, default=None, help="random cases from this seed (default: derandomized)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space allowed above the start-up's")
    parser.add_argument("--onnx", default=None, help="an exported swappable folder (torch-free targets only)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = args.target or list(TARGETS)
    work = args.work or tempfile.mkdtemp(prefix="fuzz-")
    if len(names) > 1:  # a child per target: each its own address space under its own cap, no torch where none is needed
        onnx = args.onnx or (build(work)[2] if any(n in TORCH_FREE for n in names) else None)
        for name in names:
            command = [sys.executable, __file__, "--target", name, "--examples", str(args.examples), "--work", work,
                       *(["--seconds", str(args.seconds)] if args.seconds is not None else []),
                       "--memory-mb", str(args.memory_mb), *(["--seed", str(args.seed)] if args.seed is not None else []),
                       *(["--onnx", onnx] if name in TORCH_FREE else [])]
            if subprocess.run(command).returncode:
                return 1
        return 0
    if args.onnx:
        if any(n not in TORCH_FREE for n in names):
            parser.error(f"--onnx serves only the {', '.join(TORCH_FREE)} targets")
        targets = Targets(None, None, args.onnx, work)
    else:
        targets = Targets(*build(work), work)
    prepare(targets, names)
    cap = limit_memory(args.memory_mb)
    print(f"address space capped at {cap / 1024**3:.2f} GiB", flush=True)
    for target in names:
        t = time.perf_counter()
        done = run_for(targets, target, args.examples, args.seconds, args.seed)
        print(f"{target}: {done} cases, all clean ({time.perf_counter() - t:.0f} s, "
              f"address space {mapped_bytes() / 1024**3:.2f} GiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
