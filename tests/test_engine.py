"""The serving engine: continuous batching over the paged KV cache.

Most tests drive the engine through a fake model whose "KV cache" stores token ids in the pool's blocks and
whose next token is a function of the whole history read back through the block tables: any mistake in
block tables, sharing, preemption or chunking changes the output. The real-model tests check that batched
greedy output equals `Model.generate` one request at a time.
"""
from __future__ import annotations

import asyncio
import gc
import hashlib
import threading
import time

import numpy as np
import pytest

from realizar import QueueFull
from realizar.engine import Engine, EngineConfig, RequestOutput, StepStats
from realizar.sampling import LOGPROB_FLOOR, GenerationConfig, Sampler

VOCAB = 64
EOS = 0
PIECES = ["<eos>"] + [chr(ord("a") + (i - 1) % 26) for i in range(1, 27)] + [f"<{i}>" for i in range(27, VOCAB)]


def FakeConfig(max_tokens: int = 8, temperature: float = 0.0, **kw) -> GenerationConfig:
    return GenerationConfig(max_tokens=max_tokens, strategy="top_p" if temperature else "greedy",
                            temperature=temperature, **kw)


class FakeDetok:
    def add(self, t: int) -> str:
        return "" if t == EOS else PIECES[t]

    def flush(self) -> str:
        return ""


def history_logits(history: list[int], avoid_eos: bool = True) -> np.ndarray:
    """Deterministic pseudo-random logits of a whole history."""
    digest = hashlib.blake2b(np.asarray(history, dtype=np.int64).tobytes(), digest_size=8).digest()
    logits = np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(VOCAB).astype(np.float32)
    if avoid_eos:
        logits[EOS] = -1e9
    return logits


