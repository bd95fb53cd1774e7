"""realizar.quants, the numpy specification of the GGUF block formats, against the `gguf` package and llama.cpp.

Dequantizing must be bit-exact with gguf.quants.dequantize for every type it supports (compared as uint32 so NaNs
compare too); quantizing must be bit-exact with gguf.quants.quantize where it has a quantizer, and within llama.cpp's
error bounds (tests/test-quantize-fns.cpp) everywhere.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from realizar import quants
from realizar.quants import BLOCK_DTYPES, DEQUANTIZE_TYPES, QUANTIZE_TYPES, dequantize, quantize
from realizar.types import BLOCK_LAYOUT, QK_K, GGMLType

MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
BLOCK_TYPES = tuple(t for t in BLOCK_LAYOUT if t not in FLOAT_TYPES)
K_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)

HYPOTHESIS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _model_path() -> Path | None:
    """$REALIZAR_TEST_MODEL, else $REALIZAR_HOME/models (default ~/.cache/realizar/models), else /tmp/models."""
    env = os.environ.get("REALIZAR_TEST_MODEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    home = Path(os.environ.get("REALIZAR_HOME") or Path.home() / ".cache" / "realizar")
    for folder in (home / "models", Path("/tmp/models")):
        if (folder / MODEL_FILENAME).is_file():
            return folder / MODEL_FILENAME
    return None


def _gguf_type(t: GGMLType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[t.name]


def _gguf_can(operation, t: GGMLType) -> bool:
    """Whether this gguf version implements `operation` (quants.quantize or quants.dequantize) for t."""
    block, nbytes = BLOCK_LAYOUT[t]
    try:
        if operation is gguf.quants.quantize:
            operation(np.zeros((1, block), np.float32), _gguf_type(t))
        else:
            operation(np.zeros((1, nbytes), np.uint8), _gguf_type(t))
    except NotImplementedError:
        return False
    return True


GGUF_DEQUANTIZES = tuple(t for t in DEQUANTIZE_TYPES if _gguf_can(gguf.quants.dequantize, t))
GGUF_QUANTIZES = tuple(t for t in QUANTIZE_TYPES if _gguf_can(gguf.quants.quantize, t))


def _gguf_dequantize(raw: np.ndarray, t: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)
    return np.asarray(gguf.quants.dequantize(rows, _gguf_type(t)), dtype=np.float32).reshape(shape)


def _gguf_quantize(x: np.ndarray, t: GGMLType) -> np.ndarray:
    with np.errstate(over="ignore"):  # scales beyond the fp16 range become inf, as they do in C
        return np.ascontiguousarray(gguf.quants.quantize(x, _gguf_type(t))).view(np.uint8).reshape(-1)


def _assert_quantize_matches_gguf(x: np.ndarray, t: GGMLType) -> None:
    block, nbytes = BLOCK_LAYOUT[t]
    ours = quantize(x, t).reshape(-1, nbytes).copy()
    ref = _gguf_quantize(x, t).reshape(-1, nbytes).copy()
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):
        # Known disagreement: llama.cpp keeps the first of equal minima (`if (v < min) min = v`), gguf's np.min may
        # return -0.0 where +0.0 came first. Where a block's min is zero, m's sign bit (bit 7 of byte 3) is ignored
        # here (dequantized values cannot differ: d*q >= 0 and +0 + -0 = +0); test_q4_1_min_keeps_the_first_zero
        # checks the C rule.
        zero_min = x.reshape(-1, block).min(axis=1) == 0
        ours[zero_min, 3] &= 0x7F
        ref[zero_min, 3] &= 0x7F
    _assert_same_bits(ours, ref, t.name)


def _assert_same_bits(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    a, b = np.asarray(ours).reshape(-1), np.asarray(ref).reshape(-1)
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    if a.dtype == np.float32:
        a, b = a.view(np.uint32), b.view(np.uint32)
    bad = np.nonzero(a != b)[0]
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} differ, first at {bad[0]}: "
                           f"{a[bad[0]]:#x} vs {b[bad[0]]:#x}")


# ---------------------------------------------------------------------------------------------------------------------
# Random raw blocks


def _finite_halves(bits: np.ndarray) -> np.ndarray:
    """uint16 bit patterns with inf/NaN turned into finite halves of the same sign (exponent 31 -> 30)."""
    return np.where((bits & 0x7C00) == 0x7C00, bits & 0xFBFF, bits).astype(np.uint16)


def _random_raw(rng: np.random.Generator, t: GGMLType, n_blocks: int, finite_scales: bool = True) -> np.ndarray:
    """n_blocks random blocks of t as bytes; the fp16/fp32 scale fields are finite unless finite_scales is False."""
    nbytes = BLOCK_LAYOUT[t][1]
    raw = rng.integers(0, 256, n_blocks * nbytes, dtype=np.uint8)
    if not finite_scales:
        return raw
    if t == GGMLType.F16:
        raw.view(np.uint16)[:] = _finite_halves(raw.view(np.uint16))
    elif t in BLOCK_DTYPES:
        blocks = raw.view(BLOCK_DTYPES[t])
        for name in blocks.dtype.names:
            field = blocks[name]
            if field.dtype == np.float16:
                blocks[name] = _finite_halves(field.view(np.uint16)).view(np.float16)
            elif field.dtype == np.float32:
                blocks[name] = rng.standard_normal(n_blocks).astype(np.float32) * np.float32(1e-2)
    return raw


def _scale_fields(t: GGMLType) -> list[str]:
    return [name for name in BLOCK_DTYPES[t].names if BLOCK_DTYPES[t][name].kind == "f"]


# ---------------------------------------------------------------------------------------------------------------------
# Dequantize vs gguf


def test_block_structs_have_ggml_sizes():
    for t, dtype in BLOCK_DTYPES.items():
        assert dtype.itemsize == BLOCK_LAYOUT[t][1], t.name
    assert set(DEQUANTIZE_TYPES) == set(BLOCK_LAYOUT)
    assert {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_K, GGMLType.Q2_K, GGMLType.Q3_K} <= set(QUANTIZE_TYPES)


def test_gguf_oracle_covers_the_weight_types():
    expected = {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
                GGMLType.Q5_1, GGMLType.Q8_0, *K_TYPES}
    assert expected <= set(GGUF_DEQUANTIZES)


@pytest.mark.parametrize("t", GGUF_DEQUANTIZES, ids=lambda t: t.name)
@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3), blocks_per_row=st.integers(1, 4))
def test_dequantize_random_blocks_match_gguf(t, seed, rows, blocks_per_row):
    block = BLOCK_LAYOUT[t][0]
    per_row = blocks_per_row * (64 if block == 1 else 1)
    raw = _random_raw(np.random.default_rng(seed), t, rows * per_row)
    shape = (rows, per_row * block)
    ours = dequantize(raw, t, shape)
    assert ours.shape == shape and ours.dtype == np.float32
    _assert_same_bits(ours, _gguf_dequantize(raw, t, shape), t.name)


@pytest.mark.parametrize("t", [t for t in GGUF_DEQUANTIZES if t != GGMLType.F16], ids=lambda t: t.name)
def test_dequantize_nonfinite_scales_propagate_like_gguf(t):
    rng = np.random.default_rng(7)
    raw = _random_raw(rng, t, 64, finite_scales=False)
    if t in BLOCK_DTYPES:
        blocks = raw.view(BLOCK_DTYPES[t])
        specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32)
        for name in _scale_fields(t):  # every special value in every scale field, over the 64 blocks
            blocks[name] = specials[rng.integers(0, specials.size, blocks.size)].astype(blocks[name].dtype)
        blocks[::5]["d"] = np.array([0x7C01], np.uint16).view(np.float16)[0].astype(blocks["d"].dtype)  # sNaN
    shape = (2, raw.size // BLOCK_LAYOUT[t][1] * BLOCK_LAYOUT[t][0] // 2)
    with np.errstate(all="ignore"):
        ref = _gguf_dequantize(raw, t, shape)
    _assert_same_bits(dequantize(raw, t, shape), ref, t.name)


def test_dequantize_f16_quiets_signalling_nans_like_f16c():
    halves = np.array([0x7C01, 0xFC01, 0x7D00, 0x7E00, 0x7C00, 0xFC00, 0x3C00, 0x0001, 0x8000], dtype=np.uint16)
    ours = dequantize(halves.view(np.uint8), "F16", (halves.size,)).view(np.uint32)
    expected = [0x7FC02000, 0xFFC02000, 0x7FE00000, 0x7FC00000, 0x7F800000, 0xFF800000, 0x3F800000,
                0x33800000, 0x80000000]
    assert [hex(v) for v in ours] == [hex(v) for v in expected]
    # everywhere else F16 is gguf's (numpy's) conversion
    raw = np.random.default_rng(3).integers(0, 65536, 4096, dtype=np.uint16)
    signalling = ((raw & 0x7C00) == 0x7C00) & ((raw & 0x03FF) != 0) & ((raw & 0x0200) == 0)
    ref = _gguf_dequantize(raw.view(np.uint8), GGMLType.F16, (4096,)).view(np.uint32)
    ours = dequantize(raw.view(np.uint8), GGMLType.F16, (4096,)).view(np.uint32)
    assert signalling.any()
    _assert_same_bits(ours[~signalling], ref[~signalling], "F16")
    assert np.array_equal(ours[signalling], ref[signalling] | 0x00400000)


@pytest.mark.parametrize("t", GGUF_DEQUANTIZES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x80, 0x7F])
def test_dequantize_constant_bytes_match_gguf(t, fill):
    block, nbytes = BLOCK_LAYOUT[t]
    n_blocks = 8 if block > 1 else 256
    raw = np.full(n_blocks * nbytes, fill, dtype=np.uint8)
    shape = (n_blocks * block,)
    with np.errstate(all="ignore"):
        ref = _gguf_dequantize(raw, t, shape)
    ours = dequantize(raw, t, shape)
    _assert_same_bits(ours, ref, f"{t.name} filled with {fill:#x}")
    if fill == 0:
        assert not ours.any()


# largest half, its negative, smallest subnormal, smallest normal, -0, 1.0, a value whose products round
EXTREME_HALVES = [0x7BFF, 0xFBFF, 0x0001, 0x0400, 0x8000, 0x3C00, 0x3555]


@pytest.mark.parametrize("t", [t for t in GGUF_DEQUANTIZES if t in BLOCK_DTYPES], ids=lambda t: t.name)
@pytest.mark.parametrize("half", EXTREME_HALVES, ids=hex)
def test_dequantize_extreme_scales_match_gguf(t, half):
    raw = _random_raw(np.random.default_rng(half), t, 16)
    blocks = raw.view(BLOCK_DTYPES[t])
    for name in _scale_fields(t):
        blocks[name] = np.array([half], np.uint16).view(np.float16)[0]
    shape = (16 * BLOCK_LAYOUT[t][0],)
    _assert_same_bits(dequantize(raw, t, shape), _gguf_dequantize(raw, t, shape), f"{t.name} scale {half:#x}")


@pytest.mark.parametrize("t", GGUF_DEQUANTIZES, ids=lambda t: t.name)
def test_dequantize_in_small_chunks_is_the_same(t, monkeypatch):
    raw = _random_raw(np.random.default_rng(11), t, 40)
    shape = (40 * BLOCK_LAYOUT[t][0],)
    whole = dequantize(raw, t, shape)
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 3 * BLOCK_LAYOUT[t][0])
    _assert_same_bits(dequantize(raw, t, shape), whole, t.name)


def test_dequantize_accepts_bytes_views_and_names():
    raw = _random_raw(np.random.default_rng(5), GGMLType.Q4_K, 4)
    expected = dequantize(raw, GGMLType.Q4_K, (2, 512))
    for data in (raw.tobytes(), bytearray(raw.tobytes()), memoryview(raw.tobytes()), raw.reshape(2, -1)):
        for t in ("Q4_K", "q4_k", 12, GGMLType.Q4_K):
            _assert_same_bits(dequantize(data, t, (2, 512)), expected, f"{type(data).__name__} {t!r}")
    assert dequantize(raw, "Q4_K", 1024).shape == (1024,)
    f32 = np.arange(6, dtype=np.float32)
    _assert_same_bits(dequantize(f32, "F32", (2, 3)), f32.reshape(2, 3), "F32 array")


def test_dequantize_q8_k_and_q8_1_are_d_times_q():
    rng = np.random.default_rng(2)
    raw = _random_raw(rng, GGMLType.Q8_K, 3)
    blocks = raw.view(BLOCK_DTYPES[GGMLType.Q8_K])
    expected = blocks["d"][:, None] * blocks["qs"].astype(np.float32)
    _assert_same_bits(dequantize(raw, "Q8_K", (3 * QK_K,)), expected, "Q8_K")
    raw = _random_raw(rng, GGMLType.Q8_1, 3)
    blocks = raw.view(BLOCK_DTYPES[GGMLType.Q8_1])
    expected = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    _assert_same_bits(dequantize(raw, "Q8_1", (96,)), expected, "Q8_1")


@pytest.mark.parametrize(("t", "nbytes", "shape", "message"), [
    ("Q4_0", 17, (32,), "needs 18 bytes, got 17"),
    ("Q4_0", 36, (32,), "needs 18 bytes, got 36"),
    ("Q4_K", 144, (2, 128), "last dimension 128"),
    ("F32", 8, (3,), "needs 12 bytes, got 8"),
    ("Q8_0", 34, (), "at least one dimension"),
    ("Q8_0", 34, (-32,), "negative"),
    ("Q9_9", 34, (32,), "unknown tensor type"),
])
def test_dequantize_rejects_bad_sizes(t, nbytes, shape, message):
    with pytest.raises(ValueError, match=message):
        dequantize(np.zeros(nbytes, np.uint8), t, shape)


# ---------------------------------------------------------------------------------------------------------------------
# The real model file


@pytest.fixture(scope="module")
def model_tensors():
    """The model's tensors as gguf.GGUFReader sees them (the reader alone takes seconds: it parses the vocabulary)."""
    path = _model_path()
    if path is None:
        pytest.skip(f"{MODEL_FILENAME} not found (set REALIZAR_TEST_MODEL or run `realizar pull smollm2-135m`)")
    return gguf.GGUFReader(path).tensors


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists ne0 (contiguous) first


