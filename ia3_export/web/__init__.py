"""The JavaScript side, shipped in the wheel: `ia3.mjs` (swappable, bank and merged exports on
onnxruntime-node or onnxruntime-web, adapters switched in a live session; docs/web.md) and
`parity.mjs` (the Node runner behind `ia3-export parity --runtime node`)."""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def module_path() -> str:
    """The installed ia3.mjs: copy it beside a page, or import it from Node by this path."""
    return os.path.join(HERE, "ia3.mjs")


def runner_path() -> str:
    """The installed parity.mjs (imports ./ia3.mjs beside it)."""
    return os.path.join(HERE, "parity.mjs")
