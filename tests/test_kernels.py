"""C++ block kernels against numpy oracles: the `gguf` package and our own `realizar.quants`.

What is demanded, for every supported type and every ISA level in `_core.supported_isas()`:
- dequantize: bit for bit (uint32 views) equal to gguf's numpy dequantize and to realizar.quants, on random
  blocks, all-zero blocks, extreme scales, NaN/inf scales and every tensor of the demo model;
- quantize of the activation formats (Q8_0, Q8_1, Q8_K) and of the simple weight formats: bit for bit equal
  to gguf's / realizar.quants' quantizers, and every ISA equal to scalar;
- vec_dot: within a float-rounding bound (see `dot_tolerance`) of a float64 dot product of the dequantized
  weights and the dequantized activations;
- quantize -> dequantize and quantized dot products: within the error thresholds of llama.cpp's
  tests/test-quantize-fns.cpp on its synthetic data;
- where llama.cpp's libggml-base is at hand (the anchor build): every quantizer, the K-quant scale searches
  included, and every dequantizer bit for bit equal to its C reference.
gguf has no Q8_1/Q8_K: those dequantizers are checked against a two-line numpy formula and realizar.quants.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realizar.types import BLOCK_LAYOUT, GGMLType

core = pytest.importorskip("realizar._core", reason="the C++ core is not built (make dev)")

try:
    import gguf
    import gguf.quants
except ImportError:  # the comparisons against gguf skip
    gguf = None

try:
    from realizar import quants as rq
except ImportError:  # the comparisons against our numpy reference skip
    rq = None

ISAS = list(core.supported_isas())
T = GGMLType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
ALL_TYPES = tuple(BLOCK_LAYOUT)
WEIGHT_TYPES = tuple(t for t in ALL_TYPES if t not in (T.Q8_1, T.Q8_K))
ACTIVATION_TYPES = (T.Q8_0, T.Q8_1, T.Q8_K)
# Quantizers whose arithmetic is a fixed formula (no iterative search), bit-exact across implementations.
EXACT_QUANT_TYPES = (T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q8_1, T.Q8_K)
GGUF_QUANT_TYPES = (T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
VEC_DOT_TYPE = {
    T.F32: T.F32, T.F16: T.F32, T.BF16: T.F32,
    T.Q4_0: T.Q8_0, T.Q5_0: T.Q8_0, T.Q8_0: T.Q8_0, T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1,
    T.Q2_K: T.Q8_K, T.Q3_K: T.Q8_K, T.Q4_K: T.Q8_K, T.Q5_K: T.Q8_K, T.Q6_K: T.Q8_K,
}

# Byte offsets of the IEEE-half scale fields in each block (d, m, s, dmin), and of Q8_K's float32 d.
HALF_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q8_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
FLOAT32_FIELDS = {T.Q8_K: (0,)}
# Byte ranges holding quants (not scales) in the types whose dequantized value is scale*q - min: zeroing them
# leaves only the per-element offset (see dot_tolerance).
QUANT_BYTES = {T.Q4_1: [(4, 20)], T.Q5_1: [(4, 24)], T.Q2_K: [(16, 80)], T.Q4_K: [(16, 144)], T.Q5_K: [(16, 176)]}

needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed")
needs_rq = pytest.mark.skipif(rq is None, reason="realizar.quants (numpy reference) is not importable")
quick = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ids(types):
    return [t.name for t in types]


def layout(t: GGMLType) -> tuple[int, int]:
    info = core.type_info(int(t))
    assert (info["block_size"], info["type_size"]) == BLOCK_LAYOUT[t]
    return info["block_size"], info["type_size"]


# ---- oracles -------------------------------------------------------------------------------------------------

def gguf_dequantize(raw: np.ndarray, t: GGMLType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t))), dtype=np.float32).reshape(-1)


def rq_dequantize(raw: np.ndarray, t: GGMLType, n: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(rq.dequantize(raw, t, (n,)), dtype=np.float32).reshape(-1)


def numpy_dequantize_q8(raw: np.ndarray, t: GGMLType) -> np.ndarray:
    """Q8_1 (d half, s half, 32 int8) and Q8_K (d float, 256 int8, 16 int16): y = d * q in float32."""
    bs, ts = BLOCK_LAYOUT[t]
    blocks = raw.reshape(-1, ts)
    if t == T.Q8_1:
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 4:36].copy().view(np.int8).astype(np.float32)
    else:
        d = blocks[:, 0:4].copy().view(np.float32)
        q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    with np.errstate(all="ignore"):
        return (d * q).reshape(-1)


def oracle_dequantize(raw: np.ndarray, t: GGMLType) -> np.ndarray | None:
    if t in (T.Q8_1, T.Q8_K):
        return numpy_dequantize_q8(raw, t)
    return gguf_dequantize(raw, t) if gguf is not None else None


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    a = np.ascontiguousarray(actual, dtype=np.float32).view(np.uint32)
    e = np.ascontiguousarray(expected, dtype=np.float32).view(np.uint32)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bad = np.flatnonzero(a != e)
    if bad.size:
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.size} of {a.size} values differ; first at {i}: "
                             f"{a.view(np.float32)[i]!r} (0x{a[i]:08x}) != {e.view(np.float32)[i]!r} (0x{e[i]:08x})")


def assert_same_bits_nan_aware(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Same NaN positions and identical bits elsewhere. Which NaN payload propagates when two NaNs meet is
    an instruction-order detail, so SIMD levels are held to NaN-ness only at NaN positions."""
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN positions differ"
    assert_same_bits(np.where(nan_a, 0, actual), np.where(nan_e, 0, expected), what)


