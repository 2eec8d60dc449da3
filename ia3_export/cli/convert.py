"""`ia3-export convert ADAPTER_DIR --model ONNX_DIR --out FILE.onnx_adapter`."""
import click

from .options import OutputPath


@click.command("convert")
@click.argument("adapter_dir", type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Exported folder (swappable, bank or foldswap; a merged one has no vector inputs).")
@click.option("--out", required=True, type=OutputPath("file"), help="Output .onnx_adapter file.")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
def command(adapter_dir, model_dir, out, force):
    """Convert a PEFT IA3 adapter to ONNX Runtime's .onnx_adapter for an exported model.

    The adapter's task_type must match the export's task; names, shapes and dtype are checked against
    the model's vector inputs first."""
    from ..runtime.adapters import convert_adapter

    info = convert_adapter(adapter_dir, model_dir, out, force=force)
    click.echo(f"wrote {info['out']}: {info['vectors']} of the model's {info['model_vectors']} vectors, {info['dtype']}")
