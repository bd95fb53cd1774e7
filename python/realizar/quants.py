"""numpy reference of every GGUF block format: the specification our C++ kernels are tested against.

`dequantize(data, type, shape)` turns raw GGUF bytes into float32 with exactly the float32 operations, in exactly
the order, of llama.cpp's C `dequantize_row_*` functions, so its results are bit-identical to theirs and to the `gguf`
package's numpy dequantizers. `quantize(array, type)` follows llama.cpp's reference quantizers
(`quantize_row_*_ref`), bit for bit for the simple formats (as gguf.quants.quantize does). The iterative scale
searches of the K-quants run the same algorithm in float32 with the C evaluation and summation order; they matched a
build of llama.cpp's reference code compiled without fused multiply-adds (-ffp-contract=off) byte for byte when
written, but are not promised to match every C build: a compiler that fuses multiply-adds changes the last bits of the
sums they compare, and then some blocks come out differently.

One known disagreement with gguf: Q4_1/Q5_1 take the block minimum as llama.cpp's scan does (the first of equal
values), so a block whose minimum is zero stores m = +0.0 or -0.0 by the sign of its first zero, where gguf's np.min
may pick the other sign. The dequantized values are the same.

Every block format is a numpy structured dtype in `BLOCK_DTYPES`, byte-identical to the structs of ggml-common.h.
Within a super-block the element order is the one llama.cpp's loops write; the helpers `_unpack_bitfields` and
`_pack_bitfields` describe each packing with two numbers (bits per field, bytes per group).

Non-finite values: dequantizing propagates NaN and inf the way the C code's float arithmetic does (no error); an
F16 signalling NaN comes out quiet, as x86's F16C conversion (ggml's) makes it. Quantizing to a block type raises
ValueError for NaN or inf input (llama.cpp does not check and produces garbage); F32, F16 and BF16 store them.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from realizar.types import BLOCK_LAYOUT, QK_K, GGMLType, ggml_type

__all__ = ["BLOCK_DTYPES", "DEQUANTIZE_TYPES", "QUANTIZE_TYPES", "dequantize", "quantize"]

_HALF = "<f2"
_SCALE_BYTES_K = 12  # K_SCALE_SIZE: eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K) or sixteen 6-bit scales (Q3_K)
_GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp treats a group whose largest |x| is below this as all zero

# Structs of ggml-common.h, field for field (little-endian, no padding). Q5_0/Q5_1 `qh` is uint8_t[4] in C; reading
# it as one little-endian uint32 gives the same bits (bit j belongs to element j).
BLOCK_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.Q4_0: np.dtype([("d", _HALF), ("qs", "u1", 16)]),
    GGMLType.Q4_1: np.dtype([("d", _HALF), ("m", _HALF), ("qs", "u1", 16)]),
    GGMLType.Q5_0: np.dtype([("d", _HALF), ("qh", "<u4"), ("qs", "u1", 16)]),
    GGMLType.Q5_1: np.dtype([("d", _HALF), ("m", _HALF), ("qh", "<u4"), ("qs", "u1", 16)]),
    GGMLType.Q8_0: np.dtype([("d", _HALF), ("qs", "i1", 32)]),
    GGMLType.Q8_1: np.dtype([("d", _HALF), ("s", _HALF), ("qs", "i1", 32)]),
    GGMLType.Q2_K: np.dtype([("scales", "u1", QK_K // 16), ("qs", "u1", QK_K // 4), ("d", _HALF), ("dmin", _HALF)]),
    GGMLType.Q3_K: np.dtype([("hmask", "u1", QK_K // 8), ("qs", "u1", QK_K // 4), ("scales", "u1", _SCALE_BYTES_K),
                             ("d", _HALF)]),
    GGMLType.Q4_K: np.dtype([("d", _HALF), ("dmin", _HALF), ("scales", "u1", _SCALE_BYTES_K), ("qs", "u1", QK_K // 2)]),
    GGMLType.Q5_K: np.dtype([("d", _HALF), ("dmin", _HALF), ("scales", "u1", _SCALE_BYTES_K), ("qh", "u1", QK_K // 8),
                             ("qs", "u1", QK_K // 2)]),
    GGMLType.Q6_K: np.dtype([("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16),
                             ("d", _HALF)]),
    GGMLType.Q8_K: np.dtype([("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)]),
}
for _t, _dtype in BLOCK_DTYPES.items():  # the static_assert(sizeof(block_...)) of ggml-common.h
    assert _dtype.itemsize == BLOCK_LAYOUT[_t][1], f"{_t.name}: struct is {_dtype.itemsize} bytes"
del _t, _dtype

_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_CHUNK_ELEMENTS = 1 << 18  # blocks are converted in chunks of about this many elements to keep temporaries small


# ---------------------------------------------------------------------------------------------------------------------
# Bit packing shared by the formats


def _unpack_bitfields(packed: np.ndarray, bits: int, group: int) -> np.ndarray:
    """(n, k*group) uint8 -> (n, k*(8//bits)*group) uint8 fields.

    Each run of `group` bytes holds 8//bits consecutive runs of `group` elements: field f of byte b is element
    f*group + b of that run (Q4_0: bits=4, group=16; Q4_K: 4, 32; Q2_K/Q3_K qs and Q6_K qh: 2, 32; Q6_K ql: 4, 64;
    Q3_K hmask and Q5_K qh: 1, 32).
    """
    n = packed.shape[0]
    runs = packed.reshape(n, -1, group)  # (n, k, group)
    mask = np.uint8((1 << bits) - 1)
    fields = [(runs >> np.uint8(shift)) & mask for shift in range(0, 8, bits)]
    return np.stack(fields, axis=2).reshape(n, -1)  # (n, k, fields, group) -> (n, elements)


def _pack_bitfields(values: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Inverse of `_unpack_bitfields`: (n, k*(8//bits)*group) values below 2**bits -> (n, k*group) uint8."""
    n = values.shape[0]
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(-1, 1)
    fields = values.astype(np.uint8).reshape(n, -1, 8 // bits, group) << shifts  # (n, k, fields, group)
    return np.bitwise_or.reduce(fields, axis=2).reshape(n, -1)


def _unpack_qh32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 high bits: (n,) uint32 -> (n, 32) uint8, bit j is the fifth bit of element j."""
    return ((qh.reshape(-1, 1) >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _pack_qh32(high_bits: np.ndarray) -> np.ndarray:
    """(n, 32) zeros and ones -> (n,) uint32 with bit j set for element j."""
    return np.bitwise_or.reduce(high_bits.astype(np.uint32) << np.arange(32, dtype=np.uint32), axis=1)


def _unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 scale bytes -> (scale, min), each (n, 8) uint8 of 6 bits (llama.cpp's get_scale_min_k4).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; sub-blocks 4-7 keep their low 4 bits in
    bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the top 2 bits of bytes 0-3 (scales) and
    4-7 (mins).
    """
    lo_sc, lo_m, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def _pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_scale_min_k4`: two (n, 8) arrays of 6-bit values -> (n, 12) uint8."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1)


def _unpack_scales_q3_k(scales: np.ndarray) -> np.ndarray:
    """Q3_K 12 scale bytes -> (n, 16) int16 scales in [-32, 31].

    Scale j keeps its low 4 bits in byte j (j < 8, low nibble) or byte j-8 (high nibble), and its top 2 bits at bit
    2*(j//4) of byte 8 + j%4; the stored 6-bit value is offset by 32.
    """
    low = scales[:, :8]
    low4 = np.concatenate([low & 0xF, low >> 4], axis=1)  # (n, 16)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(-1, 1)
    high2 = ((scales[:, None, 8:12] >> shifts) & 3).reshape(-1, 16)  # (n, 4 shifts, 4 bytes) -> j = 4*shift + byte
    return (low4 | (high2 << 4)).astype(np.int16) - 32


def _pack_scales_q3_k(stored: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_scales_q3_k` for (n, 16) stored values in [0, 63] (scale + 32) -> (n, 12) uint8."""
    stored = stored.astype(np.uint8)
    low = (stored[:, :8] & 0xF) | ((stored[:, 8:] & 0xF) << 4)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(-1, 1)
    high = np.bitwise_or.reduce((stored.reshape(-1, 4, 4) >> 4) << shifts, axis=1)  # (n, 4 bytes)
    return np.concatenate([low, high], axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# Scalar helpers with C semantics


def _half_to_float(h: np.ndarray) -> np.ndarray:
    """fp16 -> float32, exact (GGML_FP16_TO_FP32)."""
    return h.astype(np.float32)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even via the 1.5*2**23 trick, float32 -> int32.

    Exact C semantics, including what the trick yields outside |v| <= 2**22 (where the C code asserts).
    """
    shifted = np.asarray(v, dtype=np.float32) + np.float32(12582912.0)
    return (shifted.view(np.int32) & 0x007FFFFF) - 0x00400000


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf in float32: halves go away from zero (np.round goes to even)."""
    whole = np.trunc(v)
    return whole + np.where(np.abs(v - whole) >= np.float32(0.5), np.sign(v), np.float32(0))


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`; a reciprocal that overflows (d below ~3e-39) also gives 0, where C has undefined
    float-to-int conversions; such a block's fp16 scale is 0 either way."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / d
    return np.where((d != 0) & np.isfinite(inv), inv, np.float32(0)).astype(np.float32)


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """Per row of (n, k): the element with the largest |x|, first one on ties (C's `if (amax < fabsf(v))`) -> (n,)."""
    idx = np.abs(x).argmax(axis=1)
    return x[np.arange(x.shape[0]), idx]


def _first_max(x: np.ndarray, largest: bool) -> np.ndarray:
    """Per row: the first element equal to the max (or min) as C's strict `<`/`>` scan keeps it, sign of zero
    included -> (n,)."""
    idx = x.argmax(axis=1) if largest else x.argmin(axis=1)
    return x[np.arange(x.shape[0]), idx]


def _positive_max_or_zero(v: np.ndarray) -> np.ndarray:
    """(n, k) -> (n,): C's `max = 0; if (v > max) max = v` (never negative, never -0)."""
    best = v.max(axis=1)
    return np.where(best > 0, best, np.float32(0)).astype(np.float32)


def _sequential_sum(v: np.ndarray) -> np.ndarray:
    """(n, ...) -> (...): float32 sum over the first axis, left to right from 0 like C's `float s = 0; s += v[i]`
    (np.sum adds pairwise)."""
    total = np.zeros(v.shape[1:], dtype=np.float32)
    for row in v:
        total += row
    return total


def _to_fp16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 with round-to-nearest-even; NaN becomes a quiet NaN keeping sign and top payload bits
    (what x86's F16C conversion, ggml's GGML_FP32_TO_FP16, does; numpy would keep a signalling NaN signalling)."""
    v = np.asarray(v, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = v.astype(np.float16)
    nan = np.isnan(v)
    if nan.any():
        bits = v.view(np.uint32)
        quiet = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x03FF)
        h = np.where(nan, quiet.astype(np.uint16).view(np.float16), h)
    return h


# ---------------------------------------------------------------------------------------------------------------------
# Dequantizers: structured blocks (n,) -> float32 (n, elements per block), llama.cpp's dequantize_row_* order.
# Each operation rounds to float32 on its own (no fused multiply-add). Only the fp16/fp32 scales can be NaN, and
# additions keep C's operand order (the product first), so even NaN payloads come out as in C and gguf.


def _dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    d = _half_to_float(b["d"]).reshape(-1, 1)
    y = (_unpack_bitfields(b["qs"], 4, 16).astype(np.int8) - np.int8(8)).astype(np.float32)
    y *= d  # y = x0*d
    return y


def _dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    d = _half_to_float(b["d"]).reshape(-1, 1)
    m = _half_to_float(b["m"]).reshape(-1, 1)
    y = _unpack_bitfields(b["qs"], 4, 16).astype(np.float32)
    y *= d
    y += m  # y = x0*d + m, rounded after each operation
    return y


def _q5_values(b: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 5-bit values (n, 32): low nibble from qs, fifth bit from qh."""
    return _unpack_bitfields(b["qs"], 4, 16) | (_unpack_qh32(b["qh"]) << 4)


def _dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    d = _half_to_float(b["d"]).reshape(-1, 1)
    y = (_q5_values(b).astype(np.int8) - np.int8(16)).astype(np.float32)
    y *= d
    return y


def _dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    d = _half_to_float(b["d"]).reshape(-1, 1)
    m = _half_to_float(b["m"]).reshape(-1, 1)
    y = _q5_values(b).astype(np.float32)
    y *= d
    y += m
    return y


def _dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    return b["qs"].astype(np.float32) * _half_to_float(b["d"]).reshape(-1, 1)


def _dequantize_q8_1(b: np.ndarray) -> np.ndarray:
    # ggml has no C dequantizer for this activation format; d*q is what its dot products use (s = d*sum(q) is a cache).
    return b["qs"].astype(np.float32) * _half_to_float(b["d"]).reshape(-1, 1)


def _dequantize_q8_k(b: np.ndarray) -> np.ndarray:
    return b["d"].astype(np.float32).reshape(-1, 1) * b["qs"].astype(np.float32)


def _dequantize_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _half_to_float(b["d"]).reshape(-1, 1)
    dmin = _half_to_float(b["dmin"]).reshape(-1, 1)
    sc = b["scales"]  # (n, 16): low nibble scales sub-block j (16 elements), high nibble is its min
    dl = (d * (sc & 0xF).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)
    y = _unpack_bitfields(b["qs"], 2, 32).reshape(n, 16, 16).astype(np.float32)
    y *= dl
    y -= ml  # y = (d*sc)*q - (dmin*m)
    return y.reshape(n, QK_K)


def _dequantize_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _half_to_float(b["d"]).reshape(-1, 1)
    dl = (d * _unpack_scales_q3_k(b["scales"]).astype(np.float32)).reshape(n, 16, 1)
    low = _unpack_bitfields(b["qs"], 2, 32).astype(np.int8)  # (n, 256) low 2 bits
    high = _unpack_bitfields(b["hmask"], 1, 32).astype(np.int8)  # (n, 256) a set bit means "no -4"
    y = (low - (np.int8(4) - (high << 2))).reshape(n, 16, 16).astype(np.float32)
    y *= dl  # y = (d*(sc-32)) * (q - (h ? 0 : 4))
    return y.reshape(n, QK_K)


def _k_scales_mins(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K per sub-block (n, 8, 1) factors d*sc and dmin*m."""
    n = b.shape[0]
    sc, m = _unpack_scale_min_k4(b["scales"])
    d = _half_to_float(b["d"]).reshape(-1, 1)
    dmin = _half_to_float(b["dmin"]).reshape(-1, 1)
    return (d * sc.astype(np.float32)).reshape(n, 8, 1), (dmin * m.astype(np.float32)).reshape(n, 8, 1)


def _dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    dl, ml = _k_scales_mins(b)
    y = _unpack_bitfields(b["qs"], 4, 32).reshape(n, 8, 32).astype(np.float32)
    y *= dl
    y -= ml  # y = (d*sc)*q - (dmin*m)
    return y.reshape(n, QK_K)


def _dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    dl, ml = _k_scales_mins(b)
    q = _unpack_bitfields(b["qs"], 4, 32) | (_unpack_bitfields(b["qh"], 1, 32) << 4)
    y = q.reshape(n, 8, 32).astype(np.float32)
    y *= dl
    y -= ml
    return y.reshape(n, QK_K)


def _dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _half_to_float(b["d"]).reshape(-1, 1)
    dl = (d * b["scales"].astype(np.float32)).reshape(n, 16, 1)
    q = _unpack_bitfields(b["ql"], 4, 64) | (_unpack_bitfields(b["qh"], 2, 32) << 4)
    y = (q.astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    y *= dl  # y = (d*sc) * q
    return y.reshape(n, QK_K)


_DEQUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q4_0: _dequantize_q4_0,
    GGMLType.Q4_1: _dequantize_q4_1,
    GGMLType.Q5_0: _dequantize_q5_0,
    GGMLType.Q5_1: _dequantize_q5_1,
    GGMLType.Q8_0: _dequantize_q8_0,
    GGMLType.Q8_1: _dequantize_q8_1,
    GGMLType.Q2_K: _dequantize_q2_k,
    GGMLType.Q3_K: _dequantize_q3_k,
    GGMLType.Q4_K: _dequantize_q4_k,
    GGMLType.Q5_K: _dequantize_q5_k,
    GGMLType.Q6_K: _dequantize_q6_k,
    GGMLType.Q8_K: _dequantize_q8_k,
}


def _dequantize_floats(raw: np.ndarray, t: GGMLType) -> np.ndarray:
    if t == GGMLType.F32:
        return raw.view("<f4").astype(np.float32)
    if t == GGMLType.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    f = raw.view(_HALF).astype(np.float32)
    bits = f.view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    bits[nan] |= 0x00400000  # signalling NaN -> quiet NaN, as the F16C instruction converts it
    return f


# ---------------------------------------------------------------------------------------------------------------------
# Search routines of the K-quant reference quantizers, vectorised over groups. They take the groups element-major,
# xt (n, groups) float32, so that a C loop over a group's elements becomes n whole-row operations in the same order.


def _make_qkx2_quants(xt: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric levels 0..nmax with a weighted least-squares scale and min per group (llama.cpp make_qkx2_quants).

    xt, weights: (n, groups). Returns scale (groups,), the min as a positive offset (groups,) and levels L
    (groups, n) uint8, such that x ~ scale*L - offset.
    """
    f32 = np.float32

    def error(scale: np.ndarray, levels: np.ndarray, low: np.ndarray) -> np.ndarray:
        diff = scale * levels + low - xt
        return _sequential_sum(weights * (np.abs(diff) if use_mad else diff * diff))

    def levels_for(iscale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.clip(_nearest_int(iscale * (xt - low)), 0, nmax).astype(np.float32)

    low = np.minimum(xt.min(axis=0), f32(0))  # the min is never above zero
    high = xt.max(axis=0)
    flat = high == low
    flat_offset = -low
    sum_w = _sequential_sum(weights)
    sum_x = _sequential_sum(weights * xt)
    iscale = f32(nmax) / (high - low)
    scale = f32(1) / iscale
    levels = levels_for(iscale, low)
    best = error(scale, levels, low)
    for step in range(nstep + 1):
        trial_iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (high - low)
        trial = levels_for(trial_iscale, low)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _sequential_sum(wl), _sequential_sum(wl * trial), _sequential_sum(wl * xt)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0  # a positive min is not representable: fit the scale alone
        this_min = np.where(clamp, f32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        err = error(this_scale, trial, this_min)
        better = (det > 0) & (err < best)
        levels = np.where(better, trial, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)  # later steps measure from the new min, as in C
    levels = np.where(flat, f32(0), levels)
    scale = np.where(flat, f32(0), scale).astype(np.float32)
    offset = np.where(flat, flat_offset, -low).astype(np.float32)
    return scale, offset, levels.T.astype(np.uint8)


def _make_qx_quants(xt: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric levels -nmax..nmax-1 with weights x*x (make_qx_quants, rmse_type 1, no importance weights).

    xt: (n, groups). Returns scale (groups,) and levels L + nmax (groups, n) uint8; an all-zero group gives scale 0
    and L = 0.
    """
    f32 = np.float32
    signed_max = _first_absmax(xt.T)
    zero = np.abs(signed_max) < _GROUP_MAX_EPS
    w = xt * xt
    wx = w * xt

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1).astype(np.float32)
        return lv, _sequential_sum(wx * lv), _sequential_sum(w * lv * lv)

    levels, sumlx, suml2 = trial(f32(-nmax) / signed_max)
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        lv, slx, sl2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / signed_max)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = np.where(better, lv, levels)
        scale = np.where(better, slx / sl2, scale)
        best = np.where(better, scale * slx, best)
    levels = np.where(zero, f32(0), levels + f32(nmax))
    scale = np.where(zero, f32(0), scale).astype(np.float32)
    return scale, levels.T.astype(np.uint8)


def _make_q3_quants(xt: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric levels -nmax..nmax-1 refined one element at a time (make_q3_quants with do_rmse).

    xt: (n, groups). Returns scale (groups,) and levels L + nmax (groups, n) uint8; an all-zero group gives scale 0
    and L = 0.
    """
    f32 = np.float32
    signed_max = _first_absmax(xt.T)
    zero = np.abs(signed_max) < _GROUP_MAX_EPS
    iscale = f32(-nmax) / signed_max
    levels = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1).astype(np.float32)
    w = xt * xt
    wx = w * xt
    sumlx = _sequential_sum(wx * levels)
    suml2 = _sequential_sum(w * levels * levels)
    # Five coordinate-descent passes. C stops after a pass that changes nothing; such a pass leaves the state as it
    # was, so running the remaining passes for every group changes nothing either.
    for _ in range(5):
        for i in range(xt.shape[0]):
            wi, wxi, li = w[i], wx[i], levels[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(_nearest_int(xt[i] * sl2 / slx), -nmax, nmax - 1).astype(np.float32)
            slx_new = slx + wxi * new
            sl2_new = sl2 + wi * new * new
            accept = ((slx > 0) & (new != li) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            levels[i] = np.where(accept, new, li)
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    levels = np.where(zero, f32(0), levels + f32(nmax))
    scale = np.where(zero, f32(0), scale).astype(np.float32)
    return scale, levels.T.astype(np.uint8)


def _element_major(x: np.ndarray, group: int) -> np.ndarray:
    """(n_blocks, elements) -> (group, n_groups) contiguous: element i of every group in row i."""
    return np.ascontiguousarray(x.reshape(-1, group).T)


# ---------------------------------------------------------------------------------------------------------------------
# Quantizers: x (n, elements per block) float32 -> structured blocks (n,), llama.cpp's quantize_row_*_ref


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    return _quantize_symmetric(x, GGMLType.Q4_0, levels=16)


def _quantize_q5_0(x: np.ndarray) -> np.ndarray:
    return _quantize_symmetric(x, GGMLType.Q5_0, levels=32)


def _quantize_symmetric(x: np.ndarray, t: GGMLType, levels: int) -> np.ndarray:
    """Q4_0/Q5_0: d = (signed max) / -(levels/2), q = min(levels-1, (int)(x/d + levels/2 + 0.5))."""
    d = _first_absmax(x) / np.float32(-(levels // 2))
    v = x * _reciprocal_or_zero(d)[:, None] + np.float32(levels // 2 + 0.5)
    q = np.clip(np.trunc(v), 0, levels - 1).astype(np.uint8)  # C truncates (v >= 0 here) then clamps above
    out = np.zeros(x.shape[0], BLOCK_DTYPES[t])
    out["d"] = _to_fp16(d)
    out["qs"] = _pack_bitfields(q & 0xF, 4, 16)
    if t == GGMLType.Q5_0:
        out["qh"] = _pack_qh32(q >> 4)
    return out


def _quantize_q4_1(x: np.ndarray) -> np.ndarray:
    return _quantize_affine(x, GGMLType.Q4_1, levels=16)


def _quantize_q5_1(x: np.ndarray) -> np.ndarray:
    return _quantize_affine(x, GGMLType.Q5_1, levels=32)


def _quantize_affine(x: np.ndarray, t: GGMLType, levels: int) -> np.ndarray:
    """Q4_1/Q5_1: d = (max - min) / (levels-1), m = min, q = min(levels-1, (int)((x - min)/d + 0.5))."""
    low = _first_max(x, largest=False)
    d = (_first_max(x, largest=True) - low) / np.float32(levels - 1)
    v = (x - low[:, None]) * _reciprocal_or_zero(d)[:, None] + np.float32(0.5)
    q = np.clip(np.trunc(v), 0, levels - 1).astype(np.uint8)
    out = np.zeros(x.shape[0], BLOCK_DTYPES[t])
    out["d"] = _to_fp16(d)
    out["m"] = _to_fp16(low)
    out["qs"] = _pack_bitfields(q & 0xF, 4, 16)
    if t == GGMLType.Q5_1:
        out["qh"] = _pack_qh32(q >> 4)
    return out


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d, q = _absmax_int8(x)
    out = np.zeros(x.shape[0], BLOCK_DTYPES[GGMLType.Q8_0])
    out["d"] = _to_fp16(d)
    out["qs"] = q
    return out


def _quantize_q8_1(x: np.ndarray) -> np.ndarray:
    d, q = _absmax_int8(x)
    out = np.zeros(x.shape[0], BLOCK_DTYPES[GGMLType.Q8_1])
    out["d"] = _to_fp16(d)
    out["s"] = _to_fp16(q.sum(axis=1, dtype=np.int32).astype(np.float32) * d)  # s = (float)sum(q) * d
    out["qs"] = q
    return out


def _absmax_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0/Q8_1: d = max|x| / 127 (n,), q = roundf(x / d) (n, 32) int8."""
    d = np.abs(x).max(axis=1) / np.float32(127)
    q = _roundf(x * _reciprocal_or_zero(d)[:, None])
    return d, np.clip(q, -127, 127).astype(np.int8)


def _quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """d = max / -127 with the signed max, q = min(127, nearest_int(x/d)), bsums = sums of 16 quants."""
    signed_max = _first_absmax(x)
    zero = signed_max == 0
    iscale = np.where(zero, np.float32(0), np.float32(-127) / signed_max).astype(np.float32)
    q = np.clip(_nearest_int(iscale[:, None] * x), -128, 127).astype(np.int8)
    out = np.zeros(x.shape[0], BLOCK_DTYPES[GGMLType.Q8_K])
    out["d"] = np.where(zero, np.float32(0), np.float32(1) / iscale)
    out["qs"] = q
    out["bsums"] = q.reshape(-1, QK_K // 16, 16).sum(axis=2, dtype=np.int16)
    return out


def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    f32 = np.float32
    xt = _element_major(x, 16)  # (16, n*16)
    scales, mins, levels = _make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = _positive_max_or_zero(scales), _positive_max_or_zero(mins)
    out = np.zeros(n, BLOCK_DTYPES[GGMLType.Q2_K])
    # 4-bit scale and min per group; C assigns an int to uint8_t, so out-of-range values wrap
    ls = np.where(max_scale[:, None] > 0, _nearest_int((f32(15) / max_scale)[:, None] * scales), 0)
    lm = np.where(max_min[:, None] > 0, _nearest_int((f32(15) / max_min)[:, None] * mins), 0)
    packed = (ls.astype(np.uint8) | (lm << 4).astype(np.uint8)).astype(np.uint8)
    out["scales"] = packed
    out["d"] = _to_fp16(np.where(max_scale > 0, max_scale / f32(15), f32(0)))
    out["dmin"] = _to_fp16(np.where(max_min > 0, max_min / f32(15), f32(0)))
    d = _half_to_float(out["d"])[:, None] * (packed & 0xF).astype(f32)  # (n, 16)
    dm = _half_to_float(out["dmin"])[:, None] * (packed >> 4).astype(f32)
    levels = _requantize(levels.reshape(n, 16, 16), (x.reshape(n, 16, 16) + dm[..., None]), d, 0, 3)
    out["qs"] = _pack_bitfields(levels.reshape(n, QK_K), 2, 32)
    return out


def _requantize(levels: np.ndarray, numerator: np.ndarray, d: np.ndarray, lo: int, hi: int,
                offset: int = 0) -> np.ndarray:
    """Final pass of the K-quants: where a sub-block's rounded scale d (n, groups) is non-zero, its levels become
    clamp(nearest_int(numerator / d), lo, hi) + offset; other sub-blocks keep the search's levels (n, groups, k)."""
    fresh = np.clip(_nearest_int(numerator / d[..., None]), lo, hi) + offset
    return np.where(d[..., None] != 0, fresh, levels).astype(np.uint8)


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    f32 = np.float32
    scales, levels = _make_q3_quants(_element_major(x, 16), 4)
    scales = scales.reshape(n, 16)
    max_scale = _first_absmax(scales)
    has_scale = max_scale != 0
    iscale = np.where(has_scale, f32(-32) / max_scale, f32(0)).astype(f32)
    stored = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31) + 32  # C stores in int8_t
    stored = np.where(has_scale[:, None], stored, 0)
    out = np.zeros(n, BLOCK_DTYPES[GGMLType.Q3_K])
    out["scales"] = _pack_scales_q3_k(stored)
    out["d"] = _to_fp16(np.where(has_scale, f32(1) / iscale, f32(0)))
    d = _half_to_float(out["d"])[:, None] * _unpack_scales_q3_k(out["scales"]).astype(f32)  # (n, 16)
    levels = _requantize(levels.reshape(n, 16, 16), x.reshape(n, 16, 16), d, -4, 3, offset=4).reshape(n, QK_K)
    out["hmask"] = _pack_bitfields(levels >> 2, 1, 32)
    out["qs"] = _pack_bitfields(levels & 3, 2, 32)
    return out


def _quantize_k_asymmetric(x: np.ndarray, t: GGMLType, nmax: int, rmin: float, nstep: int) -> np.ndarray:
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins under fp16 d and dmin."""
    n = x.shape[0]
    f32 = np.float32
    sub = x.reshape(n, 8, 32)
    xt = _element_major(x, 32)  # (32, n*8)
    av_x = np.sqrt(_sequential_sum(xt * xt) / f32(32))  # (n*8,)
    weights = av_x + np.abs(xt)
    scales, mins, levels = _make_qkx2_quants(xt, weights, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = _positive_max_or_zero(scales), _positive_max_or_zero(mins)
    inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
    inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    # C: uint8_t ls = nearest_int(...) wraps, then MIN(63, ls)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
    out = np.zeros(n, BLOCK_DTYPES[t])
    out["scales"] = _pack_scale_min_k4(ls, lm)
    out["d"] = _to_fp16(max_scale / f32(63))
    out["dmin"] = _to_fp16(max_min / f32(63))
    sc, m = _unpack_scale_min_k4(out["scales"])
    d = _half_to_float(out["d"])[:, None] * sc.astype(f32)  # (n, 8)
    dm = _half_to_float(out["dmin"])[:, None] * m.astype(f32)
    levels = _requantize(levels.reshape(n, 8, 32), sub + dm[..., None], d, 0, nmax).reshape(n, QK_K)
    out["qs"] = _pack_bitfields(levels & 0xF, 4, 32)
    if t == GGMLType.Q5_K:
        out["qh"] = _pack_bitfields(levels >> 4, 1, 32)
    return out


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    return _quantize_k_asymmetric(x, GGMLType.Q4_K, nmax=15, rmin=-1.0, nstep=20)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    return _quantize_k_asymmetric(x, GGMLType.Q5_K, nmax=31, rmin=-0.5, nstep=15)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    f32 = np.float32
    scales, levels = _make_qx_quants(_element_major(x, 16), 32)
    scales = scales.reshape(n, 16)
    max_scale = _first_absmax(scales)
    zero_block = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = np.where(zero_block, f32(0), f32(-128) / max_scale).astype(f32)
    d16 = _to_fp16(np.where(zero_block, f32(0), f32(1) / iscale))
    stored = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # C stores in int8_t
    d = _half_to_float(d16)[:, None] * stored.astype(f32)  # (n, 16)
    levels = _requantize(levels.reshape(n, 16, 16), x.reshape(n, 16, 16), d, -32, 31, offset=32).reshape(n, QK_K)
    out = np.zeros(n, BLOCK_DTYPES[GGMLType.Q6_K])
    out["ql"] = _pack_bitfields(levels & 0xF, 4, 64)
    out["qh"] = _pack_bitfields(levels >> 4, 2, 32)
    out["scales"] = stored
    out["d"] = d16
    out[zero_block] = np.zeros(1, out.dtype)  # C: memset(&y[i], 0, sizeof(block_q6_K))
    return out


_QUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q4_0: _quantize_q4_0,
    GGMLType.Q4_1: _quantize_q4_1,
    GGMLType.Q5_0: _quantize_q5_0,
    GGMLType.Q5_1: _quantize_q5_1,
    GGMLType.Q8_0: _quantize_q8_0,
    GGMLType.Q8_1: _quantize_q8_1,
    GGMLType.Q2_K: _quantize_q2_k,
    GGMLType.Q3_K: _quantize_q3_k,
    GGMLType.Q4_K: _quantize_q4_k,
    GGMLType.Q5_K: _quantize_q5_k,
    GGMLType.Q6_K: _quantize_q6_k,
    GGMLType.Q8_K: _quantize_q8_k,
}


def _quantize_floats(x: np.ndarray, t: GGMLType) -> np.ndarray:
    if t == GGMLType.F32:
        return x.astype("<f4").view(np.uint8)
    if t == GGMLType.F16:
        return _to_fp16(x).astype(_HALF).view(np.uint8)
    # BF16 as ggml_compute_fp32_to_bf16: NaN -> quiet NaN (top half, quiet bit set), else round to nearest even
    bits = x.astype("<f4").view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # wraps only for NaN bit patterns, replaced below
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype("<u2").view(np.uint8)


DEQUANTIZE_TYPES: tuple[GGMLType, ...] = (*_FLOAT_TYPES, *_DEQUANTIZERS)
QUANTIZE_TYPES: tuple[GGMLType, ...] = (*_FLOAT_TYPES, *_QUANTIZERS)


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def _as_bytes(data: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _checked_shape(shape, t: GGMLType) -> tuple[int, ...]:
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(f"{t.name}: shape must have at least one dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"{t.name}: negative dimension in shape {shape}")
    block = BLOCK_LAYOUT[t][0]
    if shape[-1] % block:
        raise ValueError(f"{t.name}: last dimension {shape[-1]} of shape {shape} is not a multiple of the block size "
                         f"{block}")
    return shape


def dequantize(data: np.ndarray | bytes, type: GGMLType | str | int, shape) -> np.ndarray:
    """Raw GGUF bytes of a tensor of `type` -> float32 array of `shape` (numpy order, last dimension contiguous).

    `data` is bytes or a contiguous array whose bytes are read as they are (a uint8 view of a memory-mapped file, or
    e.g. a float32 array for F32). `type` is a GGMLType, its name or its id. Raises ValueError if the type is unknown
    or has no dequantizer, if the last dimension is not a multiple of the block size, or if the byte count does not
    match. NaN and inf in the data or its scales propagate as in llama.cpp's C code.
    """
    t = ggml_type(type)
    if t not in DEQUANTIZE_TYPES:
        raise ValueError(f"dequantize: no dequantizer for {t.name}")
    shape = _checked_shape(shape, t)
    raw = _as_bytes(data)
    block, nbytes = BLOCK_LAYOUT[t]
    n_elements = math.prod(shape)
    expected = n_elements // block * nbytes
    if raw.size != expected:
        raise ValueError(f"dequantize: {t.name} tensor of shape {shape} needs {expected} bytes, got {raw.size}")
    with np.errstate(all="ignore"):  # NaN/inf propagate silently, as in C
        if t in _FLOAT_TYPES:
            return _dequantize_floats(raw, t).reshape(shape)
        blocks = raw.view(BLOCK_DTYPES[t])
        out = np.empty((blocks.size, block), dtype=np.float32)
        step = max(1, _CHUNK_ELEMENTS // block)
        for start in range(0, blocks.size, step):
            out[start:start + step] = _DEQUANTIZERS[t](blocks[start:start + step])
    return out.reshape(shape)


def quantize(array: np.ndarray, type: GGMLType | str | int) -> np.ndarray:
    """float32 array -> raw GGUF bytes of `type`, as uint8 of shape (*array.shape[:-1], bytes per row).

    Follows llama.cpp's reference quantizers (quantize_row_*_ref) without importance weights; other input is first
    converted to float32. F32/F16/BF16 store NaN and inf (F16/BF16 NaN become quiet NaNs, as in ggml; F16 rounds to
    nearest even, overflowing to inf). Block types raise ValueError for NaN or inf input, which llama.cpp does not
    check; finite values too large for an fp16 scale give an infinite scale, as in llama.cpp. Also raises ValueError
    for an unknown type, a 0-d array or a last dimension that is not a multiple of the block size.
    """
    t = ggml_type(type)
    if t not in QUANTIZE_TYPES:
        raise ValueError(f"quantize: no quantizer for {t.name}")
    x = np.asarray(array, dtype=np.float32)
    shape = _checked_shape(x.shape, t)
    x = np.ascontiguousarray(x)
    block, nbytes = BLOCK_LAYOUT[t]
    row_shape = (*shape[:-1], shape[-1] // block * nbytes)
    if t in _FLOAT_TYPES:
        return _quantize_floats(x.reshape(-1), t).reshape(row_shape)
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"quantize to {t.name}: input has {int(bad.sum())} non-finite values (NaN or inf), the "
                         f"first at index {first}")
    blocks = x.reshape(-1, block)
    out = np.empty(blocks.shape[0], dtype=BLOCK_DTYPES[t])
    step = max(1, _CHUNK_ELEMENTS // block)
    with np.errstate(all="ignore"):  # degenerate groups (zero range, zero scale) are masked out explicitly
        for start in range(0, blocks.shape[0], step):
            out[start:start + step] = _QUANTIZERS[t](blocks[start:start + step])
    return out.view(np.uint8).reshape(row_shape)
