"""`ia3-export merge MODEL_DIR ADAPTER_DIR... --out MERGED_DIR [--task TASK]`."""
import click

from ..core.loading import TASK_HEADS
from .options import OutputPath, progress_option, trust_remote_code_option

TASKS = [t for t in TASK_HEADS if not t.endswith("-with-past")]


@click.command("merge")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=OutputPath("folder"), help="Folder for the merged model.")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="The head to load; default: the adapters' task_type, else MODEL_DIR's config.json.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@trust_remote_code_option
@progress_option
def command(model_dir, adapter_dirs, out_dir, task, force, trust_remote_code):
    """Fold one or more adapters (their product) into MODEL_DIR's weights and save a plain model."""
    from ..core.merge import merge_to_folder

    report = merge_to_folder(model_dir, list(adapter_dirs), out_dir, force=force, task=task,
                             trust_remote_code=trust_remote_code)
    click.echo(report)
