"""What the HTTP side keeps between requests: models and their engines, draining/loading state, and the
adapter from an engine request to what handlers need (events, cancellation, timeouts, metrics).

The event loop never runs model code: loading, engine start and stop run in `load_executor` (one at a time),
long tokenizations in `executor`; generation runs on each model's engine thread, whose outputs arrive through
the engine handle's async iterator.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import QueueFull
from ..metrics import EngineMetricsObserver, Metrics
from ..registry import ModelEntry, ModelRegistry
from .config import ServerConfig
from .errors import APIError

log = logging.getLogger("realizar.server")

PING = object()  # yielded by merged event streams when nothing came for a ping interval


# -- model and engine construction (replaceable for tests) -----------------------------------------------
def default_model_loader(model_id: str, path: str, config: ServerConfig) -> tuple[Any, dict[str, Any]]:
    """Load a GGUF model (a path or a pulled name, pulled when missing) and describe it. Runs off the loop."""
    from .. import hub
    from ..model import Model
    from ..registry import describe_gguf

    resolved = hub.resolve(path, pull_missing=True)
    info = describe_gguf(resolved)
    model = Model.load(resolved, threads=config.threads, device=config.device, pack=config.pack)
    return model, info


def default_engine_factory(model: Any, config: ServerConfig, model_id: str, context_length: int | None) -> Any:
    """An engine for `model` with the server's limits (the server adds its metrics observer)."""
    from ..engine import Engine, EngineConfig

    return Engine(model, EngineConfig(max_num_seqs=config.max_num_seqs, max_queue=config.max_queue,
                                      kv_cache_bytes=config.kv_cache_bytes, kv_cache_dtype=config.kv_cache_dtype,
                                      max_model_len=context_length))


# -- one generation request ------------------------------------------------------------------------------
@dataclass
class Event:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None  # the engine's TokenLogprob per token id, when the request asked
    prompt_logprobs: list | None = None  # on the first event: per prompt token after the first, when asked


def _read_output(out: Any) -> Event:
    if isinstance(out, dict):
        get = out.get
    else:
        def get(name, default=None):
            return getattr(out, name, default)
    text = get("text")
    if text is None:
        text = get("delta", "") or ""
    ids = get("token_ids")
    if ids is None:
        ids = get("tokens", []) or []
    return Event(text=text, token_ids=list(ids), finish_reason=get("finish_reason"), logprobs=get("logprobs"),
                 prompt_logprobs=get("prompt_logprobs"))


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list | None = None  # per token id, when the request asked
    prompt_logprobs: list | None = None  # per prompt token after the first, when the request asked


