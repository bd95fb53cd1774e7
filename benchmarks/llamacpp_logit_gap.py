#!/usr/bin/env python3
"""How far our logits are from llama.cpp's recorded ones (issue 3), per variant of SmolLM2-135M.

Measured exactly as tests/test_model.py's test_matches_llamacpp does: each reference prompt is fed in one
step to a fresh sequence (threads=2, n_ctx=256), and the first-step logits of llama.cpp's top-10 tokens are
compared with the recorded values; then greedy decoding runs for the recorded number of steps. Prints per
variant the max and median |Δ| over the prompts' 3 x 10 top-10 logits, each prompt's max, and the greedy
agreement: steps equal to llama.cpp's before the first difference, out of the recorded steps, with the
recorded top-2 margin at the step where they part (small margins are near-ties).

With --llama-cpp, llama.cpp itself (llama-cpp-python from this interpreter or the anchor venv, as
compare_llamacpp.py finds it) is measured the same way on this machine, with the recorder's settings
(n_threads=2, default context, flash attention off, logits_all), and our first-step logits are also compared
with its: the recorded figures carry the recording machine's summation orders, which llama.cpp here need not
share (another SIMD width changes them), so "llama.cpp here vs recorded" is the floor of what any engine here
can reach, and "ours vs llama.cpp here" measures our numerics against llama.cpp's alone.

    .venv/bin/python benchmarks/llamacpp_logit_gap.py               # every variant found (see find_model)
    .venv/bin/python benchmarks/llamacpp_logit_gap.py Q4_1 Q8_0 --llama-cpp --json gap.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from conftest import REFERENCE, find_model  # noqa: E402
from realizar.hub import sha256_file  # noqa: E402
from realizar.model import Model  # noqa: E402


class Ours:
    def __init__(self, path: Path, threads: int):
        self.model = Model.load(path, threads=threads, n_ctx=256)
        self.seq = None

    def first(self, tokens: list[int], n_more: int) -> np.ndarray:
        self.seq = self.model.new_sequence(len(tokens) + n_more + 1)
        return self.seq.feed(tokens)

    def next(self, token: int) -> np.ndarray:
        return self.seq.feed([token])

    def close(self) -> None:
        self.model.close()


class LlamaCppHere:
    def __init__(self, llama_cpp, path: Path, threads: int):
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, logits_all=True, verbose=False)

    def _last(self) -> np.ndarray:
        return np.array(self.llm.scores[self.llm.n_tokens - 1])

    def first(self, tokens: list[int], n_more: int) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return self._last()

    def next(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last()

    def close(self) -> None:
        self.llm.close()


def measure_prompt(engine, case: dict) -> dict:
    ref = case["greedy_tokens"]
    logits = first = engine.first(case["prompt_tokens"], len(ref))
    deltas = [abs(float(logits[t]) - v) for t, v in case["first_step_top10"]]
    agree = 0
    for step in range(len(ref)):
        token = int(np.argmax(logits))
        if token != ref[step]:
            break
        agree += 1
        if step + 1 < len(ref):
            logits = engine.next(token)
    margins = case["greedy_top2_margins"]
    return {"deltas": deltas, "max": max(deltas), "greedy_agree": agree, "greedy_steps": len(ref),
            "margin_at_split": margins[agree] if agree < len(ref) else None,
            "top10_logits": [float(first[t]) for t, _ in case["first_step_top10"]]}


def summary(prompts: list[dict]) -> dict:
    deltas = [d for p in prompts for d in p["deltas"]]
    return {"max": max(deltas), "median": statistics.median(deltas), "prompts": prompts}


def line(label: str, r: dict) -> str:
    per = " ".join(f"{p['max']:.3f}" for p in r["prompts"])
    greedy = " ".join(f"{p['greedy_agree']}/{p['greedy_steps']}"
                      + (f"({p['margin_at_split']:.2f})" if p["margin_at_split"] is not None else "")
                      for p in r["prompts"])
    return f"{label:24} {r['max']:7.3f} {r['median']:7.3f}  {per}   {greedy}"


def measure_variant(name: str, info: dict, threads: int, llama_cpp=None) -> dict | None:
    path = find_model(info["file"])
    if path is None:
        print(f"{name}: {info['file']} not found", file=sys.stderr)
        return None
    if sha256_file(path) != info["sha256"]:
        print(f"{name}: {path} is not the file the reference was recorded on", file=sys.stderr)
        return None
    out = {}
    engines = [("ours", Ours)] + ([("llama.cpp here", lambda p, t: LlamaCppHere(llama_cpp, p, t))] if llama_cpp else [])
    for label, make in engines:
        engine = make(path, threads)
        try:
            out[label] = summary([measure_prompt(engine, case) for case in info["prompts"]])
        finally:
            engine.close()
    if llama_cpp:  # ours against llama.cpp here, on the recorded top-10 tokens
        deltas = [[abs(a - b) for a, b in zip(po["top10_logits"], pl["top10_logits"], strict=True)]
                  for po, pl in zip(out["ours"]["prompts"], out["llama.cpp here"]["prompts"], strict=True)]
        flat = [d for ds in deltas for d in ds]
        out["ours vs llama.cpp here"] = {"max": max(flat), "median": statistics.median(flat),
                                         "per_prompt": [max(ds) for ds in deltas]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help="variant names (default: all in the reference)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", action="store_true", help="also measure llama.cpp on this machine")
    ap.add_argument("--llama-site", help="site-packages holding llama_cpp (default: as compare_llamacpp.py)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    llama_cpp = None
    if args.llama_cpp:
        from compare_llamacpp import import_llama_cpp

        llama_cpp = import_llama_cpp(args.llama_site)
        if llama_cpp is None:
            raise SystemExit("llama_cpp not importable (see ../shared/tools/llamacpp-anchor.sh)")
    ref = json.loads(REFERENCE.resolve().read_text())
    names = args.variants or list(ref["variants"])
    results = {}
    print(f"{'':8} {'vs recorded':24} {'max|Δ|':>7} {'median':>7}  per prompt max   "
          "greedy agree (recorded margin where they part)")
    for name in names:
        r = measure_variant(name, ref["variants"][name], args.threads, llama_cpp)
        if r is None:
            continue
        results[name] = r
        print(f"{name:8} " + line("ours", r["ours"]), flush=True)
        if llama_cpp:
            print(f"{'':8} " + line("llama.cpp here", r["llama.cpp here"]), flush=True)
            g = r["ours vs llama.cpp here"]
            print(f"{'':8} {'ours vs llama.cpp here':24} {g['max']:7.3f} {g['median']:7.3f}  "
                  + " ".join(f"{x:.3f}" for x in g["per_prompt"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
