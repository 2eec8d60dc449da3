"""Training step time and memory: ia3_export's IA3 vs PEFT's IA3, same model, batch and length.

Llama-shaped models from a config (random weights; speed does not depend on them), both
wrapped with the same targets (k_proj, v_proj, down_proj; down_proj scales its input), one
optimizer step = forward + causal-LM loss + backward + AdamW. Two shapes: `small` (5 M
parameters, batch 4 x 128: the matmuls dominate) and `tiny` (ia3_export.examples.tiny's Llama, batch
1 x 16: Python and dispatch overhead dominate, as in small-batch decoding). Reported as
ours / PEFT ratios from one run:
- step time: the two are timed in interleaved rounds (ours, PEFT, PEFT, ours, ...) and
  compared by their medians, by the median of the per-round ratios, by their best rounds, and
  by process CPU time (steadier than wall time when other jobs share the cores);
- activation memory: bytes autograd keeps for the backward pass (unique storages, via
  saved_tensors_hooks): the memory a training step adds on top of the weights;
- peak RSS: each implementation trains in its own fresh process; the growth of its peak
  resident memory over the model's footprint (includes allocator slack: a coarse check).

    .venv/bin/python scripts/bench_train.py [--rounds 15] [--steps 2] [--out runs/bench_train.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# name -> (LlamaConfig arguments, batch, sequence length, steps per round multiplier)
SHAPES = {
    "small": (dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False), 4, 128, 1),
    "tiny": (None, 1, 16, 50),  # ia3_export.examples.tiny's config
}
TARGETS, FEEDFORWARD = ["k_proj", "v_proj", "down_proj"], ["down_proj"]


def shape_config(shape: str):
    import transformers

    from ia3_export.examples.tiny import tiny_config

    arguments = SHAPES[shape][0]
    return transformers.LlamaConfig(**arguments) if arguments else tiny_config("llama")


def base_model(shape: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(shape_config(shape)).train()


def wrap(kind: str, model):
    if kind == "ours":
        from ia3_export.core.config import IA3Config
        from ia3_export.core.model import IA3Model

        return IA3Model(model, IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD, task_type="CAUSAL_LM"))
    import peft

    config = peft.IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def trainer(model, batch: int, seq: int, vocab: int):
    """A closure doing one optimizer step on a fixed batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, ids


def saved_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in one forward pass (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in frozen)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(kind: str, shape: str, steps: int) -> dict:
    """Peak resident memory growth over the built model while training (Linux: VmHWM reset)."""
    _, batch, seq, _ = SHAPES[shape]
    base = base_model(shape)
    vocab = base.config.vocab_size
    model = wrap(kind, base)
    step, _ = trainer(model, batch, seq, vocab)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    return {"peak_rss_growth_mib": (_status_kib("VmHWM") - before) / 1024}


def measure(shape: str, rounds: int, steps_per_round: int, threads: int) -> dict:
    _, batch, seq, multiplier = SHAPES[shape]
    steps_per_round *= multiplier
    base = base_model(shape)
    models = {"ours": wrap("ours", copy.deepcopy(base)), "peft": wrap("peft", copy.deepcopy(base))}
    steps = {k: trainer(m, batch, seq, base.config.vocab_size) for k, m in models.items()}
    losses = {k: s() for k, (s, _) in steps.items()}  # warm-up step; also a sanity check
    assert abs(losses["ours"] - losses["peft"]) < 1e-4, losses
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    cpu: dict[str, list[float]] = {"ours": [], "peft": []}
    for r in range(rounds):
        for kind in (["ours", "peft"] if r % 2 == 0 else ["peft", "ours"]):  # neither always goes first
            step = steps[kind][0]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                step()
            times[kind].append((time.perf_counter() - t) / steps_per_round)
            cpu[kind].append((time.process_time() - c) / steps_per_round)
    memory = {k: saved_bytes(models[k], steps[k][1]) for k in models}

    rss = {}
    for kind in models:
        run = subprocess.run([sys.executable, __file__, "--child", kind, "--shapes", shape, "--steps", str(steps_per_round),
                              "--threads", str(threads)], capture_output=True, text=True, check=True)
        rss[kind] = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]

    median = {k: statistics.median(v) for k, v in times.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [o / p for o, p in zip(times["ours"], times["peft"])]
    return {
        "model": {"type": "llama", **shape_config(shape).to_diff_dict(), "params": sum(p.numel() for p in base.parameters())},
        "batch": batch, "seq": seq, "rounds": rounds, "steps_per_round": steps_per_round,
        "step_ms": {k: {"median": 1000 * median[k], "min": 1000 * min(v), "max": 1000 * max(v)} for k, v in times.items()},
        "cpu_ms": {k: 1000 * v for k, v in cpu_median.items()},
        "saved_activation_mib": {k: v / 2**20 for k, v in memory.items()},
        "peak_rss_growth_mib": rss,
        "ratio_ours_over_peft": {
            "step_time": median["ours"] / median["peft"],
            "step_time_paired_rounds": {"median": statistics.median(paired), "min": min(paired), "max": max(paired)},
            "step_time_best": min(times["ours"]) / min(times["peft"]),
            "step_cpu_time": cpu_median["ours"] / cpu_median["peft"],
            "saved_activation_memory": memory["ours"] / memory["peft"],
            "peak_rss_growth": rss["ours"] / rss["peft"] if rss["peft"] else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="small,tiny", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per round (x50 for tiny)")
    parser.add_argument("--threads", type=int, default=1, help="1: steadier ratios on a shared machine")
    parser.add_argument("--out", default="runs/bench_train.json")
    parser.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.shapes, args.steps)))
        return
    result = {"threads": args.threads, "torch": torch.__version__, "peft": __import__("peft").__version__,
              "shapes": {shape: measure(shape, args.rounds, args.steps, args.threads) for shape in args.shapes.split(",")}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
