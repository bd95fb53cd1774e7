"""Kernel throughput: dequantize and matmul per block type, ISA level and batch.

asv (from the repository root, with the package built by `make dev`):

    .venv/bin/asv run -E existing:.venv/bin/python --quick --bench bench_kernels

`track_` benchmarks report GB/s of weight bytes read and GFLOP/s (2 * rows * k * batch per matmul) on
REALIZAR_BENCH_THREADS threads (default 2). As a script it prints the same figures as a table next to the
machine's measured memory read bandwidth, and each path's speed relative to scalar ("packed-avx2" and
"packed-avx512": the interleaved copy the model's SIMD products use, packed.h, through each level's tiles):

    .venv/bin/python benchmarks/bench_kernels.py [--types Q4_1,Q8_0,Q4_K,Q6_K] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

try:
    from .common import BENCH_THREADS, SHAPES, activations, best_seconds, block_size, core, isa_supported, weights
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import BENCH_THREADS, SHAPES, activations, best_seconds, block_size, core, isa_supported, weights

from realizar.types import GGMLType

ISAS = ["scalar", "avx2", "avx512"]
# The matmul's paths: each ISA's tiles over the GGUF layout, and the packed copy (packed.h) the model's SIMD
# products read where the type has one.
PACKED_PATHS = ["packed-avx2", "packed-avx512"]
MATMUL_PATHS = ISAS + PACKED_PATHS
WEIGHT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]


def _require(type_name: str, isa: str, k: int, rows: int = 0) -> None:
    if isa in PACKED_PATHS:
        if not (core().packable(int(GGMLType[type_name]), rows, k) and isa_supported(isa.split("-")[1])):
            raise NotImplementedError(f"no {isa} {type_name} {rows}x{k} here")
        return
    if not isa_supported(isa):
        raise NotImplementedError(f"{isa} not supported by this CPU")
    if k % block_size(type_name):
        raise NotImplementedError(f"k={k} is not a multiple of {type_name}'s block size")


class Dequantize:
    """Raw blocks -> float32 for one 576x1536 matrix."""

    params = [WEIGHT_TYPES, ISAS]
    param_names = ["type", "isa"]

    def setup(self, type_name, isa):
        rows, k = SHAPES["576x1536"]
        _require(type_name, isa, k)
        self.raw = weights(type_name, rows, k)
        self.n = rows * k
        self.tid = int(GGMLType[type_name])

    def time_dequantize(self, type_name, isa):
        core().dequantize(self.raw, self.tid, self.n, isa)

    def track_weight_gbps(self, type_name, isa):
        s = best_seconds(lambda: core().dequantize(self.raw, self.tid, self.n, isa))
        return self.raw.nbytes / s / 1e9

    track_weight_gbps.unit = "GB/s"


class QuantizeActivations:
    """float32 -> the activation formats the matmuls read (Q8_0, Q8_1, Q8_K): 16 rows of 1536 floats, as the
    model quantizes a batch-16 step's FFN down-projection input."""

    params = [["Q8_0", "Q8_1", "Q8_K"], ISAS]
    param_names = ["type", "isa"]

    def setup(self, type_name, isa):
        _require(type_name, isa, 1536)
        self.x = activations(16, 1536).reshape(-1)
        self.tid = int(GGMLType[type_name])

    def time_quantize(self, type_name, isa):
        core().quantize(self.x, self.tid, isa)

    def track_ns_per_32_values(self, type_name, isa):
        s = best_seconds(lambda: core().quantize(self.x, self.tid, isa))
        return s / (self.x.size / 32) * 1e9

    track_ns_per_32_values.unit = "ns"


class MatMul:
    """y[batch, rows] = x[batch, k] @ W[rows, k].T, W in GGUF blocks, on BENCH_THREADS threads."""

    params = [["Q4_1", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "F16"], MATMUL_PATHS, [1, 16], list(SHAPES)]
    param_names = ["type", "isa", "batch", "shape"]
    timeout = 300

    def setup(self, type_name, isa, batch, shape):
        rows, k = SHAPES[shape]
        _require(type_name, isa, k, rows)
        core().set_threads(BENCH_THREADS)
        self.tid = int(GGMLType[type_name])
        self.w = weights(type_name, rows, k)
        if isa in PACKED_PATHS:
            self.w = core().pack_weights(self.tid, self.w, rows, k)
        self.x = activations(batch, k)
        self.rows, self.k, self.batch = rows, k, batch

    def _call(self, isa):
        call_matmul(self.tid, self.w, self.rows, self.k, self.x, isa)

    def time_matmul(self, type_name, isa, batch, shape):
        self._call(isa)

    def track_weight_gbps(self, type_name, isa, batch, shape):
        return self.w.nbytes / best_seconds(lambda: self._call(isa)) / 1e9

    track_weight_gbps.unit = "GB/s"

    def track_gflops(self, type_name, isa, batch, shape):
        return 2.0 * self.rows * self.k * self.batch / best_seconds(lambda: self._call(isa)) / 1e9

    track_gflops.unit = "GFLOP/s"


def call_matmul(tid: int, w, rows: int, k: int, x, path: str):
    if path in PACKED_PATHS:
        return core().matmul(tid, w, rows, k, x, path.split("-")[1], packed=True)
    return core().matmul(tid, w, rows, k, x, path)


def main() -> None:
    from common import read_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_1,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--threads", type=int, default=BENCH_THREADS)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    args = ap.parse_args()
    min_time = 0.05 if args.quick else 0.3
    c = core()
    isas = [i for i in ISAS if isa_supported(i)]
    print(f"CPU ISAs: {', '.join(isas)}; threads {args.threads}")
    for th in sorted({1, args.threads}):
        print(f"memory read bandwidth, {th} thread(s): 256 MiB buffer {read_bandwidth(256 << 20, th):.1f} GB/s, "
              f"8 MiB buffer {read_bandwidth(8 << 20, th):.1f} GB/s")
    c.set_threads(args.threads)
    print("activation quantizers, 16 x 1536 floats (ns per 32 values):")
    for type_name in QuantizeActivations.params[0]:
        q = QuantizeActivations()
        row = []
        for isa in isas:
            q.setup(type_name, isa)
            row.append(f"{isa} {q.track_ns_per_32_values(type_name, isa):.1f}")
        print(f"  {type_name}: " + ", ".join(row))
    print(f"{'type':5s} {'shape':>10s} {'batch':>5s} {'isa':>13s} {'us':>10s} {'GB/s':>7s} {'GFLOP/s':>8s} {'x scalar':>8s}")
    for type_name in args.types.split(","):
        tid = int(GGMLType[type_name])
        for shape in args.shapes.split(","):
            rows, k = SHAPES[shape]
            if k % block_size(type_name):
                continue
            w = weights(type_name, rows, k)
            for batch in (int(b) for b in args.batches.split(",")):
                x = activations(batch, k)
                base = None
                packed = [p for p in PACKED_PATHS if p.split("-")[1] in isas] if c.packable(tid, rows, k) else []
                for isa in isas + packed:
                    wp = c.pack_weights(tid, w, rows, k) if isa in PACKED_PATHS else w
                    s = best_seconds(functools.partial(call_matmul, tid, wp, rows, k, x, isa), min_time=min_time)
                    base = base or s
                    print(f"{type_name:5s} {shape:>10s} {batch:5d} {isa:>13s} {s * 1e6:10.1f} {w.nbytes / s / 1e9:7.2f} "
                          f"{2.0 * rows * k * batch / s / 1e9:8.1f} {base / s:8.1f}", flush=True)


if __name__ == "__main__":
    main()
