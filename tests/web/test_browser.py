"""The demo page (examples/web) in a real browser: Debian's headless chromium, driven by playwright-core
(tests/web/browser_demo.mjs), judged against Python's runtime (IA3Session) on the same swappable export.

The page must: run onnxruntime-web's WASM on 2 threads (a cross-origin-isolated page), produce for each
adapter the greedy text Python's runtime produces, switch adapters in the live session (no new
InferenceSession) in under 10 ms with different text after the switch, show text before generation ends
(streamed), and show the sizes it downloaded. A screenshot is kept as an artefact ($IA3_WEB_ARTIFACTS).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEB = os.path.join(ROOT, "examples", "web")
MAX_NEW_TOKENS = 16
_spec = importlib.util.spec_from_file_location("web_demo_serve", os.path.join(WEB, "serve.py"))
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """prepare.py's folder (the trained tiny LM, two random adapters, the swappable and merged exports)."""
    out = str(tmp_path_factory.mktemp("web") / "build")
    subprocess.run([sys.executable, os.path.join(WEB, "prepare.py"), out], check=True, cwd=ROOT, timeout=600)
    return out


@pytest.fixture(scope="module")
def page_url(build):
    """The one-line server on a free loopback port, serving `build` as /build/web/."""
    with serve.running(build) as url:
        yield url


@pytest.fixture(scope="module")
def seen(page_url, node, tmp_path_factory):
    artifacts = os.environ.get("IA3_WEB_ARTIFACTS") or str(tmp_path_factory.mktemp("artifacts"))
    return node("browser_demo.mjs", page_url, artifacts, MAX_NEW_TOKENS, timeout=600)


def test_server_isolates_the_page_and_serves_only_the_demo(page_url):
    with urllib.request.urlopen(page_url) as response:
        assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert b'type="importmap"' in response.read()
    origin = page_url.split("/examples/")[0]
    for path in ("/pyproject.toml", "/build/web/../../pyproject.toml", "/examples/web/../../README.md",
                 "/examples/web/%2e%2e/%2e%2e/README.md", "/node_modules/%2e%2e/pyproject.toml",
                 "/examples/web/index.html%00.txt", "/build/web/%00"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(origin + path)
        assert refused.value.code == 404, path


def test_page_runs_two_wasm_threads_cross_origin_isolated(seen):
    assert seen["crossOriginIsolated"] is True
    assert seen["threads"] == 2
    assert seen["sessionsOpened"] >= 1 and seen["sessionsAfter"] == seen["sessionsOpened"], \
        "switching adapters opened a new InferenceSession (the model was reloaded)"


def test_greedy_text_equals_python_runtime_for_each_adapter(seen, build):
    from ia3_export.runtime import IA3Session

    session = IA3Session(os.path.join(build, "model"))
    names = session.load_shipped_adapters()
    assert sorted(names) == sorted(seen["adapters"])
    assert len(seen["runs"]) == (len(names) + 1) * len(seen["prompts"])  # every adapter, then the base
    for run in seen["runs"]:
        expected = session.generate(run["prompt"], adapter=run["adapter"], max_new_tokens=MAX_NEW_TOKENS)
        assert run["text"] == expected, (run["adapter"], run["prompt"])
        assert run["shown"] == run["prompt"] + expected  # what the user sees: the prompt, then the stream
    session.close()


def test_switch_changes_the_output_in_under_10_ms(seen):
    by_adapter: dict = {}
    for run in seen["runs"]:
        by_adapter.setdefault(run["adapter"], []).append(run["text"])
        assert 0 <= run["switchMs"] < 10, run
    base = by_adapter.pop(None)
    for name, texts in by_adapter.items():
        assert texts != base, f"adapter {name} generates the base model's text"
    sounds = dict(zip(seen["prompts"], by_adapter["sounds"]))
    assert sounds["the cat "].startswith("meows")  # the trained adapter's task, as in Python's demo


def test_tokens_stream_before_generation_ends(seen):
    for run in seen["runs"]:
        if len(run["tokens"]) >= 2:
            assert run["partials"] >= 1, f"{run['adapter']} / {run['prompt']!r}: the text appeared only at the end"
            assert run["firstTokenMs"] < run["ms"]


def test_page_shows_sizes_and_a_screenshot_is_kept(seen, build):
    with open(os.path.join(build, "demo.json")) as f:
        demo = json.load(f)
    sizes = dict(seen["sizes"])
    assert sizes["base model graph (swappable export, loaded once)"] == os.path.getsize(
        os.path.join(build, "model", "model.onnx"))
    for entry in demo["adapters"]:
        on_disk = os.path.getsize(os.path.join(build, entry["file"]))
        assert sizes[f"adapter {entry['name']}"] == on_disk
        assert on_disk < demo["merged"]["bytes"] / 50  # an adapter is a sliver of a per-adapter merged model
    with open(seen["screenshot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {seen['screenshot']}")
