"""`ia3-export export MODEL_DIR --out ONNX_DIR --mode merged|swappable|bank|foldswap [--adapter DIR]...`."""
import os

import click

from . import progress_option, trust_remote_code_option

TASKS = ["text-generation-with-past", "text-generation", "text-classification", "feature-extraction",
         "text2text-generation-with-past"]


def _modules(value):
    """`a,b` -> ["a", "b"]; a value with regex characters stays one full-match regex string."""
    if value is None:
        return None
    if any(c in value for c in "*()[]|\\^$+?"):
        return value
    return [m.strip() for m in value.split(",") if m.strip()]


@click.command("export")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the ONNX export.")
@click.option("--mode", type=click.Choice(["merged", "swappable", "bank", "foldswap"]), default="merged", show_default=True,
              help="merged: adapters folded in; swappable: IA3 vectors as graph inputs; bank: a per-row adapter bank; "
                   "foldswap: targeted weights as inputs, re-folded on the device on a switch (docs/foldswap.md).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(file_okay=False),
              help="A PEFT IA3 adapter folder (repeatable). merged: folded (their product); swappable/bank/foldswap: "
                   "written to adapters/<folder name>.onnx_adapter.")
@click.option("--task", type=click.Choice(TASKS), default=None, help="optimum's task name; default: the adapters' task_type, else MODEL_DIR's config.json.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--target-modules", default=None,
              help="swappable/bank/foldswap: modules that get a vector input (comma list or regex); default: the adapters' "
                   "targets, else the architecture's defaults.")
@click.option("--feedforward-modules", default=None, help="swappable/bank/foldswap: which targets scale their input.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch.onnx exporter (see docs/export.md for the measured comparison).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@trust_remote_code_option
@progress_option
def command(model_dir, out_dir, mode, adapters, task, dtype, opset, target_modules, feedforward_modules, exporter, force,
            trust_remote_code):
    """Export MODEL_DIR to ONNX (validated against PyTorch on ONNX Runtime) with an ia3_export.json manifest."""
    from ..adapter_names import name_for
    from ..export import export_model

    manifest = export_model(model_dir, out_dir, mode=mode, adapters=list(adapters), task=task, dtype=dtype, opset=opset,
                            target_modules=_modules(target_modules), feedforward_modules=_modules(feedforward_modules),
                            exporter=exporter, force=force, trust_remote_code=trust_remote_code)
    for path in adapters:  # an adapter's name is its folder's, made valid (adapter_names.name_for)
        folder, name = os.path.basename(os.path.normpath(path)), name_for(path)
        if name != folder and mode != "merged":
            click.echo(f"adapter folder {folder!r} is named {name!r} in the export (names use letters, digits, "
                       "'_', '-' and '.'); load it by that name")
    graphs = ", ".join(f"{g['file']} ({g['nodes']} nodes)" for g in manifest["graphs"].values())
    check = manifest["validation"]
    click.echo(f"exported {manifest['model_type']} {manifest['task']} ({mode}, {dtype}, opset {opset}) -> {out_dir}: {graphs}; "
               f"{len(manifest['vectors'])} vector inputs, {len(manifest['adapters'])} adapters; "
               f"validated {check['comparisons']} outputs, max abs diff {check['max_abs']:.2g}")
