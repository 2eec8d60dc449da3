"""Starting and stopping like a service: SIGTERM answers the requests already sent, then stops with
nothing left behind; start-up problems are one line and exit 2."""
from __future__ import annotations

import os
import signal
import socket
import time

from cli_helpers import assert_one_line_error, run_cli
from conftest import concurrently, folder
from test_generate import A1, A2, ask

from ia3_export.serve import ServeConfig, Server
from ia3_export.serve.process import ServerProcess, free_ports


def test_sigterm_drains_and_stops_cleanly(tmp_path, reference):
    # requests wait in Triton's queue for up to 1.5 s: the SIGTERM lands while all of them are in flight
    server = ServerProcess(folder("llama-bank"), "--max-batch", "16", "--max-queue-delay-us", "1500000",
                           "--drain-timeout", "20", log_path=str(tmp_path / "server.log"))
    try:
        processes = server.children()
        assert len(processes) >= 3  # the command, tritonserver, backend stubs
        parents = {p: stat(p)[1] for p in processes}
        requests = [{"input_ids": [5, 6, 7 + i], "adapter": (A1, A2, None)[i % 3], "max_new_tokens": 30} for i in range(6)]
        calls = [lambda r=r: ask(server.url, **r) for r in requests]
        calls.append(lambda: (time.sleep(0.5), server.process.send_signal(signal.SIGTERM)))
        answers = concurrently(calls)[:-1]
        code = server.process.wait(60)
        # what tritonserver's backends started is reaped by the command before it exits (it is their
        # subreaper); its own children (tritonserver, multiprocessing's tracker) must not run on
        reaped = [p for p in processes if p != server.process.pid and parents[p] != server.process.pid]
        left = [p for p in reaped if os.path.exists(f"/proc/{p}")] + running(
            [p for p in processes if parents[p] == server.process.pid], grace_s=5)
    finally:
        server.kill()
    ref = reference("llama-bank")
    for request, answer in zip(requests, answers):
        assert not isinstance(answer, Exception), answer
        assert answer.outputs["output_ids"] == ref.generate(request["input_ids"], request["adapter"], 30)
    assert code == 0, server.log[-2000:]
    assert left == []
    assert not os.path.exists(server.workspace)


def stat(pid: int) -> tuple[str, int]:
    """A process's state letter and parent pid."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def running(pids: list[int], grace_s: float) -> list[int]:
    """Those of `pids` still running after up to `grace_s` seconds (a zombie has exited: the PID 1 of a
    container may never reap the command's own multiprocessing helper, which ends when the command does)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for pid in pids:
            try:
                if stat(pid)[0] not in ("Z", "X"):
                    alive.append(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_port_in_use_fails_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", folder("llama-bank"), "--http-port", port, timeout=120)
    assert_one_line_error(result, 2, f"port {port} on 127.0.0.1 (--http-port) is not free")


def test_bad_start_options_fail_with_one_line(tmp_path):
    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics]  # not whatever holds 8000-8002
    assert_one_line_error(run_cli("serve", folder("llama-bank"), *ports, "--max-batch", "0"), 2,
                          "--max-batch is 0; give a whole number in the range 1<=x<=1024")
    assert_one_line_error(run_cli("serve", folder("llama-bank"), *ports, "--threads", "0"), 2,
                          "--threads is 0; give a whole number in the range 1<=x<=1024")
    assert_one_line_error(run_cli("serve", folder("llama-bank"), "--http-port", http, "--grpc-port", http), 2,
                          "--http-port, --grpc-port and --metrics-port must differ")
    assert_one_line_error(run_cli("serve", str(tmp_path / "nothing"), *ports), 2, "does not exist")
    assert_one_line_error(run_cli("serve", folder("llama-bank"), *ports, "--adapter", folder("bert-a1")), 2, "bert-a1")


def test_onnx_runtime_threads_leave_a_core_to_the_server_unless_given():
    """Every graph of the served session runs on --threads intra-op threads, else on the cores this process may
    use less one: ONNX Runtime's own default takes them all, and the server's other threads and tritonserver
    then wait for a core (on 2 cores one thread gave the engine 1.07-1.20x the tokens/s; docs/serving.md)."""
    http, grpc, metrics = free_ports(3)
    expected = {None: max(1, len(os.sched_getaffinity(0)) - 1), 3: 3}
    for threads, want in expected.items():
        server = Server(ServeConfig(folder("llama-bank"), http_port=http, grpc_port=grpc, metrics_port=metrics,
                                    threads=threads))
        try:
            got = {name: graph.session.get_session_options().intra_op_num_threads
                   for name, graph in server.session.graphs.items()}
        finally:
            server.close()
        assert got and set(got.values()) == {want}, (threads, got)