# ---- block generators ----------------------------------------------------------------------------------------

def make_finite(raw: np.ndarray, t: GGMLType) -> np.ndarray:
    """Rewrite the scale fields (or, for float types, every element) of random bytes to finite values,
    keeping the rest of the random bits: an all-ones exponent loses its top bit."""
    raw = raw.copy()
    if t == T.F32:
        w = raw.view(np.uint32)
        w[(w & 0x7F800000) == 0x7F800000] &= ~np.uint32(0x40000000)
        return raw
    if t in (T.F16, T.BF16):
        w = raw.view(np.uint16)
        mask = np.uint16(0x7C00 if t == T.F16 else 0x7F80)
        w[(w & mask) == mask] &= ~np.uint16(0x4000)
        return raw
    _, ts = BLOCK_LAYOUT[t]
    blocks = raw.reshape(-1, ts)
    for off in HALF_FIELDS.get(t, ()):
        h = blocks[:, off:off + 2].copy().view(np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= ~np.uint16(0x4000)
        blocks[:, off:off + 2] = h.view(np.uint8)
    for off in FLOAT32_FIELDS.get(t, ()):
        f = blocks[:, off:off + 4].copy().view(np.uint32)
        f[(f & 0x7F800000) == 0x7F800000] &= ~np.uint32(0x40000000)
        blocks[:, off:off + 4] = f.view(np.uint8)
    return raw


def set_scale_fields(raw: np.ndarray, t: GGMLType, half_bits: int) -> np.ndarray:
    raw = raw.copy()
    _, ts = BLOCK_LAYOUT[t]
    blocks = raw.reshape(-1, ts)
    for off in HALF_FIELDS.get(t, ()):
        blocks[:, off:off + 2] = np.array([half_bits], dtype=np.uint16).view(np.uint8)
    for off in FLOAT32_FIELDS.get(t, ()):
        f = np.array([half_bits], dtype=np.uint16).view(np.float16).astype(np.float32)
        blocks[:, off:off + 4] = f.view(np.uint8)
    if t in FLOAT_TYPES:
        if t == T.F32:
            raw.view(np.float32)[:] = np.array([half_bits], dtype=np.uint16).view(np.float16).astype(np.float32)[0]
        elif t == T.F16:
            raw.view(np.uint16)[:] = half_bits
        else:
            raw.view(np.uint16)[:] = np.array([half_bits], dtype=np.uint16).view(np.float16).astype(np.float32).view(
                np.uint32)[0] >> 16
    return raw


@st.composite
def raw_blocks(draw, t: GGMLType, max_blocks: int | None = None):
    bs, ts = BLOCK_LAYOUT[t]
    if max_blocks is None:
        max_blocks = 8 if bs > 1 else 4
    nblocks = draw(st.integers(1, max_blocks)) * (64 if bs == 1 else 1)  # float types: 64 elements a step
    data = draw(st.binary(min_size=nblocks * ts, max_size=nblocks * ts))
    return np.frombuffer(data, dtype=np.uint8).copy(), nblocks * bs


def check_dequantize(raw: np.ndarray, t: GGMLType, n: int, *, nan_aware_isas: bool = False) -> np.ndarray:
    """Scalar == every oracle available, bit for bit; every ISA == scalar. Returns the scalar result."""
    scalar = core.dequantize(raw, int(t), n, "scalar")
    assert scalar.dtype == np.float32 and scalar.shape == (n,)
    expected = oracle_dequantize(raw, t)
    if expected is not None:
        # F16 signalling NaNs come out quiet from us (F16C and ggml do that) but stay signalling in numpy's
        # astype: the one place gguf's bits are not ours.
        compare = assert_same_bits_nan_aware if t == T.F16 else assert_same_bits
        compare(scalar, expected, f"{t.name} scalar vs {'numpy' if t in (T.Q8_1, T.Q8_K) else 'gguf'}")
    if rq is not None:
        assert_same_bits(scalar, rq_dequantize(raw, t, n), f"{t.name} scalar vs realizar.quants")
    for isa in ISAS[1:]:
        got = core.dequantize(raw, int(t), n, isa)
        compare = assert_same_bits_nan_aware if nan_aware_isas else assert_same_bits
        compare(got, scalar, f"{t.name} {isa} vs scalar")
    return scalar


# ---- the type table ------------------------------------------------------------------------------------------

def test_type_table_matches_ggml():
    for type_id in range(31):
        if type_id in {int(t) for t in ALL_TYPES}:
            t = T(type_id)
            info = core.type_info(type_id)
            assert info["name"] == t.name
            assert (info["block_size"], info["type_size"]) == BLOCK_LAYOUT[t]
            assert info["is_quantized"] == (t not in FLOAT_TYPES)
            if t in VEC_DOT_TYPE:
                assert T(info["vec_dot_type"]) == VEC_DOT_TYPE[t], t.name
                assert info["can_dot"], t.name
            else:  # pure activation formats
                assert not info["can_dot"], t.name
            assert info["can_quantize"], t.name
        else:
            with pytest.raises(ValueError):
                core.type_info(type_id)


# ---- dequantize ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=ids(ALL_TYPES))
@quick
@given(data=st.data())
def test_dequantize_random_blocks(t, data):
    raw, n = data.draw(raw_blocks(t))
    check_dequantize(make_finite(raw, t), t, n)


@pytest.mark.parametrize("t", ALL_TYPES, ids=ids(ALL_TYPES))
def test_dequantize_many_random_blocks(t):
    """One large draw of blocks per type: scales of every exponent, every quant pattern."""
    bs, ts = layout(t)
    nblocks = 4096 if bs > 1 else 1 << 16
    raw = np.random.default_rng(int(t)).integers(0, 256, size=nblocks * ts, dtype=np.uint8)
    check_dequantize(make_finite(raw, t), t, nblocks * bs)


@pytest.mark.parametrize("t", ALL_TYPES, ids=ids(ALL_TYPES))
def test_dequantize_nonfinite_scales(t):
    """NaN and infinite scales (and NaN/inf elements of float types): no crash, gguf's bits exactly."""
    bs, ts = layout(t)
    nblocks = 512 if bs > 1 else 1 << 14
    rng = np.random.default_rng(100 + int(t))
    raw = rng.integers(0, 256, size=nblocks * ts, dtype=np.uint8)
    blocks = raw.reshape(-1, ts)
    specials = np.array([0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE55, 0x7FFF], dtype=np.uint16)  # inf, -inf, NaNs
    for off in HALF_FIELDS.get(t, ()):
        h = blocks[:, off:off + 2].copy().view(np.uint16).reshape(-1)
        pick = rng.random(nblocks) < 0.5
        h[pick] = rng.choice(specials, size=int(pick.sum()))
        blocks[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    for off in FLOAT32_FIELDS.get(t, ()):
        f = blocks[:, off:off + 4].copy().view(np.uint32).reshape(-1)
        pick = rng.random(nblocks) < 0.5
        f[pick] = rng.choice(np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001], dtype=np.uint32),
                             size=int(pick.sum()))
        blocks[:, off:off + 4] = f.view(np.uint8).reshape(-1, 4)
    if t in FLOAT_TYPES:
        word = np.uint32 if t == T.F32 else np.uint16
        top = {T.F32: 0x7F800000, T.F16: 0x7C00, T.BF16: 0x7F80}[t]
        w = raw.view(word)
        pick = rng.random(w.size) < 0.2
        w[pick] |= word(top)
    out = check_dequantize(raw, t, nblocks * bs, nan_aware_isas=True)
    assert not np.isfinite(out).all()


