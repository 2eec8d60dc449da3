"""Text <-> token ids with the `tokenizers` library reading the folder's tokenizer.json
(not transformers: the serving install has no transformers), giving the same ids and text as
transformers' AutoTokenizer on the same folder.

transformers does more than load tokenizer.json, and each difference changes what a model sees:
- the padding and truncation stored in tokenizer.json (MiniLM's pads every text to 128) are
  turned off for each call unless asked; the runtime pads batches itself (left, with the mask);
- special tokens come from tokenizer.json's post-processor alone (transformers 5 drops
  tokenizer_config.json's `add_bos_token` / `add_eos_token` when tokenizer.json exists);
- named special tokens of tokenizer_config.json missing from tokenizer.json are added;
- decoding skips special tokens and, when tokenizer_config.json asks for it (and the model is
  not BPE), cleans up tokenization spaces (" ." -> ".", " n't" -> "n't", ...).
"""
from __future__ import annotations

import json
import os

from ..errors import IA3Error

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization, in its order
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TextTokenizer:
    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise IA3Error(f"{folder} has no tokenizer.json; export from a model folder with a fast tokenizer, "
                           "or pass token ids to the runtime directly")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise IA3Error(f"{path}: not a readable tokenizer ({str(e)[:200]})") from None
        config = _read_config(os.path.join(folder, "tokenizer_config.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._add_named_special_tokens(config)
        self.tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        bpe_ok = type(self.tokenizer.model).__name__ != "BPE" or config.get(  # transformers skips it for BPE
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False) and bpe_ok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the special tokens the folder's tokenizer adds (unless told not to: a chat
        template writes its own); never padded or truncated."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens, as transformers' decode(ids, skip_special_tokens=True)."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.clean_up_spaces:
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def _add_named_special_tokens(self, config: dict) -> None:
        from tokenizers import AddedToken

        known = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in (_token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS) if t and t not in known]
        if missing:
            self.tokenizer.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise IA3Error(f"{path}: not readable JSON ({str(e)[:200]}); re-export the model or fix the file") from None
    return config if isinstance(config, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
