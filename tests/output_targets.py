"""Hostile targets for output tests (tests/formats/test_writers.py walks the API outputs with them,
tests/cli/test_outputs.py every output option of every command)."""
from __future__ import annotations

import os
import socket
import stat


def _device(tmp_path) -> str:
    """A character device to aim at: a /dev/null twin made here when root (a failed guard harms
    nothing real), else /dev/null itself (which the test cannot replace anyway)."""
    if os.geteuid() != 0:
        return "/dev/null"
    path = str(tmp_path / "null")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return path


def hostile(tmp_path, case: str):
    """(target path, message, check that it is untouched) for one hostile target."""
    if case == "char-device":
        path = _device(tmp_path)
        return path, "is a character device", lambda: stat.S_ISCHR(os.lstat(path).st_mode)
    if case == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
        return path, "is a FIFO", lambda: stat.S_ISFIFO(os.lstat(path).st_mode)
    if case == "socket":
        path = str(tmp_path / "sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.close()
        return path, "is a socket", lambda: stat.S_ISSOCK(os.lstat(path).st_mode)
    if case == "symlink-to-a-file-elsewhere":
        (tmp_path / "elsewhere").mkdir()
        target = tmp_path / "elsewhere" / "precious.txt"
        target.write_text("precious")
        path = str(tmp_path / "link")
        os.symlink(target, path)
        return path, "is a symbolic link", lambda: os.readlink(path) == str(target) and target.read_text() == "precious"
    if case == "folder-not-ours":
        path = tmp_path / "mine"
        path.mkdir()
        (path / "notes.txt").write_text("mine")
        return str(path), "holds notes.txt, which ia3-export did not write", lambda: (
            os.listdir(path) == ["notes.txt"] and (path / "notes.txt").read_text() == "mine")
    raise ValueError(case)


HOSTILE = ["char-device", "fifo", "socket", "symlink-to-a-file-elsewhere", "folder-not-ours"]
