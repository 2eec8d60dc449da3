"""Hostile inputs, one validation layer per file format (issue 13): untrusted fields, nesting bombs,
headers that decide how much memory is used, and paths that leave the export folder.

Each case must end in ONE `error:` line naming the file (and the field), exit 2, without a
traceback, a hang or a runaway allocation. Allocation bombs run in a child process under
RLIMIT_AS, so a regression fails the test instead of exhausting the machine.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import EXE, CliResult, assert_one_line_error
from runtime_helpers import export_once
from ia3_export.errors import IA3Error

MANIFEST, WEIGHTS, CONFIG = "ia3_export.json", "adapter_model.safetensors", "adapter_config.json"
KEY = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
MEMORY_LIMIT = 1024**3  # a generate run needs well under 1 GiB of address space; every bomb asks for more
# glibc reserves 64 MB of address space per malloc arena (one per thread, 8 per core): capped, so the
# limit measures allocations on a many-core machine too
LIMITED_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}
DEEP = "[" * 100_000 + "]" * 100_000


def run_limited(*args, memory: int = MEMORY_LIMIT) -> CliResult:
    """`ia3-export ARGS` in a child whose address space is capped: a runaway allocation fails there."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    done = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300, preexec_fn=cap,
                          env=LIMITED_ENV)
    return CliResult(done.returncode, done.stdout, done.stderr)


def python_limited(code: str, memory: int = MEMORY_LIMIT) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, preexec_fn=cap,
                          env=LIMITED_ENV)


