"""The reading cases of issue 22, each reproduced first (docs/errors.md, "Hostile inputs"): a graph's
external data outside its folder (ONNX Runtime 1.20 ran it), FIFOs where a file is read (generate
hung, inspect said "does not exist"), sizes forged files declare (gigabytes allocated for a 28 KB
folder), duplicate JSON keys, config.json fields (hangs and internal errors)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.errors import IA3Error
from runtime_helpers import export_once

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    base, adapter = model_dir("llama"), adapter_dir("llama", seed=1)
    return {"model": base, "adapter": adapter, "swappable": export_once(tmp_path_factory, base, "swappable", [adapter])}


def copy_export(llama, tmp_path, name="export") -> str:
    folder = str(tmp_path / name)
    shutil.copytree(llama["swappable"], folder)
    return folder


def edit_json(path, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


# -- external data ---------------------------------------------------------------------------------
DATA = "model.onnx_data"


def external_export(llama, tmp_path) -> tuple[str, object]:
    """A copy of the swappable export whose weights moved to one external data file (as onnx writes
    it for graphs past 2 GB), and the graph re-read without its data (to forge locations)."""
    folder = copy_export(llama, tmp_path)
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=True, location=DATA,
                    size_threshold=0)
    return folder, onnx.load(path, load_external_data=False)


def first_external(model):
    return next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def set_entry(tensor, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def test_valid_external_data_is_read_and_runs_like_the_original(llama, tmp_path):
    """The walk accepts onnx's own external data layout, and its facts are onnx's (the reference)."""
    from ia3_export.formats.onnx_graph import check_graph
    from ia3_export.runtime import IA3Session

    folder, model = external_export(llama, tmp_path)
    facts = check_graph(os.path.join(folder, "model.onnx"))
    assert {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input} == facts.inputs
    assert {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer} == \
        {n: (t.data_type, t.dims) for n, t in facts.initializers.items()}
    ids = np.array([[1, 5, 9, 3]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    original, moved = IA3Session(llama["swappable"]), IA3Session(folder)
    past = {n: np.zeros((1, 2, 0, 8), np.float32) for n in original.graphs["model"].inputs if n.startswith("past")}
    np.testing.assert_array_equal(original.run({**feeds, **past})["logits"], moved.run({**feeds, **past})["logits"])


def forge_dotdot(folder, model, tmp_path):
    shutil.copy(os.path.join(folder, DATA), tmp_path / "secret.bin")
    set_entry(first_external(model), "location", "../secret.bin")


def forge_absolute(folder, model, tmp_path):
    shutil.copy(os.path.join(folder, DATA), tmp_path / "secret.bin")
    set_entry(first_external(model), "location", str(tmp_path / "secret.bin"))


def forge_symlink(folder, model, tmp_path):
    shutil.move(os.path.join(folder, DATA), tmp_path / "secret.bin")
    os.symlink(tmp_path / "secret.bin", os.path.join(folder, DATA))


def forge_fifo(folder, model, tmp_path):
    os.remove(os.path.join(folder, DATA))
    os.mkfifo(os.path.join(folder, DATA))


def forge_past_end(folder, model, tmp_path):
    os.truncate(os.path.join(folder, DATA), 100)


def forge_length(folder, model, tmp_path):
    set_entry(first_external(model), "length", "4")


def forge_offset(folder, model, tmp_path):
    set_entry(first_external(model), "offset", "-1")


FORGED = {
    "dotdot": (forge_dotdot, "external data location '../secret.bin' leaves the graph's folder (..)"),
    "absolute": (forge_absolute, "is an absolute path; a graph's data must be a file in its own folder"),
    "symlink": (forge_symlink, "outside the graph's folder"),
    "fifo": (forge_fifo, "is a FIFO (named pipe), not a regular file"),
    "past-end": (forge_past_end, "lie past the end of the file (100 bytes"),
    "length": (forge_length, "external data holds 4 bytes but the tensor's dims need"),
    "offset": (forge_offset, "external data offset '-1' is not a byte count"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_external_data_must_be_a_regular_file_inside_the_graphs_folder(llama, tmp_path, case):
    """ONNX Runtime 1.20.1 ran `../secret.txt` and a symlink out (the file's bytes came out as logits);
    now the folder is refused when it is opened, before any ONNX Runtime sees the graph."""
    from ia3_export.runtime.folder import open_folder

    folder, model = external_export(llama, tmp_path)
    forge, message = FORGED[case]
    forge(folder, model, tmp_path)
    onnx.save_model(model, os.path.join(folder, "model.onnx"))
    with pytest.raises(IA3Error, match="model.onnx: tensor .*" + __import__("re").escape(message)) as caught:
        open_folder(folder)
    assert "\n" not in str(caught.value)


def test_external_data_out_of_the_folder_through_the_command_line(llama, tmp_path):
    folder, model = external_export(llama, tmp_path)
    forge_dotdot(folder, model, tmp_path)
    onnx.save_model(model, os.path.join(folder, "model.onnx"))
    result = run_cli("generate", folder, "--prompt", "a", "--max-new-tokens", "1", timeout=120)
    assert_one_line_error(result, 2, "external data location '../secret.bin' leaves the graph's folder")


def test_external_data_in_a_subgraph_is_checked_too(tmp_path):
    """An If node's branch holds an initializer whose data is `../secret`: found at any depth."""
    from onnx import TensorProto, helper

    from ia3_export.formats.onnx_graph import check_graph

    data = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    data.ClearField("float_data")
    data.data_location = TensorProto.EXTERNAL
    data.external_data.add(key="location", value="../secret")
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [data])
    node = helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    (tmp_path / "m").mkdir()
    path = str(tmp_path / "m" / "model.onnx")
    onnx.save_model(helper.make_model(graph), path)
    with pytest.raises(IA3Error, match=r"tensor 'w': external data location '../secret' leaves the graph's folder"):
        check_graph(path)


