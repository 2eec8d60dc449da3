"""`ia3-export merge MODEL_DIR ADAPTER_DIR --out MERGED_DIR`."""
import click

from . import progress_option


@click.command("merge")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the merged model.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@progress_option
def command(model_dir, adapter_dirs, out_dir, force):
    """Fold one or more adapters (their product) into MODEL_DIR's weights and save a plain model."""
    from ..merge import merge_to_folder

    report = merge_to_folder(model_dir, list(adapter_dirs), out_dir, force=force)
    click.echo(report)
