"""The export modes, one class per file; `EXPORT_MODES` is the only place a mode's name picks
its behaviour. A fifth mode is one new `ExportMode` subclass in one file, listed here (and its
name in `manifest.MODES`, with a runtime binding in runtime/bindings.py)."""
from __future__ import annotations

from ...errors import IA3Error
from .bank import Bank
from .base import Export, ExportMode
from .foldswap import Foldswap
from .merged import Merged
from .swappable import Swappable

EXPORT_MODES: dict[str, type[ExportMode]] = {m.name: m for m in (Merged, Swappable, Bank, Foldswap)}


def export_mode(name: str) -> type[ExportMode]:
    """The class of a mode name (an unknown name is bad usage)."""
    if name not in EXPORT_MODES:
        raise IA3Error(f"unknown mode {name!r}; use one of {', '.join(EXPORT_MODES)}")
    return EXPORT_MODES[name]


__all__ = ["EXPORT_MODES", "Export", "ExportMode", "export_mode"]
