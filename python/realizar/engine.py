"""The serving engine: continuous batching of many requests over one model's paged KV cache.

One engine per loaded model owns one scheduler thread. Every step it asks the `Scheduler` for work (one
decode token of every running sequence plus prefill chunks of new ones, within `max_num_seqs` and
`max_batched_tokens`), runs ONE batched forward over the block tables (the GIL is released in C++), samples
one token per sequence that reached the end of its known tokens (a plain greedy one takes the argmax the forward's
threads found), and hands the new text to the requests' consumers: to an asyncio loop with
`loop.call_soon_threadsafe` (one call per loop per step), or to a plain queue for threads. A request whose config
asks for log-probabilities (`logprobs`, `prompt_logprobs`) gets `TokenLogprob`s with its outputs.

    with realizar.Engine(model, realizar.EngineConfig(max_num_seqs=16)) as engine:
        print(engine.generate("The capital of France is", max_tokens=16).text)
        handle = engine.submit("Once upon a time", realizar.GenerationConfig(max_tokens=32))
        for out in handle:              # or `async for out in handle` when submitted on an event loop
            print(out.text, end="")

Observability: `EngineConfig(observer=obj)` or `engine.add_observer(obj)`. The engine thread calls, when the
observer has them (every method optional; keep them quick, exceptions are logged and ignored):
    obj.on_step(StepStats)                 after every step
    obj.on_first_token(RequestStats)       a request's first token (queue_time and ttft are set)
    obj.on_token(request_id, seconds)      every later token, with its inter-token latency
    obj.on_request_finished(RequestStats)  once per request, whatever the reason
`engine.stats()` gives the gauges and counters at any time, from any thread.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import QueueFull
from .kv_blocks import BlockManager
from .model import GenerationResult, GenerationTimings
from .sampling import GenerationConfig, StopStrings, TokenLogprob, token_logprob
from .types import KV_CACHE_DTYPES

__all__ = ["Engine", "EngineConfig", "RequestHandle", "RequestOutput", "RequestStats", "StepStats", "Scheduler"]

log = logging.getLogger("realizar.engine")

FINISH_REASONS = ("stop", "length", "timeout", "cancelled", "error")


# ---------------------------------------------------------------------------------------------------------
# Configuration and the records handed to consumers and observers
# ---------------------------------------------------------------------------------------------------------

@dataclass
class EngineConfig:
    """How one engine batches and how much KV memory it takes."""
    max_num_seqs: int = 32              # sequences in one step (running requests)
    max_batched_tokens: int = 512       # tokens in one step: decodes + prefill chunks
    prefill_chunk: int = 256            # most prompt tokens of one sequence in one step
    max_queue: int = 1024               # waiting requests before submit raises QueueFull
    kv_cache_bytes: int | None = None   # KV pool; None: min(25% of available memory, max_num_seqs full contexts)
    block_size: int = 16                # positions per KV block
    max_model_len: int | None = None    # context per sequence (prompt + generated); None: the model's
    request_timeout: float | None = None  # seconds from submit to the end; None: no deadline
    prefix_caching: bool = True
    kv_cache_dtype: str = "f16"         # K/V storage: "f16" (llama.cpp's default) or "q8_0" (about half the memory)
    observer: Any = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batched_tokens", "prefill_chunk", "max_queue", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_bytes is not None and (not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 1):
            raise ValueError(f"EngineConfig.kv_cache_bytes must be a positive integer, got {self.kv_cache_bytes!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"EngineConfig.request_timeout must be > 0 seconds, got {self.request_timeout!r}")


@dataclass
class RequestStats:
    """One request's sizes and latencies (seconds, time.monotonic clock)."""
    request_id: str
    prompt_tokens: int
    generated_tokens: int = 0
    cached_tokens: int = 0              # prompt tokens served from the prefix cache on first admission
    finish_reason: str | None = None
    arrival_time: float = 0.0
    queue_time: float | None = None     # arrival -> first scheduled
    ttft: float | None = None           # arrival -> first token
    e2e: float | None = None            # arrival -> finished
    inter_token_latencies: list[float] = field(default_factory=list)
    preemptions: int = 0


@dataclass
class StepStats:
    """One engine step."""
    batch_size: int                     # sequences in the forward
    num_tokens: int                     # tokens in the forward
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int                    # after the step
    num_waiting: int
    num_preempted: int
    kv_blocks_used: int
    kv_blocks_total: int
    duration: float                     # seconds, schedule + forward + sampling

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total


