"""Fixtures for the serve checks: `ia3-export serve` started as a user starts it (the installed
console script, in its own process group), on 127.0.0.1 with free ports picked now, always stopped.

Run by scripts/serve_check.sh in .venv-serve (torch-free, pytriton, numpy<2) against folders that
tests/serve/prepare.py exported with the full environment. Skipped unless IA3_SERVE_DIR names them.
"""
from __future__ import annotations

import os
import sys
import threading

import pytest

from ia3_export.serve.process import ServerProcess

SERVE_DIR = os.environ.get("IA3_SERVE_DIR")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for cli_helpers and job_helpers
from job_helpers import skip_folder_unless  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_folder_unless(items, HERE, bool(SERVE_DIR), "set IA3_SERVE_DIR (scripts/serve_check.sh does) to run the serve checks")


def folder(*parts) -> str:
    return os.path.join(SERVE_DIR, *parts)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(folder, *options, env=None) -> ServerProcess, stopped at the end of the session."""
    started = []

    def start(onnx_dir: str, *options: str, env: dict | None = None) -> ServerProcess:
        log = tmp_path_factory.mktemp("serve") / "server.log"
        server = ServerProcess(onnx_dir, *options, log_path=str(log), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def llama_bank(start_server):
    # Triton's batches of whole requests (--batching request; test_continuous.py covers continuous batching),
    # with a long queue delay, so that requests sent together reliably meet in one Triton batch
    return start_server(folder("llama-bank"), "--batching", "request", "--max-batch", "8", "--max-queue-delay-us", "300000")


@pytest.fixture(scope="module")
def continuous(start_server):
    """The llama bank export under continuous batching with the OpenAI front (`server.openai`), one per module."""
    from ia3_export.serve.process import free_ports

    port = free_ports(1)[0]
    server = start_server(folder("llama-bank"), "--openai-port", str(port), "--max-batch", "8", "--drain-timeout", "10")
    server.openai = f"http://127.0.0.1:{port}/v1"
    return server


def concurrently(calls: list, timeout: float = 120) -> list:
    """Run the calls from one thread each, released together; their results (or exceptions) in order."""
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # the caller asserts on it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a request did not come back in time"
    return results


class Reference:
    """The same requests run alone through IA3Session, in this process: what every answer must equal."""

    def __init__(self, onnx_dir: str):
        from ia3_export.runtime import IA3Session

        self.session = IA3Session(onnx_dir)
        self.session.load_shipped_adapters()

    def generate(self, ids: list[int], adapter: str | None, max_new_tokens: int, **sampling) -> list[int]:
        from ia3_export.runtime import GenerationOptions, generate_ids

        options = GenerationOptions(max_new_tokens=max_new_tokens, **sampling)
        return generate_ids(self.session, [ids], [adapter], options)[0]

    def load(self, path: str) -> None:
        """Load a PEFT adapter folder once (tests share this Reference); its name is the folder's."""
        if os.path.basename(os.path.normpath(path)) not in self.session.adapters:
            self.session.load_adapter(path)

    def encode(self, text: str) -> list[int]:
        return self.session.tokenizer().encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.session.tokenizer().decode(ids)


@pytest.fixture(scope="session")
def reference():
    """reference(folder name) -> Reference, one per folder."""
    cache = {}

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = Reference(folder(name))
        return cache[name]

    return get
