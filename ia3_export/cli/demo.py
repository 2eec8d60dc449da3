"""`ia3-export demo`: the main job end to end on the embedded default (no arguments needed)."""
import click

from .options import OutputPath


@click.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, type=OutputPath("workdir"),
              help="Where the demo writes its models, adapters and exports.")
@click.option("--quick", is_flag=True, help="Fewer training epochs (what CI runs).")
def command(workdir, quick):
    """Train, fold, export and check on the embedded default model and data."""
    from ..examples.demo import run_demo

    run_demo(workdir, quick=quick)