@pytest.mark.parametrize("raw", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"not a graph at all", b"\x3a\x05\x0a\x03abc"],
                         ids=["empty", "length-past-end", "text", "no-graph"])
def test_a_file_that_is_no_onnx_graph_is_one_line(tmp_path, raw):
    from ia3_export.formats.onnx_graph import check_graph

    path = tmp_path / "model.onnx"
    path.write_bytes(raw)
    with pytest.raises(IA3Error, match=r"model.onnx: (empty file, )?not an ONNX graph"):
        check_graph(str(path))


def test_an_initializer_holding_fewer_bytes_than_its_dims_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from ia3_export.formats.onnx_graph import check_graph

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1000], np.zeros(1000, np.float32).tobytes(), raw=True)
    tensor.raw_data = tensor.raw_data[:8]
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])], [tensor])
    path = str(tmp_path / "model.onnx")
    onnx.save_model(helper.make_model(graph), path)
    with pytest.raises(IA3Error, match=r"tensor 'w' declares dims \[1000\] \(4000 bytes\) but holds 8 bytes"):
        check_graph(path)


# -- FIFOs where a file is read ----------------------------------------------------------------------
def test_a_fifo_as_adapter_file_is_refused_by_name(llama, tmp_path):
    """`generate --adapter FIFO` hung (ONNX Runtime read the FIFO)."""
    fifo = tmp_path / "a.onnx_adapter"
    os.mkfifo(fifo)
    result = run_cli("generate", llama["swappable"], "--prompt", "a", "--max-new-tokens", "1", "--adapter", fifo,
                     timeout=120)
    assert_one_line_error(result, 2, f"{fifo} is a FIFO (named pipe), not a regular file")