@pytest.mark.parametrize("t", ALL_TYPES, ids=ids(ALL_TYPES))
def test_dequantize_zero_blocks(t):
    bs, ts = layout(t)
    n = 4 * bs if bs > 1 else 256
    out = check_dequantize(np.zeros(n // bs * ts, dtype=np.uint8), t, n)
    assert np.all(out == 0)


# Largest half, its negative, smallest subnormal, smallest normal, one, negative zero.
EXTREME_HALVES = (0x7BFF, 0xFBFF, 0x0001, 0x0400, 0x3C00, 0x8000)
QUANT_PATTERNS = (0x00, 0xFF, 0x55, 0xAA, 0x0F, 0xF0)


@pytest.mark.parametrize("t", ALL_TYPES, ids=ids(ALL_TYPES))
def test_dequantize_extreme_values(t):
    bs, ts = layout(t)
    nblocks = 2 if bs > 1 else 64
    for pattern in QUANT_PATTERNS:
        for half in EXTREME_HALVES:
            raw = set_scale_fields(np.full(nblocks * ts, pattern, dtype=np.uint8), t, half)
            check_dequantize(raw, t, nblocks * bs)


def model_tensors(path: Path):
    """(name, type, row length, raw bytes) of every tensor of the demo model. Located with our own GGUF reader
    (the gguf package's takes seconds to parse the vocabulary); the values are still checked against gguf."""
    try:
        from realizar import GGUFFile

        for name, tensor in GGUFFile(str(path)).tensors.items():
            yield name, T[tensor.type], int(tensor.shape[-1]), np.asarray(tensor.data).view(np.uint8).reshape(-1)
    except ImportError:
        for tensor in gguf.GGUFReader(str(path)).tensors:
            raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1)
            yield tensor.name, T(int(tensor.tensor_type)), int(tensor.shape[0]), raw  # gguf shape: ne0 first


def check_model(path: Path, max_rows: int | None) -> None:
    checked = 0
    for _name, t, row_elems, raw in model_tensors(path):
        bs, ts = BLOCK_LAYOUT[t]
        rows = raw.reshape(-1, row_elems // bs * ts)
        if max_rows is not None and rows.shape[0] > max_rows:
            rows = np.concatenate([rows[: max_rows - 1], rows[-1:]])
        check_dequantize(np.ascontiguousarray(rows).reshape(-1), t, rows.shape[0] * row_elems)
        checked += 1
    assert checked > 0


@needs_gguf
def test_dequantize_model_tensors_sampled_rows(model_path):
    """Every tensor of the demo model (conftest's model_path: $REALIZAR_TEST_MODEL, the cache, /tmp/models):
    its first rows and its last row."""
    check_model(model_path, max_rows=8)


@needs_gguf
@pytest.mark.slow
def test_dequantize_model_tensors_whole(model_path):
    check_model(model_path, max_rows=None)


# ---- quantize ------------------------------------------------------------------------------------------------

def float_inputs(block: int, nblocks: int | None = None):
    """Float rows of whole `block`s with scales from tiny to large, plus exact zeros and exact ties."""
    @st.composite
    def draw_rows(draw):
        count = nblocks if nblocks is not None else draw(st.integers(1, 6))
        seed = draw(st.integers(0, 2**32 - 1))
        exponent = draw(st.sampled_from([-20, -6, 0, 3, 12]))
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(count * block) * 2.0**exponent).astype(np.float32)
        kind = draw(st.sampled_from(["normal", "zero_block", "one_hot", "ties", "uniform"]))
        head = min(block, 32)
        if kind == "zero_block":
            x[:block] = 0
        elif kind == "one_hot":
            x[:block] = 0
            x[draw(st.integers(0, block - 1))] = -3.5
        elif kind == "ties":
            # amax 127 (or max -127) puts d at 1 (or -1): the k + 0.5 values are exact rounding ties.
            x[:block] = 0
            x[:head] = (rng.integers(-126, 126, size=head) + 0.5).astype(np.float32)
            x[0] = 127.0 if draw(st.booleans()) else -127.0
        elif kind == "uniform":
            x = rng.uniform(-1, 1, size=x.size).astype(np.float32) * np.float32(2.0**exponent)
        return x
    return draw_rows()


def quantize(x: np.ndarray, t: GGMLType, isa: str = "scalar") -> np.ndarray:
    out = core.quantize(np.ascontiguousarray(x, dtype=np.float32), int(t), isa)
    assert out.dtype == np.uint8 and out.size == x.size // BLOCK_LAYOUT[t][0] * BLOCK_LAYOUT[t][1]
    return out


def check_quantize_exact(x: np.ndarray, t: GGMLType) -> None:
    scalar = quantize(x, t)
    if gguf is not None and t in GGUF_QUANT_TYPES:
        expected = np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(t)))).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(scalar, expected, err_msg=f"{t.name} scalar quantize vs gguf")
    if rq is not None:
        expected = np.asarray(rq.quantize(x, t)).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(scalar, expected, err_msg=f"{t.name} scalar quantize vs realizar.quants")
    for isa in ISAS[1:]:
        np.testing.assert_array_equal(quantize(x, t, isa), scalar, err_msg=f"{t.name} {isa} quantize vs scalar")