@pytest.mark.slow
def test_model_tensors_match_gguf_first_rows(model_tensors):
    """Every tensor type in the model, on the first rows of each of its first few tensors."""
    seen: dict[str, int] = {}
    for tensor in model_tensors:
        name = tensor.tensor_type.name
        if seen.get(name, 0) >= 3:
            continue
        seen[name] = seen.get(name, 0) + 1
        shape = _numpy_shape(tensor)
        data = tensor.data.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)[:64]
        rows = (data.shape[0], shape[-1])
        ours = dequantize(data, name, rows)
        ref = np.asarray(gguf.quants.dequantize(data, tensor.tensor_type), np.float32).reshape(rows)
        _assert_same_bits(ours, ref, tensor.name)
    assert {"Q4_1", "Q8_0", "F32"} <= set(seen)


@pytest.mark.slow
def test_model_file_matches_gguf_tensor_by_tensor(model_tensors):
    for tensor in model_tensors:
        shape = _numpy_shape(tensor)
        ref = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
        _assert_same_bits(dequantize(tensor.data, tensor.tensor_type.name, shape), ref, tensor.name)


@pytest.mark.slow
def test_model_file_dequantizes_in_a_few_seconds(model_tensors):
    start = time.perf_counter()
    total = sum(dequantize(t.data, t.tensor_type.name, _numpy_shape(t)).size for t in model_tensors)
    elapsed = time.perf_counter() - start
    assert total > 100_000_000
    assert elapsed < 10, f"{total} elements took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------------------------------
