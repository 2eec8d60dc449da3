"""Training: loss falls per task, PEFT loads the result, resume == uninterrupted, bad input refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ia3_export.train import train

# task -> (model type, tiny task, rows of a synthetic task an IA3 adapter can learn)
ANIMALS = ["cat", "dog", "cow", "owl", "bee", "pig"]


def _rows(task: str) -> list[dict]:
    if task == "text-generation":
        return [{"prompt": f"the {a} ", "completion": "is here"} for a in ANIMALS * 6]
    if task == "text-classification":
        return [{"text": f"{w} {a}", "label": "pos" if w == "good" else "neg"} for a in ANIMALS * 3 for w in ("good", "bad")]
    return [{"source": f"say {a}", "target": "ok"} for a in ANIMALS * 6]


SETUPS = {
    "text-generation": ("llama", None),
    "text-classification": ("bert", "feature-extraction"),  # a base without a head, as MiniLM is
    "text2text-generation": ("t5", None),
}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models train faster on one thread, much faster when other jobs share the cores."""
    from ia3_export.examples.shipped import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny models; the Llama gets a wider init so its logits are not all ~0 (IA3 only rescales)."""
    from ia3_export.examples.tiny import save_tiny

    root = tmp_path_factory.mktemp("train-bases")
    return {task: save_tiny(str(root / task), model_type, tiny_task, **({"initializer_range": 0.2} if model_type == "llama" else {}))
            for task, (model_type, tiny_task) in SETUPS.items()}


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    results = {}
    for task in SETUPS:
        data = write_jsonl(root / f"{task}.jsonl", _rows(task))
        results[task] = train(base[task], data, task, str(root / f"out-{task}"), quiet=True,
                              max_steps=16, learning_rate=0.1, batch_size=8)
    return results


@pytest.mark.parametrize("task", list(SETUPS))
def test_loss_falls_and_output_folder(task, trained):
    result = trained[task]
    m = result.metrics
    assert m["eval_loss"] < 0.7 * m["eval_loss_before"], m
    first, last = result.log[0]["loss"], result.log[-1]["loss"]
    assert last < 0.7 * first
    if task == "text-classification":
        assert m["eval_accuracy"] == 1.0 and result.labels == ["neg", "pos"]
    files = set(os.listdir(result.adapter_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss_curve.png"} <= files
    with open(os.path.join(result.adapter_dir, "train_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all({"step", "loss", "lr"} <= set(r) for r in records) and "eval_loss" in records[-1]
    with open(os.path.join(result.adapter_dir, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(result.adapter_dir + ".checkpoints")


@pytest.mark.parametrize("task", list(SETUPS))
def test_peft_loads_the_adapter_with_the_same_outputs(task, trained, base):
    """PEFT's PeftModel (an independent implementation) gives the logits our model gives."""
    import transformers
    from peft import PeftModel

    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.train.data import TASKS

    auto = TASKS[task].auto_class
    extra = {"num_labels": 2} if task == "text-classification" else {}
    ours = IA3Model(load_base_model(base[task], auto, **extra))
    ours.load_adapter(trained[task].adapter_dir)
    theirs = PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(base[task], **extra),
                                       trained[task].adapter_dir).eval()
    ids = torch.tensor([[5, 70, 80, 90, 100, 33]])
    kwargs = {"input_ids": ids}
    if task == "text2text-generation":
        kwargs["decoder_input_ids"] = torch.tensor([[0, 72, 73]])
    with torch.no_grad():
        expected = theirs(**kwargs).logits
        got = ours(**kwargs).logits
        with ours.disable_adapters():
            untouched = ours(**kwargs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - untouched).abs().max() > 1e-3  # the adapter changed something


