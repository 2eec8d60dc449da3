"""The request guard, by path: every request path registered in `runtime.requests.REQUEST_PATHS` (the
Python API, the `generate` command, each served model) gets the hostile requests on one session
whose tokenizer.json panics on some texts and backtracks for ever on others, and must answer each
with one clear refusal (or a bounded answer), then answer the next normal request as before.

The paths are found by importing every module of the packages that hold request paths, so a path
registered later is walked without this file being told."""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil

import pytest

from ia3_export.errors import IA3Error
from ia3_export.runtime.requests import REQUEST_PATHS, Limits
from runtime_helpers import export_once

for package in ("ia3_export.runtime", "ia3_export.serve", "ia3_export.cli"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not info.name.endswith(".__main__"):  # runs the command
            importlib.import_module(info.name)

BACKTRACKS = "(a|aa)+$"  # Oniguruma: a panic ("retry-limit-in-match over") past ~40 a's, minutes on many 30-a runs
NORMAL = "hello world"  # no `a`: the hostile split never matches, so ids equal the clean tokenizer's
LIMITS = Limits(max_text_bytes=64 * 1024, tokenizer_timeout_s=3.0, max_new_tokens=16)
MODELS = {"causal-lm": ("llama", None), "seq2seq-lm": ("t5", None), "seq-cls": ("bert", "seq-cls")}
INT32_MAX = 2**31 - 1

# (case, text, fields, the refusal expected; None: a bounded answer or a refusal, either is right)
HOSTILE = [
    ("20 MB of text", "x" * (20 << 20), {}, r"the prompt has (at least )?20971520 bytes, more than the 65536"),
    ("non-UTF-8 bytes", b"caf\xe9 au lait", {}, r"the prompt is not valid UTF-8 \(byte 0xe9"),
    ("panicking tokenizer", "a" * 40 + "b", {}, r"the tokenizer failed on this request \(PanicException: Onig"),
    ("slow tokenizer", ("a" * 30 + "b ") * 400, {}, r"the tokenizer took longer than 3 s on this request"),
    ("huge max_new_tokens", NORMAL, {"max_new_tokens": INT32_MAX}, None),
    ("negative max_new_tokens", NORMAL, {"max_new_tokens": -1}, r"max.new.tokens"),
    ("negative seed", NORMAL, {"seed": -2}, r"seed"),
    ("huge seed", NORMAL, {"seed": 2**40}, r"seed"),
    ("negative temperature", NORMAL, {"temperature": -1.0}, r"temperature"),
    ("subnormal temperature", NORMAL, {"temperature": 1e-320}, None),
    ("top_p over 1", NORMAL, {"top_p": 2.0}, r"top.p"),
    ("negative top_k", NORMAL, {"top_k": -2}, r"top.k"),
    ("min_p over 1", NORMAL, {"min_p": 1.5}, r"min.p"),
    ("zero repetition_penalty", NORMAL, {"repetition_penalty": 0.0}, r"repetition.penalty"),
    ("huge repetition_penalty", NORMAL, {"repetition_penalty": 1e30}, None),
    ("presence_penalty past 2", NORMAL, {"presence_penalty": 2.5}, r"presence.penalty"),
    ("frequency_penalty below -2", NORMAL, {"frequency_penalty": -2.5}, r"frequency.penalty"),
    ("negative min_new_tokens", NORMAL, {"min_new_tokens": -1}, r"min.new.tokens"),
    ("min_new_tokens past max_new_tokens", NORMAL, {"min_new_tokens": INT32_MAX}, r"min.new.tokens"),
]


def test_every_numeric_field_meets_a_hostile_value():
    """A generating path takes every numeric option (NUMERIC_FIELDS), and each gets a hostile value here."""
    from ia3_export.runtime.requests import NUMERIC_FIELDS

    assert {field for _, _, fields, _ in HOSTILE for field in fields} >= set(NUMERIC_FIELDS)
    for path in REQUEST_PATHS.values():
        assert set(path.fields) in (set(), set(NUMERIC_FIELDS)), path.name


def test_every_served_model_and_the_generate_command_are_registered():
    assert {"IA3Session.generate", "cli generate", "serve generate", "serve generate_stream", "serve classify"} <= set(REQUEST_PATHS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model_dir):
    """family -> (clean export, the same export with a tokenizer that panics or backtracks on a's)."""
    made = {}

    def make(family):
        if family not in made:
            clean = export_once(tmp_path_factory, model_dir(*MODELS[family]), "merged", [])
            hostile = tmp_path_factory.mktemp("hostile-tokenizer") / "onnx"
            shutil.copytree(clean, hostile)
            tok = json.loads((hostile / "tokenizer.json").read_text())
            split = {"type": "Split", "pattern": {"Regex": BACKTRACKS}, "behavior": "Isolated", "invert": False}
            tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, *filter(None, [tok["pre_tokenizer"]])]}
            (hostile / "tokenizer.json").write_text(json.dumps(tok))
            made[family] = clean, str(hostile)
        return made[family]

    return make