@pytest.mark.parametrize("t", ACTIVATION_TYPES, ids=ids(ACTIVATION_TYPES))
@quick
@given(data=st.data())
def test_quantize_activation_formats(t, data):
    x = data.draw(float_inputs(BLOCK_LAYOUT[t][0]))
    check_quantize_exact(x, t)
    raw = quantize(x, t)
    blocks = raw.reshape(-1, BLOCK_LAYOUT[t][1])
    # Structural facts the dot products rely on.
    if t == T.Q8_1:  # s = d * sum(q), with the float32 d, rounded to half
        x_blocks = x.reshape(-1, 32)
        amax = np.abs(x_blocks).max(axis=1)
        d32 = (amax / np.float32(127)).astype(np.float32)
        qsum = blocks[:, 4:].copy().view(np.int8).astype(np.int32).sum(axis=1)
        with np.errstate(over="ignore"):  # blocks of huge values: s overflows to inf in half, as in llama.cpp
            s = (qsum.astype(np.float32) * d32).astype(np.float16)
        np.testing.assert_array_equal(blocks[:, 2:4].copy().view(np.float16).reshape(-1).view(np.uint16),
                                      s.view(np.uint16))
    if t == T.Q8_K:  # bsums are the sums of 16 quants
        q = blocks[:, 4:260].copy().view(np.int8).astype(np.int32).reshape(-1, 16, 16).sum(axis=2)
        np.testing.assert_array_equal(blocks[:, 260:292].copy().view(np.int16).astype(np.int32), q)


