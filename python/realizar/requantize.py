"""`realizar quantize`: requantize a GGUF model with our own C++ quantizers.

(Named requantize.py so that the submodule never shadows the function `realizar.quantize`.)

Which type each tensor gets (facts of llama.cpp's policy, so files behave as users expect):
- 1-D tensors (norms, biases) stay F32.
- K-quant types need rows that are a multiple of 256; rows that are not fall back to a 32-block type of
  similar size (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), as llama.cpp does.
- The Q4_K_M mix: Q4_K everywhere, Q6_K for the output head (the token embedding when it is tied) and for
  attn_v / ffn_down in the first and last eighth of the layers and every third layer between.
"""
from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .gguf import GGUFFile, GGUFValueType, GGUFWriter
from .kernels import dequantize, quantize
from .types import GGMLType, ggml_type

# target name -> (base type, llama.cpp's general.file_type value)
TARGETS: dict[str, tuple[GGMLType, int]] = {
    "f32": (GGMLType.F32, 0),
    "f16": (GGMLType.F16, 1),
    "q4_0": (GGMLType.Q4_0, 2),
    "q4_1": (GGMLType.Q4_1, 3),
    "q8_0": (GGMLType.Q8_0, 7),
    "q5_0": (GGMLType.Q5_0, 8),
    "q5_1": (GGMLType.Q5_1, 9),
    "q4_k": (GGMLType.Q4_K, 14),  # llama.cpp calls a plain Q4_K file Q4_K_S
    "q4_k_m": (GGMLType.Q4_K, 15),
    "q5_k": (GGMLType.Q5_K, 16),  # llama.cpp's Q5_K_S
    "q6_k": (GGMLType.Q6_K, 18),
    "bf16": (GGMLType.BF16, 32),
}
K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def parse_target(name: str) -> tuple[str, GGMLType, int]:
    key = name.strip().lower()
    if key not in TARGETS:
        raise ValueError(f"--type {name!r} is not supported; choose one of: {', '.join(TARGETS)}")
    base, ftype = TARGETS[key]
    return key, base, ftype


def _more_bits(layer: int, n_layer: int) -> bool:
    """The layers where Q4_K_M spends Q6_K on attn_v and ffn_down."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def choose_type(name: str, shape: tuple[int, ...], target: str, base: GGMLType, n_layer: int,
                tied_output: bool) -> GGMLType:
    if len(shape) < 2:
        return GGMLType.F32
    chosen = base
    if target == "q4_k_m":
        layer = _LAYER.match(name)
        is_head = name == "output.weight" or (tied_output and name == "token_embd.weight")
        if is_head:
            chosen = GGMLType.Q6_K
        elif layer and (name.endswith("attn_v.weight") or name.endswith("ffn_down.weight")):
            if _more_bits(int(layer.group(1)), n_layer):
                chosen = GGMLType.Q6_K
    if chosen in K_FALLBACK and shape[-1] % 256:
        chosen = K_FALLBACK[chosen]
    return chosen


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, target: str, threads: int | None = None,
                  quiet: bool = False) -> dict[str, str]:
    """Requantize `src` into `dst`; returns tensor name -> chosen type name."""
    target, base, ftype = parse_target(target)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{dst}: output would overwrite the input")
    gf = GGUFFile(src)
    arch = gf.architecture or ""
    n_layer = int(gf.metadata.get(f"{arch}.block_count", 0) or 0)
    tied = "output.weight" not in gf.tensors
    plan = {name: choose_type(name, t.shape, target, base, n_layer, tied) for name, t in gf.tensors.items()}

    writer = GGUFWriter(dst, alignment=gf.alignment)
    for key, value in gf.metadata.items():
        if key == "general.alignment":
            continue
        if key == "general.file_type":
            writer.add(key, ftype, GGUFValueType.UINT32)
            continue
        vtype = gf.types[key]
        if vtype == GGUFValueType.ARRAY:
            writer.add(key, value, vtype, gf.array_types.get(key))
        else:
            writer.add(key, value, vtype)
    if "general.file_type" not in gf.metadata:
        writer.add("general.file_type", ftype, GGUFValueType.UINT32)

    total = sum(t.nbytes for t in gf.tensors.values())
    done = 0
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1)

    def convert(name: str) -> np.ndarray:
        t = gf.tensors[name]
        new_type = plan[name]
        if ggml_type(t.type) == new_type:
            return np.array(t.data)  # already in the target type: copy the blocks as they are
        values = dequantize(t.data, t.type, t.shape)
        rows = values.reshape(-1, t.shape[-1])
        # Rows are independent: quantize them in chunks on the pool (the C++ call releases the GIL).
        chunks = np.array_split(rows, max(1, min(len(rows), 4 * (threads or os.cpu_count() or 1))))
        return np.concatenate(list(pool.map(lambda c: quantize(c, new_type), chunks)))

    def tensor_source(name: str):
        def produce() -> np.ndarray:
            nonlocal done
            out = convert(name)
            done += gf.tensors[name].nbytes
            if not quiet and sys.stderr.isatty():
                _progress(done, total, name, plan[name].name, started)
            return out
        return produce

    try:
        for name, t in gf.tensors.items():
            writer.add_tensor(name, tensor_source(name), plan[name], t.shape)
        writer.write()
    finally:
        pool.shutdown()
        gf.close()
    if not quiet:
        counts: dict[str, int] = {}
        for t in plan.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        mix = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        sys.stderr.write(f"\n{dst}: {len(plan)} tensors ({mix}), {os.path.getsize(dst) / 1e6:.1f} MB, "
                         f"{time.perf_counter() - started:.1f}s\n")
    return {name: t.name for name, t in plan.items()}


def _progress(done: int, total: int, name: str, type_name: str, started: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    elapsed = time.perf_counter() - started
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done / max(total, 1):5.1f}% "
                     f"{elapsed:5.1f}s {name[:32]:<32} -> {type_name:<5}")
    sys.stderr.flush()
