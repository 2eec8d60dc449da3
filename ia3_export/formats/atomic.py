"""Write an output all at once: build it beside the target, rename when complete.

A failure (or a kill) mid-way leaves either the old output or nothing, never a half-written one.
The rules every writer gets from here, so no command can forget one:
- an output never is, holds or lies inside one of its inputs (real paths: symlinks cannot hide
  it), `--force` or not, so no command can destroy what it reads;
- an existing output is replaced only with `--force`, also when it appeared while this run was
  working (another run writing the same path): the final rename refuses to replace it
  (Linux `renameat2(RENAME_NOREPLACE)`, else a portable fallback), so of two racing runs one
  wins and the other says so instead of silently replacing the first one's output;
- outputs follow the umask like any file the user makes (not mkdtemp's private 0700/0600);
- a failed write names the real output and the OS reason, never the hidden temporary;
- an output path is never a link, device, FIFO or socket (`check_target`, --force or not: as root,
  replacing /dev/null would replace the machine's /dev/null), nor a folder for a file or the reverse;
- `--force` replaces a folder only if everything in it was written here: every folder made here
  holds a marker (`MARKER`) listing what this package wrote into it, and anything else inside
  (a user's file) makes `--force` refuse, so no command deletes what it did not write (`_foreign`);
- files inside an output are opened for writing only through `open_for_writing`, which refuses a
  path outside an open output block, and tensors are checked finite before they are written
  (`check_finite`).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import stat
import sys
import tempfile

import numpy as np

from ..errors import IA3Error
from .reader import file_type, read_bytes

# In every output folder made here: the paths (relative, sorted) this package wrote into it.
MARKER = ".ia3-export"
# Exports from versions before the marker are recognised by their manifest (formats/manifest.py's
# MANIFEST_NAME and FORMAT; that module writes through this one, so it cannot be imported here).
LEGACY_MANIFEST, LEGACY_FORMAT = "ia3_export.json", "ia3-export"
KINDS = ("folder", "file", "workdir")  # an output folder, an output file, a folder outputs are written into
_OPEN: set[str] = set()  # the temporaries of the output blocks open now
_LEFT_BEHIND = re.compile(r"^\..+\.(tmp|old)-")  # `_temporary`'s and `_commit`'s names, which a kill can leave


def check_output(path: str, force: bool = False, inputs=(), kind: str = "folder") -> None:
    """Fail fast, before any work: the output may not be one of the `inputs` (files or folders the
    run reads), hold one or lie inside one; it must be a target `check_target` accepts for `kind`;
    an existing output needs `force` (a workdir is written into, never replaced: it needs none)."""
    for source in inputs:
        if source:
            _refuse_overlap(os.path.abspath(path), os.path.abspath(source))
    check_target(path, kind)
    if os.path.lexists(path) and not force and kind != "workdir":
        raise IA3Error(f"output {os.path.abspath(path)} already exists; choose another path or pass --force to replace it")


def check_target(path: str, kind: str = "folder") -> None:
    """Refuse, by name and --force or not, an output path that is a symbolic link, a device, a FIFO
    or a socket (replacing it would replace the device or the link); a folder where a file is
    written or the reverse; or an existing output folder holding anything this package did not
    write (`_foreign`). A workdir (`kind`) is a folder outputs are written into, never replaced."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a parent that is a file fails the write)
        return
    except OSError as e:
        raise IA3Error(f"output {path}: cannot be checked ({e.strerror}); choose another path") from None
    if stat.S_ISLNK(info.st_mode):
        raise IA3Error(f"output {path} is a symbolic link (to {os.readlink(path)}); outputs are never written over or "
                       "through a link, --force or not: remove the link or choose another path")
    what = file_type(info.st_mode)
    if what not in (None, "a folder"):
        raise IA3Error(f"output {path} is {what}; outputs are written only as regular files and folders, never over "
                       "a device, FIFO or socket (--force or not): choose another path")
    if kind == "file" and what:
        raise IA3Error(f"output {path} is a folder; this output is a file: choose a file path")
    if kind != "file" and not what:
        raise IA3Error(f"output {path} is a file; this output is a folder: choose another path")
    foreign = _foreign(path) if kind == "folder" else None
    if foreign is not None:
        raise IA3Error(f"output {path} holds {foreign}, which ia3-export did not write; --force replaces only what "
                       "ia3-export wrote (never other files): move it out, or choose another path")


