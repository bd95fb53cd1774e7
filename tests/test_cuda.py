"""The CUDA backend (realizar._cuda) against numpy and the CPU core.

Two kinds of tests:
- unmarked, no GPU needed (they run in CI wherever the module is built): the block traits' host copies, the
  arithmetic the GPU kernels run, against the CPU dequantizers (bit for bit) and float64 dot products; and the
  module's behaviour without a GPU (imports, reports no device, raises a clear error).
- marked `cuda` (run with `pytest -m cuda`, skipped without a GPU): every kernel against numpy or the CPU
  core, the model's logits and greedy generation against the CPU core (equal until the first near-tie, top-2
  margin < 0.1), CUDA graphs against eager launches, batched against alone (also through the engine), and
  device memory back to its start after 1,000 requests.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import pytest

import realizar
from realizar.types import GGMLType

_cuda = pytest.importorskip("realizar._cuda", reason="the CUDA backend is not built (no CUDA compiler)")

from realizar import cuda_backend as cb  # noqa: E402

G = GGMLType
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
K_QUANTS = {"Q4_K", "Q5_K", "Q6_K"}


def has_gpu() -> bool:
    return realizar.cuda_available()


gpu = pytest.mark.skipif(not has_gpu(), reason="no usable CUDA GPU")


# the CPU core's activation format (vec_dot_type) of each quantized weight type, and our format ids
ACT = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
       "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K"}
FMT = {"Q8_0": 0, "Q8_1": 1, "Q8_K": 2}
BLOCK_DTYPES = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
    "Q8_1": np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", (32,))]),
    "Q8_K": np.dtype([("d", "<f4"), ("qs", "i1", (256,)), ("bsums", "<i2", (16,))]),
}


def cpu_activations(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x [n, K] through the CPU core's activation quantizer: quants [n, K], d per 32 [n, K/32], s per 32 (Q8_1)."""
    n, k = x.shape
    blocks = realizar.quantize(x, fmt).view(BLOCK_DTYPES[fmt]).reshape(n, -1)
    q = blocks["qs"].reshape(n, k)
    d = np.repeat(blocks["d"].astype(np.float32), 8 if fmt == "Q8_K" else 1, axis=1)
    return q, d, (blocks["s"].astype(np.float32) if fmt == "Q8_1" else None)


def act_values(x: np.ndarray, t: str) -> np.ndarray:
    """The activation values a product with weights of type t multiplies: q * d in the CPU's format, or x
    rounded to half for float weights."""
    if t not in ACT:
        return f16(x)
    q, d, _ = cpu_activations(x.reshape(-1, x.shape[-1]), ACT[t])
    return (q.reshape(q.shape[0], -1, 32).astype(np.float64) * d[..., None].astype(np.float64)).reshape(x.shape)


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


def random_weights(t: str, rows: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    w = rng.standard_normal((rows, k)).astype(np.float32)
    q = realizar.quantize(w, t)
    return q, realizar.dequantize(q, t, (rows, k)).astype(np.float64)


def k_for(t: str, small: bool) -> int:
    if t in K_QUANTS:
        return 256 if small else 1024
    return 96 if small else 576


# ---------------------------------------------------------------------------------------------------------
# No GPU needed
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES)
def test_host_dequantize_is_bit_exact(t):
    rng = np.random.default_rng(1)
    k = k_for(t, False)
    q, _ = random_weights(t, 3, k, rng)
    ref = realizar.dequantize(q, t, (3, k))
    got = _cuda.host_dequantize(int(G[t]), q, 3 * k).reshape(3, k)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("small", [True, False])
def test_host_row_dot_matches_the_cpu_core(t, small):
    """The matrix-vector kernel's arithmetic for one row (activation quantization, unpacking, dp4a, scales,
    min terms) against the CPU core's vec_dot on the CPU's own activation blocks."""
    core = pytest.importorskip("realizar._core")
    rng = np.random.default_rng(2)
    k = k_for(t, small)
    q, w = random_weights(t, 4, k, rng)
    x = rng.standard_normal(k).astype(np.float32)
    xr = act_values(x[None], t)[0]
    rb = q.size // 4
    for r in range(4):
        got = _cuda.host_row_dot(int(G[t]), q[r * rb:(r + 1) * rb], k, x)
        bound = float(np.abs(w[r]) @ np.abs(xr))
        if t in ACT:
            ref = core.vec_dot(int(G[t]), q[r * rb:(r + 1) * rb], realizar.quantize(x, ACT[t]), k, "scalar")
        else:
            ref = float(w[r] @ xr)
        assert abs(got - ref) <= 1e-5 * bound, (t, r, got, ref)


