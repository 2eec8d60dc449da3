"""An exported folder behind a real Triton Inference Server, started through pytriton.

pytriton runs `tritonserver` (HTTP and gRPC, KServe v2 protocol, dynamic batcher, model instances,
Prometheus metrics) as a child process; its Python backend forwards each batch of requests to the
model functions in THIS process, where one thread-safe IA3Session serves every model instance.
Stopping (SIGTERM or SIGINT, or `stop()`) asks tritonserver to finish the requests in flight,
then removes its workspace. `serve_forever` (the command) also waits for every process that
tritonserver's backends started: it adopts them as the child subreaper, so none is left running or
as a zombie when a container's PID 1 does not reap.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import re
import signal
import socket
import sys
import sysconfig
import threading
import time

import numpy as np

from ..errors import CheckFailed, IA3Error, quoted
from ..ort import session_options, telemetry_off
from ..runtime import IA3Session
from ..runtime.requests import HEADER_TIMEOUT_S, MAX_TEXT_BYTES, TOKENIZER_TIMEOUT_S, Limits
from . import stub
from .adapters import MAX_ADAPTERS
from .client import access_headers
from .models import Adapters, Served, model_for

START_ATTEMPTS = 3
ENGINE_INSTANCES = 4  # generate's instances on the engine: Triton batches of whole requests decoding at once
API_KEY = re.compile(r"[A-Za-z0-9._~+/-]{1,256}")  # RFC 6750's token characters: safe in a header and in Triton's flag
BATCHING = ("continuous", "request")
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@dataclasses.dataclass
class ServeConfig:
    onnx_dir: str
    adapters: tuple[str, ...] = ()  # loaded at start-up (with the adapters shipped in the folder)
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 16
    max_queue_delay_us: int = 2000
    instances: int | None = None  # Triton model instances; None: Server.model_instances chooses
    provider: str = "cpu"
    max_tokens: int | None = None  # prompt + new tokens per request; default: the model's context length
    drain_timeout_s: int = 30
    max_text_bytes: int = MAX_TEXT_BYTES  # a request's text, checked before it is tokenized
    tokenizer_timeout_s: float = TOKENIZER_TIMEOUT_S  # one request's tokenizer call (runtime/tokenizer.py)
    batching: str = "continuous"  # "continuous": the runtime's Engine (decoder exports); "request": Triton's batches
    max_queue: int = 256  # requests waiting for a row of the running batch (continuous); past it: "busy"
    request_timeout_s: float = 600  # a request's deadline (continuous): pytriton does not report disconnects
    openai_port: int | None = None  # the OpenAI-compatible API (/v1/...) on this port; None: off
    served_model_name: str | None = None  # the base model's id in /v1/models; default: the folder's name
    # every client but a health probe must send it (see `access_headers`); None: anyone. Never in a repr or log.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_adapters: int = MAX_ADAPTERS  # loaded at once, shipped and --adapter ones included; past it an add is refused
    openai_address: str | None = None  # where the OpenAI API listens; None: `address`
    openai_tls: tuple[str, str] | None = None  # (certificate, private key) PEM files: the OpenAI API speaks HTTPS
    header_timeout_s: float = HEADER_TIMEOUT_S  # the OpenAI API closes a connection whose request head takes longer
    threads: int | None = None  # ONNX Runtime's intra-op threads; None: `default_threads()`

    def __post_init__(self):
        instances = 1 if self.instances is None else self.instances
        for option, value, low in (("--max-batch", self.max_batch, 1), ("--instances", instances, 1),
                                   ("--max-queue-delay-us", self.max_queue_delay_us, 0),
                                   ("--drain-timeout", self.drain_timeout_s, 1), ("--max-queue", self.max_queue, 1),
                                   ("--request-timeout", self.request_timeout_s, 1),
                                   ("--max-adapters", self.max_adapters, 1),
                                   ("--header-timeout", self.header_timeout_s, 0.1),
                                   ("--threads", self.intra_op_threads, 1)):
            if value < low:
                raise IA3Error(f"{option} must be at least {low}, got {value}")
        if self.api_key is not None and not API_KEY.fullmatch(self.api_key):
            raise IA3Error("--api-key must be 1 to 256 characters from A-Z a-z 0-9 . _ ~ + / - (a bearer token); the "
                           f"one given has {len(self.api_key)} characters; `openssl rand -hex 32` makes a key")
        if self.batching not in BATCHING:
            raise IA3Error(f"--batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.openai_tls is not None:
            _check_tls(*self.openai_tls)
        ports = _ports(self)
        if len(set(ports.values())) != len(ports):
            names = [f"--{name}" for name in ports]
            raise IA3Error(f"{', '.join(names[:-1])} and {names[-1]} must differ, got {', '.join(map(str, ports.values()))}")

    @property
    def intra_op_threads(self) -> int:
        return default_threads() if self.threads is None else self.threads

    @property
    def openai_host(self) -> str:
        return self.address if self.openai_address is None else self.openai_address

    @property
    def openai_url(self) -> str:
        scheme = "http" if self.openai_tls is None else "https"
        return f"{scheme}://{display_host(self.openai_host)}:{self.openai_port}/v1"


def default_threads() -> int:
    """ONNX Runtime's intra-op threads in the server: every core this process may run on but one, which
    is left to tritonserver, pytriton's threads and the event loops (ONNX Runtime's own default takes
    them all). On this 2-core machine one thread instead of two gave the engine 1.07-1.20x the streamed
    tokens/s and 1.25-1.36x the tokens per CPU second (docs/serving.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


class Server:
    """`with Server(ServeConfig("onnx-bank")) as server: ...` serves until the block ends."""

    def __init__(self, config: ServeConfig):
        if importlib.util.find_spec("pytriton") is None:
            raise IA3Error("serving needs pytriton (nvidia-pytriton); install it with: pip install 'ia3-export[serve,cpu]'")
        _check_ports(config)  # before loading a model that may take a while
        self.config = config
        # ONNX Runtime's idle threads sleep instead of spinning: the cores are shared with Triton and pytriton
        options = session_options(threads=config.intra_op_threads, spin=False)
        self.session = IA3Session(config.onnx_dir, provider=config.provider, session_options=options,
                                  limits=Limits(max_text_bytes=config.max_text_bytes,
                                                tokenizer_timeout_s=config.tokenizer_timeout_s))
        self.served = Served(self.session, config.max_tokens, config.max_adapters)
        self.session.load_shipped_adapters()
        for source in config.adapters:
            self._load_at_start(source)
        if len(self.session.adapters) > config.max_adapters:
            raise IA3Error(f"the folder's adapters and --adapter make {len(self.session.adapters)}, more than "
                           f"--max-adapters {config.max_adapters}; raise --max-adapters or load fewer")
        self.model = model_for(self.session)
        self.streams = self.served.streams = self._engine() if config.batching == "continuous" else None
        self.triton = self.front = self.disconnects = None

    def _load_at_start(self, source: str) -> None:
        """--adapter: an adapter already loaded under its name (shipped in the folder, named by its name,
        its shipped file or the PEFT folder it was exported from, or given twice) is kept, loaded once,
        when its vectors are the same; the same name with other vectors is refused."""
        adapter = self.session.read_adapter(source)
        loaded = self.session.adapters.get(adapter.name)
        if loaded is None:
            self.session.add_adapter(adapter)
        elif loaded.vectors.keys() != adapter.vectors.keys() or not all(
                np.array_equal(v, adapter.vectors[k]) for k, v in loaded.vectors.items()):
            raise IA3Error(f"--adapter {source}: adapter {adapter.name!r} is already loaded from {loaded.source} with "
                           "other vectors; rename one of them (an adapter is named after its folder or file)")

    def _engine(self):
        """The engine under the generate models, for a decoder export with a KV cache; None (Triton's
        request batching) for the others (seq2seq, classifiers), which the engine does not run."""
        from ..runtime.engine import Engine
        from .streaming import Streams

        try:
            engine = Engine(self.session, max_batch=self.config.max_batch, max_queue=self.config.max_queue)
        except IA3Error:
            return None
        return Streams(engine, self.config.request_timeout_s)

    @property
    def model_instances(self) -> int:
        """Instances of the generate (or classify) model: `--instances`, else ENGINE_INSTANCES on the engine
        and 1 otherwise. On the engine an instance only waits, but pytriton's non-streaming model holds it
        until its Triton batch ends: with one, a `generate` request arriving while another decoded could
        not join the running batch before that one ended."""
        if self.config.instances is not None:
            return self.config.instances
        return ENGINE_INSTANCES if self.streams is not None else 1

    @property
    def url(self) -> str:
        return f"http://{display_host(self.config.address)}:{self.config.http_port}"

    @property
    def access_headers(self) -> dict[str, str]:
        """What a client of Triton's HTTP port sends with --api-key (the OpenAI front's calls to it too)."""
        return access_headers(self.config.api_key)

    @property
    def workspace(self) -> str | None:
        return str(self._workspace.path) if self.triton is not None else None

    def start(self) -> "Server":
        """Start tritonserver and bind the models; returns when they are ready.

        With several instances, pytriton's instances fetch their configuration from the first one
        through a Unix socket, and under load one may connect between the socket's bind and listen
        (ConnectionRefusedError: the model fails to load; seen on this 2-core machine). Such a start is
        tried again, up to START_ATTEMPTS times."""
        c = self.config
        _check_ports(c)
        _python_library_on_path()
        telemetry_off()  # tritonserver and its backend stubs inherit this process's environment
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._start_triton()
            except Exception as e:  # pytriton raises TimeoutError/RuntimeError; the server's log is above
                self.stop()
                reason = " ".join(str(e).split())
                if self.model_instances == 1 or "ConnectionRefusedError" not in reason or attempt == START_ATTEMPTS:
                    raise CheckFailed(f"Triton Inference Server did not start ({reason[:300]}); "
                                      "check the ports and the log above") from None
                print(f"ia3-export serve: an instance missed pytriton's handshake; starting again ({attempt + 1}/"
                      f"{START_ATTEMPTS})", file=sys.stderr)

    def _start_triton(self) -> "Server":
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        from pytriton.utils.workspace import Workspace

        c = self.config
        self._workspace = Workspace()
        # The models are written to the repository before tritonserver starts, which loads them at start-up:
        # /v2/health/ready then answers 200 only once they are loaded (pytriton's default loads them after
        # the server reports ready, and a probe routed traffic for ~4 s to a server without models).
        self.triton = Triton(workspace=self._workspace, config=TritonConfig(
            http_address=c.address, http_port=c.http_port, grpc_address=c.address, grpc_port=c.grpc_port,
            metrics_address=c.address, metrics_port=c.metrics_port, exit_timeout_secs=c.drain_timeout_s),
            triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True),
            security_config=_security(c.api_key))
        batched = ModelConfig(max_batch_size=c.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=c.max_queue_delay_us))
        for name, functions, inputs, outputs, config in self._models(batched):
            self.triton.bind(model_name=name, infer_func=functions, inputs=_tensors(inputs), outputs=_tensors(outputs),
                             config=config)
        stub.serialize_empty_tensors(self._workspace.model_store_path)
        stub.read_parameters_safely(self._workspace.model_store_path)
        stub.wait_for_the_first_instance(self._workspace.model_store_path)
        if self.streams is not None:
            from .streaming import Disconnects, EngineGenerate, GenerateStream

            self.disconnects = Disconnects(os.path.join(self.workspace, "ia3-disconnects.sock"), self.streams)
            stub.report_disconnects(self._workspace.model_store_path, (GenerateStream.name, EngineGenerate.name),
                                    self.disconnects.path)
            self.streams.engine.start()
        self.triton.run()
        if c.openai_port is not None:
            from .openai_api import OpenAIFront

            self.front = OpenAIFront(self).start()
        return self

    def _models(self, batched) -> list[tuple]:
        """(name, infer functions, inputs, outputs, config) of every model this server binds."""
        from pytriton.model_config import ModelConfig

        served = self.served
        single = ModelConfig(max_batch_size=1, batcher=batched.batcher)
        if self.streams is None:
            functions = [self.model(served) for _ in range(self.model_instances)]
            models = [(self.model.name, functions, self.model.inputs, self.model.outputs, batched)]
        else:
            from .streaming import EngineGenerate, GenerateStream

            stream = GenerateStream(served, self.streams)
            models = [(EngineGenerate.name, [EngineGenerate(served, self.streams) for _ in range(self.model_instances)],
                       EngineGenerate.inputs, EngineGenerate.outputs, batched),
                      (stream.name, [stream], stream.inputs, stream.outputs, ModelConfig(batching=False, decoupled=True))]
        return [*models, (Adapters.name, [Adapters(served, self.model.name)], Adapters.inputs, Adapters.outputs, single)]

    def stop(self) -> None:
        """Finish the requests in flight (up to drain_timeout_s), stop tritonserver, remove its workspace."""
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.triton is not None:
            self.triton.stop()
        if self.disconnects is not None:
            self.disconnects.close()
            self.disconnects = None

    def close(self) -> None:
        """Stop serving, end the engine's thread (the requests still in it are cancelled) and the
        tokenizer's processes."""
        self.stop()
        if self.streams is not None:
            self.streams.engine.close(cancel=True)
        self.session.close()

    def serve_forever(self, on_ready=None) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain and stop."""
        stopping = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            self.start()
            if on_ready:
                on_ready(self)
            while not stopping.wait(1.0):
                if not self.triton.is_alive():
                    raise CheckFailed("Triton Inference Server stopped by itself; see its log above")
        finally:
            self.close()
            _reap_children(timeout_s=10)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *_) -> None:
        self.close()


def _reap_children(timeout_s: float) -> None:
    """Wait for the children left (orphans adopted as subreaper included); kill those still running at the end.

    multiprocessing's resource tracker is ours and ends with this process, so it is not waited for."""
    from multiprocessing import resource_tracker

    ours = getattr(resource_tracker._resource_tracker, "_pid", None)
    deadline, killed = time.monotonic() + timeout_s, False
    while left := [pid for pid in _children() if pid != ours]:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if time.monotonic() > deadline:
            if killed:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline, killed = time.monotonic() + 5, True
        time.sleep(0.05)


