"""Fixed-seed inputs and timing helpers shared by the asv benchmarks (numpy's asv suite layout)."""
from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np

from realizar.types import BLOCK_LAYOUT, GGMLType

SEED = 1234
# The demo model's shapes (SmolLM2-135M: hidden 576, FFN 1536) and a 7B-class square one.
SHAPES = {"576x1536": (576, 1536), "1536x576": (1536, 576), "4096x4096": (4096, 4096)}
BENCH_THREADS = int(os.environ.get("REALIZAR_BENCH_THREADS", "2"))


@functools.cache
def core():
    from realizar import _core

    return _core


def isa_supported(isa: str) -> bool:
    return isa in core().supported_isas()


def block_size(type_name: str) -> int:
    return BLOCK_LAYOUT[GGMLType[type_name]][0]


@functools.lru_cache(maxsize=8)
def weights(type_name: str, rows: int, k: int) -> np.ndarray:
    """rows x k normal weights (std 0.02) quantized to type_name blocks, as raw bytes."""
    rng = np.random.default_rng(SEED)
    w = (rng.standard_normal(rows * k) * 0.02).astype(np.float32)
    return core().quantize(w, int(GGMLType[type_name]))


@functools.lru_cache(maxsize=8)
def activations(n: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(SEED + 1)
    return rng.standard_normal((n, k)).astype(np.float32)


def best_seconds(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    """Best per-call wall time: the minimum over rounds of `inner` calls (inner sized to ~20 us, so a round
    is one call for all but tiny ones), over at least `repeats` rounds and min_time seconds. The minimum is the
    figure least disturbed by other load on a shared machine."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(20e-6 / once))
    best, rounds, start = float("inf"), 0, time.perf_counter()
    while rounds < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
        rounds += 1
    return best


def read_bandwidth(nbytes: int = 256 << 20, threads: int = 1) -> float:
    """Memory read bandwidth in GB/s: numpy XOR-reductions of uint64 (the GIL is released) over `threads`
    disjoint slices of an nbytes buffer. A buffer much larger than the last-level cache measures DRAM."""
    buf = np.ones(nbytes // 8, dtype=np.uint64)
    parts = np.array_split(buf, threads)

    def run():
        if threads == 1:
            np.bitwise_xor.reduce(parts[0])
            return
        ts = [threading.Thread(target=np.bitwise_xor.reduce, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return nbytes / best_seconds(run, min_time=0.5) / 1e9