@pytest.mark.parametrize("t", (T.Q8_0, T.Q8_1), ids=ids((T.Q8_0, T.Q8_1)))
def test_quantize_q8_long_rows_every_isa(t):
    """Rows of 1 to 70 blocks (the AVX-512 quantizers take 16 blocks at a time, then the rest), with block scales
    from subnormal (1 / d overflows: id 0) to huge (s overflows half), zero blocks and exact ties: every ISA gives
    the scalar quantizer's bytes."""
    rng = np.random.default_rng(31 + int(t))
    for nb in list(range(1, 35)) + [47, 48, 49, 64, 70]:
        x = rng.standard_normal(nb * 32).astype(np.float32)
        scales = np.float32(2.0) ** rng.choice([-140, -130, -20, 0, 12, 100], size=nb).astype(np.float32)
        x = (x.reshape(nb, 32) * scales[:, None]).reshape(-1)
        x[32 * rng.integers(0, nb):][:32] = 0
        tie = 32 * int(rng.integers(0, nb))
        x[tie:tie + 32] = rng.integers(-126, 126, size=32) + np.float32(0.5)
        x[tie] = 127.0
        with np.errstate(all="ignore"):  # gguf's reference on the subnormal and huge blocks
            check_quantize_exact(x, t)


def test_quantize_rounding_ties():
    """Q8_0/Q8_1 round halves away from zero (roundf); Q8_K rounds them to even (nearest_int)."""
    x = np.zeros(256, dtype=np.float32)
    x[0] = 127.0
    x[1:6] = [0.5, 1.5, 2.5, -0.5, -2.5]
    q80 = quantize(x, T.Q8_0)[2:34].view(np.int8)
    assert list(q80[:6]) == [127, 1, 2, 3, -1, -3]
    q81 = quantize(x, T.Q8_1)[4:36].view(np.int8)
    assert list(q81[:6]) == [127, 1, 2, 3, -1, -3]
    x[0] = -127.0  # Q8_K maps the largest-magnitude value to -127: d = 1 here
    q8k = quantize(x, T.Q8_K)
    assert q8k[:4].view(np.float32)[0] == 1.0
    assert list(q8k[4:10].view(np.int8)) == [-127, 0, 2, 2, 0, -2]
    for t in ACTIVATION_TYPES:
        check_quantize_exact(x, t)


@pytest.mark.parametrize("t", [t for t in EXACT_QUANT_TYPES if t not in ACTIVATION_TYPES],
                         ids=ids([t for t in EXACT_QUANT_TYPES if t not in ACTIVATION_TYPES]))
@quick
@given(data=st.data())
def test_quantize_simple_weight_formats_exact(t, data):
    check_quantize_exact(data.draw(float_inputs(32)), t)


K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


