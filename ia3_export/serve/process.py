"""`ia3-export serve` as a child process on loopback: for tests, benchmarks and users' own checks.

The server runs in its own process group (so whatever it started can be found and, if it comes to
that, killed), on free ports picked now, with its output in a file (a full pipe would block it).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from ..errors import CheckFailed


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now on 127.0.0.1 (the OS picks them; the sockets are closed again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServerProcess:
    """Start `ia3-export serve ONNX_DIR OPTIONS...` and wait until it says it is serving."""

    def __init__(self, onnx_dir: str, *options: str, log_path: str, start_timeout_s: float = 120,
                 env: dict | None = None):
        """`env`: variables added to this process's environment for the server (IA3_API_KEY, say)."""
        self.http, self.grpc, self.metrics_port = free_ports(3)
        self.log_path = log_path
        exe = os.path.join(os.path.dirname(sys.executable), "ia3-export")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [exe, "serve", onnx_dir, "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                 "--metrics-port", str(self.metrics_port), *options],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.http}"
        self.workspace = self._wait_for(r"serving \w+ .* workspace (\S+)", start_timeout_s).group(1)

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.process.poll() is not None:
                raise CheckFailed(f"the server exited with {self.process.returncode}: {self.log[-3000:]}")
            time.sleep(0.2)
        self.kill()
        raise CheckFailed(f"the server was not ready after {timeout_s} s: {self.log[-3000:]}")

    def children(self) -> list[int]:
        """Processes of the server's group: the command, tritonserver, the backend stubs."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) == self.process.pid:
                    found.append(int(pid))
            except ProcessLookupError:
                pass
        return found

    def metric(self, name: str, model: str) -> float:
        """One of Triton's Prometheus counters (/metrics) for a model."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        if not found:
            raise CheckFailed(f"{name} for model {model} is not in Triton's /metrics")
        return float(found.group(1))

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (drain and stop), then the exit code; anything left after `timeout_s` is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *_) -> None:
        self.stop()
