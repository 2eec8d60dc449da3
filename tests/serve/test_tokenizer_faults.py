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


def test_a_hostile_chat_template_costs_one_request(tmp_path):
    """A folder's chat template is code too: two nested range(100000) loops held a server thread for good
    and grew the server to 8 GB in 40 s. It now renders in the tokenizer's child: the spinning chat gets a
    400 at --tokenizer-timeout, the one that writes without end a 400 at the prompt's byte limit, and
    completions and other chats are answered meanwhile and after, the server's memory flat."""
    import time
    import urllib.error
    import urllib.request

    from ia3_export.serve.process import free_ports

    onnx = tmp_path / "onnx"
    shutil.copytree(folder("llama-bank"), onnx)
    (onnx / "chat_template.jinja").write_text(
        '{% if messages[0].content == "spin" %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}'
        '{% endfor %}{% elif messages[0].content == "grow" %}{% for i in range(100000) %}{% for j in range(100000) %}'
        '{{ i }}{% endfor %}{% endfor %}{% endif %}<s>{{ messages[0].content }}')
    port = free_ports(1)[0]
    server = ServerProcess(str(onnx), "--tokenizer-timeout", "5", "--openai-port", str(port), "--drain-timeout", "10",
                           log_path=str(tmp_path / "server.log"))

    def post(path, body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]["message"]

    def rss_mib():
        with open(f"/proc/{server.process.pid}/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) // 1024

    try:
        hello = {"model": "llama-a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert post("chat/completions", hello)[0] == 200
        before = rss_mib()
        for content, message in [("spin", "the tokenizer took longer than 5 s on this request"),
                                 ("grow", "the chat template wrote more than 1048576 bytes")]:
            start = time.monotonic()
            status, answer = post("chat/completions", {**hello, "messages": [{"role": "user", "content": content}]})
            assert status == 400 and message in answer and time.monotonic() - start < 30, (content, answer)
            assert post("completions", {"model": "llama-a1", "prompt": "hi", "max_tokens": 4})[0] == 200
            assert post("chat/completions", hello)[0] == 200
        assert rss_mib() < before + 200, (before, rss_mib())
        assert server.stop(timeout_s=60) == 0
    finally:
        server.kill()
