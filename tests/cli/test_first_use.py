"""What a new user met first and was misled by: each answer checked against the folder itself."""
from __future__ import annotations

import json
import os

import pytest

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.errors import IA3Error


def _export(tmp_path_factory, model_dir, model_type: str, name: str, **options) -> str:
    from ia3_export.export import export_model

    out = str(tmp_path_factory.mktemp(name) / "onnx")
    export_model(model_dir(model_type), out, mode="merged", **options)
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, model_dir):
    """A tiny BERT text classifier, int8: its head (a Gemm) stays float."""
    return _export(tmp_path_factory, model_dir, "bert", "cls-int8", quantize="int8")


def test_generate_on_a_classifier_says_it_needs_a_decoder_export(classifier):
    from ia3_export.runtime import IA3Session

    assert json.load(open(os.path.join(classifier, "ia3_export.json")))["task"] == "text-classification"
    line = assert_one_line_error(run_cli("generate", classifier, "--prompt", "hi"), 2,
                                 "is a text-classification export; generation needs a decoder export")
    assert "`ia3-export serve` classifies text with it" in line and "token_type_ids" not in line
    with pytest.raises(IA3Error, match="is a text-classification export; generation needs a decoder export"):
        IA3Session(classifier).generate("hi")


def _quantized_sources(folder: str) -> set[str]:
    """The parameters whose weights the manifest says were quantized."""
    q = json.load(open(os.path.join(folder, "ia3_export.json")))["quantization"]
    names = set()
    for graph in q["graphs"].values():
        for source in graph["weights"].values():  # a parameter, or [[parameter, width], ...] packed
            names |= {source} if isinstance(source, str) else {part[0] for part in source}
    return names


def test_inspect_names_a_classifiers_real_head(classifier):
    assert not any(name.startswith("classifier.") for name in _quantized_sources(classifier))
    result = run_cli("inspect", classifier)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("quantized:"))
    assert "head classifier float" in line and "lm_head" not in line, line
    summary = json.loads(run_cli("inspect", "--json", classifier).stdout)["quantization"]
    assert summary["head"] == "classifier float" and "lm_head" not in summary


@pytest.mark.parametrize("lm_head", [True, False])
def test_inspect_says_whether_a_decoders_lm_head_is_quantized(tmp_path_factory, model_dir, lm_head):
    from ia3_export.export.quantize import QuantizeOptions

    folder = _export(tmp_path_factory, model_dir, "llama", f"llama-int8-{lm_head}",
                     quantize=QuantizeOptions("int8", lm_head=lm_head))
    assert ("lm_head.weight" in _quantized_sources(folder)) == lm_head
    summary = json.loads(run_cli("inspect", "--json", folder).stdout)["quantization"]
    assert summary["head"] == ("lm_head int8" if lm_head else "lm_head float")


def test_export_help_offers_fused_in_fp16():
    text = " ".join(run_cli("export", "--help").stdout.split())
    assert "fp32 or fp16" in text and "fp32 CPU" not in text