class FakeRunner:
    """The engine's model interface over a pool that stores token ids: logits depend on the full history
    as read through the block table."""

    def __init__(self, n_ctx: int = 256, delay: float = 0.0, next_logits=history_logits):
        self.n_vocab = VOCAB
        self.n_ctx = n_ctx
        self.eog_ids = frozenset({EOS})
        self.delay = delay
        self.next_logits = next_logits
        self.pool: np.ndarray | None = None
        self.steps: list[tuple[list[int], list[int]]] = []  # (seq_lens, pos0) of every forward
        self.gate: threading.Event | None = None   # when set up, forward waits for it
        self.entered = threading.Event()

    def kv_bytes_per_token(self) -> int:
        return 100

    def new_cache(self, n_blocks: int, block_size: int) -> object:
        self.pool = np.full((n_blocks, block_size), -1, dtype=np.int64)
        return self.pool

    def tokenize(self, text: str) -> list[int]:
        return [1 + (ord(c) - ord("a")) % 26 for c in text]

    def detokenizer(self) -> FakeDetok:
        return FakeDetok()

    def sampler(self, config: GenerationConfig) -> Sampler:
        return Sampler(config)

    def forward(self, cache, tokens, seq_lens, pos0, block_tables, logit_rows):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        pool = cache
        bs = pool.shape[1]
        assert tokens.dtype == np.int32 and len(tokens) == seq_lens.sum()
        self.steps.append((seq_lens.tolist(), pos0.tolist()))
        row_logits = {}
        t = 0
        for n, p0, table in zip(seq_lens, pos0, block_tables, strict=True):
            assert len(table) * bs >= p0 + n
            for i in range(n):
                pos = p0 + i
                pool[table[pos // bs], pos % bs] = tokens[t]
                history = [int(pool[table[q // bs], q % bs]) for q in range(pos + 1)]
                assert -1 not in history, "read a position never written"
                if t in logit_rows:
                    row_logits[t] = self.next_logits(history)
                t += 1
        return np.stack([row_logits[int(r)] for r in logit_rows]) if len(logit_rows) else np.zeros((0, VOCAB))


def expected_greedy(prompt: list[int], max_tokens: int, next_logits=history_logits) -> list[int]:
    history, out = list(prompt), []
    for _ in range(max_tokens):
        t = int(np.argmax(next_logits(history)))
        out.append(t)
        if t == EOS:
            break
        history.append(t)
    return out


def make_engine(runner: FakeRunner | None = None, **cfg) -> tuple[Engine, FakeRunner]:
    runner = runner or FakeRunner()
    cfg.setdefault("kv_cache_bytes", 100 * 16 * 64)  # 64 blocks of 16
    return Engine(None, EngineConfig(**cfg), _runner=runner), runner


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def tokens_of(handle) -> list[int]:
    return [t for out in handle for t in out.token_ids]


def assert_idle(engine: Engine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_used"] == 0:
            break
        time.sleep(0.01)
    s = engine.stats()
    assert (s["num_running"], s["num_waiting"], s["kv_blocks_used"]) == (0, 0, 0), s
    engine._blocks.check()


# ---------------------------------------------------------------------------------------------------------
# fake model
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(),
    dict(prefill_chunk=5, max_batched_tokens=12),            # chunked prefill, small steps
    dict(max_num_seqs=3),
    dict(kv_cache_bytes=100 * 4 * 16, block_size=4),          # 16 blocks of 4: preemption
], ids=["default", "small-chunks", "few-seqs", "tiny-pool"])
def test_batched_equals_alone_fake(cfg):
    ps = prompts(12)
    lens = [1 + i % 7 * 3 for i in range(len(ps))]
    engine, runner = make_engine(**cfg)
    with engine:
        handles = [engine.submit(p, FakeConfig(max_tokens=m)) for p, m in zip(ps, lens, strict=True)]
        got = [tokens_of(h) for h in handles]
        assert_idle(engine)
        stats = engine.stats()
    for p, m, g in zip(ps, lens, got, strict=True):
        assert g == expected_greedy(p, m)
    if "block_size" in cfg:
        assert stats["num_preemptions"] > 0
    if "prefill_chunk" in cfg:
        assert max(sum(lens_) for lens_, _ in runner.steps) <= 12
        assert max(max(lens_) for lens_, _ in runner.steps) <= 5


def test_concurrent_sequences_keep_their_blocks_side_by_side():
    """Requests decoding together, each growing a block every few steps, each keep one run of adjacent blocks
    (the engine tells the block manager prompt + max_tokens), so attention reads one stretch per sequence."""
    runner = FakeRunner()
    tables: dict[int, list[int]] = {}
    forward = runner.forward

    def recording(cache, tokens, seq_lens, pos0, block_tables, logit_rows):
        for table in block_tables:
            tables[int(table[0])] = [int(b) for b in table]  # (first blocks differ between live sequences)
        return forward(cache, tokens, seq_lens, pos0, block_tables, logit_rows)

    runner.forward = recording
    engine, _ = make_engine(runner, block_size=4, kv_cache_bytes=100 * 4 * 200, prefix_caching=False)
    with engine:
        handles = [engine.submit(p, max_tokens=30, ignore_eos=True) for p in prompts(6, seed=5, lo=3, hi=9)]
        for h in handles:
            h.result()
    longest = sorted(tables.values(), key=len)[-6:]
    assert all(len(t) >= 8 for t in longest)  # (3-8 prompt tokens and 29 fed back: 8-10 blocks of 4)
    assert all(t == list(range(t[0], t[0] + len(t))) for t in longest), longest


def test_duplicate_request_ids_stay_apart():
    ps = prompts(4, seed=20)
    engine, _ = make_engine()
    with engine:
        handles = [engine.submit(p, FakeConfig(max_tokens=9), request_id="same") for p in ps]
        got = [tokens_of(h) for h in handles]
        assert_idle(engine)
    assert got == [expected_greedy(p, 9) for p in ps]
    assert {h.request_id for h in handles} == {"same"}


def test_chunked_prefill_never_stalls_decodes():
    # a chunk may take the whole step budget, yet the running decodes still go in every step
    # (the short requests outlast the long prompt's ~7 chunks by far, even when a loaded machine delays this
    # thread: 200 steps of at least 2 ms; they are cancelled once the long one is done)
    engine, runner = make_engine(FakeRunner(delay=0.002), prefill_chunk=16, max_batched_tokens=16)
    steps: list[StepStats] = []
    engine.add_observer(type("O", (), {"on_step": lambda self, s: steps.append(s)})())
    with engine:
        short = [engine.submit(p, FakeConfig(max_tokens=200)) for p in prompts(3, seed=1, lo=2, hi=4)]
        for h in short:
            next(iter(h))                    # all three are decoding
        long_prompt = prompts(1, seed=2, lo=100, hi=101)[0]
        big = engine.submit(long_prompt, FakeConfig(max_tokens=3))
        assert tokens_of(big) == expected_greedy(long_prompt, 3)
        for h in short:
            h.cancel()
            list(h)
    long_steps = [lens for lens, _ in runner.steps if max(lens) > 4]
    assert len(long_steps) >= 100 // 16
    for lens in long_steps:
        assert sum(lens) <= 16
        assert lens.count(1) == 3, lens
    assert all(s.num_tokens <= 16 for s in steps)


def test_prefix_cache_hit_same_output_and_counted():
    engine, _ = make_engine()
    system = prompts(1, seed=3, lo=40, hi=41)[0]        # 2 full blocks of 16 and a bit
    with engine:
        first = engine.submit(system + [5, 6, 7], FakeConfig(max_tokens=6))
        a = tokens_of(first)
        assert engine.stats()["prefix_cache_hits"] == 0
        assert engine.stats()["prefix_cache_blocks"] >= 2
        second = engine.submit(system + [9, 9], FakeConfig(max_tokens=6))
        b = tokens_of(second)
        again = engine.submit(system + [5, 6, 7], FakeConfig(max_tokens=6))
        c = tokens_of(again)
        stats = engine.stats()
    assert a == expected_greedy(system + [5, 6, 7], 6) == c
    assert b == expected_greedy(system + [9, 9], 6)
    assert stats["prefix_cache_hits"] >= 2 + 2
    assert stats["prefix_cache_queries"] >= stats["prefix_cache_hits"]


def test_prefix_cache_off():
    engine, _ = make_engine(prefix_caching=False)
    p = prompts(1, seed=3, lo=40, hi=41)[0]
    with engine:
        assert tokens_of(engine.submit(p, FakeConfig(max_tokens=4))) == tokens_of(
            engine.submit(p, FakeConfig(max_tokens=4)))
        assert engine.stats()["prefix_cache_hits"] == 0


def test_cancel_running_and_waiting_frees_every_block():
    runner = FakeRunner(delay=0.002)
    engine, _ = make_engine(runner, max_num_seqs=2)
    with engine:
        handles = [engine.submit(p, FakeConfig(max_tokens=200)) for p in prompts(5, seed=4)]
        it = iter(handles[0])
        next(it)
        for h in handles:
            h.cancel()
        for h in handles:
            outs = list(h)
            assert outs[-1].finish_reason == "cancelled"
            assert h.finished
        assert_idle(engine)
        assert engine.stats()["finished"]["cancelled"] == 5


def test_dropped_handle_cancels():
    runner = FakeRunner(delay=0.002)
    engine, _ = make_engine(runner)
    with engine:
        engine.submit(prompts(1)[0], FakeConfig(max_tokens=10_000))
        gc.collect()
        assert_idle(engine)
        assert engine.stats()["finished"]["cancelled"] == 1


def test_timeout_running_and_waiting():
    runner = FakeRunner(delay=0.01)
    engine, _ = make_engine(runner, max_num_seqs=1, request_timeout=0.15)
    with engine:
        handles = [engine.submit(p, FakeConfig(max_tokens=10_000)) for p in prompts(3, seed=5)]
        quick = engine.submit([3, 4], FakeConfig(max_tokens=10_000), timeout=0.05)
        reasons = [list(h)[-1].finish_reason for h in [*handles, quick]]
        assert reasons == ["timeout"] * 4
        assert_idle(engine)


def test_generate_hands_over_at_the_end_and_keeps_every_token():
    """Engine.generate's outputs are held until its last one (its thread is not woken every step) and then all
    handed over: a timed-out generate returns every token it produced, as a streamed request of the same run."""
    runner = FakeRunner(delay=0.005)
    engine, _ = make_engine(runner, max_num_seqs=2)
    with engine:
        h = engine.submit([5, 6, 7], FakeConfig(max_tokens=10_000), timeout=0.2)
        got = engine.generate([5, 6, 7], FakeConfig(max_tokens=10_000), timeout=0.2)
        outs = list(h)
        assert got.finish_reason == "timeout" and len(got.tokens) > 5
        streamed = [t for o in outs for t in o.token_ids]
        assert got.tokens == streamed[:len(got.tokens)] or streamed == got.tokens[:len(streamed)]
        r = engine.submit([5, 6, 7], FakeConfig(max_tokens=20), collect=True)
        while not engine.stats()["finished"].get("length"):
            assert r._req.sink.empty()  # nothing handed over before the end
            time.sleep(0.001)
        outs = list(r)
        assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == 20
        assert_idle(engine)


def test_queue_full():
    runner = FakeRunner()
    runner.gate = threading.Event()
    engine, _ = make_engine(runner, max_num_seqs=1, max_queue=2)
    try:
        first = engine.submit([1, 2, 3], FakeConfig(max_tokens=2))
        assert runner.entered.wait(5)       # the first request is in the forward
        waiting = [engine.submit([4], FakeConfig(max_tokens=2)) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit([5], FakeConfig(max_tokens=2))
        assert engine.stats()["num_waiting"] == 2
    finally:
        runner.gate.set()
        engine.close()
    assert [list(h)[-1].finish_reason for h in [first, *waiting]] == ["length"] * 3


def test_waits_for_blocks_instead_of_failing():
    # each request needs 3 blocks of 4; the pool has 5: they must take turns
    engine, _ = make_engine(kv_cache_bytes=100 * 4 * 5, block_size=4)
    ps = [p[:6] for p in prompts(6, seed=6, lo=6, hi=7)]
    with engine:
        handles = [engine.submit(p, FakeConfig(max_tokens=5)) for p in ps]
        got = [tokens_of(h) for h in handles]
        assert_idle(engine)
    assert got == [expected_greedy(p, 5) for p in ps]


def test_stop_conditions():
    def counting(history, avoid_eos=True):       # next token: last + 1 ('a'..'z'), EOS after 'z'
        logits = np.zeros(VOCAB, dtype=np.float32)
        nxt = history[-1] + 1
        logits[nxt if nxt <= 26 else EOS] = 1
        return logits

    engine, _ = make_engine(FakeRunner(next_logits=counting), max_model_len=64)
    with engine:
        def run(prompt, **kw):
            outs = list(engine.submit(prompt, FakeConfig(**kw)))
            return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1].finish_reason

        assert run("a", max_tokens=4) == ("bcde", [2, 3, 4, 5], "length")
        # a stop string across token boundaries: nothing from it or past it is emitted
        text, toks, reason = run("a", max_tokens=20, stop=["def"])
        assert (text, reason) == ("bc", "stop") and toks == [2, 3, 4, 5, 6]
        # a partial match that fails is released; the earliest of several stops wins
        assert run("a", max_tokens=20, stop=["cx", "fg", "e"])[:1] == ("bcd",)
        # a held-back partial match at the end of max_tokens is emitted
        assert run("a", max_tokens=3, stop=["de"]) == ("bcd", [2, 3, 4], "length")
        # EOS: neither text nor token for it
        assert run("w", max_tokens=20) == ("xyz", [24, 25, 26], "stop")
        # ignore_eos keeps going past it
        assert run("y", max_tokens=4, ignore_eos=True)[2] == "length"
        # context full: 64 positions hold the prompt of 60 and 4 generated tokens; a 5th is never fed back
        text, toks, reason = run([1] * 59 + [2], max_tokens=100)
        assert (len(toks), reason) == (5, "length")
        assert run([1] * 63 + [2], max_tokens=100)[1:] == ([3], "length")
        with pytest.raises(ValueError, match="longer than the context"):
            engine.submit([1] * 65, FakeConfig())
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], FakeConfig())
        with pytest.raises(ValueError, match="vocabulary"):
            engine.submit([VOCAB], FakeConfig())


def test_seeded_sampling_independent_of_batch():
    p = prompts(1, seed=7)[0]
    cfg = FakeConfig(max_tokens=12, temperature=1.0, seed=1234)
    engine, _ = make_engine(max_num_seqs=8)
    with engine:
        alone = tokens_of(engine.submit(p, cfg))
        others = [engine.submit(q, FakeConfig(max_tokens=20, temperature=0.7, seed=i))
                  for i, q in enumerate(prompts(6, seed=8))]
        together = engine.submit(p, cfg)
        more = [engine.submit(q, FakeConfig(max_tokens=5)) for q in prompts(4, seed=9)]
        assert tokens_of(together) == alone
        for h in others + more:
            list(h)
    other = tokens_of(make_engine()[0].submit(p, FakeConfig(max_tokens=12, temperature=1.0, seed=99)))
    assert other != alone


def test_async_iteration_and_observers():
    events: dict[str, list] = {"step": [], "first": [], "token": [], "finished": []}

    class Observer:
        def on_step(self, s): events["step"].append(s)
        def on_first_token(self, s): events["first"].append(s.request_id)
        def on_token(self, rid, itl): events["token"].append((rid, itl))
        def on_request_finished(self, s): events["finished"].append(s)

    engine, _ = make_engine(observer=Observer())
    ps = prompts(4, seed=10)

    async def main():
        async def one(p):
            outs: list[RequestOutput] = [o async for o in engine.submit(p, FakeConfig(max_tokens=5))]
            return [t for o in outs for t in o.token_ids], outs[-1]
        return await asyncio.gather(*(one(p) for p in ps))

    with engine:
        results = asyncio.run(main())
    for p, (toks, last) in zip(ps, results, strict=True):
        assert toks == expected_greedy(p, 5)
        assert last.finish_reason == "length" and last.num_generated_tokens == 5
        assert last.stats.prompt_tokens == len(p) and last.stats.generated_tokens == 5
        assert last.stats.ttft >= last.stats.queue_time >= 0 and last.stats.e2e >= last.stats.ttft
        assert len(last.stats.inter_token_latencies) == 4
    assert len(events["first"]) == 4 and len(events["token"]) == 16 and len(events["finished"]) == 4
    assert sum(s.num_decode_tokens for s in events["step"]) >= 16
    assert all(0 < s.kv_usage <= 1 for s in events["step"])


def test_observers_see_a_step_before_its_outputs_are_delivered():
    # a client that has its answer reads metrics that already count every step behind it (a slow observer
    # would otherwise still be recording the last step when the answer arrives)
    steps: list[StepStats] = []

    class SlowObserver:
        def on_step(self, s):
            time.sleep(0.02)
            steps.append(s)

    engine, _ = make_engine(observer=SlowObserver())
    p = prompts(1, seed=12)[0]
    with engine:
        for n in (1, 3):
            before = len(steps)
            assert tokens_of(engine.submit(p, FakeConfig(max_tokens=n))) == expected_greedy(p, n)
            assert len(steps) - before == n
            assert sum(s.num_decode_tokens for s in steps[before:]) == n - 1


def test_async_cancel_from_loop():
    engine, _ = make_engine(FakeRunner(delay=0.002))

    async def main():
        h = engine.submit([1, 2, 3], FakeConfig(max_tokens=10_000))
        n = 0
        async for out in h:
            n += 1
            if n == 3:
                h.cancel()
            if out.finished:
                return out.finish_reason
    with engine:
        assert asyncio.run(main()) == "cancelled"
        assert_idle(engine)


def test_generate_threads_are_batched():
    engine, runner = make_engine(FakeRunner(delay=0.003))
    ps = prompts(8, seed=11)
    results = [None] * len(ps)

    def worker(i):
        results[i] = engine.generate(ps[i], FakeConfig(max_tokens=10)).tokens

    with engine:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [expected_greedy(p, 10) for p in ps]
    assert max(len(lens) for lens, _ in runner.steps) > 1


def test_close_drains_and_rejects():
    engine, _ = make_engine(FakeRunner(delay=0.001), max_num_seqs=2)
    handles = [engine.submit(p, FakeConfig(max_tokens=6)) for p in prompts(5, seed=12)]
    engine.close()
    assert not engine._thread.is_alive()
    assert [list(h)[-1].finish_reason for h in handles] == ["length"] * 5
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1], FakeConfig())


def test_close_timeout_cancels_the_rest():
    engine, _ = make_engine(FakeRunner(delay=0.005), max_num_seqs=1)
    handles = [engine.submit(p, FakeConfig(max_tokens=10_000)) for p in prompts(3, seed=13)]
    engine.close(timeout=0.1)
    assert {list(h)[-1].finish_reason for h in handles} == {"cancelled"}


def test_forward_error_fails_requests_engine_survives():
    runner = FakeRunner()
    engine, _ = make_engine(runner)
    with engine:
        real = runner.forward
        runner.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        h = engine.submit([1, 2], FakeConfig(max_tokens=3))
        with pytest.raises(RuntimeError, match="boom"):
            list(h)
        runner.forward = real
        assert tokens_of(engine.submit([1, 2], FakeConfig(max_tokens=3))) == expected_greedy([1, 2], 3)
        assert_idle(engine)


def test_failing_sampler_fails_only_its_request():
    class Bad(Sampler):
        def sample(self, logits, tokens=None):
            raise FloatingPointError("bad logits")

    class Runner(FakeRunner):
        def sampler(self, config):
            return Bad(config) if config.seed == 666 else Sampler(config)

    engine, _ = make_engine(Runner())
    ps = prompts(3, seed=21)
    with engine:
        good = [engine.submit(p, FakeConfig(max_tokens=6)) for p in ps]
        bad = engine.submit(ps[0], FakeConfig(max_tokens=6, seed=666))
        with pytest.raises(FloatingPointError):
            list(bad)
        assert [tokens_of(h) for h in good] == [expected_greedy(p, 6) for p in ps]
        assert_idle(engine)
        assert engine.stats()["finished"]["error"] == 1


def test_many_short_requests_leave_nothing_behind():
    threads_before = threading.active_count()
    engine, _ = make_engine(max_num_seqs=16, max_queue=2000)
    with engine:
        for _ in range(3):
            handles = [engine.submit(p, FakeConfig(max_tokens=1 + i % 2)) for i, p in enumerate(prompts(300))]
            for h in handles:
                assert list(h)[-1].finish_reason == "length"
            del handles
        assert_idle(engine)
        assert len(engine._sched.running) == 0 and not engine._sched.waiting
    assert threading.active_count() == threads_before


# ---------------------------------------------------------------------------------------------------------
# the real model: batched greedy output == Model.generate one request at a time
# ---------------------------------------------------------------------------------------------------------

REAL_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
]
REAL_MAX_TOKENS = [12, 20, 8, 16, 24, 10]
BYTES_PER_BLOCK = 2 * 30 * 192 * 2 * 16     # SmolLM2-135M: K and V, 30 layers, 3 KV heads of 64, F16


