"""Text <-> token ids with the `tokenizers` library reading the folder's tokenizer.json
(not transformers: the serving install has no transformers), giving the same ids and text as
transformers' AutoTokenizer on the same folder.

transformers does more than load tokenizer.json, and each difference changes what a model sees:
- the padding and truncation stored in tokenizer.json (MiniLM's pads every text to 128) are
  turned off for each call unless asked; the runtime pads batches itself (left, with the mask);
- special tokens come from tokenizer.json's post-processor alone (transformers 5 drops
  tokenizer_config.json's `add_bos_token` / `add_eos_token` when tokenizer.json exists);
- named special tokens of tokenizer_config.json missing from tokenizer.json are added;
- decoding skips special tokens and, when tokenizer_config.json asks for it (and the model is
  not BPE), cleans up tokenization spaces (" ." -> ".", " n't" -> "n't", ...).

A tokenizer.json is untrusted input: its pre-tokenizer regex runs in Rust (Oniguruma), where a
backtracking pattern can panic ("retry-limit-in-match over"; pyo3's PanicException is a
BaseException) or take minutes on a long text, and neither can be stopped inside this process. A
session therefore tokenizes through `IsolatedTokenizer`: `TextTokenizer` in a child process, each
call within a time limit; a child that panics, dies or runs out of time is killed and the call is
one IA3Error, the next call gets a fresh child. Text is checked (`requests.prompt_text`) before it
is sent.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref

from ..errors import IA3Error
from ..formats.jsonfile import check_depth, parse_json
from ..formats.reader import present, read_bytes, read_text, registers
from .requests import MAX_TEXT_BYTES, Limits, prompt_text

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization, in its order
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@registers("export_dir", ("tokenizer.json", "tokenizer"), ("tokenizer_config.json", "tokenizer"))
class TextTokenizer:
    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.folder, self._chat = folder, None
        path = os.path.join(folder, "tokenizer.json")
        if not present(path):  # anything there is read, and refused by name if it is no regular file
            raise IA3Error(f"{folder} has no tokenizer.json; export from a model folder with a fast tokenizer, "
                           "or pass token ids to the runtime directly")
        text = read_text(path, "tokenizer")
        check_depth(text, path)  # the same nesting rule as every JSON file we read
        try:
            self.tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise IA3Error(f"{path}: not a readable tokenizer ({str(e)[:200]})") from None
        config = _read_config(os.path.join(folder, "tokenizer_config.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._add_named_special_tokens(config)
        self.tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        bpe_ok = type(self.tokenizer.model).__name__ != "BPE" or config.get(  # transformers skips it for BPE
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False) and bpe_ok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the special tokens the folder's tokenizer adds (unless told not to: a chat
        template writes its own); never padded or truncated."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def chat(self, messages: list, max_text_bytes: int = MAX_TEXT_BYTES) -> list[int]:
        """A chat's prompt ids: the folder's chat template rendered (runtime/chat.py; its text at most
        `max_text_bytes`), encoded without adding special tokens (the template wrote them)."""
        from .chat import ChatTemplate

        self._chat = self._chat or ChatTemplate(self.folder)
        return self.encode(self._chat.render(messages, max_text_bytes), add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens, as transformers' decode(ids, skip_special_tokens=True)."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.clean_up_spaces:
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's own text, special tokens included (`</s>`): how a log-probability names its token."""
        return [self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]

    def _add_named_special_tokens(self, config: dict) -> None:
        from tokenizers import AddedToken

        known = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in (_token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS) if t and t not in known]
        if missing:
            self.tokenizer.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])


