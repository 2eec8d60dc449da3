"""Fuzzing (a few hundred cases; scripts/fuzz.py runs thousands): mutated adapter folders,
.onnx_adapter files and training data files end in success or one clean IA3Error line, never
another exception, a hang or a crash. Cases are derandomized, so a failure reproduces."""
from __future__ import annotations

import importlib.util
import os

import pytest

from runtime_helpers import export_once

EXAMPLES = {"adapter": 200, "onnx_adapter": 150, "data": 250}


def load_fuzz():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "fuzz.py")
    spec = importlib.util.spec_from_file_location("ia3_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, model_dir, adapter_dir):
    module = load_fuzz()
    base, adapter = model_dir("llama"), adapter_dir("llama", seed=1)
    folder = export_once(tmp_path_factory, base, "swappable", [adapter])
    return module, module.Targets(base, adapter, folder, str(tmp_path_factory.mktemp("fuzz")))


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