def test_accumulation_and_checkpointing_change_nothing(base, tmp_path):
    """4 x 2 accumulated micro-batches with activation checkpointing == one batch of 8."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * (1 + i % 4), "completion": "ab" * (1 + i % 3)} for i in range(24)])
    common = dict(quiet=True, max_steps=4, learning_rate=0.05)
    one = train(base["text-generation"], data, "text-generation", str(tmp_path / "one"), batch_size=8, **common)
    split = train(base["text-generation"], data, "text-generation", str(tmp_path / "split"), batch_size=4, grad_accum=2,
                  gradient_checkpointing=True, **common)
    a, b = (load_file(os.path.join(r.adapter_dir, "adapter_model.safetensors")) for r in (one, split))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    assert max((v - 1).abs().max().item() for v in a.values()) > 1e-2


def test_resume_equals_uninterrupted(base, tmp_path):
    """Interrupt after a checkpoint, resume: same adapter and same loss curve (dropout included)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "cls.jsonl", _rows("text-classification"))
    options = dict(quiet=True, max_steps=6, learning_rate=0.05, batch_size=4, grad_accum=2, warmup_steps=2, save_steps=2)
    whole = train(base["text-classification"], data, "text-classification", str(tmp_path / "whole"), **options)

    def crash(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    out = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train(base["text-classification"], data, "text-classification", out, on_log=crash, **options)
    assert not os.path.exists(out) and sorted(os.listdir(out + ".checkpoints")) == ["step-00000002", "step-00000004"]
    resumed = train(base["text-classification"], data, "text-classification", out, resume=True, **options)
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in whole.log]
    assert resumed.metrics["eval_accuracy_before"] == whole.metrics["eval_accuracy_before"]
    a = load_file(os.path.join(whole.adapter_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)
    with torch.no_grad():
        assert any((v - 1).abs().max() > 1e-3 for k, v in a.items() if k.endswith("ia3_l"))


def test_resume_refuses_changed_options(base, tmp_path):
    from ia3_export.errors import IA3Error

    data = write_jsonl(tmp_path / "cls.jsonl", _rows("text-classification"))
    out = str(tmp_path / "a")

    def crash(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(base["text-classification"], data, "text-classification", out, quiet=True, max_steps=4, save_steps=1, on_log=crash)
    with pytest.raises(IA3Error, match="learning_rate was 0.003 in the interrupted run"):
        train(base["text-classification"], data, "text-classification", out, quiet=True, max_steps=4, resume=True,
              learning_rate=0.01)


def test_tiny_causal_lm_example_learns_to_say_the_sound(tmp_path):
    """The demo's generator: the adapter changes what the base model says, also for held-out animals."""
    from ia3_export.examples.shipped import tiny_causal_lm

    result = tiny_causal_lm(str(tmp_path / "toy"))
    assert result["says_sound_adapter"] == 1.0 and result["says_sound_base"] <= 0.5, result["samples"]
    assert result["metrics"]["eval_loss"] < result["metrics"]["eval_loss_before"]
    held_out = {s["prompt"]: s["adapter"] for s in result["samples"]}
    assert held_out["the frog "] == "croaks." and held_out["the sheep "] == "bleats."
    base = {s["prompt"]: s["base"] for s in result["samples"]}  # the base says the colour, held-out animals too
    assert base["the frog "] == "is green." and base["the sheep "] == "is cream."
    with open(os.path.join(result["adapter_dir"], "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == result["base_dir"]
    assert sorted(os.listdir(tmp_path)) == ["toy"]


def test_cli_trains_with_overridden_targets(base, tmp_path):
    """The command: its own target list (q_proj, and up_proj scaled at its input), the table, the folder."""
    from safetensors.torch import load_file

    from cli_helpers import run_cli
    from ia3_export.core.config import parse_modules as _modules

    assert _modules("q_proj, up_proj") == ["q_proj", "up_proj"] and _modules("mlp.c_proj") == ["mlp.c_proj"]
    assert _modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    data = write_jsonl(tmp_path / "d.jsonl", _rows("text-generation"))
    out = tmp_path / "out"
    result = run_cli("train", base["text-generation"], "--data", data, "--task", "text-generation",
                                       "--out", str(out), "--max-steps", "2", "--target-modules", "q_proj,up_proj",
                                       "--feedforward-modules", "up_proj")
    assert result.exit_code == 0, result.output
    assert "| eval_perplexity " in result.output and f"wrote {out}" in result.output
    shapes = {k: tuple(v.shape) for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    assert shapes == {f"base_model.model.model.layers.{i}.{m}.ia3_l": s for i in range(2)
                      for m, s in (("self_attn.q_proj", (32, 1)), ("mlp.up_proj", (1, 32)))}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "up_proj"] and config["feedforward_modules"] == ["up_proj"]
