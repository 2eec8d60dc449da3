"""Hostile inputs that used to hang, train nonsense or pick the wrong adapter (docs/errors.md,
"Unbounded work, silent nonsense, names"): each is refused in one line or does the right thing."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.errors import IA3Error

CATASTROPHIC = "(.*.*)*X"  # Python's re backtracks exponentially on every name without an X


# -- regex targets: bounded time, re.fullmatch's answers -----------------------------------------
def test_catastrophic_pattern_in_adapter_config_is_refused_fast(model_dir, adapter_dir, tmp_path):
    """An adapter_config.json anyone can write must not hang `merge` (it did: re.fullmatch never returned)."""
    adapter = tmp_path / "evil"
    shutil.copytree(adapter_dir("llama"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = CATASTROPHIC
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("merge", model_dir("llama"), adapter, "--out", tmp_path / "merged", timeout=120)
    assert_one_line_error(result, 2, f"target_modules [{CATASTROPHIC}] matched no module")
    assert not (tmp_path / "merged").exists()


def test_catastrophic_target_modules_option_on_train_is_refused_fast(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    result = run_cli("train", model_dir("llama"), "--data", data, "--task", "text-generation", "--out", tmp_path / "a",
                     "--target-modules", CATASTROPHIC, "--quiet", timeout=120)
    assert_one_line_error(result, 2, "matched no module")


def test_backtracking_pattern_that_matches_gives_the_right_targets():
    """Names ending in k_proj/v_proj match at once under re; every other name backtracks forever.
    Now every name is answered at once, with exactly the targets of the plain list."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import tiny_model

    pattern = IA3Model(tiny_model("llama"), IA3Config(target_modules="(.*.*)*(k_proj|v_proj)", feedforward_modules=[]))
    listed = IA3Model(tiny_model("llama"), IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]))
    assert sorted(pattern.ia3_layers()) == sorted(listed.ia3_layers()) != []


def test_pattern_that_hits_the_time_limit_is_one_line_naming_it():
    """A pattern the engine cannot cut short stops at the limit (Python's re: about 2**35 steps)."""
    from ia3_export.core.config import matches

    pattern = r"((?!b).|a)*(?<!a)"
    with pytest.raises(IA3Error, match=re.escape(repr(pattern)) + r" took over .* s on the module name") as caught:
        matches("a" * 35, pattern)
    assert "\n" not in str(caught.value)


PATTERNS = [
    r".*\.(k_proj|v_proj)", r".*\.(q|k|v)_proj", r".*layers\.[0-9]+\.mlp\.down_proj", r".*\.layers\.1\..*",
    r".*(query|key|value)", r".*\.layer\.\d+\.output\.dense", r"(?i).*C_ATTN", r".*_proj$", r"^model\..*",
    r".*\.(wo|wi|o)", r".*\.h\.\d\.(attn|mlp)\.c_(attn|proj|fc)", r"[a-z_.0-9]*fc[12]", r".*\w+_4h_to_h",
    r".*(?:SelfAttention|EncDecAttention)\.[kv]", r"decoder\.block\.0\..*", r".*\.self_attn\.[kv]_proj|.*\.fc2",
    r"lm_head|score|classifier", r"", r".*", r".*\.(?P<which>k|v)_proj", r".*\.[^.]{1,3}",
    r"^(?!.*\.0\.).*(k_proj|v_proj)", r"(?:(?<=h\.1\.)|.*\.)attn\..*", r".*(\w)\1.*", r"k\Z|.*\.k\Z",
]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert", "t5", "opt", "gpt_neox"])
def test_matching_equals_re_fullmatch_on_every_module_name(model_type):
    """A guard for the engine switch: `regex` gives Python re.fullmatch's answer (PEFT's rule) for a battery
    of ordinary patterns (look-arounds and back-references included) on every module name."""
    from ia3_export.core.config import matches
    from ia3_export.examples.tiny import tiny_model

    names = [n for n, _ in tiny_model(model_type).named_modules()]
    for pattern in PATTERNS:
        ours = [n for n in names if matches(n, pattern)]
        assert ours == [n for n in names if re.fullmatch(pattern, n)], pattern


