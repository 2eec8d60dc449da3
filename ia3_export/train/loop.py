"""`train(...)`: data -> IA3Model -> optimizer loop -> a PEFT adapter folder with its log and curve.

Reproducible by construction, so that resuming and running on N processes give the run you
would have had otherwise:
- the examples of optimizer step s are fixed by (seed, s) alone: a permutation per epoch, cut
  into global batches, each cut into one micro-batch per (rank, accumulation step);
- each micro-batch's summed loss is divided by the number of loss terms (tokens or examples)
  in the whole global batch, so accumulation and DDP's gradient average reproduce one big batch;
- dropout is reseeded from (seed, step, rank); a checkpoint holds the trainable tensors, the
  optimizer, the schedule and the log, and resuming continues from its step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Callable

import torch

from ..formats.atomic import atomic_output_dir, check_output, open_for_writing, remove_output
from ..core.config import IA3Config
from ..dtypes import TRAIN_PRECISIONS, torch_dtype
from ..errors import CheckFailed, IA3Error
from ..formats.jsonfile import dumps, write_json
from ..formats.labels import write_labels
from ..core.loading import check_remote_code, has_tokenizer, load_base_model, read_model_config
from ..core.model import IA3Model
from . import data as D
from .distributed import Dist, setup
from .report import metrics_table, plot_loss

LOG_NAME = "train_log.jsonl"
CURVE_NAME = "loss_curve.png"
ARGS_NAME = "train_args.json"
STATE_NAME = "trainer_state.pt"


@dataclasses.dataclass
class TrainOptions:
    """Everything that shapes a run. Defaults follow the IA3 paper where it says (lr 3e-3)."""

    learning_rate: float = 3e-3
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs; the data repeats as needed
    batch_size: int = 8  # per process
    grad_accum: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0  # towards 0, which for IA3 vectors (identity = 1) is rarely wanted
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"  # or "adafactor"
    seed: int = 0
    max_length: int = 512
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    precision: str = "fp32"  # "bf16" or "fp16" autocast (fp16 on CUDA only)
    gradient_checkpointing: bool = False
    eval_steps: int | None = None  # besides the end of training
    save_steps: int | None = None
    eval_fraction: float = 0.1  # held out when no eval data is given
    log_steps: int = 1
    device: str | None = None  # default: the process's GPU when there is one, else the CPU
    trust_remote_code: bool = False  # run the model folder's own code (auto_map); only for folders you trust
    threads: int | None = None  # torch's intra-op CPU threads for the run (None: torch's default, one per core)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every option in range before any work: a bad number is bad usage (IA3Error), never a
        traceback from the optimizer, a run that reverses its gradients or an adapter of NaNs."""
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "log_steps",
                     "max_steps", "eval_steps", "save_steps", "warmup_steps"):
            value = getattr(self, name)
            optional = name in ("max_steps", "eval_steps", "save_steps")
            least = 0 if name == "warmup_steps" else 1
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise IA3Error(f"{_flag(name)} is {value!r}; give a whole number >= {least}")
        _number("learning_rate", self.learning_rate, "a finite number > 0", lambda v: v > 0)
        _number("warmup_ratio", self.warmup_ratio, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _number("weight_decay", self.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        _number("eval_fraction", self.eval_fraction, "a number between 0 and 1 (both excluded)", lambda v: 0 < v < 1)
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm, "a finite number > 0, or 0 for no clipping", lambda v: v >= 0)
            self.max_grad_norm = self.max_grad_norm or None
        if self.optimizer not in ("adamw", "adafactor"):
            raise IA3Error(f"optimizer {self.optimizer!r} is not known; use adamw or adafactor")
        if self.precision not in TRAIN_PRECISIONS:
            raise IA3Error(f"precision {self.precision!r} is not known; use {', '.join(TRAIN_PRECISIONS)}")
        if self.device is not None:
            check_device(self.device)
        if self.threads is not None:
            cores = len(os.sched_getaffinity(0))
            _number("threads", self.threads, f"a whole number from 1 to {cores} (this process's CPU cores)",
                    lambda v: isinstance(v, int) and 1 <= v <= cores)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").replace("learning-rate", "lr")


def _number(name: str, value, wanted: str, in_range: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not in_range(value):
        raise IA3Error(f"{_flag(name)} is {value!r}; give {wanted}")


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N (the devices training is tested on), and present on this machine."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise IA3Error(f"--device {device!r} is not a device this tool trains on; use cpu, cuda or cuda:N")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            raise IA3Error(f"--device {device}: this torch sees {count} CUDA device(s); use --device cpu or another index")


MAX_MICRO_BATCHES = 10**8  # forward and backward passes in one run: days on any device this tool trains on
MAX_VECTOR = 65504.0  # float16's largest value: a vector beyond it cannot be exported in fp16, and means a runaway


def check_work(o: TrainOptions, rows: int, steps_per_epoch: int, world: int) -> int:
    """The run's optimizer steps, once the work they imply is known to be bounded: each step runs
    --grad-accum micro-batches per process, so steps x accumulation is the run's length, and a
    micro-batch needs at least one example (an empty one still runs a forward and backward pass)."""
    if o.grad_accum * world > rows:
        raise IA3Error(f"--grad-accum {o.grad_accum} x {world} process(es) splits each step into more micro-batches than "
                       f"the {rows} training examples; give --grad-accum {max(1, rows // world)} or less")
    total = o.max_steps or steps_per_epoch * o.epochs
    work = total * o.grad_accum
    if work > MAX_MICRO_BATCHES:
        where = "--max-steps" if o.max_steps else f"--epochs {o.epochs} x {steps_per_epoch} steps per epoch"
        raise IA3Error(f"{total} steps ({where}) x --grad-accum {o.grad_accum} = {work} micro-batches, more than the "
                       f"{MAX_MICRO_BATCHES} a run may take; lower --epochs or --max-steps, or --grad-accum")
    return total


@dataclasses.dataclass
class TrainResult:
    adapter_dir: str
    metrics: dict
    log: list[dict]
    labels: list[str] | None = None  # classification: class id -> name (build the head with num_labels=len)

    @property
    def table(self) -> str:
        return metrics_table(self.metrics)


def train(model_dir: str, data: str, task: str, out: str, *, eval_data: str | None = None,
          options: TrainOptions | None = None, resume: bool = False, force: bool = False,
          quiet: bool = False, on_log: Callable[[dict], None] | None = None, base_model_name: str | None = None,
          **overrides) -> TrainResult:
    """Train an IA3 adapter on MODEL_DIR and write a PEFT adapter folder to OUT.

    Runs as one process, or as one of N under torchrun (only rank 0 writes). Checkpoints go to
    `OUT.checkpoints/step-N` (removed once OUT is written); `resume=True` continues from the
    newest. `on_log(record)` is called on rank 0 with each record written to train_log.jsonl.
    `base_model_name` goes to adapter_config.json's base_model_name_or_path (default: MODEL_DIR).
    """
    options = dataclasses.replace(options or TrainOptions(), **overrides)
    options.check()
    D.check_task(task)
    inputs = [model_dir, data, eval_data]
    check_output(out, force, inputs)
    check_output(os.path.abspath(out) + ".checkpoints", True, inputs, "workdir")  # removed once OUT is written
    dist = setup(options.device)
    threads = torch.get_num_threads()
    if options.threads:  # more threads than free cores mostly add synchronisation (README: Train)
        torch.set_num_threads(options.threads)
    try:
        if options.precision == "fp16" and dist.device.type != "cuda":
            raise IA3Error("fp16 autocast needs a CUDA device; use --precision bf16 on the CPU")
        run = _Run(model_dir, data, task, out, eval_data, options, dist, quiet, on_log, base_model_name)
        run.force, run.inputs = force, inputs  # OUT's final write: the same rules as the check above
        return run.go(resume)
    finally:
        torch.set_num_threads(threads)
        dist.close()


class _Run:
    def __init__(self, model_dir, data, task, out, eval_data, options: TrainOptions, dist: Dist, quiet, on_log, base_name):
        self.o, self.dist, self.task, self.out = options, dist, task, os.path.abspath(out)
        self.quiet, self.on_log, self.base_name = quiet, on_log, base_name
        self.checkpoints = self.out + ".checkpoints"
        model_config = read_model_config(model_dir)
        check_remote_code(model_dir, model_config, options.trust_remote_code)  # before the tokenizer reads it
        if not has_tokenizer(model_dir):
            raise IA3Error(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer_config.json); "
                           "save the tokenizer beside the model with tokenizer.save_pretrained")
        train_rows = D.read_rows(data, task)
        if eval_data:
            eval_rows = D.read_rows(eval_data, task)
        else:
            train_rows, eval_rows = D.split_rows(train_rows, options.eval_fraction, options.seed, data)
        self.labels = D.label_names(train_rows, eval_rows) if D.TASKS[task].labelled else None

        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=options.trust_remote_code)
        except (OSError, ValueError) as e:
            raise IA3Error(f"cannot load the tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.train_set = D.encode(train_rows, task, tokenizer, options.max_length, self.labels)
        self.eval_set = D.encode(eval_rows, task, tokenizer, options.max_length, self.labels)
        if not self.train_set:
            raise IA3Error(f"{data}: no example has anything to learn within max-length {options.max_length} "
                           "(completions cut off?); raise --max-length")
        self.tokenizer = tokenizer
        self.global_batch = options.batch_size * options.grad_accum * dist.world
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.global_batch)
        self.total = check_work(options, len(self.train_set), self.steps_per_epoch, dist.world)
        self.model = self._build_model(model_dir, model_config)

    # -- setup -------------------------------------------------------------------------------
    def _build_model(self, model_dir: str, model_config: dict) -> IA3Model:
        task = D.TASKS[self.task]
        extra = {}
        if self.labels is not None:
            existing = model_config.get("id2label")
            has_head = any(a.endswith(task.architectures) for a in model_config.get("architectures") or [])
            if has_head and existing and len(existing) != len(self.labels):
                raise IA3Error(f"{model_dir} has a classification head for {len(existing)} labels but the data has "
                               f"{len(self.labels)} ({', '.join(self.labels)}); use a base model without a head")
            extra = dict(num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                         label2id={name: i for i, name in enumerate(self.labels)})
        torch.manual_seed(self.o.seed)  # a new head starts the same in every process and every run
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        if extra:  # a new head is the point here: no "newly initialized weights" report
            hf_logging.set_verbosity_error()
        try:
            base = load_base_model(model_dir, task.auto_class, trust_remote_code=self.o.trust_remote_code, **extra)
        finally:
            hf_logging.set_verbosity(level)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.pad_id
        heads = [n for n in task.heads if self.labels is not None and hasattr(base, n)]
        config = IA3Config(target_modules=self.o.target_modules, feedforward_modules=self.o.feedforward_modules,
                           task_type=task.task_type, modules_to_save=heads or None, base_model_name_or_path=self.base_name or model_dir)
        model = IA3Model(base, config)
        if self.o.gradient_checkpointing:
            if not getattr(base, "supports_gradient_checkpointing", False):
                raise IA3Error(f"this {model.model_type} model does not support gradient checkpointing; drop the option")
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (non-reentrant)
                base.activation_checkpointing_enable()
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.to(self.dist.device)

    def _fingerprint(self) -> dict:
        """What must match for a checkpoint to continue this run (not eval/save cadence)."""
        digest = hashlib.sha256()
        for e in self.train_set:
            digest.update(json.dumps([e.input_ids, e.labels, e.decoder_labels]).encode())
        keep = ("learning_rate", "epochs", "max_steps", "warmup_steps", "warmup_ratio", "weight_decay",
                "max_grad_norm", "optimizer", "seed", "max_length", "target_modules", "feedforward_modules", "precision")
        return {"task": self.task, "global_batch": self.global_batch, "data_sha256": digest.hexdigest(),
                **{k: getattr(self.o, k) for k in keep}}

    # -- the run -----------------------------------------------------------------------------
    def go(self, resume: bool) -> TrainResult:
        o, dist, total = self.o, self.dist, self.total
        params = [p for p in self.model.parameters() if p.requires_grad]
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if o.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.Adafactor(params, lr=o.learning_rate, weight_decay=o.weight_decay)
        warmup = o.warmup_steps or int(o.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
        scaler = torch.amp.GradScaler(dist.device.type, enabled=o.precision == "fp16")

        log: list[dict] = []
        start, before = 0, {}
        fingerprint = self._fingerprint()
        if resume:
            start, log, before = self._restore(named, optimizer, schedule, scaler, fingerprint)
        model = self.model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.model, device_ids=[dist.device] if dist.device.type == "cuda" else None)

        if start == 0 and self.eval_set:
            before = {f"{k}_before": v for k, v in self.evaluate().items()}
        bar = self._progress(total, start)
        began, done = time.perf_counter(), 0
        for step in range(start, total):
            lr = schedule.get_last_lr()[0]
            loss = self._step(model, step, optimizer, scaler)
            self._check_finite(step + 1, loss, params)
            schedule.step()
            done += 1
            record = {"step": step + 1, "loss": loss, "lr": lr, "epoch": round((step + 1) / self.steps_per_epoch, 4)}
            last = step + 1 == total
            if self.eval_set and (last or (o.eval_steps and (step + 1) % o.eval_steps == 0)):
                record.update(self.evaluate())
            if last or (step + 1) % o.log_steps == 0 or len(record) > 4:
                log.append(record)
                if dist.main and self.on_log:
                    self.on_log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if o.save_steps and (step + 1) % o.save_steps == 0 and not last:
                self._checkpoint(step + 1, named, optimizer, schedule, scaler, log, fingerprint, before)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - began

        final = {k: v for k, v in log[-1].items() if k.startswith("eval_")} if log else {}
        trainable, total_params = self.model.trainable_parameters()
        metrics = {"steps": total, "train_loss": log[-1]["loss"] if log else float("nan"), **before, **final,
                   "train_examples": len(self.train_set), "eval_examples": len(self.eval_set),
                   "trainable_params": trainable, "all_params": total_params,
                   "train_seconds": round(elapsed, 2), "steps_per_second": round(done / elapsed, 3) if elapsed else 0.0}
        if dist.main:
            self._write(log, metrics)
            remove_output(self.checkpoints)  # only if it holds nothing but our checkpoints
        dist.barrier()
        return TrainResult(self.out, metrics, log, self.labels)

    def _progress(self, total: int, start: int):
        if self.quiet or not self.dist.main or not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm

        # a terminal that reports no size (0 x 0) makes tqdm hide the bar; shutil falls back to 80 x 24
        cols, rows = shutil.get_terminal_size()
        return tqdm(total=total, initial=start, desc="train", unit="step", ncols=cols, nrows=rows, file=sys.stderr)

    def _batch_indices(self, step: int) -> tuple[list[list[int]], list[int]]:
        """(this rank's micro-batches, the whole global batch) as example indices for an optimizer step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.o.seed * 100_003 + epoch))
        chosen = order[k * self.global_batch:(k + 1) * self.global_batch].tolist()
        pieces = self.o.grad_accum * self.dist.world
        cuts = [round(i * len(chosen) / pieces) for i in range(pieces + 1)]
        mine = range(self.dist.rank * self.o.grad_accum, (self.dist.rank + 1) * self.o.grad_accum)
        return [chosen[cuts[j]:cuts[j + 1]] for j in mine], chosen

    def _step(self, model, step: int, optimizer, scaler) -> float:
        o, dist = self.o, self.dist
        micro, chosen = self._batch_indices(step)
        n_terms = D.count_targets([self.train_set[i] for i in chosen])
        torch.manual_seed(o.seed * 1_000_003 + step * 1009 + dist.rank)  # dropout, the same on resume
        model.train()
        loss_sum = 0.0
        for j, indices in enumerate(micro):
            weight = 1.0 if indices else 0.0  # an empty piece still joins DDP's gradient exchange
            examples = [self.train_set[i] for i in indices or [0]]
            sync = j == len(micro) - 1 or dist.world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                summed, _ = self._loss(model, examples)
                scaler.scale(summed * (weight * dist.world / n_terms)).backward()
            loss_sum += summed.item() * weight
        scaler.unscale_(optimizer)
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], o.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        (loss_total,) = dist.sum([loss_sum])
        return loss_total / n_terms

    def _check_finite(self, step: int, loss: float, params: list[torch.Tensor]) -> None:
        """A NaN or infinite loss, or a vector beyond float16's range, means the run diverged (llama's
        RMSNorm turns 1e30-sized activations back into a finite loss: the loss alone misses it). Stop
        before that step is logged, checkpointed or written, so no runaway adapter appears and the last
        good checkpoint stays."""
        largest = float(torch.stack([p.detach().abs().max() for p in params]).max())  # NaN if any is NaN
        if math.isfinite(loss) and largest <= MAX_VECTOR:
            return  # one device sync for all the vectors
        what = (f"the loss is {loss}" if not math.isfinite(loss) else "the vectors became non-finite"
                if not math.isfinite(largest) else f"a vector entry reached {largest:.3g}, beyond {MAX_VECTOR:g}")
        kept = f" (checkpoints so far stay in {self.checkpoints})" if os.path.isdir(self.checkpoints) else ""
        raise CheckFailed(f"training diverged at step {step} ({what}), so no adapter was written{kept}; "
                          f"train again with a lower --lr (this run: {self.o.learning_rate:g})")

    def _loss(self, model, examples: list[D.Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of correct predictions) for a micro-batch."""
        batch = {k: v.to(self.dist.device) for k, v in D.collate(examples, self.pad_id).items()}
        labels = batch.pop("labels")
        if self.task == "text2text-generation":
            batch["decoder_input_ids"] = self.model.model.prepare_decoder_input_ids_from_labels(labels=labels)
        dtype = torch_dtype(self.o.precision) if self.o.precision != "fp32" else None
        with torch.autocast(self.dist.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**batch, use_cache=False).logits if self.task != "text-classification" else model(**batch).logits
        logits = logits.float()
        if self.task == "text-generation":
            logits, labels = logits[:, :-1], labels[:, 1:]
        summed = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=D.IGNORE, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum() if self.task == "text-classification" else torch.zeros(())
        return summed, correct

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss (and perplexity, or accuracy), each rank on its share, summed across ranks."""
        self.model.eval()
        mine = self.eval_set[self.dist.rank::self.dist.world]
        loss = correct = 0.0
        for i in range(0, len(mine), self.o.batch_size):
            summed, right = self._loss(self.model, mine[i:i + self.o.batch_size])
            loss, correct = loss + summed.item(), correct + right.item()
        loss, correct, terms = self.dist.sum([loss, correct, float(D.count_targets(mine))])
        mean = loss / max(terms, 1)
        if D.TASKS[self.task].metric == "accuracy":
            return {"eval_loss": mean, "eval_accuracy": correct / max(terms, 1)}
        return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}

    # -- checkpoints and output ------------------------------------------------------------
    def _checkpoint(self, step, named, optimizer, schedule, scaler, log, fingerprint, before) -> None:
        if self.dist.main:
            path = os.path.join(self.checkpoints, f"step-{step:08d}")
            with atomic_output_dir(path, force=True, inputs=self.inputs) as tmp:
                self.model.save_adapter(tmp, force=True)
                torch.save({"step": step, "trainable": {n: p.detach().cpu() for n, p in named.items()},
                            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "scaler": scaler.state_dict(), "log": log, "fingerprint": fingerprint, "before": before},
                           os.path.join(tmp, STATE_NAME))
            for old in sorted(d for d in os.listdir(self.checkpoints) if d.startswith("step-"))[:-2]:  # the newest two stay
                remove_output(os.path.join(self.checkpoints, old))
        self.dist.barrier()

    def _restore(self, named, optimizer, schedule, scaler, fingerprint) -> tuple[int, list[dict], dict]:
        found = sorted(d for d in os.listdir(self.checkpoints) if d.startswith("step-")) if os.path.isdir(self.checkpoints) else []
        if not found:
            raise IA3Error(f"--resume: no checkpoint in {self.checkpoints}; run without --resume (and with --save-steps)")
        path = os.path.join(self.checkpoints, found[-1], STATE_NAME)
        try:
            state = torch.load(path, map_location=self.dist.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise IA3Error(f"{path}: cannot be read ({str(e).splitlines()[0]}); delete that checkpoint folder") from None
        for key, value in fingerprint.items():
            if state["fingerprint"].get(key) != value:
                raise IA3Error(f"{path}: {key} was {state['fingerprint'].get(key)!r} in the interrupted run, now {value!r}; "
                               "resume with the same data and options, or start afresh without --resume")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        return state["step"], list(state["log"]), dict(state.get("before", {}))

    def _write(self, log: list[dict], metrics: dict) -> None:
        with atomic_output_dir(self.out, force=self.force, inputs=self.inputs) as tmp:
            self.model.save_adapter(tmp, force=True)
            if self.labels is not None:  # the class names beside PEFT's files (ia3_export.formats.labels)
                write_labels(tmp, self.labels)
            with open_for_writing(os.path.join(tmp, LOG_NAME)) as f:  # strict JSON: a NaN loss is null
                f.writelines(dumps(record) + "\n" for record in log)
            plot_loss(log, os.path.join(tmp, CURVE_NAME), title=f"IA3 {self.task} ({self.model.model_type})")
            args = dataclasses.asdict(self.o) | {"task": self.task, "world_size": self.dist.world,
                                                 "labels": self.labels, "metrics": metrics}
            write_json(os.path.join(tmp, ARGS_NAME), args, indent=2)
