"""Exception types of realizar's public API."""


class RealizarError(Exception):
    """Base of realizar's own errors."""


class GGUFError(RealizarError, ValueError):
    """A GGUF file is malformed or unsupported; the message names the file and the problem."""


class ModelError(RealizarError, ValueError):
    """A model cannot be loaded or run (unsupported architecture, tensor type, missing tensor...)."""


class DeviceError(RealizarError, RuntimeError):
    """The requested compute device cannot be used (no CUDA build, no GPU or driver, out of device memory)."""


class QueueFull(RealizarError):
    """The engine's waiting queue is full."""