def _children() -> list[int]:
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(pid))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _security(api_key: str | None):
    """Triton's restricted APIs: with a key, every API but health (a Kubernetes probe sends no key) needs it on
    HTTP and gRPC; without one, pytriton's default (its own random key guards model loading, statistics,
    tracing and logging; inference and metadata are open)."""
    from pytriton.triton import VALID_TRITON_ENDPOINTS, TritonSecurityConfig

    if api_key is None:
        return TritonSecurityConfig()
    return TritonSecurityConfig(access_token=api_key, restricted_endpoints=sorted(VALID_TRITON_ENDPOINTS - {"health"}))


def _tensors(ports) -> list:
    from pytriton.model_config import Tensor

    return [Tensor(name=p.name, dtype=p.dtype, shape=p.shape, optional=p.optional) for p in ports]


def _check_ports(c: ServeConfig) -> None:
    """Fail with one line before starting anything when a port is taken (tritonserver would only log it)."""
    for option, port in _ports(c).items():
        address = c.openai_host if option == "openai-port" else c.address
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as e:
                raise IA3Error(f"port {port} on {address} (--{option}) is not free ({e.strerror}); "
                               f"stop what uses it or pass another --{option}") from None


def _ports(c: ServeConfig) -> dict[str, int]:
    ports = {"http-port": c.http_port, "grpc-port": c.grpc_port, "metrics-port": c.metrics_port}
    return {**ports, "openai-port": c.openai_port} if c.openai_port is not None else ports


