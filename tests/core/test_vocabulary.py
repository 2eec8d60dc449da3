"""One vocabulary: the task table, the dtype table, the Conv1D axis rule and the --target-modules
parser, each checked against the library that defines the fact (transformers, PEFT, numpy, onnx,
ONNX Runtime, torch, safetensors) and against what the installed CLI offers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from ia3_export.core.config import IA3Config, matches, parse_modules
from ia3_export.dtypes import DTYPES, EXPORT_DTYPES, REFERENCE_DTYPES, TRAIN_PRECISIONS, numpy_dtype, of_ort, torch_dtype
from ia3_export.errors import IA3Error
from ia3_export.core.layers import scaled_axis
from ia3_export.formats.manifest import MANIFEST_NAME
from ia3_export.tasks import ALL_NAMES, EXPORT_TASKS, FAMILIES, TASK_TYPES, TASKS, TRAIN_TASKS, auto_model_class, task_named


def _choices(command: str, option: str) -> list[str]:
    """The choices the installed script's `COMMAND --help` lists for an option ([a|b|c])."""
    result = run_cli(command, "--help", env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    found = re.search(re.escape(option) + r" \[([^\]]+)\]", result.stdout)
    assert found, result.stdout
    return found.group(1).split("|")


@pytest.mark.parametrize(("command", "option", "expected"), [
    ("train", "--task", TRAIN_TASKS),
    ("export", "--task", EXPORT_TASKS),
    ("merge", "--task", tuple(TASKS)),
    ("train", "--precision", TRAIN_PRECISIONS),
])
def test_cli_choices_are_the_tables(command, option, expected):
    assert _choices(command, option) == list(expected)


def test_every_task_name_round_trips():
    """Each name a task goes by finds its task; an unknown one is one clear error listing the names."""
    for name in ALL_NAMES:
        task = task_named(name)
        assert name == task.name or name in task.exports
    with pytest.raises(IA3Error, match="unknown task 'summarize'; use one of text-generation, "):
        task_named("summarize")
    with pytest.raises(IA3Error, match="use one of text-generation-with-past, "):
        task_named("token-classification", EXPORT_TASKS)


def test_task_types_are_peft_task_types():
    import peft
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}
    for task in TASKS.values():  # PEFT's model class for a task_type names the same head
        head = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task.task_type].__name__.removeprefix("PeftModelFor")
        bare = "AutoModel" if head == "FeatureExtraction" else None  # PEFT wraps the bare model for it
        assert task.auto_class in (f"AutoModelFor{head}", bare), (task.name, head)