# Quantize vs gguf and llama.cpp's facts


def _block_values() -> st.SearchStrategy[float]:
    """Finite float32 values whose blocks have an invertible scale: zeros (both signs), or 1e-20 <= |x| <= 1e20,
    with small integers and halves so that ties of the rounding rules come up."""
    magnitude = st.floats(float(np.float32(1e-20)), float(np.float32(1e20)), width=32)
    return st.one_of(
        st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 7.0, -8.0, 127.0, -127.0]),
        st.integers(-300, 300).map(float),
        st.floats(-10, 10, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-20),
        magnitude,
        magnitude.map(lambda v: -v),
    )


@st.composite
def _quantize_inputs(draw, block: int) -> np.ndarray:
    shape = (draw(st.integers(1, 2)), block * draw(st.integers(1, 3)))
    return draw(hnp.arrays(np.float32, shape, elements=_block_values()))


GGUF_BLOCK_QUANTIZES = tuple(t for t in GGUF_QUANTIZES if t not in FLOAT_TYPES)


@pytest.mark.parametrize("t", GGUF_BLOCK_QUANTIZES, ids=lambda t: t.name)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_quantize_matches_gguf(t, data):
    x = data.draw(_quantize_inputs(BLOCK_LAYOUT[t][0]))
    ours = quantize(x, t)
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], x.shape[1] // BLOCK_LAYOUT[t][0] * BLOCK_LAYOUT[t][1])
    _assert_quantize_matches_gguf(x, t)


