"""merged: the adapters folded into the weights (their product); the graph is a plain model."""
from __future__ import annotations

from ...errors import IA3Error
from ...formats.manifest import MERGED
from ...core.merge import fold_adapters
from .base import ExportMode


class Merged(ExportMode):
    name = MERGED
    folds_adapters = True
    graph_defaults = False

    def check_options(self, exporter: str, target_modules, feedforward_modules) -> None:
        if target_modules is not None or feedforward_modules is not None:
            raise IA3Error("--target-modules/--feedforward-modules choose the vector inputs of swappable and bank "
                           "exports; a merged export folds the adapters given with --adapter")

    def check_adapters(self, adapters) -> None:
        """modules_to_save are whole tensors: a merged export carries them in its weights."""

    def prepare(self, model, adapters, target_modules, feedforward_modules):
        return None, None, fold_adapters(model, adapters)