@pytest.mark.parametrize("model_type,pattern", [
    ("llama", r".*\.(k_proj|v_proj)"), ("gpt2", r".*\.h\.\d\.(attn|mlp)\.c_(attn|proj|fc)"),
    ("bert", r".*(query|key|value)"), ("t5", r".*(?:SelfAttention|EncDecAttention)\.[kv]"),
    ("opt", r"^(?!.*layers\.0\.).*\.(k_proj|v_proj)"),
])
def test_regex_targets_equal_peft_chosen_targets(model_type, pattern):
    import peft

    from ia3_export.core.config import IA3Config
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import tiny_model

    ours = IA3Model(tiny_model(model_type), IA3Config(target_modules=pattern, feedforward_modules=[]))
    theirs = peft.get_peft_model(tiny_model(model_type), peft.IA3Config(target_modules=pattern, feedforward_modules=[]))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if isinstance(m, peft.tuners.ia3.IA3Layer))
    assert sorted(ours.ia3_layers()) == wrapped != []


# -- numbers: bad usage before any work, NaN stops training ----------------------------------------
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("bounds-data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(12)))
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--warmup-ratio", "nan"], "--warmup-ratio is nan"),
    (["--weight-decay", "-1"], "--weight-decay is -1.0"),
    (["--lr", "inf"], "--lr is inf"),
    (["--max-grad-norm", "-1"], "--max-grad-norm is -1.0"),
])
def test_bad_training_numbers_are_bad_usage(model_dir, train_data, tmp_path, args, message):
    result = run_cli("train", model_dir("llama"), "--data", train_data, "--task", "text-generation",
                     "--out", tmp_path / "out", "--max-steps", "2", "--quiet", *args)
    assert_one_line_error(result, 2, message)
    assert os.listdir(tmp_path) == []


BAD_TRAIN_OPTIONS = [
    dict(learning_rate=float("nan")), dict(learning_rate=0.0), dict(learning_rate=float("inf")),
    dict(warmup_ratio=1.0), dict(warmup_ratio=-0.1), dict(weight_decay=float("inf")), dict(weight_decay=-1e-9),
    dict(max_grad_norm=float("nan")), dict(max_grad_norm=-1.0), dict(max_grad_norm=float("inf")),
    dict(epochs=0), dict(max_steps=0), dict(batch_size=0), dict(grad_accum=0), dict(warmup_steps=-1),
    dict(epochs=1.5), dict(eval_fraction=float("nan")), dict(device="tpu"), dict(device="cuda:x"), dict(device="gpu"),
]


@pytest.mark.parametrize("bad", BAD_TRAIN_OPTIONS, ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))}")
def test_train_options_refuse_bad_values_in_the_api(bad):
    from ia3_export.train import TrainOptions

    with pytest.raises(IA3Error) as caught:
        TrainOptions(**bad)
    assert type(caught.value) is IA3Error and "\n" not in str(caught.value)


def test_train_options_accept_the_edges():
    from ia3_export.train import TrainOptions

    assert TrainOptions(max_grad_norm=0).max_grad_norm is None  # 0: clipping off, as the CLI documents
    assert TrainOptions(max_grad_norm=None, warmup_ratio=0.0, weight_decay=0.0, warmup_steps=0, device="cpu")


def test_unavailable_device_is_refused():
    import torch

    from ia3_export.train import TrainOptions

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(IA3Error, match=f"sees {count} CUDA device"):
        TrainOptions(device=f"cuda:{count}")


def test_diverging_training_stops_and_keeps_the_last_checkpoint(model_dir, train_data, tmp_path):
    """lr 4e4 sends the vectors past float16's range within a few steps (llama's RMSNorm keeps the loss
    finite, so a check on the loss alone let it write the adapter, exit 0): exit 1 naming the step and
    --lr, no adapter, the checkpoint of the step before kept, every value in it within range."""
    from ia3_export.formats.safetensors_io import read_safetensors

    out = tmp_path / "adapter"
    result = run_cli("train", model_dir("llama"), "--data", train_data, "--task", "text-generation", "--out", out,
                     "--max-steps", "8", "--save-steps", "1", "--lr", "4e4", "--quiet")
    line = assert_one_line_error(result, 1, "training diverged at step ")
    assert "beyond 65504" in line and "lower --lr" in line
    step = int(re.search(r"diverged at step (\d+)", line).group(1))
    assert step >= 2 and not out.exists() and sorted(os.listdir(tmp_path)) == ["adapter.checkpoints"]
    kept = sorted(os.listdir(tmp_path / "adapter.checkpoints"))
    assert kept[-1] == f"step-{step - 1:08d}"
    tensors = read_safetensors(str(tmp_path / "adapter.checkpoints" / kept[-1] / "adapter_model.safetensors"))
    assert tensors and all(np.isfinite(v).all() and np.abs(v).max() <= 65504 for v in tensors.values())


