"""A llama-family model (llama, qwen2): GGUF weights used in place by the C++ core, tokenizer, chat template,
and generation on top of the core's batched forward step.

    m = Model.load("smollm2-135m")
    m.generate("The capital of France is", max_tokens=16).text
    for delta in m.stream("Once upon a time,", strategy="top_p", temperature=0.8, seed=1): ...

The lower-level, incremental API (what the engine uses):
    cache = m.new_kv_cache(n_blocks)                   # paged F16 KV cache, 16 positions per block
    rows = m.forward_batch(cache, [BatchEntry(tokens, pos, block_table, logits="last"), ...])
    seq = m.new_sequence(capacity)                     # one sequence with a private cache:
    last = seq.feed(tokens)                            #   appends tokens, returns the last logits
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _load_core
from .errors import DeviceError, ModelError
from .gguf import GGUFFile
from .sampling import GenerationConfig, Sampler, StopStrings, TokenLogprob, token_logprob
from .types import KV_CACHE_DTYPES, GGMLType

__all__ = ["Model", "ModelConfig", "GenerationResult", "GenerationTimings", "BatchEntry", "Sequence",
           "SUPPORTED_ARCHITECTURES", "SUPPORTED_TYPES", "TENSORS"]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TYPES = frozenset({
    GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
    GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
})
BLOCK_SIZE = 16          # KV cache positions per block
MAX_DIM = 1 << 20        # bound on any hyper-parameter read from the file

# The one table from GGUF tensor names to the core's: GGUF name ({i}: layer) -> (our name, shape in numpy order
# as ModelConfig attribute names, required). Absent optional tensors: `output` is then tied to the embeddings,
# `rope_freqs` means no per-pair frequency factors, the biases mean no QKV biases (llama; qwen2 has them).
TENSORS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "token_embd.weight": ("tok_embeddings", ("n_vocab", "n_embd"), True),
    "output_norm.weight": ("norm", ("n_embd",), True),
    "output.weight": ("output", ("n_vocab", "n_embd"), False),
    "rope_freqs.weight": ("rope_freqs", ("n_rot_half",), False),
    "blk.{i}.attn_norm.weight": ("attn_norm", ("n_embd",), True),
    "blk.{i}.attn_q.weight": ("wq", ("q_dim", "n_embd"), True),
    "blk.{i}.attn_k.weight": ("wk", ("kv_dim", "n_embd"), True),
    "blk.{i}.attn_v.weight": ("wv", ("kv_dim", "n_embd"), True),
    "blk.{i}.attn_q.bias": ("bq", ("q_dim",), False),
    "blk.{i}.attn_k.bias": ("bk", ("kv_dim",), False),
    "blk.{i}.attn_v.bias": ("bv", ("kv_dim",), False),
    "blk.{i}.attn_output.weight": ("wo", ("n_embd", "q_dim"), True),
    "blk.{i}.ffn_norm.weight": ("ffn_norm", ("n_embd",), True),
    "blk.{i}.ffn_gate.weight": ("w1", ("n_ff", "n_embd"), True),
    "blk.{i}.ffn_down.weight": ("w2", ("n_embd", "n_ff"), True),
    "blk.{i}.ffn_up.weight": ("w3", ("n_ff", "n_embd"), True),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a llama-family model, read from GGUF metadata."""

    architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    n_rot: int
    rope_neox: bool
    rope_freq_base: float
    rope_scaling: str = "none"      # 'none' | 'linear' | 'yarn'
    rope_freq_scale: float = 1.0    # 1 / scaling factor
    rope_n_ctx_orig: int = 0
    rope_attn_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    attn_scale: float = 0.0         # 0: 1/sqrt(head_dim)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def n_rot_half(self) -> int:
        return self.n_rot // 2

    @classmethod
    def from_gguf(cls, gf: GGUFFile, n_vocab: int) -> ModelConfig:
        arch = gf.architecture
        where = f"{gf.path}"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def dim(key: str, default: Any = ...) -> int:
            full = f"{arch}.{key}"
            v = gf.get_int(full) if default is ... else gf.get_int(full, default)
            if not 1 <= v <= MAX_DIM:
                raise ModelError(f"{where}: {full} = {v} is out of range [1, {MAX_DIM}]")
            return int(v)

        def number(key: str, default: float) -> float:
            v = gf.get_float(f"{arch}.{key}", default)
            if not np.isfinite(v):
                raise ModelError(f"{where}: {arch}.{key} is not finite")
            return float(v)

        try:
            n_embd = dim("embedding_length")
            n_layer = dim("block_count")
            n_head = dim("attention.head_count")
            n_head_kv = dim("attention.head_count_kv", n_head)
            head_dim = dim("attention.key_length", max(1, n_embd // n_head))
            value_dim = dim("attention.value_length", head_dim)
            n_ff = dim("feed_forward_length")
            n_ctx_train = dim("context_length")
            n_rot = dim("rope.dimension_count", head_dim)
            rms_eps = number("attention.layer_norm_rms_epsilon", 1e-5)
            freq_base = number("rope.freq_base", 10000.0)
            attn_scale = number("attention.scale", 0.0)
            scaling = gf.get_str(f"{arch}.rope.scaling.type", "none")
            factor = number("rope.scaling.factor", 0.0) or number("rope.scale_linear", 0.0)
            n_ctx_orig = dim("rope.scaling.original_context_length", n_ctx_train)
            attn_factor = number("rope.scaling.attn_factor", 1.0)
            beta_fast = number("rope.scaling.yarn_beta_fast", 32.0)
            beta_slow = number("rope.scaling.yarn_beta_slow", 1.0)
        except ModelError:
            raise
        except ValueError as e:  # GGUFError: a key of the wrong type
            raise ModelError(str(e)) from None
        if n_layer > 1024:
            raise ModelError(f"{where}: {arch}.block_count = {n_layer} exceeds 1024 layers")
        if n_head % n_head_kv:
            raise ModelError(f"{where}: {arch}.attention.head_count ({n_head}) is not a multiple of head_count_kv ({n_head_kv})")
        if value_dim != head_dim:
            raise ModelError(f"{where}: key_length {head_dim} != value_length {value_dim} is not supported")
        if n_rot > head_dim or n_rot % 2:
            raise ModelError(f"{where}: {arch}.rope.dimension_count = {n_rot} must be even and <= the head size {head_dim}")
        if not (rms_eps >= 0 and freq_base > 0):
            raise ModelError(f"{where}: rms epsilon must be >= 0 and rope freq_base > 0")
        if scaling not in ("none", "linear", "yarn"):
            raise ModelError(f"{where}: unsupported rope scaling type {scaling!r} (supported: none, linear, yarn)")
        if scaling == "none" and factor not in (0.0, 1.0):
            scaling = "linear"  # legacy files give only rope.scale_linear
        if scaling != "none" and not factor > 0:
            raise ModelError(f"{where}: rope scaling {scaling!r} needs {arch}.rope.scaling.factor > 0")
        return cls(architecture=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff, n_ctx_train=n_ctx_train, rms_eps=rms_eps,
                   n_rot=n_rot, rope_neox=(arch == "qwen2"), rope_freq_base=freq_base, rope_scaling=scaling,
                   rope_freq_scale=(1.0 / factor if scaling != "none" else 1.0), rope_n_ctx_orig=n_ctx_orig,
                   rope_attn_factor=attn_factor, rope_beta_fast=beta_fast, rope_beta_slow=beta_slow,
                   attn_scale=attn_scale)

    def core_dict(self) -> dict[str, float]:
        """The config as the C++ core's CoreModel takes it."""
        return {
            "n_vocab": self.n_vocab, "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
            "n_head_kv": self.n_head_kv, "head_dim": self.head_dim, "n_ff": self.n_ff,
            "n_ctx_train": self.n_ctx_train, "rms_eps": self.rms_eps, "attn_scale": self.attn_scale,
            "n_rot": self.n_rot, "rope_neox": int(self.rope_neox), "rope_freq_base": self.rope_freq_base,
            "rope_freq_scale": self.rope_freq_scale, "rope_ext_factor": 1.0 if self.rope_scaling == "yarn" else 0.0,
            "rope_attn_factor": self.rope_attn_factor, "rope_beta_fast": self.rope_beta_fast,
            "rope_beta_slow": self.rope_beta_slow, "rope_n_ctx_orig": self.rope_n_ctx_orig,
        }


@dataclass(frozen=True)
class GenerationTimings:
    prompt_tokens: int
    prompt_seconds: float
    generated_tokens: int
    generate_seconds: float

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generation speed: tokens after the first (which comes from the prompt's logits) per second."""
        return (self.generated_tokens - 1) / self.generate_seconds \
            if self.generated_tokens > 1 and self.generate_seconds > 0 else 0.0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # 'stop' | 'length'
    timings: GenerationTimings
    logprobs: list[TokenLogprob] | None = None  # one per token of `tokens`, when the config asked (logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token after the first (prompt_logprobs)


@dataclass
class BatchEntry:
    """One sequence's part of a forward step.

    tokens       its new tokens (at least one)
    pos          position of tokens[0] (the number of tokens already in the cache for it)
    block_table  cache block ids covering positions [0, pos + len(tokens)), BLOCK_SIZE positions each
    logits       'last' (the next-token logits, shape (n_vocab,)), 'all' ((len(tokens), n_vocab)) or 'none'
    """

    tokens: Seq[int]
    pos: int
    block_table: Seq[int]
    logits: str = "last"


def kv_row_bytes(kv_dim: int, dtype: str) -> int:
    """Bytes of one position's K (or V) row of one layer: f16 halves, or q8_0 blocks of 32 (34 bytes each)."""
    return kv_dim * 2 if dtype == "f16" else kv_dim // 32 * 34


class Sequence:
    """One sequence over a private KV cache: `feed` appends tokens and returns their logits."""

    def __init__(self, model: Model, capacity: int, kv_cache_dtype: str = "f16"):
        if not 1 <= capacity <= model.n_ctx:
            raise ValueError(f"capacity {capacity} must be in [1, {model.n_ctx}] (the context size)")
        self.model = model
        self.capacity = capacity
        n_blocks = -(-capacity // BLOCK_SIZE)
        self.cache = model.new_kv_cache(n_blocks, BLOCK_SIZE, kv_cache_dtype)
        self.block_table = np.arange(n_blocks, dtype=np.int32)
        self.n_tokens = 0
        # one-token steps (decode) reuse these arguments of the core's forward: no per-step allocations
        self._token = np.zeros(1, dtype=np.int32)
        self._pos = np.zeros(1, dtype=np.int32)
        self._one = np.ones(1, dtype=np.int32)
        self._row = np.zeros(1, dtype=np.int32)
        self._tables = [self.block_table]
        # the last one-token step's argmax, where the core finds it (the CPU core does, during the step)
        self.last_argmax: int | None = None
        self._argmax = model.device == "cpu"

    def feed(self, tokens: Seq[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens (in steps of at most the model's max_batch_tokens); returns the logits after the last
        one (n_vocab,), or after each one (len(tokens), n_vocab) with all_logits."""
        if not all_logits and isinstance(tokens, list) and len(tokens) == 1 and type(tokens[0]) is int:
            return self._step(tokens[0])
        self.last_argmax = None
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size == 0:
            raise ValueError("feed: no tokens")
        if self.n_tokens + tokens.size > self.capacity:
            raise ValueError(f"sequence of {self.n_tokens + tokens.size} tokens exceeds its capacity of "
                             f"{self.capacity} (context size {self.model.n_ctx})")
        step = self.model.max_batch_tokens
        outs = []
        for i in range(0, tokens.size, step):
            chunk = tokens[i:i + step]
            last = i + step >= tokens.size
            mode = "all" if all_logits else ("last" if last else "none")
            out = self.model.forward_batch(self.cache, [BatchEntry(chunk, self.n_tokens, self.block_table, mode)])[0]
            self.n_tokens += chunk.size
            if out is not None:
                outs.append(out)
        return np.concatenate(outs) if all_logits else outs[-1]

    def _step(self, token: int) -> np.ndarray:
        if not 0 <= token < self.model.n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.model.n_vocab})")
        if self.n_tokens >= self.capacity:
            raise ValueError(f"sequence of {self.n_tokens + 1} tokens exceeds its capacity of {self.capacity} "
                             f"(context size {self.model.n_ctx})")
        self._token[0] = token
        self._pos[0] = self.n_tokens
        if self._argmax:
            out, ids = self.model.core.forward(self.cache, self._token, self._one, self._pos, self._tables, self._row,
                                               argmax=True)
            self.last_argmax = int(ids[0])
        else:
            out = self.model.core.forward(self.cache, self._token, self._one, self._pos, self._tables, self._row)
        self.n_tokens += 1
        return out[0]

    def truncate(self, n_tokens: int) -> None:
        """Forget every position from n_tokens on (they are overwritten by the next feed)."""
        if not 0 <= n_tokens <= self.n_tokens:
            raise ValueError(f"truncate: {n_tokens} is not in [0, {self.n_tokens}]")
        self.n_tokens = n_tokens
        self.last_argmax = None


class Model:
    """A loaded llama-family model. Build it with `Model.load`."""

    def __init__(self, path: Path, gguf: GGUFFile, config: ModelConfig, tokenizer: Any, core: Any,
                 n_ctx: int, max_batch_tokens: int, tensors: dict[str, Any], gpu: Any = None):
        self.path = path
        self.gguf = gguf
        self.config = config
        self.tokenizer = tokenizer
        self._core = core
        self.n_ctx = n_ctx
        self.max_batch_tokens = max_batch_tokens
        self._tensors = tensors
        self._stop_ids = frozenset(tokenizer.eog_ids) if tokenizer is not None else frozenset()
        self._gpu = gpu  # the CudaModel (whose .core is `core`) when loaded with device="cuda"
        self.kv_cache_dtype = "f16"  # how this model's own sequences (generate, stream, logits) store K and V

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path_or_name: str | os.PathLike, threads: int | None = None, n_ctx: int | None = None,
             max_batch_tokens: int = 512, device: str = "cpu", pack: bool = True,
             kv_cache_dtype: str = "f16") -> Model:
        """Load a GGUF file, or a pulled model by name (pulled now if missing).

        threads: size of the model's thread pool (default $REALIZAR_THREADS, else every available core).
        n_ctx: longest sequence (default: the model's training context).
        max_batch_tokens: tokens per forward step when feeding a long prompt.
        device: "cpu", or "cuda" to upload the weights, in their GGUF block types, to the first NVIDIA GPU
            and run every step there (DeviceError when no usable GPU or CUDA build exists).
        pack: give the Q4_0, Q4_1, Q5_0, Q8_0 and Q4_K matrices an interleaved copy for the SIMD products (about
            twice as fast batched; it takes their size again in memory, see `packed_bytes`). False reads the
            memory-mapped file only, whose pages every process loading the same file shares.
        kv_cache_dtype: how the model's own sequences (`generate`, `stream`, `logits`, `new_sequence`) store K
            and V: "f16", or "q8_0" (CPU only; about half the memory, as llama.cpp's --cache-type-k/v q8_0). An
            Engine's pool follows its EngineConfig.kv_cache_dtype.
        """
        from .hub import resolve

        device = _check_device(device)
        if not isinstance(pack, bool):
            raise ValueError(f"pack must be True or False, got {pack!r}")
        path = Path(resolve(path_or_name, pull_missing=True))
        threads = _thread_count(threads)
        if not isinstance(max_batch_tokens, int) or not 1 <= max_batch_tokens <= 1 << 16:
            raise ValueError(f"max_batch_tokens must be an integer in [1, 65536], got {max_batch_tokens!r}")
        gf = GGUFFile(path)
        try:
            tensors = gf.tensors
            emb = tensors.get("token_embd.weight")
            if emb is None:
                raise ModelError(f"{path}: missing tensor token_embd.weight")
            if len(emb.shape) != 2:
                raise ModelError(f"{path}: tensor token_embd.weight has shape {emb.shape}, expected (n_vocab, n_embd)")
            config = ModelConfig.from_gguf(gf, n_vocab=int(emb.shape[0]))
            if n_ctx is None:
                n_ctx = config.n_ctx_train
            if not isinstance(n_ctx, int) or not 1 <= n_ctx <= config.n_ctx_train:
                raise ValueError(f"n_ctx must be an integer in [1, {config.n_ctx_train}] (the model's context), got {n_ctx!r}")
            globals_, layers = _map_tensors(gf, config)
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_metadata(gf.metadata)
            if tokenizer.vocab_size > config.n_vocab:
                raise ModelError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embeddings only "
                                 f"{config.n_vocab} rows")
            gpu = None
            if device == "cuda":
                gpu = _cuda_model(path, gf, config, globals_, layers, n_ctx, max_batch_tokens)
                core = gpu.core
            else:
                core = _load_core().CoreModel(config.core_dict(), globals_, layers, threads, pack)
            model = cls(path, gf, config, tokenizer, core, n_ctx, max_batch_tokens, tensors, gpu)
            model.kv_cache_dtype = model._check_kv_dtype(kv_cache_dtype)
        except BaseException:
            gf.close()
            raise
        return model

    def close(self) -> None:
        """Release the weights (the model is unusable afterwards)."""
        self._core = None
        self._gpu = None
        self.gguf.close()

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    @property
    def packed_bytes(self) -> int:
        """Memory the packed weight copies take (0 when loaded with pack=False, or on a GPU)."""
        return int(getattr(self._core, "packed_bytes", 0))

    @property
    def device(self) -> str:
        """"cpu" or "cuda": where the forward steps run."""
        return "cpu" if self._gpu is None else "cuda"

    @property
    def threads(self) -> int:
        """CPU threads of the forward step (a GPU model: 1, the thread driving the device)."""
        return self._core.threads if self._gpu is None else 1

    @property
    def n_params(self) -> int:
        return int(sum(t.n_elements for t in self._tensors.values()))

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def quantization(self) -> str:
        """The block type holding most of the weights ('Q4_1', 'Q4_K'...)."""
        by_type: dict[str, int] = {}
        for t in self._tensors.values():
            if len(t.shape) == 2:
                by_type[t.type] = by_type.get(t.type, 0) + t.nbytes
        return max(by_type, key=by_type.get) if by_type else "F32"

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.name!r}, {c.architecture}, {c.n_layer} layers, {c.n_embd} dims, {self.quantization}, "
                f"n_ctx={self.n_ctx}, " + (f"threads={self.threads})" if self._gpu is None else "device='cuda')"))

    # -- text ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Seq[int]) -> str:
        return self.tokenizer.decode(self._check_tokens(tokens, "tokens"))

    def apply_chat_template(self, messages: Seq[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    # -- the forward step ---------------------------------------------------------------------------------

    @property
    def core(self) -> Any:
        """The C++ CoreModel: core.forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows) -> logits."""
        return self._core

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def n_kv_dim(self) -> int:
        return self.config.kv_dim

    def kv_bytes_per_token(self, dtype: str = "f16") -> int:
        """Bytes one position takes in a KV cache of `dtype`: K and V rows of every layer."""
        return 2 * self.config.n_layer * kv_row_bytes(self.config.kv_dim, self._check_kv_dtype(dtype))

    def new_kv_cache(self, n_blocks: int, block_size: int = BLOCK_SIZE, dtype: str = "f16") -> Any:
        """A paged KV cache of n_blocks blocks of block_size positions, K and V stored as `dtype` ('f16', as
        llama.cpp by default, or 'q8_0': about half the memory); memory is committed as it is written."""
        self._check_kv_dtype(dtype)
        if self._gpu is not None:
            return self._gpu.new_kv_cache(int(n_blocks), int(block_size))
        c = self.config
        return _load_core().KVCache(c.n_layer, c.kv_dim, int(n_blocks), int(block_size), dtype, c.head_dim)

    def _check_kv_dtype(self, dtype: str) -> str:
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {dtype!r}")
        if dtype == "q8_0":
            if self._gpu is not None:
                raise ValueError("kv_cache_dtype 'q8_0' runs on the CPU only: the CUDA backend keeps K and V as f16")
            if self.config.head_dim % 32:
                raise ValueError(f"kv_cache_dtype 'q8_0' needs a head dimension that is a multiple of 32; "
                                 f"{self.name} has {self.config.head_dim}")
        return dtype

    def kv_memory_budget(self) -> int | None:
        """Bytes a serving engine's KV pool may take by default: on a GPU, CudaModel.kv_memory_budget (90% of
        the free device memory less 256 MiB); on the CPU None (the engine takes a share of host memory)."""
        return None if self._gpu is None else self._gpu.kv_memory_budget()

    def sampler(self, config: GenerationConfig, prompt_tokens: Seq[int] = ()) -> Sampler:
        """A per-request sampler (its own seeded random generator)."""
        return Sampler(config, prompt_tokens)

    def forward_batch(self, cache: Any, entries: Seq[BatchEntry]) -> list[np.ndarray | None]:
        """One forward step over several sequences at once (the GIL is released while it runs).

        Appends each entry's tokens to `cache` at positions [pos, pos + len(tokens)) through its block table
        and returns, per entry, the logits it asked for: a view of one float32 array.
        """
        if not entries:
            return []
        tokens, lens, pos0, tables, rows, spans = [], [], [], [], [], []
        n = 0
        for e in entries:
            t = np.asarray(e.tokens, dtype=np.int32).reshape(-1)
            if t.size == 0:
                raise ValueError("forward_batch: an entry has no tokens")
            if e.logits not in ("last", "all", "none"):
                raise ValueError(f"forward_batch: logits must be 'last', 'all' or 'none', got {e.logits!r}")
            if not (0 <= int(e.pos) and int(e.pos) + t.size <= self.n_ctx):
                raise ValueError(f"forward_batch: positions {e.pos}..{int(e.pos) + t.size} exceed the context "
                                 f"size {self.n_ctx}")
            tokens.append(t)
            lens.append(t.size)
            pos0.append(int(e.pos))
            tables.append(np.asarray(e.block_table, dtype=np.int32))
            first = len(rows)
            if e.logits == "last":
                rows.append(n + t.size - 1)
            elif e.logits == "all":
                rows.extend(range(n, n + t.size))
            spans.append((first, len(rows), e.logits))
            n += t.size
        out = self._core.forward(cache, np.concatenate(tokens), np.asarray(lens, dtype=np.int32),
                                 np.asarray(pos0, dtype=np.int32), tables, np.asarray(rows, dtype=np.int32))
        return [None if mode == "none" else (out[a] if mode == "last" else out[a:b]) for a, b, mode in spans]

    def new_sequence(self, capacity: int | None = None, kv_cache_dtype: str | None = None) -> Sequence:
        """A sequence with a private cache for up to `capacity` tokens (default: the context size), K and V
        stored as kv_cache_dtype ('f16' or 'q8_0'; default: the model's, as loaded)."""
        return Sequence(self, self.n_ctx if capacity is None else int(capacity),
                        self.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype)

    def logits(self, tokens: Seq[int]) -> np.ndarray:
        """float32 logits (n_vocab,) after the last of `tokens`, in a fresh context."""
        tokens = self._check_tokens(tokens, "tokens")
        if not tokens:
            raise ValueError("tokens: empty")
        self._check_prompt_length(len(tokens))
        return np.array(self.new_sequence(len(tokens)).feed(tokens))

    # -- generation ---------------------------------------------------------------------------------------

    def generate(self, prompt: str | Seq[int], config: GenerationConfig | None = None, **fields: Any) -> GenerationResult:
        """Generate a completion of `prompt` (text, tokenized with special tokens parsed, or token ids)."""
        run = self._start(prompt, GenerationConfig.from_fields(config, **fields))
        parts = []
        while True:
            try:
                parts.append(next(run))
            except StopIteration as done:
                tokens, finish, timings, logprobs, prompt_logprobs = done.value
                return GenerationResult("".join(parts), tokens, finish, timings, logprobs, prompt_logprobs)

    def stream(self, prompt: str | Seq[int], config: GenerationConfig | None = None, **fields: Any) -> Iterator[str]:
        """Like generate, yielding text deltas as they are decided (never half a UTF-8 character, never text
        past a stop string). Bad options or prompts raise here, not at the first delta."""
        return self._start(prompt, GenerationConfig.from_fields(config, **fields))

    def prompt_tokens(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt: text is tokenized with the model's special tokens added and parsed."""
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        elif isinstance(prompt, (bytes, bytearray)):
            raise ValueError("prompt: expected a string or a list of token ids, got bytes")
        else:
            tokens = self._check_tokens(prompt, "prompt")
        if not tokens:
            raise ValueError("prompt: empty (no tokens)")
        self._check_prompt_length(len(tokens))
        return tokens

    def _start(self, prompt: str | Seq[int], config: GenerationConfig):
        """Validate and tokenize now; the returned generator yields text deltas and returns
        (tokens, finish_reason, timings, logprobs or None, prompt_logprobs or None)."""
        return self._decode(self.prompt_tokens(prompt), config)

    def _decode(self, tokens: list[int], config: GenerationConfig):
        budget = min(config.max_tokens, self.n_ctx - len(tokens) + 1)  # the last token is never fed back
        seq = self.new_sequence(min(self.n_ctx, len(tokens) + budget))
        sampler = Sampler(config, tokens)
        stop_ids = set(config.stop_token_ids) | (set() if config.ignore_eos else set(self._stop_ids))
        detok = self.tokenizer.detokenizer(strip_space_prefix=False)
        stops = StopStrings(config.stop)
        out: list[int] = []
        logprobs: list[TokenLogprob] | None = None if config.logprobs is None else []
        finish = "length"

        t0 = time.perf_counter()
        prompt_logprobs = None
        if config.prompt_logprobs is None:
            logits = seq.feed(tokens)
        else:  # a step's rows at a time: row j is the distribution of the token after position i + j
            prompt_logprobs, step = [], self.max_batch_tokens
            for i in range(0, len(tokens), step):
                rows = seq.feed(tokens[i:i + step], all_logits=True)
                prompt_logprobs.extend(token_logprob(rows[j], tokens[i + j + 1], config.prompt_logprobs)
                                       for j in range(min(rows.shape[0], len(tokens) - 1 - i)))
            logits = rows[-1]
        t1 = time.perf_counter()
        while len(out) < budget:
            token = sampler.sample(logits, argmax=seq.last_argmax)
            if token in stop_ids:
                finish = "stop"
                break
            out.append(token)
            if logprobs is not None:
                logprobs.append(token_logprob(logits, token, config.logprobs))
            sampler.accept(token)
            text, stopped = stops.feed(detok.add(token))
            if text:
                yield text
            if stopped:
                finish = "stop"
                break
            if len(out) < budget:
                logits = seq.feed([token])
        t2 = time.perf_counter()
        if not stops.stopped:
            text, stopped = stops.feed(detok.flush())
            if not stopped:
                text += stops.flush()
            else:
                finish = "stop"
            if text:
                yield text
        return out, finish, GenerationTimings(len(tokens), t1 - t0, len(out), t2 - t1), logprobs, prompt_logprobs

    # -- checks -------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens: Seq[int], what: str) -> list[int]:
        if isinstance(tokens, (str, bytes)):
            raise ValueError(f"{what}: expected a list of token ids, got {type(tokens).__name__}")
        try:
            arr = np.asarray(tokens)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: expected a list of token ids") from None
        if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
            raise ValueError(f"{what}: expected a flat list of integer token ids")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        return [int(t) for t in arr.reshape(-1)]

    def _check_prompt_length(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"prompt: {n} tokens is longer than the context of {self.n_ctx} tokens")


DEVICES = ("cpu", "cuda")


def _check_device(device: Any) -> str:
    if not isinstance(device, str) or device.strip().lower() not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    return device.strip().lower()


def _cuda_model(path: Path, gf: GGUFFile, config: ModelConfig, globals_: dict, layers: list, n_ctx: int,
                max_batch_tokens: int) -> Any:
    """The model's weights uploaded to the GPU (realizar.cuda_backend.CudaModel), or DeviceError saying why not."""
    from .cuda_backend import CudaModel

    try:
        return CudaModel(config.core_dict(), globals_, layers, n_ctx=n_ctx, max_step_tokens=max_batch_tokens,
                         source=gf)
    except RuntimeError as e:
        raise DeviceError(f"{path}: cannot run on device 'cuda': {e}") from None
    except ValueError as e:  # a weight type or shape the GPU kernels do not cover
        raise ModelError(f"{path}: not supported on device 'cuda': {e}") from None


def _thread_count(threads: int | None) -> int:
    if threads is None:
        env = os.environ.get("REALIZAR_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise ValueError(f"REALIZAR_THREADS={env!r} is not an integer") from None
        else:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise ValueError(f"threads must be an integer in [1, 1024], got {threads!r}")
    return threads


def _map_tensors(gf: GGUFFile, c: ModelConfig) -> tuple[dict[str, tuple], list[dict[str, tuple]]]:
    """The file's tensors under our names as (type_id, shape, data) for the core, checked against TENSORS."""
    where = str(gf.path)
    tensors = gf.tensors
    globals_: dict[str, tuple] = {}
    layers: list[dict[str, tuple]] = [{} for _ in range(c.n_layer)]
    for gguf_name, (ours, dims, required) in TENSORS.items():
        expected = tuple(getattr(c, d) for d in dims)
        for i in range(c.n_layer) if "{i}" in gguf_name else (None,):
            name = gguf_name.format(i=i) if i is not None else gguf_name
            t = tensors.get(name)
            if t is None:
                if required:
                    raise ModelError(f"{where}: missing tensor {name}")
                continue
            if t.type_id not in SUPPORTED_TYPES:
                raise ModelError(f"{where}: tensor {name} has type {t.type}, which is not supported "
                                 f"(supported: {', '.join(sorted(x.name for x in SUPPORTED_TYPES))})")
            if tuple(t.shape) != expected:
                raise ModelError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {expected}")
            entry = (int(t.type_id), list(t.shape), t.data)
            (globals_ if i is None else layers[i])[ours] = entry
    return globals_, layers