@dataclass
class RequestOutput:
    """What a request produced since its previous output; the last one has `finish_reason` set."""
    request_id: str
    text: str                           # new text (never a split UTF-8 character, never past a stop string)
    token_ids: list[int]                # new token ids
    finish_reason: str | None = None    # 'stop' | 'length' | 'timeout' | 'cancelled' | 'error'
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0       # tokens handed out so far (end-of-generation tokens are not)
    stats: RequestStats | None = None   # on the last output
    error: BaseException | None = None  # with finish_reason 'error'
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked (logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output: per prompt token after the first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------------------------------------------------
# The model, as the engine uses it
# ---------------------------------------------------------------------------------------------------------

class _ModelRunner:
    """The few things the engine needs from a `realizar.Model`: tokens in, a KV pool, one batched forward,
    a sampler and a streaming detokenizer per request."""

    def __init__(self, model: Any, kv_cache_dtype: str = "f16"):
        self.model = model
        self.kv_cache_dtype = kv_cache_dtype
        tok = model.tokenizer
        self.tokenizer = tok
        self.eog_ids = frozenset(tok.eog_ids)
        self.n_vocab = int(tok.vocab_size)
        self.n_ctx = int(model.n_ctx)
        self.n_layer = int(model.n_layer)
        self.n_kv_dim = int(model.n_kv_dim)
        self.core = model.core

    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(self.kv_cache_dtype)

    def kv_memory_budget(self) -> int | None:
        """Bytes the KV pool may take where the model says (a GPU model), else None (host memory rule)."""
        return self.model.kv_memory_budget()

    def new_cache(self, n_blocks: int, block_size: int) -> Any:
        return self.model.new_kv_cache(n_blocks, block_size, self.kv_cache_dtype)

    def tokenize(self, text: str) -> list[int]:
        return self.model.prompt_tokens(text)    # as Model.generate: special tokens added and parsed

    def detokenizer(self) -> Any:
        return self.tokenizer.detokenizer(strip_space_prefix=False)  # a continuation, as Model.generate

    def sampler(self, config: Any) -> Any:
        return self.model.sampler(config)

    def forward(self, cache: Any, tokens: np.ndarray, seq_lens: np.ndarray, pos0: np.ndarray,
                block_tables: list[np.ndarray], logit_rows: np.ndarray) -> np.ndarray:
        return self.core.forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows)

    def forward_argmax(self, cache: Any, tokens: np.ndarray, seq_lens: np.ndarray, pos0: np.ndarray,
                       block_tables: list[np.ndarray], logit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """forward, and each logit row's argmax (int32), which the CPU core finds while the rows are hot."""
        if self.model.device != "cpu":
            logits = self.forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows)
            return logits, logits.argmax(axis=1).astype(np.int32)
        return self.core.forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows, argmax=True)