@dataclass(eq=False)
class Generation:
    """One engine request as an HTTP handler sees it: submit, events, cancel, per-request deadline."""

    state: ServerState
    entry: ModelEntry
    prompt_ids: list[int]
    config: Any
    deadline: float  # time.monotonic()
    handle: Any = None
    finished: bool = False
    generated: int = 0
    finish_reason: str | None = None
    expired: bool = False
    only_result: bool = False  # the handler reads only collect(): the engine hands the outputs over together

    def start(self) -> Generation:
        engine = self.entry.engine
        if engine is None:
            raise APIError(503, f"model {self.entry.id!r} has no running engine", code="unavailable")
        try:
            # the engine's own deadline ends the request (finish_reason 'timeout'); ours is the backstop
            self.handle = engine.submit(self.prompt_ids, self.config,
                                        timeout=max(self.deadline - time.monotonic(), 0.001), collect=self.only_result)
        except QueueFull:
            raise APIError(429, f"model {self.entry.id!r}: the waiting queue is full, retry later",
                           code="queue_full", headers={"Retry-After": str(self.state.config.retry_after)}) from None
        except ValueError as e:
            raise APIError(400, str(e), param=_guess_param(str(e))) from None
        except RuntimeError as e:  # the engine is closing (model being unloaded, server draining)
            raise APIError(503, f"model {self.entry.id!r} is not accepting requests: {e}", code="unavailable") \
                from None
        self.state.active.add(self)
        return self

    def cancel(self) -> None:
        """Stop the engine request if it still runs (client gone, timeout, sibling failed); idempotent."""
        if not self.finished:
            self.finished = True
            self.finish_reason = self.finish_reason or "cancelled"
            self.state.active.discard(self)
            if self.handle is not None:
                self.handle.cancel()

    def _record(self, ev: Event) -> None:
        self.generated += len(ev.token_ids)
        if ev.finish_reason is not None and not self.finished:
            self.finished = True
            self.finish_reason = ev.finish_reason
            self.state.active.discard(self)

    async def events(self) -> AsyncIterator[Event]:
        """The engine's outputs as Events; APIError 504 at the deadline. Whoever stops iterating early must
        call cancel() (the handlers do, in `finally`).

        The engine ends a request at its deadline (finish_reason 'timeout'); a loop timer a little later is the
        backstop, cancelling the request if the engine has not ended it. No per-token timers: at 48 streams
        they would cost more than the HTTP work."""
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + max(self.deadline - time.monotonic(), 0) + 1.0, self._expire)
        try:
            async for out in self.handle:
                ev = _read_output(out)
                self._record(ev)
                if ev.finish_reason == "timeout" or (self.expired and ev.finish_reason == "cancelled"):
                    raise self._timeout()
                yield ev
                if ev.finish_reason is not None:
                    return
            if not self.finished:  # ended without a reason: treat as stop
                self._record(Event("", [], "stop"))
        finally:
            timer.cancel()

    def _expire(self) -> None:
        self.expired = True
        if self.handle is not None:
            self.handle.cancel()

    def _timeout(self) -> APIError:
        self.finish_reason = "timeout"
        self.cancel()
        return APIError(504, f"request timed out after {self.state.config.request_timeout:g} s", code="timeout")

    async def collect(self) -> Result:
        parts: list[str] = []
        ids: list[int] = []
        logprobs: list | None = [] if getattr(self.config, "logprobs", None) is not None else None
        prompt_logprobs = None
        async for ev in self.events():
            parts.append(ev.text)
            ids.extend(ev.token_ids)
            if logprobs is not None:
                logprobs.extend(ev.logprobs or ())
            if prompt_logprobs is None:
                prompt_logprobs = ev.prompt_logprobs
        return Result("".join(parts), ids, self.finish_reason or "stop", len(self.prompt_ids), logprobs,
                      prompt_logprobs)


def _guess_param(message: str) -> str | None:
    head = message.split(":", 1)[0].strip()  # realizar's messages start with the field's name
    if head.isidentifier() and " " not in head:
        return head
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop", "strategy", "prompt"):
        if name in message:
            return name
    return None