def _foreign(folder: str) -> str | None:
    """The first thing in `folder` this package did not write (a path relative to it), or None.

    Written here: what the folder's MARKER lists; all of a folder from an older version that holds
    our manifest (exports only: older adapter and merge folders cannot be told from a user's own,
    so they are refused); and a folder without a marker that holds only folders written here
    (training's checkpoints folder, the demo's workdir), or this module's own temporaries left by a
    kill (`_LEFT_BEHIND`). An empty folder holds nothing to lose."""
    listed = _listed(folder)
    if listed is not None:
        extra = sorted(_tree(folder) - listed - {MARKER})
        return extra[0] if extra else None
    if _legacy_export(folder):
        return None
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        inner = _foreign(full) if os.path.isdir(full) and not os.path.islink(full) else ""
        if inner is not None and not _LEFT_BEHIND.match(name):
            return os.path.join(name, inner) if inner else name
    return None


def _tree(folder: str) -> set[str]:
    """Every file and folder under `folder` (relative paths; links are not followed)."""
    found = set()
    for parent, folders, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(parent, n), folder) for n in folders + files)
    return found


def _listed(folder: str) -> set[str] | None:
    """The paths the folder's marker lists; None without a readable marker."""
    path = os.path.join(folder, MARKER)
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        listed = json.loads(read_bytes(path, "json")).get("files")
    except (IA3Error, OSError, ValueError, AttributeError):
        return None
    return set(listed) if isinstance(listed, list) and all(isinstance(p, str) for p in listed) else None


def _legacy_export(folder: str) -> bool:
    path = os.path.join(folder, LEGACY_MANIFEST)
    try:
        return (not os.path.islink(path) and os.path.isfile(path)
                and json.loads(read_bytes(path, "json")).get("format") == LEGACY_FORMAT)
    except (IA3Error, OSError, ValueError, AttributeError):
        return False


def remove_output(folder: str) -> bool:
    """Remove a folder this package wrote (by `_foreign`'s rule); False, and nothing removed, when
    it holds anything else or is not a real folder."""
    if os.path.islink(folder) or not os.path.isdir(folder) or _foreign(folder) is not None:
        return False
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=os.path.dirname(os.path.abspath(folder)))
    os.rename(folder, os.path.join(trash, "old"))
    shutil.rmtree(trash, ignore_errors=True)
    return True


def open_for_writing(path: str, mode: str = "w", **kwargs):
    """Open a file inside an open output block's temporary for writing (text is UTF-8): the one way
    this package opens a file for writing, so nothing is written beside the atomic rules. A path
    outside every open block is a bug (RuntimeError)."""
    real = os.path.abspath(path)
    if not any(real.startswith(tmp + os.sep) or real == tmp for tmp in _OPEN):
        raise RuntimeError(f"{path} is not inside an output block; write it through atomic_output_dir/file")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return open(path, mode, **kwargs)