def test_auto_classes_are_transformers_heads():
    """The Auto class resolves in transformers, is its pipeline's class where transformers still has
    the pipeline, and builds a model whose class name ends with one of the task's architectures."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.pipelines import SUPPORTED_TASKS

    from ia3_export.examples.tiny import tiny_config

    pipelines = 0
    for task in TASKS.values():
        cls = auto_model_class(task.auto_class)
        assert cls is getattr(transformers, task.auto_class) and issubclass(cls, _BaseAutoModelClass)
        if task.name in SUPPORTED_TASKS:
            assert [c.__name__ for c in SUPPORTED_TASKS[task.name]["pt"]] == [task.auto_class]
            pipelines += 1
    assert pipelines >= 4  # text-generation, text-classification, feature-extraction, token-classification
    for model_type, family in (("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "seq-cls"),
                               ("bert", "token-cls"), ("t5", "seq2seq-lm")):
        task = FAMILIES[family]
        built = type(auto_model_class(task.auto_class).from_config(tiny_config(model_type))).__name__
        assert built.endswith(task.architectures), (model_type, family, built)


def test_training_fields_are_what_the_reader_checks(tmp_path):
    """A row with one task's fields but not another's is refused by the other task, naming what it needs."""
    from ia3_export.train.data import read_rows

    for name in TRAIN_TASKS:
        fields = TASKS[name].train_fields[0]
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({f: ("1" if f == "label" else "some text") for f in fields}) + "\n")
        assert [r.fields for r in read_rows(str(path), name)]
        for other in TRAIN_TASKS:
            if not any(set(alt) <= set(fields) for alt in TASKS[other].train_fields):
                with pytest.raises(IA3Error, match=f"the row needs .* for {other}"):
                    read_rows(str(path), other)


def test_dtype_table_agrees_with_numpy_onnx_torch_and_safetensors():
    from onnx.helper import tensor_dtype_to_np_dtype
    from safetensors.torch import _TYPES as SAFETENSORS_TORCH

    assert len({d.onnx for d in DTYPES.values()}) == len(DTYPES)
    for d in DTYPES.values():
        onnx_np = tensor_dtype_to_np_dtype(d.onnx)
        assert np.dtype(onnx_np).name == d.torch, d  # onnx's element type is the torch dtype of the same name
        t = torch_dtype(d.short)
        assert isinstance(t, torch.dtype) and torch.empty(0, dtype=t).element_size() == d.itemsize, d
        assert np.dtype(onnx_np).itemsize == d.itemsize, d
        if d.numpy is not None:
            assert numpy_dtype(d.short) == np.dtype(onnx_np), d
            assert torch.from_numpy(np.zeros(1, d.numpy)).dtype == t, d
        else:
            with pytest.raises(IA3Error, match="numpy has no"):
                numpy_dtype(d.short)
        if d.safetensors in SAFETENSORS_TORCH:
            assert SAFETENSORS_TORCH[d.safetensors] == t, d
    assert {"F64", "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL"} <= {d.safetensors for d in DTYPES.values()}
    assert set(EXPORT_DTYPES) | set(REFERENCE_DTYPES) | set(TRAIN_PRECISIONS) <= set(DTYPES)


@pytest.mark.parametrize("short", ["fp64", "fp32", "fp16", "bf16", "int64", "int32", "int8", "uint8", "bool"])
def test_ort_type_strings_are_what_onnx_runtime_reports(short):
    """ONNX Runtime's own NodeArg.type of a graph input of that element type maps back to the entry."""
    import onnxruntime as ort
    from onnx import helper

    elem = DTYPES[short].onnx
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem, [2])], [helper.make_tensor_value_info("y", elem, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert of_ort(session.get_inputs()[0].type) is DTYPES[short]


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_scaled_axis_against_transformers_conv1d_and_linear(feedforward, conv1d):
    """Scaling the weight along `scaled_axis` equals scaling the layer's output (or its input) in
    transformers' Conv1D ([in, out] weights) and torch's Linear ([out, in])."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    n_in, n_out = 3, 5
    layer = Conv1D(n_out, n_in) if conv1d else torch.nn.Linear(n_in, n_out)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(4, n_in, dtype=torch.float32)
    vector = 1 + torch.rand(n_in if feedforward else n_out)
    with torch.no_grad():
        expected = layer(x * vector) if feedforward else layer(x) * vector
        view = [1, 1]
        view[scaled_axis(feedforward, conv1d)] = -1
        layer.weight.mul_(vector.view(view))
        if not feedforward:
            layer.bias.mul_(vector)
        torch.testing.assert_close(layer(x), expected)


TINY_LLAMA_MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize(("value", "as_list"), [
    (".{0,}v_proj", None), (r".*\.(k|v)_proj", None), ("model.layers.1.self_attn.[kv]_proj", None),
    ("k_proj, v_proj", ["k_proj", "v_proj"]), ("mlp.down_proj", ["mlp.down_proj"]),
])
def test_target_modules_parser_keeps_peft_meaning(value, as_list):
    """A value with a regex character is PEFT's regex string (full match); a plain one PEFT's list."""
    from peft import IA3Config as PeftIA3Config
    from peft.tuners.tuners_utils import check_target_module_exists

    parsed = parse_modules(value)
    assert parsed == (as_list if as_list is not None else value)
    theirs = PeftIA3Config(target_modules=parsed, feedforward_modules=[])
    picked = {n for n in TINY_LLAMA_MODULES if check_target_module_exists(theirs, n)}
    ours = {n for n in TINY_LLAMA_MODULES if matches(n, IA3Config(target_modules=parsed).target_modules)}
    assert picked and ours == picked


def test_export_takes_a_brace_quantifier_as_a_regex(model_dir, tmp_path):
    """`--target-modules '.{0,}_proj'` is a regex (as in `train` and in PEFT): the export scales exactly
    the modules PEFT's full match picks (the export used to split it as a module name and find none)."""
    from peft import IA3Config as PeftIA3Config
    from peft.tuners.tuners_utils import check_target_module_exists

    out = tmp_path / "onnx"
    result = run_cli("export", model_dir("llama"), "--out", str(out), "--mode", "swappable",
                     "--target-modules", ".{0,}_proj", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    exported = {v["name"].removesuffix(".ia3_l") for v in manifest["vectors"]}
    theirs = PeftIA3Config(target_modules=".{0,}_proj", feedforward_modules=["down_proj"])
    assert exported == {n for n in TINY_LLAMA_MODULES if check_target_module_exists(theirs, n)}


def test_serve_picks_its_model_by_task_family():
    """`serve` runs generation exports as `generate` and classification exports as `classify`
    (docs/serving.md); a feature-extraction export or an unknown task is refused."""
    from types import SimpleNamespace

    from ia3_export.serve.models import Classify, Generate, model_for

    expected = {"text-generation-with-past": Generate, "text-generation": Generate,
                "text2text-generation-with-past": Generate, "text-classification": Classify}
    for task in EXPORT_TASKS + ("", "summarize"):
        session = SimpleNamespace(folder=SimpleNamespace(task=task, path="onnx"))
        if task in expected:
            assert model_for(session) is expected[task]
        else:
            with pytest.raises(IA3Error, match=f"onnx is a {task or 'unknown'} export; `serve` runs"):
                model_for(session)
