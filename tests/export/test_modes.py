"""Modes are strategies over one export loop: one list of names, one class per mode, and a fifth
mode is one new class."""
from __future__ import annotations

import numpy as np


def test_one_list_of_modes_feeds_registry_bindings_and_cli():
    from ia3_export.cli.export import command
    from ia3_export.export.modes import EXPORT_MODES, ExportMode
    from ia3_export.formats.manifest import MODES
    from ia3_export.runtime.bindings import BINDINGS

    choices = next(p for p in command.params if p.name == "mode").type.choices
    assert tuple(EXPORT_MODES) == MODES == tuple(BINDINGS) == tuple(choices)
    for name, mode in EXPORT_MODES.items():
        assert issubclass(mode, ExportMode) and mode.name == name


def test_a_fifth_mode_is_one_class(monkeypatch, model_dir, adapter_dir, tmp_path):
    """A mode registered under a new name that reuses swappable's hooks exports, validates and ships
    its adapter file with no other change: nothing in the loop tests a mode's name. Its graph fed the
    shipped adapter file computes what the swappable export computes (onnxruntime, numpy)."""
    import onnxruntime as ort

    from ia3_export.formats import manifest
    from ia3_export.export import export_model
    from ia3_export.export.modes import EXPORT_MODES
    from ia3_export.export.modes.swappable import Swappable
    from ia3_export.formats.onnx_adapter import read_onnx_adapter

    class Toy(Swappable):
        name = "toy"

    monkeypatch.setattr(manifest, "MODES", (*manifest.MODES, Toy.name))
    monkeypatch.setitem(EXPORT_MODES, Toy.name, Toy)
    model, adapter = model_dir("bert"), adapter_dir("bert")
    toy = export_model(model, str(tmp_path / "toy"), mode="toy", adapters=[adapter])
    swappable = export_model(model, str(tmp_path / "swappable"), mode="swappable", adapters=[adapter])
    assert toy["mode"] == "toy" and toy["vectors"] == swappable["vectors"] and toy["vectors"]
    assert toy["validation"]["comparisons"] == swappable["validation"]["comparisons"] > 0
    [entry] = toy["adapters"]
    vectors = read_onnx_adapter(str(tmp_path / "toy" / entry["file"]))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(4, 90, (2, 6)), "attention_mask": np.ones((2, 6), np.int64),
             "token_type_ids": np.zeros((2, 6), np.int64)}
    outputs = []
    for folder in ("toy", "swappable"):
        session = ort.InferenceSession(str(tmp_path / folder / "model.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds | vectors)[0])
        base = session.run(None, feeds)[0]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-6)
    assert np.abs(outputs[0] - base).max() > 1e-5  # the adapter's vectors moved the logits, far past 1e-6
