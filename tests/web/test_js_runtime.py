"""ia3_export/web/ia3.mjs, the JavaScript module (issue 24, deliverable 2), on the tiny Llama's swappable and
bank exports with two adapters. Node drives the module (tests/web/js_*.mjs) and prints what it got; every
number is checked here against an independent reference: Python's own runtime (IA3Session), PEFT's
greedy tokens and float64 PyTorch logits."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from runtime_helpers import llama_exports, open_session, peft_greedy, peft_model

from ia3_export import __version__
from ia3_export.compare import compare
from ia3_export.formats.onnx_adapter import read_onnx_adapter, write_onnx_adapter
from ia3_export.tolerances import tolerance
from ia3_export.web import module_path

PROMPT = [5, 6, 7, 8, 9, 10]
TEXT = "hello world"
ADAPTERS = [None, "adapter1", "adapter2", None, "adapter1"]  # the script's order of switches


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    return llama_exports(tmp_path_factory, model_dir, adapter_dir, modes=("swappable", "bank"))


@pytest.fixture(scope="module")
def python_side(llama):
    """Greedy tokens and text from Python's IA3Session, and PEFT's greedy tokens, per adapter."""
    s = open_session(llama["swappable"], llama["a1"], llama["a2"])
    tok = s.tokenizer()
    text_ids = tok.encode(TEXT)
    out = {}
    for name, folder in ((None, None), ("adapter1", llama["a1"]), ("adapter2", llama["a2"])):
        out[name] = {
            "ids": _ids(s, PROMPT, name, 8),
            "peft": peft_greedy(llama["base"], folder, [PROMPT], 8)[0],
            "text_ids": _ids(s, text_ids, name, 6),
            "text": s.generate(TEXT, adapter=name, max_new_tokens=6),
        }
    s.close()
    return out


def _ids(session, prompt, adapter, n):
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    return generate_ids(session, [prompt], [adapter], GenerationOptions(max_new_tokens=n))[0]


@pytest.fixture(scope="module")
def js(llama, node):
    """mode -> backend -> what js_generate.mjs printed."""
    cache = {}

    def get(mode, backend="node"):
        if (mode, backend) not in cache:
            cache[mode, backend] = node("js_generate.mjs", llama[mode], backend, PROMPT, TEXT)
        return cache[mode, backend]

    return get


def test_version_is_the_wheels():
    with open(module_path()) as f:
        assert re.search(r'export const VERSION = "([^"]+)"', f.read()).group(1) == __version__


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_greedy_per_adapter_equals_python_and_peft(js, python_side, mode):
    out = js(mode)
    assert out["mode"] == mode
    assert out["adaptersAtOpen"] == ([] if mode == "swappable" else ["adapter1", "adapter2"])
    for run in out["greedy"]:
        want = python_side[run["adapter"]]
        assert run["tokens"] == want["ids"] == want["peft"], run["adapter"]
        assert run["textTokens"] == want["text_ids"] and run["text"] == want["text"], run["adapter"]


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_switching_in_one_session_changes_and_restores(js, mode):
    runs = js(mode)["greedy"]
    assert [r["adapter"] for r in runs] == ADAPTERS
    tokens = [r["tokens"] for r in runs]
    assert len({tuple(t) for t in tokens[:3]}) == 3  # base, adapter1, adapter2 all differ
    assert tokens[3] == tokens[0] and tokens[4] == tokens[1]  # back to the base, back to adapter1
    assert all(ms >= 0 for ms in js(mode)["switchMs"])


def test_loads_report_bytes(js, llama):
    loads = js("swappable")["loads"]
    assert [l["name"] for l in loads] == ["adapter1", "adapter2"]
    assert loads[0]["bytes"] == len(open(f"{llama['swappable']}/adapters/adapter1.onnx_adapter", "rb").read())


def test_streaming_calls_once_per_token_before_resolving(js, python_side):
    stream = js("swappable")["stream"]
    calls, result = stream["calls"], stream["result"]
    assert [c[0] for c in calls] == result["tokens"] == python_side["adapter2"]["text_ids"]
    assert not any(c[2] for c in calls)  # every call came before generate resolved
    assert "".join(c[1] for c in calls) == result["text"] == python_side["adapter2"]["text"]


def test_sampling_is_seeded_and_its_limits_are_greedy(js):
    s = js("swappable")["sampled"]
    assert s["a"] == s["b"]  # same seed, same tokens
    assert s["c"] != s["greedy"]  # temperature 5 over a 320-token vocabulary leaves the greedy path
    assert s["tinyTemperature"] == s["greedy"] and s["tinyTopP"] == s["greedy"]


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_logits_match_float64_torch(js, llama, mode):
    import torch

    out = js(mode)["logits"]
    got = np.frombuffer(base64.b64decode(out["b64"]), dtype=np.float32).reshape(out["dims"])
    model = peft_model(llama["base"], llama["a2"]).double()  # the script's last adapter before logits: adapter2
    with torch.no_grad():
        want = model(input_ids=torch.tensor([PROMPT])).logits.numpy()
    atol, rtol = tolerance("cpu", "fp32")[:2]
    c = compare("logits", want, got, atol, rtol)
    assert c.passed, c.line()


def test_unknown_feed_is_refused_not_dropped(js):
    # onnxruntime-node drops a feed it does not know without a word; the module refuses it
    assert "has no input model.layers.0.self_attn.q_proj.ia3_l" in js("swappable")["unknownFeed"]


def test_onnxruntime_web_gives_the_same_tokens(js, python_side):
    out = js("swappable", "web")
    for run in out["greedy"]:
        assert run["tokens"] == python_side[run["adapter"]]["ids"], run["adapter"]


def assert_one_line_errors(errors: dict, want: dict) -> None:
    """Each key's call raised an IA3Error whose one-line message contains `want[key]`."""
    for key, message in want.items():
        got = errors[key]
        assert got and got.get("name") == "IA3Error" and message in got["message"] and "\n" not in got["message"], (key, got)


