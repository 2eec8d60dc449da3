"""The adapters a server offers, added and removed while it serves.

A generation reads its adapter at every decode step, so an adapter must not vanish (or change)
under a request that is running. The pool counts the requests using each adapter: removing one
refuses new requests for it at once and unloads it when the last running request ends; adding
refuses a name that is loaded or still leaving (remove it first), so a name never changes meaning
while it is in use. The pool's lock, which every request takes, is never held while a file is read:
an adapter is read and checked first, then swapped in under the lock.
"""
from __future__ import annotations

import collections
import threading

from ..errors import IA3Error, quoted
from ..runtime.adapters import check_name, resolve

MAX_ADAPTERS = 256  # a server's default bound: every added name holds its vectors in memory (~1.7 MB on a 7B Llama)


class AdapterPool:
    def __init__(self, session, limit: int = MAX_ADAPTERS):
        """`limit`: the most adapters loaded at once; an add past it is refused (names are the client's to
        choose, so one folder loaded under ever new names would otherwise fill the memory)."""
        self.session, self.limit = session, limit
        self._lock = threading.Lock()
        self._in_use: collections.Counter = collections.Counter()
        self._leaving: set[str] = set()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n in self.session.adapters if n not in self._leaving)

    def in_use(self) -> dict[str, int]:
        """Adapter name -> requests running with it now (a removed adapter drains until this is 0)."""
        with self._lock:
            return dict(self._in_use)

    def add(self, source: str, name: str | None = None) -> str:
        """Load a PEFT folder, an .onnx_adapter file or a name shipped in the folder; returns its name."""
        name = check_name(name) if name else resolve(self.session.folder, source)[0]
        with self._lock:
            self._refuse_taken(name)  # before the read, which may be slow
        adapter = self.session.read_adapter(source, name=name)  # no lock held: requests go on
        with self._lock:
            self._refuse_taken(name)  # again: another add may have won while this one read
            return self.session.add_adapter(adapter)

    def _refuse_taken(self, name: str) -> None:
        if len(self.session.adapters) >= self.limit:
            raise IA3Error(f"{len(self.session.adapters)} adapters are loaded, the most this server holds "
                           f"(--max-adapters {self.limit}); unload one first, or start the server with a larger "
                           "--max-adapters")
        if name in self._leaving:
            raise IA3Error(f"adapter {name!r} is being removed ({self._in_use[name]} requests still use it); "
                           "add it again once it is gone")
        if name in self.session.adapters:
            raise IA3Error(f"adapter {name!r} is already loaded; remove it first to replace it")

    def remove(self, name: str) -> str:
        """Stop offering `name`; returns "removed", or "draining" while requests still use it."""
        with self._lock:
            if name not in self.session.adapters or name in self._leaving:
                raise IA3Error(f"adapter {quoted(name)} is not loaded (loaded: {self._loaded()})")
            if self._in_use[name]:
                self._leaving.add(name)
                return "draining"
            self.session.unload_adapter(name)
            return "removed"

    def acquire(self, name: str | None) -> None:
        """Take `name` (None: the base model) for one request; an IA3Error if it is not offered."""
        if name is None:
            return
        with self._lock:
            if name not in self.session.adapters or name in self._leaving:
                raise IA3Error(f"adapter {quoted(name)} is not loaded (loaded: {self._loaded()}); add it through the "
                               "`adapters` model or start the server with --adapter")
            self._in_use[name] += 1

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self._lock:
            self._in_use[name] -= 1
            if not self._in_use[name]:
                del self._in_use[name]
                if name in self._leaving:
                    self._leaving.discard(name)
                    self.session.unload_adapter(name)

    def _loaded(self) -> str:
        return ", ".join(sorted(n for n in self.session.adapters if n not in self._leaving)) or "none"
