"""onnxruntime-genai serves our exports: run by scripts/interop_genai.sh in .venv-genai (onnxruntime-genai
0.18) against folders tests/interop_genai/prepare.py exported with the main environment, whose
expected.json holds transformers' (PEFT's) greedy tokens. Skipped unless IA3_GENAI_DIR names them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GENAI_DIR = os.environ.get("IA3_GENAI_DIR")
if not GENAI_DIR:
    pytest.skip("set IA3_GENAI_DIR (scripts/interop_genai.sh does) to run the onnxruntime-genai checks",
                allow_module_level=True)
og = pytest.importorskip("onnxruntime_genai")

with open(os.path.join(GENAI_DIR, "expected.json")) as f:
    EXPECTED = json.load(f)
MODEL_TYPES = list(EXPECTED["models"])


def path(*parts):
    return os.path.join(GENAI_DIR, *parts)


def genai_greedy(model, prompt_ids, adapters=None, name=None) -> list[int]:
    """onnxruntime-genai's greedy tokens after the prompt, EOS included (get_sequence leaves out the EOS that
    ends a run, so each chosen token is collected)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + EXPECTED["max_new_tokens"])
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens([prompt_ids])
    chosen = []
    while not generator.is_done():
        generator.generate_next_token()
        chosen.append(int(generator.get_next_tokens()[0]))
    return chosen


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("mode", ["merged", "swappable"])
def test_genai_loads_the_export_and_matches_transformers_and_our_runtime(model_type, mode):
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids

    folder = path(model_type, mode)
    manifest = json.load(open(os.path.join(folder, "ia3_export.json")))
    assert manifest["genai"]["supported"] and "genai_config.json" in manifest["genai"]["files"]
    expected = EXPECTED["models"][model_type]
    adapter = "adapter1" if mode == "merged" else "base"  # merged folds adapter1; swappable runs the base model
    model, ours = og.Model(folder), IA3Session(folder)
    tokenizer = og.Tokenizer(model)
    for text, ids, want in zip(EXPECTED["prompts"], expected["prompt_ids"], expected["greedy"][adapter]):
        assert [int(t) for t in tokenizer.encode(text)] == ids  # genai reads the tokenizer files we ship
        got = genai_greedy(model, ids)
        assert got == want
        # our runtime, through its text API: the same tokens, so the same text (genai's decode differs from
        # the tokenizers library's on the invalid UTF-8 a random tiny model emits, so compare through ours)
        assert ours.generate(text, adapter=None, max_new_tokens=EXPECTED["max_new_tokens"]) == \
            ours.tokenizer().decode(got)
        assert generate_ids(ours, [ids], None, GenerationOptions(max_new_tokens=EXPECTED["max_new_tokens"]))[0] == got


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_genai_adapters_from_export_and_convert_switch_between_generators(model_type):
    folder = path(model_type, "swappable")
    expected = EXPECTED["models"][model_type]
    model = og.Model(folder)
    adapters = og.Adapters(model)
    adapters.load(os.path.join(folder, "adapters", "adapter1.onnx_adapter"), "adapter1")  # written by export
    adapters.load(path(model_type, "adapter2.onnx_adapter"), "adapter2")  # written by convert
    for name in ("adapter1", "adapter2", "adapter1"):  # each generator takes its own adapter
        assert [genai_greedy(model, ids, adapters, name) for ids in expected["prompt_ids"]] == expected["greedy"][name]
    assert [genai_greedy(model, ids) for ids in expected["prompt_ids"]] == expected["greedy"]["base"]



def test_genai_serves_an_int4_swappable_export_with_its_adapter():
    """An int4 base (MatMulNBits) keeps the vectors as float inputs: genai runs it with and without the
    shipped adapter and gives our runtime's greedy tokens on the same folder (test_quantize checks
    those against the de-quantized PyTorch model)."""
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids

    folder = path("llama", "swappable-int4")
    manifest = json.load(open(os.path.join(folder, "ia3_export.json")))
    assert manifest["quantization"]["method"] == "int4" and manifest["genai"]["supported"]
    model, ours = og.Model(folder), IA3Session(folder)
    ours.load_adapter("adapter1")
    adapters = og.Adapters(model)
    adapters.load(os.path.join(folder, "adapters", "adapter1.onnx_adapter"), "adapter1")
    options = GenerationOptions(max_new_tokens=EXPECTED["max_new_tokens"])
    runs = {}
    for name in (None, "adapter1"):
        runs[name] = [genai_greedy(model, ids, adapters if name else None, name)
                      for ids in EXPECTED["models"]["llama"]["prompt_ids"]]
        assert runs[name] == [generate_ids(ours, [ids], [name], options)[0]
                              for ids in EXPECTED["models"]["llama"]["prompt_ids"]]
    assert runs[None] != runs["adapter1"]  # the adapter changes what the quantized base says

def test_bank_export_says_genai_cannot_feed_adapter_ids():
    folder = path(MODEL_TYPES[0], "bank")
    manifest = json.load(open(os.path.join(folder, "ia3_export.json")))
    assert manifest["genai"]["supported"] is False and "adapter_ids" in manifest["genai"]["reason"]
    assert not os.path.exists(os.path.join(folder, "genai_config.json"))


def test_mismatched_adapter_is_refused_by_us_with_a_clear_message_before_genai():
    """An adapter written for another model: our runtime names the mismatch in one line (exit 2);
    genai only fails at load or run time with ORT's own words."""
    llama, other = path("llama", "swappable"), path("gpt2", "adapter2.onnx_adapter")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ia3-export"), "generate", llama,
                             "--adapter", other, "--prompt", "hi", "--max-new-tokens", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "adapter2.onnx_adapter" in lines[0], lines
    model = og.Model(llama)
    with pytest.raises(Exception):
        adapters = og.Adapters(model)
        adapters.load(other, "other")
        genai_greedy(model, EXPECTED["models"]["llama"]["prompt_ids"][0], adapters, "other")