@pytest.fixture(scope="module")
def model(model_path):
    from realizar.model import Model

    # one thread: the test machine is shared, and results must not depend on the thread count anyway
    return Model.load(model_path, threads=1)


@pytest.fixture(scope="module")
def alone(model):
    return [model.generate(p, max_tokens=m).tokens for p, m in zip(REAL_PROMPTS, REAL_MAX_TOKENS, strict=True)]


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(prefill_chunk=3, max_batched_tokens=8),
    dict(kv_cache_bytes=4 * BYTES_PER_BLOCK),
], ids=["default", "small-chunks", "tiny-pool-preempts"])
def test_batched_equals_alone_real_model(model, alone, cfg):
    with Engine(model, EngineConfig(**cfg)) as engine:
        if "kv_cache_bytes" in cfg:
            assert engine.stats()["kv_blocks_total"] == 4
        handles = [engine.submit(p, max_tokens=m) for p, m in zip(REAL_PROMPTS, REAL_MAX_TOKENS, strict=True)]
        got = [tokens_of(h) for h in handles]
        assert_idle(engine)
        stats = engine.stats()
    for prompt, want, have in zip(REAL_PROMPTS, alone, got, strict=True):
        assert have == want, f"{prompt!r}: {model.detokenize(have)!r} != {model.detokenize(want)!r}"
    if "kv_cache_bytes" in cfg:
        assert stats["num_preemptions"] > 0


