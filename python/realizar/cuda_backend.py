"""The CUDA backend from Python: a llama-family model on an NVIDIA GPU, with the CPU core's contract.

    m = CudaModel.from_gguf("model.gguf")             # weights uploaded once, in their GGUF block types
    m.logits([1, 2, 3])                               # float32 (n_vocab,), fresh context
    m.generate_greedy([1, 2, 3], 32)                  # 32 greedy tokens, decoded in CUDA graphs
    cache = m.new_kv_cache(n_blocks, 16)              # paged KV pool in device memory
    m.core.forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows)   # = realizar._core.CoreModel.forward

`m.core` and `m.new_kv_cache` are what `realizar.Engine` drives (see `CudaRunner` for an engine runner over
it). `realizar.cuda_available()` says whether a GPU is usable. `random_llama_gguf` writes random-weight llama
files of any shape with our GGUF writer and quantizer (tests and `benchmarks/gpu_check.py`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .gguf import GGUFFile, GGUFWriter
from .types import GGMLType, ggml_type

__all__ = ["CudaModel", "CudaRunner", "core_args_from_gguf", "random_llama_gguf", "LlamaShape", "cuda_module"]


def cuda_module():
    """realizar._cuda, or a RuntimeError saying why it is unusable (realizar.cuda_available()'s reason)."""
    from . import _cuda_unavailable_reason

    reason = _cuda_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from . import _cuda  # type: ignore[attr-defined]

    return _cuda


# ---------------------------------------------------------------------------------------------------------
# GGUF -> the core's model arguments (the CPU core's names and config keys)
# ---------------------------------------------------------------------------------------------------------

def core_args_from_gguf(gf: GGUFFile) -> tuple[dict, dict, list[dict]]:
    """(config, globals, layers) as realizar._core.CoreModel and realizar._cuda.CudaModel take them, through
    realizar.model's one GGUF -> core table and its ModelConfig (validation included)."""
    from .model import ModelConfig, _map_tensors

    emb = gf.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ValueError(f"{gf.path}: missing or malformed tensor token_embd.weight")
    config = ModelConfig.from_gguf(gf, n_vocab=int(emb.shape[0]))
    globals_, layers = _map_tensors(gf, config)
    return config.core_dict(), globals_, layers


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class CudaModel:
    """A llama-family model on the GPU. `core` has the CPU core's forward contract."""

    def __init__(self, config: dict, globals_: dict, layers: list[dict], *, n_ctx: int | None = None,
                 max_step_tokens: int = 512, batch_invariant: bool = False, pdl: bool | None = None,
                 source: GGUFFile | None = None):
        _cuda = cuda_module()
        if pdl is None:
            pdl = os.environ.get("REALIZAR_CUDA_PDL", "1") != "0"
        self.config = dict(config)
        self.n_ctx = int(n_ctx or min(int(config.get("n_ctx_train") or 4096), 4096))
        self.n_vocab = int(config["n_vocab"])
        self.n_layer = int(config["n_layer"])
        self.n_kv_dim = int(config["n_head_kv"]) * int(config["head_dim"])
        self.core = _cuda.CudaModel(self.config, globals_, layers, n_ctx=self.n_ctx, max_step_tokens=max_step_tokens,
                                    batch_invariant=batch_invariant, pdl=pdl)
        self._cuda = _cuda
        self._source = source  # keeps the mmap open as long as the model
        self._scratch_cache = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, **options: Any) -> CudaModel:
        gf = GGUFFile(path)
        config, globals_, layers = core_args_from_gguf(gf)
        return cls(config, globals_, layers, source=gf, **options)

    # -- the engine's interface ------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layer * self.n_kv_dim * 2

    def new_kv_cache(self, n_blocks: int, block_size: int = 16):
        return self._cuda.KVCache(self.n_layer, self.n_kv_dim, n_blocks, block_size)

    def kv_memory_budget(self) -> int:
        """Bytes a serving engine's KV pool may take by default: 90% of the device memory free now (after the
        weights and the step's scratch) less 256 MiB of headroom for CUDA graphs and larger step scratch."""
        free = int(self._cuda.device_info()["free_mem"])
        return max(0, int(free * 0.9) - (256 << 20))

    @property
    def weight_bytes(self) -> int:
        return int(self.core.weight_bytes)

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every matrix once and one embedding row."""
        return int(self.core.bytes_per_token)

    # -- single sequences --------------------------------------------------------------------------------------
    def _cache_for(self, n_positions: int, block_size: int = 16):
        n_blocks = -(-n_positions // block_size)
        c = self._scratch_cache
        if c is None or c.n_blocks < n_blocks:
            self._scratch_cache = c = self.new_kv_cache(max(n_blocks, 64), block_size)
        return c, np.arange(n_blocks, dtype=np.int32)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 (n_vocab,) logits after the last token, in a fresh context."""
        toks = np.asarray(tokens, dtype=np.int32)
        if toks.ndim != 1 or toks.size == 0:
            raise ValueError("logits: tokens must be a non-empty 1-D sequence")
        cache, table = self._cache_for(toks.size)
        out = self.core.forward(cache, toks, np.array([toks.size], np.int32), np.array([0], np.int32), [table],
                                np.array([toks.size - 1], np.int32))
        return out[0]

    def prefill(self, cache, tokens: Sequence[int], table: np.ndarray, pos0: int = 0, chunk: int = 512) -> int:
        """Feeds tokens at positions pos0.. in chunks; returns the greedy token after the last (device argmax)."""
        toks = np.asarray(tokens, dtype=np.int32)
        zero = np.zeros(1, np.float32)
        nxt = -1
        for s in range(0, toks.size, chunk):
            part = toks[s:s + chunk]
            nxt = int(self.core.forward_sample(cache, part, np.array([part.size], np.int32),
                                               np.array([pos0 + s], np.int32), [table],
                                               np.array([part.size - 1], np.int32), zero,
                                               np.zeros(1, np.int32), np.ones(1, np.float32), zero, zero)[0])
        return nxt

    def generate_greedy(self, tokens: Sequence[int], n: int, use_graph: bool = True) -> list[int]:
        """n greedy tokens after the prompt: the prompt in prefill chunks, then decode steps in CUDA graphs."""
        toks = np.asarray(tokens, dtype=np.int32)
        if toks.size == 0 or n < 1:
            raise ValueError("generate_greedy: needs a prompt and n >= 1")
        cache, table = self._cache_for(toks.size + n)
        first = self.prefill(cache, toks, table)
        if n == 1:
            return [first]
        rest = self.decode_greedy(cache, [first], [toks.size], [table], n - 1, use_graph=use_graph)
        return [first] + rest[:, 0].tolist()

    # -- batches ---------------------------------------------------------------------------------------------
    def decode_greedy(self, cache, tokens: Sequence[int], pos: Sequence[int], tables: Sequence[np.ndarray],
                      n_steps: int, use_graph: bool = True) -> np.ndarray:
        """n_steps greedy decode steps of B sequences on the device; int32 [n_steps, B]."""
        return self.core.decode_greedy(cache, np.asarray(tokens, np.int32), np.asarray(pos, np.int32),
                                       [np.asarray(t, np.int32) for t in tables], int(n_steps), use_graph)

    def step(self, cache, tokens, seq_lens, pos0, block_tables, logit_rows) -> np.ndarray:
        """One batched forward step (the CPU core's contract): float32 logits [len(logit_rows), n_vocab]."""
        return self.core.forward(cache, np.asarray(tokens, np.int32), np.asarray(seq_lens, np.int32),
                                 np.asarray(pos0, np.int32), [np.asarray(t, np.int32) for t in block_tables],
                                 np.asarray(logit_rows, np.int32))