def one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(error.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    base, adapter = model_dir("llama"), adapter_dir("llama", seed=1)
    return {"model": base, "adapter": adapter,
            "swappable": export_once(tmp_path_factory, base, "swappable", [adapter]),
            "foldswap": export_once(tmp_path_factory, base, "foldswap", [adapter])}


def edited_export(llama, tmp_path, edit, mode="swappable") -> str:
    """A copy of an export whose manifest `edit` changed (in place, or by returning new text)."""
    folder = str(tmp_path / f"export-{mode}")
    shutil.copytree(llama[mode], folder)
    path = os.path.join(folder, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    text = edit(manifest)
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(manifest))
    return folder


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def edited_adapter(llama, tmp_path, weights: bytes | None = None, config: str | None = None) -> str:
    folder = str(tmp_path / "adapter")
    shutil.copytree(llama["adapter"], folder)
    if weights is not None:
        with open(os.path.join(folder, WEIGHTS), "wb") as f:
            f.write(weights)
    if config is not None:
        with open(os.path.join(folder, CONFIG), "w") as f:
            f.write(config)
    return folder


def setter(*path_and_value):
    """An edit that sets manifest[path...] = value."""
    *path, value = path_and_value

    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


# -- 1. untrusted fields --------------------------------------------------------------------
MANIFEST_FIELDS = {
    "format_version-string": (setter("format_version", "1"), "format_version is '1'"),
    "format_version-bool": (setter("format_version", True), "format_version is True"),
    "format_version-newer": (setter("format_version", 2), "format_version 2 is newer"),
    "mode-unknown": (setter("mode", "turbo"), "mode is 'turbo'"),
    "dtype-list": (setter("dtype", ["fp32"]), "dtype is ['fp32']"),
    "task-number": (setter("task", 7), "task is 7"),
    "graphs-list": (setter("graphs", ["model.onnx"]), "graphs is ['model.onnx']"),
    "graphs-empty": (setter("graphs", {}), "graphs is empty"),
    "graph-string": (setter("graphs", "model", "model.onnx"), "graphs.model is 'model.onnx'"),
    "graph-file-number": (setter("graphs", "model", "file", 5), "graphs.model.file is 5"),
    "graph-inputs-not-names": (setter("graphs", "model", "inputs", [1, 2]), "graphs.model.inputs is [1, 2]"),
    "vectors-string": (setter("vectors", "x"), "vectors is 'x'"),
    "vector-not-object": (setter("vectors", 0, 3), "vectors[0] is 3"),
    "vector-dim-string": (setter("vectors", 0, "dim", "abc"), "vectors[0].dim is 'abc'"),
    "vector-dim-zero": (setter("vectors", 0, "dim", 0), "vectors[0].dim is 0"),
    "vector-dim-float": (setter("vectors", 0, "dim", 16.0), "vectors[0].dim is 16.0"),
    "vector-dim-huge": (setter("vectors", 0, "dim", 10**30), "vectors[0].dim is 1000000000000000000000000000000"),
    "vector-graph-unknown": (setter("vectors", 0, "graph", "nope"), "vectors[0].graph is 'nope'"),
    "vector-name-list": (setter("vectors", 0, "name", ["a"]), "vectors[0].name is ['a']"),
    "vector-feedforward-string": (setter("vectors", 0, "feedforward", "yes"), "vectors[0].feedforward is 'yes'"),
    "vector-twice": (lambda m: m["vectors"].append(dict(m["vectors"][0])), "is listed twice"),
    "tokens-pad-string": (setter("tokens", "pad", "x"), "tokens.pad is 'x'"),
    "tokens-eos-mixed": (setter("tokens", "eos", [2, "a"]), "tokens.eos is 'a'"),
    "tokens-negative": (setter("tokens", "bos", -1), "tokens.bos is -1"),
    "tokens-list": (setter("tokens", [1]), "tokens is [1]"),
    "cache-head_dim-string": (setter("cache", "head_dim", "8"), "cache.head_dim is '8'"),
    "cache-graph-unknown": (setter("cache", "graph", "decoder"), "cache.graph is 'decoder'"),
    "adapter-not-object": (setter("adapters", 0, "x"), "adapters[0] is 'x'"),
    "adapter-name-number": (setter("adapters", 0, "name", 1), "adapters[0].name is 1"),
    "weights-shape-string": (setter("weights", [{"name": "w", "graph": "model", "vector": "v", "shape": "16"}]),
                             "weights[0].shape is '16'"),
    "weights-shape-negative": (setter("weights", [{"name": "w", "graph": "model", "vector": "v", "shape": [16, -1]}]),
                               "weights[0].shape is -1"),
    "quantization-list": (setter("quantization", [1]), "quantization is [1]"),
    "quantization-method": (setter("quantization", {"method": "int3"}), "quantization.method is 'int3'"),
    "quantization-block-string": (setter("quantization", {"method": "int4", "block_size": "32"}),
                                  "quantization.block_size is '32'"),
    "quantization-weights-not-names": (setter("quantization", {"method": "int8", "graphs": {"model": {"weights": {"w": 1}}}}),
                                       "quantization.graphs.model.weights is 1,"),
    "genai-string": (setter("genai", "yes"), "genai is 'yes'"),
    "genai-files-number": (setter("genai", {"supported": True, "files": 3}), "genai.files is 3"),
    "manifest-a-list": (lambda m: "[1, 2]", "not an ia3-export manifest"),
}


@pytest.mark.parametrize("case", list(MANIFEST_FIELDS))
def test_manifest_fields_are_checked_before_use(llama, tmp_path, case):
    from ia3_export.runtime.folder import open_folder

    edit, message = MANIFEST_FIELDS[case]
    folder = edited_export(llama, tmp_path, edit)
    with pytest.raises(IA3Error) as error:
        open_folder(folder)
    one_line(error, os.path.join(folder, MANIFEST), message)


@pytest.mark.parametrize("case", ["format_version-string", "graph-string", "vector-dim-string", "tokens-pad-string"])
def test_manifest_fields_through_the_command_line(llama, tmp_path, case):
    """The cases of the issue, as a user meets them: they were TypeError/ValueError tracebacks."""
    edit, message = MANIFEST_FIELDS[case]
    folder = edited_export(llama, tmp_path, edit)
    result = run_limited("generate", folder, "--prompt", "a", "--max-new-tokens", "2")
    assert_one_line_error(result, 2, f"{os.path.join(folder, MANIFEST)}: {message}")


def test_generation_config_token_ids_are_checked(llama, tmp_path):
    folder = edited_export(llama, tmp_path, lambda m: None)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": "two", "pad_token_id": 0}, f)
    result = run_limited("generate", folder, "--prompt", "a", "--max-new-tokens", "2")
    assert_one_line_error(result, 2, "generation_config.json: eos_token_id is 'two'")


@pytest.mark.parametrize("field,value", [("fan_in_fan_out", "yes"), ("init_ia3_weights", "no"),
                                         ("base_model_name_or_path", 5)])
def test_adapter_config_field_types(llama, tmp_path, field, value):
    """A string where PEFT writes a bool was read as true (\"no\" is truthy); now it is refused."""
    from ia3_export.formats.adapter_format import read_adapter

    with open(os.path.join(llama["adapter"], CONFIG)) as f:
        config = json.load(f)
    config[field] = value
    folder = edited_adapter(llama, tmp_path, config=json.dumps(config))
    with pytest.raises(IA3Error) as error:
        read_adapter(folder)
    one_line(error, os.path.join(folder, CONFIG), field)


@pytest.mark.parametrize("field,value,message", [
    ("model_type", 5, "model_type is 5"),
    ("architectures", "LlamaForCausalLM", "architectures is 'LlamaForCausalLM'"),  # its letters were iterated
    ("architectures", [{"a": 1}], "architectures is [{'a': 1}]"),
])
def test_model_config_field_types(llama, tmp_path, field, value, message):
    from ia3_export.core.loading import read_model_config

    model = str(tmp_path / "model")
    shutil.copytree(llama["model"], model)
    path = os.path.join(model, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[field] = value
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(IA3Error) as error:
        read_model_config(model)
    one_line(error, path, message)


@pytest.mark.parametrize("label", [{"a": 1}, [1, 2], True], ids=["object", "list", "bool"])
def test_training_labels_are_strings_or_numbers(tmp_path, label):
    from ia3_export.train.data import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "good", "label": "pos"}) + "\n" + json.dumps({"text": "bad", "label": label}) + "\n")
    with pytest.raises(IA3Error) as error:
        read_rows(str(path), "text-classification")
    one_line(error, f"{path}:2")


