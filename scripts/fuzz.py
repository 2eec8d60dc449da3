#!/usr/bin/env python
"""Fuzz the inputs users hand us: adapter folders (config JSON + safetensors bytes), .onnx_adapter
files and training data files. The only acceptable outcomes are success or one clean IA3Error line;
any other exception, a hang (an alarm per case) or a crash (the process dies) is a bug.

Cases start from valid files and mutate them (byte flips, truncation, forged headers and entries,
random JSON values, random text), so most of them get past the first checks. tests/test_fuzz.py
runs the same targets with a few hundred cases; this script runs thousands:

    .venv/bin/python scripts/fuzz.py [--examples 2000] [--target adapter|onnx_adapter|data] [--seed N]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import string
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
    """Valid inputs to mutate and the API calls that must answer cleanly."""

    def __init__(self, model_dir: str, adapter_dir: str, onnx_dir: str, work: str):
        from ia3_export.loading import load_base_model
        from ia3_export.model import IA3Model
        from ia3_export.runtime import IA3Session
        from ia3_export.runtime.adapters import convert_adapter

        self.work = work
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            self.config = json.load(f)
        with open(os.path.join(adapter_dir, "adapter_model.safetensors"), "rb") as f:
            self.weights = f.read()
        valid = os.path.join(work, "valid.onnx_adapter")
        if not os.path.exists(valid):
            convert_adapter(adapter_dir, onnx_dir, valid)
        with open(valid, "rb") as f:
            self.onnx_adapter_bytes = f.read()
        self.session = IA3Session(onnx_dir)
        self.model = IA3Model(load_base_model(model_dir))
        self.folder = os.path.join(work, "fuzz_adapter")
        os.makedirs(self.folder, exist_ok=True)

    def adapter(self, data) -> None:
        """A PEFT folder: read, loaded into a PyTorch model, loaded into an ONNX Runtime session."""
        from ia3_export.adapter_format import read_adapter

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
        from ia3_export.onnx_adapter import read_onnx_adapter

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


TARGETS = {"adapter": "adapter", "onnx_adapter": "onnx_adapter", "data": "training_data"}


def run(targets: Targets, target: str, examples: int, seed: int | None = None) -> None:
    """Run one target for `examples` cases (hypothesis shrinks and re-raises the first failure)."""
    method = getattr(targets, TARGETS[target])
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                    suppress_health_check=list(HealthCheck))(given(st.data())(lambda data: method(data)))
    if seed is not None:
        from hypothesis import seed as with_seed

        test = with_seed(seed)(test)
    test()


def build(work: str) -> tuple[str, str, str]:
    """A tiny llama, a random adapter and its swappable export (reused when already in work)."""
    from ia3_export.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.loading import load_base_model
    from ia3_export.model import IA3Model
    from ia3_export.tiny import randomize_adapter, save_tiny

    model, adapter, onnx_dir = (os.path.join(work, n) for n in ("model", "adapter", "onnx"))
    if not os.path.isdir(onnx_dir):
        save_tiny(model, "llama")
        ia3 = IA3Model(load_base_model(model), IA3Config())
        randomize_adapter(ia3, "default")
        ia3.save_adapter(adapter)
        export_model(model, onnx_dir, mode="swappable", adapters=[adapter])
    return model, adapter, onnx_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per target")
    parser.add_argument("--target", choices=list(TARGETS), action="append", help="default: all")
    parser.add_argument("--seed", type=int, default=None, help="random cases from this seed (default: derandomized)")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or tempfile.mkdtemp(prefix="fuzz-")
    targets = Targets(*build(work), work)
    for target in args.target or list(TARGETS):
        t = time.perf_counter()
        run(targets, target, args.examples, args.seed)
        print(f"{target}: {args.examples} cases, all clean ({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
