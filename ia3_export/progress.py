"""Stage messages for commands that take a while (export, parity, merge).

The library only logs them (logger `ia3_export.progress`, level INFO), so Python callers see
nothing unless they configure logging. The command line shows them on stderr with the elapsed
time when stderr is a terminal, and stays silent with `--quiet` or when piped (CI logs).
"""
from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("ia3_export.progress")


def stage(message: str) -> None:
    logger.info(message)


class _Elapsed(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.monotonic() - self.start:6.1f}s] {record.getMessage()}"


def show_on_terminal(stream=None) -> bool:
    """Print stages to `stream` (stderr) if it is a terminal; True if they will be shown."""
    stream = stream or sys.stderr
    if not stream.isatty() or logger.handlers:
        return False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Elapsed())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return True
