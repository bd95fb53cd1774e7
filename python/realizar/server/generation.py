"""From validated request fields to engine requests: prompts to token ids, limits against the context,
sampling fields to a GenerationConfig, and running several generations together (n, batches)."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from .errors import bad_request
from .runtime import PING, Generation, Result, ServerState

LONG_TEXT = 4096  # characters; longer texts are tokenized off the event loop

CONFIG_FIELDS = ("max_tokens", "strategy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos")


def _generation_config_class():
    try:
        from ..sampling import GenerationConfig
    except ImportError:  # pragma: no cover - only while the sampling module is absent
        return None
    return GenerationConfig


def make_config(fields: dict[str, Any]) -> Any:
    """A GenerationConfig from request fields (None values dropped, so its defaults apply)."""
    values = {k: v for k, v in fields.items() if v is not None}
    if "stop" in values and isinstance(values["stop"], str):
        values["stop"] = [values["stop"]]
    if "seed" in values:
        values["seed"] %= 2**64  # OpenAI clients may send negative seeds
    cls = _generation_config_class()
    if cls is None:
        from types import SimpleNamespace

        return SimpleNamespace(**values)
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        for name in list(values):
            if name not in known:
                if name == "ignore_eos" and values[name] is False:
                    del values[name]
                    continue
                raise bad_request(f"'{name}' is not supported by this server", name, code="unsupported")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        head = message.split(":", 1)[0].strip()  # GenerationConfig's messages start with the field's name
        param = head if head in values else next((n for n in CONFIG_FIELDS if n in message), None)
        raise bad_request(message, param) from None


def sampling_fields(body: dict[str, Any], openai: bool) -> dict[str, Any]:
    """GenerationConfig fields from a request. OpenAI requests have OpenAI's defaults (temperature 1, top_p 1,
    no top-k): temperature 0 is greedy, anything else samples with top-p, bounded by top_k when one is given."""
    fields = {name: body.get(name) for name in CONFIG_FIELDS if name in body}
    if openai:
        fields.pop("strategy", None)
        temperature = body.get("temperature")
        fields["temperature"] = 1.0 if temperature is None else temperature
        fields["strategy"] = "greedy" if fields["temperature"] == 0 else "top_p"
        fields["top_p"] = 1.0 if body.get("top_p") is None else body["top_p"]
        fields["top_k"] = 0 if body.get("top_k") is None else body["top_k"]
    return fields


async def tokenize(state: ServerState, model: Any, text: str, add_special: bool = True,
                   parse_special: bool = False) -> list[int]:
    if len(text) > LONG_TEXT:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state.executor, lambda: model.tokenize(text, add_special=add_special,
                                                                                parse_special=parse_special))
    return model.tokenize(text, add_special=add_special, parse_special=parse_special)


def vocab_size(model: Any) -> int | None:
    for owner in (model, getattr(model, "tokenizer", None)):
        if owner is None:
            continue
        for name in ("vocab_size", "n_vocab"):
            v = getattr(owner, name, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def check_token_ids(model: Any, ids: list[int], param: str) -> None:
    n = vocab_size(model)
    if n is None:
        return
    for i, t in enumerate(ids):
        if t >= n:
            raise bad_request(f"'{param}[{i}]' = {t} is not a token id of this model (vocabulary size {n})",
                              f"{param}[{i}]", code="invalid_token")


async def prompt_ids(state: ServerState, entry, prompt: str | list[int], param: str,
                     parse_special: bool = True) -> list[int]:
    if isinstance(prompt, str):
        ids = await tokenize(state, entry.model, prompt, add_special=True, parse_special=parse_special)
        if not ids:
            raise bad_request(f"'{param}' tokenizes to nothing", param, code="empty_prompt")
        return ids
    check_token_ids(entry.model, prompt, param)
    return list(prompt)


def fit_max_tokens(entry, n_prompt: int, requested: int | None, default: int | None, prompt_param: str) -> int:
    """max_tokens within the context: the prompt must leave room; an explicit max_tokens must fit."""
    ctx = entry.extra.get("context_length")
    if ctx is None:
        if requested is None and default is None:
            raise bad_request("'max_tokens' is required for this model", "max_tokens", code="missing_field")
        return requested if requested is not None else default
    if n_prompt >= ctx:
        raise bad_request(f"the prompt is {n_prompt} tokens but the context of model {entry.id!r} holds {ctx}; "
                          f"shorten '{prompt_param}'", prompt_param, code="context_length_exceeded")
    room = ctx - n_prompt
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(f"this model's context is {ctx} tokens; you asked for {n_prompt + requested} "
                          f"({n_prompt} in the prompt, {requested} to generate): lower 'max_tokens'",
                          "max_tokens", code="context_length_exceeded")
    return requested


def deadline(state: ServerState) -> float:
    return time.monotonic() + state.config.request_timeout


def start_all(state: ServerState, entry, prompts: list[list[int]], configs: list[Any],
              collect: bool = False) -> list[Generation]:
    """Submit every request, or none: if one is refused (queue full), the ones already submitted are cancelled.
    collect: the caller reads only the whole results (collect_all), not the events as they come."""
    gens: list[Generation] = []
    end = deadline(state)
    try:
        for ids, cfg in zip(prompts, configs, strict=True):
            gens.append(Generation(state, entry, ids, cfg, end, only_result=collect).start())
    except BaseException:
        for g in gens:
            g.cancel()
        raise
    return gens


async def collect_all(gens: list[Generation]) -> list[Result]:
    """Results in input order; on any error or cancellation (client gone) every generation is cancelled."""
    try:
        return list(await asyncio.gather(*(g.collect() for g in gens)))
    finally:
        for g in gens:
            g.cancel()


async def merged_events(gens: list[Generation], ping: float):
    """(index, Event) from all generations as they come, PING on silence; raises the first APIError (504).
    Cancels every generation when the consumer stops (disconnect) or fails."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for ev in gen.events():
                queue.put_nowait((i, ev))
            queue.put_nowait((i, None))
        except BaseException as e:  # noqa: B036 - handed to the consumer, which re-raises
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    open_ = len(gens)
    try:
        while open_:
            try:
                i, item = await asyncio.wait_for(queue.get(), timeout=ping)
            except asyncio.TimeoutError:
                yield None, PING
                continue
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    open_ -= 1
                    continue
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            g.cancel()
