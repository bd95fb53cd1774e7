"""The Sanic application: `create_app(config)` builds it, `run_server(config)` serves it in one process.

One process owns the models (DESIGN §2.6). Models given at start are loaded after the server starts listening,
off the event loop, so /health can answer 503 "loading" meanwhile. SIGTERM (or SIGINT) drains: /health turns
503 "draining", new requests get 503, running generations have `drain_timeout` seconds to finish, then the
server stops and the process exits 0. A second signal stops at once.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import Callable

from sanic import Sanic, response
from sanic.request import Request

from ..registry import ModelRegistry
from . import auth
from .config import ServerConfig
from .errors import APIError, error_response, to_api_error
from .routes import ROUTES, Route
from .runtime import ServerState

log = logging.getLogger("realizar.server")

_app_ids = itertools.count()
UNMATCHED = "<unmatched>"  # endpoint label of requests that match no route (never the raw path)


def create_app(config: ServerConfig | None = None, *, registry: ModelRegistry | None = None,
               model_loader: Callable | None = None, engine_factory: Callable | None = None) -> Sanic:
    """A Sanic app serving `config`. `model_loader(id, path, config) -> (model, info)` and
    `engine_factory(model, config, id, metrics, context_length) -> engine` default to the real ones."""
    config = config or ServerConfig()
    app = Sanic(f"realizar_{next(_app_ids)}")
    state = ServerState(config, registry=registry, model_loader=model_loader, engine_factory=engine_factory)
    app.ctx.state = state
    app.ctx.routes = ROUTES
    app.ctx.handle_signals = False
    _configure(app, config)

    users, admins = auth.KeyChecker(config.api_keys), auth.KeyChecker(config.admin_keys)
    metrics = state.metrics

    def finish_metrics(request: Request, status: int) -> None:
        ctx = request.ctx
        if getattr(ctx, "metrics_open", False):
            ctx.metrics_open = False
            metrics.http_finished(request.method, ctx.endpoint, status, time.perf_counter() - ctx.t0)

    app.ctx.finish_metrics = finish_metrics

    def wrap(spec: Route):
        handler = spec.handler
        method, path = spec.method, spec.path
        needs_auth = not spec.public

        async def endpoint(request: Request, **kwargs):
            ctx = request.ctx
            ctx.endpoint = path
            ctx.t0 = time.perf_counter()
            ctx.metrics_open = True
            metrics.http_started(method, path)
            status = 500
            try:
                if needs_auth:
                    if state.draining:
                        raise APIError(503, "the server is shutting down", code="draining",
                                       headers={"Connection": "close"})
                    auth.check(request.headers.get("authorization"), users, admins, spec.admin)
                resp = await handler(request, **kwargs)
                if resp is not None:
                    status = resp.status
                return resp
            except APIError as e:
                status = e.status
                return error_response(e)
            except asyncio.CancelledError:
                status = 499  # the client went away
                raise
            except Exception as e:  # a bug: logged with its traceback, answered as a 500 body
                err = to_api_error(e)
                status = err.status
                return error_response(err)
            finally:
                finish_metrics(request, status)

        endpoint.__name__ = spec.name
        return endpoint

    for spec in ROUTES:
        uri = spec.path.replace("{", "<").replace("}", ">")
        app.add_route(wrap(spec), uri, methods=[spec.method], name=spec.name, strict_slashes=False,
                      unquote=True)

    @app.exception(Exception)
    async def on_error(request: Request, exc: Exception):
        err = to_api_error(exc)
        if request is not None and not getattr(request.ctx, "endpoint", None):
            route = getattr(request, "route", None)
            endpoint = _route_path(route) if route is not None else UNMATCHED
            metrics.http_finished(request.method if request.method in _METHODS else "OTHER", endpoint,
                                  err.status, None, in_flight=False)
        return error_response(err)

    if config.cors_origins:
        _add_cors(app, config.cors_origins)

    @app.after_server_start
    async def started(app: Sanic) -> None:
        if app.ctx.handle_signals:
            _install_signals(app, asyncio.get_running_loop())
        if config.models:
            app.add_task(_load_startup_models(app), name="realizar_load_models")

    @app.before_server_stop
    async def stopping(app: Sanic) -> None:
        state.draining = True
        await state.close()

    return app


_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}


def _route_path(route) -> str:
    name = route.name.rsplit(".", 1)[-1]
    for spec in ROUTES:
        if spec.name == name:
            return spec.path
    return UNMATCHED


def _configure(app: Sanic, config: ServerConfig) -> None:
    c = app.config
    c.REQUEST_MAX_SIZE = config.max_body
    # Our own per-request timeout answers 504 first; Sanic's must never cut a long non-streamed generation.
    c.RESPONSE_TIMEOUT = config.request_timeout + config.drain_timeout + 60
    c.REQUEST_TIMEOUT = 60
    c.KEEP_ALIVE_TIMEOUT = 75
    c.GRACEFUL_SHUTDOWN_TIMEOUT = 3.0  # generations are drained before Sanic's own shutdown starts
    c.ACCESS_LOG = config.access_log
    c.MOTD = False
    c.NOISY_EXCEPTIONS = False
    c.FALLBACK_ERROR_FORMAT = "json"


def _add_cors(app: Sanic, origins: list[str]) -> None:
    allow_all = "*" in origins
    allowed = set(origins)

    def headers_for(request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        if not origin or not (allow_all or origin in allowed):
            return {}
        return {"Access-Control-Allow-Origin": "*" if allow_all else origin, "Vary": "Origin"}

    async def preflight(request: Request, **_):
        h = headers_for(request)
        if h:
            h.update({"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                      "Access-Control-Allow-Headers": "Authorization, Content-Type",
                      "Access-Control-Max-Age": "600"})
        return response.empty(status=204, headers=h)

    for path in sorted({r.path for r in ROUTES}):
        uri = path.replace("{", "<").replace("}", ">")
        app.add_route(preflight, uri, methods=["OPTIONS"], name=f"options_{abs(hash(path))}", strict_slashes=False)

    @app.on_response
    async def cors(request: Request, resp) -> None:
        if resp is not None:
            for k, v in headers_for(request).items():
                resp.headers.setdefault(k, v)


async def _load_startup_models(app: Sanic) -> None:
    state: ServerState = app.ctx.state
    for model_id, path in state.config.models:
        try:
            t0 = time.perf_counter()
            await state.load_model(model_id, path)
            log.info("loaded %s in %.1f s", model_id, time.perf_counter() - t0)
        except Exception as e:
            log.error("cannot load model %s from %s: %s", model_id, path, e)
            state.startup_failed.append(model_id)
        finally:
            state.startup_pending -= 1
    if state.startup_failed and len(state.registry) == 0:
        log.error("no model could be loaded; stopping")
        state.exit_code = 1
        app.stop()


def _install_signals(app: Sanic, loop) -> None:
    state: ServerState = app.ctx.state

    def on_signal(signum: int) -> None:
        if state.draining:
            log.warning("second signal: stopping now")
            app.stop()
            return
        log.info("signal %s: draining (up to %.0f s for running requests)", signal.Signals(signum).name,
                 state.config.drain_timeout)
        app.add_task(_drain_then_stop(app))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def _drain_then_stop(app: Sanic) -> None:
    await app.ctx.state.drain()
    app.stop()


def run_server(config: ServerConfig, **kwargs) -> int:
    """Serve `config` in this process until drained by SIGTERM/SIGINT; the exit code (0, or 1 if no model loaded)."""
    app = create_app(config, **kwargs)
    app.ctx.handle_signals = True
    app.run(host=config.host, port=config.port, single_process=True, register_sys_signals=False,
            access_log=config.access_log, motd=False)
    return app.ctx.state.exit_code