def test_truncated_model_weights_are_one_line_before_transformers(llama, tmp_path):
    """A cut download: transformers raised SafetensorError with a traceback; the header is now checked
    against the file's size first."""
    model = str(tmp_path / "model")
    shutil.copytree(llama["model"], model)
    weights = os.path.join(model, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    result = run_limited("merge", model, llama["adapter"], "--out", tmp_path / "merged", memory=8 * 1024**3)
    assert_one_line_error(result, 2, f"{weights}: tensor ")
    assert not (tmp_path / "merged").exists()


# -- safetensors headers (untrusted fields and memory) ----------------------------------------
F32_16 = {"dtype": "F32", "shape": [16, 1], "data_offsets": [0, 64]}
SAFETENSORS = {
    # shape product beyond int64: computed with numpy it wrapped around to 0 bytes
    "shape-overflows-int64": ({KEY: {**F32_16, "shape": [2**62, 2**62, 16]}}, b"\0" * 64, "needs 13611294676837538538"),
    "shape-wraps-to-zero": ({KEY: {"dtype": "F32", "shape": [2**63, 2, 1], "data_offsets": [0, 0]}}, b"",
                            "needs 73786976294838206464 bytes"),
    "zero-size-vector": ({KEY: {"dtype": "F32", "shape": [0, 1], "data_offsets": [0, 0]}}, b"", "holds no values"),
    "too-many-dims": ({KEY: {**F32_16, "shape": [1] * 100}}, b"\0" * 64, "at most 16"),
    "overlap": ({KEY: F32_16, KEY.replace("k_proj", "v_proj"): F32_16}, b"\0" * 64, "overlaps"),
    "hole": ({KEY: {**F32_16, "data_offsets": [64, 128]}}, b"\0" * 128, "bytes 0..64 of the data belong to no tensor"),
    "trailing-data": ({KEY: F32_16}, b"\0" * 96, "its tensors cover 64"),
    "metadata-not-strings": ({"__metadata__": {"format": 1}, KEY: F32_16}, b"\0" * 64, "__metadata__"),
    "dtype-not-string": ({KEY: {**F32_16, "dtype": ["F32"]}}, b"\0" * 64, "unknown dtype ['F32']"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_safetensors_headers_are_checked_against_the_file(tmp_path, case):
    from ia3_export.formats.safetensors_io import read_safetensors

    header, data, message = SAFETENSORS[case]
    path = tmp_path / "t.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(IA3Error) as error:
        read_safetensors(str(path))
    one_line(error, str(path), message)


@pytest.mark.parametrize("case", ["shape-overflows-int64", "zero-size-vector"])
def test_safetensors_cases_through_the_command_line(llama, tmp_path, case):
    header, data, message = SAFETENSORS[case]
    folder = edited_adapter(llama, tmp_path, weights=safetensors_bytes(header, data))
    result = run_limited("convert", folder, "--model", llama["swappable"], "--out", tmp_path / "a.onnx_adapter")
    assert_one_line_error(result, 2, f"{os.path.join(folder, WEIGHTS)}: ")
    assert message in result.stderr


def test_reader_still_matches_the_safetensors_library(tmp_path):
    """The strict reader reads, by offset, what the reference library reads (several dtypes, a scalar)."""
    from safetensors.numpy import load_file, save_file

    from ia3_export.formats.safetensors_io import read_safetensors

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.integers(0, 9, (7,)).astype(np.int64),
               "c": np.array(2.5, dtype=np.float64), "d": rng.standard_normal((2, 2, 2)).astype(np.float16)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    ours, theirs = read_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape and np.array_equal(ours[k], theirs[k])
        ours[k][...] = 0  # writable, owned arrays


# -- 2. nesting ------------------------------------------------------------------------------
def test_nesting_depth_matches_the_parsed_structure():
    """The recursion-free scan against the depth of what json.loads builds (brackets in strings,
    escaped quotes, objects and arrays mixed)."""
    from ia3_export.formats.jsonfile import nesting_depth

    def depth(value) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    rng = np.random.default_rng(1)
    atoms = ["[", "]", "{", "}", '"', "\\", 'x"]', 1, None, "\\\"[{", "]}\\"]

    def build(level: int):
        kind = rng.integers(0, 3) if level < 12 else 2
        if kind == 0:
            return [build(level + 1) for _ in range(rng.integers(0, 3))]
        if kind == 1:
            return {str(atoms[rng.integers(0, len(atoms))]) + str(i): build(level + 1) for i in range(rng.integers(0, 3))}
        return atoms[rng.integers(0, len(atoms))]

    for _ in range(300):
        value = build(0)
        text = json.dumps(value)
        assert nesting_depth(text) == depth(json.loads(text)), text


DEEP_FILES = {
    "manifest": lambda llama, tmp: (run_limited("generate", edited_export(llama, tmp, lambda m: DEEP), "--prompt", "a"),
                                    MANIFEST),
    "adapter-config": lambda llama, tmp: (run_limited("inspect", edited_adapter(llama, tmp, config=DEEP)), CONFIG),
    "safetensors-header": lambda llama, tmp: (run_limited("inspect", edited_adapter(
        llama, tmp, weights=struct.pack("<Q", len(DEEP)) + DEEP.encode())), WEIGHTS),
    "model-config": lambda llama, tmp: (run_limited("merge", model_with(llama, tmp, "config.json"), llama["adapter"],
                                                    "--out", tmp / "out", memory=8 * 1024**3), "config.json"),
    "model-generation-config": lambda llama, tmp: (run_limited(
        "merge", model_with(llama, tmp, "generation_config.json"), llama["adapter"], "--out", tmp / "out",
        memory=8 * 1024**3), "generation_config.json"),
    "export-generation-config": lambda llama, tmp: (run_limited("generate", export_with(llama, tmp, "generation_config.json"),
                                                                "--prompt", "a"), "generation_config.json"),
    "training-row": lambda llama, tmp: (run_limited("train", llama["model"], "--data", rows_with(tmp), "--task",
                                                    "text-generation", "--out", tmp / "out", memory=8 * 1024**3),
                                        "rows.jsonl:2"),
}


def model_with(llama, tmp_path, name: str) -> str:
    model = str(tmp_path / "model")
    shutil.copytree(llama["model"], model)
    with open(os.path.join(model, name), "w") as f:
        f.write(DEEP)
    return model


def export_with(llama, tmp_path, name: str) -> str:
    folder = edited_export(llama, tmp_path, lambda m: None)
    with open(os.path.join(folder, name), "w") as f:
        f.write(DEEP)
    return folder


def rows_with(tmp_path) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ' + DEEP + "}\n")
    return str(path)


@pytest.mark.parametrize("case", list(DEEP_FILES))
def test_json_nested_100000_deep_is_one_line(llama, tmp_path, case):
    """Every JSON we (or transformers, from a folder we open) parse: RecursionError before."""
    result, name = DEEP_FILES[case](llama, tmp_path)
    line = assert_one_line_error(result, 2, "levels deep (at most 64 are read)")
    assert name in line


def test_depth_limit_is_exact(tmp_path):
    from ia3_export.formats.jsonfile import MAX_DEPTH, read_json

    ok, deep = tmp_path / "ok.json", tmp_path / "deep.json"
    ok.write_text("[" * MAX_DEPTH + '"[["' + "]" * MAX_DEPTH)
    deep.write_text("{\"a\":" * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))
    value = read_json(str(ok))
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value == "[["
    with pytest.raises(IA3Error, match=f"nested {MAX_DEPTH + 1} levels deep"):
        read_json(str(deep))


# -- 3. memory decided by headers --------------------------------------------------------------
def test_overlapping_entries_cannot_multiply_memory(tmp_path):
    """400 entries on one 4 MB range asked for 3.3 GB (each copied); the format forbids overlaps."""
    header = {f"t{i}": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 1024**2]} for i in range(400)}
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 4 * 1024**2))
    done = python_limited(f"from ia3_export.formats.safetensors_io import read_safetensors\n"
                          f"from ia3_export.errors import IA3Error\n"
                          f"try:\n    read_safetensors({str(path)!r})\nexcept IA3Error as e:\n    print('IA3Error', e)")
    assert done.returncode == 0 and done.stdout.startswith("IA3Error") and "overlaps" in done.stdout, done.stderr[-800:]