# -- adapter files the module refuses -------------------------------------------------------------
def _bad_files(folder, tmp_path) -> dict[str, str]:
    good = f"{folder}/adapters/adapter1.onnx_adapter"
    vectors = read_onnx_adapter(good)
    v = "model.layers.1.self_attn.v_proj.ia3_l"
    files = {}
    files["wrong_dim"] = write_onnx_adapter(str(tmp_path / "dim.onnx_adapter"), {**vectors, v: np.ones(17, np.float32)})
    files["unknown"] = write_onnx_adapter(str(tmp_path / "unknown.onnx_adapter"),
                                          {**vectors, "model.layers.0.self_attn.q_proj.ia3_l": np.ones(16, np.float32)})
    files["int64"] = write_onnx_adapter(str(tmp_path / "int.onnx_adapter"), {**vectors, v: np.ones(16, np.int64)})
    raw = bytearray(open(good, "rb").read())
    at = raw.find(np.asarray(vectors[v], np.float32).tobytes())  # the vector's data in the file
    nan = raw[:]
    nan[at + 12:at + 16] = np.float32("nan").tobytes()
    (tmp_path / "nan.onnx_adapter").write_bytes(bytes(nan))
    (tmp_path / "truncated.onnx_adapter").write_bytes(bytes(raw[:6]))
    (tmp_path / "short.onnx_adapter").write_bytes(bytes(raw[:len(raw) // 2]))
    (tmp_path / "peft.onnx_adapter").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    files.update(nan=str(tmp_path / "nan.onnx_adapter"), truncated=str(tmp_path / "truncated.onnx_adapter"),
                 short=str(tmp_path / "short.onnx_adapter"), safetensors=str(tmp_path / "peft.onnx_adapter"))
    return files


def test_corrupted_adapter_files_are_refused_in_one_line(llama, node, tmp_path):
    files = _bad_files(llama["swappable"], tmp_path)
    out = node("js_adapter_errors.mjs", llama["swappable"], *[f"{k}={p}" for k, p in files.items()])
    v = "model.layers.1.self_attn.v_proj.ia3_l"
    want = {
        "wrong_dim": f"{v} has shape [17] but the export expects 16 values",
        "unknown": "model.layers.0.self_attn.q_proj.ia3_l is not a vector input of this export",
        "int64": f"{v} is INT64; IA3 vectors must be float32 or float16",
        "nan": f"{v} holds NaN at 3",
        "truncated": "not a readable .onnx_adapter file (6 bytes, shorter than its header)",
        "short": "not a readable .onnx_adapter file",
        "safetensors": "not a readable .onnx_adapter file (no TORT file identifier)",
    }
    assert_one_line_errors(out["errors"], want)
    assert out["afterwards"] == out["before"]  # a refused file changes nothing: the session runs as before


def test_float16_conversions_match_numpy(node):
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.normal(0, 1, 300), rng.normal(0, 1e-5, 100), rng.normal(0, 1e4, 100),  # normal, subnormal, large
        [0.0, -0.0, 65504, 65519.99, 65520, 1e6, -1e6, 2 ** -24, 2 ** -25, 2 ** -25 * 1.0001, 1 + 2 ** -11,
         1 + 3 * 2 ** -11, np.inf, -np.inf, np.nan]]).astype(np.float32)
    out = node("js_half.mjs", json.dumps(values.view(np.uint32).tolist()))
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert out["half"] == want.view(np.uint16).tolist()  # round to nearest even, overflow to inf, as numpy
    back = np.array([float(x) for x in out["back"]])  # JavaScript's String(): "NaN", "Infinity", "-0" lost as "0"
    np.testing.assert_array_equal(back, want.astype(np.float64))


def test_fp16_export_generates_as_python(tmp_path_factory, llama, node):
    from ia3_export.export import export_model

    folder = tmp_path_factory.mktemp("fp16") / "onnx"
    export_model(llama["base"], str(folder), mode="swappable", adapters=[llama["a1"], llama["a2"]], dtype="fp16")
    out = node("js_generate.mjs", folder, "node", PROMPT, TEXT)
    s = open_session(str(folder), llama["a1"], llama["a2"])
    for run in out["greedy"]:
        assert run["tokens"] == _ids(s, PROMPT, run["adapter"], 8), run["adapter"]
    s.close()


def test_why_the_module_edits_the_graph(llama, node):
    """onnxruntime-node 1.31.1 runs a feed of an overridable initializer as if it were not there, and
    onnxruntime-web refuses it: the facts behind dropping the vectors' initializers at load. If a new
    ORT version fed them, the edit could go (docs/web.md)."""
    out = node("js_ort_feeds.mjs", llama["swappable"], "model.layers.0.self_attn.v_proj.ia3_l", 16)
    assert out["onnxruntime-node"] == {"listed": False, "changed": False}  # silently ignored
    assert not out["onnxruntime-web"]["listed"] and "invalid input" in out["onnxruntime-web"]["error"]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (2.0, 0.3)])