def check_finite(tensors: dict, where: str, dtype=None) -> None:
    """Refuse to write a tensor holding inf or NaN, naming it, the value and the fix. With `dtype`
    (numpy), the values are checked as they will be stored: an entry beyond float16's range
    (65504) becomes inf when cast, and an export or conversion to that type must say so."""
    for name, value in tensors.items():
        if hasattr(value, "detach"):  # a torch tensor (a bfloat16 head: numpy has no bfloat16)
            value = value.detach().float().cpu().numpy()
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            stored = array if dtype is None else array.astype(dtype)
        bad = ~np.isfinite(stored)
        if not bad.any():
            continue
        value = array.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
        if np.isfinite(value):
            limit = np.finfo(dtype).max
            raise IA3Error(f"{where}: {name} holds {float(value):g}, beyond {np.dtype(dtype).name}'s range "
                           f"(+-{float(limit):g}): it would be stored as inf; keep the adapter in float32 (export with --dtype fp32), "
                           "or scale the vector (retrain) so its entries stay within that range")
        raise IA3Error(f"{where}: {name} holds {value} (not a finite number): the adapter is broken (a diverged "
                       "training?); retrain it, or repair that tensor")


def _refuse_overlap(out: str, source: str) -> None:
    real_out, real_in = os.path.realpath(out), os.path.realpath(source)
    same = real_out == real_in or (os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source))
    common = os.path.commonpath([real_out, real_in])
    relation = "is" if same else "contains" if common == real_out else "lies inside" if common == real_in else None
    if relation:
        raise IA3Error(f"output {out} {relation} the input {source}; an output may not replace or go inside what "
                       "the command reads (--force or not): choose another output path")


@contextlib.contextmanager
def atomic_output_dir(path: str, force: bool = False, inputs=()):
    """Yield a temporary folder that becomes `path` when the block finishes without error."""
    with _atomic(path, force, inputs, folder=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_output_file(path: str, force: bool = False, inputs=()):
    """Yield a temporary file path that becomes `path` when the block finishes without error."""
    with _atomic(path, force, inputs, folder=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic(path: str, force: bool, inputs, folder: bool):
    path = os.path.abspath(path)
    check_output(path, force, inputs, "folder" if folder else "file")
    made = _missing_folders(os.path.dirname(path))
    tmp = _temporary(path, folder)
    _OPEN.add(tmp)
    try:
        yield tmp
        if folder:
            _mark(tmp)
        _follow_umask(tmp)
        _commit(tmp, path, force, folder)
    except BaseException as e:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        for parent in made:  # folders made for this output go again (if nothing else was put there)
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        named = _name_the_output(e, tmp, path)
        if named is e:
            raise
        raise named from None
    finally:
        _OPEN.discard(tmp)


def _mark(tmp: str) -> None:
    """Write the marker: what this package wrote into the output folder (see `_foreign`)."""
    files = sorted(_tree(tmp) - {MARKER})
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump({"written_by": "ia3-export", "files": files}, f, indent=1)
        f.write("\n")


def _missing_folders(folder: str) -> list[str]:
    """The folders above an output that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.exists(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _temporary(path: str, folder: bool) -> str:
    """A new hidden folder or empty file beside `path` (private until it is complete)."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        if folder:
            return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        os.close(fd)
        return tmp
    except OSError as e:
        raise IA3Error(f"cannot write to {parent} ({e.strerror}); choose a writable output folder") from None


def _follow_umask(tmp: str) -> None:
    """Give the output and everything in it the modes the umask gives (folders 0o777, files 0o666
    less the umask): mkdtemp/mkstemp and some writers (safetensors) make them private (0700/0600),
    which a service account reading the output under umask 022 cannot open."""
    mask = _umask()
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~mask)
    for parent, folders, files in os.walk(tmp):  # nothing for a file
        for name, mode in [(n, 0o777) for n in folders] + [(n, 0o666) for n in files]:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), mode & ~mask)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells (other threads may be writing)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _commit(tmp: str, path: str, force: bool, folder: bool) -> None:
    """Rename tmp to path. Without force an output that exists by now (another run made it) stays;
    with force a file is replaced atomically, a folder is moved aside first and removed after."""
    if force:  # what is there now (perhaps made while this run worked) must still be replaceable
        check_target(path, "folder" if folder else "file")
    if force and not folder:
        os.replace(tmp, path)
        return
    trash = None
    for attempt in range(100):
        if force and os.path.lexists(path):
            trash = trash or tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
            with contextlib.suppress(FileNotFoundError):  # another --force run moved it first
                os.rename(path, os.path.join(trash, f"old-{attempt}" if attempt else "old"))
        if _rename_noreplace(tmp, path):
            if trash:  # only once the new output is in place: a failure before leaves the old one aside
                shutil.rmtree(trash, ignore_errors=True)
            return
        if not force:
            raise IA3Error(f"output {path} appeared while this run was writing it (another run writing the same "
                           "output?); it was left as it is: choose another path or pass --force to replace it")
    raise IA3Error(f"output {path} kept reappearing while this run replaced it; stop the other runs writing it")