def _python_library_on_path() -> None:
    """The backend stub loads libpython of this minor version: make it this interpreter's own, not the
    system's (a pyenv or conda Python otherwise fails with "'_thread.RLock' object has no attribute
    '_recursion_count'")."""
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or not os.path.exists(os.path.join(libdir, library)):
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def _check_tls(certificate: str, key: str) -> None:
    """Load the pair as uvicorn will, so a missing file, a file that is not PEM or a key that does not
    match the certificate is one line before anything starts (uvicorn would stop with a traceback)."""
    import ssl

    from ..formats.reader import check_regular

    for option, path in (("--openai-certfile", certificate), ("--openai-keyfile", key)):
        try:
            check_regular(path, "pem")  # the guarded reader's check: a regular file within its cap
        except IA3Error as e:
            raise IA3Error(f"{option} {quoted(path)} is not a file it can read ({e}); pass the PEM file (`openssl "
                           "req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem` makes a self-signed "
                           "pair)") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (ssl.SSLError, ValueError) as e:
        raise IA3Error(f"--openai-certfile {quoted(certificate)} and --openai-keyfile {quoted(key)} are not a PEM "
                       f"certificate and its private key ({e}); pass the pair your certificate authority "
                       "issued") from None


def display_host(address: str) -> str:
    return "127.0.0.1" if address in ("0.0.0.0", "") else address
