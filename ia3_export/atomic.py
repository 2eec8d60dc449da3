"""Write an output folder all at once: build it beside the target, rename when complete.

A failure (or a kill) mid-way leaves either the old folder or nothing, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import IA3Error


def check_output(path: str, force: bool = False) -> None:
    """Fail fast, before any work, when the output exists and may not be replaced."""
    if os.path.exists(path) and not force:
        raise IA3Error(f"output {os.path.abspath(path)} already exists; choose another path or pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(path: str, force: bool = False):
    """Yield a temporary folder that becomes `path` when the block finishes without error."""
    path = os.path.abspath(path)
    check_output(path, force)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    except OSError as e:
        raise IA3Error(f"cannot write to {parent} ({e.strerror}); choose a writable output folder") from None
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _native_write_error(e, path)
        raise


@contextlib.contextmanager
def atomic_output_file(path: str, force: bool = False):
    """Yield a temporary file path that becomes `path` when the block finishes without error."""
    path = os.path.abspath(path)
    check_output(path, force)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        os.close(fd)
    except OSError as e:
        raise IA3Error(f"cannot write to {parent} ({e.strerror}); choose a writable output folder") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _native_write_error(e, path)
        raise


# How writers in native code (safetensors' Rust I/O, ONNX Runtime) word a failed write.
_WRITE_FAILURES = ("I/O error", "No space left on device", "File too large", "Disk quota exceeded")


def _native_write_error(error: BaseException, path: str) -> None:
    """A full disk inside a native writer arrives as that library's own exception (e.g.
    SafetensorError), not OSError: turn it into the one-line error an OSError would give."""
    text = str(error)
    if not isinstance(error, (OSError, IA3Error)) and any(f in text for f in _WRITE_FAILURES):
        raise IA3Error(f"cannot write {path}: {text.splitlines()[0][:200]}; check free space, quotas and "
                       "permissions") from None


def _replace(tmp: str, path: str) -> None:
    """Rename tmp over path; an existing folder is moved aside first and removed after."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    old = os.path.join(trash, "old")
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(trash, ignore_errors=True)
