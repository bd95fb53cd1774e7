"""Cost of one batched forward step (Model.forward_batch), the unit the engine's throughput is made of.

    .venv/bin/python benchmarks/bench_step.py [--model PATH] [--threads 2] [--batches 1,4,8,16,32] [--reps 15]
        [--context 24] [--kv-cache-dtype f16|q8_0]

prints, per batch size B, the median time of a decode step of B sequences (one token each, at position
--context) with the LM head ('last' logits) and without it ('none'), and of prefilling B prompts of
--prompt-tokens tokens at once, with the per-token cost of each. With a --context past the default the B
sequences' first --context positions are filled first by real prefill steps (not left as untouched zero pages,
which every read would find in cache), so long-context steps read as much K/V memory as served ones do.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

try:
    from .bench_engine import find_model
except ImportError:  # run as a script
    from bench_engine import find_model


def step_ms(model, cache, batch: int, n_tokens: int, pos: int, logits: str, reps: int, rng,
            clock=time.perf_counter) -> float:
    """Median ms of `reps` forward steps of `batch` sequences of n_tokens random tokens at position pos
    (clock: time.process_time for CPU time)."""
    from realizar.model import BatchEntry

    per = (pos + n_tokens + 15) // 16  # KV blocks per sequence
    entries = [BatchEntry(rng.integers(100, 40000, n_tokens).tolist(), pos, list(range(i * per, (i + 1) * per)), logits)
               for i in range(batch)]
    times = []
    for _ in range(reps):
        t0 = clock()
        model.forward_batch(cache, entries)
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def fill(model, cache, batch: int, ctx: int, rng, chunk: int = 512) -> None:
    """Writes positions [0, ctx) of sequences 0..batch-1 (step_ms's block tables) with prefill steps."""
    from realizar.model import BatchEntry

    per = cache.n_blocks // batch
    for i in range(batch):
        tokens = rng.integers(100, 40000, ctx).tolist()
        for start in range(0, ctx, chunk):
            model.forward_batch(cache, [BatchEntry(tokens[start:start + chunk], start,
                                                   list(range(i * per, (i + 1) * per)), "none")])


def main() -> None:
    import realizar
    from realizar.model import Model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--context", type=int, default=24, help="position of the decode steps (default 24)")
    ap.add_argument("--kv-cache-dtype", default="f16", choices=["f16", "q8_0"])
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = Model.load(args.model or find_model(), threads=args.threads)
    rng = np.random.default_rng(0)
    ctx = args.context
    per = (max(ctx + 1, 24 + max(args.prompt_tokens, 1)) + 15) // 16
    cache = model.new_kv_cache(max(batches) * per, dtype=args.kv_cache_dtype)
    if ctx > 24:
        fill(model, cache, max(batches), ctx, rng)
    print(f"{model.name}  threads {args.threads}  isa {realizar.isa()}  kv {args.kv_cache_dtype}  context {ctx}")
    print(f"{'batch':>5s} {'decode ms':>10s} {'ms/token':>9s} {'no head ms':>11s} {'prefill ms':>11s} {'ms/token':>9s}")
    for b in batches:
        dec = step_ms(model, cache, b, 1, ctx, "last", args.reps, rng)
        bare = step_ms(model, cache, b, 1, ctx, "none", args.reps, rng)
        pre = step_ms(model, cache, b, args.prompt_tokens, 0, "last", max(3, args.reps // 3), rng)
        print(f"{b:5d} {dec:10.1f} {dec / b:9.2f} {bare:11.1f} {pre:11.1f} {pre / (b * args.prompt_tokens):9.2f}",
              flush=True)
    model.close()


if __name__ == "__main__":
    main()
