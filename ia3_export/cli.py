"""The `ia3-export` command line: parses arguments and calls the API; no logic of its own.

Commands live in `ia3_export.commands.<name>` and are imported only when run, so `--help`
answers without importing torch. Every expected failure is one line on stderr: exit 2 for
bad usage or input, 1 for a check that failed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__

# name -> (module in ia3_export.commands, one-line help shown by --help without importing it)
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
        from . import ort

        clash = ort.clash_message(ort.installed()) if ctx.protected_args else None
        if clash:
            click.echo(f"warning: {clash}", err=True)
        try:
            return super().invoke(ctx)
        except Exception as e:  # one line, never a traceback, for every expected failure
            from .errors import IA3Error

            if isinstance(e, IA3Error):  # one line, even if a message quotes multi-line text
                click.echo("error: " + " ".join(str(e).split()), err=True)
                sys.exit(e.exit_code)
            if isinstance(e, OSError):
                click.echo(f"error: {e.filename or ''}: {e.strerror or e}; check the path, permissions and free space", err=True)
                sys.exit(2)
            if isinstance(e, ImportError) and e.name == "onnxruntime":
                click.echo(f"error: {ort.missing_message(e)}", err=True)
                sys.exit(2)
            if isinstance(e, ImportError) and e.name in _EXTRAS:
                click.echo(f"error: this command needs {e.name}; install it with: pip install 'ia3-export[{_EXTRAS[e.name]}]'", err=True)
                sys.exit(2)
            raise


_EXTRAS = {"torch": "export", "transformers": "export", "onnx": "export", "peft": "dev", "matplotlib": "train"}


def _available(module: str) -> bool:
    return importlib.util.find_spec(f"ia3_export.commands.{module}") is not None


def _load(module: str) -> click.Command:
    return importlib.import_module(f"ia3_export.commands.{module}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ia3-export")
def main():
    """Train IA3 adapters and ship them to ONNX Runtime."""


if __name__ == "__main__":
    main()