class CudaRunner:
    """`realizar.Engine`'s model interface (see engine._ModelRunner) over a CudaModel, for a tokenizer and a
    sampler factory supplied by the caller: Engine(None, config, _runner=CudaRunner(model, ...))."""

    def __init__(self, model: CudaModel, *, tokenizer: Any = None, sampler_factory: Any = None,
                 eog_ids: Sequence[int] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.n_vocab = model.n_vocab
        self.n_ctx = model.n_ctx
        self.eog_ids = frozenset(int(t) for t in (getattr(tokenizer, "eog_ids", None) or eog_ids))
        self._sampler_factory = sampler_factory

    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token()

    def kv_memory_budget(self) -> int:
        return self.model.kv_memory_budget()

    def new_cache(self, n_blocks: int, block_size: int):
        return self.model.new_kv_cache(n_blocks, block_size)

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this runner has no tokenizer: pass token ids")
        return self.tokenizer.encode(text)

    def detokenizer(self):
        return self.tokenizer.detokenizer()

    def sampler(self, config: Any):
        return self._sampler_factory(config)

    def forward(self, cache, tokens, seq_lens, pos0, block_tables, logit_rows) -> np.ndarray:
        return self.model.core.forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows)


# ---------------------------------------------------------------------------------------------------------
# Random-weight llama files (tests, benchmarks)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 2048
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SMOLLM2_135M = LlamaShape(n_vocab=49152, n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, tied=True)
TINYLLAMA_1B = LlamaShape(n_vocab=32000, n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632)