@needs_rq
@pytest.mark.parametrize("t", K_QUANTS, ids=ids(K_QUANTS))
def test_quantize_k_quants_agree_with_reference(t):
    """The iterative scale searches are not promised bit-identical across implementations (a float32 sum or
    comparison may round differently), but two implementations of the same algorithm must agree on almost
    every block, and where they differ be equally good."""
    x = (np.random.default_rng(21 + int(t)).standard_normal(256 * 256) * 0.03).astype(np.float32)
    ts = BLOCK_LAYOUT[t][1]
    ours = quantize(x, t).reshape(-1, ts)
    ref = np.asarray(rq.quantize(x, t)).view(np.uint8).reshape(-1, ts)
    differ = np.flatnonzero((ours != ref).any(axis=1))
    assert differ.size <= ours.shape[0] // 100, f"{t.name}: {differ.size} of {ours.shape[0]} blocks differ"
    for b in differ:
        xb = x[b * 256:(b + 1) * 256].astype(np.float64)
        err_ours = np.sum((core.dequantize(ours[b], int(t), 256, "scalar") - xb) ** 2)
        err_ref = np.sum((core.dequantize(ref[b], int(t), 256, "scalar") - xb) ** 2)
        assert err_ours <= 1.05 * err_ref + 1e-30, f"{t.name} block {b}: error {err_ours} vs reference {err_ref}"


def find_ggml_base() -> Path | None:
    """llama.cpp's libggml-base (the C reference quantizers), from REALIZAR_GGML_LIB or the anchor environment
    that ../shared/tools/llamacpp-anchor.sh builds in /tmp/anchor."""
    if os.environ.get("REALIZAR_GGML_LIB"):
        return Path(os.environ["REALIZAR_GGML_LIB"])
    found = sorted(Path("/tmp/anchor/venv/lib").glob("python3*/site-packages/llama_cpp/lib/libggml-base.so"))
    return found[0] if found else None


GGML_QUANT_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q8_1, T.Q8_K, *K_QUANTS)


@pytest.mark.parametrize("t", GGML_QUANT_TYPES, ids=ids(GGML_QUANT_TYPES))
def test_quantize_and_dequantize_match_llama_cpp(t):
    """Bit for bit against llama.cpp's own quantize_row_*_ref and dequantize_row_* (when a build is at hand),
    the K-quant scale searches included."""
    import ctypes

    path = find_ggml_base()
    if path is None or not path.is_file():
        pytest.skip("no libggml-base.so (run ../shared/tools/llamacpp-anchor.sh or set REALIZAR_GGML_LIB)")
    lib = ctypes.CDLL(str(path))
    suffix = t.name.lower().replace("_k", "_K")
    bs, ts = BLOCK_LAYOUT[t]
    rng = np.random.default_rng(31 + int(t))
    x = np.concatenate([(rng.standard_normal(256 * 64) * scale).astype(np.float32) for scale in (1e-3, 0.03, 1, 100)])
    x[:256] = 0
    x[256:512] = rng.integers(-126, 126, size=256) + 0.5  # rounding ties
    x[256] = 127
    ref = np.zeros(x.size // bs * ts, dtype=np.uint8)
    getattr(lib, f"quantize_row_{suffix}_ref")(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(ref.ctypes.data),
                                               ctypes.c_int64(x.size))
    if t == T.Q8_K:  # C leaves the bsums of an all-zero block unwritten; ours are zeros
        ref.reshape(-1, ts)[0, 260:] = 0
    np.testing.assert_array_equal(quantize(x, t).reshape(-1, ts), ref.reshape(-1, ts), err_msg=f"{t.name} quantize")
    if t != T.Q8_1:  # ggml has no Q8_1 dequantizer
        y = np.zeros(x.size, dtype=np.float32)
        getattr(lib, f"dequantize_row_{suffix}")(ctypes.c_void_p(ref.ctypes.data), ctypes.c_void_p(y.ctypes.data),
                                                 ctypes.c_int64(x.size))
        assert_same_bits(core.dequantize(ref, int(t), x.size, "scalar"), y, f"{t.name} dequantize vs llama.cpp")


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=ids(WEIGHT_TYPES))
def test_quantize_every_isa_matches_scalar(t):
    x = (np.random.default_rng(7).standard_normal(4096) * 0.05).astype(np.float32)
    scalar = quantize(x, t)
    for isa in ISAS[1:]:
        np.testing.assert_array_equal(quantize(x, t, isa), scalar, err_msg=f"{t.name} {isa}")


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=ids(WEIGHT_TYPES))
def test_quantize_zeros_give_zeros(t):
    bs, _ = layout(t)
    x = np.zeros(2 * max(bs, 256), dtype=np.float32)
    out = core.dequantize(quantize(x, t), int(t), x.size, "scalar")
    assert np.all(out == 0)


