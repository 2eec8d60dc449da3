"""Text <-> token ids with the `tokenizers` library reading the folder's tokenizer.json
(not transformers: the serving install has no transformers). Special tokens are added by the
tokenizer's own post-processor, exactly as transformers' fast tokenizers do."""
from __future__ import annotations

import os

from ..errors import IA3Error


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

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
