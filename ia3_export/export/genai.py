"""`genai_config.json`: what onnxruntime-genai (`og.Model(folder)`) reads to serve a decoder export.

Our decoder graphs already follow the optimum layout genai's generic decoder runs (`input_ids`,
`attention_mask`, `position_ids`, `past_key_values.%d.key/value` in, `logits`, `present.%d.key/value`
out, one graph that also takes a past of length 0), so the config only names them, gives the sizes
and says the cache is NOT a shared buffer: our graphs concatenate past and present themselves.
Tokenizer files genai reads (tokenizer.json, tokenizer_config.json) are the ones the export copies.

What genai cannot run is said, not written: a model type it does not know, non-decoder tasks,
bank exports (genai cannot feed the per-row `adapter_ids` input) and foldswap exports (the targeted
weights are pure graph inputs that only our runtime fills, by running fold.onnx).
"""
from __future__ import annotations

import os

from ..errors import CheckFailed
from ..formats.jsonfile import read_json, write_json
from ..ort import genai
from ..runtime.folder import ExportedFolder, open_folder
from ..runtime.generation import GenerationOptions, generate_ids
from ..runtime.session import IA3Session
from .modes import export_mode

CONFIG_NAME = "genai_config.json"
GENAI_TASK = "text-generation-with-past"
# Our model_type -> genai's `model.type`. 0.18 has its own type for most of our decoders; its `gpt2`
# type expects the old fused `past_%d` cache, and it has none for opt and gpt_neox: these three run as
# its generic `decoder` type, which reads exactly the names the config gives.
GENAI_TYPES = {**{t: t for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
               **{t: "decoder" for t in ("gpt2", "opt", "gpt_neox")}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def unsupported(manifest: dict) -> str | None:
    """Why onnxruntime-genai cannot serve this export, or None when it can."""
    if manifest["task"] != GENAI_TASK:
        return f"onnxruntime-genai serves {GENAI_TASK} exports (a decoder with its KV cache); this is {manifest['task']}"
    if manifest["model_type"] not in GENAI_TYPES:
        return f"ia3-export has no onnxruntime-genai model type for {manifest['model_type']}"
    return export_mode(manifest["mode"]).genai_refusal


def genai_config(folder: str, manifest: dict) -> dict:
    """The genai_config.json of an exported folder (config.json, generation_config.json and the manifest).
    EOS and pad ids are the ones our runtime uses (ExportedFolder), so both stop at the same token."""
    exported = ExportedFolder(folder, manifest)
    config, gen = exported.config, exported.generation_config
    cache, graph = manifest["cache"], manifest["graphs"][manifest["cache"]["graph"]]
    tokens = exported.tokens
    eos_ids = exported.eos_ids()
    eos = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = exported.pad_id()
    context = exported.max_positions or 4096
    inputs = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in graph["inputs"]}
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads", text.get("n_head"))
    hidden = text.get("hidden_size", text.get("n_embd"))
    search = {"do_sample": bool(gen.get("do_sample", False)), "max_length": context, "min_length": 0,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "early_stopping": True, "length_penalty": 1.0, "repetition_penalty": 1.0, "diversity_penalty": 0.0,
              "no_repeat_ngram_size": 0, "temperature": float(gen.get("temperature") or 1.0),
              "top_k": int(gen["top_k"]) if gen.get("top_k") is not None else 50,
              "top_p": float(gen.get("top_p") or 1.0)}
    return {
        "model": {
            "type": GENAI_TYPES[manifest["model_type"]],
            "bos_token_id": tokens.get("bos") if tokens.get("bos") is not None else gen.get("bos_token_id"),
            "eos_token_id": eos, "pad_token_id": pad, "context_length": context,
            "vocab_size": text.get("vocab_size"),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph["file"], "hidden_size": hidden, "num_attention_heads": heads,
                "num_key_value_heads": cache["num_kv_heads"], "num_hidden_layers": cache["num_layers"],
                "head_size": cache["head_dim"],
                "inputs": {**inputs, "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": search,
    }


def write_genai_files(folder: str, manifest: dict) -> dict:
    """Write genai_config.json into an export being built; returns the manifest's `genai` entry
    (the files genai reads, or why it cannot serve this export)."""
    reason = unsupported(manifest)
    if reason is not None:
        return {"supported": False, "reason": reason}
    write_json(os.path.join(folder, CONFIG_NAME), genai_config(folder, manifest), indent=2)
    files = [CONFIG_NAME, *[f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]]
    return {"supported": True, "files": files}


def validate_with_genai(folder: str, manifest: dict) -> str | None:
    """When onnxruntime_genai is importable and serves this export: load the folder (manifest written)
    with it and check its greedy tokens equal ours on a short prompt. Returns the genai version checked
    against, None when there was nothing to check."""
    if not (manifest.get("genai") or {}).get("supported"):
        return None
    try:
        og = genai()
    except ImportError:
        return None
    prompt, steps = [5, 6, 7, 8], 4
    open_folder(folder)  # genai opens the graphs itself: their external data is checked first
    read_json(os.path.join(folder, CONFIG_NAME))
    try:
        config = og.Config(folder)
        config.clear_providers()  # the CPU, like our runtime here (an fp16 export's config names CUDA)
        model = og.Model(config)
        og.Tokenizer(model)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
        generator = og.Generator(model, params)
        generator.append_tokens([prompt])
        theirs = []  # each chosen token: get_sequence leaves out the EOS that ends the run
        while not generator.is_done():
            generator.generate_next_token()
            theirs.append(int(generator.get_next_tokens()[0]))
    except Exception as e:  # genai raises bare RuntimeErrors
        raise CheckFailed(f"{folder}: onnxruntime-genai {og.__version__} cannot serve this export "
                          f"({str(e).splitlines()[0][:300]})") from None
    ours = generate_ids(IA3Session(folder), [prompt], None, GenerationOptions(max_new_tokens=steps))[0]
    if theirs != ours:
        raise CheckFailed(f"{folder}: onnxruntime-genai {og.__version__} generates {theirs} where ia3-export's "
                          f"runtime generates {ours} for {prompt}")
    return og.__version__