# llama.cpp tests/test-quantize-fns.cpp: data 0.1 + 2 cos(i + offset) over 32*128 values; the "total
# quantization error" is sqrt(sum of squared differences) / n (not an RMS) and the dot product error is
# |quantized dot - float dot| / n. Its thresholds:
LLAMA_TEST_SIZE = 32 * 128
MAX_QUANTIZATION_TOTAL_ERROR = 0.002
MAX_QUANTIZATION_TOTAL_ERROR_2BITS = 0.0075  # Q2_K
MAX_QUANTIZATION_TOTAL_ERROR_3BITS = 0.0040  # Q3_K
MAX_DOT_PRODUCT_ERROR = 0.02
MAX_DOT_PRODUCT_ERROR_LOWBIT = 0.04  # Q2_K


def llama_test_data(offset: float) -> np.ndarray:
    i = np.arange(LLAMA_TEST_SIZE, dtype=np.float32)
    return (0.1 + 2 * np.cos(i + np.float32(offset)).astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=ids(WEIGHT_TYPES))
def test_quantize_roundtrip_error_llama_thresholds(t):
    x = llama_test_data(0.0)
    y = core.dequantize(quantize(x, t), int(t), x.size, "scalar")
    err = np.sqrt(np.sum((y.astype(np.float64) - x) ** 2)) / x.size
    limit = {T.Q2_K: MAX_QUANTIZATION_TOTAL_ERROR_2BITS, T.Q3_K: MAX_QUANTIZATION_TOTAL_ERROR_3BITS}.get(
        t, MAX_QUANTIZATION_TOTAL_ERROR)
    assert err < limit, f"{t.name}: total quantization error {err:.6f} >= {limit}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=ids(WEIGHT_TYPES))
def test_vec_dot_error_llama_thresholds(t, isa):
    x1, x2 = llama_test_data(0.0), llama_test_data(1.0)
    at = VEC_DOT_TYPE[t]
    result = core.vec_dot(int(t), quantize(x1, t), quantize(x2, at), x1.size, isa)
    err = abs(result - float(np.dot(x1.astype(np.float64), x2))) / x1.size
    limit = MAX_DOT_PRODUCT_ERROR_LOWBIT if t == T.Q2_K else MAX_DOT_PRODUCT_ERROR
    assert err < limit, f"{t.name} {isa}: dot product error {err:.6f} >= {limit}"


def gaussian_relative_rms(t: GGMLType) -> float:
    x = np.random.default_rng(3).standard_normal(1 << 14).astype(np.float32)
    y = core.dequantize(quantize(x, t), int(t), x.size, "scalar")
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


def test_k_quant_searches_beat_the_legacy_formats():
    """Same bits per weight (plus scale overhead): the searched scales must fit better than absmax scaling."""
    assert gaussian_relative_rms(T.Q4_K) < gaussian_relative_rms(T.Q4_0)
    assert gaussian_relative_rms(T.Q5_K) < gaussian_relative_rms(T.Q5_0)


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=ids(WEIGHT_TYPES))
def test_quantize_roundtrip_gaussian_rms(t):
    """Relative RMS error on Gaussian data stays within what each bit width allows (about 2x the values the
    reference quantizers reach)."""
    rel = gaussian_relative_rms(t)
    limit = {T.F32: 0.0, T.F16: 5e-4, T.BF16: 4e-3, T.Q8_0: 0.012, T.Q6_K: 0.036, T.Q5_0: 0.09,
             T.Q5_1: 0.08, T.Q5_K: 0.075, T.Q4_0: 0.18, T.Q4_1: 0.16, T.Q4_K: 0.15, T.Q3_K: 0.31,
             T.Q2_K: 0.6}[t]
    assert rel <= limit, f"{t.name}: relative RMS {rel:.5f} > {limit}"


# ---- dot products --------------------------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)


def activation_values(raw: np.ndarray, at: GGMLType) -> np.ndarray:
    """Dequantized activations in float64: exactly d * q (F32 as is)."""
    if at == T.F32:
        return raw.view(np.float32).astype(np.float64)
    bs, ts = BLOCK_LAYOUT[at]
    blocks = raw.reshape(-1, ts)
    if at == T.Q8_K:
        d = blocks[:, 0:4].copy().view(np.float32).astype(np.float64)
        q = blocks[:, 4:260].copy().view(np.int8)
    else:
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
        q = blocks[:, 4:].copy().view(np.int8) if at == T.Q8_1 else blocks[:, 2:].copy().view(np.int8)
    return (d * q.astype(np.float64)).reshape(-1)