PAIRS = [(path, family) for path in sorted(REQUEST_PATHS) for family in REQUEST_PATHS[path].families]


@pytest.mark.parametrize("name, family", PAIRS, ids=[f"{p}-{f}" for p, f in PAIRS])
def test_hostile_requests_are_refused_and_the_next_request_still_answers(folders, name, family):
    path = REQUEST_PATHS[name]
    normal = {"max_new_tokens": 4} if "max_new_tokens" in path.fields else {}
    clean, hostile = folders(family)
    send = path.open(clean, LIMITS)
    try:
        expected = send(NORMAL, **normal)
    finally:
        send.close()
    send = path.open(hostile, LIMITS)
    try:
        assert send(NORMAL, **normal) == expected
        for case, text, fields, refusal in HOSTILE:
            if not set(fields) <= set(path.fields):
                continue
            try:
                send(text, **{**normal, **fields})
            except IA3Error as e:
                message = str(e)
                assert "\n" not in message and (refusal is None or re.search(refusal, message)), (case, message)
            else:
                assert refusal is None, f"{case}: answered instead of refusing"
            assert send(NORMAL, **normal) == expected, f"after {case}"
    finally:
        send.close()


def test_a_slow_adapter_load_does_not_block_requests(tmp_path_factory, model_dir, adapter_dir, monkeypatch):
    """The adapter pool's lock (every request takes it) is not held while an adapter file is read: with a
    read that waits until told (an injected reader), requests for a loaded adapter and the list go on."""
    import threading

    from ia3_export.runtime import IA3Session, adapters as adapter_io
    from ia3_export.serve.adapters import AdapterPool

    first, second = adapter_dir("llama", seed=1), adapter_dir("llama", seed=2)
    pool = AdapterPool(IA3Session(export_once(tmp_path_factory, model_dir("llama"), "swappable", [first])))
    pool.session.load_shipped_adapters()
    (shipped,) = pool.names()
    reading, release = threading.Event(), threading.Event()
    read = adapter_io.read_tensors

    def slow_read(path, folder):
        reading.set()
        release.wait(120)
        return read(path, folder)

    monkeypatch.setattr(adapter_io, "read_tensors", slow_read)
    added = []
    loader = threading.Thread(target=lambda: added.append(pool.add(second, "late")))
    loader.start()
    assert reading.wait(120)
    served = []

    def request():
        pool.acquire(shipped)
        served.append(pool.names())
        pool.release(shipped)

    requester = threading.Thread(target=request, daemon=True)
    requester.start()
    requester.join(60)  # a deadlock detector, not a timing: blocked, it would never end
    assert served == [[shipped]], "a request waited for the adapter being read"
    release.set()
    loader.join(120)
    assert added == ["late"] and pool.names() == sorted([shipped, "late"])
