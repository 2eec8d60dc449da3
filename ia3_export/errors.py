"""One exception family, so the command line turns every expected failure into one clear line.

`IA3Error` is bad input or bad usage (exit 2); `CheckFailed` is a check that ran and found a
difference (exit 1). The message always says what is wrong and what to do about it. Anything
else reaching the command line is a bug: one line, exit 3 (`--debug` shows the traceback); Ctrl-C
is one line, exit 130 (see `ia3_export.cli`).

A message may quote what a client sent (a name, a path): `quoted` keeps such a quote short, and every
message is capped at `MAX_MESSAGE` characters here, where every error passes, so a 10,000-character
name never comes back to a client, a log or a terminal in full.
"""

MAX_MESSAGE = 2000  # characters; past it the middle goes, the start (what is wrong) and the end (the fix) stay
MAX_QUOTE = 80


def clipped(text: str, limit: int = MAX_QUOTE) -> str:
    """`text`, its middle cut past `limit` characters (its length said), for quoting what a client sent."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return f"{text[:head]}...{text[head - limit:]} ({len(text):,} characters)"


def quoted(value, limit: int = MAX_QUOTE) -> str:
    """`repr(value)`, clipped."""
    return clipped(repr(value), limit)


def capped(message):
    """A message of at most about `MAX_MESSAGE` characters: its start and its end (the fix) kept."""
    if not isinstance(message, str) or len(message) <= MAX_MESSAGE:
        return message
    cut = len(message) - MAX_MESSAGE + 40
    return f"{message[:1400]} [... {cut:,} characters ...] {message[1400 + cut:]}"


class IA3Error(Exception):
    """Bad input or usage: the message names the problem and the fix. Exit code 2."""

    exit_code = 2

    def __init__(self, message="", *args):
        super().__init__(capped(message), *args)


class CheckFailed(IA3Error):
    """A validation or parity check ran and failed. Exit code 1."""

    exit_code = 1
