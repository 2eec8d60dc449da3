"""Training IA3 adapters: per-task data, the loop (single process or torchrun), examples."""
from .loop import TrainOptions, TrainResult, train

__all__ = ["TrainOptions", "TrainResult", "train"]
