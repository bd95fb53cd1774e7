"""Engine throughput and latency: concurrent 32-token greedy completions through realizar.Engine.

As a script (the figures of the engine issue):

    .venv/bin/python benchmarks/bench_engine.py [--model PATH] [--threads 2] [--concurrency 1 4 16 32]
        [--max-tokens 32] [--requests-per-client 3] [--rounds 1] [--single-tokens 128] [--single-rounds 3]
        [--sampled] [--filler-words N]

prints, per concurrency, aggregate output tokens/s and p50/p95 request latency (with --rounds R, the sweep over
the concurrencies runs R times and each figure is the median of its R runs, the 16 / 1 ratio the median of the
per-round ratios: the runs of one round are side by side on this shared machine), then the one-at-a-time
decode rate through the engine next to `Model.generate` in interleaved rounds, with their median ratio. Every completion runs exactly max_tokens tokens
(ignore_eos) on distinct ~20-token prompts. As an asv module, `track_` benchmarks report the same tokens/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

TOPICS = ["the sea", "an old lighthouse", "mountain trains", "the history of bread", "quiet libraries",
          "a robot gardener", "winter markets", "paper boats", "the first telescope", "city foxes",
          "desert rain", "a lost violin", "clockmakers", "river islands", "the moon's craters", "honey bees"]


def make_prompts(n: int, start: int = 0, filler_words: int = 0) -> list[str]:
    """Distinct prompts of about 20 tokens: numbers start..start + n - 1 (the prefix cache holds earlier runs'
    prompts, so no two runs share one). filler_words > 0 puts that many words of notes (about one token each,
    different per prompt) before the request, for long contexts."""
    out = []
    for i in range(start, start + n):
        topic = TOPICS[i % len(TOPICS)]
        notes = ""
        if filler_words:
            words = [TOPICS[(i * 7 + 3 * j) % len(TOPICS)].split()[-1] for j in range(filler_words)]
            notes = f"Notes {i}: " + " ".join(words) + ".\n"
        out.append(f"{notes}Request {i}: write a short, cheerful paragraph for children about {topic}, "
                   f"in simple words.")
    return out


def find_model() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import find_model as find  # the tests' search path for the demo model

    path = find()
    if path is None:
        raise SystemExit("SmolLM2-135M-Instruct.Q4_1.gguf not found: run `realizar pull smollm2-135m` or pass --model")
    return str(path)


def gen_config(max_tokens: int, sampled: bool = False):
    """Greedy (the issue's figures), or sampled as OpenAI's defaults sample (temperature 1, top_p 1, no top_k)."""
    import dataclasses

    import realizar

    fields = {f.name for f in dataclasses.fields(realizar.GenerationConfig)}
    kw = {"max_tokens": max_tokens, "strategy": "greedy"}
    if sampled:
        kw.update(strategy="top_p", temperature=1.0, top_p=1.0, top_k=0, seed=1)
    if "ignore_eos" in fields:
        kw["ignore_eos"] = True
    return realizar.GenerationConfig(**kw)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_clients(send, prompts: list, concurrency: int) -> dict:
    """`concurrency` client threads, each sending its share of prompts one after another through
    `send(prompt) -> generated token count`; a failing send fails the run after every client has stopped."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()
    shares = [prompts[i::concurrency] for i in range(concurrency)]

    def client(share):
        for p in share:
            t0 = time.perf_counter()
            try:
                n = send(p)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                with lock:
                    errors.append(e)
                return
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} requests failed, e.g. {errors[0]!r}") from errors[0]
    return {"concurrency": concurrency, "requests": len(prompts), "tokens": tokens[0], "wall_s": wall,
            "tok_s": tokens[0] / wall, "req_s": len(prompts) / wall,
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95)}


def run_concurrency(engine, prompts: list[str], concurrency: int, config) -> dict:
    """`concurrency` client threads of engine.generate, each sending its share of prompts one after another."""
    return run_clients(lambda p: len(engine.generate(p, config).tokens), prompts, concurrency)


