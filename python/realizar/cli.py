"""The `realizar` command line. Errors are one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _env_default(name: str, default=None, cast=str):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise SystemExit(f"realizar: error: {name}={value!r} is not a valid {cast.__name__}") from None


def cmd_info(args) -> int:
    from .info import info_dict, info_text

    path = _resolve(args.file)
    if args.json:
        print(json.dumps(info_dict(path), indent=2, default=str))
    else:
        print(info_text(path))
    return 0


def cmd_pull(args) -> int:
    from .hub import pull

    path = pull(args.name, quiet=args.quiet, force=args.force)
    print(path)
    return 0


def cmd_quantize(args) -> int:
    from .requantize import quantize_file

    quantize_file(_resolve(args.input), args.output, args.type, threads=args.threads, quiet=args.quiet)
    return 0


def _resolve(name_or_path: str):
    from .hub import resolve

    return resolve(name_or_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realizar", description="GGUF language models on a C++ core, over HTTP.")
    p.add_argument("--version", action="version", version=f"realizar {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a GGUF file")
    s.add_argument("file", help="path to a .gguf file or a pulled model name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("pull", help="fetch a named model into the cache ($REALIZAR_HOME)")
    s.add_argument("name", help="model name, e.g. smollm2-135m")
    s.add_argument("--force", action="store_true", help="fetch again even when cached")
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("quantize", help="requantize a GGUF model")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", required=True,
                   help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_K, q5_K, q6_K or q4_K_M (a mix)")
    s.add_argument("--threads", type=int, default=_env_default("REALIZAR_THREADS", None, int))
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(func=cmd_quantize)

    _add_model_commands(sub)
    return p


def _add_model_commands(sub) -> None:
    """Commands that run a model (generate, chat) or serve one (serve, loadtest), registered by their modules."""
    import importlib

    for module in ("cli_model", "cli_serve"):
        try:
            mod = importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module}":
                raise
            continue
        mod.add_commands(sub)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (OSError, ValueError, RuntimeError) as e:
        print(f"realizar: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
