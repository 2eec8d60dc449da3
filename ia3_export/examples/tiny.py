"""Tiny random transformers models from configs (fixed seed): the embedded default for demos,
tests and users' CI, since nothing is downloaded at run time.

Each comes with a byte-level tokenizer (256 byte tokens + specials) so that generation,
training and tokenizer-copying paths are exercised for real.
"""
from __future__ import annotations


import torch

from ..tasks import DECODERS, ENCODERS, FAMILIES, SEQ2SEQ, auto_model_class  # noqa: F401 (ENCODERS: for callers)
from ..formats.atomic import atomic_output_dir

VOCAB = 320
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)

# model_type -> (config class name, keyword arguments)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
    "qwen3": ("Qwen3Config", _DECODER | {"head_dim": 8}),
    "gemma": ("GemmaConfig", _DECODER | {"head_dim": 8}),
    "gemma2": ("Gemma2Config", _DECODER | {"head_dim": 8, "sliding_window": 64}),
    "phi3": ("Phi3Config", _DECODER | {"pad_token_id": PAD_ID}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                              pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                       tie_word_embeddings=False)),
    "bert": ("BertConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, pad_token_id=PAD_ID)),
    "roberta": ("RobertaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=130,
                                      pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)),
    "t5": ("T5Config", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                            num_heads=4, pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
                            feed_forward_proj="relu", tie_word_embeddings=False)),
    "bart": ("BartConfig", dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=PAD_ID,
                                bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=EOS_ID,
                                forced_eos_token_id=None)),
}


def default_task(model_type: str) -> str:
    return "causal-lm" if model_type in DECODERS else "seq2seq-lm" if model_type in SEQ2SEQ else "seq-cls"


def tiny_config(model_type: str, **overrides):
    import transformers

    cls_name, kwargs = TINY_CONFIGS[model_type]
    return getattr(transformers, cls_name)(**(kwargs | overrides))


def tiny_model(model_type: str, task: str | None = None, seed: int = 0, **overrides):
    """A randomly initialised tiny model (deterministic for a seed), in float32 eval mode. `task` is a
    task family of ia3_export.tasks (causal-lm, seq-cls, seq2seq-lm, feature-extraction, ...)."""
    task = task or default_task(model_type)
    config = tiny_config(model_type, **overrides)
    if FAMILIES[task].labelled:
        config.num_labels = overrides.get("num_labels", 3)
    torch.manual_seed(seed)
    model = auto_model_class(FAMILIES[task].auto_class).from_config(config)
    if model_type == "qwen2":  # give k/v their bias a non-zero value so bias scaling is tested
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    return model.eval()


# A chat template in the shape hub models ship (BOS written by the template, roles checked with
# raise_exception, the assistant's turn opened by add_generation_prompt), for the chat tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_tokenizer():
    """A byte-level tokenizer: every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


def save_tiny(path: str, model_type: str, task: str | None = None, seed: int = 0, **overrides) -> str:
    """Build a tiny model and save it (safetensors + config + tokenizer) to `path`, replacing a tiny
    model saved there before (never a folder holding anything else)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = tiny_model(model_type, task, seed, **overrides)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left" if model_type in DECODERS else "right"
    with atomic_output_dir(path, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def randomize_adapter(ia3_model, name: str, seed: int = 1, spread: float = 0.5) -> None:
    """Give an adapter's vectors random non-identity values (ones +- spread), for tests and demos."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_model.ia3_layers().values():
            if name in layer.ia3_l:
                p = layer.ia3_l[name]
                p.copy_(1 + spread * (2 * torch.rand(p.shape, generator=generator) - 1))
        for saved in ia3_model.saved_modules().values():
            if name in saved.copies:
                for p in saved.copies[name].parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))
