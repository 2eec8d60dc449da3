"""A tokenizer.json that panics (Oniguruma's retry limit: pyo3's PanicException, a BaseException) once
stopped the server for good: later requests timed out and SIGTERM no longer stopped it. Now the
tokenizer runs in child processes: the panicking request gets one error, the next request is answered
as before, and SIGTERM still drains and stops the server."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import folder

from ia3_export.serve import ServeClient, ServeError
from ia3_export.serve.process import ServerProcess

NORMAL = "hello world"  # no `a`: the hostile split never matches


def test_a_panicking_tokenizer_costs_one_request_and_the_server_still_stops(tmp_path):
    onnx = tmp_path / "onnx"
    shutil.copytree(folder("llama-merged"), onnx)
    tok = json.loads((onnx / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, *filter(None, [tok["pre_tokenizer"]])]}
    (onnx / "tokenizer.json").write_text(json.dumps(tok))
    server = ServerProcess(str(onnx), "--drain-timeout", "10", "--tokenizer-timeout", "5",
                           log_path=str(tmp_path / "server.log"))
    try:
        with ServeClient(server.url, timeout=60) as client:
            before = client.generate(NORMAL, max_new_tokens=4).outputs
            with pytest.raises(ServeError, match=r"the tokenizer failed on this request \(PanicException: Onig"):
                client.generate("a" * 40 + "b", max_new_tokens=4)
            with pytest.raises(ServeError, match=r"the tokenizer took longer than 5 s on this request"):
                client.generate(("a" * 30 + "b ") * 400, max_new_tokens=4)
            with pytest.raises(ServeError, match=r"the prompt has 20971520 bytes, more than the 1048576"):
                client.generate("x" * (20 << 20), max_new_tokens=4)
            after = client.generate(NORMAL, max_new_tokens=4).outputs
        assert after == before and before["output_ids"]
        assert server.stop(timeout_s=60) == 0
    finally:
        server.kill()