def test_greedy_argmax_and_penalized_greedy_in_one_batch(model):
    """Plain greedy requests take the core's argmax of their rows, penalized ones go through their sampler: in one
    batch, each gets what Model.generate gives it alone."""
    configs = [dict(max_tokens=16), dict(max_tokens=16, repetition_penalty=1.5), dict(max_tokens=12),
               dict(max_tokens=12, frequency_penalty=1.0)]
    prompts = [REAL_PROMPTS[1], REAL_PROMPTS[1], REAL_PROMPTS[3], REAL_PROMPTS[3]]
    want = [model.generate(p, **c).tokens for p, c in zip(prompts, configs, strict=True)]
    assert want[0] != want[1] and want[2] != want[3]  # the penalties change the answer
    with Engine(model) as engine:
        handles = [engine.submit(p, **c) for p, c in zip(prompts, configs, strict=True)]
        assert [tokens_of(h) for h in handles] == want


def _greedy_logprobs_alone(model, prompt: str, n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens through a private Sequence, with numpy's float64 log-softmax of each step's logits."""
    seq = model.new_sequence(256)
    logits, tokens, refs = seq.feed(model.prompt_tokens(prompt)), [], []
    eog = set(model.tokenizer.eog_ids)
    while len(tokens) < n and (t := int(np.argmax(logits))) not in eog:
        x = logits.astype(np.float64)
        refs.append(x - (x.max() + np.log(np.exp(x - x.max()).sum())))
        tokens.append(t)
        logits = seq.feed([t])
    return tokens, refs


def test_logprobs_real_model(model):
    """logprobs: the log-softmax of the model's logits for each generated token and the top alternatives, through
    Model.generate and through a batch of the engine in which other requests sample or ask for none."""
    prompts, n, top, tol = REAL_PROMPTS[:3], 10, 4, 2e-3  # batched logits differ from one sequence's by rounding
    ref = [_greedy_logprobs_alone(model, p, n) for p in prompts]
    mine = model.generate(prompts[0], max_tokens=n, logprobs=top)
    assert mine.tokens == ref[0][0]
    np.testing.assert_allclose([lp.logprob for lp in mine.logprobs],
                               [r[t] for t, r in zip(*ref[0], strict=True)], rtol=0, atol=1e-6)
    assert model.generate(prompts[0], max_tokens=n).logprobs is None
    with Engine(model) as engine:
        handles = [engine.submit(p, max_tokens=n, logprobs=top) for p in prompts]
        plain = engine.submit(prompts[1], max_tokens=n)
        sampled = engine.submit(prompts[2], max_tokens=n, strategy="top_p", temperature=0.9, seed=5, logprobs=0)
        outs = [list(h) for h in handles]
        assert all(o.logprobs is None for o in plain)
        sampled_outs = list(sampled)
    for (tokens, refs), got in zip(ref, outs, strict=True):
        for o in got:  # one entry per token id of each output
            assert len(o.logprobs or ()) == len(o.token_ids)
        have = [lp for o in got for lp in o.logprobs or ()]
        assert [t for o in got for t in o.token_ids] == tokens == [lp.token_id for lp in have]
        for lp, r in zip(have, refs, strict=True):
            assert lp.logprob == pytest.approx(r[lp.token_id], abs=tol)
            want = np.argsort(-r, kind="stable")[:top]
            assert len(lp.top) == top and lp.top[0] == (lp.token_id, lp.logprob)  # greedy: the most likely
            for (t, v), w in zip(lp.top, want, strict=True):  # the same ids, but for near-ties
                assert v == pytest.approx(r[t], abs=tol) and (t == w or abs(r[t] - r[w]) < tol)
    sampled_lps = [lp for o in sampled_outs for lp in o.logprobs or ()]
    assert [lp.token_id for lp in sampled_lps] == [t for o in sampled_outs for t in o.token_ids]
    assert all(lp.top == [] and LOGPROB_FLOOR < lp.logprob <= 0 for lp in sampled_lps)


@pytest.mark.parametrize("cfg", [dict(), dict(prefill_chunk=5, max_batched_tokens=8),
                                 dict(kv_cache_bytes=4 * BYTES_PER_BLOCK)],
                         ids=["default", "small-chunks", "tiny-pool-preempts"])
def test_prompt_logprobs_real_model(model, cfg):
    """prompt_logprobs: each prompt token's log-probability given the ones before it, and the top alternatives, as
    numpy's log-softmax of the model's logits says; in chunks, beside other requests, and once only when a tiny
    pool preempts and recomputes the request. A prompt whose prefix is cached is still computed in full."""
    prompts, top = REAL_PROMPTS[:4], 3
    refs = []
    for p in prompts:
        tokens = model.prompt_tokens(p)
        x = model.new_sequence(len(tokens)).feed(tokens, all_logits=True).astype(np.float64)
        refs.append((tokens, x - (x.max(axis=1, keepdims=True) +
                                  np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)))))
    with Engine(model, EngineConfig(**cfg)) as engine:
        engine.generate(prompts[1], max_tokens=2)  # its prefix is cached now
        handles = [engine.submit(p, max_tokens=m, prompt_logprobs=top) for p, m in zip(prompts, REAL_MAX_TOKENS,
                                                                                        strict=False)]
        plain = engine.submit(prompts[0], max_tokens=4)
        outs = [list(h) for h in handles]
        assert all(o.prompt_logprobs is None for o in plain)
        assert_idle(engine)
        preempted = engine.stats()["num_preemptions"]
    if "kv_cache_bytes" in cfg:
        assert preempted > 0
    for (tokens, ref), got in zip(refs, outs, strict=True):
        assert got[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in got[1:])
        lps = got[0].prompt_logprobs
        assert [lp.token_id for lp in lps] == tokens[1:]
        np.testing.assert_allclose([lp.logprob for lp in lps], [ref[i, t] for i, t in enumerate(tokens[1:])],
                                   rtol=0, atol=2e-3)
        for i, lp in enumerate(lps):
            want = np.argsort(-ref[i], kind="stable")[:top]
            assert all(t == w or abs(ref[i, t] - ref[i, w]) < 2e-3 for (t, _), w in zip(lp.top, want, strict=True))
    alone = model.generate(prompts[0], max_tokens=2, prompt_logprobs=0)
    assert [lp.token_id for lp in alone.prompt_logprobs] == refs[0][0][1:]
    np.testing.assert_allclose([lp.logprob for lp in alone.prompt_logprobs],
                               [refs[0][1][i, t] for i, t in enumerate(refs[0][0][1:])], rtol=0, atol=1e-5)


def test_logit_bias_real_model(model):
    """A greedy request whose first choice is banned by logit_bias gets what Model.generate gives it with the same
    bias, beside a plain request that takes the row's argmax in the same batch."""
    prompt = REAL_PROMPTS[0]
    plain = model.generate(prompt, max_tokens=6).tokens
    banned = model.generate(prompt, max_tokens=6, logit_bias={plain[0]: -100.0})
    assert banned.tokens[0] != plain[0] and plain[0] not in banned.tokens
    forced = model.generate(prompt, max_tokens=3, logit_bias={42: 100.0}).tokens
    assert forced == [42, 42, 42]
    with Engine(model) as engine:
        a = engine.submit(prompt, max_tokens=6)
        b = engine.submit(prompt, max_tokens=6, logit_bias={plain[0]: -100.0})
        assert tokens_of(a) == plain and tokens_of(b) == banned.tokens


@pytest.mark.parametrize("pool_blocks", [None, 4], ids=["default", "tiny-pool-preempts"])
def test_q8_0_kv_cache_batched_equals_alone_real_model(model, pool_blocks):
    """K and V stored as Q8_0: the engine's batched greedy tokens equal each prompt's alone through a q8_0
    Sequence (also when a tiny pool forces preemption), and the same bytes hold 384/204 times the blocks."""
    q8_block = BYTES_PER_BLOCK * 204 // 384
    eog = set(model.tokenizer.eog_ids)

    def greedy_alone(prompt: str, n: int) -> list[int]:
        seq = model.new_sequence(128, "q8_0")
        logits, out = seq.feed(model.prompt_tokens(prompt)), []
        while len(out) < n and (t := int(np.argmax(logits))) not in eog:
            out.append(t)
            logits = seq.feed([t])
        return out

    cfg = EngineConfig(kv_cache_dtype="q8_0", max_model_len=128,
                       kv_cache_bytes=pool_blocks * q8_block if pool_blocks else 48 * BYTES_PER_BLOCK)
    with Engine(model, cfg) as engine:
        stats = engine.stats()
        assert stats["kv_cache_dtype"] == "q8_0"
        assert stats["kv_blocks_total"] == (pool_blocks or 48 * 384 // 204)
        handles = [engine.submit(p, max_tokens=m) for p, m in zip(REAL_PROMPTS, REAL_MAX_TOKENS, strict=True)]
        got = [tokens_of(h) for h in handles]
        assert_idle(engine)
        if pool_blocks:
            assert engine.stats()["num_preemptions"] > 0
    for prompt, m, have in zip(REAL_PROMPTS, REAL_MAX_TOKENS, got, strict=True):
        assert have == greedy_alone(prompt, m), prompt


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="EngineConfig.kv_cache_dtype must be one of f16, q8_0, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="this runner keeps K and V as f16"):
        Engine(None, EngineConfig(kv_cache_dtype="q8_0"), _runner=FakeRunner())


def test_prefix_cache_hit_equals_miss_real_model(model):
    system = ("<|im_start|>system\nYou are a helpful assistant who answers in one short sentence, "
              "politely and precisely.<|im_end|>\n")
    prompt = system + "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n"
    with Engine(model, EngineConfig()) as engine:
        miss = engine.generate(prompt, max_tokens=8)
        assert engine.stats()["prefix_cache_hits"] == 0
        hit = engine.generate(prompt, max_tokens=8)
        stats = engine.stats()
    assert stats["prefix_cache_hits"] >= len(model.prompt_tokens(system)) // 16 > 0
    assert hit.tokens == miss.tokens == model.generate(prompt, max_tokens=8).tokens


def test_seeded_sampling_real_model(model):
    cfg = GenerationConfig(max_tokens=10, strategy="top_p", temperature=0.9, top_p=0.95, seed=7)
    with Engine(model, EngineConfig()) as engine:
        alone_ = engine.generate(REAL_PROMPTS[1], cfg)
        others = [engine.submit(p, max_tokens=8, strategy="top_k", temperature=1.0, seed=i)
                  for i, p in enumerate(REAL_PROMPTS[2:5])]
        together = engine.generate(REAL_PROMPTS[1], cfg)
        for h in others:
            list(h)
    assert together.tokens == alone_.tokens == model.generate(REAL_PROMPTS[1], cfg).tokens


def test_cancel_and_timeout_real_model(model):
    with Engine(model, EngineConfig()) as engine:
        h = engine.submit(REAL_PROMPTS[0], max_tokens=500, ignore_eos=True)
        it = iter(h)
        next(it)
        h.cancel()
        assert [o for o in it][-1].finish_reason == "cancelled"
        t = engine.submit(REAL_PROMPTS[1], max_tokens=500, ignore_eos=True, timeout=0.3)
        assert list(t)[-1].finish_reason == "timeout"
        assert_idle(engine)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_thousand_short_requests_real_model(model):
    threads_before = threading.active_count()
    with Engine(model, EngineConfig(max_queue=2000)) as engine:
        def batch(lo, hi):
            handles = [engine.submit(f"Request number {i}: say hi", max_tokens=1 + i % 2) for i in range(lo, hi)]
            for h in handles:
                assert list(h)[-1].finish_reason in ("length", "stop")

        batch(0, 200)
        gc.collect()
        rss = _rss_bytes()
        batch(200, 1000)
        gc.collect()
        grown = _rss_bytes() - rss
        assert_idle(engine)
        assert engine.stats()["requests_finished"] == 1000
    assert threading.active_count() == threads_before
    assert grown < 32 << 20, f"RSS grew by {grown >> 20} MiB over 800 requests"
