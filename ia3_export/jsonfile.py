"""Reading the JSON files users hand us (configs, manifests): one clear error naming the file."""
from __future__ import annotations

import json

from .errors import IA3Error


def read_json(path: str):
    """The parsed content of a JSON file; invalid JSON or text is an IA3Error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise IA3Error(f"{path}: not valid JSON ({e})") from None
