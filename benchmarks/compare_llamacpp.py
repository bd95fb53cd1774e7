#!/usr/bin/env python3
"""realizar vs llama.cpp (llama-cpp-python) on the same GGUF file with the same threads, interleaved.

Prints tokens/s of each and their ratio (median of --repeats runs): decode of --decode-tokens greedy tokens
after a short prompt, and prefill of each --prefill length (a fresh context each time, the last token's logits
included). Runs alternate between the two engines so that machine load affects both alike.

    .venv/bin/python benchmarks/compare_llamacpp.py              # the demo model, 2 threads
    .venv/bin/python benchmarks/compare_llamacpp.py --model /tmp/anchor/models/SmolLM2-135M-Instruct.Q8_0.gguf

llama_cpp is imported from this interpreter, else from --llama-site (default: the venv that
../shared/tools/llamacpp-anchor.sh builds in /tmp/anchor); without it only realizar's figures are printed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def import_llama_cpp(site: str | None):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        paths = [site] if site else sorted(glob.glob("/tmp/anchor/venv/lib/python3*/site-packages"))
        for p in paths:
            if p and Path(p).is_dir() and p not in sys.path:
                sys.path.append(p)
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return None
    import llama_cpp

    return llama_cpp


class Ours:
    name = "realizar"

    def __init__(self, path: str, threads: int, n_ctx: int):
        import realizar

        self.model = realizar.Model.load(path, threads=threads, n_ctx=n_ctx, max_batch_tokens=512)

    def decode(self, prompt: list[int], n: int) -> float:
        seq = self.model.new_sequence(len(prompt) + n)
        logits = seq.feed(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = seq.feed([int(np.argmax(logits))])
        return n / (time.perf_counter() - t0)

    def prefill(self, tokens: list[int]) -> float:
        seq = self.model.new_sequence(len(tokens))
        t0 = time.perf_counter()
        seq.feed(tokens)
        return len(tokens) / (time.perf_counter() - t0)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, llama_cpp, path: str, threads: int, n_ctx: int):
        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def decode(self, prompt: list[int], n: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        logits = self._last_logits()
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([int(np.argmax(logits))])
            logits = self._last_logits()
        return n / (time.perf_counter() - t0)

    def prefill(self, tokens: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        self._last_logits()
        return len(tokens) / (time.perf_counter() - t0)


def default_model() -> str:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import find_model  # the test suite's model search: $REALIZAR_HOME, /tmp/models, /tmp/anchor

    path = find_model()
    if path is None:
        raise SystemExit("no model file: pass --model or run `realizar pull smollm2-135m`")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="GGUF file(s) (default: the demo model)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("REALIZAR_BENCH_THREADS", "2")))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt before the decode run")
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    p.add_argument("--long-context", type=int, default=0,
                   help="also decode --decode-tokens tokens after a prompt of this many tokens (0: skip)")
    p.add_argument("--llama-site", help="site-packages holding llama_cpp")
    p.add_argument("--ours-only", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    llama_cpp = None if args.ours_only else import_llama_cpp(args.llama_site)
    if llama_cpp is None and not args.ours_only:
        print("llama_cpp not importable: printing realizar's figures only", file=sys.stderr)
    rng = np.random.default_rng(0)
    results = []
    for path in args.model or [default_model()]:
        n_ctx = max([args.prompt_tokens + args.decode_tokens, args.long_context + args.decode_tokens] + args.prefill) + 16
        engines = [Ours(path, args.threads, n_ctx)]
        if llama_cpp is not None:
            engines.append(LlamaCpp(llama_cpp, path, args.threads, n_ctx))
        prompt = rng.integers(100, 20000, args.prompt_tokens).tolist()
        work = [(f"decode {args.decode_tokens}", lambda e, prompt=prompt: e.decode(prompt, args.decode_tokens))]
        for n in args.prefill:
            toks = rng.integers(100, 20000, n).tolist()
            work.append((f"prefill {n}", lambda e, toks=toks: e.prefill(toks)))
        if args.long_context:
            long_prompt = rng.integers(100, 20000, args.long_context).tolist()
            work.append((f"decode @{args.long_context}",
                         lambda e, p=long_prompt: e.decode(p, args.decode_tokens)))
        print(f"{Path(path).name}, {args.threads} threads, median of {args.repeats} (tokens/s)")
        print(f"  {'workload':<14}" + "".join(f"{e.name:>12}" for e in engines) + ("       ratio" if len(engines) > 1 else ""))
        for label, fn in work:
            for e in engines:  # warm-up
                fn(e)
            runs: dict[str, list[float]] = {e.name: [] for e in engines}
            for _ in range(args.repeats):
                for e in engines:
                    runs[e.name].append(fn(e))
            med = {k: statistics.median(v) for k, v in runs.items()}
            line = f"  {label:<14}" + "".join(f"{med[e.name]:>12.1f}" for e in engines)
            row = {"model": Path(path).name, "workload": label, "threads": args.threads, **med}
            if len(engines) > 1:
                ratio = med["realizar"] / med["llama.cpp"]
                line += f"{ratio:>11.2f}x"
                row["ratio"] = ratio
            print(line, flush=True)
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
