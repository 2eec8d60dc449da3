"""The one way a file a user hands us is opened for reading: regular files only, capped per kind.

Every reader in the package opens its file here (`open_regular`, `read_bytes`), so each guard
holds for every input surface, old and new, without the surface having to remember it:
- a FIFO, character or block device, socket or folder is refused by name BEFORE it is opened for
  reading (opening a FIFO blocks until a writer appears; reading /dev/zero never ends); the open
  itself is non-blocking and re-checked on the descriptor, so a file swapped for a FIFO between
  the check and the open is refused too;
- a file larger than its kind's cap (`KINDS`) is refused before a byte is read, so a sparse
  3 GB tokenizer.json costs nothing.
Symlinks to regular files are followed (the Hugging Face cache is made of them); confining a
graph's external data to its folder is `onnx_graph`'s job.

Every public entry point that reads a user's file registers itself with `registers` (what it
takes, which files it opens in it, of which kind): tests/formats/test_reader_guards.py walks every
registered reader with hostile files (a FIFO, a device, a socket, a folder, an oversized sparse
file, JSON nested 100,000 deep) without being told about it, and scripts/fuzz.py feeds them
mutated files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from typing import Callable

from ..errors import IA3Error

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a file of one kind may be: its size cap, and how a message names it."""

    max_bytes: int
    what: str


# The cap per kind, each with why. A new kind of input is one row here.
KINDS = {
    "json": Kind(64 * MiB, "a JSON file"),  # configs, manifests, labels: kilobytes
    "tokenizer": Kind(512 * MiB, "a tokenizer file"),  # the largest hub tokenizer.json files are ~35 MB
    "safetensors": Kind(1 << 40, "a safetensors file"),  # tensors are read by offset: the header is capped on its own
    "graph": Kind(2 * 1024 * MiB, "an ONNX graph"),  # protobuf stops at 2 GiB; larger weights are external data
    "external_data": Kind(1 << 40, "a graph's external data file"),  # mapped by ONNX Runtime, checked by range
    "onnx_adapter": Kind(4 * 1024 * MiB, "an .onnx_adapter file"),  # vectors: megabytes at most
    "data": Kind(4 * 1024 * MiB, "a training data file"),  # rows are streamed, but a data set is bounded
    "text": Kind(16 * MiB, "a text file"),  # a prompt read from a file
    "pem": Kind(1 * MiB, "a PEM certificate or key"),  # serve's TLS files: a chain is kilobytes
}

_TYPES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def file_type(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, name in _TYPES:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_regular(path: str, kind: str) -> os.stat_result:
    """The stat of `path` (symlinks followed) if it is a regular file within its kind's cap; else an
    IA3Error naming what it is. Nothing is opened."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise IA3Error(f"{path}: cannot read ({e.strerror}); check the path") from None
    _check(path, kind, info)
    return info


def _check(path: str, kind: str, info: os.stat_result) -> None:
    spec = KINDS[kind]
    other = file_type(info.st_mode)
    if other:
        raise IA3Error(f"{path} is {other}, not a regular file; {spec.what} is read only from a regular file: "
                       "point to the file itself")
    if info.st_size > spec.max_bytes:
        raise IA3Error(f"{path}: {info.st_size} bytes, more than the {spec.max_bytes} {spec.what} may hold here; "
                       "is it the right file?")


def open_regular(path: str, kind: str):
    """A binary file object for `path`, opened only once it is known to be a regular file within the
    cap of its kind (checked before the open, and again on the open descriptor)."""
    check_regular(path, kind)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise IA3Error(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        _check(path, kind, os.fstat(fd))  # the path may have been swapped since the check
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str, kind: str) -> bytes:
    """The whole content of a regular file of `kind` (within its cap)."""
    with open_regular(path, kind) as f:
        try:
            return f.read(KINDS[kind].max_bytes + 1)
        except OSError as e:
            raise IA3Error(f"{path}: cannot read ({e.strerror})") from None


def read_text(path: str, kind: str) -> str:
    """The content of a regular UTF-8 text file of `kind`; invalid UTF-8 is an IA3Error naming the file."""
    raw = read_bytes(path, kind)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IA3Error(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def present(path: str) -> bool:
    """Whether anything is at `path` (a dangling symlink included): an optional input that is there
    is read, and refused by name if it is no regular file, never skipped as if it were absent."""
    return os.path.lexists(path)


@contextlib.contextmanager
def pinned(path: str, kind: str):
    """A path for a native reader that opens files itself (ONNX Runtime's adapter reader): on Linux
    /proc/self/fd/N of the descriptor checked here, so the file read is the regular file checked,
    even if `path` is swapped for a FIFO in between; elsewhere `path` after the same check."""
    with open_regular(path, kind) as f:
        fd_path = f"/proc/self/fd/{f.fileno()}"
        yield fd_path if os.path.exists(fd_path) else path


# -- the registry of readers ------------------------------------------------------------------
# What a registered reader takes; the guard tests hold a valid example of each and put a hostile
# file in the place of each file the reader declares.
ARGUMENTS = {
    "json_file": "a JSON file", "graph_file": "an ONNX graph file", "safetensors_file": "a safetensors file",
    "onnx_adapter_file": "an .onnx_adapter file", "adapter_dir": "a PEFT adapter folder",
    "model_dir": "a transformers model folder", "export_dir": "an exported folder",
}


@dataclasses.dataclass(frozen=True)
class Registered:
    """A public entry point that reads a user's file: `function(argument)`, opening `files`, each a
    (name inside the argument, "" for the argument itself; its kind in KINDS)."""

    name: str
    function: Callable
    argument: str
    files: tuple[tuple[str, str], ...]


READERS: dict[str, Registered] = {}


def registers(argument: str, *files: tuple[str, str]):
    """Decorator registering a reader (see `Registered`); each file it lists must be opened through
    this module, so the tests' hostile files at that name are refused by name."""
    assert argument in ARGUMENTS and files and all(kind in KINDS for _, kind in files), (argument, files)

    def decorate(function):
        name = f"{function.__module__}.{function.__qualname__}"
        READERS[name] = Registered(name, function, argument, tuple(files))
        return function
    return decorate
