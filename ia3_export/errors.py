"""One exception family, so the command line turns every expected failure into one clear line.

`IA3Error` is bad input or bad usage (exit 2); `CheckFailed` is a check that ran and found a
difference (exit 1). The message always says what is wrong and what to do about it. Anything
else reaching the command line is a bug: one line, exit 3 (`--debug` shows the traceback); Ctrl-C
is one line, exit 130 (see `ia3_export.cli`).
"""


class IA3Error(Exception):
    """Bad input or usage: the message names the problem and the fix. Exit code 2."""

    exit_code = 2


class CheckFailed(IA3Error):
    """A validation or parity check ran and failed. Exit code 1."""

    exit_code = 1
