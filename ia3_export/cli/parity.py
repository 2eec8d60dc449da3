"""`ia3-export parity MODEL_DIR ONNX_DIR [--adapter DIR]... [--runtime python|node]`: exit 0 pass, 1 fail, 2 bad usage/input."""
import click

from .options import FloatRange, IntRange, OutputPath, progress_option, trust_remote_code_option


@click.command("parity")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("onnx_dir", type=click.Path(file_okay=False))
@click.option("--adapter", "adapters", multiple=True, type=click.Path(file_okay=False),
              help="A PEFT IA3 adapter folder (repeatable). merged: exactly the adapters folded in; swappable/bank/foldswap: "
                   "each is checked on its own and (bank) mixed per row.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--runtime", type=click.Choice(["python", "node"]), default="python", show_default=True,
              help="What runs the export: python (IA3Session) or node (the shipped ia3.mjs on onnxruntime-node, "
                   "from --node-modules; greedy prompts one at a time).")
@click.option("--node-modules", type=click.Path(file_okay=False), default=None,
              help="The node_modules folder holding onnxruntime-node (--runtime node; default: $IA3_NODE_MODULES, "
                   "else ./node_modules).")
@click.option("--dtype", "reference_dtype", type=click.Choice(["fp64", "fp32"]), default="fp64", show_default=True,
              help="Precision of the PyTorch reference (the export's own dtype is in its manifest).")
@click.option("--atol", type=FloatRange(0), default=None, help="Absolute tolerance (default: by provider and dtype, see docs/parity.md).")
@click.option("--rtol", type=FloatRange(0), default=None, help="Relative tolerance (default: by provider and dtype).")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="CUDA fp32: let the CUDA provider use TF32 (its default); --no-tf32 sets use_tf32=0.")
@click.option("--steps", "greedy_steps", type=IntRange(0, 4096), default=8, show_default=True,
              help="Greedy tokens compared for generators (0: skip).")
@click.option("--json", "json_path", type=OutputPath("file"), default=None,
              help="Write the full report as JSON (replaced if it exists, as pytest's --junitxml is).")
@click.option("--junit", "junit_path", type=OutputPath("file"), default=None,
              help="Write JUnit XML (one test case per output comparison) for CI (replaced if it exists).")
@trust_remote_code_option
@progress_option
def command(model_dir, onnx_dir, adapters, provider, runtime, node_modules, reference_dtype, atol, rtol, tf32, greedy_steps, json_path,
            junit_path, trust_remote_code):
    """Check an exported folder against its PyTorch model (adapters unmerged) on ONNX Runtime."""
    from ..formats.atomic import check_output
    from ..errors import CheckFailed, IA3Error
    from ..parity import ParityOptions, check_parity

    if (atol is None) != (rtol is None):
        raise IA3Error("give --atol and --rtol together (or neither, for the documented tolerance)")
    inputs = [model_dir, onnx_dir, *adapters]
    for path in (json_path, junit_path):
        if path:
            check_output(path, True, inputs, "file")  # replaced on rerun, but never over or inside an input
    report = check_parity(model_dir, onnx_dir, list(adapters), ParityOptions(
        provider=provider, reference_dtype=reference_dtype, atol=atol, rtol=rtol, tf32=tf32, greedy_steps=greedy_steps,
        trust_remote_code=trust_remote_code, runtime=runtime, node_modules=node_modules))
    if json_path:
        report.write_json(json_path, force=True, inputs=inputs)
    if junit_path:
        report.write_junit(junit_path, force=True, inputs=inputs)
    click.echo(report.header())
    for check in [*report.worst_per_output(), *report.greedy]:  # the worst case of each output, every greedy row
        click.echo("  " + check.line())
    if report.float_agreement:
        click.echo("  " + report.agreement_line())
    if not report.passed:
        raise CheckFailed(f"{report.summary()}; worst: {report.failures()[0].line()}")
    click.echo(report.summary())
