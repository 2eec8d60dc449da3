"""One module per command; each defines `command`, a click command. Imported lazily by cli.py."""
import math
import os

import click

from ..errors import IA3Error


class OutputPath(click.Path):
    """The type of every option or argument naming an output: a "folder" or "file" the command
    writes (replaced only with --force), or a "workdir" it writes its outputs into. The one writer's
    target rules (`formats.atomic.check_target`: never a link, device, FIFO or socket; a folder
    only if everything in it is ours) hold as the command line is parsed, before any work, and
    tests/cli/test_outputs.py walks every parameter of this type of every command with hostile
    targets, so a new output option is tested by being declared with it."""

    def __init__(self, kind: str):
        super().__init__(file_okay=kind == "file", dir_okay=kind != "file")
        self.kind = kind

    def convert(self, value, param, ctx):
        from ..formats.atomic import check_target

        check_target(os.fspath(value), self.kind)
        return super().convert(value, param, ctx)


def trust_remote_code_option(command):
    """`--trust-remote-code`, for commands that load a model folder: off, a folder shipping its own code is refused."""
    return click.option("--trust-remote-code", is_flag=True,
                        help="Run the Python code a model folder ships (auto_map in config.json). Only for folders "
                             "you trust: that code runs with your permissions.")(command)


def progress_option(command):
    """`--quiet` for long commands: without it, stage lines go to stderr when it is a terminal."""

    def show(ctx, param, quiet):
        if not quiet:
            from ..progress import show_on_terminal

            show_on_terminal()

    return click.option("--quiet", is_flag=True, expose_value=False, callback=show, is_eager=True,
                        help="No progress lines (they are shown only on a terminal anyway).")(command)


class IntRange(click.IntRange):
    """click's IntRange whose refusal is our one line (`--seed is -1; give a whole number in the range
    0<=x<=4294967295`, exit 2), as every other bad input is. Every INT option takes one of these
    (tests/cli/test_options.py walks the commands)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            raise _refusal(value, param, self, "a whole number") from None


class FloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities too, in our one line (see IntRange)."""

    def convert(self, value, param, ctx):
        try:
            number = super().convert(value, param, ctx)
        except click.BadParameter:
            raise _refusal(value, param, self, "a finite number") from None
        if not math.isfinite(number):
            raise _refusal(number, param, self, "a finite number")
        return number


def _refusal(value, param, kind, what: str) -> IA3Error:
    try:
        shown = repr(float(value)) if isinstance(kind, click.FloatRange) else str(int(value))
    except (TypeError, ValueError, OverflowError):
        shown = repr(value)
    flag = param.opts[0] if param is not None and param.opts else "the value"
    return IA3Error(f"{flag} is {shown}; give {what} in the range {kind._describe_range()}")
