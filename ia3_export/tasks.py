"""The tasks: one table of what a task name means to every part of the project.

A task is a model head. Its row says which transformers Auto class builds it, PEFT's task_type
for it, which `architectures` in config.json mean it, the head modules PEFT trains in full,
what a training row needs, the names it exports under (optimum's) and the metric training
reports. Training, loading, export, the CLI's choices, the tiny models and the runtime all
read this table. Plain data (no torch, no transformers), so the lean runtime reads it too.
"""
from __future__ import annotations

import dataclasses

from .errors import IA3Error

# Model types by how their graphs look (the export's graph shapes, the tiny models' tokenizers).
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "gpt_neox")
ENCODERS = ("bert", "roberta")
SEQ2SEQ = ("t5", "bart")

WITH_PAST = "-with-past"  # optimum's suffix: the graph takes and returns the key/value cache


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # transformers pipelines' name (what `train --task` and `merge --task` take)
    family: str  # the head's short name (tiny models, messages)
    auto_class: str  # the transformers Auto class that builds the head (a name: see `auto_class`)
    task_type: str  # PEFT's task_type in adapter_config.json
    architectures: tuple[str, ...] = ()  # suffixes of config.json's `architectures` that mean this head
    heads: tuple[str, ...] = ()  # head modules PEFT adds to modules_to_save (a classifier's)
    train_fields: tuple[tuple[str, ...], ...] = ()  # fields a training row needs (alternatives); () not trainable
    exports: tuple[str, ...] = ()  # optimum's export task names, the default first
    metric: str | None = None  # what training reports beside the eval loss

    @property
    def labelled(self) -> bool:
        """A classifier: its head needs num_labels and label names."""
        return bool(self.heads)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("text-generation", "causal-lm", "AutoModelForCausalLM", "CAUSAL_LM", ("ForCausalLM", "LMHeadModel"),
         train_fields=(("text",), ("prompt", "completion")),
         exports=("text-generation" + WITH_PAST, "text-generation"), metric="perplexity"),
    Task("text-classification", "seq-cls", "AutoModelForSequenceClassification", "SEQ_CLS",
         ("ForSequenceClassification",), heads=("classifier", "score"), train_fields=(("text", "label"),),
         exports=("text-classification",), metric="accuracy"),
    Task("text2text-generation", "seq2seq-lm", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", ("ForConditionalGeneration",),
         train_fields=(("source", "target"),), exports=("text2text-generation" + WITH_PAST,), metric="perplexity"),
    Task("feature-extraction", "feature-extraction", "AutoModel", "FEATURE_EXTRACTION",
         exports=("feature-extraction",)),
    Task("token-classification", "token-cls", "AutoModelForTokenClassification", "TOKEN_CLS",
         ("ForTokenClassification",), heads=("classifier", "score")),
    Task("question-answering", "question-answering", "AutoModelForQuestionAnswering", "QUESTION_ANS"),
)}

TASK_TYPES = tuple(t.task_type for t in TASKS.values())
TRAIN_TASKS = tuple(t.name for t in TASKS.values() if t.train_fields)
EXPORT_TASKS = tuple(e for t in TASKS.values() for e in t.exports)
FAMILIES = {t.family: t for t in TASKS.values()}
# Every name a task goes by (its own, then its export names) -> the task.
_BY_NAME = {name: t for t in TASKS.values() for name in (t.name, *t.exports)}
ALL_NAMES = tuple(_BY_NAME)


def task_named(name: str, choices=ALL_NAMES) -> Task:
    """The task a name (a task's or an export's) stands for; an unknown name is refused."""
    if name not in choices:
        raise IA3Error(f"unknown task {name!r}; use one of {', '.join(choices)}")
    return _BY_NAME[name]


def task_of_type(task_type: str) -> Task:
    """The task of PEFT's task_type."""
    return next(t for t in TASKS.values() if t.task_type == task_type)


def task_of_architectures(architectures) -> Task | None:
    """The task whose head config.json's `architectures` names (None: a bare model or none known)."""
    for arch in architectures or []:
        for task in TASKS.values():
            if arch.endswith(task.architectures):
                return task
    return None


def auto_model_class(name: str):
    """The transformers Auto class of that name (imported only now: this module stays torch-free)."""
    import transformers

    return getattr(transformers, name)
