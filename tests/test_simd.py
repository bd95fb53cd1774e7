"""SIMD kernels (AVX2, AVX-512) and the tiled, multithreaded matmul against the scalar reference.

For every ISA level in `_core.supported_isas()` (scalar included, where the checks are trivially met):
- dequantize: bit for bit equal to scalar for every type, on quantized data, random bytes (NaN payloads
  aside: any NaN matches any NaN) and block counts that exercise every vector tail;
- quantize: bit for bit equal to scalar for every type with a quantizer, the activation formats Q8_0, Q8_1
  and Q8_K (the SIMD ones) included, on random data and on rounding ties, zeros, tiny and huge values;
- vec_dot: |isa - scalar| <= REL_TOL * sum |w_i a_i| over the dequantized operands (float32 summation in a
  different order is the only difference: every block's integer sum is exact);
- matmul for n in {1, 2, 3, 7, 16, 33, 130}, odd row counts and 1-3 threads: within MATMUL_TOL of a
  float64 numpy product of the dequantized weights and dequantized activations (scaled per output by
  |a| @ |W|.T), and every ISA within REL_TOL of the scalar result. For Q4_1/Q5_1, whose dot products use the
  activation's half-precision s = d * sum(q) rather than the quants, the numpy bound is MIN_TYPES_TOL;
- matmul: a row's results bit for bit the same alone, in any batch and on any number of threads (DESIGN 2.7).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realizar.types import BLOCK_LAYOUT, GGMLType

core = pytest.importorskip("realizar._core", reason="the C++ core is not built (make dev)")

T = GGMLType
ISAS = list(core.supported_isas())
SIMD_ISAS = [isa for isa in ISAS if isa != "scalar"]
ALL_TYPES = tuple(BLOCK_LAYOUT)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
DOT_TYPES = tuple(t for t in ALL_TYPES if core.type_info(int(t))["can_dot"])
QUANT_TYPES = tuple(t for t in ALL_TYPES if core.type_info(int(t))["can_quantize"])
ACTIVATION_TYPES = (T.Q8_0, T.Q8_1, T.Q8_K)
MIN_TYPES = (T.Q4_1, T.Q5_1)

REL_TOL = 1e-5  # float32 sums over at most a few thousand terms, relative to sum |w a|
MATMUL_TOL = 1e-5
MIN_TYPES_TOL = 2e-3  # half-precision s: 2^-11 of the min term, which can reach about twice sum |w a|

FAST = settings(max_examples=25, deadline=None)


def vec_dot_type(t: GGMLType) -> GGMLType:
    return T(core.type_info(int(t))["vec_dot_type"])


def quantize(x: np.ndarray, t: GGMLType, isa: str = "scalar") -> np.ndarray:
    return core.quantize(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), int(t), isa)


def dequantize(raw: np.ndarray, t: GGMLType, n: int, isa: str = "scalar") -> np.ndarray:
    return core.dequantize(raw, int(t), n, isa)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def weights(t: GGMLType, n: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """n elements of type t quantized (scalar) from normal data."""
    return quantize(rng.standard_normal(n).astype(np.float32) * scale, t)


@pytest.fixture
def threads():
    """Sets the default pool's size; restores it afterwards."""
    before = core.threads()
    yield core.set_threads
    core.set_threads(before)


