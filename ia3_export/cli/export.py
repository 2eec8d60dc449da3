"""`ia3-export export MODEL_DIR --out ONNX_DIR --mode merged|swappable|bank|foldswap [--adapter DIR]...`."""
import os

import click

from ..core.config import parse_modules as _modules
from ..formats.manifest import GRAPHS, LAYOUTS, MERGED, MODES, OPTIMUM, TRACED
from ..tasks import EXPORT_TASKS as TASKS
from .options import IntRange, OutputPath, progress_option, trust_remote_code_option


@click.command("export")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=OutputPath("folder"), help="Folder for the ONNX export.")
@click.option("--mode", type=click.Choice(MODES), default=MERGED, show_default=True,
              help="merged: adapters folded in; swappable: IA3 vectors as graph inputs; bank: a per-row adapter bank; "
                   "foldswap: targeted weights as inputs, re-folded on the device on a switch (docs/foldswap.md).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(file_okay=False),
              help="A PEFT IA3 adapter folder (repeatable). merged: folded (their product); swappable/bank/foldswap: "
                   "written to adapters/<folder name>.onnx_adapter.")
@click.option("--task", type=click.Choice(TASKS), default=None, help="optimum's task name; default: the adapters' task_type, else MODEL_DIR's config.json.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=IntRange(1, 1000), default=18, show_default=True)
@click.option("--target-modules", default=None,
              help="swappable/bank/foldswap: modules that get a vector input (comma list or regex); default: the adapters' "
                   "targets, else the architecture's defaults.")
@click.option("--feedforward-modules", default=None, help="swappable/bank/foldswap: which targets scale their input.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch.onnx exporter (see docs/export.md for the measured comparison).")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), default=None,
              help="int4: MatMul weights to ONNX Runtime's MatMulNBits (decoders); int8: ONNX Runtime's dynamic "
                   "quantization (encoders, classifiers). merged/swappable/bank; the vectors stay float inputs.")
@click.option("--block-size", type=IntRange(1, 65536), default=32, show_default=True, help="int4: weights per quantization block (along K).")
@click.option("--asymmetric", is_flag=True, help="int4: per-block zero points (default symmetric: none).")
@click.option("--accuracy-level", type=IntRange(0, 4), default=0, show_default=True,
              help="int4: MatMulNBits' accuracy_level (0: fp32 arithmetic, exact to the de-quantized weights; 4: int8 "
                   "activations, faster on CPU).")
@click.option("--quantize-lm-head/--keep-lm-head", default=True, show_default=True,
              help="Quantize the LM head (the largest MatMul at a 32k vocabulary).")
@click.option("--quantize-embeddings", is_flag=True,
              help="int4: also the input embeddings (GatherBlockQuantized; default float: a lookup has no speed to win).")
@click.option("--graph", type=click.Choice(GRAPHS), default=TRACED, show_default=True,
              help="traced: torch.onnx traces the model (every task and mode); fused: onnxruntime-genai's model builder "
                   "graph (GroupQueryAttention, fused q/k/v, shared KV buffer), Llama-family decoders, fp32 or fp16 (the "
                   "builder's CUDA graph, which ONNX Runtime's CPU runs too), needs the `fused` extra (docs/export.md).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=OPTIMUM, show_default=True,
              help="optimum: model.onnx at the root (ORTModelForCausalLM, onnxruntime-genai); transformers.js: "
                   "onnx/model[_fp16|_int8|_q4].onnx as pipeline(task, folder) loads it, merged traced exports "
                   "(docs/web.md).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@trust_remote_code_option
@progress_option
def command(model_dir, out_dir, mode, adapters, task, dtype, opset, target_modules, feedforward_modules, exporter,
            quantize, block_size, asymmetric, accuracy_level, quantize_lm_head, quantize_embeddings, graph, layout,
            force, trust_remote_code):
    """Export MODEL_DIR to ONNX (validated against PyTorch on ONNX Runtime) with an ia3_export.json manifest."""
    from ..formats.adapter_names import name_for
    from ..export import export_model
    from ..export.modes import export_mode
    from ..export.quantize import QuantizeOptions

    options = None if quantize is None else QuantizeOptions(
        quantize, block_size=block_size, symmetric=not asymmetric, accuracy_level=accuracy_level,
        lm_head=quantize_lm_head, embeddings=quantize_embeddings)
    manifest = export_model(model_dir, out_dir, mode=mode, adapters=list(adapters), task=task, dtype=dtype, opset=opset,
                            target_modules=_modules(target_modules), feedforward_modules=_modules(feedforward_modules),
                            exporter=exporter, force=force, trust_remote_code=trust_remote_code,
                            quantize=options, graph=graph, layout=layout)
    for path in adapters:  # an adapter's name is its folder's, made valid (adapter_names.name_for)
        folder, name = os.path.basename(os.path.normpath(path)), name_for(path)
        if name != folder and not export_mode(mode).folds_adapters:
            click.echo(f"adapter folder {folder!r} is named {name!r} in the export (names use letters, digits, "
                       "'_', '-' and '.'); load it by that name")
    graphs = ", ".join(f"{g['file']} ({g['nodes']} nodes)" for g in manifest["graphs"].values())
    check = manifest["validation"]
    quantized = f", {quantize}" if quantize else ""
    made_by = "" if graph == TRACED else f", {graph} graph"
    click.echo(f"exported {manifest['model_type']} {manifest['task']} ({mode}, {dtype}{quantized}{made_by}, "
               f"opset {manifest['opset']}) -> {out_dir}: {graphs}; "
               f"{len(manifest['vectors'])} vector inputs, {len(manifest['adapters'])} adapters; "
               f"validated {check['comparisons']} outputs, max abs diff {check['max_abs']:.2g}")
