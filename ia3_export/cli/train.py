"""`ia3-export train MODEL_DIR --data TRAIN_FILE --task TASK --out ADAPTER_DIR [options]`.

Runs as is, or under `torchrun --nproc_per_node N` (one process per device; rank 0 writes).
"""
import os

import click

from ..core.config import parse_modules
from ..dtypes import TRAIN_PRECISIONS
from ..tasks import TASKS, TRAIN_TASKS
from ..runtime.requests import INT_MAX, SEED_MAX
from .options import FloatRange, IntRange, OutputPath, trust_remote_code_option


def _fields_help() -> str:
    """What a row needs per task, from the task table: "text-classification: 'text'+'label'; ..."."""
    return "; ".join(f"{name}: " + " or ".join("+".join(f"'{f}'" for f in fields) for fields in TASKS[name].train_fields)
                     for name in TRAIN_TASKS) + "."


@click.command("train")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training rows: JSONL or CSV.")
@click.option("--task", required=True, type=click.Choice(TRAIN_TASKS),
              help=_fields_help() + " text-generation's loss is on the completion.")
@click.option("--out", "out_dir", required=True, type=OutputPath("folder"), help="Adapter folder to write (PEFT format).")
@click.option("--eval-data", type=click.Path(dir_okay=False), help="Evaluation rows; default: hold out --eval-fraction of --data.")
@click.option("--eval-fraction", type=FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True)
@click.option("--lr", "learning_rate", type=FloatRange(0, min_open=True), default=3e-3, show_default=True, help="Peak learning rate (the IA3 paper's).")
@click.option("--epochs", type=IntRange(1, INT_MAX), default=3, show_default=True)
@click.option("--max-steps", type=IntRange(1, INT_MAX), help="Optimizer steps; overrides --epochs.")
@click.option("--batch-size", type=IntRange(1, INT_MAX), default=8, show_default=True, help="Examples per process per micro-batch.")
@click.option("--grad-accum", type=IntRange(1, INT_MAX), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--warmup-steps", type=IntRange(0, INT_MAX), default=0, show_default=True, help="Linear warmup, then linear decay to 0.")
@click.option("--warmup-ratio", type=FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="Warmup as a share of all steps (when --warmup-steps is 0).")
@click.option("--weight-decay", type=FloatRange(0), default=0.0, show_default=True)
@click.option("--max-grad-norm", type=FloatRange(0), default=1.0, show_default=True, help="Clip the gradient norm; 0 turns it off.")
@click.option("--optimizer", type=click.Choice(["adamw", "adafactor"]), default="adamw", show_default=True)
@click.option("--seed", type=IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--max-length", type=IntRange(1, INT_MAX), default=512, show_default=True, help="Tokens per example (longer ones are cut).")
@click.option("--target-modules", help="Modules to scale: comma-separated names or a regex; default: per architecture.")
@click.option("--feedforward-modules", help="Of those, the ones whose INPUT is scaled: names or a regex.")
@click.option("--precision", type=click.Choice(TRAIN_PRECISIONS), default="fp32", show_default=True,
              help="Autocast precision (fp16 needs CUDA); the IA3 vectors stay float32.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass to save memory.")
@click.option("--eval-steps", type=IntRange(1, INT_MAX), help="Evaluate every N steps (always at the end).")
@click.option("--save-steps", type=IntRange(1, INT_MAX), help="Checkpoint every N steps to OUT.checkpoints/ (for --resume).")
@click.option("--log-steps", type=IntRange(1, INT_MAX), default=1, show_default=True, help="Write a train_log.jsonl record every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.checkpoints/.")
@click.option("--device", help="cpu, cuda or cuda:N; default: the process's GPU if there is one.")
@click.option("--threads", type=IntRange(1, INT_MAX), help="CPU threads for torch (1 to the cores; default: torch's, one per core).")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@trust_remote_code_option
def command(model_dir, data, task, out_dir, eval_data, resume, quiet, force, target_modules, feedforward_modules,
            **options):
    """Train an IA3 adapter on MODEL_DIR; OUT is a PEFT adapter folder plus train_log.jsonl and loss_curve.png."""
    from ..train import TrainOptions, train

    opts = TrainOptions(**options, target_modules=parse_modules(target_modules),
                        feedforward_modules=parse_modules(feedforward_modules))  # checks every number and the device
    result = train(model_dir, data, task, out_dir, eval_data=eval_data, options=opts, resume=resume,
                   force=force, quiet=quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        if not quiet:
            click.echo(result.table)
        click.echo(f"wrote {result.adapter_dir}")