def single_decode(model, engine, prompt: str, n_tokens: int, rounds: int = 3) -> dict[str, tuple[float, float, float]]:
    """One request at a time, engine against Model.generate, interleaved (each round runs both, alternating
    which goes first, on this shared machine). Two measures of the decode rate, each as (engine's median tokens/s,
    the model's, the median per-round engine/model ratio):
    "wall": the caller's wall time of an n-token request less that of a 1-token one (prefill excluded, submission
    and wake-ups included; the difference of two noisy times);
    "timings": n - 1 tokens over the decode phase the results report (GenerationTimings.generate_seconds: from
    the first token to the last, as each side clocks it)."""
    def rate(fn):
        t0 = time.perf_counter()
        fn(gen_config(1))
        t1 = time.perf_counter()
        result = fn(gen_config(n_tokens))
        t2 = time.perf_counter()
        return (n_tokens - 1) / ((t2 - t1) - (t1 - t0)), (n_tokens - 1) / result.timings.generate_seconds

    runs = {"engine": lambda c: engine.generate(prompt, c), "model": lambda c: model.generate(prompt, c)}
    rates: dict[str, list[tuple[float, float]]] = {"engine": [], "model": []}
    for i in range(rounds):
        for name in (("engine", "model") if i % 2 == 0 else ("model", "engine")):
            rates[name].append(rate(runs[name]))
    out = {}
    for k, measure in enumerate(("wall", "timings")):
        eng = [r[k] for r in rates["engine"]]
        mod = [r[k] for r in rates["model"]]
        ratio = statistics.median(e / m for e, m in zip(eng, mod, strict=True))
        out[measure] = (statistics.median(eng), statistics.median(mod), ratio)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="sweeps over the concurrencies; medians are reported")
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--single-rounds", type=int, default=3,
                    help="interleaved engine / Model.generate rounds of the one-at-a-time comparison")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--sampled", action="store_true",
                    help="sample as OpenAI's defaults do (temperature 1, top_p 1) instead of greedy decoding")
    ap.add_argument("--filler-words", type=int, default=0,
                    help="words of notes before each prompt (about a token each): long-context runs")
    args = ap.parse_args(argv)

    import realizar

    model = realizar.Model.load(args.model or find_model(), threads=args.threads)
    cfg = gen_config(args.max_tokens, args.sampled)
    print(f"model {args.model or find_model()}  threads {args.threads}  isa {realizar.isa()}  "
          f"max_tokens {args.max_tokens}  {'sampled (temperature 1, top_p 1)' if args.sampled else 'greedy'}  "
          f"cpus {os.cpu_count()}")
    with realizar.Engine(model, realizar.EngineConfig(max_num_seqs=args.max_num_seqs)) as engine:
        engine.generate(make_prompts(1)[0], gen_config(4))  # warm-up
        n_tok = len(model.tokenize(make_prompts(1, 0, args.filler_words)[0]))
        print(f"prompt ~{n_tok} tokens")
        print(f"{'conc':>5} {'reqs':>5} {'tok/s':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}")
        runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
        sent = 1  # the warm-up's prompt
        for rnd in range(args.rounds):
            for c in args.concurrency:
                n = max(c * args.requests_per_client, 4)
                runs[c].append(run_concurrency(engine, make_prompts(n, sent, args.filler_words), c, cfg))
                sent += n
                if args.rounds > 1:
                    r = runs[c][-1]
                    print(f"  round {rnd + 1}: concurrency {c} {r['tok_s']:.1f} tok/s", flush=True)
        for c in args.concurrency:
            med = {key: statistics.median(r[key] for r in runs[c]) for key in ("tok_s", "req_s", "p50_s", "p95_s")}
            print(f"{c:>5} {runs[c][0]['requests']:>5} {med['tok_s']:>8.1f} {med['req_s']:>7.2f} {med['p50_s']:>7.2f} "
                  f"{med['p95_s']:>7.2f}", flush=True)
        if 1 in runs and 16 in runs:
            ratio = statistics.median(b["tok_s"] / a["tok_s"] for a, b in zip(runs[1], runs[16], strict=True))
            at16 = statistics.median(r["tok_s"] for r in runs[16])
            print(f"16 concurrent / one-at-a-time: {ratio:.2f}x (median of {args.rounds} rounds); "
                  f"vs llama-cpp-python server's 90 tok/s: {at16 / 90:.2f}x")
        if args.single_tokens:
            measures = single_decode(model, engine, make_prompts(1)[0], args.single_tokens, args.single_rounds)
            for measure, (eng, mod, ratio) in measures.items():
                print(f"one-at-a-time decode of {args.single_tokens} tokens ({measure}): engine {eng:.1f} tok/s, "
                      f"Model.generate {mod:.1f} tok/s; median engine/model over {args.single_rounds} interleaved "
                      f"rounds {ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
        s = engine.stats()
        print(f"kv pool {s['kv_blocks_total']} blocks, prefix-cache hits {s['prefix_cache_hits']}, "
              f"preemptions {s['num_preemptions']}")


# -- asv -----------------------------------------------------------------------------------------------

class EngineThroughput:
    """asv: output tokens/s of 32-token completions, greedy or sampled, at a given concurrency."""
    params = [1, 16]
    param_names = ["concurrency"]
    timeout = 600

    def setup(self, concurrency):
        import realizar

        try:
            path = find_model()
        except SystemExit:
            raise NotImplementedError("demo model not present") from None
        self.model = realizar.Model.load(path, threads=2)
        self.engine = realizar.Engine(self.model, realizar.EngineConfig(max_num_seqs=32))
        self.engine.generate(make_prompts(1)[0], gen_config(4))
        self.sent = 1  # prompts used so far: every run sends new ones, as the prefix cache keeps the old

    def teardown(self, concurrency):
        self.engine.close()

    def track_tokens_per_s(self, concurrency):
        prompts = make_prompts(2 * concurrency, self.sent)
        self.sent += len(prompts)
        return run_concurrency(self.engine, prompts, concurrency, gen_config(32))["tok_s"]

    track_tokens_per_s.unit = "tokens/s"

    def track_sampled_tokens_per_s(self, concurrency):
        """The same completions sampled as OpenAI's defaults sample (temperature 1, top_p 1)."""
        prompts = make_prompts(2 * concurrency, self.sent)
        self.sent += len(prompts)
        return run_concurrency(self.engine, prompts, concurrency, gen_config(32, sampled=True))["tok_s"]

    track_sampled_tokens_per_s.unit = "tokens/s"


if __name__ == "__main__":
    main()
