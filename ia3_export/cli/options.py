"""One module per command; each defines `command`, a click command. Imported lazily by cli.py."""
import click


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