def _weight_type(name: str, shape: tuple[int, ...], target: str, n_layer: int, tied: bool) -> GGMLType:
    from .requantize import choose_type, parse_target
    key, base, _ = parse_target(target)
    return choose_type(name, shape, key, base, n_layer, tied)


def _quantize_parallel(w: np.ndarray, t: GGMLType) -> np.ndarray:
    """quantize() over row chunks on threads (the C++ quantizer releases the GIL); rows are independent."""
    from concurrent.futures import ThreadPoolExecutor

    from .kernels import quantize

    n_threads = min(os.cpu_count() or 1, 32)
    if w.size < (1 << 22) or n_threads == 1 or w.shape[0] < 2 * n_threads:
        return quantize(w, t)
    chunks = np.array_split(w, n_threads)
    with ThreadPoolExecutor(n_threads) as ex:
        return np.concatenate(list(ex.map(lambda c: quantize(c, t), chunks)))


_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _add_byte_tokenizer(w: GGUFWriter, n_vocab: int) -> None:
    """A byte-level gpt2 tokenizer without merges (text is one token per UTF-8 byte): the 256 byte tokens,
    <|endoftext|> (BOS and EOS), the ChatML markers, then "<tN>" fillers up to n_vocab, so random-weight
    files load in `realizar.Model` and serve text."""
    from .tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, bytes_to_unicode

    tokens = list(bytes_to_unicode()) + list(_SPECIAL_TOKENS)
    types = [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * len(_SPECIAL_TOKENS)
    tokens += [f"<t{i}>" for i in range(len(tokens), n_vocab)]
    types += [TOKEN_NORMAL] * (n_vocab - len(types))
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.pre", "gpt-2")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.token_type", np.array(types, dtype=np.int32))
    w.add("tokenizer.ggml.bos_token_id", 256)
    w.add("tokenizer.ggml.eos_token_id", 256)
    w.add("tokenizer.ggml.add_bos_token", False)


