"""`ia3-export serve`: exported folders behind Triton Inference Server (through pytriton), many
adapters per batch. Needs the `serve` extra: pip install 'ia3-export[serve,cpu]'. See docs/serving.md."""
from .client import Answer, ServeClient, ServeError
from .server import ServeConfig, Server

__all__ = ["Answer", "ServeClient", "ServeConfig", "ServeError", "Server"]