RENAME_NOREPLACE = 1  # linux/fs.h
AT_FDCWD = -100


@functools.cache
def _renameat2():
    """libc's renameat2 (glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _rename_noreplace(src: str, dst: str) -> bool:
    """Rename src to dst unless dst exists, in one atomic step; False (and nothing moved) when it exists."""
    sys.audit("os.rename", src, dst, -1, -1)  # the event os.rename raises: audit hooks see the commit
    rename = _renameat2()
    if rename is not None:
        if rename(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # else: this file system lacks the flag
            raise OSError(code, os.strerror(code), dst)
    return _rename_noreplace_portable(src, dst)


def _rename_noreplace_portable(src: str, dst: str) -> bool:
    """Without renameat2: a folder rename refuses a non-empty target (every output folder holds files);
    a file is hard-linked (which refuses an existing name) and the temporary name removed."""
    try:
        if os.path.isdir(src):
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.remove(src)
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        if os.path.isdir(src) or os.path.lexists(dst):
            raise
    os.rename(src, dst)  # no hard links on this file system: the name was free a moment ago
    return True


# How writers in native code (safetensors' Rust I/O, ONNX Runtime, torch.save) word a failed write;
# some say no more than that, so the OS reason is then diagnosed (`_os_reason`).
_WRITE_FAILURES = ("I/O error", "No space left on device", "File too large", "Disk quota exceeded",
                   "Read-only file system", "Failed to write", "file write failed", "unexpected pos")


def _name_the_output(error: BaseException, tmp: str, path: str) -> BaseException:
    """The error to show for a failure inside the block: one that names `path` (never the hidden
    temporary) and, for a failed write, the OS reason. Other failures pass unchanged."""
    def real(text: str) -> str:
        return text.replace(tmp, path)

    if isinstance(error, IA3Error):  # e.g. a nested writer's message: same type, real names
        cause = error.__cause__ and _name_the_output(error.__cause__, tmp, path)
        if cause is not None and cause is not error.__cause__:
            return cause  # a step that wrapped a failed write (e.g. the ONNX exporter's): the write is the news
        error.args = tuple(real(a) if isinstance(a, str) else a for a in error.args)
        return error
    if isinstance(error, OSError):
        target = real(os.fsdecode(error.filename)) if error.filename is not None else path
        if error.filename is not None and not (target == path or target.startswith(path + os.sep)):
            return error  # reading an input failed: its own message names it
        reason = error.strerror or str(error)
    else:
        text = str(error)
        found = [text.index(f) for f in _WRITE_FAILURES if f in text] if isinstance(error, Exception) else []
        if not found:
            return error
        target, reason = path, real(text[min(found):].splitlines()[0][:200])
        diagnosis = _os_reason(os.path.dirname(path))
        if diagnosis and diagnosis.split(":")[0] not in reason:
            reason += f" ({diagnosis})"
    return IA3Error(f"cannot write {target}: {reason}; check free space, quotas and permissions")


def _os_reason(folder: str) -> str | None:
    """Why a write under `folder` fails, for writers that only say that it failed."""
    try:
        import resource

        stats = os.statvfs(folder)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError):
        return None
    if stats.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if stats.f_bavail == 0:
        return os.strerror(errno.ENOSPC)
    if limit != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)}: this process may write files of at most {limit} bytes (ulimit -f)"
    return None