def test_sampling_distribution_is_pythons(node, temperature, top_p):
    """The module's distribution equals Python's TokenChooser (temperature, then top-p), and its seeded
    draws follow it: every token's count within 5 standard deviations of n p, none outside the top-p set."""
    from ia3_export.runtime.generation import GenerationOptions, TokenChooser

    logits = np.random.default_rng(5).normal(0, 2, 40).astype(np.float32)
    n = 20000
    out = node("js_sampling.mjs", json.dumps(logits.tolist()), temperature, top_p, n)
    want = TokenChooser(GenerationOptions(do_sample=True, temperature=temperature, top_p=top_p)).probabilities(logits[None])[0]
    np.testing.assert_allclose(out["probabilities"], want, rtol=1e-6, atol=1e-12)
    counts = np.array(out["counts"])
    assert counts.sum() == n and not counts[want == 0].any()
    assert np.all(np.abs(counts - n * want) <= 5 * np.sqrt(n * want * (1 - want)) + 1)


def test_bad_generation_options_are_one_line(llama, node, tmp_path):
    out = node("js_adapter_errors.mjs", llama["swappable"])
    want = {
        "maxNewTokens": "maxNewTokens must be an integer >= 1, got 0",
        "temperature": "temperature must be a finite number >= 0 (0: greedy), got -1",
        "topP": "topP must be a number in (0, 1], got 0",
        "text": "a text prompt needs a tokenizer",
        "long": "the prompt has 128 tokens; the model takes at most 128 positions",
        "unloaded": "adapter nope is not loaded (loaded: adapter1)",
        "name": "adapter name \"../x\" is not allowed",
    }
    assert_one_line_errors(out["optionErrors"], want)
    assert out["capped"] <= 2  # max_new_tokens cut to the positions left after the prompt, as Python's runtime