def test_sparse_adapter_file_is_not_read_whole(llama, tmp_path):
    """A 3 GB sparse adapter_model.safetensors (one real vector, then a hole) was read whole."""
    folder = edited_adapter(llama, tmp_path)
    weights = os.path.join(folder, WEIGHTS)
    os.truncate(weights, 3 * 1024**3)
    result = run_limited("convert", folder, "--model", llama["swappable"], "--out", tmp_path / "a.onnx_adapter")
    assert_one_line_error(result, 2, f"{weights}: ")


def test_oversized_onnx_adapter_is_refused_before_reading(llama, tmp_path):
    """ONNX Runtime reads an adapter file whole: a 3 GB one is refused by its size first."""
    path = tmp_path / "big.onnx_adapter"
    with open(path, "wb") as f:
        f.truncate(3 * 1024**3)
    result = run_limited("generate", llama["swappable"], "--prompt", "a", "--max-new-tokens", "1", "--adapter", path)
    assert_one_line_error(result, 2, f"{path}: 3221225472 bytes, more than the")


def test_runtime_adapter_larger_than_the_model_needs_is_refused(llama, tmp_path):
    """A well-formed PEFT folder holding 1.2 GB (sparse) for an export whose vectors take kilobytes was
    read whole before its names were compared; it is now refused by size, before reading."""
    count = 300_000_000
    header = {KEY: {"dtype": "F32", "shape": [count, 1], "data_offsets": [0, 4 * count]}}
    folder = edited_adapter(llama, tmp_path, weights=safetensors_bytes(header))
    weights = os.path.join(folder, WEIGHTS)
    os.truncate(weights, os.path.getsize(weights) + 4 * count)
    result = run_limited("convert", folder, "--model", llama["swappable"], "--out", tmp_path / "a.onnx_adapter")
    assert_one_line_error(result, 2, f"{weights}: holds 1200000000 bytes of tensors, more than the")