def _varied_blocks(rng: np.random.Generator, n_blocks: int, block: int) -> np.ndarray:
    """(n_blocks, block) float32: normal data at scales from 1e-6 to 1e6, ties, repeated values, one-sided blocks,
    sparse blocks, all-zero blocks and blocks whose signed max appears with both signs."""
    x = rng.standard_normal((n_blocks, block)) * 10.0 ** rng.integers(-6, 7, (n_blocks, 1))
    kind = rng.integers(0, 7, n_blocks)
    x[kind == 1] = np.round(x[kind == 1] * 4) / 4  # quarter steps: many exact halves after scaling
    x[kind == 2] = np.abs(x[kind == 2])
    x[kind == 3] *= rng.random((int((kind == 3).sum()), block)) < 0.1
    x[kind == 4] = 0.0
    x[kind == 5, 1] = -x[kind == 5, 0]
    x[kind == 6] = x[kind == 6, :1]
    return x.astype(np.float32)


@pytest.mark.parametrize("t", GGUF_BLOCK_QUANTIZES, ids=lambda t: t.name)
def test_quantize_many_varied_blocks_match_gguf(t):
    _assert_quantize_matches_gguf(_varied_blocks(np.random.default_rng(int(t)), 4096, BLOCK_LAYOUT[t][0]), t)