def random_llama_gguf(path: str | os.PathLike, shape: LlamaShape, wtype: str = "Q4_K", *, seed: int = 0,
                      share_layers: bool = False, logit_scale: float = 1.0, arch: str = "llama",
                      fast_random: bool = False) -> dict[str, str]:
    """Writes a llama-family GGUF with random weights in `wtype` (quantize.py's per-tensor policy: K-quant rows
    that are not a multiple of 256 fall back as llama.cpp does; norms stay F32). share_layers: every layer gets
    the same bytes (fast to build; the GPU still reads each layer's own copy). arch="qwen2" adds Q/K/V biases
    (and means NeoX RoPE). fast_random: weights are windows of one pool of 16 Mi normal numbers (benchmarks:
    fast, values repeat). Files of n_vocab >= 259 carry a byte-level tokenizer. Returns tensor name -> type name."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 24, dtype=np.float32) if fast_random else None

    def gaussian(rows: int, cols: int) -> np.ndarray:
        if pool is None:
            return rng.standard_normal((rows, cols), dtype=np.float32)
        n = rows * cols
        if n <= pool.size:
            off = int(rng.integers(0, pool.size - n + 1))
            return pool[off:off + n].reshape(rows, cols).copy()
        return np.resize(np.roll(pool, int(rng.integers(0, pool.size))), n).reshape(rows, cols)

    E, F, V, L = shape.n_embd, shape.n_ff, shape.n_vocab, shape.n_layer
    hd = shape.head_dim
    q_dim, kv_dim = shape.n_head * hd, shape.n_head_kv * hd
    types: dict[str, str] = {}

    def mat(name: str, rows: int, cols: int, std: float):
        t = _weight_type(name, (rows, cols), wtype, L, shape.tied)
        types[name] = t.name
        w = gaussian(rows, cols)
        w *= np.float32(std)
        return _quantize_parallel(w, t) if t != GGMLType.F32 else w, t, (rows, cols)

    def norm(name: str, n: int):
        types[name] = "F32"
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    with GGUFWriter(path, arch=arch) as w:
        w.add("general.name", f"random-{arch}-{E}x{L}-{wtype}")
        w.add(f"{arch}.context_length", shape.n_ctx)
        w.add(f"{arch}.embedding_length", E)
        w.add(f"{arch}.block_count", L)
        w.add(f"{arch}.feed_forward_length", F)
        w.add(f"{arch}.attention.head_count", shape.n_head)
        w.add(f"{arch}.attention.head_count_kv", shape.n_head_kv)
        w.add(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
        w.add(f"{arch}.rope.freq_base", 10000.0)
        w.add(f"{arch}.rope.dimension_count", hd)
        w.add(f"{arch}.vocab_size", V)
        if V >= 256 + len(_SPECIAL_TOKENS):
            _add_byte_tokenizer(w, V)

        def add(name, data_type_shape):
            data, t, shp = data_type_shape
            w.add_tensor(name, data, t, shape=shp)

        # embeddings ~ N(0, 1) (the residual stream's scale); the head maps the normed stream to logits of
        # standard deviation about 3 * logit_scale, so greedy choices have margins
        add("token_embd.weight", mat("token_embd.weight", V, E, 1.0))
        w.add_tensor("output_norm.weight", norm("output_norm.weight", E))
        if not shape.tied:
            add("output.weight", mat("output.weight", V, E, 3.0 * logit_scale / np.sqrt(E)))
        shared: dict[str, Any] = {}
        for i in range(L):
            def layer_mat(n, rows, cols, std, i=i):
                name = f"blk.{i}.{n}"
                if share_layers and n in shared:
                    data, t, shp = shared[n]
                    types[name] = t.name
                    return data, t, shp
                r = mat(name, rows, cols, std)
                shared[n] = r
                return r
            w.add_tensor(f"blk.{i}.attn_norm.weight", norm(f"blk.{i}.attn_norm.weight", E))
            add(f"blk.{i}.attn_q.weight", layer_mat("attn_q.weight", q_dim, E, 1.0 / np.sqrt(E)))
            add(f"blk.{i}.attn_k.weight", layer_mat("attn_k.weight", kv_dim, E, 1.0 / np.sqrt(E)))
            add(f"blk.{i}.attn_v.weight", layer_mat("attn_v.weight", kv_dim, E, 1.0 / np.sqrt(E)))
            if arch == "qwen2":
                for n, rows in (("attn_q.bias", q_dim), ("attn_k.bias", kv_dim), ("attn_v.bias", kv_dim)):
                    types[f"blk.{i}.{n}"] = "F32"
                    w.add_tensor(f"blk.{i}.{n}", (0.5 * rng.standard_normal(rows)).astype(np.float32))
            add(f"blk.{i}.attn_output.weight", layer_mat("attn_output.weight", E, q_dim, 0.5 / np.sqrt(q_dim)))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", norm(f"blk.{i}.ffn_norm.weight", E))
            add(f"blk.{i}.ffn_gate.weight", layer_mat("ffn_gate.weight", F, E, 1.0 / np.sqrt(E)))
            add(f"blk.{i}.ffn_up.weight", layer_mat("ffn_up.weight", F, E, 1.0 / np.sqrt(E)))
            add(f"blk.{i}.ffn_down.weight", layer_mat("ffn_down.weight", E, F, 0.5 / np.sqrt(F)))
    return types


def weight_type_id(t: str | int | GGMLType) -> int:
    return int(ggml_type(t))
