"""One request at a time: the engine against Model.generate, interleaved (issue 4: within 5%).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/engine_overhead.py [--model FILE] [--threads 2]
        [--tokens 128] [--rounds 8]

Each round generates `tokens` greedy tokens (ignore_eos) through `Engine.generate` and through
`Model.generate` on the same loaded model, alternating which goes first, and prints both rates; the last line
is the median of engine speed / model speed over the rounds (1.0 = no engine overhead). A shared machine moves
single runs by ±15%, so read the median.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench_engine import find_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()

    import realizar
    from realizar.engine import Engine, EngineConfig

    m = realizar.Model.load(args.model or find_model(), threads=args.threads, n_ctx=512)
    cfg = realizar.GenerationConfig(max_tokens=args.tokens, ignore_eos=True)
    prompt = "Request 1: write a short, cheerful paragraph for children about the sea, in simple words."
    ratios = []
    with Engine(m, EngineConfig()) as engine:
        engine.generate(prompt, cfg)
        m.generate(prompt, cfg)
        for i in range(args.rounds):
            timed = {}
            order = [("engine", engine.generate), ("model", m.generate)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn(f"{prompt} {i}", cfg)
                timed[name] = time.perf_counter() - t
            ratios.append(timed["model"] / timed["engine"])
            print(f"engine {args.tokens / timed['engine']:6.1f} tok/s   model {args.tokens / timed['model']:6.1f} tok/s"
                  f"   engine/model {ratios[-1]:.3f}", flush=True)
    print(f"median engine/model speed over {args.rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
