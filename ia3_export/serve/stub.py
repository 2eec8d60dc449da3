"""Mending pytriton 0.7.0's backend stub (pinned: the `serve` extra), before tritonserver starts.

pytriton copies its stub (model.py, data.py) into each model's folder of Triton's model repository;
the stub runs inside Triton's Python backend, out of our reach at run time. Four of its limits cost
users a promise, so the copies are edited in the repository: a tensor with a zero in its shape
could not pass (`input_ids` [1, 0] got HTTP 500 with a traceback), a request whose parameters are
not UTF-8 got a traceback (or, streamed, no answer ever), a decoupled model was never told that
its client went away (a disconnected stream kept generating), and a model's second instance gave up
on its first after 1 s (a server with several instances failed to start on a busy machine). Each
edit is a plain text replacement of pytriton 0.7.0's code, tested by the serve job (tests/serve)."""
from __future__ import annotations

import glob
import os

EMPTY_FRAME = ('frame.cast("B")', '(frame.cast("B") if frame.nbytes else b"")')


def serialize_empty_tensors(model_store) -> None:
    """pytriton 0.7.0's backend stub cannot pass a tensor with a zero in its shape (`input_ids` of shape
    [1, 0]: memoryview.cast refuses it, and the client got HTTP 500 with the stub's traceback). The stub
    runs the copy of pytriton's data.py in each model's folder of the repository: that copy is mended
    before tritonserver starts, so the request reaches our checks and gets its one-line `error`."""
    old, new = EMPTY_FRAME
    for path in glob.glob(os.path.join(str(model_store), "*", "*", "data.py")):
        _rewrite(path, lambda text: text.replace(old, new) if new not in text else text)


PARAMETERS = ("            parameters=json.loads(triton_request.parameters()),\n",
              "            parameters=_ia3_parameters(triton_request),\n")
PARAMETERS_READER = """

def _ia3_parameters(triton_request):
    try:
        parameters = json.loads(triton_request.parameters())
    except ValueError as e:  # ia3-export: not UTF-8, or not JSON; the model answers it with one line
        parameters = {%r: f"the request's parameters cannot be read ({type(e).__name__}: {str(e)[:80]}); send "
                          "them as UTF-8 JSON"}
    return parameters
"""
STUB_REQUEST = ("    return parameters\n", "    return {**parameters, %r: f'{os.getpid()}-{id(triton_request)}'}\n")
STUB_RESPONSE = "                flags, responses_payload = await responses_queue.get()\n"
STUB_REPORT = """\
                if gone := [r for r in triton_requests if r.is_cancelled()]:  # ia3-export: the client went away
                    _ia3_disconnected(gone)
"""
STUB_WAIT = ("                triton_responses_or_error = handle_responses_concurrent_future.result()\n",
             "                triton_responses_or_error = _ia3_wait(handle_responses_concurrent_future, "
             "triton_requests)\n")
STUB_SENDER = """

def _ia3_disconnected(triton_requests):
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for r in triton_requests:
            try:
                s.sendto(f"{os.getpid()}-{id(r)}".encode(), %r)
            except OSError:
                pass


def _ia3_wait(future, triton_requests):
    import concurrent.futures
    reported = set()
    while True:
        try:
            return future.result(timeout=%r)
        except concurrent.futures.TimeoutError:  # still running: report the requests cancelled since
            gone = [r for r in triton_requests if id(r) not in reported and r.is_cancelled()]
            reported.update(map(id, gone))
            if gone:
                _ia3_disconnected(gone)
"""
CANCEL_POLL_S = 0.1  # how often a non-streaming model's stub looks for cancelled requests while they run


