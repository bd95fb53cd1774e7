"""ServerConfig: every setting of `realizar serve`, with its CLI flag and its REALIZAR_* environment twin."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..types import KV_CACHE_DTYPES


@dataclass
class ServerConfig:
    models: list[tuple[str, str]] = field(default_factory=list)  # (id, path or pulled name), loaded at start
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: list[str] = field(default_factory=list)  # empty: no auth
    admin_keys: list[str] = field(default_factory=list)  # POST/DELETE /models; empty: those are disabled
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers
    # engine
    device: str = "cpu"  # "cpu" or "cuda" (every model on the first GPU)
    threads: int | None = None
    pack: bool = True  # packed weight copies (Model.load's pack)
    max_num_seqs: int = 32
    max_queue: int = 256
    ctx_size: int | None = None  # None: the model's own context length
    kv_cache_bytes: int | None = None
    kv_cache_dtype: str = "f16"  # "f16" or "q8_0" (about half the KV memory; CPU only)
    # limits
    max_body: int = 4 * 1024 * 1024
    max_batch: int = 64  # items of /batch/* and n x prompts of /v1/completions
    max_n: int = 16
    request_timeout: float = 600.0  # per generation request, -> 504
    drain_timeout: float = 30.0  # SIGTERM: how long running requests may finish
    sse_ping_interval: float = 15.0
    retry_after: int = 1  # seconds, on 429
    default_max_tokens: int = 50  # the seed API's /generate
    access_log: bool = False
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            from .. import __version__

            self.version = __version__
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("max_num_seqs", "max_queue", "max_body", "max_batch", "max_n", "port"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        for name in ("request_timeout", "drain_timeout", "sse_ping_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)!r})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.kv_cache_dtype!r})")
        if self.kv_cache_dtype == "q8_0" and self.device == "cuda":
            raise ValueError("kv_cache_dtype 'q8_0' runs on the CPU only: the CUDA backend keeps K and V as f16")
        if self.ctx_size is not None and self.ctx_size < 16:
            raise ValueError(f"ctx_size must be at least 16 (got {self.ctx_size})")
        ids = [m[0] for m in self.models]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"model id(s) given twice: {', '.join(sorted(dupes))}")
