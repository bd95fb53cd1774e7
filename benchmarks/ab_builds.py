"""Two builds of the C++ core, measured alternately: the way to see a change of a few percent on a shared machine
whose speed moves by 10-25% from one minute to the next.

    .venv/bin/python benchmarks/ab_builds.py A_DIR B_DIR [--rounds 6] [--threads 2] [--model PATH]

A_DIR and B_DIR each hold a `realizar` package directory whose `_core*.so` is the build to measure, e.g.

    cmake -S . -B /tmp/bB -G Ninja -DCMAKE_BUILD_TYPE=Release -DREALIZAR_CUDA=OFF \\
        -Dpybind11_DIR=$(.venv/bin/python -c "import pybind11; print(pybind11.get_cmake_dir())")
    cmake --build /tmp/bB && mkdir -p /tmp/B && cp -r python/realizar /tmp/B/ && cp /tmp/bB/_core*.so /tmp/B/realizar/

(and A from the build before the change, the same way, or from build/cpu). Each round runs one process per build,
in alternating order, each timing the batch-1, batch-16 and 16 x 20 prefill steps of bench_step.py (median of its
repetitions; wall time on --threads, and CPU time on one thread, which a preempted neighbour disturbs less) and
the packed 576x1536 Q4_1 and Q8_0 products at batch 16 (common.best_seconds). Printed: each figure's median per build, its
ratio B / A, and in how many rounds B was the faster.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Runs inside the measuring process: only the given package directory's realizar may load.
CHILD = r"""
import json, sys, time
pkg, model_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.meta_path[:] = [f for f in sys.meta_path
                    if "editable" not in type(f).__module__.lower() and "skbuild" not in type(f).__module__.lower()]
sys.path.insert(0, pkg)
sys.path.insert(1, sys.argv[4])
import numpy as np
import realizar
if not realizar._load_core().__file__.startswith(pkg):
    raise SystemExit(f"{pkg}: its realizar did not load (got {realizar._load_core().__file__})")
from bench_step import step_ms
from common import activations, best_seconds, core, weights
from realizar.model import Model
from realizar.types import GGMLType

out = {}
rng = np.random.default_rng(0)
for nth, clock, tag in ((threads, time.perf_counter, ""), (1, time.process_time, " cpu1")):
    m = Model.load(model_path, threads=nth)
    cache = m.new_kv_cache(16 * 3)
    def step(batch, n_tokens, pos, reps):
        return step_ms(m, cache, batch, n_tokens, pos, "last", reps, rng, clock)
    if nth == threads:
        out["b1 ms"] = step(1, 1, 24, 61)
    out["b16 ms" + tag] = step(16, 1, 24, 21)
    out["prefill16x20 ms" + tag] = step(16, 20, 0, 5)
    m.close()
core().set_threads(threads)
for t in ("Q4_1", "Q8_0"):
    tid, rows, k = int(GGMLType[t]), 576, 1536
    w = core().pack_weights(tid, weights(t, rows, k), rows, k)
    x = activations(16, k)
    s = best_seconds(lambda: core().matmul(tid, w, rows, k, x, packed=True), min_time=1.0)
    out[f"{t} b16 GFLOP/s"] = 2 * rows * k * 16 / s / 1e9
print(json.dumps(out))
"""


def measure(pkg: str, model: str, threads: int) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", CHILD, pkg, model, str(threads), str(HERE)], capture_output=True,
                       text=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    if r.returncode != 0:
        raise SystemExit(f"measuring {pkg} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    for d in (args.a, args.b):
        if not list(Path(d, "realizar").glob("_core*.so")):
            raise SystemExit(f"{d}: no realizar/_core*.so there (see the usage above)")
    sys.path.insert(0, str(HERE))
    from bench_engine import find_model

    model = args.model or find_model()
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            runs[name].append(measure(str(Path(getattr(args, name.lower())).resolve()), model, args.threads))
        print(f"round {r + 1}: " + "  ".join(f"{k} {runs['A'][-1][k]:.1f}/{runs['B'][-1][k]:.1f}"
                                             for k in runs["A"][-1]), flush=True)
    print(f"{'figure':22s} {'A median':>9s} {'B median':>9s} {'B / A':>6s} {'B better':>9s}")
    for k in runs["A"][0]:
        a = [x[k] for x in runs["A"]]
        b = [x[k] for x in runs["B"]]
        higher_is_better = "GFLOP" in k
        wins = sum((y > x) == higher_is_better for x, y in zip(a, b, strict=True))
        print(f"{k:22s} {statistics.median(a):9.1f} {statistics.median(b):9.1f} "
              f"{statistics.median(b) / statistics.median(a):6.3f} {wins:>4d} of {len(a)}")


if __name__ == "__main__":
    main()