def _generation_config(config: Any, fields: dict) -> Any:
    if config is None or isinstance(config, GenerationConfig):
        return GenerationConfig.from_fields(config, **fields)
    if fields:  # a config-like object of a test or another backend
        raise TypeError("pass either a config or keyword fields, not both")
    return config


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def kv_pool_blocks(config: EngineConfig, bytes_per_token: int, max_model_len: int,
                   memory_budget: int | None = None) -> int:
    """Blocks of the KV pool: from kv_cache_bytes, or by default the smaller of the memory budget and what
    max_num_seqs full contexts need (never less than one full context). The budget is the model's own
    (a GPU model: most of the device's free memory), else a quarter of the available host memory."""
    block_bytes = bytes_per_token * config.block_size
    ctx_blocks = -(-max_model_len // config.block_size)
    if config.kv_cache_bytes is not None:
        return max(1, config.kv_cache_bytes // block_bytes)
    budget = config.max_num_seqs * ctx_blocks * block_bytes
    if memory_budget is None:
        avail = _mem_available()
        memory_budget = None if avail is None else avail // 4
    if memory_budget is not None:
        budget = min(budget, memory_budget)
    return max(ctx_blocks, budget // block_bytes)


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_keys = itertools.count()


class _Request:
    """One request's state; touched by the engine thread only, except `cancelled`."""

    def __init__(self, request_id: str, prompt: list[int], config: Any, sampler: Any, detok: Any,
                 max_tokens: int, max_len: int, deadline: float | None, now: float):
        self.id = request_id                # the caller's name for it, not necessarily unique
        self.key = next(_keys)              # ours, unique: block tables and sampled tokens are keyed by it
        self.tokens = prompt                # prompt + generated: the sequence whose K/V the blocks hold
        self.num_prompt = len(prompt)
        self.num_computed = 0               # positions whose K/V are in the cache
        self.status = WAITING
        self.config = config
        self.sampler = sampler
        self.takes_argmax = bool(getattr(sampler, "takes_argmax", False))  # greedy: the core's argmax decides
        self.detok = detok
        self.stops = StopStrings(getattr(config, "stop", None) or ())
        self.stop_ids = frozenset(getattr(config, "stop_token_ids", None) or ())
        self.ignore_eos = bool(getattr(config, "ignore_eos", False))
        self.logprobs: int | None = getattr(config, "logprobs", None)  # alternatives per token, or None
        self.prompt_logprobs: int | None = getattr(config, "prompt_logprobs", None)  # the same for the prompt
        self.prompt_lps: list[TokenLogprob] = []  # computed so far (positions 1 ..), handed out with the first output
        self.prompt_lps_sent = False
        self.max_tokens = max_tokens
        self.max_len = max_len              # positions the sequence may fill (context or KV pool)
        self.expect_len = min(len(prompt) + max_tokens, max_len)  # where its KV blocks go (kv_blocks)
        self.num_emitted = 0                # generated tokens handed out (an end-of-generation token is not)
        self.deadline = deadline
        self.cancelled = False
        self.table: np.ndarray | None = None  # the block table as passed to the forward
        self.stats = RequestStats(request_id, len(prompt), arrival_time=now)
        self.last_token_time = 0.0
        # where outputs go: an asyncio.Queue on `loop`, or a queue.SimpleQueue
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sink: Any = None
        # a caller that only wants the end (Engine.generate): outputs are held and handed over with the last
        # one, so its thread is not woken every step to take the CPU from the step's compute threads
        self.collect = False
        self.held: list[RequestOutput] = []
        self.handle_ref: Callable[[], Any] = lambda: None


class RequestHandle:
    """A submitted request: iterate it (`for` in a thread, `async for` on the loop that submitted it) for
    `RequestOutput`s; `cancel()` from any thread. Dropping the handle cancels the request."""

    def __init__(self, engine: Engine, req: _Request):
        self._engine = engine
        self._req = req
        self.request_id = req.id
        self.prompt_tokens: list[int] = list(req.tokens)
        self._done = False

    @property
    def finished(self) -> bool:
        """True once the last output has been taken."""
        return self._done

    def cancel(self) -> None:
        """Ends the request at the next step (finish_reason 'cancelled') and frees its KV blocks."""
        if not self._req.cancelled:
            self._req.cancelled = True
            self._engine._wake()

    def _check(self, out: RequestOutput) -> RequestOutput:
        if out.finished:
            self._done = True
            if out.error is not None:
                raise out.error
        return out

    # blocking
    def __iter__(self) -> Iterator[RequestOutput]:
        return self

    def __next__(self) -> RequestOutput:
        if self._done:
            raise StopIteration
        if self._req.loop is not None:
            raise RuntimeError("this request was submitted on an event loop: iterate it with `async for`")
        return self._check(self._req.sink.get())

    def result(self) -> Any:
        """Blocks until the end; a GenerationResult of the whole completion."""
        return _collect(self, list(self))

    # asyncio
    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._req.loop is None:  # submitted from a thread: wait for the plain queue off the loop
            return self._check(await asyncio.to_thread(self._req.sink.get))
        return self._check(await self._req.sink.get())

    async def aresult(self) -> Any:
        """Awaits the end; a GenerationResult of the whole completion."""
        return _collect(self, [out async for out in self])

    # cancel on leaving a `with` / `async with` block early
    def __enter__(self) -> RequestHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._done:
            self.cancel()

    async def __aenter__(self) -> RequestHandle:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self._done:
            self.cancel()

    def __repr__(self) -> str:
        return f"RequestHandle({self.request_id!r}, finished={self._done})"


def _collect(handle: RequestHandle, outs: list[RequestOutput]) -> GenerationResult:
    last = outs[-1]
    s = last.stats
    prefill = (s.ttft or 0.0) - (s.queue_time or 0.0)
    timings = GenerationTimings(prompt_tokens=last.num_prompt_tokens, prompt_seconds=max(prefill, 0.0),
                                generated_tokens=last.num_generated_tokens,
                                generate_seconds=(s.e2e or 0.0) - (s.ttft or 0.0))
    req = handle._req
    logprobs = None if req.logprobs is None else [lp for o in outs for lp in o.logprobs or ()]
    prompt_logprobs = None if req.prompt_logprobs is None else \
        next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), [])
    return GenerationResult("".join(o.text for o in outs), [t for o in outs for t in o.token_ids],
                            last.finish_reason, timings, logprobs, prompt_logprobs)


# ---------------------------------------------------------------------------------------------------------
# The scheduler: policy only, no threads, no model
# ---------------------------------------------------------------------------------------------------------

@dataclass
class SchedulerOutput:
    """One step's work: (request, number of its tokens to compute from request.num_computed)."""
    scheduled: list[tuple[_Request, int]]
    preempted: list[_Request]
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class Scheduler:
    """Which sequences run in the next step and with how many tokens; owns the KV block bookkeeping.

    A sequence is `tokens` (prompt, then every sampled token) of which `num_computed` have K/V in the cache;
    each step computes some of the rest. A decode is the case of one token left. FCFS: running sequences
    first (oldest first), then the head of the waiting queue; no new admissions in a step that preempted.
    """

    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.watermark = max(1, blocks.num_blocks // 100)  # free blocks kept when admitting beside others
        self.num_preemptions = 0
        self.prefix_cache_queries = 0   # full prompt blocks looked up on admission
        self.prefix_cache_hits = 0      # of them, found in the cache

    def add_request(self, req: _Request) -> None:
        """Queue a new request at the back of the waiting queue (the engine enforces max_queue)."""
        req.status = WAITING
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        """Pick the next step's work within max_num_seqs, max_batched_tokens and the free KV blocks.

        Every running sequence gets min(tokens left, prefill_chunk) tokens while the token budget lasts, with
        blocks to hold them; when the pool is short, the newest running sequence is preempted (its blocks
        freed, its tokens to be recomputed; it goes to the front of the waiting queue) until the block fits.
        Then waiting sequences are admitted in order — starting from their longest cached prefix — while a
        sequence slot, budget and blocks (beyond a small watermark) remain.
        """
        cfg, blocks = self.config, self.blocks
        budget = cfg.max_batched_tokens
        out = SchedulerOutput([], [])
        running = self.running
        # prefill chunks of running sequences leave room for every decode, wherever it stands in the list
        decodes_left = sum(len(r.tokens) - r.num_computed == 1 for r in running)
        i = 0
        while i < len(running):
            req = running[i]
            left = len(req.tokens) - req.num_computed
            if left == 1:
                decodes_left -= 1
                n = min(1, budget)
            else:
                n = min(left, budget - decodes_left, cfg.prefill_chunk)
            if n <= 0:
                i += 1
                continue
            while not blocks.allocate(req.key, req.num_computed + n):
                victim = running.pop()  # the newest; not scheduled yet in this step (it stands after i)
                if victim is not req and len(victim.tokens) - victim.num_computed == 1:
                    decodes_left -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self._add(out, req, n)
                budget -= n
                i += 1
        while self.waiting and not out.preempted and len(running) < cfg.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.cancelled:
                break  # the engine reaps it before the next step
            first = req.status == WAITING and req.stats.queue_time is None
            # (a request for its prompt's log-probabilities computes every position: no cached prefix)
            req.num_computed = blocks.match_prefix(req.key, req.tokens if req.prompt_logprobs is None else ())
            n = min(len(req.tokens) - req.num_computed, budget, cfg.prefill_chunk)
            need = blocks.blocks_for(req.num_computed + n) - len(blocks.block_table(req.key))
            if need + (self.watermark if running else 0) > blocks.num_free:
                blocks.free(req.key)
                req.num_computed = 0
                break
            blocks.allocate(req.key, req.num_computed + n, req.expect_len)
            if first:
                self.prefix_cache_queries += (len(req.tokens) - 1) // blocks.block_size
                self.prefix_cache_hits += req.num_computed // blocks.block_size
                req.stats.cached_tokens = req.num_computed
            self.waiting.popleft()
            req.status = RUNNING
            req.table = None
            running.append(req)
            self._add(out, req, n)
            budget -= n
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Account for a computed step: advance num_computed, register newly full blocks in the prefix cache,
        append the token sampled for each sequence that produced logits (request key -> token id)."""
        bs = self.blocks.block_size
        for req, n in out.scheduled:
            req.num_computed += n
            if req.num_computed % bs < n:  # a block filled up in this step
                self.blocks.commit(req.key, req.tokens, req.num_computed)
            token = sampled.get(req.key)
            if token is not None:
                req.tokens.append(token)

    def finish_requests(self, reqs: Sequence[_Request]) -> None:
        """Remove requests (finished, cancelled, timed out) from either queue and free their blocks."""
        if not reqs:
            return
        gone = {id(r) for r in reqs}
        self.running = [r for r in self.running if id(r) not in gone]
        if any(r.status == WAITING for r in reqs):
            self.waiting = deque(r for r in self.waiting if id(r) not in gone)
        for req in reqs:
            self.blocks.free(req.key)
            req.status = FINISHED

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --

    def _add(self, out: SchedulerOutput, req: _Request, n: int) -> None:
        out.scheduled.append((req, n))
        if len(req.tokens) - req.num_computed == 1:
            out.num_decode_tokens += 1
        else:
            out.num_prefill_tokens += n

    def _preempt(self, req: _Request) -> None:
        self.blocks.free(req.key)
        req.num_computed = 0
        req.table = None
        req.status = WAITING
        req.stats.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------

_ids = itertools.count()


class Engine:
    """Continuous batching over one model; see the module docstring. A context manager: leaving it drains."""

    def __init__(self, model: Any, config: EngineConfig | None = None, *, _runner: Any = None):
        self.config = config = config or EngineConfig()
        self.model = model
        self._runner = runner = _runner or _ModelRunner(model, config.kv_cache_dtype)
        runner_dtype = getattr(runner, "kv_cache_dtype", "f16")  # runners without the attribute keep f16
        if runner_dtype != config.kv_cache_dtype:
            raise ValueError(f"EngineConfig.kv_cache_dtype {config.kv_cache_dtype!r}: this runner keeps K and V as "
                             f"{runner_dtype}")
        self.max_model_len = min(config.max_model_len or runner.n_ctx, runner.n_ctx)
        budget = getattr(runner, "kv_memory_budget", None)
        n_blocks = kv_pool_blocks(config, runner.kv_bytes_per_token(), self.max_model_len,
                                  budget() if budget is not None else None)
        self._cache = runner.new_cache(n_blocks, config.block_size)
        self._forward_argmax = getattr(runner, "forward_argmax", None)  # optional: (logits, argmax per row)
        self._blocks = BlockManager(n_blocks, config.block_size, config.prefix_caching)
        self._sched = Scheduler(config, self._blocks)
        # a sequence never outgrows the pool: it would have to preempt itself forever
        self._max_len = min(self.max_model_len, n_blocks * config.block_size)
        self._observers: list[Any] = [config.observer] if config.observer is not None else []
        runner.detokenizer()  # builds the tokenizer's piece table (~0.1 s) now rather than in the first request

        self._cv = threading.Condition()
        self._incoming: list[_Request] = []
        self._closing = False
        self._abort = False
        self._num_waiting = 0           # scheduler's waiting queue length, as of the last step
        self._counters = {"requests_submitted": 0, "requests_finished": 0, "steps": 0,
                          "prompt_tokens": 0, "generation_tokens": 0}
        self._finish_counts = dict.fromkeys(FINISH_REASONS, 0)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="realizar-engine", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], config: Any = None, *, request_id: str | None = None,
               timeout: float | None = None, collect: bool = False, **fields: Any) -> RequestHandle:
        """Queue a request; returns its handle at once. Raises QueueFull when max_queue requests wait,
        ValueError for an empty prompt or one that leaves no room to generate, RuntimeError once closing.

        Called on a running event loop, the handle is iterated with `async for` on that loop; otherwise with
        `for` (blocking). `timeout` (seconds; default EngineConfig.request_timeout) ends the request with
        finish_reason 'timeout'. `config` is a GenerationConfig, or its fields are given as keywords.
        collect=True: the outputs are held and handed over together at the end (for a caller that wants only the
        whole completion: its thread or loop is not woken every step).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return self._submit(prompt, _generation_config(config, fields), request_id, timeout, loop, collect)

    def generate(self, prompt: str | Sequence[int], config: Any = None, *, timeout: float | None = None,
                 **fields: Any) -> Any:
        """Blocking: the whole completion as a GenerationResult. Thread-safe; concurrent callers share steps."""
        return self._submit(prompt, _generation_config(config, fields), None, timeout, None, collect=True).result()

    def _submit(self, prompt: Any, config: Any, request_id: str | None, timeout: float | None,
                loop: asyncio.AbstractEventLoop | None, collect: bool = False) -> RequestHandle:
        tokens = self._runner.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt: empty (no tokens)")
        n_vocab = self._runner.n_vocab
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary of {n_vocab} tokens")
        if len(tokens) > self._max_len:
            raise ValueError(f"prompt: {len(tokens)} tokens is longer than the context of {self._max_len} tokens")
        timeout = self.config.request_timeout if timeout is None else timeout
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        now = time.monotonic()
        max_tokens = int(getattr(config, "max_tokens", None) or self._max_len)
        req = _Request(request_id or f"req-{next(_ids)}", tokens, config, self._runner.sampler(config),
                       self._runner.detokenizer(), max_tokens, self._max_len,
                       now + timeout if timeout is not None else None, now)
        req.loop = loop
        req.collect = collect
        req.sink = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        handle = RequestHandle(self, req)
        req.handle_ref = weakref.ref(handle)
        with self._cv:
            if self._closing:
                raise RuntimeError("engine is closed")
            if len(self._incoming) + self._num_waiting >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests already waiting")
            self._incoming.append(req)
            self._counters["requests_submitted"] += 1
            self._cv.notify()
        return handle

    def stats(self) -> dict[str, Any]:
        """Gauges and counters, safe to call from any thread."""
        blocks, sched = self._blocks, self._sched
        out = {
            "num_running": len(sched.running),
            "num_waiting": self._num_waiting + len(self._incoming),
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_used": blocks.num_used,
            "kv_blocks_free": blocks.num_free,
            "kv_cache_usage": blocks.num_used / blocks.num_blocks,
            "kv_cache_bytes": int(getattr(self._cache, "nbytes", 0)),
            "block_size": blocks.block_size,
            "prefix_cache_blocks": blocks.num_cached,
            "prefix_cache_queries": sched.prefix_cache_queries,
            "prefix_cache_hits": sched.prefix_cache_hits,
            "num_preemptions": sched.num_preemptions,
            "max_num_seqs": self.config.max_num_seqs,
            "kv_cache_dtype": self.config.kv_cache_dtype,
            "max_model_len": self._max_len,
        }
        out.update(self._counters)
        out["finished"] = dict(self._finish_counts)
        return out

    def add_observer(self, observer: Any) -> None:
        """Register an object with any of on_step, on_first_token, on_token, on_request_finished."""
        with self._cv:
            self._observers = [*self._observers, observer]

    def remove_observer(self, observer: Any) -> None:
        with self._cv:
            self._observers = [o for o in self._observers if o is not observer]

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, finish every accepted request, stop the thread. After `timeout` seconds the
        requests still there are cancelled."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._abort = True
                self._cv.notify()
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the engine thread ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        sched = self._sched
        while True:
            with self._cv:
                while not (self._incoming or sched.has_work() or self._closing):
                    self._cv.wait()
                incoming, self._incoming = self._incoming, []
                if self._closing and not incoming and not sched.has_work():
                    break
                abort = self._abort
            for req in incoming:
                sched.add_request(req)
            self._num_waiting = len(sched.waiting)
            try:
                self._step(abort)
            except BaseException as e:  # a bug or a failed forward: fail every request, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
            self._num_waiting = len(sched.waiting)

    def _step(self, abort: bool) -> None:
        t0 = time.monotonic()
        sched = self._sched
        outputs: list[tuple[_Request, RequestOutput]] = []
        self._reap(t0, abort, outputs)
        plan = sched.schedule()
        self._num_waiting = len(sched.waiting)
        kv_used = self._blocks.num_used if self._observers else 0  # during the step, before finished requests go
        if plan.scheduled:
            try:
                logits, argmax, wants, prompt_rows = self._forward(plan)
            except Exception as e:  # the step's requests fail; the others, and the engine, go on
                log.exception("engine forward failed")
                logits, argmax, wants, prompt_rows, error = None, None, [], [], e
            for req, pos, row in prompt_rows:  # prompt_logprobs: position pos's distribution, of token pos + 1
                req.prompt_lps.append(token_logprob(logits[row], req.tokens[pos + 1], req.prompt_logprobs))
            sampled, errors, logprobs = self._sample(logits, argmax, wants)
            sched.update_from_output(plan, sampled)
            now = time.monotonic()
            finished = []
            for req, _ in plan.scheduled:
                if req.stats.queue_time is None:
                    req.stats.queue_time = t0 - req.stats.arrival_time
                if logits is None:
                    out = self._finish(req, "error", now, "", error=error)
                elif req.key in errors:
                    out = self._finish(req, "error", now, "", error=errors[req.key])
                elif req.key in sampled:
                    try:
                        out = self._process_token(req, sampled[req.key], now)
                    except Exception as e:
                        log.exception("request %s: output processing failed", req.id)
                        out = self._finish(req, "error", now, "", error=e)
                else:
                    continue
                if out is not None:
                    if out.token_ids and req.key in logprobs:
                        out.logprobs = [logprobs[req.key]]
                    if req.prompt_logprobs is not None and not req.prompt_lps_sent:
                        out.prompt_logprobs, req.prompt_lps_sent = req.prompt_lps, True
                    outputs.append((req, out))
                    if out.finished:
                        finished.append(req)
            sched.finish_requests(finished)
            self._counters["steps"] += 1
        elif not outputs:
            # nothing could run (every waiting request is blocked or cancelled): don't spin
            with self._cv:
                self._cv.wait(0.005)
        # observers see the step before its outputs reach the clients: a client that has its answer can read
        # metrics that count the step that produced it
        if plan.scheduled and self._observers:
            self._notify("on_step", StepStats(
                batch_size=len(plan.scheduled), num_tokens=plan.num_tokens,
                num_prefill_tokens=plan.num_prefill_tokens, num_decode_tokens=plan.num_decode_tokens,
                num_running=len(sched.running), num_waiting=len(sched.waiting) + len(self._incoming),
                num_preempted=len(plan.preempted), kv_blocks_used=kv_used,
                kv_blocks_total=self._blocks.num_blocks, duration=time.monotonic() - t0))
        self._deliver(outputs)

    def _reap(self, now: float, abort: bool, outputs: list) -> None:
        """Cancelled, timed-out or abandoned (handle garbage-collected) requests leave before scheduling."""
        gone = []
        for req in itertools.chain(self._sched.running, self._sched.waiting):
            if abort or req.cancelled or req.handle_ref() is None:
                reason = "cancelled"
            elif req.deadline is not None and now >= req.deadline:
                reason = "timeout"
            else:
                continue
            gone.append(req)
            outputs.append((req, self._finish(req, reason, now, "")))
        self._sched.finish_requests(gone)

    def _forward(self, plan: SchedulerOutput) -> tuple[np.ndarray, np.ndarray | None, list[_Request], list]:
        """One batched forward: logits for the requests that reach their last token (rows [0, len(wants))), then
        for the prompt positions whose log-probabilities were asked (prompt_logprobs) and are not known yet, as
        (request, position, logits row); and the wants rows' argmaxes where a greedy request can use them."""
        tokens: list[int] = []
        seq_lens, pos0, tables, logit_rows, wants, prompt_rows = [], [], [], [], [], []
        argmax_ok = False  # some request takes its row's argmax
        for req, n in plan.scheduled:
            start = req.num_computed
            tokens.extend(req.tokens[start:start + n])
            seq_lens.append(n)
            pos0.append(start)
            table = self._blocks.block_table(req.key)
            if req.table is None or len(req.table) != len(table):
                req.table = np.array(table, dtype=np.int32)
            tables.append(req.table)
            if req.prompt_logprobs is not None:  # (positions done before a preemption are not redone)
                row0 = len(tokens) - n - start  # the token row of position 0
                prompt_rows.extend((req, p, row0 + p)
                                   for p in range(max(start, len(req.prompt_lps)), min(start + n, req.num_prompt - 1)))
            if start + n == len(req.tokens):  # reaches the end of what's known: sample the next token
                logit_rows.append(len(tokens) - 1)
                wants.append(req)
                argmax_ok = argmax_ok or req.takes_argmax
        if prompt_rows:  # their logits rows follow the wants'
            logit_rows += [row for _, _, row in prompt_rows]
            prompt_rows = [(req, p, len(wants) + i) for i, (req, p, _) in enumerate(prompt_rows)]
        args = (self._cache, np.array(tokens, dtype=np.int32), np.array(seq_lens, dtype=np.int32),
                np.array(pos0, dtype=np.int32), tables, np.array(logit_rows, dtype=np.int32))
        if argmax_ok and self._forward_argmax is not None:
            return (*self._forward_argmax(*args), wants, prompt_rows)
        return self._runner.forward(*args), None, wants, prompt_rows

    def _sample(self, logits: np.ndarray | None, argmax: np.ndarray | None,
                wants: list[_Request]) -> tuple[dict[int, int], dict, dict]:
        """Each request's next token with its own sampler (a greedy one: the row's argmax, when the forward
        found it), and its log-probabilities where it asked; a failing sampler fails only its request."""
        sampled, errors, logprobs = {}, {}, {}
        if argmax is not None:
            argmax = argmax.tolist()
        for i, req in enumerate(wants):
            if argmax is not None and req.takes_argmax and req.logprobs is None:
                sampled[req.key] = argmax[i]
                continue
            try:
                token = argmax[i] if argmax is not None and req.takes_argmax else \
                    int(req.sampler.sample(logits[i], req.tokens))
                if req.logprobs is not None:
                    logprobs[req.key] = token_logprob(logits[i], token, req.logprobs)
            except Exception as e:
                log.exception("request %s: sampling failed", req.id)
                errors[req.key] = e
                continue
            sampled[req.key] = token
        return sampled, errors, logprobs

    def _process_token(self, req: _Request, token: int, now: float) -> RequestOutput | None:
        """Stop conditions and text for one new token; None when there is nothing to hand out yet."""
        s = req.stats
        if s.ttft is None:
            s.ttft = now - s.arrival_time
            if self._observers:
                self._notify("on_first_token", s)
        else:
            itl = now - req.last_token_time
            s.inter_token_latencies.append(itl)
            if self._observers:
                self._notify("on_token", req.id, itl)
        req.last_token_time = now
        self._counters["generation_tokens"] += 1
        if token in req.stop_ids or (token in self._runner.eog_ids and not req.ignore_eos):
            return self._finish(req, "stop", now, "")
        req.num_emitted += 1
        text, stopped = req.stops.feed(req.detok.add(token))
        if stopped:
            return self._finish(req, "stop", now, text, [token], flush=False)
        # the last token is never fed back: a sequence of max_len positions ends with max_len + 1 tokens
        if req.num_emitted >= req.max_tokens or len(req.tokens) > req.max_len:
            return self._finish(req, "length", now, text, [token])
        return RequestOutput(req.id, text, [token], None, req.num_prompt, req.num_emitted)

    def _finish(self, req: _Request, reason: str, now: float, text: str, token_ids: list[int] | None = None,
                flush: bool = True, error: BaseException | None = None) -> RequestOutput:
        if flush and reason in ("stop", "length"):
            tail, stopped = req.stops.feed(req.detok.flush())
            text += tail if stopped else tail + req.stops.flush()
        s = req.stats
        s.finish_reason = reason
        s.generated_tokens = req.num_emitted
        s.e2e = now - s.arrival_time
        self._counters["requests_finished"] += 1
        self._counters["prompt_tokens"] += req.num_prompt
        self._finish_counts[reason] += 1
        self._notify("on_request_finished", s)
        return RequestOutput(req.id, text, token_ids or [], reason, req.num_prompt, req.num_emitted, s, error)

    def _fail_all(self, error: BaseException) -> None:
        sched, now = self._sched, time.monotonic()
        reqs = list(itertools.chain(sched.running, sched.waiting))
        outputs = [(req, self._finish(req, "error", now, "", error=error)) for req in reqs]
        sched.finish_requests(reqs)
        self._deliver(outputs)

    def _deliver(self, outputs: list[tuple[_Request, RequestOutput]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req, out in outputs:
            if req.collect:
                req.held.append(out)
                if not out.finished:
                    continue
                held, req.held = req.held, []
            else:
                held = [out]
            if req.loop is None:
                for o in held:
                    req.sink.put(o)
            else:
                by_loop.setdefault(req.loop, []).extend((req, o) for o in held)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: its consumers are gone
                for req, _ in items:
                    req.cancelled = True

    def _notify(self, method: str, *args: Any) -> None:
        for obs in self._observers:
            fn = getattr(obs, method, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception:
                    log.exception("engine observer %r.%s failed", obs, method)


def _put_all(items: list[tuple[_Request, RequestOutput]]) -> None:
    for req, out in items:
        req.sink.put_nowait(out)
