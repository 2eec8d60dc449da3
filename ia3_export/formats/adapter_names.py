"""Adapter names: one rule for every name the export writes and the runtime accepts.

A name is a plain identifier (ASCII letters, digits, '_', '-', '.'; no '..'), so a name that
comes from a request can never reach outside an export's `adapters/` directory, and it reads the
same in a manifest, a file name and a log. An adapter folder or file whose own name breaks the
rule ("my adapter", "café") gets a derived name that keeps to it (`name_for`), the same one in
`export` (adapters/<name>.onnx_adapter, the manifest) and in `IA3Session.load_adapter`.
"""
from __future__ import annotations

import os
import re

from ..errors import IA3Error, quoted
from .onnx_adapter import SUFFIX

MAX_LENGTH = 128
NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_LENGTH - 1}}}")


def check_name(name: str) -> str:
    """An adapter name: letters, digits, '_', '-', '.' (not first); never a path."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise IA3Error(f"adapter name {quoted(name)} is not allowed; use letters, digits, '_', '-' and '.' "
                       "(no path separators, no '..')")
    return name


def name_for(source: str) -> str:
    """The adapter name of a folder or .onnx_adapter file: its own name where the rule allows it,
    else that name with every other character (and each run of dots) replaced by '_'."""
    base = os.path.basename(os.path.normpath(source))
    if base.endswith(SUFFIX):
        base = base[:-len(SUFFIX)]
    safe = re.sub(r"[^A-Za-z0-9_.-]|\.{2,}", "_", base).lstrip("._-")[:MAX_LENGTH]
    return check_name(safe or "adapter")
