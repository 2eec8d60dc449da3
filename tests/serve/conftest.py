"""Fixtures for the serve checks: `ia3-export serve` started as a user starts it (the installed
console script, in its own process group), on 127.0.0.1 with free ports picked now, always stopped.

Run by scripts/serve_check.sh in .venv-serve (torch-free, pytriton, numpy<2) against folders that
tests/serve/prepare.py exported with the full environment. Skipped unless IA3_SERVE_DIR names them.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

SERVE_DIR = os.environ.get("IA3_SERVE_DIR")
HERE = os.path.dirname(os.path.abspath(__file__))
EXE = os.path.join(os.path.dirname(sys.executable), "ia3-export")
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for cli_helpers
START_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    if SERVE_DIR:
        return
    skip = pytest.mark.skip(reason="set IA3_SERVE_DIR (scripts/serve_check.sh does) to run the serve checks")
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(skip)


def folder(*parts) -> str:
    return os.path.join(SERVE_DIR, *parts)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the OS picks them; the sockets are closed again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RunningServer:
    """One `ia3-export serve` process; `log` is its output so far."""

    def __init__(self, onnx_dir: str, log_path: str, *options: str):
        self.http, self.grpc, self.metrics_port = free_ports(3)
        self.log_path = log_path
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.process = subprocess.Popen(
                [EXE, "serve", onnx_dir, "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                 "--metrics-port", str(self.metrics_port), *options],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.http}"
        ready = self._wait_for(r"serving \w+ .* workspace (\S+)")
        self.workspace = ready.group(1)

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_for(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log[-3000:]}")
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"the server was not ready after {START_TIMEOUT_S} s:\n{self.log[-3000:]}")

    def children(self) -> list[int]:
        """Processes of the server's process group (itself, tritonserver, the backend stubs)."""
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.getpgid(int(pid)) == self.process.pid:
                        found.append(int(pid))
                except ProcessLookupError:
                    pass
        return found

    def metric(self, name: str, model: str) -> float:
        """One Prometheus counter of Triton's /metrics for a model."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        assert found, f"{name} for {model} not in /metrics"
        return float(found.group(1))

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code; anything still running after `timeout` is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(folder, *options) -> RunningServer, stopped at the end of the session."""
    started = []

    def start(onnx_dir: str, *options: str) -> RunningServer:
        log = tmp_path_factory.mktemp("serve") / "server.log"
        server = RunningServer(onnx_dir, str(log), *options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def llama_bank(start_server):
    # a long queue delay, so that requests sent together reliably meet in one Triton batch
    return start_server(folder("llama-bank"), "--max-batch", "8", "--max-queue-delay-us", "300000")


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
