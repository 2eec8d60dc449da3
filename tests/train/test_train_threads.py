"""`train --threads N`: torch's intra-op threads for the run only, range-checked before any work."""
from __future__ import annotations

import json
import os

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.errors import IA3Error
from ia3_export.train import TrainOptions, train

ROWS = [{"text": f"{w} {a}", "label": "pos" if w == "good" else "neg"} for a in ("cat", "dog", "owl") for w in ("good", "bad")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dir):
    data = tmp_path_factory.mktemp("threads") / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model_dir("bert", "feature-extraction"), str(data)


def test_the_run_uses_the_threads_asked_for_and_restores_torchs(setup, tmp_path):
    base, data = setup
    seen = []
    before = torch.get_num_threads()
    train(base, data, "text-classification", str(tmp_path / "out"), quiet=True, max_steps=2, batch_size=4, threads=1,
          on_log=lambda record: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [0, -1, len(os.sched_getaffinity(0)) + 1, 1.5, True])
def test_threads_out_of_range_are_refused(threads):
    with pytest.raises(IA3Error, match=r"--threads is .*; give a whole number from 1 to \d+ \(this process's CPU cores\)"):
        TrainOptions(threads=threads)


def test_threads_accept_one_to_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert TrainOptions(threads=1).threads == 1 and TrainOptions(threads=cores).threads == cores


def test_cli_threads_zero_is_bad_usage(setup, tmp_path):
    base, data = setup
    result = run_cli("train", base, "--data", data, "--task", "text-classification", "--out", tmp_path / "out",
                     "--threads", "0")
    assert_one_line_error(result, 2, "--threads is 0; give a whole number in the range 1<=x<=")
    assert not (tmp_path / "out").exists()


def test_mps_is_not_offered():
    """Training is tested on CPU and CUDA only; MPS is neither offered nor accepted."""
    assert "mps" not in run_cli("train", "--help").stdout
    with pytest.raises(IA3Error, match="--device 'mps' is not a device this tool trains on; use cpu, cuda or cuda:N"):
        TrainOptions(device="mps")