def test_module_without_gpu_is_quiet():
    n = _cuda.device_count()
    assert isinstance(n, int) and n >= 0
    assert realizar.cuda_available() == (n > 0)
    if n == 0:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            _cuda.device_info()
        with pytest.raises(RuntimeError, match="no usable CUDA device|no CUDA device"):
            cb.cuda_module()


def test_gguf_args_for_the_cpu_core(tmp_path):
    shape = cb.LlamaShape(n_vocab=300, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_ctx=256)
    types = cb.random_llama_gguf(tmp_path / "m.gguf", shape, "Q4_K", arch="qwen2")
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.1.attn_k.bias"] == "F32"
    config, globals_, layers = cb.core_args_from_gguf(realizar.GGUFFile(tmp_path / "m.gguf"))
    assert config["rope_neox"] == 1 and config["head_dim"] == 64 and config["n_vocab"] == 300
    assert set(layers[0]) == {"attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "ffn_norm", "w1", "w2", "w3"}
    assert set(globals_) == {"tok_embeddings", "norm", "output"}


# ---------------------------------------------------------------------------------------------------------
# Kernels on the GPU
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@gpu
def test_device_info():
    info = _cuda.device_info()
    assert info["sm_count"] > 0 and info["total_mem"] > 0 and info["compute_capability"][0] >= 7


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("t", TYPES)
def test_dequantize_is_bit_exact(t):
    rng = np.random.default_rng(3)
    k = k_for(t, False)
    q, _ = random_weights(t, 5, k, rng)
    ref = realizar.dequantize(q, t, (5, k)).reshape(-1)
    got = _cuda.dequantize(int(G[t]), q, 5 * k)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("fmt", ["Q8_0", "Q8_1", "Q8_K"])
def test_activation_quantizer_matches_the_cpu_core(fmt):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    x[1] = 0.0  # an all-zero row
    x[2, 3], x[2, 700] = -9.0, 9.0  # ties of the largest |x|: the first one sets the sign
    x[3] *= 1e-3
    q, ds = _cuda.quantize_activations(x, FMT[fmt])
    cq, cd, cs = cpu_activations(x, fmt)
    assert np.array_equal(q, cq)
    assert np.array_equal(ds[..., 0], cd)
    if cs is not None:
        assert np.array_equal(ds[..., 1], cs)
    else:
        assert np.allclose(ds[..., 1], cd * q.reshape(6, -1, 32).sum(-1), rtol=1e-6, atol=0)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("rows", [37, 512])
def test_matvec(t, n, rows):
    rng = np.random.default_rng(4 + n + rows)
    k = k_for(t, rows == 37)
    q, w = random_weights(t, rows, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    xr = act_values(x, t)
    y = _cuda.matmul(int(G[t]), q, rows, k, x, path=1)
    bound = np.abs(xr) @ np.abs(w).T
    assert np.isfinite(y).all()
    if t in ACT:  # the CPU core's product on its own activation blocks: the same integer sums
        core = pytest.importorskip("realizar._core")
        ref = core.matmul(int(G[t]), q, rows, k, x, "scalar")
    else:
        ref = xr @ w.T
    assert (np.abs(y - ref) <= 1e-5 * bound + 1e-6).all()


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n,rows", [(5, 100), (64, 256), (130, 200)])
def test_tensor_core_matmul(t, n, rows):
    rng = np.random.default_rng(5 + n)
    k = k_for(t, n == 5)
    q, w = random_weights(t, rows, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    y = _cuda.matmul(int(G[t]), q, rows, k, x, path=2)
    # the tile holds both operands in half (the activations as the CPU's blocks dequantized), products in float
    xr = f16(act_values(x, t))
    ref = xr @ f16(w).T
    bound = np.abs(xr) @ np.abs(w).T
    assert np.isfinite(y).all()
    assert (np.abs(y - ref) <= 2e-4 * bound + 1e-5).all()
    if n <= 8:  # the two kernels agree on the same rows
        y1 = _cuda.matmul(int(G[t]), q, rows, k, x, path=1)
        assert (np.abs(y - y1) <= 1e-3 * bound + 1e-5).all()


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n,rows,sms,invariant", [(5, 100, 132, False), (64, 256, 132, False), (130, 200, 2, True)])
def test_tensor_core_matmul_split_k(t, n, rows, sms, invariant):
    """K cut into slices (decode-sized batches on a large GPU), summed in slice order by a second kernel: the
    same products as one pass up to float rounding, every output written, the same bits on every run; with the
    batch-invariant choice (and the rows in workspace-sized chunks) a row's result does not depend on the batch."""
    rng = np.random.default_rng(50 + n)
    k = k_for(t, False)
    q, w = random_weights(t, rows, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    whole = _cuda.matmul(int(G[t]), q, rows, k, x, path=2)
    split = _cuda.matmul(int(G[t]), q, rows, k, x, path=2, split_sms=sms, split_invariant=invariant)
    bound = np.abs(f16(act_values(x, t))) @ np.abs(w).T
    assert np.isfinite(split).all()
    assert (np.abs(split - whole) <= 1e-5 * bound + 1e-6).all()
    assert not np.array_equal(split, whole)  # the slices ran: their sum has another order
    again = _cuda.matmul(int(G[t]), q, rows, k, x, path=2, split_sms=sms, split_invariant=invariant)
    assert np.array_equal(split, again)
    if invariant:
        few = _cuda.matmul(int(G[t]), q, rows, k, x[:3], path=2, split_sms=sms, split_invariant=True)
        assert np.array_equal(few, split[:3])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("fmt", ["Q8_0", "Q8_1", "Q8_K"])
def test_rmsnorm_and_its_activations(fmt):
    rng = np.random.default_rng(6)
    x = (3 * rng.standard_normal((5, 512))).astype(np.float32)
    w = rng.standard_normal(512).astype(np.float32)
    y, q, ds = _cuda.rmsnorm(x, w, 1e-5, FMT[fmt])
    xd = x.astype(np.float64)
    ref = xd / np.sqrt((xd * xd).mean(1, keepdims=True) + 1e-5) * w
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-5)
    cq, cd, _ = cpu_activations(y, fmt)
    assert np.array_equal(q, cq) and np.array_equal(ds[..., 0], cd)


def rope_ref(x: np.ndarray, pos: np.ndarray, n_heads: int, hd: int, n_rot: int, neox: bool, base=10000.0):
    out = x.astype(np.float64).reshape(len(pos), n_heads, hd).copy()
    half = n_rot // 2
    # the CPU core's angles: theta_i = pos * scale^i by a float32 recurrence
    scale = np.float32(np.power(np.float32(base), np.float32(-2.0 / n_rot)))
    theta = np.empty((len(pos), half), np.float32)
    t = pos.astype(np.float32)
    for i in range(half):
        theta[:, i] = t
        t = (t * scale).astype(np.float32)
    c, s = np.cos(theta.astype(np.float64))[:, None, :], np.sin(theta.astype(np.float64))[:, None, :]
    if neox:
        a, b = out[..., :half].copy(), out[..., half:n_rot].copy()
        out[..., :half], out[..., half:n_rot] = a * c - b * s, a * s + b * c
    else:
        a, b = out[..., 0:n_rot:2].copy(), out[..., 1:n_rot:2].copy()
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    return out.reshape(len(pos), -1)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope_and_kv_write(neox, n_rot):
    rng = np.random.default_rng(7)
    nh, nkv, hd, bs, nb = 4, 2, 64, 16, 8
    T = 20
    pos = np.array(sorted(rng.choice(nb * bs, T, replace=False)), dtype=np.int32)
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * hd)).astype(np.float32)
    table = rng.permutation(nb).astype(np.int32)
    kc = np.zeros((nb, bs, nkv * hd), np.uint16)
    vc = np.zeros_like(kc)
    out, kc2, vc2 = _cuda.rope_kv(qkv, pos, nh, nkv, hd, {"n_rot": n_rot, "neox": neox}, table, kc, vc)
    q_dim, kv_dim = nh * hd, nkv * hd
    assert np.allclose(out[:, :q_dim], rope_ref(qkv[:, :q_dim], pos, nh, hd, n_rot, neox), atol=2e-4)
    k_ref = rope_ref(qkv[:, q_dim:q_dim + kv_dim], pos, nkv, hd, n_rot, neox)
    assert np.allclose(out[:, q_dim:q_dim + kv_dim], k_ref, atol=2e-4)
    for i, p in enumerate(pos):
        blk, row = table[p // bs], p % bs
        assert np.allclose(kc2[blk, row].view(np.float16).astype(np.float64), k_ref[i], rtol=1e-3, atol=1e-3)
        assert np.array_equal(vc2[blk, row].view(np.float16), qkv[i, q_dim + kv_dim:].astype(np.float16))


def attention_ref(q, pos, nh, nkv, hd, scale, table, kc, vc):
    bs = kc.shape[1]
    k = kc.view(np.float16).astype(np.float64)
    v = vc.view(np.float16).astype(np.float64)
    out = np.zeros((len(pos), nh * hd))
    for t, p in enumerate(pos):
        idx = np.arange(p + 1)
        rows_k = k[table[idx // bs], idx % bs]
        rows_v = v[table[idx // bs], idx % bs]
        for h in range(nh):
            g = h // (nh // nkv)
            qh = f16(q[t, h * hd:(h + 1) * hd])
            s = rows_k[:, g * hd:(g + 1) * hd] @ qh * scale
            e = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (e / e.sum()) @ rows_v[:, g * hd:(g + 1) * hd]
    return out


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 64), (9, 3, 64), (8, 1, 128), (32, 4, 64)])
@pytest.mark.parametrize("kernel,split_len", [(0, 64), (0, 1024), (1, 0)])
def test_attention(nh, nkv, hd, kernel, split_len):
    rng = np.random.default_rng(8 + nh + hd)
    bs, nb = 16, 24
    n_ctx = nb * bs
    T = 70 if kernel == 1 else 6
    pos = (np.arange(n_ctx - T, n_ctx) if kernel == 1 else np.sort(rng.choice(n_ctx, T, replace=False))).astype(np.int32)
    q = rng.standard_normal((T, nh * hd)).astype(np.float32)
    kc = rng.standard_normal((nb, bs, nkv * hd)).astype(np.float16).view(np.uint16)
    vc = rng.standard_normal((nb, bs, nkv * hd)).astype(np.float16).view(np.uint16)
    table = rng.permutation(nb).astype(np.int32)
    scale = 1 / np.sqrt(hd)
    res = _cuda.attention(q, pos, nh, nkv, hd, scale, table, kc, vc, kernel=kernel, split_len=split_len,
                          with_q8=kernel == 0)
    out = res[0] if kernel == 0 else res
    ref = attention_ref(q, pos, nh, nkv, hd, scale, table, kc, vc)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() < (3e-3 if kernel == 1 else 1e-4)
    if kernel == 0:  # the Q8_0 copy handed to the wo product: the CPU core's quantizer on `out`
        cq, cd, _ = cpu_activations(out, "Q8_0")
        assert np.array_equal(res[1], cq) and np.array_equal(res[2][..., 0], cd)
        _, q1, ds1 = _cuda.attention(q, pos, nh, nkv, hd, scale, table, kc, vc, kernel=0, split_len=split_len,
                                     with_q8=True, q8_fmt=1)
        cq, cd, cs = cpu_activations(out, "Q8_1")
        assert np.array_equal(q1, cq) and np.array_equal(ds1[..., 0], cd) and np.array_equal(ds1[..., 1], cs)


@pytest.mark.cuda
@gpu
def test_sampling():
    rng = np.random.default_rng(9)
    V, n = 50, 4000
    base = (2 * rng.standard_normal(V)).astype(np.float32)
    logits = np.tile(base, (n, 1))
    u = rng.random(n, dtype=np.float32) * np.float32(0.999999)
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)

    def run(temp, top_k, top_p, min_p=0.0):
        return _cuda.sample(logits, np.full(n, temp, np.float32), np.full(n, top_k, np.int32),
                            np.full(n, top_p, np.float32), np.full(n, min_p, np.float32), u)

    assert (run(0.0, 0, 1.0) == np.argmax(base)).all()
    assert (run(0.8, 1, 1.0) == np.argmax(base)).all()
    assert (run(0.8, 0, 1e-6) == np.argmax(base)).all()
    p = np.exp((base - base.max()) / 0.8)
    p /= p.sum()
    freq = np.bincount(run(0.8, 0, 1.0), minlength=V) / n
    assert np.abs(freq - p).max() < 0.03
    top5 = set(np.argsort(-base)[:5].tolist())
    s5 = run(0.8, 5, 1.0)
    assert set(s5.tolist()) <= top5
    order = np.argsort(-p)
    keep = order[:np.searchsorted(np.cumsum(p[order]), 0.5) + 1]
    assert set(run(0.8, 0, 0.5).tolist()) <= set(keep.tolist())
    assert set(run(0.8, 0, 1.0, min_p=0.2).tolist()) <= set(np.nonzero(p >= 0.2 * p.max())[0].tolist())
    del ones, zeros
    big = rng.standard_normal((3, 49152)).astype(np.float32)
    got = _cuda.sample(big, np.zeros(3, np.float32), np.zeros(3, np.int32), np.ones(3, np.float32),
                       np.zeros(3, np.float32), np.zeros(3, np.float32))
    assert (got == big.argmax(1)).all()


# ---------------------------------------------------------------------------------------------------------
# The model on the GPU against the CPU core
# ---------------------------------------------------------------------------------------------------------

SMALL = cb.LlamaShape(n_vocab=2048, n_embd=576, n_layer=4, n_head=9, n_head_kv=3, n_ff=1536, n_ctx=1024)
WIDE = cb.LlamaShape(n_vocab=1024, n_embd=512, n_layer=2, n_head=4, n_head_kv=2, n_ff=1024, n_ctx=1024)  # head_dim 128


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_models")
    files = {}
    for name, shape, t, arch in [("small-q4k", SMALL, "Q4_K", "llama"), ("small-q8", SMALL, "Q8_0", "llama"),
                                 ("small-q41", SMALL, "Q4_1", "llama"), ("wide-q6k", WIDE, "Q6_K", "llama"),
                                 ("wide-f16", WIDE, "F16", "llama"), ("qwen-q5k", WIDE, "Q5_K", "qwen2")]:
        path = d / f"{name}.gguf"
        cb.random_llama_gguf(path, shape, t, seed=len(files), arch=arch)
        files[name] = path
    return files


def cpu_core(path):
    core = pytest.importorskip("realizar._core")
    if not hasattr(core, "CoreModel"):
        pytest.skip("the CPU core has no CoreModel")
    gf = realizar.GGUFFile(path)
    config, globals_, layers = cb.core_args_from_gguf(gf)
    return core.CoreModel(config, globals_, layers, 8), config, gf


def cpu_greedy(path, prompt, n):
    """The CPU's greedy tokens and the top-2 margin of the logits each was chosen from."""
    core_mod = pytest.importorskip("realizar._core")
    m, config, _gf = cpu_core(path)
    kv = core_mod.KVCache(config["n_layer"], config["n_head_kv"] * config["head_dim"], 64, 16,
                             head_dim=config["head_dim"])
    table = np.arange(64, dtype=np.int32)
    toks, margins, first_logits = [], [], None
    feed, pos = list(prompt), 0
    for _ in range(n):
        lg = m.forward(kv, np.array(feed, np.int32), np.array([len(feed)], np.int32), np.array([pos], np.int32),
                       [table], np.array([len(feed) - 1], np.int32))[0]
        if first_logits is None:
            first_logits = lg
        top = np.sort(lg)[-2:]
        margins.append(float(top[1] - top[0]))
        t = int(np.argmax(lg))
        toks.append(t)
        pos += len(feed)
        feed = [t]
    return toks, margins, first_logits


def assert_equal_until_near_tie(gpu_toks, cpu_toks, margins, tie=0.1):
    for i, (a, b) in enumerate(zip(gpu_toks, cpu_toks, strict=True)):
        if margins[i] < tie:
            return i
        assert a == b, f"step {i}: GPU {a} != CPU {b} (CPU top-2 margin {margins[i]:.3f})"
    return len(cpu_toks)


PROMPT = [5, 17, 300, 42, 9, 1000, 77, 3, 256, 511, 12, 8]


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("name", ["small-q4k", "small-q8", "small-q41", "wide-q6k", "wide-f16", "qwen-q5k"])
def test_logits_and_greedy_match_cpu(model_files, name):
    path = model_files[name]
    cpu_toks, margins, cpu_logits = cpu_greedy(path, PROMPT, 24)
    m = cb.CudaModel.from_gguf(path, n_ctx=1024)
    lg = m.logits(PROMPT)
    scale = float(cpu_logits.std())
    # Quantized weights mean 8-bit activations in every product, and a last-bit difference in a float sum (the
    # GPU sums in other orders) flips an activation's rounding now and then. Measured on an H200 (random models,
    # Q4_1..Q6_K, prefill and single steps): GPU vs CPU logits differ by 0.6-1.0% of their std on average and
    # 2.3-4.4% at most; F16 weights (float activations) by 0.02% and 0.1%. Bounds: about twice those.
    mean_tol, max_tol = (0.001, 0.005) if name.endswith("f16") else (0.02, 0.08)
    assert np.abs(lg - cpu_logits).max() < max_tol * scale
    assert np.abs(lg - cpu_logits).mean() < mean_tol * scale
    got = m.generate_greedy(PROMPT, 24)
    assert_equal_until_near_tie(got, cpu_toks, margins)


@pytest.mark.cuda
@gpu
def test_graph_equals_eager_and_prefill_equals_steps(model_files):
    m = cb.CudaModel.from_gguf(model_files["small-q4k"], n_ctx=1024)
    a = m.generate_greedy(PROMPT, 40, use_graph=True)
    b = m.generate_greedy(PROMPT, 40, use_graph=False)
    assert a == b
    # the same continuation fed as one prompt (tensor cores, tiled attention): the same next token but for a tie
    lg = m.logits(PROMPT + a[:20])
    top = np.sort(lg)[-2:]
    assert int(np.argmax(lg)) == a[20] or top[1] - top[0] < 0.01


def gpu_steps(m, cache, first: int, pos: int, table, n: int) -> tuple[list[int], list[float]]:
    """Greedy decode alone, one forward per token: the tokens and each step's top-2 logit margin."""
    toks, margins, t = [], [], first
    for i in range(n):
        lg = m.step(cache, [t], [1], [pos + i], [table], [0])[0]
        top = np.sort(lg)[-2:]
        margins.append(float(top[1] - top[0]))
        t = int(np.argmax(lg))
        toks.append(t)
    return toks, margins


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_batched_equals_alone(model_files, batch_invariant):
    m = cb.CudaModel.from_gguf(model_files["small-q4k"], n_ctx=1024, batch_invariant=batch_invariant)
    rng = np.random.default_rng(10)
    prompts = [rng.integers(0, SMALL.n_vocab, int(n)).tolist() for n in (3, 20, 70, 1, 9)]
    cache = m.new_kv_cache(128, 16)
    tables = [np.arange(i * 16, (i + 1) * 16, dtype=np.int32) for i in range(len(prompts))]
    alone = [m.step(cache, p, [len(p)], [0], [tables[i]], [len(p) - 1])[0] for i, p in enumerate(prompts)]
    toks = sum(prompts, [])
    ends = np.cumsum([len(p) for p in prompts]) - 1
    together = m.step(cache, toks, [len(p) for p in prompts], [0] * len(prompts), tables, ends)
    for i in range(len(prompts)):
        if batch_invariant:  # tensor cores and the tiled attention for every row: bit for bit
            assert np.array_equal(together[i], alone[i]), f"prompt {i}: batched logits differ from alone"
        else:  # short prompts alone take the matrix-vector path (Q8 activations), batched the tensor cores;
            # their sums differ in order, so activations round differently now and then (see the test above)
            assert np.abs(together[i] - alone[i]).max() < 0.08 * float(alone[i].std()), f"prompt {i}"
            assert int(np.argmax(together[i])) == int(np.argmax(alone[i])) or np.ptp(np.sort(alone[i])[-2:]) < 0.1
    # decode steps: 3 sequences together (matrix-vector) and 12 (tensor cores) against each alone
    for n_seq in (3, 12):
        cache = m.new_kv_cache(16 * n_seq, 16)
        tabs = [np.arange(i * 16, (i + 1) * 16, dtype=np.int32) for i in range(n_seq)]
        firsts = [m.prefill(cache, prompts[i % len(prompts)] + [i], tabs[i]) for i in range(n_seq)]
        pos = [len(prompts[i % len(prompts)]) + 1 for i in range(n_seq)]
        batched = m.decode_greedy(cache, firsts, pos, tabs, 12)
        for i in range(n_seq):
            c1 = m.new_kv_cache(16, 16)
            t1 = np.arange(16, dtype=np.int32)
            f = m.prefill(c1, prompts[i % len(prompts)] + [i], t1)
            assert f == firsts[i]
            toks, margins = gpu_steps(m, c1, f, pos[i], t1, 12)
            if batch_invariant:
                assert toks == batched[:, i].tolist(), f"sequence {i} of {n_seq}"
            else:  # other kernels or splits sum in another order, and 8-bit activations round differently
                # now and then: equal until the first near-tie (top-2 margin < 0.1, the CPU comparison's rule)
                assert_equal_until_near_tie(batched[:, i].tolist(), toks, margins)


@dataclass
class GreedyConfig:
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = True


class _Greedy:
    def sample(self, logits, tokens):
        return int(np.argmax(logits))


class _NoText:
    def add(self, t):
        return ""

    def flush(self):
        return ""


@pytest.mark.cuda
@gpu
def test_engine_batched_equals_alone(model_files):
    from realizar.engine import Engine, EngineConfig

    m = cb.CudaModel.from_gguf(model_files["small-q8"], n_ctx=1024, batch_invariant=True)

    class Runner(cb.CudaRunner):
        def detokenizer(self):
            return _NoText()

    runner = Runner(m, sampler_factory=lambda cfg: _Greedy())
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, SMALL.n_vocab, int(n)).tolist() for n in rng.integers(1, 90, 12)]
    cfg = EngineConfig(max_num_seqs=8, max_batched_tokens=96, prefill_chunk=48, kv_cache_bytes=256 * 16 * m.kv_bytes_per_token())
    with Engine(None, cfg, _runner=runner) as engine:
        handles = [engine.submit(p, GreedyConfig(max_tokens=16)) for p in prompts]
        batched = [h.result().tokens for h in handles]
    for p, toks in zip(prompts, batched, strict=True):
        assert toks == m.generate_greedy(p, 16)