@pytest.mark.parametrize("t", [GGMLType.Q4_1, GGMLType.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("first_zero", [0.0, -0.0])
def test_q4_1_min_keeps_the_first_zero(t, first_zero):
    x = np.abs(np.random.default_rng(0).standard_normal(32)).astype(np.float32) + 1
    x[[3, 9, 20]] = [first_zero, -first_zero, -first_zero]
    m = quantize(x, t).view(BLOCK_DTYPES[t])["m"][0]
    assert m.view(np.uint16) == (0x8000 if np.signbit(first_zero) else 0x0000)


@pytest.mark.parametrize("t", [t for t in GGUF_QUANTIZES if t in FLOAT_TYPES], ids=lambda t: t.name)
@HYPOTHESIS
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32, allow_nan=False)))
def test_quantize_floats_match_gguf(t, x):
    ours = quantize(x, t)
    with np.errstate(over="ignore"):
        _assert_same_bits(ours, _gguf_quantize(x, t), t.name)
    _assert_same_bits(dequantize(ours, t, x.shape), _gguf_dequantize(ours, t, x.shape), f"{t.name} round trip")


def test_quantize_float_nans_become_quiet_like_ggml():
    x = np.array([0x7FA00000, 0xFFA00001, 0x7FC00000, 0x7F800000], np.uint32).view(np.float32)
    assert [hex(v) for v in quantize(x, "BF16").view(np.uint16)] == ["0x7fe0", "0xffe0", "0x7fc0", "0x7f80"]
    assert [hex(v) for v in quantize(x, "F16").view(np.uint16)] == ["0x7f00", "0xff00", "0x7e00", "0x7c00"]
    _assert_same_bits(dequantize(quantize(x, "F32"), "F32", (4,)), x, "F32")


def test_bf16_rounds_to_nearest_even():
    x = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF], np.uint32).view(np.float32)
    assert [hex(v) for v in quantize(x, "BF16").view(np.uint16)] == ["0x3f80", "0x3f82", "0x3f81", "0x7f80"]


