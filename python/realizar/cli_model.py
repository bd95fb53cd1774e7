"""`realizar generate` and `realizar chat`: run a model from the command line.

Every option has a REALIZAR_* environment twin (named in its help); a flag given on the command line wins.
Errors are raised as ValueError / OSError / RuntimeError, which `realizar.cli.main` prints as one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .types import KV_CACHE_DTYPES

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p")


def _env(name: str, cast: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return cast(value)
    except ValueError:
        raise SystemExit(f"realizar: error: {name}={value!r} is not a valid {cast.__name__}") from None


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_flag.__name__ = "boolean"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf file or a pulled model name (e.g. smollm2-135m)")
    p.add_argument("--threads", "-t", type=int, default=_env("REALIZAR_THREADS", int),
                   help="compute threads (default: all cores) [REALIZAR_THREADS]")
    p.add_argument("--device", choices=("cpu", "cuda"), default=_env("REALIZAR_DEVICE") or "cpu",
                   help="cpu, or cuda for the first NVIDIA GPU (default cpu) [REALIZAR_DEVICE]")
    p.add_argument("--ctx-size", "-c", type=int, default=_env("REALIZAR_CTX_SIZE", int),
                   help="context length (default: the model's) [REALIZAR_CTX_SIZE]")
    p.add_argument("--no-pack", action="store_true", default=bool(_env("REALIZAR_NO_PACK", _flag)),
                   help="no packed weight copies: read the memory-mapped file only (half the memory, slower "
                        "prompts) [REALIZAR_NO_PACK=1]")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=_env("REALIZAR_KV_CACHE_DTYPE") or "f16",
                   help="how K and V are stored: f16, or q8_0 for about half the memory (CPU only) "
                        "[REALIZAR_KV_CACHE_DTYPE] (default f16)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", "-n", type=int, default=_env("REALIZAR_MAX_TOKENS", int),
                   help="tokens to generate at most (default 128; chat: 512) [REALIZAR_MAX_TOKENS]")
    g.add_argument("--strategy", choices=("greedy", "top_k", "top_p"), default=_env("REALIZAR_STRATEGY"),
                   help="greedy, top_k or top_p (default: greedy, or top_p when a sampling option is given) "
                        "[REALIZAR_STRATEGY]")
    g.add_argument("--temperature", type=float, default=_env("REALIZAR_TEMPERATURE", float),
                   help="sampling temperature (default 1.0) [REALIZAR_TEMPERATURE]")
    g.add_argument("--top-k", type=int, default=_env("REALIZAR_TOP_K", int), help="[REALIZAR_TOP_K] (default 40)")
    g.add_argument("--top-p", type=float, default=_env("REALIZAR_TOP_P", float), help="[REALIZAR_TOP_P] (default 0.95)")
    g.add_argument("--min-p", type=float, default=_env("REALIZAR_MIN_P", float), help="[REALIZAR_MIN_P] (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=_env("REALIZAR_REPETITION_PENALTY", float),
                   help="[REALIZAR_REPETITION_PENALTY] (default 1.0: off)")
    g.add_argument("--presence-penalty", type=float, default=_env("REALIZAR_PRESENCE_PENALTY", float),
                   help="[REALIZAR_PRESENCE_PENALTY] (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=_env("REALIZAR_FREQUENCY_PENALTY", float),
                   help="[REALIZAR_FREQUENCY_PENALTY] (default 0)")
    g.add_argument("--seed", type=int, default=_env("REALIZAR_SEED", int), help="random seed [REALIZAR_SEED]")
    g.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable) [REALIZAR_STOP, one string]")
    g.add_argument("--ignore-eos", action="store_true", default=bool(_env("REALIZAR_IGNORE_EOS", _flag)),
                   help="keep generating past end-of-generation tokens [REALIZAR_IGNORE_EOS=1]")
    p.add_argument("--stats", action="store_true", default=bool(_env("REALIZAR_STATS", _flag)),
                   help="print prompt and generation speed to stderr [REALIZAR_STATS=1]")


def add_commands(sub: Any) -> None:
    """Register `generate` and `chat` on the `realizar` subparsers."""
    s = sub.add_parser("generate", help="complete a prompt, streaming the text to stdout",
                       description="Complete PROMPT with MODEL, streaming the text as it is generated.")
    _add_model_options(s)
    s.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    s.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="chat with a model interactively (stdin lines; /exit or EOF ends)",
                       description="Chat with MODEL through its chat template. Each stdin line is a user message; "
                                   "'/exit' or end of input ends the chat, '/reset' forgets the conversation.")
    _add_model_options(s)
    s.add_argument("--system", default=_env("REALIZAR_SYSTEM"),
                   help="system message (default: the template's own) [REALIZAR_SYSTEM]")
    s.set_defaults(func=cmd_chat)


def generation_config(args: argparse.Namespace, default_max_tokens: int = 128) -> Any:
    """The GenerationConfig the flags (and their environment twins) describe."""
    from .sampling import GenerationConfig

    fields: dict[str, Any] = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields["max_tokens"] = args.max_tokens if args.max_tokens is not None else default_max_tokens
    stops = args.stop if args.stop is not None else ([os.environ["REALIZAR_STOP"]] if os.environ.get("REALIZAR_STOP") else [])
    fields["stop"] = [s.encode().decode("unicode_escape") if "\\" in s else s for s in stops]
    fields["ignore_eos"] = bool(args.ignore_eos)
    strategy = args.strategy
    if strategy is None:
        given = [f for f in SAMPLING_FLAGS if getattr(args, f) is not None]
        if given == ["top_k"]:
            strategy = "top_k"
        elif given:
            strategy = "top_p"
        else:
            strategy = "greedy"
    fields["strategy"] = strategy
    return GenerationConfig(**fields)


def _load(args: argparse.Namespace) -> Any:
    from .model import Model

    return Model.load(args.model, threads=args.threads, n_ctx=args.ctx_size, device=args.device, pack=not args.no_pack,
                      kv_cache_dtype=args.kv_cache_dtype)


def _emit(run: Any, out: Any) -> Any:
    """Write a generation's deltas to `out` as they come; returns what Model._start's generator returns."""
    while True:
        try:
            delta = next(run)
        except StopIteration as done:
            return done.value
        out.write(delta)
        out.flush()


def _print_stats(timings: Any, finish: str) -> None:
    t = timings
    print(f"[prompt: {t.prompt_tokens} tokens in {t.prompt_seconds:.3f} s "
          f"({t.prompt_tokens_per_second:.1f} tok/s); generated: {t.generated_tokens} tokens in "
          f"{t.generate_seconds:.3f} s ({t.tokens_per_second:.1f} tok/s); finish: {finish}]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    config = generation_config(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = _load(args)
    if args.chat:
        prompt = model.apply_chat_template([{"role": "user", "content": prompt}])
    run = model._start(prompt, config)
    _, finish, timings, *_ = _emit(run, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        _print_stats(timings, finish)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    config = generation_config(args, default_max_tokens=512)
    model = _load(args)
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = []
    system = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"realizar chat with {model.name} ('/exit' or Ctrl-D ends, '/reset' forgets)", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.rstrip("\r\n")
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            history.clear()
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        prompt = _fit_history(model, system, history)
        if prompt is None:
            history.pop()
            print("realizar: error: that message does not fit in the context", file=sys.stderr)
            continue
        tee = _Tee(sys.stdout)
        _, finish, timings, *_ = _emit(model._start(prompt, config), tee)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(tee.parts)})
        if args.stats:
            _print_stats(timings, finish)
    return 0


class _Tee:
    """Writes through to `out` and keeps what was written."""

    def __init__(self, out: Any):
        self.out = out
        self.parts: list[str] = []

    def write(self, s: str) -> None:
        self.parts.append(s)
        self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def _fit_history(model: Any, system: list[dict[str, str]], history: list[dict[str, str]]) -> str | None:
    """The prompt for the conversation, dropping the oldest turns until it leaves room to answer."""
    room = max(1, model.n_ctx // 8)
    while history:
        prompt = model.apply_chat_template(system + history)
        if len(model.tokenize(prompt, add_special=True, parse_special=True)) + room <= model.n_ctx:
            return prompt
        if len(history) == 1:
            return None
        del history[:2 if len(history) > 2 else 1]
    return None
