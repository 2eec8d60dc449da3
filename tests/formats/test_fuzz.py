"""Fuzzing (a few hundred cases; scripts/fuzz.py runs thousands): mutated adapter folders,
.onnx_adapter files and training data files end in success or one clean IA3Error line, never
another exception, a hang or a crash. Manifests and safetensors headers are fuzzed structure-aware
in a child process whose address space is capped, so an allocation bomb fails the test instead
of the machine. Cases are derandomized, so a failure reproduces."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from runtime_helpers import export_once

EXAMPLES = {"adapter": 200, "onnx_adapter": 150, "data": 250}
CAPPED_EXAMPLES = {"manifest": 150, "config": 60, "tokenizer": 150, "readers": 250, "safetensors": 250}  # a child under RLIMIT_AS
FUZZ = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "fuzz.py")


def load_fuzz():
    spec = importlib.util.spec_from_file_location("ia3_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, model_dir, adapter_dir):
    module = load_fuzz()
    base, adapter = model_dir("llama"), adapter_dir("llama", seed=1)
    folder = export_once(tmp_path_factory, base, "swappable", [adapter])
    return module, module.Targets(base, adapter, folder, str(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(scope="module")
def swappable(tmp_path_factory, model_dir, adapter_dir):
    return export_once(tmp_path_factory, model_dir("llama"), "swappable", [adapter_dir("llama", seed=1)])


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_fuzz(fuzz, target):
    module, targets = fuzz
    module.run(targets, target, EXAMPLES[target])


def test_fuzz_catches_an_unclean_error(fuzz):
    """The harness itself: an exception other than IA3Error, or a multi-line message, fails."""
    module, _ = fuzz
    from ia3_export.errors import IA3Error

    module.clean(lambda: None)
    module.clean(lambda: (_ for _ in ()).throw(IA3Error("one line")))
    with pytest.raises(KeyError):
        module.clean(lambda: {}["x"])
    with pytest.raises(AssertionError, match="unclear error"):
        module.clean(lambda: (_ for _ in ()).throw(IA3Error("two\nlines")))


@pytest.mark.parametrize("target", list(CAPPED_EXAMPLES))
def test_fuzz_formats_under_a_memory_cap(swappable, tmp_path, target):
    """Structure-aware manifests (opened, inspected, served, one token generated), model configs and
    tokenizer files (fed to every registered reader that reads them), every registered reader's files
    mutated, and safetensors files (read, and compared with the safetensors library), overlap and
    depth bombs included."""
    done = subprocess.run([sys.executable, FUZZ, "--target", target, "--examples", str(CAPPED_EXAMPLES[target]),
                           "--onnx", swappable, "--work", str(tmp_path), "--memory-mb", "1024"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{target}: {CAPPED_EXAMPLES[target]} cases, all clean" in done.stdout


def test_memory_cap_turns_a_bomb_into_a_failure():
    """The harness itself: under the cap, a 2 GiB allocation is a MemoryError, not a swapping machine."""
    code = (f"import importlib.util; s = importlib.util.spec_from_file_location('f', {FUZZ!r}); "
            "f = importlib.util.module_from_spec(s); s.loader.exec_module(f); f.limit_memory(256); "
            "import numpy; numpy.ones(2**29, dtype=numpy.float32)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "MemoryError" in done.stderr, done.stderr[-2000:]
