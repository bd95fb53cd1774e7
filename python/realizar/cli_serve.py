"""`realizar serve` (and `realizar loadtest`): every flag has a REALIZAR_* environment twin (DESIGN §6)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .types import KV_CACHE_DTYPES


def _env(name: str, default=None, cast=str):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return cast(value.strip())
    except ValueError:
        raise SystemExit(f"realizar: error: {name}={value!r} is not a valid {cast.__name__}") from None


def _env_list(name: str) -> list[str]:
    value = os.environ.get(name, "")
    return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _size(text: str) -> int:
    """A byte count: 4194304, 4M, 4MiB, 512k."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


_size.__name__ = "size"


def _model_spec(text: str) -> tuple[str, str]:
    """NAME=PATH, or a bare PATH / pulled name (its id: the pulled name or the file's stem)."""
    name, sep, path = text.partition("=")
    if sep and name and path:
        return name.strip(), path.strip()
    if sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    from .hub import KNOWN_MODELS

    return (text if text in KNOWN_MODELS else Path(text).stem), text


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve models over HTTP (the realizar API and an OpenAI-compatible API)",
                       description="Serve GGUF models over HTTP. Every flag can also be set with the "
                                   "REALIZAR_* environment variable named in its help.")
    s.add_argument("--model", "-m", action="append", type=_model_spec, default=None, metavar="NAME=PATH",
                   help="a model to serve (repeatable): NAME=PATH, a .gguf path or a pulled name "
                        "[REALIZAR_MODEL, comma-separated]")
    s.add_argument("--demo", action="store_true", default=_env_bool("REALIZAR_DEMO"),
                   help="serve the demo model (smollm2-135m), pulling it first if missing [REALIZAR_DEMO=1]")
    s.add_argument("--host", default=_env("REALIZAR_HOST", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for all) [REALIZAR_HOST]")
    s.add_argument("--port", type=int, default=_env("REALIZAR_PORT", 8080, int), help="[REALIZAR_PORT] (default 8080)")
    s.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeatable) [REALIZAR_API_KEY, comma-separated]")
    s.add_argument("--admin-key", action="append", default=None,
                   help="key for POST/DELETE /models (repeatable; without one those are disabled) "
                        "[REALIZAR_ADMIN_KEY]")
    s.add_argument("--cors-origins", default=_env("REALIZAR_CORS_ORIGINS", ""),
                   help="comma-separated origins allowed by CORS, or '*' (default: CORS off) [REALIZAR_CORS_ORIGINS]")
    s.add_argument("--device", choices=["cpu", "cuda"], default=_env("REALIZAR_DEVICE", "cpu"),
                   help="where the models run: cpu, or cuda for the first NVIDIA GPU (default cpu) [REALIZAR_DEVICE]")
    s.add_argument("--threads", type=int, default=_env("REALIZAR_THREADS", None, int),
                   help="compute threads per model (default: all cores) [REALIZAR_THREADS]")
    s.add_argument("--no-pack", action="store_true", default=_env_bool("REALIZAR_NO_PACK"),
                   help="no packed weight copies: the models read their memory-mapped files only, shared between "
                        "processes, at about a third of the batched speed [REALIZAR_NO_PACK=1]")
    s.add_argument("--max-num-seqs", type=int, default=_env("REALIZAR_MAX_NUM_SEQS", 32, int),
                   help="requests batched together per model (default 32) [REALIZAR_MAX_NUM_SEQS]")
    s.add_argument("--max-queue", type=int, default=_env("REALIZAR_MAX_QUEUE", 256, int),
                   help="waiting requests per model before 429 (default 256) [REALIZAR_MAX_QUEUE]")
    s.add_argument("--ctx-size", type=int, default=_env("REALIZAR_CTX_SIZE", None, int),
                   help="context per request (default: the model's) [REALIZAR_CTX_SIZE]")
    s.add_argument("--kv-cache-bytes", type=_size, default=_env("REALIZAR_KV_CACHE_BYTES", None, _size),
                   help="KV cache pool per model, e.g. 512M (default: from free memory) [REALIZAR_KV_CACHE_BYTES]")
    s.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=_env("REALIZAR_KV_CACHE_DTYPE", "f16"),
                   help="how the KV cache stores K and V: f16 (default, as llama.cpp) or q8_0 (about half the "
                        "memory, so about twice the tokens in the same pool; faster at long contexts; CPU only) "
                        "[REALIZAR_KV_CACHE_DTYPE]")
    s.add_argument("--max-body", type=_size, default=_env("REALIZAR_MAX_BODY", 4 << 20, _size),
                   help="largest request body, e.g. 4M (default 4 MiB; larger gets 413) [REALIZAR_MAX_BODY]")
    s.add_argument("--max-batch", type=int, default=_env("REALIZAR_MAX_BATCH", 64, int),
                   help="items in one /batch/* request, and prompts x n (default 64) [REALIZAR_MAX_BATCH]")
    s.add_argument("--request-timeout", type=float, default=_env("REALIZAR_REQUEST_TIMEOUT", 600.0, float),
                   help="seconds a generation may take before 504 (default 600) [REALIZAR_REQUEST_TIMEOUT]")
    s.add_argument("--drain-timeout", type=float, default=_env("REALIZAR_DRAIN_TIMEOUT", 30.0, float),
                   help="on SIGTERM, seconds running requests get to finish (default 30) [REALIZAR_DRAIN_TIMEOUT]")
    s.add_argument("--access-log", action="store_true", default=_env_bool("REALIZAR_ACCESS_LOG"),
                   help="log every request [REALIZAR_ACCESS_LOG=1]")
    s.add_argument("--log-level", default=_env("REALIZAR_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="[REALIZAR_LOG_LEVEL] (default info)")
    s.set_defaults(func=cmd_serve)

    try:
        from .loadtest import cli as loadtest_cli
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.loadtest", f"{__package__}.loadtest.cli"):
            raise
    else:
        loadtest_cli.add_command(sub)


def server_config(args):
    """The ServerConfig of parsed `serve` arguments (environment twins already applied as defaults)."""
    from .hub import DEMO_MODEL
    from .server import ServerConfig

    models = list(args.model) if args.model else [_model_spec(m) for m in _env_list("REALIZAR_MODEL")]
    if args.demo and not any(path == DEMO_MODEL for _, path in models):
        models.insert(0, (DEMO_MODEL, DEMO_MODEL))
    api_keys = args.api_key if args.api_key else _env_list("REALIZAR_API_KEY")
    admin_keys = args.admin_key if args.admin_key else _env_list("REALIZAR_ADMIN_KEY")
    return ServerConfig(
        models=models, host=args.host, port=args.port, api_keys=api_keys, admin_keys=admin_keys,
        cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()],
        device=args.device, threads=args.threads, pack=not args.no_pack, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, ctx_size=args.ctx_size,
        kv_cache_bytes=args.kv_cache_bytes, kv_cache_dtype=args.kv_cache_dtype, max_body=args.max_body, max_batch=args.max_batch,
        request_timeout=args.request_timeout, drain_timeout=args.drain_timeout, access_log=args.access_log,
    )


def cmd_serve(args) -> int:
    from . import hub

    # Our loggers only: Sanic configures its own, and a root handler would print their lines twice.
    log = logging.getLogger("realizar")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    log.propagate = False
    logging.getLogger("sanic").setLevel(max(logging.INFO, log.level))
    config = server_config(args)
    if config.device == "cuda":
        from . import _cuda_unavailable_reason

        reason = _cuda_unavailable_reason()
        if reason:
            raise SystemExit(f"realizar: error: --device cuda: {reason}")
    # Fail fast, before listening, on paths that do not exist; pull the demo model with a progress bar.
    for _, path in config.models:
        if path in hub.KNOWN_MODELS:
            hub.resolve(path, pull_missing=True)
        else:
            hub.resolve(path)
    if not config.models:
        print("realizar: serving no model yet (add one with --model NAME=PATH, --demo, or POST /models)",
              file=sys.stderr)
    from .server import run_server

    print(f"realizar: listening on http://{config.host}:{config.port} "
          f"(models: {', '.join(m for m, _ in config.models) or 'none'})", file=sys.stderr)
    return run_server(config)
