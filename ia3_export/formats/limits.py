"""The ceilings on sizes that files declare: one table, each with why.

A manifest, a config.json or a graph declares sizes (a vector's dim, a layer count, a block size)
that decide how much memory we allocate or how long a loop runs. Each is checked against the
bytes that back it where there are any (formats/onnx_graph.py, runtime/folder.py) AND against its
ceiling here, before anything is allocated: a forged 28 KB folder must not make us allocate
gigabytes. The ceilings sit far above every public model (about 10x), so no real file meets one.
"""
from __future__ import annotations

import dataclasses

from ..errors import IA3Error
from .jsonfile import shown


@dataclasses.dataclass(frozen=True)
class Ceiling:
    value: int
    why: str


CEILINGS = {
    "vector_dim": Ceiling(1 << 20, "the widest IA3 vector (a fused qkv output, an intermediate size) of public "
                                   "models is ~10^5 values"),
    "weight_values": Ceiling(1 << 34, "a foldswap weight is one linear layer: ~10^9 values in the largest models"),
    "block_size": Ceiling(256, "MatMulNBits block sizes the quantizer writes: 16 to 256"),
    "num_hidden_layers": Ceiling(4096, "the deepest public models have ~10^2 layers; export loops over them"),
    "num_attention_heads": Ceiling(4096, "~10^2 heads in the largest models"),
    "hidden_size": Ceiling(1 << 20, "~10^4 in the largest models"),
    "head_dim": Ceiling(1 << 14, "64 to 256 in public models"),
    "intermediate_size": Ceiling(1 << 22, "~10^5 in the largest models"),
    "vocab_size": Ceiling(1 << 24, "~10^5 tokens in public tokenizers (Gemma: 262k)"),
    "max_position_embeddings": Ceiling(1 << 24, "the longest public contexts are ~10^7 tokens; positions size "
                                                "the KV cache"),
    "num_labels": Ceiling(1 << 20, "a classifier head's classes"),
}


def within(name: str, value, where: str, minimum: int = 1) -> int:
    """`value` if it is an integer from `minimum` to its ceiling; else an IA3Error naming `where`
    (the file and field), the value, the allowed range and why."""
    ceiling = CEILINGS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= ceiling.value:
        raise IA3Error(f"{where} is {shown(value)}, expected an integer from {minimum} to {ceiling.value} "
                       f"({ceiling.why}); fix or restore the file")
    return value
