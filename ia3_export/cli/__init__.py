"""The `ia3-export` command line: parses arguments and calls the API; no logic of its own.

Commands live in `ia3_export.cli.<name>` and are imported only when run, so `--help`
answers without importing torch. Every failure is one line on stderr: exit 2 for bad usage or
input, 1 for a check that failed, 3 for an internal error (a bug: `--debug` or IA3_EXPORT_DEBUG=1
adds the traceback), 130 for Ctrl-C.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

import click

from .. import __version__
from ..errors import IA3Error

# name -> (module in ia3_export.cli, one-line help shown by --help without importing it)
COMMANDS = {
    "demo": ("demo", "Run the main job end to end on the embedded default model and data."),
    "train": ("train", "Train an IA3 adapter; writes a PEFT adapter folder."),
    "merge": ("merge", "Fold an adapter into the weights and save a plain transformers model."),
    "inspect": ("inspect", "Describe an adapter folder, an .onnx_adapter file or an exported ONNX folder."),
    "export": ("export", "Export to ONNX: merged, swappable (vectors as inputs), bank (per-row adapters) or foldswap."),
    "convert": ("convert", "Convert a PEFT adapter to ONNX Runtime's .onnx_adapter for an exported model."),
    "generate": ("generate", "Generate text with an exported model on ONNX Runtime."),
    "parity": ("parity", "Check an exported model against PyTorch on ONNX Runtime (CPU or CUDA)."),
    "serve": ("serve", "Serve an exported folder with many adapters behind Triton Inference Server."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return [name for name, (module, _) in COMMANDS.items() if _available(module)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(COMMANDS[name][0]):
            return None
        return _load(COMMANDS[name][0])

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        from .. import ort

        clash = ort.clash_message(ort.installed()) if ctx.protected_args else None
        if clash:
            click.echo(f"warning: {clash}", err=True)
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own usage errors and exits
        except KeyboardInterrupt:
            click.echo("error: interrupted; outputs appear only when complete, so none is half-written", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # one line, never a traceback, for every failure
            if _debug(ctx) and not isinstance(e, IA3Error):
                traceback.print_exc()
            click.echo("error: " + " ".join(_message(e).split()), err=True)
            sys.exit(_exit_code(e))


EXIT_INTERNAL = 3  # a bug: an exception no check foresaw
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def _exit_code(error: Exception) -> int:
    if isinstance(error, IA3Error):
        return error.exit_code
    if isinstance(error, OSError) or (isinstance(error, ImportError) and error.name in (*_EXTRAS, "onnxruntime")):
        return 2
    return EXIT_INTERNAL


def _message(error: Exception) -> str:
    """The one line for an error: its own message, or what to do about an error nobody foresaw."""
    if isinstance(error, IA3Error):
        return str(error)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror or error}; check the path, permissions and free space"
    if isinstance(error, ImportError) and error.name == "onnxruntime":
        from .. import ort

        return ort.missing_message(error)
    if isinstance(error, ImportError) and _EXTRAS.get(error.name) == "export":
        return (f"this command needs {error.name}; install torch's CPU build first ({TORCH_CPU}; PyPI's default torch is "
                "the multi-GB CUDA build), then: pip install 'ia3-export[export,cpu]' (README: Install)")
    if isinstance(error, ImportError) and error.name in _EXTRAS:
        return f"this command needs {error.name}; install it with: pip install 'ia3-export[{_EXTRAS[error.name]}]'"
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return (f"internal error ({type(error).__name__}{': ' + detail if detail else ''}); rerun with --debug "
            "(or IA3_EXPORT_DEBUG=1) for the traceback, and please report it")


def _debug(ctx) -> bool:
    from .. import ort

    return bool(ctx.params.get("debug")) or ort.debug()


TORCH_CPU = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"  # as the README says
_EXTRAS = {"torch": "export", "transformers": "export", "onnx": "export", "peft": "dev", "matplotlib": "export"}  # the extra that installs each


def _available(module: str) -> bool:
    return importlib.util.find_spec(f"ia3_export.cli.{module}") is not None


def _load(module: str) -> click.Command:
    return importlib.import_module(f"ia3_export.cli.{module}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ia3-export")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an internal error (also: IA3_EXPORT_DEBUG=1).")
def main(debug):
    """Train IA3 adapters and ship them to ONNX Runtime."""
    from .. import ort

    if debug:  # read by ia3_export.ort (ORT's warnings) here and in every process we start
        os.environ["IA3_EXPORT_DEBUG"] = "1"
    ort.telemetry_off()


if __name__ == "__main__":
    main()