# -- the server's state ----------------------------------------------------------------------------------
class ServerState:
    def __init__(self, config: ServerConfig, registry: ModelRegistry | None = None,
                 model_loader: Callable | None = None, engine_factory: Callable | None = None):
        self.config = config
        self.registry = registry if registry is not None else ModelRegistry()
        self.metrics = Metrics()
        self.metrics.set_engine_source(self._engine_stats)
        self.model_loader = model_loader or default_model_loader
        self.engine_factory = engine_factory or default_engine_factory
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="realizar-tokenize")
        self.load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realizar-load")
        self.active: set[Generation] = set()
        self.draining = False
        self.startup_pending = len(config.models)  # loaded after the server starts; 503 'loading' till then
        self.startup_failed: list[str] = []
        self.exit_code = 0

    # health ---------------------------------------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        n = len(self.registry)
        if self.draining:
            status = "draining"
        elif n == 0 and (self.startup_pending or self.registry.loading()):
            status = "loading"
        else:
            status = "ok"
        body = {"status": status, "version": self.config.version, "models_loaded": n}
        return (200 if status == "ok" else 503), body

    def _engine_stats(self):
        for entry in self.registry.entries():
            engine = entry.engine
            if engine is not None and hasattr(engine, "stats"):
                try:
                    yield entry.id, engine.stats()
                except Exception:  # a closing engine must not break the scrape
                    log.debug("stats() of %s failed", entry.id, exc_info=True)

    # models ---------------------------------------------------------------------------------------------
    def entry(self, name: str | None) -> ModelEntry:
        """The model a request names (or the default): 404 unknown, 503 none ready, 400 ambiguous."""
        try:
            return self.registry.entry(name)
        except KeyError:
            pass
        if name is not None:
            if name in self.registry.loading():
                raise APIError(503, f"model {name!r} is still loading", code="loading",
                               headers={"Retry-After": "5"})
            raise APIError(404, f"model {name!r} does not exist; see GET /models", param="model",
                           code="model_not_found")
        if len(self.registry) == 0:
            if self.startup_pending or self.registry.loading():
                raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})
            raise APIError(503, "no model is loaded", code="no_model")
        raise APIError(400, f"several models are loaded ({', '.join(self.registry.names())}): name one in 'model'",
                       param="model", code="model_required")

    async def load_model(self, model_id: str, path: str) -> ModelEntry:
        """Load `path` as `model_id` off the event loop and start its engine; the entry once it serves."""
        self.registry.reserve(model_id, path)
        loop = asyncio.get_running_loop()
        try:
            model, info = await loop.run_in_executor(self.load_executor, self.model_loader, model_id, path, self.config)
            context_length = self.config.ctx_size or (info or {}).get("context_length") or _model_context(model)
            engine = await loop.run_in_executor(self.load_executor, self.engine_factory, model, self.config, model_id,
                                                context_length)
        except BaseException:
            self.registry.release(model_id)
            raise
        entry = self.add_loaded(model_id, model, engine, info, path=path)
        log.info("model %s ready (%s)", model_id, path)
        return entry

    def add_loaded(self, model_id: str, model: Any, engine: Any, info: dict | None = None,
                   path: str | None = None) -> ModelEntry:
        """Register a model with its running engine and hook the engine's metrics."""
        if engine is not None and hasattr(engine, "add_observer"):
            engine.add_observer(EngineMetricsObserver(self.metrics, model_id))
        entry = self.registry.register(model_id, model, engine=engine, info=dict(info or {}), path=path)
        entry.extra["context_length"] = _engine_context(engine) or self.config.ctx_size or \
            entry.info.context_length or _model_context(model)
        return entry

    async def unload_model(self, model_id: str) -> None:
        entry = self.registry.unregister(model_id)  # new requests get 404 from now on
        await self.close_engine(entry)
        self.metrics.forget_model(model_id)

    async def close_engine(self, entry: ModelEntry) -> None:
        """Stop the engine: running requests get drain_timeout seconds to finish, then are cancelled."""
        engine = entry.engine
        if engine is not None and hasattr(engine, "close"):
            await asyncio.get_running_loop().run_in_executor(
                self.load_executor, functools.partial(engine.close, timeout=self.config.drain_timeout))

    async def close(self) -> None:
        for gen in list(self.active):  # drained already, or a second signal: nothing may keep us waiting
            gen.cancel()
        for entry in self.registry.entries():
            try:
                await self.close_engine(entry)
            except Exception:
                log.exception("closing the engine of %s failed", entry.id)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.load_executor.shutdown(wait=False, cancel_futures=True)

    # draining -------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Let running generations finish for up to drain_timeout, then cancel what is left."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for gen in list(self.active):
            gen.cancel()


def _engine_context(engine: Any) -> int | None:
    """Tokens one sequence may hold in this engine (context, capped by its KV pool)."""
    try:
        v = engine.stats().get("max_model_len")
    except Exception:
        v = None
    if not isinstance(v, int):
        v = getattr(engine, "max_model_len", None)
    return v if isinstance(v, int) and v > 0 else None


def _model_context(model: Any) -> int | None:
    for name in ("n_ctx", "context_length", "n_ctx_train", "max_position_embeddings"):
        v = getattr(model, name, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(model, "config", None)
    if cfg is not None:
        return _model_context(cfg)
    return None