# -- exports the module refuses to open ---------------------------------------------------------
def _hostile_exports(folder: str, tmp_path) -> dict[str, str]:
    """Copies of the swappable export, each broken one way. The files the manifests point outside the
    folder are valid copies, so a module without the guard would open them and run."""
    import shutil

    import onnx

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(f"{folder}/model.onnx", outside / "model.onnx")
    shutil.copy(f"{folder}/adapters/adapter1.onnx_adapter", outside / "adapter1.onnx_adapter")

    def variant(key, manifest=None, model: bytes | None = None) -> str:
        copy = tmp_path / key
        shutil.copytree(folder, copy)
        if manifest is not None:
            path = copy / "ia3_export.json"
            path.write_text(json.dumps(manifest(json.loads(path.read_text()))))
        if model is not None:
            (copy / "model.onnx").write_bytes(model)
        return str(copy)

    def graph_file(name):
        return lambda m: {**m, "graphs": {**m["graphs"], "model": {**m["graphs"]["model"], "file": name}}}

    def adapter_file(name):
        return lambda m: {**m, "adapters": [{**a, "file": name} if a["name"] == "adapter1" else a for a in m["adapters"]]}

    raw = open(f"{folder}/model.onnx", "rb").read()
    graph = onnx.load_model_from_string(raw)
    vector = next(i for i in graph.graph.initializer if i.name.endswith(".ia3_l"))
    graph.graph.initializer.remove(vector)
    return {"ok": variant("ok"),
            "graph_outside": variant("graph_outside", graph_file("../outside/model.onnx")),
            "graph_absolute": variant("graph_absolute", graph_file(str(outside / "model.onnx"))),
            "adapter_outside": variant("adapter_outside", adapter_file("../outside/adapter1.onnx_adapter")),
            "truncated": variant("truncated", model=raw[:len(raw) // 2]),
            "wire_type": variant("wire_type", model=b"\x0f" * 64),
            "no_graph": variant("no_graph", model=b"\x08\x07"),
            "missing_vector": variant("missing_vector", model=graph.SerializeToString())}


def test_exports_whose_manifest_or_graph_is_hostile_are_refused_in_one_line(llama, node, tmp_path):
    """A manifest naming files outside its folder (.., an absolute path) is refused before they are read;
    a model.onnx that is cut short, not protobuf, without a graph or without one of the manifest's vector
    initializers is refused by the graph edit, each in one line, never opened as something else."""
    folders = _hostile_exports(llama["swappable"], tmp_path)
    out = node("js_model_errors.mjs", *[f"{k}={p}" for k, p in folders.items()])
    assert out["ok"]["tokens"] == _ids_alone(llama, [5, 6, 7], 3)  # the harness opens a sound copy
    outside = str(tmp_path / "outside" / "model.onnx")
    vectors = len(json.loads(open(f"{llama['swappable']}/ia3_export.json").read())["vectors"])
    want = {
        "graph_outside": '"../outside/model.onnx" is not a path inside the export\'s folder',
        "graph_absolute": f'{json.dumps(outside)} is not a path inside the export\'s folder',
        "adapter_outside": '"../outside/adapter1.onnx_adapter" is not a path inside the export\'s folder',
        "truncated": "model.onnx is truncated",
        "wire_type": "model.onnx: unknown protobuf wire type 7; is it an ONNX model?",
        "no_graph": "model.onnx holds no graph; is it an ONNX model?",
        "missing_vector": f"model.onnx has {vectors - 1} of the manifest's {vectors} vector initializers; re-export the model",
    }
    assert_one_line_errors(out, want)


def _ids_alone(llama, prompt, n):
    s = open_session(llama["swappable"], llama["a1"])
    try:
        return _ids(s, prompt, "adapter1", n)
    finally:
        s.close()