def dot_tolerance(t: GGMLType, wraw: np.ndarray, w: np.ndarray, araw: np.ndarray, a: np.ndarray) -> float:
    """Bound on |vec_dot - sum(w*a)| for the dequantized weights w and activations a (float64).

    Float rounding: each block's integer sum is exact; scaling it costs a few float32 roundings and the sum
    over blocks one per block, so |error| <= c * eps32 * M with c = n/32 + 16 for the quantized types
    (n/8 + 16 for float types, whose SIMD sums keep 8 float lanes). M is sum |w_i a_i|, except for the types
    with a min (w = scale*q - min) where the kernel sums the scale and min parts separately:
    M = sum (|w_i - off_i| + |off_i|) |a_i|, off_i being the min part (the block dequantized with its quants
    zeroed).
    Q8_1 activations: the Q4_1/Q5_1 kernels use s = half(d32 * sum q), not half(d32) * sum q, for the min
    term, which adds sum_b |m_b| * |s_b - d_b sum(q_b)| exactly.
    """
    n = w.size
    if t in QUANT_BYTES:
        zeroed = wraw.copy().reshape(-1, BLOCK_LAYOUT[t][1])
        for lo, hi in QUANT_BYTES[t]:
            zeroed[:, lo:hi] = 0
        off = core.dequantize(zeroed.reshape(-1), int(t), n, "scalar").astype(np.float64)
        mag = float(np.sum((np.abs(w - off) + np.abs(off)) * np.abs(a)))
    else:
        mag = float(np.sum(np.abs(w * a)))
    c = (n / 8 + 16) if t in FLOAT_TYPES else (n / 32 + 16)
    tol = c * EPS32 * mag
    if VEC_DOT_TYPE[t] == T.Q8_1:
        wb = wraw.reshape(-1, BLOCK_LAYOUT[t][1])
        m = wb[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(-1)
        ab = araw.reshape(-1, 36)
        d = ab[:, 0:2].copy().view(np.float16).astype(np.float64).reshape(-1)
        s = ab[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(-1)
        qsum = ab[:, 4:].copy().view(np.int8).astype(np.float64).sum(axis=1)
        tol += float(np.sum(np.abs(m) * np.abs(s - d * qsum))) * (1 + 1e-6)
    return tol


def check_vec_dot(t: GGMLType, wraw: np.ndarray, x: np.ndarray) -> None:
    n = x.size
    at = VEC_DOT_TYPE[t]
    araw = quantize(x, at)
    w = core.dequantize(wraw, int(t), n, "scalar").astype(np.float64)
    a = activation_values(araw, at)
    ref = float(np.dot(w, a))
    tol = dot_tolerance(t, wraw, w, araw, a)
    for isa in ISAS:
        got = core.vec_dot(int(t), wraw, araw, n, isa)
        assert abs(got - ref) <= tol, f"{t.name} {isa}: vec_dot {got!r} vs float64 {ref!r}, |diff| " \
                                      f"{abs(got - ref):.3e} > bound {tol:.3e}"


DOT_TYPES = tuple(VEC_DOT_TYPE)


@pytest.mark.parametrize("t", DOT_TYPES, ids=ids(DOT_TYPES))
@quick
@given(data=st.data())
def test_vec_dot_random_weight_blocks(t, data):
    raw, n = data.draw(raw_blocks(t, max_blocks=8 if BLOCK_LAYOUT[t][0] == 256 else 4))
    if t in FLOAT_TYPES:
        raw = make_finite(raw, t)
        # Random float bits span 2^±127; keep the products finite.
        w = core.dequantize(raw, int(t), n, "scalar")
        w = np.clip(w, -1e15, 1e15)
        raw = quantize(w, t)
    else:
        raw = make_finite(raw, t)
    check_vec_dot(t, raw, data.draw(float_inputs(n, nblocks=1)))


@pytest.mark.parametrize("t", DOT_TYPES, ids=ids(DOT_TYPES))
def test_vec_dot_quantized_weights(t):
    """Realistic rows: weights from our quantizer, several row lengths, every ISA."""
    rng = np.random.default_rng(11 + int(t))
    for n in (256, 512, 2048, 4096 + 256):
        w = (rng.standard_normal(n) * 0.02).astype(np.float32)
        x = rng.standard_normal(n).astype(np.float32)
        check_vec_dot(t, quantize(w, t), x)


@pytest.mark.parametrize("t", DOT_TYPES, ids=ids(DOT_TYPES))
def test_vec_dot_zero_blocks(t):
    bs, ts = layout(t)
    n = 512
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    araw = quantize(x, VEC_DOT_TYPE[t])
    for isa in ISAS:
        assert core.vec_dot(int(t), np.zeros(n // bs * ts, dtype=np.uint8), araw, n, isa) == 0.0