def read_parameters_safely(model_store) -> None:
    """pytriton 0.7.0's stub reads a request's parameters with `json.loads`, unguarded: parameters that are
    not UTF-8 (Triton's generate endpoint passes a body's unknown fields on as parameters) got HTTP 400 with
    the stub's traceback, and a streamed request got no response at all, its connection held open for good.
    Every model's copy of model.py is mended to pass a note instead (models.BAD_PARAMETERS), which the
    model answers as its one-line `error`."""
    from .models import BAD_PARAMETERS

    old, new = PARAMETERS
    for stub in glob.glob(os.path.join(str(model_store), "*", "*", "model.py")):
        _rewrite(stub, lambda text: text.replace(old, new) + PARAMETERS_READER % BAD_PARAMETERS)


def report_disconnects(model_store, models: tuple[str, ...], path: str) -> None:
    """pytriton 0.7.0 never tells a model that its client went away, though Triton marks the request
    cancelled (`is_cancelled()`; seen for a reset HTTP stream, a cancelled gRPC stream and a gRPC call past
    its deadline, not for a closed non-streaming HTTP connection). The stubs' copies of pytriton's model.py
    in the `models`' folders are mended: each request gets a key (a parameter, streaming.STUB_KEY), and the
    stub sends the key of a cancelled request to `path`, where `streaming.Disconnects` cancels it in the
    engine: a decoupled model's at each of its responses, a non-streaming model's every CANCEL_POLL_S while
    its batch runs. After `read_parameters_safely`."""
    from .streaming import STUB_KEY

    def edit(text: str) -> str:
        if STUB_RESPONSE not in text or STUB_WAIT[0] not in text:
            raise RuntimeError("pytriton's stub has changed: its responses' loop or wait not found; "
                               "pin nvidia-pytriton")
        response = text.index(STUB_RESPONSE, text.index("class DecoupledResponsesHandler")) + len(STUB_RESPONSE)
        old, new = STUB_REQUEST
        text = (text[:response] + STUB_REPORT + text[response:]).replace(*STUB_WAIT)
        return text.replace(old, new % STUB_KEY) + STUB_SENDER % (path, CANCEL_POLL_S)

    for model in models:
        for stub in glob.glob(os.path.join(str(model_store), model, "*", "model.py")):
            _rewrite(stub, edit)


HANDSHAKE_TIMEOUT_S = 60  # how long a model's later instances wait for its first one (pytriton: 1 s)
HANDSHAKE = ("def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = 1.0) -> dict:",
             "def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = %r) -> dict:")
CONNECT = ("""        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.0, should_stop_before_s - time.time()))
        sock.connect(socket_path.as_posix())
""", """        while True:  # ia3-export: the first instance's socket exists from its bind, answers from its listen
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.0, should_stop_before_s - time.time()))
            try:
                sock.connect(socket_path.as_posix())
                break
            except ConnectionRefusedError:
                sock.close()
                if time.time() >= should_stop_before_s:
                    raise
                time.sleep(0.01)
""")


def wait_for_the_first_instance(model_store) -> None:
    """A model's instances load in parallel, and all but the first fetch their configuration from a Unix
    socket the first one serves once it has started its tensor store (a process of its own): pytriton
    0.7.0 waits 1 s for that socket and connects once, so on a busy machine a later instance failed
    (TimeoutError, or ConnectionRefusedError between the first one's bind and listen) and with it the
    server's start (`failed to load all models`). The copies of pytriton's communication.py wait up to
    HANDSHAKE_TIMEOUT_S and retry a refused connection."""

    def edit(text: str) -> str:
        for old, new in (HANDSHAKE, CONNECT):
            if old not in text:
                raise RuntimeError(f"pytriton's stub has changed: {old.strip()[:60]!r} not found; pin nvidia-pytriton")
            text = text.replace(old, new % HANDSHAKE_TIMEOUT_S if "%r" in new else new)
        return text

    for path in glob.glob(os.path.join(str(model_store), "*", "*", "communication.py")):
        _rewrite(path, edit)


def _rewrite(path: str, edit) -> None:
    """Replace a stub file of Triton's model repository (pytriton's workspace, which this server made
    and removes when it stops; never a user's file) with `edit` of its text."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(edit(text))
