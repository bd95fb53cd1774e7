"""Public array-level entry points to the C++ block kernels."""
from __future__ import annotations

import numpy as np

from . import _load_core
from .types import ggml_type, row_nbytes


def dequantize(data, type, shape) -> np.ndarray:
    """Raw GGUF block bytes of `type` -> float32 array of `shape` (numpy order), computed by the C++ kernels."""
    t = ggml_type(type)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if not isinstance(shape, int) else (int(shape),)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expected = row_nbytes(t, n)
    if raw.size != expected:
        raise ValueError(f"{t.name} {shape}: expected {expected} bytes, got {raw.size}")
    return _load_core().dequantize(raw, int(t), n).reshape(shape)


def quantize(array, type) -> np.ndarray:
    """float32 array -> raw GGUF block bytes of `type` (uint8), computed by the C++ quantizers.

    The last dimension must be a multiple of the type's block size; non-finite values are rejected.
    """
    t = ggml_type(type)
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs at least one dimension")
    row_nbytes(t, x.shape[-1])  # validates the block multiple with a clear message
    if t.name not in ("F32", "F16", "BF16") and not np.isfinite(x).all():
        raise ValueError(f"quantize to {t.name}: input has NaN or infinite values")
    return _load_core().quantize(x.reshape(-1), int(t))