@pytest.mark.cuda
@gpu
def test_no_device_memory_leak_over_1000_requests(model_files):
    def run_once(n_requests):
        m = cb.CudaModel.from_gguf(model_files["small-q4k"], n_ctx=1024)
        cache = m.new_kv_cache(64, 16)
        rng = np.random.default_rng(12)
        table = np.arange(64, dtype=np.int32)
        zero = np.zeros(1, np.float32)
        for i in range(n_requests):
            n = int(rng.integers(1, 40))
            toks = rng.integers(0, SMALL.n_vocab, n).astype(np.int32)
            if i % 2:
                m.core.forward(cache, toks, np.array([n], np.int32), np.array([0], np.int32), [table],
                               np.array([n - 1], np.int32))
            else:
                m.core.forward_sample(cache, toks, np.array([n], np.int32), np.array([0], np.int32), [table],
                                      np.array([n - 1], np.int32), zero + 0.7, np.array([40], np.int32),
                                      zero + 0.9, zero, zero + 0.5)
            if i % 100 == 0:
                m.decode_greedy(cache, [1], [n], [table], 4)
        del m, cache
        gc.collect()

    run_once(60)  # warm up: the context's own lazy allocations, every kernel loaded
    before = _cuda.device_used_bytes()
    run_once(1000)
    after = _cuda.device_used_bytes()
    assert after - before <= 2 << 20, f"device memory grew by {(after - before) / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------
