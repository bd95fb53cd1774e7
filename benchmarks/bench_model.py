"""End-to-end model speed (asv): decode and prefill tokens/s on the demo model, as `track_` benchmarks.

Skipped (NotImplementedError in setup) when the model file is absent. Threads: $REALIZAR_BENCH_THREADS
(default 2). `benchmarks/compare_llamacpp.py` runs the same workloads side by side with llama.cpp.
"""
from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from .common import BENCH_THREADS, SEED
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import BENCH_THREADS, SEED

DECODE_TOKENS = 128
PROMPT_TOKENS = 8
LONG_CONTEXT = 2000  # positions before LongContextDecode's timed steps


@functools.lru_cache(maxsize=2)
def _model(filename: str | None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import MODEL_FILENAME, find_model

    path = find_model(filename or MODEL_FILENAME)
    if path is None:
        return None
    import realizar

    return realizar.Model.load(path, threads=BENCH_THREADS, n_ctx=LONG_CONTEXT + 64)


def _tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 20000, n).tolist()


def decode_tokens_per_second(model, n: int = DECODE_TOKENS) -> float:
    seq = model.new_sequence(PROMPT_TOKENS + n)
    logits = seq.feed(_tokens(PROMPT_TOKENS, SEED))
    t0 = time.perf_counter()
    for _ in range(n):
        logits = seq.feed([int(np.argmax(logits))])
    return n / (time.perf_counter() - t0)


def prefill_tokens_per_second(model, n: int) -> float:
    tokens = _tokens(n, SEED + n)
    seq = model.new_sequence(n)
    t0 = time.perf_counter()
    seq.feed(tokens)
    return n / (time.perf_counter() - t0)


class ModelSpeed:
    params = [["decode_128", "prefill_128", "prefill_512"], ["SmolLM2-135M-Instruct.Q4_1.gguf",
                                                             "SmolLM2-135M-Instruct.Q8_0.gguf",
                                                             "SmolLM2-135M-Instruct.Q4_K_M.gguf"]]
    param_names = ["workload", "model"]
    timeout = 600

    def setup(self, workload, model):
        self.model = _model(model)
        if self.model is None:
            raise NotImplementedError(f"{model} not found")
        self.run = (lambda: decode_tokens_per_second(self.model)) if workload.startswith("decode") else \
            (lambda: prefill_tokens_per_second(self.model, int(workload.split("_")[1])))
        self.run()  # warm-up

    def track_tokens_per_second(self, workload, model):
        return statistics.median(self.run() for _ in range(3))

    track_tokens_per_second.unit = "tokens/s"


class LongContextDecode:
    """One sequence's decode at position 2,000, the KV cache filled by a real prefill first: attention reads
    ~46 MB of f16 K/V per token (half with q8_0), more than the weights."""
    params = [["f16", "q8_0"]]
    param_names = ["kv_cache_dtype"]
    timeout = 600

    def setup(self, kv):
        self.model = _model(None)
        if self.model is None:
            raise NotImplementedError("the demo model was not found")
        self.seq = self.model.new_sequence(LONG_CONTEXT + 64, kv)
        self.logits = self.seq.feed(_tokens(LONG_CONTEXT, SEED))

    def track_tokens_per_second(self, kv):
        rates = []
        for _ in range(3):
            n = self.seq.n_tokens
            t0 = time.perf_counter()
            for _ in range(16):
                self.logits = self.seq.feed([int(np.argmax(self.logits))])
            rates.append(16 / (time.perf_counter() - t0))
            self.seq.truncate(n)  # the same positions every round
        return statistics.median(rates)

    track_tokens_per_second.unit = "tokens/s"


if __name__ == "__main__":
    m = _model(sys.argv[1] if len(sys.argv) > 1 else None)
    if m is None:
        raise SystemExit("model not found")
    print(f"decode {DECODE_TOKENS}: {decode_tokens_per_second(m):.1f} tok/s")
    for n in (128, 512):
        print(f"prefill {n}: {prefill_tokens_per_second(m, n):.1f} tok/s")