def test_a_fifo_as_shipped_adapter_is_refused_by_name(llama, tmp_path):
    folder = copy_export(llama, tmp_path)
    shipped = os.path.join(folder, "adapters", "adapter1.onnx_adapter")
    os.remove(shipped)
    os.mkfifo(shipped)
    result = run_cli("generate", folder, "--prompt", "a", "--max-new-tokens", "1", "--adapter", "adapter1", timeout=120)
    assert_one_line_error(result, 2, "adapter1.onnx_adapter is a FIFO (named pipe), not a regular file")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "ia3_export.json"])
def test_a_fifo_as_an_exports_json_file_is_refused_by_name(llama, tmp_path, name):
    folder = copy_export(llama, tmp_path)
    os.remove(os.path.join(folder, name))
    os.mkfifo(os.path.join(folder, name))
    result = run_cli("generate", folder, "--prompt", "a", "--max-new-tokens", "1", timeout=120)
    assert_one_line_error(result, 2, f"{name} is a FIFO (named pipe), not a regular file")


def test_inspect_names_a_fifo_instead_of_saying_it_does_not_exist(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run_cli("inspect", fifo, timeout=120)
    assert_one_line_error(result, 2, f"{fifo} is a FIFO (named pipe), not a regular file")


def test_a_fifo_as_adapter_config_is_refused_by_name(llama, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(llama["adapter"], adapter)
    os.remove(adapter / "adapter_config.json")
    os.mkfifo(adapter / "adapter_config.json")
    result = run_cli("generate", llama["swappable"], "--prompt", "a", "--max-new-tokens", "1", "--adapter", adapter,
                     timeout=120)
    assert_one_line_error(result, 2, "adapter_config.json is a FIFO (named pipe), not a regular file")


# -- sizes that files declare ------------------------------------------------------------------------
def forge_vector(folder: str, dim: int, keep_initializer: bool = False) -> None:
    """Graph and manifest agree on a vector of `dim` values; the graph holds no ones for it."""
    path = os.path.join(folder, "model.onnx")
    model = onnx.load(path)
    manifest = os.path.join(folder, "ia3_export.json")
    with open(manifest) as f:
        name = json.load(f)["vectors"][0]["name"]
    graph_input = next(i for i in model.graph.input if i.name == name)
    graph_input.type.tensor_type.shape.dim[0].dim_value = dim
    if not keep_initializer:
        kept = [t for t in model.graph.initializer if t.name != name]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    onnx.save_model(model, path)
    edit_json(manifest, lambda m: m["vectors"][0].__setitem__("dim", dim))


def test_a_vector_of_two_billion_values_is_refused_by_its_ceiling(llama, tmp_path):
    """A 28 KB folder whose graph and manifest agree on 2,000,000,000 values allocated 7.45 GiB of ones."""
    folder = copy_export(llama, tmp_path)
    forge_vector(folder, 2_000_000_000)
    result = run_cli("generate", folder, "--prompt", "a", "--max-new-tokens", "1", timeout=120)
    assert_one_line_error(result, 2, "vectors[0].dim is 2000000000, expected an integer from 1 to 1048576")


def test_vectors_the_graphs_do_not_back_are_refused_before_allocating(llama, tmp_path):
    """Under the ceiling, the graphs must hold the values the manifest declares (the vectors' ones)."""
    from ia3_export.runtime.folder import open_folder

    folder = copy_export(llama, tmp_path)
    forge_vector(folder, 1_000_000)
    with pytest.raises(IA3Error, match=r"the manifest declares \d+ vector and weight values but the graphs hold only"):
        open_folder(folder)


@pytest.mark.parametrize("block,message", [
    (2147483647, "quantization.block_size is 2147483647, expected an integer from 16 to 256"),
    (48, "quantization.block_size is 48, expected a power of two"),
])
def test_a_forged_block_size_is_refused_before_parity_allocates(llama, tmp_path, block, message):
    """2147483647 made parity allocate 512 GiB for the expected scales."""
    folder = copy_export(llama, tmp_path)
    edit_json(os.path.join(folder, "ia3_export.json"),
              lambda m: m.__setitem__("quantization", {"method": "int4", "block_size": block}))
    result = run_cli("inspect", folder, timeout=120)
    assert_one_line_error(result, 2, message)


def test_a_duplicate_key_in_the_manifest_is_refused_naming_it(llama, tmp_path):
    """Two "mode" keys: Python kept the last, so the folder ran as whichever mode came second."""
    folder = copy_export(llama, tmp_path)
    path = os.path.join(folder, "ia3_export.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"mode": "swappable",', '"mode": "swappable", "mode": "merged",', 1))
    result = run_cli("inspect", folder, timeout=120)
    assert_one_line_error(result, 2, "ia3_export.json: key 'mode' appears twice in one object")


def test_a_duplicate_key_is_refused_at_any_depth():
    from ia3_export.formats.jsonfile import parse_json

    assert parse_json('{"a": {"b": 1, "c": 2}, "d": [{"e": 1}]}', "x") == {"a": {"b": 1, "c": 2}, "d": [{"e": 1}]}
    with pytest.raises(IA3Error, match=r"^x: key 'b' appears twice in one object"):
        parse_json('{"a": [{"b": 1, "b": 2}]}', "x")


# -- config.json, field by field ---------------------------------------------------------------------
CONFIGS = {
    "layers-1e9": ("num_hidden_layers", 10**9, "num_hidden_layers is 1000000000, expected an integer from 1 to 4096"),
    "vocab-0": ("vocab_size", 0, "vocab_size is 0, expected an integer from 1 to"),
    "heads-0": ("num_attention_heads", 0, "num_attention_heads is 0, expected an integer from 1 to 4096"),
    "kv-heads-string": ("num_key_value_heads", "2", "num_key_value_heads is '2', expected an integer"),
    "hidden-float": ("hidden_size", 32.0, "hidden_size is 32.0, expected an integer"),
    "text-config-string": ("text_config", "abc", "text_config is 'abc', expected a JSON object"),
    "positions-string": ("max_position_embeddings", "2048", "max_position_embeddings is '2048', expected an integer"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_model_config_fields_are_checked_where_export_reads_them(llama, tmp_path, case):
    """Before: layers 1e9 hung export; vocab 0, heads 0, text_config a string were internal errors."""
    field, value, message = CONFIGS[case]
    model = tmp_path / "model"
    shutil.copytree(llama["model"], model)
    edit_json(model / "config.json", lambda c: c.__setitem__(field, value))
    result = run_cli("export", model, "--out", tmp_path / "out", "--mode", "merged", timeout=300)
    assert_one_line_error(result, 2, f"config.json: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,message", [
    ("2048", "max_position_embeddings is '2048', expected an integer"),
    (10**12, "max_position_embeddings is 1000000000000, expected an integer from 1 to 16777216"),
], ids=["string", "1e12"])
def test_an_exports_position_cap_is_checked_not_dropped(llama, tmp_path, value, message):
    """A string or 10^12 silently dropped generation's position cap; the runtime and parity read it."""
    folder = copy_export(llama, tmp_path)
    edit_json(os.path.join(folder, "config.json"), lambda c: c.__setitem__("max_position_embeddings", value))
    result = run_cli("generate", folder, "--prompt", "a", "--max-new-tokens", "1", timeout=120)
    assert_one_line_error(result, 2, f"config.json: {message}")


def test_nested_sub_configs_are_checked_with_the_same_rules():
    from ia3_export.formats.model_config import check_model_config

    good = {"model_type": "llava", "text_config": {"vocab_size": 100, "rope_scaling": None}, "vision_config": {}}
    assert check_model_config(good, "c.json") is good
    with pytest.raises(IA3Error, match=r"^c.json: text_config.vocab_size is 0, expected an integer from 1 to"):
        check_model_config({"model_type": "llava", "text_config": {"vocab_size": 0}}, "c.json")
    with pytest.raises(IA3Error, match=r"^c.json: vision_config is \[1\], expected a JSON object"):
        check_model_config({"model_type": "llava", "vision_config": [1]}, "c.json")