def test_a_runaway_first_step_writes_nothing(model_dir, train_data, tmp_path):
    """lr 1e30: the vectors reach 1e30 at step 1 while the loss stays finite; nothing is written."""
    result = run_cli("train", model_dir("llama"), "--data", train_data, "--task", "text-generation",
                     "--out", tmp_path / "adapter", "--max-steps", "4", "--save-steps", "1", "--lr", "1e30", "--quiet")
    assert_one_line_error(result, 1, "training diverged at step 1 (a vector entry reached 1e+30, beyond 65504)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--grad-accum", "1000000000"], "--grad-accum 1000000000 x 1 process(es) splits each step into more micro-batches "
                                     "than the 11 training examples; give --grad-accum 11 or less"),
    (["--grad-accum", "5", "--max-steps", "100000000"], "100000000 steps (--max-steps) x --grad-accum 5 = 500000000 "
                                                       "micro-batches, more than the 100000000 a run may take"),
    (["--epochs", "2000000000"], "4000000000 steps (--epochs 2000000000 x 2 steps per epoch) x --grad-accum 1 = 4000000000"),
    (["--seed", "-1"], "--seed is -1; give a whole number in the range 0<=x<=4294967295"),
    (["--batch-size", "0"], "--batch-size is 0; give a whole number in the range 1<=x<=2147483647"),
])
def test_training_arithmetic_is_bounded(model_dir, train_data, tmp_path, args, message):
    """Steps x accumulation is the run's length: bounded, refused in one line naming the product and the fix."""
    result = run_cli("train", model_dir("llama"), "--data", train_data, "--task", "text-generation",
                     "--out", tmp_path / "out", "--quiet", *args, timeout=300)
    assert_one_line_error(result, 2, message)
    assert os.listdir(tmp_path) == []


def test_bad_parity_numbers_are_bad_usage_not_a_failed_check(model_dir, tmp_path_factory):
    from runtime_helpers import export_once

    base = model_dir("llama")
    onnx = export_once(tmp_path_factory, base, "merged", [])
    result = run_cli("parity", base, onnx, "--atol", "nan", "--rtol", "0")
    assert_one_line_error(result, 2, "--atol is nan")


@pytest.mark.parametrize("bad", [dict(atol=float("nan")), dict(rtol=-1e-3), dict(atol=float("inf")),
                                 dict(greedy_steps=-1), dict(provider="tpu"), dict(reference_dtype="fp8")])
def test_parity_options_refuse_bad_values_in_the_api(bad):
    from ia3_export.parity import ParityOptions

    with pytest.raises(IA3Error):
        ParityOptions(**bad)


# -- adapter names: export writes only names the runtime takes; bare words are shipped names ----------
@pytest.fixture(scope="module")
def odd_names(tmp_path_factory, model_dir, adapter_dir):
    """A swappable export (through the CLI) of adapters in folders named 'my adapter' and 'café'."""
    root = tmp_path_factory.mktemp("bounds-names")
    folders = [root / "my adapter", root / "café"]
    for seed, folder in enumerate(folders, 1):
        shutil.copytree(adapter_dir("llama", seed=seed), folder)
    out = root / "onnx"
    result = run_cli("export", model_dir("llama"), "--out", out, "--mode", "swappable",
                     "--adapter", folders[0], "--adapter", folders[1])
    assert result.exit_code == 0, result.output
    return {"out": str(out), "folders": [str(f) for f in folders], "stdout": result.stdout, "root": root}


