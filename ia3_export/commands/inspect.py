"""`ia3-export inspect PATH`: an adapter folder (or, with the runtime, an exported folder)."""
import click


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(path, as_json):
    """Targets, shapes, parameter count and vector statistics of an adapter folder."""
    from ..inspect import inspect_path

    click.echo(inspect_path(path, as_json=as_json))
