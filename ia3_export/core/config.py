"""IA3Config (PEFT's fields) and the per-architecture default targets.

The defaults follow the paper: scale the OUTPUT of the attention key and value projections and
the INPUT of the second feed-forward layer. Where a model fuses q, k and v into one projection
(gpt2 `c_attn`, phi3 `qkv_proj`, gpt_neox `query_key_value`) the fused output is scaled as a
whole: one vector per module is all PEFT's format can hold, so the query slice is scaled too.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable

from ..errors import IA3Error
from ..formats.jsonfile import shown
from ..tasks import TASK_TYPES, TASKS

Targets = list[str] | str | None

# model_type -> (target_modules, feedforward_modules). Data, not if-chains.
DEFAULT_TARGETS: dict[str, tuple[Targets, Targets]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    # BERT-like: `output.dense` alone would also catch `attention.output.dense`; anchor it.
    "bert": (r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "roberta": (r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bart": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}

# Where PEFT's own defaults differ, for the README and `inspect`.
PEFT_DIFFERENCES: dict[str, str] = {
    "qwen2": "PEFT scales q_proj, v_proj (not keys)",
    "gemma": "PEFT scales q_proj, v_proj (not keys)",
    "bart": "PEFT scales q_proj, v_proj (not keys)",
    "opt": "PEFT scales q_proj, k_proj (not values)",
    "bert": "PEFT's list `output.dense` also scales the attention output projection's input",
    "roberta": "PEFT's list `output.dense` also scales the attention output projection's input",
    "qwen3": "PEFT scales q_proj, v_proj (not keys)",
    "gemma2": "PEFT scales q_proj, v_proj (not keys)",
    "phi3": "PEFT has no default",
}

ALL_LINEAR = "all-linear"  # every Linear/Conv1D except the output embeddings and task heads

# PEFT adds these heads to modules_to_save for classification tasks (task_type -> head modules).
HEADS_FOR_TASK = {t.task_type: list(t.heads) for t in TASKS.values() if t.heads}


@dataclasses.dataclass
class IA3Config:
    """The fields of PEFT's IA3Config that change behaviour; read and written as PEFT does."""

    target_modules: Targets = None
    feedforward_modules: Targets = None
    exclude_modules: Targets = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise IA3Error(f"unknown task_type {self.task_type!r}; use one of {', '.join(TASK_TYPES)}")
        for field in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, (set, tuple)):
                setattr(self, field, sorted(value))
            elif value is not None and not isinstance(value, (list, str)):
                raise IA3Error(f"{field} must be a list of names or a regex string, got {type(value).__name__}")
            _check_patterns(field, getattr(self, field))
        if isinstance(self.modules_to_save, str):  # one name, not its letters
            self.modules_to_save = [self.modules_to_save]
        elif isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)):
            raise IA3Error(f"modules_to_save must list module names as strings, got {self.modules_to_save!r}")

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def resolved(self, model_type: str) -> "IA3Config":
        """Fill in the per-architecture defaults that were left out.

        As in PEFT, feedforward_modules left out takes the architecture's default even when
        target_modules is given, so the same config scales the same way in both tools.
        """
        if self.target_modules is not None:
            ff = self.feedforward_modules
            if ff is None:
                ff = DEFAULT_TARGETS[model_type][1] if model_type in DEFAULT_TARGETS else []
            return dataclasses.replace(self, feedforward_modules=ff)
        if model_type not in DEFAULT_TARGETS:
            raise IA3Error(
                f"no default IA3 targets for model type {model_type!r}; pass target_modules "
                f"(--target-modules) and feedforward_modules. Known types: {', '.join(sorted(DEFAULT_TARGETS))}"
            )
        targets, ff = DEFAULT_TARGETS[model_type]
        if self.feedforward_modules is not None:
            ff = self.feedforward_modules
        return dataclasses.replace(self, target_modules=targets, feedforward_modules=ff)

    def heads_to_save(self) -> list[str]:
        """modules_to_save plus the task head PEFT saves implicitly for classification."""
        names = list(self.modules_to_save or [])
        for head in HEADS_FOR_TASK.get(self.task_type or "", []):
            if head not in names:
                names.append(head)
        return names

    def to_peft_dict(self) -> dict:
        """adapter_config.json as PEFT writes it (so PeftModel.from_pretrained reads it)."""
        return {
            "peft_type": "IA3",
            "task_type": self.task_type,
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "feedforward_modules": self.feedforward_modules,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": self.modules_to_save,
            "init_ia3_weights": self.init_ia3_weights,
        }

    @classmethod
    def coerce(cls, config) -> "IA3Config":
        """Ours as is; PEFT's `peft.IA3Config` (same fields) read through its dict, as PEFT users
        pass theirs; anything else is refused, saying what is accepted."""
        if isinstance(config, cls):
            return config
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict) or not hasattr(config, "peft_type"):
            raise IA3Error(f"expected an ia3_export.IA3Config or PEFT's peft.IA3Config, got {type(config).__name__}")
        # PEFT's enums -> their names; its sets of module names -> sorted lists, as it writes them to JSON
        data = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in to_dict().items()}
        return cls.from_peft_dict(data, source=f"PEFT's {type(config).__name__}")

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = "adapter_config.json") -> "IA3Config":
        if not isinstance(data, dict):
            raise IA3Error(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type != "IA3":
            raise IA3Error(f"{source}: peft_type is {peft_type!r}, not 'IA3'; this tool reads IA3 adapters only")
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, kinds in _FIELD_TYPES.items():
            if data.get(name) is not None and not isinstance(data[name], kinds):
                expected = " or ".join(k.__name__ for k in kinds)
                raise IA3Error(f"{source}: {name} must be {expected}, got {shown(data[name])}; fix the adapter config")
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except IA3Error as e:  # name the file the bad value came from
            raise IA3Error(f"{source}: {e}") from None


# Untrusted adapter_config.json fields -> the JSON types they may hold (null means the default).
_FIELD_TYPES = {
    "task_type": (str,), "fan_in_fan_out": (bool,), "init_ia3_weights": (bool,),
    "base_model_name_or_path": (str,), "modules_to_save": (list, str),
    "target_modules": (list, str), "feedforward_modules": (list, str), "exclude_modules": (list, str),
}


def _check_patterns(field: str, value: Targets) -> None:
    """A regex must compile and a list must hold names, so a bad config fails here, in one line,
    not as a re.error or TypeError while matching module names."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise IA3Error(f"{field} {value!r} is not a valid regular expression ({e}); fix it or give a list of "
                           "module names") from None
    elif isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise IA3Error(f"{field} must list module names as strings, got {value!r}")


MATCH_SECONDS = 0.25  # one module name against one pattern: microseconds unless it backtracks badly


def matches(name: str, patterns: Targets, *, suffix_needs_dot: bool = True) -> bool:
    """PEFT's matching: a string is a full regex match; a list matches a name or `.name` suffix.

    PEFT matches feedforward_modules given as a list by plain suffix (no dot boundary); pass
    suffix_needs_dot=False to reproduce that.
    """
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return fullmatch(patterns, name)
    sep = "." if suffix_needs_dot else ""
    return any(name == p or name.endswith(sep + p) for p in patterns)


def fullmatch(pattern: str, name: str) -> bool:
    """`re.fullmatch(pattern, name)`, bounded in time.

    Python's `re` backtracks without limit: `(.*.*)*X` against one module name never finishes,
    and the pattern comes from an adapter_config.json anyone can write. The `regex` package (a
    dependency of transformers, so wherever the core runs) reads the same syntax with the same
    meaning, look-arounds included, cuts most such patterns short, and stops at a time limit;
    a pattern that reaches it is refused, naming it.
    """
    import regex

    try:
        return _compiled(pattern).fullmatch(name, timeout=MATCH_SECONDS) is not None
    except TimeoutError:
        raise IA3Error(f"target pattern {pattern!r} took over {MATCH_SECONDS} s on the module name {name!r} "
                       "(catastrophic backtracking); simplify it or list the module names") from None
    except regex.error as e:
        raise IA3Error(f"target pattern {pattern!r} is not a valid regular expression ({e}); fix it or give a list "
                       "of module names") from None


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str):
    import regex

    return regex.compile(pattern)


_REGEX_CHARS = re.compile(r"[*|()\[\]\\^$+?{}]")


def parse_modules(value: str | None) -> Targets:
    """A command-line value as PEFT's field takes it: a value with a regex character (`{}` included,
    a module name has none) is one full-match regex; otherwise a comma-separated list of names."""
    if value is None:
        return None
    if _REGEX_CHARS.search(value):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def describe(patterns: Targets) -> str:
    return patterns if isinstance(patterns, str) else ", ".join(patterns or [])


def candidate_names(names: Iterable[str], limit: int = 12) -> str:
    """Short distinct leaf names to suggest in an error message."""
    leaves = sorted({n.split(".")[-1] for n in names})
    more = f" (+{len(leaves) - limit} more)" if len(leaves) > limit else ""
    return ", ".join(leaves[:limit]) + more