def _read_config(path: str) -> dict:
    if not os.path.lexists(path):
        return {}
    config = parse_json(read_bytes(path, "tokenizer"), path)  # size and depth capped
    return config if isinstance(config, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class IsolatedTokenizer:
    """`TextTokenizer`'s encode and decode, run in child processes (one per concurrent caller, kept
    for the next call), each call within `limits.tokenizer_timeout_s`. `encode` checks the text
    first (`requests.prompt_text`). A failed call (the tokenizer raised or panicked, the child died
    or ran out of time) is one IA3Error; a child that panicked or timed out is killed, never reused."""

    def __init__(self, folder: str, limits: Limits | None = None):
        self.folder, self.limits = folder, limits or Limits()
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        # a dropped session's children stop at once, not when this process ends
        weakref.finalize(self, _stop, self._idle, self._lock)
        self._give(self._take())  # a missing or unreadable tokenizer fails here, once

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the special tokens the folder's tokenizer adds (unless told not to); never
        padded or truncated."""
        return self._call("encode", prompt_text(text, self.limits.max_text_bytes), bool(add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens, as transformers' decode(ids, skip_special_tokens=True)."""
        return self._call("decode", [int(i) for i in ids])

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's own text, special tokens included, in one call."""
        return self._call("pieces", [int(i) for i in ids])

    def chat(self, messages: list) -> list[int]:
        """A chat's prompt ids (`TextTokenizer.chat`): the chat template is untrusted code too, so it renders
        in the child, within the same time limit, its text within the prompt's byte limit."""
        return self._call("chat", messages, self.limits.max_text_bytes)

    def close(self) -> None:
        """Stop the waiting children now (a later call starts a new one; they also stop when this session
        is dropped or this process ends)."""
        _stop(self._idle, self._lock)

    def _call(self, op: str, *args):
        worker = self._take()
        try:
            value = worker.ask([op, list(args)], self.limits.tokenizer_timeout_s)
        except BaseException:
            worker.kill()
            raise
        self._give(worker)
        return value

    def _take(self) -> "_Worker":
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _SPAWNER.submit(_Worker, self.folder).result()

    def _give(self, worker: "_Worker") -> None:
        with self._lock:
            self._idle.append(worker)


def _stop(idle: list, lock: threading.Lock) -> None:
    with lock:
        workers = idle[:]
        idle.clear()
    for worker in workers:
        worker.kill()


START_TIMEOUT_S = 120.0  # loading a large tokenizer.json on a busy machine
# What one request may allocate in the child beyond the loaded tokenizer: a 1 MiB prompt needs ~100 MiB
MEMORY_HEADROOM_MIB = 1024
# Children are started from one long-lived thread: PR_SET_PDEATHSIG fires when the THREAD that started
# a child ends, and a request thread may end while its child waits in the pool.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ia3-tokenizer-spawner")
_HEADER = struct.Struct("<Q")


class _Worker:
    """One child process running `_serve` on a folder: [op, args] in, ["ok"|"error", value] out, as
    length-prefixed JSON (text and token ids only: nothing that could run as code crosses the pipe)."""

    def __init__(self, folder: str):
        code = "from ia3_export.runtime.tokenizer import _serve; _serve()"
        self.process = subprocess.Popen([sys.executable, "-P", "-c", code, folder], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        try:
            self.ask(["ready", []], START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def ask(self, message, timeout_s: float):
        """Send one request; its value, or an IA3Error (the child's own message, a death or the time limit)."""
        try:
            data = json.dumps(message).encode()
            self.process.stdin.write(_HEADER.pack(len(data)) + data)
            self.process.stdin.flush()
            deadline = time.monotonic() + timeout_s
            size = _HEADER.unpack(self._read(_HEADER.size, deadline, timeout_s))[0]
            status, value = json.loads(self._read(size, deadline, timeout_s))
        except (OSError, EOFError, ValueError, struct.error):
            code = self.process.poll()
            raise IA3Error(f"the tokenizer's process stopped (exit code {code}) on this request; the folder's "
                           "tokenizer.json is broken or hostile: fix or replace it") from None
        if status == "error":
            raise IA3Error(value)
        return value

    def _read(self, size: int, deadline: float, timeout_s: float) -> bytes:
        out, fd = bytearray(), self.process.stdout.fileno()
        while len(out) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise IA3Error(f"the tokenizer took longer than {timeout_s:g} s on this request and was stopped; "
                               "send a shorter text, or fix the folder's tokenizer.json (a pre-tokenizer regex "
                               "that backtracks) or chat template (a loop)")
            chunk = os.read(fd, size - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _serve() -> None:
    """The child's loop: load the folder's tokenizer, answer requests until the parent closes the pipe.

    stdout is kept for the answers (fd 1 then points at stderr, which is /dev/null: Rust's panic
    report goes nowhere); the child dies with its parent (PR_SET_PDEATHSIG) so a stuck regex never
    outlives a killed server."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    _die_with_parent()
    tokenizer, error = None, None
    try:
        tokenizer = TextTokenizer(sys.argv[1])
    except IA3Error as e:
        error = str(e)
    except BaseException as e:  # noqa: BLE001 - a panic while loading
        error = f"{sys.argv[1]}: the tokenizer cannot be loaded ({_describe(e)}); fix or replace tokenizer.json"
    _cap_memory()
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        op, args = json.loads(inp.read(_HEADER.unpack(header)[0]))
        if error is not None:
            _answer(out, ["error", error])
            return
        try:
            value = None if op == "ready" else getattr(tokenizer, op)(*args)
        except IA3Error as e:  # a request the chat template refused (a role it does not know, text too long)
            _answer(out, ["error", str(e)])
            continue
        except MemoryError:
            _answer(out, ["error", f"the tokenizer needed more than {MEMORY_HEADROOM_MIB} MiB of memory on this "
                                   "request and was stopped; send a shorter text, or fix the folder's chat template "
                                   "(a value that keeps growing) or tokenizer.json"])
            return  # its memory is not given back: a fresh process for the next call
        except BaseException as e:  # noqa: BLE001 - PanicException is a BaseException; nothing else runs here
            _answer(out, ["error", f"the tokenizer failed on this request ({_describe(e)}); the folder's "
                                   "tokenizer.json is broken or hostile: fix or replace it"])
            return  # a panicked tokenizer may be left half-changed: the next call gets a fresh process
        _answer(out, ["ok", value])


def _answer(out, message) -> None:
    data = json.dumps(message).encode()
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _cap_memory() -> None:
    """Cap the child's data (RLIMIT_DATA: heap and private writable mappings) at what it holds now plus
    MEMORY_HEADROOM_MIB, so a request that grows without bound (a chat template doubling a string with
    `~`, which writes almost nothing, so no byte limit sees it) fails here with a MemoryError, or a Rust
    abort, instead of taking the server's machine to its out-of-memory killer."""
    import resource

    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = held + MEMORY_HEADROOM_MIB * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
