"""The one JSON reader for what users hand us (configs, manifests, safetensors headers, data rows),
and the one JSON writer (`dumps`, `write_json`) for everything we print or write.

JSON has no NaN or infinity (Python's `json` writes bare `NaN`, which strict parsers, jq and
JavaScript refuse): `dumps` writes `null` for every non-finite number (a NaN loss, an inf
tolerance), and `allow_nan=False` stops anything that slips past as a bug.

Python's `json` recurses once per nesting level, so a file nested 100,000 deep raises
RecursionError. The nesting depth is measured first, without recursion (strings blanked out
by a regex, then a running sum over the brackets left), and text nested deeper than MAX_DEPTH
is refused before `json.loads` sees it. Files are read through `reader` (regular files only, size-capped per kind).
A key given twice in one object is refused, naming it: Python keeps the last, other readers the
first, so two `"mode"` keys in a manifest would mean different folders to different tools.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

from ..errors import IA3Error
from .atomic import open_for_writing
from .reader import read_bytes, registers

MAX_DEPTH = 64  # real configs, manifests and rows nest a handful of levels
# A string token, or an unterminated one up to the end: every match attempt succeeds, so the scan is linear.
_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text (brackets inside strings do not count).

    Exact for valid JSON; for invalid JSON it is exact up to the first error, which is as far as
    the parser gets, so a depth within the limit here means no deep recursion in `json.loads`."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def check_depth(text: str, where: str) -> None:
    """Refuse JSON text nested deeper than MAX_DEPTH (before any parser, ours or a native one, sees it)."""
    # fewer openings than the limit cannot nest deeper (most rows): no scan needed
    if text.count("[") + text.count("{") > MAX_DEPTH and (depth := nesting_depth(text)) > MAX_DEPTH:
        raise IA3Error(f"{where}: JSON nested {depth} levels deep (at most {MAX_DEPTH} are read); "
                       "the file is corrupted or hostile, re-create it")


def parse_json(text: str | bytes, where: str):
    """Parsed JSON text; invalid or too deeply nested text is an IA3Error naming `where`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig")
        check_depth(text, where)
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _Duplicate as e:
        raise IA3Error(f"{where}: key {shown(e.args[0])} appears twice in one object (which one counts is "
                       "ambiguous); keep one and fix or re-create the file") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, too many digits, bad UTF-8
        raise IA3Error(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]}); fix or re-create the file") from None


class _Duplicate(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


@registers("json_file", ("", "json"))
def read_json(path: str, kind: str = "json"):
    """The parsed content of a JSON file (a regular file within its kind's cap, see `reader`);
    too large, invalid or too deep is an IA3Error naming the file."""
    return parse_json(read_bytes(path, kind), path)


def shown(value, limit: int = 80) -> str:
    """An untrusted value for an error message: its repr, one line, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def dumps(value, **options) -> str:
    """Strict JSON text for `value` (json.dumps's `options`): non-finite numbers become null."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def write_json(path: str, value, **options) -> str:
    """Write `value` as strict JSON (`dumps`, a final newline) inside an output block's temporary."""
    with open_for_writing(path) as f:
        f.write(dumps(value, **options) + "\n")
    return path


def _finite(value):
    """`value` with every non-finite float (Python or numpy) replaced by None, numpy numbers made plain."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
