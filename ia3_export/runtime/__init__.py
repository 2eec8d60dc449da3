"""The torch-free runtime: exported folders on ONNX Runtime, adapters, generation.

Imports onnxruntime, numpy, safetensors and tokenizers only, so a serving container needs
neither torch nor transformers.
"""
from .engine import Engine, Handle, Request, Result
from .folder import ExportedFolder, open_folder
from .generation import GenerationOptions, generate_ids
from .session import IA3Session

__all__ = ["Engine", "ExportedFolder", "GenerationOptions", "Handle", "IA3Session", "Request", "Result",
           "generate_ids", "open_folder"]
