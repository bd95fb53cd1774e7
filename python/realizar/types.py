"""GGML tensor types: ids as stored in GGUF, block sizes and bytes per block."""
from __future__ import annotations

import enum


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


QK_K = 256

# type -> (elements per block, bytes per block)
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (QK_K, 84),
    GGMLType.Q3_K: (QK_K, 110),
    GGMLType.Q4_K: (QK_K, 144),
    GGMLType.Q5_K: (QK_K, 176),
    GGMLType.Q6_K: (QK_K, 210),
    GGMLType.Q8_K: (QK_K, 292),
}

# Types a model's weights may use (Q8_1 and Q8_K are activation formats only).
WEIGHT_TYPES = tuple(t for t in BLOCK_LAYOUT if t not in (GGMLType.Q8_1, GGMLType.Q8_K))


def ggml_type(t: GGMLType | str | int) -> GGMLType:
    """Accept 'q4_k', 'Q4_K', 12 or GGMLType.Q4_K; raise ValueError naming the bad value."""
    if isinstance(t, GGMLType):
        return t
    if isinstance(t, str):
        for member in GGMLType:
            if member.name.lower() == t.lower():
                return member
        raise ValueError(f"unknown tensor type {t!r}; known: {', '.join(m.name for m in GGMLType)}")
    try:
        return GGMLType(int(t))
    except ValueError:
        raise ValueError(f"unknown tensor type id {t!r}") from None


def block_size(t: GGMLType | str | int) -> int:
    return BLOCK_LAYOUT[ggml_type(t)][0]


def type_size(t: GGMLType | str | int) -> int:
    return BLOCK_LAYOUT[ggml_type(t)][1]


def row_nbytes(t: GGMLType | str | int, n_elements: int) -> int:
    """Bytes of n_elements of type t; n_elements must be a multiple of the block size."""
    bs, ts = BLOCK_LAYOUT[ggml_type(t)]
    if n_elements % bs:
        raise ValueError(f"{ggml_type(t).name}: {n_elements} elements is not a multiple of the block size {bs}")
    return n_elements // bs * ts


# How a KV cache may store K and V (llama.cpp's --cache-type-k/v f16 and q8_0).
KV_CACHE_DTYPES = ("f16", "q8_0")
