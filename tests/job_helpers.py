"""The jobs that need what the main venv lacks (Triton for tests/serve, Node and Chromium for
tests/web) keep their tests in a folder of their own, run by their script, skipped elsewhere."""
from __future__ import annotations

import os

import pytest


def skip_folder_unless(items, folder: str, enabled: bool, reason: str) -> None:
    """Mark the collected items under `folder` skipped, with `reason`, unless the job is `enabled`."""
    if enabled:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if str(item.fspath).startswith(folder + os.sep):
            item.add_marker(skip)
