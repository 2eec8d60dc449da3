"""torchrun with 2 CPU processes (gloo) == one process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ia3_export.train import train


def test_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file

    from ia3_export.examples.tiny import save_tiny

    model = save_tiny(str(tmp_path / "llama"), "llama", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    # lengths differ, so the two processes pad differently and see different token counts
    with open(data, "w") as f:
        for i in range(21):  # 17 training rows: the 3rd global batch has 1 example, 3 of 4 micro-batches are empty
            f.write(json.dumps({"prompt": "x" * (1 + i % 5), "completion": "yz" * (1 + i % 3)}) + "\n")
    common = ["--task", "text-generation", "--max-steps", "4", "--lr", "0.05", "--eval-fraction", "0.2", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ia3_export.cli",
         "train", model, "--data", str(data), "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--grad-accum", "2", *common],
        env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    from ia3_export.examples.shipped import one_thread

    with one_thread():
        single = train(model, str(data), "text-generation", str(tmp_path / "one"), quiet=True, max_steps=4,
                       learning_rate=0.05, eval_fraction=0.2, batch_size=8)
    ddp = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=1e-5, rtol=1e-5)
    assert max((v - 1).abs().max().item() for v in one.values()) > 1e-2  # training moved the vectors
    with open(tmp_path / "ddp" / "train_log.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses == pytest.approx([r["loss"] for r in single.log], rel=1e-5, abs=1e-6)
    args = json.loads((tmp_path / "ddp" / "train_args.json").read_text())
    assert args["world_size"] == 2

