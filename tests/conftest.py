"""Shared fixtures: tiny models saved once per session, adapters with random (non-identity) vectors.

Area-specific fixtures live in the test modules that use them.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # tests import onnxruntime themselves too (ia3_export/ort.py)


def pytest_configure(config):
    """CI tests the installed wheel, never the source tree: with IA3_TEST_INSTALLED set (by
    scripts/test.sh), a package imported from this checkout stops the run before any test.

    Tiny models run 3-30x faster on one torch thread on a shared 2-core runner. The lean job
    (tests/lean) runs without torch, so it is optional here."""
    if os.environ.get("IA3_TEST_INSTALLED"):
        import ia3_export

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.abspath(ia3_export.__file__).startswith(os.path.join(checkout, "ia3_export") + os.sep):
            raise pytest.UsageError(f"ia3_export was imported from the source tree ({ia3_export.__file__}), not the "
                                    "installed wheel; run through scripts/test.sh (it sets PYTHONSAFEPATH=1)")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(model_type, task=None) -> path of a tiny saved model (built once per session)."""
    from ia3_export.examples.tiny import save_tiny

    cache = {}

    def make(model_type: str, task: str | None = None) -> str:
        key = (model_type, task)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{model_type}-{task or 'default'}") / "model"
            cache[key] = save_tiny(str(path), model_type, task)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, model_dir):
    """adapter_dir(model_type, task=None, seed=1, **config) -> a PEFT-format adapter with random vectors."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.model import IA3Model
    from ia3_export.core.loading import load_base_model
    from ia3_export.examples.tiny import randomize_adapter

    cache = {}

    def make(model_type: str, task: str | None = None, seed: int = 1, **config) -> str:
        key = (model_type, task, seed, tuple(sorted(config.items())))
        if key not in cache:
            model = IA3Model(load_base_model(model_dir(model_type, task)), IA3Config(**config))
            randomize_adapter(model, "default", seed=seed)
            path = tmp_path_factory.mktemp(f"adapter-{model_type}-{seed}") / f"adapter{seed}"
            cache[key] = model.save_adapter(str(path))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def fused_llama(tmp_path_factory):
    """(model, adapter, root): a tiny llama with head size 16 (ORT's CPU GroupQueryAttention needs a
    multiple of 16) and a random adapter, for the `--graph fused` tests (export and parity)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    root = tmp_path_factory.mktemp("fused")
    model = save_tiny(str(root / "model"), "llama", hidden_size=64)
    ia3 = IA3Model(load_base_model(model), IA3Config())
    randomize_adapter(ia3, "default", seed=3)
    return model, ia3.save_adapter(str(root / "ad")), root


@pytest.fixture(scope="session")
def fused_exports(fused_llama):
    """fused_exports(mode, dtype) -> the `--graph fused` export of `fused_llama` (built once per session)."""
    from ia3_export.export import export_model

    model, adapter, root = fused_llama
    made = {}

    def make(mode: str, dtype: str = "fp32") -> str:
        if (mode, dtype) not in made:
            made[mode, dtype] = str(root / f"{mode}-{dtype}")
            export_model(model, made[mode, dtype], mode=mode, adapters=[adapter], graph="fused", dtype=dtype)
        return made[mode, dtype]

    return make