@pytest.mark.parametrize("mode,edit,message", [
    ("swappable", setter("vectors", 0, "dim", 1_000_000), "the shape [1000000] but graph 'model' declares [16]"),
    ("foldswap", lambda m: m["weights"][0].__setitem__("shape", [400_000, 2_000]),
     "the shape [400000, 2000] but graph 'model' declares [16, 32]"),
], ids=["vector-dim", "foldswap-weight-shape"])
def test_manifest_sizes_are_checked_against_the_graph_before_allocating(llama, tmp_path, mode, edit, message):
    """A dim of 5e8 allocated 2 GB of ones before the graph was consulted (foldswap: a weight buffer)."""
    folder = edited_export(llama, tmp_path, edit, mode=mode)
    result = run_limited("generate", folder, "--prompt", "a", "--max-new-tokens", "1")
    assert_one_line_error(result, 2, message)


# -- 4. confinement ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["graph", "adapter"])
@pytest.mark.parametrize("file", ["../elsewhere/model.onnx", "/etc/hostname", "link/model.onnx", "nul\0.onnx"],
                         ids=["dotdot", "absolute", "symlink", "nul-byte"])
def test_manifest_paths_stay_inside_the_folder(llama, tmp_path, where, file):
    from ia3_export.runtime.folder import open_folder

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(llama["swappable"], elsewhere)
    edit = setter("graphs", "model", "file", file) if where == "graph" else setter("adapters", 0, "file", file)
    folder = edited_export(llama, tmp_path, edit)
    os.symlink(elsewhere, os.path.join(folder, "link"))
    with pytest.raises(IA3Error) as error:
        open_folder(folder)
    one_line(error, os.path.join(folder, MANIFEST), "points outside the folder")


def test_graph_outside_the_folder_through_the_command_line(llama, tmp_path):
    """Before: the graph of another export was loaded and run (here a bank graph, failing on adapter_ids)."""
    folder = edited_export(llama, tmp_path, setter("graphs", "model", "file", f"../{os.path.basename(tmp_path)}/x/model.onnx"))
    shutil.copytree(llama["swappable"], tmp_path / "x")
    result = run_limited("generate", folder, "--prompt", "a", "--max-new-tokens", "1")
    assert_one_line_error(result, 2, "graphs.model.file")
