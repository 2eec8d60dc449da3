"""`ia3-export serve ONNX_DIR`: serve an exported folder behind Triton Inference Server."""
import click


@click.command("serve")
@click.argument("onnx_dir", type=click.Path())
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter to load at start-up: a PEFT folder or an .onnx_adapter file (repeat for more). "
                   "Adapters shipped in the folder are always loaded.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--http-port", default=8000, show_default=True, type=int)
@click.option("--grpc-port", default=8001, show_default=True, type=int)
@click.option("--metrics-port", default=8002, show_default=True, type=int, help="Prometheus metrics (/metrics).")
@click.option("--max-batch", default=16, show_default=True, type=int, help="Most requests Triton batches together.")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=int,
              help="How long a request may wait for others to batch with (microseconds).")
@click.option("--instances", default=1, show_default=True, type=int,
              help="Model instances running batches in parallel (one shared session).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-tokens", default=None, type=int,
              help="Most tokens per request (prompt + new tokens); default: the model's context length.")
@click.option("--drain-timeout", default=30, show_default=True, type=int,
              help="Seconds a stop waits for the requests in flight.")
def command(onnx_dir, adapters, address, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us,
            instances, provider, max_tokens, drain_timeout):
    """Serve an exported folder (generate or classify) behind Triton Inference Server; SIGTERM drains and stops."""
    from ..serve import ServeConfig, Server

    config = ServeConfig(onnx_dir, tuple(adapters), address, http_port, grpc_port, metrics_port, max_batch,
                         max_queue_delay_us, instances, provider, max_tokens, drain_timeout)
    server = Server(config)

    def ready(s):
        click.echo(f"serving {s.model.name} ({s.session.mode}, adapters: {', '.join(s.served.pool.names()) or 'none'}) "
                   f"on {s.url} (gRPC {config.grpc_port}, metrics {config.metrics_port}); workspace {s.workspace}",
                   err=True)

    server.serve_forever(on_ready=ready)
