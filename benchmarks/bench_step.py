"""Cost of one batched forward step (Model.forward_batch), the unit the engine's throughput is made of.

    .venv/bin/python benchmarks/bench_step.py [--model PATH] [--threads 2] [--batches 1,4,8,16,32] [--reps 15]
        [--context 24] [--kv-cache-dtype f16|q8_0] [--placement contiguous|strided|random]

prints, per batch size B, the median time of a decode step of B sequences (one token each, at position
--context) with the LM head ('last' logits) and without it ('none'), and of prefilling B prompts of
--prompt-tokens tokens at once, with the per-token cost of each. With a --context past the default the B
sequences' first --context positions are filled first by real prefill steps (not left as untouched zero pages,
which every read would find in cache), so long-context steps read as much K/V memory as served ones do.
--placement: where each sequence's KV blocks lie in the pool: side by side (what the engine's block manager aims
for), interleaved with the other sequences' (what growing together block by block gives without it), or shuffled.
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


def block_layout(n_seqs: int, per: int, placement: str = "contiguous", seed: int = 0) -> list[list[int]]:
    """Block tables of n_seqs sequences of `per` blocks in a pool of n_seqs * per blocks."""
    if placement == "contiguous":
        return [list(range(i * per, (i + 1) * per)) for i in range(n_seqs)]
    if placement == "strided":
        return [list(range(i, n_seqs * per, n_seqs)) for i in range(n_seqs)]
    order = np.random.default_rng(seed).permutation(n_seqs * per).reshape(n_seqs, per)
    return [row.tolist() for row in order]


def step_ms(model, cache, batch: int, n_tokens: int, pos: int, logits: str, reps: int, rng,
            clock=time.perf_counter, layout: list[list[int]] | None = None) -> float:
    """Median ms of `reps` forward steps of `batch` sequences of n_tokens random tokens at position pos
    (clock: time.process_time for CPU time), sequence i through block table layout[i] (default: side by side)."""
    from realizar.model import BatchEntry

    per = (pos + n_tokens + 15) // 16  # KV blocks per sequence
    layout = layout or block_layout(batch, per)
    entries = [BatchEntry(rng.integers(100, 40000, n_tokens).tolist(), pos, layout[i][:per], logits)
               for i in range(batch)]
    times = []
    for _ in range(reps):
        t0 = clock()
        model.forward_batch(cache, entries)
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def fill(model, cache, batch: int, ctx: int, rng, chunk: int = 512, layout: list[list[int]] | None = None) -> None:
    """Writes positions [0, ctx) of sequences 0..batch-1 (through block tables layout[i]) with prefill steps."""
    from realizar.model import BatchEntry

    layout = layout or block_layout(batch, cache.n_blocks // batch)
    for i in range(batch):
        tokens = rng.integers(100, 40000, ctx).tolist()
        for start in range(0, ctx, chunk):
            model.forward_batch(cache, [BatchEntry(tokens[start:start + chunk], start, layout[i], "none")])


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
    ap.add_argument("--placement", default="contiguous", choices=["contiguous", "strided", "random"])
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = Model.load(args.model or find_model(), threads=args.threads)
    rng = np.random.default_rng(0)
    ctx = args.context
    per = (max(ctx + 1, 24 + max(args.prompt_tokens, 1)) + 15) // 16
    cache = model.new_kv_cache(max(batches) * per, dtype=args.kv_cache_dtype)
    layout = block_layout(max(batches), per, args.placement)
    if ctx > 24:
        fill(model, cache, max(batches), ctx, rng, layout=layout)
    print(f"{model.name}  threads {args.threads}  isa {realizar.isa()}  kv {args.kv_cache_dtype}  context {ctx}  "
          f"blocks {args.placement}")
    print(f"{'batch':>5s} {'decode ms':>10s} {'ms/token':>9s} {'no head ms':>11s} {'prefill ms':>11s} {'ms/token':>9s}")
    for b in batches:
        dec = step_ms(model, cache, b, 1, ctx, "last", args.reps, rng, layout=layout)
        bare = step_ms(model, cache, b, 1, ctx, "none", args.reps, rng, layout=layout)
        pre = step_ms(model, cache, b, args.prompt_tokens, 0, "last", max(3, args.reps // 3), rng, layout=layout)
        print(f"{b:5d} {dec:10.1f} {dec / b:9.2f} {bare:11.1f} {pre:11.1f} {pre / (b * args.prompt_tokens):9.2f}",
              flush=True)
    model.close()


if __name__ == "__main__":
    main()