def test_q8_0_rounds_halves_away_from_zero():
    x = np.zeros(32, np.float32)
    x[:8] = [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5]  # d = 1: q = roundf(x), not np.round(x)
    q = quantize(x, "Q8_0").view(np.int8)[2:]
    assert q[:8].tolist() == [127, 3, -3, 1, -1, 2, -2, 127]
    _assert_same_bits(quantize(x, "Q8_0"), _gguf_quantize(x, GGMLType.Q8_0), "Q8_0 ties")


def test_q4_0_block_by_hand():
    x = np.linspace(-8, 7, 32, dtype=np.float32)  # signed max -8: d = 1, q = trunc(x + 8.5) clamped to 15
    block = quantize(x, "Q4_0").view(BLOCK_DTYPES[GGMLType.Q4_0])[0]
    assert block["d"] == 1.0
    q = np.minimum(np.trunc(x + np.float32(8.5)), 15).astype(np.uint8)
    assert np.array_equal(block["qs"], q[:16] | (q[16:] << 4))


def test_q8_1_sum_field():
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    q81 = quantize(x, "Q8_1").reshape(-1).view(BLOCK_DTYPES[GGMLType.Q8_1])
    q80 = quantize(x, "Q8_0").reshape(-1).view(BLOCK_DTYPES[GGMLType.Q8_0])
    assert np.array_equal(q81["qs"], q80["qs"]) and np.array_equal(q81["d"], q80["d"])
    d = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)  # the float32 d, before rounding to fp16
    sums = q81["qs"].sum(axis=1, dtype=np.int32).astype(np.float32) * d
    assert np.array_equal(q81["s"].view(np.uint16), sums.astype(np.float16).view(np.uint16))


def test_q8_k_fields():
    x = np.random.default_rng(6).standard_normal((2, 2 * QK_K)).astype(np.float32)
    x[0, 17] = -9.0  # the first block's signed max: iscale = -127/max maps it to -127, d = 1/iscale
    blocks = quantize(x, "Q8_K").reshape(-1).view(BLOCK_DTYPES[GGMLType.Q8_K])
    assert blocks["qs"][0, 17] == -127 and blocks["d"][0] == np.float32(1) / (np.float32(-127) / np.float32(-9))
    assert np.array_equal(blocks["bsums"], blocks["qs"].reshape(4, 16, 16).sum(axis=2))
    assert np.abs(blocks["qs"]).max() <= 127
    y = dequantize(quantize(x, "Q8_K"), "Q8_K", x.shape)
    assert np.abs(y - x).max() <= 9.0 / 127


def test_quantize_zeros_dequantize_to_zeros():
    for t in QUANTIZE_TYPES:
        block = BLOCK_LAYOUT[t][0]
        y = dequantize(quantize(np.zeros((2, 2 * max(block, 32)), np.float32), t), t, (2, 2 * max(block, 32)))
        assert not y.any(), t.name


def _cosine_data(offset: float, n: int = 32 * 128) -> np.ndarray:
    """llama.cpp test-quantize-fns generate_data: 0.1 + 2*cosf(i + offset), summed in double, stored as float."""
    c = np.cos(np.arange(n, dtype=np.float32) + np.float32(offset))
    return (0.1 + 2.0 * c.astype(np.float64)).astype(np.float32)


