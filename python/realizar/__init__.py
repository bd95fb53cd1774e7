"""realizar: GGUF language models on our own C++ core, served over HTTP.

Submodules are imported on first use, so `realizar.gguf` or `realizar.quants` work without the compiled core.
"""
from __future__ import annotations

import importlib
import os

from .errors import DeviceError, GGUFError, ModelError, QueueFull, RealizarError

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    "GGUFFile": ("gguf", "GGUFFile"),
    "GGUFWriter": ("gguf", "GGUFWriter"),
    "Tensor": ("gguf", "Tensor"),
    "dequantize": ("kernels", "dequantize"),
    "quantize": ("kernels", "quantize"),
    "Model": ("model", "Model"),
    "GenerationConfig": ("sampling", "GenerationConfig"),
    "GenerationResult": ("model", "GenerationResult"),
    "ModelRegistry": ("registry", "ModelRegistry"),
    "Engine": ("engine", "Engine"),
    "EngineConfig": ("engine", "EngineConfig"),
}

__all__ = ["__version__", "isa", "cuda_available", "DeviceError", "GGUFError", "ModelError", "QueueFull", "RealizarError", *_LAZY]

_core_module = None


def _load_core():
    """The compiled core, with REALIZAR_ISA applied on first import."""
    global _core_module
    if _core_module is None:
        from . import _core as core

        forced = os.environ.get("REALIZAR_ISA")
        if forced:
            try:
                core.set_isa(forced.strip().lower())
            except ValueError as e:
                raise RuntimeError(f"REALIZAR_ISA={forced}: {e}") from None
        _core_module = core
    return _core_module


def isa() -> str:
    """The kernel level in use: 'avx512', 'avx2' or 'scalar'."""
    return _load_core().isa()


def cuda_available() -> bool:
    """True when the CUDA backend is built and a usable GPU is present; never raises."""
    return _cuda_unavailable_reason() is None


def _cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot be used here, or None when it can; never raises."""
    try:
        from . import _cuda  # type: ignore[attr-defined]
    except Exception as e:
        return f"the CUDA backend is not built into this installation ({e})"
    try:
        if _cuda.device_count() > 0:
            return None
    except Exception as e:
        return f"the CUDA runtime failed: {e}"
    return "no usable CUDA device (no NVIDIA GPU, or no driver)"


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'realizar' has no attribute {name!r}")
