"""`ia3-export serve ONNX_DIR`: serve an exported folder behind Triton Inference Server."""
import click

from ..runtime.requests import HEADER_TIMEOUT_S, INT_MAX, MAX_TEXT_BYTES, TOKENIZER_TIMEOUT_S
from .options import FloatRange, IntRange

API_KEY_VARIABLE = "IA3_API_KEY"


@click.command("serve")
@click.argument("onnx_dir", type=click.Path())
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter to load at start-up: a PEFT folder or an .onnx_adapter file (repeat for more). "
                   "Adapters shipped in the folder are always loaded; naming one again (by name or path) is fine.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--http-port", default=8000, show_default=True, type=IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=IntRange(1, 65535), help="Prometheus metrics (/metrics).")
@click.option("--max-batch", default=16, show_default=True, type=IntRange(1, 1024), help="Most requests Triton batches together.")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=IntRange(0, 60_000_000),
              help="How long a request may wait for others to batch with (microseconds).")
@click.option("--instances", default=None, type=IntRange(1, 64),
              help="Model instances running batches in parallel (one shared session). Default: 1; 4 on the "
                   "engine (--batching continuous), where each holds one Triton batch of `generate` requests "
                   "while they decode.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", default=None, type=IntRange(1, 1024),
              help="ONNX Runtime's intra-op threads. Default: the cores this process may use, less one "
                   "(left to Triton and the server's own threads).")
@click.option("--max-tokens", default=None, type=IntRange(1, INT_MAX),
              help="Most tokens per request (prompt + new tokens); default: the model's context length.")
@click.option("--drain-timeout", default=30, show_default=True, type=IntRange(1, 3600),
              help="Seconds a stop waits for the requests in flight.")
@click.option("--max-text-bytes", default=MAX_TEXT_BYTES, show_default=True, type=IntRange(1, INT_MAX),
              help="Most bytes (UTF-8) a request's text may hold; checked before it is tokenized.")
@click.option("--tokenizer-timeout", default=TOKENIZER_TIMEOUT_S, show_default=True, type=FloatRange(0, 3600, min_open=True),
              help="Seconds the tokenizer may spend on one request (it runs in child processes, stopped after that).")
@click.option("--batching", type=click.Choice(["continuous", "request"]), default="continuous", show_default=True,
              help="continuous: requests join and leave the running batch at every decode step (decoder exports); "
                   "request: Triton's batches of whole requests.")
@click.option("--max-queue", default=256, show_default=True, type=IntRange(1, 1_000_000),
              help="Requests that may wait for a row of the running batch (continuous); past it: busy.")
@click.option("--request-timeout", default=600, show_default=True, type=FloatRange(1, 86_400),
              help="Seconds a request may run (continuous) before it ends with an error.")
@click.option("--openai-port", default=None, type=IntRange(1, 65_535),
              help="Also serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) here.")
@click.option("--openai-address", default=None,
              help="Address the OpenAI API listens on (default: --address), e.g. 0.0.0.0 for it alone.")
@click.option("--openai-certfile", type=click.Path(), default=None,
              help="Serve the OpenAI API over HTTPS with this PEM certificate (chain); needs --openai-keyfile.")
@click.option("--openai-keyfile", type=click.Path(), default=None, help="The PEM private key of --openai-certfile.")
@click.option("--header-timeout", default=HEADER_TIMEOUT_S, show_default=True, type=FloatRange(0.1, 3600),
              help="Seconds an OpenAI API connection may take to send a request's line and headers, from "
                   "connecting or from its last answer; then it is closed.")
@click.option("--max-adapters", default=256, show_default=True, type=IntRange(1, 1_000_000),
              help="Most adapters loaded at once (shipped, --adapter and added while serving); past it an add "
                   "is refused until one is unloaded.")
@click.option("--served-model-name", default=None, help="The base model's id in /v1/models (default: the folder's name).")
@click.option("--api-key", envvar=API_KEY_VARIABLE, show_envvar=True, default=None,
              help="Clients must send this key: `Authorization: Bearer KEY` to the OpenAI API, header "
                   "`triton-access-token: KEY` to Triton's ports; health probes and /metrics need none. "
                   "Prefer the environment variable: a command line is visible to every local user.")
def command(onnx_dir, adapters, address, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us,
            instances, provider, threads, max_tokens, drain_timeout, max_text_bytes, tokenizer_timeout, batching,
            max_queue, request_timeout, openai_port, openai_address, openai_certfile, openai_keyfile, header_timeout,
            max_adapters, served_model_name, api_key):
    """Serve an exported folder (generate or classify) behind Triton Inference Server; SIGTERM drains and stops."""
    import os

    from ..errors import IA3Error
    from ..serve import ServeConfig, Server

    if api_key is None and API_KEY_VARIABLE in os.environ:  # click reads an empty variable as unset: no key at all
        raise IA3Error(f"{API_KEY_VARIABLE} is set but empty, so the server would take requests from anyone; "
                       "set it to the key, or unset it to serve without one")
    if (openai_certfile is None) != (openai_keyfile is None):
        raise IA3Error("--openai-certfile and --openai-keyfile go together (a certificate and its private key); "
                       "pass both, or neither to serve plain HTTP")
    if openai_port is None and (openai_address or openai_certfile):
        raise IA3Error("--openai-address and --openai-certfile set up the OpenAI API, which is off; add --openai-port")
    config = ServeConfig(onnx_dir, tuple(adapters), address, http_port, grpc_port, metrics_port, max_batch,
                         max_queue_delay_us, instances, provider, max_tokens, drain_timeout, max_text_bytes,
                         tokenizer_timeout, batching, max_queue, request_timeout, openai_port, served_model_name,
                         api_key, max_adapters, openai_address,
                         None if openai_certfile is None else (openai_certfile, openai_keyfile), header_timeout,
                         threads)
    server = Server(config)

    def ready(s):
        batching = "continuous batching" if s.streams is not None else "request batching"
        openai = f", OpenAI API {config.openai_url}" if s.front is not None else ""
        click.echo(f"serving {s.model.name} ({s.session.mode}, {batching}, adapters: "
                   f"{', '.join(s.served.pool.names()) or 'none'}) on {s.url} (gRPC {config.grpc_port}, metrics "
                   f"{config.metrics_port}{openai}; ONNX Runtime threads: {config.intra_op_threads}); workspace "
                   f"{s.workspace}", err=True)

    server.serve_forever(on_ready=ready)