# ---- dequantize ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
@FAST
@given(blocks=st.integers(1, 19), seed=st.integers(0, 2**32 - 1), random_bytes=st.booleans())
def test_dequantize_bit_exact(t, blocks, seed, random_bytes):
    rng = np.random.default_rng(seed)
    bs, ts = BLOCK_LAYOUT[t]
    # float types: a count that leaves every vector tail length (block size 1)
    n = blocks * bs if bs > 1 else blocks * 13
    if random_bytes or t in (T.Q8_1, T.Q8_K):
        raw = rng.integers(0, 256, n // bs * ts, dtype=np.uint8)
    else:
        raw = weights(t, n, rng, scale=float(10.0 ** rng.uniform(-6, 4)))
    ref = dequantize(raw, t, n)
    for isa in SIMD_ISAS:
        got = dequantize(raw, t, n, isa)
        bad = ~same_bits(got, ref)
        assert not bad.any(), f"{t.name} {isa}: {bad.sum()} elements differ, first at {np.argmax(bad)}"


# ---- quantize -------------------------------------------------------------------------------------------------

def special_rows(bs: int) -> list[np.ndarray]:
    """Rows of 8 blocks aimed at the quantizers' edges."""
    n = 8 * max(bs, 32)
    rows = [np.zeros(n), np.full(n, 1e-38), np.full(n, -3e4), np.linspace(-1e4, 1e4, n)]
    # exact rounding ties for the 32-blocks: amax 127 gives d = 1, so x * id lands on .5
    ties = np.resize(np.arange(-63.5, 64.0, 1.0), n)
    ties[:: 32] = 127.0
    rows.append(ties)
    # equal magnitudes with both signs: Q8_K takes the first
    mixed = np.random.default_rng(7).standard_normal(n)
    mixed[5], mixed[9] = -20.0, 20.0
    rows.append(mixed)
    mixed2 = mixed.copy()
    mixed2[5], mixed2[9] = 20.0, -20.0
    rows.append(mixed2)
    # tiny blocks where 1/d overflows, next to normal ones
    tiny = np.random.default_rng(8).standard_normal(n)
    tiny[: n // 2] *= 1e-39
    rows.append(tiny)
    return [r.astype(np.float32) for r in rows]


@pytest.mark.parametrize("t", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_special_values_bit_exact(t):
    bs = BLOCK_LAYOUT[t][0]
    for i, x in enumerate(special_rows(bs)):
        x = x[: len(x) // bs * bs] if bs > 1 else x
        ref = quantize(x, t)
        for isa in SIMD_ISAS:
            np.testing.assert_array_equal(quantize(x, t, isa), ref, err_msg=f"{t.name} {isa} special row {i}")


@pytest.mark.parametrize("t", ACTIVATION_TYPES, ids=lambda t: t.name)
@FAST
@given(blocks=st.integers(1, 17), seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-30, 30))
def test_quantize_activations_bit_exact(t, blocks, seed, log_scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(blocks * BLOCK_LAYOUT[t][0]) * 10.0**log_scale).astype(np.float32)
    ref = quantize(x, t)
    for isa in SIMD_ISAS:
        np.testing.assert_array_equal(quantize(x, t, isa), ref, err_msg=f"{t.name} {isa}")


# ---- vec_dot -------------------------------------------------------------------------------------------------

def dot_case(t: GGMLType, n: int, rng: np.random.Generator):
    """Weight bytes, activation bytes and sum |w a| over the dequantized operands."""
    at = vec_dot_type(t)
    wraw = weights(t, n, rng)
    araw = quantize(rng.standard_normal(n).astype(np.float32) * 3, at)
    w = dequantize(wraw, t, n).astype(np.float64)
    a = dequantize(araw, at, n).astype(np.float64)
    return wraw, araw, float(np.abs(w * a).sum()), float(w @ a)


@pytest.mark.parametrize("t", DOT_TYPES, ids=lambda t: t.name)
@FAST
@given(blocks=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_vec_dot_matches_scalar(t, blocks, seed):
    rng = np.random.default_rng(seed)
    bs = BLOCK_LAYOUT[t][0]
    n = blocks * bs if bs > 1 else blocks * 7  # float types: every tail length
    wraw, araw, mag, exact = dot_case(t, n, rng)
    ref = core.vec_dot(int(t), wraw, araw, n, "scalar")
    for isa in SIMD_ISAS:
        got = core.vec_dot(int(t), wraw, araw, n, isa)
        assert abs(got - ref) <= REL_TOL * mag + 1e-30, f"{t.name} {isa}: {got} vs scalar {ref} (sum|wa| {mag})"
    if t not in MIN_TYPES:
        assert abs(ref - exact) <= REL_TOL * mag + 1e-30


@pytest.mark.parametrize("t", DOT_TYPES, ids=lambda t: t.name)
def test_vec_dot_zero_weights(t):
    n = 512
    bs, ts = BLOCK_LAYOUT[t]
    araw = quantize(np.random.default_rng(1).standard_normal(n), vec_dot_type(t))
    for isa in ISAS:
        assert core.vec_dot(int(t), np.zeros(n // bs * ts, np.uint8), araw, n, isa) == 0.0


# ---- matmul --------------------------------------------------------------------------------------------------

def matmul_case(t: GGMLType, rows: int, k: int, n: int, rng: np.random.Generator):
    wraw = weights(t, rows * k, rng)
    w = dequantize(wraw, t, rows * k).reshape(rows, k).astype(np.float64)
    x = rng.standard_normal((n, k)).astype(np.float32)
    at = vec_dot_type(t)
    a = np.stack([dequantize(quantize(x[i], at), at, k) for i in range(n)]).astype(np.float64)
    return wraw, x, a @ w.T, np.abs(a) @ np.abs(w).T


def check_matmul(t: GGMLType, rows: int, k: int, n: int, rng: np.random.Generator, thread_counts, set_threads):
    wraw, x, exact, scale = matmul_case(t, rows, k, n, rng)
    tol = MIN_TYPES_TOL if t in MIN_TYPES else MATMUL_TOL
    scale = scale + 1e-30
    for nth in thread_counts:
        set_threads(nth)
        results = {}
        for isa in ISAS:
            y = core.matmul(int(t), wraw, rows, k, x, isa)
            assert y.shape == (n, rows)
            err = np.abs(y - exact) / scale
            assert err.max() <= tol, f"{t.name} {isa} rows={rows} n={n} threads={nth}: error {err.max():.3g}"
            results[isa] = y
        for isa in SIMD_ISAS:
            err = np.abs(results[isa] - results["scalar"]) / scale
            assert err.max() <= REL_TOL, f"{t.name} {isa} vs scalar rows={rows} n={n} threads={nth}: {err.max():.3g}"


@pytest.mark.parametrize("t", DOT_TYPES, ids=lambda t: t.name)
def test_matmul_shapes_and_threads(t, threads):
    rng = np.random.default_rng(int(t))
    k = 256 if BLOCK_LAYOUT[t][0] > 1 else 77
    for rows in (1, 5, 13):
        for n in (1, 2, 3, 7, 16, 33, 130):
            check_matmul(t, rows, k, n, rng, (1, 2, 3), threads)


@pytest.mark.parametrize("t", (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F16), ids=lambda t: t.name)
def test_matmul_odd_block_count_and_column_split(t, threads):
    # 7 blocks of 32 (an odd count: AVX-512 pairs blocks) and few rows with many activations, which splits
    # the activations rather than the rows across threads
    rng = np.random.default_rng(3)
    k = 7 * 32 if BLOCK_LAYOUT[t][0] == 32 else 512
    for rows, n in ((3, 130), (37, 9), (2, 64)):
        check_matmul(t, rows, k, n, rng, (2, 3), threads)


@pytest.mark.parametrize("t", DOT_TYPES, ids=lambda t: t.name)
def test_matmul_batch_and_threads_invariant(t, threads):
    """A row's results are bit for bit the same alone, in any batch and on any number of threads. For 32-element
    blocks also with 5, 6 and 7 blocks: tiles that take four blocks per step end on a shorter one."""
    rng = np.random.default_rng(6)
    bs = BLOCK_LAYOUT[t][0]
    ks = (512, 5 * 32, 6 * 32, 7 * 32) if bs == 32 else (512,) if bs > 1 else (203,)
    rows, n = 11, 37
    for k in ks:
        wraw = weights(t, rows * k, rng)
        x = rng.standard_normal((n, k)).astype(np.float32)
        for isa in ISAS:
            threads(1)
            full = core.matmul(int(t), wraw, rows, k, x, isa)
            for i in (0, 5, 36):
                np.testing.assert_array_equal(core.matmul(int(t), wraw, rows, k, x[i : i + 1], isa)[0], full[i])
            np.testing.assert_array_equal(core.matmul(int(t), wraw, rows, k, x[3:10], isa), full[3:10])
            threads(3)
            np.testing.assert_array_equal(core.matmul(int(t), wraw, rows, k, x, isa), full,
                                          err_msg=f"{t.name} {isa} k={k}")


# ---- packed weights (packed.h): 8 rows interleaved, the model's SIMD products --------------------------------

PACKED_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K)
needs_packing = pytest.mark.skipif(not SIMD_ISAS, reason="packed kernels need AVX2")


def packed_reference(t: GGMLType, wraw: np.ndarray, rows: int, k: int) -> np.ndarray:
    """packed.h's layout built in numpy: per group of 8 rows and block, the 8 scales (and mins, or fifth bits),
    then chunk j of 32 bytes = quant bytes [4j, 4j + 4) of each row in turn."""
    bs, ts = BLOCK_LAYOUT[t]
    head = {T.Q4_1: 4, T.Q5_0: 6, T.Q4_K: 16}.get(t, 2)  # d and m, d and qh, d dmin and scales, or d
    blocks = wraw.reshape(rows // 8, 8, k // bs, ts).transpose(0, 2, 1, 3)  # group, block, row, bytes
    if t == T.Q4_K:  # d[8], dmin[8], sc[sub-block][row], m[pair][row][2], qs[pair][chunk][row * 4 + i]
        q = blocks[..., 4:16].astype(np.int64)
        sc = np.stack([q[..., j] & 63 if j < 4 else (q[..., j + 4] & 15) | ((q[..., j - 4] >> 6) << 4)
                       for j in range(8)], axis=-2)  # group, block, sub-block, row
        mn = np.stack([q[..., j + 4] & 63 if j < 4 else (q[..., j + 4] >> 4) | ((q[..., j] >> 6) << 4)
                       for j in range(8)], axis=-1)  # group, block, row, sub-block
        mn = mn.reshape(mn.shape[:3] + (4, 2)).transpose(0, 1, 3, 2, 4)  # group, block, pair, row, 2
        G, B = rows // 8, k // bs
        scales = np.concatenate([blocks[..., :2].reshape(G, B, 16), blocks[..., 2:4].reshape(G, B, 16),
                                 sc.reshape(G, B, 64).astype(np.uint8), mn.reshape(G, B, 64).astype(np.uint8)], axis=2)
    elif t == T.Q5_0:  # the 8 rows' d, then per row and i < 4 a byte whose bit h is NOT element e(h, i)'s fifth bit
        qh = blocks[..., 2:6].copy().view("<u4")[..., 0]  # group, block, row
        nq = np.zeros(qh.shape + (4,), np.uint8)
        for i in range(4):
            for h in range(8):
                clear = ((qh >> (16 * (h % 2) + 4 * (h // 2) + i)) & 1) ^ 1
                nq[..., i] |= (clear << h).astype(np.uint8)
        scales = np.concatenate([blocks[..., :2].reshape(rows // 8, k // bs, 16),
                                 nq.reshape(rows // 8, k // bs, 32)], axis=2)
    else:  # the 8 rows' d (then the 8 rows' m)
        scales = blocks[..., :head].reshape(rows // 8, k // bs, 8, head // 2, 2).transpose(0, 1, 3, 2, 4)
        scales = scales.reshape(rows // 8, k // bs, 8 * head)
    qs = blocks[..., head:]
    chunks = qs.reshape(rows // 8, k // bs, 8, -1, 4).transpose(0, 1, 3, 2, 4).reshape(rows // 8, k // bs, -1)
    return np.concatenate([scales, chunks], axis=2).reshape(-1)


@needs_packing
@pytest.mark.parametrize("t", PACKED_TYPES, ids=lambda t: t.name)
def test_pack_weights_layout(t):
    rng = np.random.default_rng(11)
    for rows, k in ((8, 256), (16, 512), (40, 1536)) if t == T.Q4_K else ((8, 32), (16, 96), (40, 576)):
        wraw = weights(t, rows * k, rng)
        packed = core.pack_weights(int(t), wraw, rows, k)
        np.testing.assert_array_equal(packed, packed_reference(t, wraw, rows, k))


def test_packable_only_where_a_layout_exists():
    assert not core.packable(int(T.Q4_1), 12, 64)  # rows not a multiple of 8
    assert not core.packable(int(T.Q6_K), 16, 256)  # no packed layout
    assert not core.packable(int(T.Q4_K), 16, 96)  # k not a multiple of its 256-element block
    assert not core.packable(int(T.F32), 16, 64)
    with pytest.raises(ValueError, match="no packed layout"):
        core.pack_weights(int(T.Q4_1), weights(T.Q4_1, 12 * 64, np.random.default_rng(0)), 12, 64)
    with pytest.raises(ValueError, match="bytes"):
        core.pack_weights(int(T.Q4_1), np.zeros(7, np.uint8), 8, 32)
    if SIMD_ISAS:
        with pytest.raises(ValueError, match="packed copy's 160 bytes"):
            core.matmul(int(T.Q4_1), np.zeros(7, np.uint8), 8, 32, np.zeros((1, 32), np.float32), packed=True)
    if SIMD_ISAS:
        assert core.packable(int(T.Q4_1), 16, 64) and core.packable(int(T.Q8_0), 8, 32)


@needs_packing
@pytest.mark.parametrize("t", PACKED_TYPES, ids=lambda t: t.name)
def test_packed_matmul_matches_reference(t, threads):
    """Within MATMUL_TOL of numpy's product of the dequantized operands (MIN_TYPES_TOL for Q4_1) and of the
    unpacked tiles, for odd group counts (the kernels take two or four groups per pass), odd batches and 1-3
    threads; at every SIMD level the very same bits (the AVX-512 tiles' integer sums are the AVX2 ones')."""
    rng = np.random.default_rng(12)
    tol = MIN_TYPES_TOL if t in MIN_TYPES else MATMUL_TOL
    for rows, k in ((8, 256), (24, 3 * 256), (40, 1536)) if t == T.Q4_K else ((8, 32), (24, 7 * 32), (40, 576)):
        for n in (1, 2, 3, 5, 7, 16, 33):
            wraw, x, exact, scale = matmul_case(t, rows, k, n, rng)
            packed = core.pack_weights(int(t), wraw, rows, k)
            for nth in (1, 2, 3):
                threads(nth)
                y = core.matmul(int(t), packed, rows, k, x, SIMD_ISAS[0], packed=True)
                assert y.shape == (n, rows)
                err = np.abs(y - exact) / (scale + 1e-30)
                assert err.max() <= tol, f"{t.name} rows={rows} k={k} n={n} threads={nth}: {err.max():.3g}"
                unpacked = core.matmul(int(t), wraw, rows, k, x, SIMD_ISAS[0])
                assert (np.abs(y - unpacked) / (scale + 1e-30)).max() <= REL_TOL
                for isa in SIMD_ISAS[1:]:
                    np.testing.assert_array_equal(same_bits(core.matmul(int(t), packed, rows, k, x, isa, packed=True), y),
                                                  True, err_msg=f"{t.name} {isa} rows={rows} k={k} n={n} threads={nth}")


def test_packed_matmul_needs_simd():
    wraw = weights(T.Q8_0, 8 * 32, np.random.default_rng(5))
    packed = core.pack_weights(int(T.Q8_0), wraw, 8, 32) if SIMD_ISAS else None
    if packed is not None:
        with pytest.raises(ValueError, match="isa: packed products need avx2 or avx512"):
            core.matmul(int(T.Q8_0), packed, 8, 32, np.zeros((1, 32), np.float32), "scalar", packed=True)


@needs_packing
@pytest.mark.parametrize("t", PACKED_TYPES, ids=lambda t: t.name)
def test_packed_matmul_batch_and_threads_invariant(t, threads):
    """Bit for bit alone, in any batch and on any number of threads, at each SIMD level: the model relies on it
    for batched decoding."""
    rng = np.random.default_rng(13)
    rows, k, n = 24, 5 * BLOCK_LAYOUT[t][0], 37
    packed = core.pack_weights(int(t), weights(t, rows * k, rng), rows, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    for isa in SIMD_ISAS:
        threads(1)
        full = core.matmul(int(t), packed, rows, k, x, isa, packed=True)
        for i in (0, 5, 36):
            np.testing.assert_array_equal(core.matmul(int(t), packed, rows, k, x[i : i + 1], isa, packed=True)[0], full[i])
        np.testing.assert_array_equal(core.matmul(int(t), packed, rows, k, x[3:10], isa, packed=True), full[3:10])
        for nth in (2, 3):
            threads(nth)
            np.testing.assert_array_equal(core.matmul(int(t), packed, rows, k, x, isa, packed=True), full)


@needs_packing
def test_packed_matmul_extreme_activations():
    """The int16 partial sums of Q4_1 (16 products of up to 15 x 127 per lane) and the widened Q8_0 ones stay
    exact at the largest quants: weights at their maximum quant (one zero per block sets Q4_1's range), activations
    at +127 (row 0) and alternating +-127 (row 1)."""
    rows, k = 8, 256
    x = np.ones((2, k), np.float32)
    x[1, 1::2] = -1.0
    w = np.ones(rows * k, np.float32)
    w[::32] = 0.0
    for t in PACKED_TYPES:
        wraw = quantize(w, t)
        _, _, exact, scale = matmul_case_from(t, wraw, x, rows, k)
        tol = MIN_TYPES_TOL if t in MIN_TYPES else MATMUL_TOL
        for isa in SIMD_ISAS:
            y = core.matmul(int(t), core.pack_weights(int(t), wraw, rows, k), rows, k, x, isa, packed=True)
            assert (np.abs(y - exact) / (scale + 1e-30)).max() <= tol, f"{t.name} {isa}"


def matmul_case_from(t: GGMLType, wraw: np.ndarray, x: np.ndarray, rows: int, k: int):
    w = dequantize(wraw, t, rows * k).reshape(rows, k).astype(np.float64)
    at = vec_dot_type(t)
    a = np.stack([dequantize(quantize(x[i], at), at, k) for i in range(len(x))]).astype(np.float64)
    return wraw, x, a @ w.T, np.abs(a) @ np.abs(w).T


def test_matmul_empty_batch():
    wraw = weights(T.Q8_0, 9 * 64, np.random.default_rng(4))
    for isa in ISAS:
        assert core.matmul(int(T.Q8_0), wraw, 9, 64, np.zeros((0, 64), np.float32), isa).shape == (0, 9)


@pytest.mark.slow
@pytest.mark.parametrize("t", DOT_TYPES, ids=lambda t: t.name)
def test_matmul_large(t, threads):
    rng = np.random.default_rng(5)
    k = 4096 if BLOCK_LAYOUT[t][0] > 1 else 1000
    for rows, n in ((257, 1), (129, 130), (64, 512)):
        check_matmul(t, rows, k, n, rng, (1, 2), threads)


# ---- argmax (the forward step's greedy pick) ------------------------------------------------------------------

SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, np.float32(3.4e38)]


@pytest.mark.parametrize("isa", ISAS)
@FAST
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), n_special=st.integers(0, 4),
       ties=st.booleans())
def test_argmax_is_numpys(isa, n, seed, n_special, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    if ties:  # few distinct values: the largest one appears many times
        x = np.round(x).astype(np.float32)
    for _ in range(n_special):
        x[rng.integers(n)] = SPECIALS[rng.integers(len(SPECIALS))]
    assert core.argmax(x, isa) == int(np.argmax(x))


@pytest.mark.parametrize("isa", ISAS)
def test_argmax_edges(isa):
    for x in ([-np.inf] * 20, [0.0] * 9, [-0.0, 0.0], [1.0] * 16 + [np.nan], [np.nan, np.nan, 2.0], [5.0]):
        x = np.array(x, np.float32)
        assert core.argmax(x, isa) == int(np.argmax(x)), x
    x = np.zeros(49155, np.float32)  # 6144 vectors of 8 and a tail of 3
    for i in (0, 7, 8, 49151, 49152, 49154):  # the first and last element of a vector, and the tail
        y = x.copy()
        y[i] = 1.0
        assert core.argmax(y, isa) == i
        y[i + 1 if i < 49154 else 0] = np.nan
        assert core.argmax(y, isa) == int(np.argmax(y))
    with pytest.raises(ValueError, match="empty"):
        core.argmax(np.zeros(0, np.float32), isa)