# The product on the GPU: Model.load(device="cuda"), the engine over it, `realizar serve --device cuda`
# ---------------------------------------------------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog. "


@pytest.mark.cuda
@gpu
def test_model_device_cuda_generates_as_cpu(model_files):
    from realizar import GenerationConfig, Model

    path = model_files["small-q41"]
    cpu = Model.load(path, threads=4)
    gpu_model = Model.load(path, device="cuda")
    assert gpu_model.device == "cuda" and cpu.device == "cpu"
    cfg = GenerationConfig(max_tokens=24, ignore_eos=True)
    prompt = cpu.prompt_tokens(TEXT)
    cpu_toks, margins, _ = cpu_greedy(path, prompt, 24)
    assert cpu.generate(TEXT, cfg).tokens == cpu_toks
    got = gpu_model.generate(TEXT, cfg)
    assert_equal_until_near_tie(got.tokens, cpu_toks, margins)
    assert got.text == gpu_model.detokenize(got.tokens)
    # streaming and a second request reuse the model's caches
    assert "".join(gpu_model.stream(TEXT, cfg)) == got.text


@pytest.mark.cuda
@gpu
def test_engine_on_device_cuda_model(model_files):
    """The engine drives a GPU model like a CPU one: its KV pool is sized from device memory, and concurrent
    requests give each request's tokens alone (but for near-ties: batched steps use other kernels)."""
    from realizar import GenerationConfig, Model
    from realizar.engine import Engine, EngineConfig

    m = Model.load(model_files["small-q4k"], device="cuda", n_ctx=1024)
    budget = m.kv_memory_budget()
    assert budget is not None and budget > 0
    rng = np.random.default_rng(13)
    prompts = [TEXT[: int(n)] for n in rng.integers(5, len(TEXT), 10)]
    cfg = GenerationConfig(max_tokens=12, ignore_eos=True)
    alone = [m.generate(p, cfg).tokens for p in prompts]
    with Engine(m, EngineConfig(max_num_seqs=8)) as engine:
        stats = engine.stats()
        pool_bytes = stats["kv_blocks_total"] * 16 * 2 * m.n_layer * m.n_kv_dim * 2
        assert pool_bytes <= budget
        assert stats["kv_blocks_total"] == 8 * (1024 // 16)  # max_num_seqs full contexts fit easily on a GPU
        handles = [engine.submit(p, cfg) for p in prompts]
        batched = [h.result().tokens for h in handles]
    for p, a, b in zip(prompts, alone, batched, strict=True):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                # the margin as a third path (prefill) sees it; the paths differ by up to ~4.4% of the logits'
                # std (cuda/NOTES.md), so only a margin below about that can flip between them
                lg = m.logits(m.prompt_tokens(p) + a[:i])
                top = np.sort(lg)[-2:]
                tie = 0.05 * float(lg.std())
                assert top[1] - top[0] < tie, f"{p!r}: step {i} differs with margin {top[1] - top[0]:.3f} >= {tie:.3f}"
                break


@pytest.mark.cuda
@gpu
def test_serve_device_cuda(model_files):
    import sys

    from test_server_process import ServerProcess

    s = ServerProcess([sys.executable, "-m", "realizar.cli", "serve", "--device", "cuda",
                       "--model", f"rand={model_files['small-q41']}", "--max-num-seqs", "4"], ready_timeout=120)
    try:
        status, body = s.json("POST", "/generate", {"prompt": TEXT, "max_tokens": 8})
        assert status == 200, body
        assert len(body["tokens"]) == 8 or body["finish_reason"] == "stop"
        status, body = s.json("POST", "/v1/completions", {"model": "rand", "prompt": TEXT, "max_tokens": 5,
                                                          "temperature": 0})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] >= 1
        metrics = s.metrics()
        assert any(name.startswith("realizar_") for name, _labels in metrics)
    finally:
        s.stop()
