"""The export tasks' graphs: which wrapper, which graph inputs/outputs. The names (optimum's), heads
and Auto classes are ia3_export.tasks'; this module adds what the ONNX graphs look like.

A declarative table, so a graph's names and dynamic axes live in one place and validation,
the manifest and the exporter all read the same description.
"""
from __future__ import annotations

import dataclasses

from ..errors import IA3Error
from ..core.loading import adapters_task_type, auto_class_name, check_task
from ..tasks import DECODERS, ENCODERS, EXPORT_TASKS, SEQ2SEQ, TASKS as TASK_TABLE, WITH_PAST, task_named, task_of_type


@dataclasses.dataclass(frozen=True)
class Task:
    """One export task's graph description (its head: `ia3_export.tasks.task_named(name)`)."""

    name: str
    kind: str  # decoder | encoder | seq2seq
    output: str
    cache: bool
    model_types: tuple[str, ...]

    @property
    def auto_class(self) -> str:
        return task_named(self.name).auto_class


# A task family's graphs: (kind, output, model types); the task names come from ia3_export.tasks.
_GRAPHS = {
    "causal-lm": ("decoder", "logits", DECODERS),
    "seq-cls": ("encoder", "logits", ENCODERS + DECODERS),
    "feature-extraction": ("encoder", "last_hidden_state", ENCODERS + DECODERS),
    "seq2seq-lm": ("seq2seq", "logits", SEQ2SEQ),
}


def _spec(name: str) -> Task:
    kind, output, model_types = _GRAPHS[task_named(name).family]
    return Task(name, kind, output, name.endswith(WITH_PAST), model_types)


TASKS = {name: _spec(name) for name in EXPORT_TASKS}


def _default_export(auto_class: str) -> str | None:
    """The export task of the head an Auto class builds (its first export name), None if it has none."""
    return next((t.exports[0] for t in TASK_TABLE.values() if t.auto_class == auto_class and t.exports), None)


def resolve_task(task: str | None, config: dict, where: str, adapters: list = ()) -> Task:
    """The task asked for, else the adapters' (PEFT's task_type), else the one the config's architecture
    implies; checked against the adapters and the model type."""
    model_type = config["model_type"]
    task_type, adapter_path = adapters_task_type(adapters)
    if task is None and task_type:
        task = _default_export(task_of_type(task_type).auto_class)
        if task is None:
            raise IA3Error(f"{adapter_path} has task_type {task_type}, which has no ONNX export here; "
                           f"export tasks: {', '.join(TASKS)}")
    if task is None:
        auto = auto_class_name(config)
        task = _default_export(auto)
        if task is None:
            raise IA3Error(f"{where}: cannot export a {config.get('architectures')} model; pass --task (one of {', '.join(TASKS)})")
        if auto == "AutoModel" and model_type in SEQ2SEQ:
            task = TASK_TABLE["text2text-generation"].exports[0]
    task_named(task, EXPORT_TASKS)
    check_task(task, task_type, adapter_path)
    spec = TASKS[task]
    if model_type not in spec.model_types:
        raise IA3Error(
            f"task {task} is not supported for model type {model_type!r} ({where}); "
            f"supported types: {', '.join(spec.model_types)}"
        )
    return spec


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key_values.{i}.key/value` (inputs) or `present.{i}.key/value` (outputs), layer by layer."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


@dataclasses.dataclass
class GraphSpec:
    """One ONNX graph: file, input/output names (base inputs first, then vector inputs), dynamic axes."""

    key: str  # "model" | "encoder" | "decoder"
    file: str
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def graph_specs(task: Task, num_layers: int, token_type_ids: bool) -> list[GraphSpec]:
    """Names and dynamic axes of the base graph(s) of a task (vector inputs are added by the exporter)."""
    seq = {0: "batch_size", 1: "sequence_length"}
    if task.kind == "decoder":
        inputs = ["input_ids", "attention_mask", "position_ids"]
        axes = {"input_ids": seq, "position_ids": seq, "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "logits": seq}
        outputs = ["logits"]
        if task.cache:
            past, present = cache_names(num_layers, "past_key_values"), cache_names(num_layers, "present")
            inputs += past
            outputs += present
            axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in past}
            axes |= {n: {0: "batch_size", 2: "total_sequence_length"} for n in present}
        return [GraphSpec("model", "model.onnx", inputs, outputs, axes)]
    if task.kind == "encoder":
        inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_type_ids else [])
        axes = {n: seq for n in inputs}
        axes[task.output] = seq if task.output == "last_hidden_state" else {0: "batch_size"}
        return [GraphSpec("model", "model.onnx", inputs, [task.output], axes)]
    enc_seq = {0: "batch_size", 1: "encoder_sequence_length"}
    encoder = GraphSpec("encoder", "encoder_model.onnx", ["input_ids", "attention_mask"], ["last_hidden_state"],
                        {"input_ids": enc_seq, "attention_mask": enc_seq, "last_hidden_state": enc_seq})
    past, present = cache_names(num_layers, "past_key_values"), cache_names(num_layers, "present")
    dec_seq = {0: "batch_size", 1: "decoder_sequence_length"}
    axes = {"input_ids": dec_seq, "encoder_hidden_states": enc_seq, "encoder_attention_mask": enc_seq, "logits": dec_seq}
    axes |= {n: {0: "batch_size", 2: "past_decoder_sequence_length"} for n in past}
    axes |= {n: {0: "batch_size", 2: "total_decoder_sequence_length"} for n in present}
    decoder = GraphSpec("decoder", "decoder_model.onnx",
                        ["input_ids", "encoder_hidden_states", "encoder_attention_mask", *past], ["logits", *present], axes)
    return [encoder, decoder]