def _llama_total_error(a: np.ndarray, b: np.ndarray) -> float:
    """test-quantize-fns array_rmse: sqrt(sum of squared differences) / n, i.e. the RMS error / sqrt(n)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.sum(diff * diff)) / diff.size)


# test-quantize-fns: MAX_QUANTIZATION_TOTAL_ERROR 0.002, _2BITS 0.0075 (Q2_K), _3BITS 0.0040 (Q3_K)
LLAMA_TOTAL_ERROR = {GGMLType.Q2_K: 0.0075, GGMLType.Q3_K: 0.0040}


@pytest.mark.parametrize("t", QUANTIZE_TYPES, ids=lambda t: t.name)
def test_quantization_error_within_llama_cpp_bounds(t):
    x = _cosine_data(0.0)
    q = quantize(x, t)
    y = dequantize(q, t, x.shape)
    assert _llama_total_error(x, y) < LLAMA_TOTAL_ERROR.get(t, 0.002)
    if t in GGUF_DEQUANTIZES:  # the packing is the one gguf reads
        _assert_same_bits(_gguf_dequantize(q, t, x.shape), y, f"{t.name} through gguf")


# Our own bounds, about 1.25x what these quantizers reach on standard normal data (relative RMS error)
RELATIVE_RMS_BOUND = {
    GGMLType.F32: 0.0, GGMLType.F16: 3e-4, GGMLType.BF16: 2.5e-3, GGMLType.Q8_0: 0.007, GGMLType.Q8_1: 0.007,
    GGMLType.Q8_K: 0.009, GGMLType.Q4_0: 0.11, GGMLType.Q4_1: 0.10, GGMLType.Q5_0: 0.055, GGMLType.Q5_1: 0.05,
    GGMLType.Q2_K: 0.37, GGMLType.Q3_K: 0.19, GGMLType.Q4_K: 0.09, GGMLType.Q5_K: 0.045, GGMLType.Q6_K: 0.022,
}


@pytest.mark.parametrize("t", QUANTIZE_TYPES, ids=lambda t: t.name)
def test_quantization_error_on_normal_data(t):
    x = np.random.default_rng(int(t)).standard_normal((8, 1024)).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.shape)
    assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)) <= RELATIVE_RMS_BOUND[t]


@pytest.mark.parametrize("t", K_TYPES + (GGMLType.Q8_K,), ids=lambda t: t.name)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-2, 1.0, 300.0]),
       kind=st.sampled_from(["normal", "positive", "negative", "sparse", "constant", "outlier", "integers"]))
def test_k_quants_handle_awkward_blocks(t, seed, scale, kind):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, QK_K))
    x = {"normal": x, "positive": np.abs(x), "negative": -np.abs(x), "sparse": x * (rng.random(x.shape) < 0.05),
         "constant": np.full_like(x, x[0, 0]), "outlier": x + 50 * (np.arange(QK_K) == 77),
         "integers": np.round(x * 3)}[kind]
    x = (x * scale).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.shape)
    assert np.isfinite(y).all()
    amax = np.abs(x).max()
    assert np.abs(y - x).max() <= 0.75 * amax + 1e-30, f"{kind}: max error {np.abs(y - x).max()} vs |x| {amax}"


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quants_of_tiny_values_underflow_like_llama_cpp(t):
    """Super-block scales are fp16: values around 1e-6 leave scales in or below the subnormal range."""
    x = (np.random.default_rng(1).standard_normal((1, QK_K)) * 1e-6).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.shape)
    assert np.isfinite(y).all() and np.abs(y).max() <= 2 * np.abs(x).max()
    assert not dequantize(quantize(x * np.float32(1e-6), t), t, x.shape).any()


def test_quantize_in_small_chunks_is_the_same(monkeypatch):
    x = np.random.default_rng(8).standard_normal((3, 2 * QK_K)).astype(np.float32)
    whole = {t: quantize(x, t) for t in QUANTIZE_TYPES}
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", QK_K)
    for t in QUANTIZE_TYPES:
        assert np.array_equal(quantize(x, t), whole[t]), t.name


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite_input(t, bad):
    x = np.ones((2, BLOCK_LAYOUT[t][0]), np.float32)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=r"1 non-finite values.*\(1, 3\)"):
        quantize(x, t)


@pytest.mark.parametrize(("t", "shape", "message"), [
    ("Q4_0", (48,), "last dimension 48"),
    ("Q4_K", (2, 32), "multiple of the block size 256"),
    ("F16", (), "at least one dimension"),
    ("Q7_K", (32,), "unknown tensor type"),
])
def test_quantize_rejects_bad_shapes_and_types(t, shape, message):
    with pytest.raises(ValueError, match=message):
        quantize(np.zeros(shape, np.float32), t)


def test_quantize_converts_to_float32_first():
    x64 = np.random.default_rng(9).standard_normal(64)
    assert np.array_equal(quantize(x64, "Q8_0"), quantize(x64.astype(np.float32), "Q8_0"))
    assert quantize(x64.reshape(2, 32), "Q4_0").shape == (2, 18)