def generate(onnx, adapter, cwd=None):
    result = run_cli("generate", onnx, "--prompt", "the cat ", "--max-new-tokens", "12", "--adapter", adapter, cwd=cwd)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_export_derives_names_the_runtime_accepts_and_says_so(odd_names):
    from ia3_export.runtime import IA3Session

    manifest = json.loads(open(os.path.join(odd_names["out"], "ia3_export.json")).read())
    names = [a["name"] for a in manifest["adapters"]]
    assert names == ["my_adapter", "caf_"]
    assert [a["file"] for a in manifest["adapters"]] == ["adapters/my_adapter.onnx_adapter", "adapters/caf_.onnx_adapter"]
    assert "adapter folder 'my adapter' is named 'my_adapter'" in odd_names["stdout"]
    session = IA3Session(odd_names["out"])
    assert session.load_shipped_adapters() == names
    # the shipped name and the original folder (as a path) are the same adapter
    assert generate(odd_names["out"], "my_adapter") == generate(odd_names["out"], odd_names["folders"][0])


def test_names_that_collide_after_deriving_are_refused(model_dir, adapter_dir, tmp_path):
    from ia3_export.export import export_model

    for name in ("a b", "a_b"):
        shutil.copytree(adapter_dir("llama"), tmp_path / name)
    with pytest.raises(IA3Error, match="two adapters get the name 'a_b'"):
        export_model(model_dir("llama"), str(tmp_path / "onnx"), mode="swappable",
                     adapters=[str(tmp_path / "a b"), str(tmp_path / "a_b")])


def far_adapter(model_dir, path) -> str:
    """An adapter far from the identity (vectors 1 +- 4), so the text it generates shows which one ran."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter

    model = IA3Model(load_base_model(model_dir("llama")), IA3Config())
    randomize_adapter(model, "default", seed=7, spread=4.0)
    return model.save_adapter(str(path))


def test_a_shipped_name_wins_over_a_same_named_folder_here(odd_names, model_dir, tmp_path):
    """Before: `--adapter my_adapter` silently loaded ./my_adapter when the current directory had one."""
    far_adapter(model_dir, tmp_path / "my_adapter")  # another adapter, same name
    shipped = generate(odd_names["out"], "my_adapter", cwd=tmp_path)
    local = generate(odd_names["out"], "./my_adapter", cwd=tmp_path)
    assert local != shipped  # the two adapters really differ, so the choice shows
    assert shipped == generate(odd_names["out"], os.path.join(odd_names["out"], "adapters", "my_adapter.onnx_adapter"))


def test_a_bare_word_that_is_only_a_path_here_is_ambiguous(odd_names, adapter_dir, tmp_path):
    shutil.copytree(adapter_dir("llama"), tmp_path / "other")
    result = run_cli("generate", odd_names["out"], "--prompt", "x", "--adapter", "other", cwd=tmp_path)
    assert_one_line_error(result, 2, "pass ./other to load that path")
    assert generate(odd_names["out"], "./other", cwd=tmp_path)


def test_name_for_always_gives_an_accepted_name():
    from ia3_export.formats.adapter_names import check_name, name_for

    for folder in ("my adapter", "café", "a..b", "..", "...x", "-x", "x" * 300, "日本語", "ok.v1", "a.onnx_adapter"):
        assert check_name(name_for(os.path.join("/tmp", folder))) == name_for(folder)
    assert name_for("/tmp/ok.v1") == "ok.v1" and name_for("x/a.onnx_adapter") == "a"
    assert len(name_for("x" * 300)) == 128


def test_a_nan_loss_stops_training_in_the_api(model_dir, train_data, tmp_path):
    """A final norm weight that is finite but overflows the logits (3e38) gives a NaN loss at step 1:
    CheckFailed for Python callers too, and nothing on disk."""
    from safetensors.numpy import load_file, save_file

    from ia3_export.errors import CheckFailed
    from ia3_export.train import train

    model = shutil.copytree(model_dir("llama"), tmp_path / "model")
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v * np.float32(3e38) if k == "model.norm.weight" else v for k, v in weights.items()},
              str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckFailed, match=r"training diverged at step 1 \(the loss is nan\), so no adapter was written;"):
        train(str(model), train_data, "text-generation", str(tmp_path / "out"), quiet=True, max_steps=2)
    assert sorted(os.listdir(tmp_path)) == ["model"]
