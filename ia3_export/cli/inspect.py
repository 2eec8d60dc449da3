"""`ia3-export inspect PATH`: an adapter folder, an `.onnx_adapter` file or an exported folder."""
import click


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(path, as_json):
    """Targets, shapes, parameter count and vector statistics of an adapter folder, an .onnx_adapter
    file (its tensors, named as the graph inputs they bind to) or an exported folder (its manifest)."""
    from ..runtime.inspect import inspect_path

    click.echo(inspect_path(path, as_json=as_json))
