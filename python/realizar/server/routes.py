"""The HTTP endpoints (DESIGN §4): the seed API, OpenAI's, model management, metrics and docs.

Every route is one `Route` in ROUTES: its handler, its schemas and whether it is public or admin-only. The app
registers them, the auth middleware reads the flags and /openapi.json is generated from the same table.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from sanic import response
from sanic.request import Request

from . import schemas as S
from .errors import APIError, bad_request, to_api_error
from .generation import (
    check_token_ids,
    collect_all,
    fit_max_tokens,
    make_config,
    merged_events,
    prompt_ids,
    sampling_fields,
    start_all,
    tokenize,
    vocab_size,
)
from .runtime import PING, ServerState

Handler = Callable[..., Awaitable[Any]]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI form: /models/{model_id}
    handler: Handler
    summary: str
    request: dict | None = None
    response: dict | None = None
    public: bool = False  # no API key needed
    admin: bool = False  # admin key needed
    streams: bool = False  # answers text/event-stream when "stream": true
    needs_model: bool = False  # 503 while draining
    tag: str = "realizar"
    response_type: str = "application/json"
    status: int = 200

    @property
    def name(self) -> str:
        return f"{self.method.lower()}_{self.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}" \
            or "root"


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


def _json(request: Request, schema: dict) -> dict:
    return S.parse_object(request.body, schema)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# -- seed API --------------------------------------------------------------------------------------------
async def health(request: Request):
    status, body = _state(request).health()
    return response.json(body, status=status)


async def list_models(request: Request):
    return response.json({"models": _state(request).registry.list()})


async def tokenize_route(request: Request):
    state = _state(request)
    body = _json(request, S.TOKENIZE)
    entry = state.entry(body.get("model"))
    ids = await tokenize(state, entry.model, body["text"], add_special=body.get("add_special", True),
                         parse_special=body.get("parse_special", False))
    return response.json({"tokens": ids, "num_tokens": len(ids)})


async def detokenize_route(request: Request):
    state = _state(request)
    body = _json(request, S.DETOKENIZE)
    entry = state.entry(body.get("model"))
    check_token_ids(entry.model, body["tokens"], "tokens")
    return response.json({"text": entry.model.detokenize(body["tokens"])})


async def batch_tokenize(request: Request):
    state = _state(request)
    body = _json(request, S.BATCH_TOKENIZE)
    _check_batch(state, body["texts"], "texts")
    entry = state.entry(body.get("model"))
    add, parse = body.get("add_special", True), body.get("parse_special", False)
    return response.json({"tokens": [await tokenize(state, entry.model, t, add, parse) for t in body["texts"]]})


def _check_batch(state: ServerState, items: list, param: str) -> None:
    if len(items) > state.config.max_batch:
        raise bad_request(f"'{param}' has {len(items)} items; at most {state.config.max_batch} are allowed", param,
                          code="batch_too_large")


def _seed_fields(state: ServerState, body: dict) -> dict:
    fields = sampling_fields(body, openai=False)
    fields.setdefault("strategy", "greedy")
    return fields


def _generate_response(result, model_id: str) -> dict:
    return {"text": result.text, "tokens": result.token_ids, "num_generated": len(result.token_ids),
            "finish_reason": _seed_reason(result.finish_reason), "model": model_id}


def _seed_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def _prepare(state: ServerState, entry, prompts: list, body: dict, fields: dict, prompt_param: str,
                   default_max: int | None, seeds_vary: int = 1):
    """Token ids and one GenerationConfig per prompt (per choice when seeds_vary > 1)."""
    ids_list, configs = [], []
    requested = fields.pop("max_tokens", None)
    for i, prompt in enumerate(prompts):
        param = prompt_param if len(prompts) == 1 else f"{prompt_param}[{i}]"
        ids = await prompt_ids(state, entry, prompt, param)
        max_tokens = fit_max_tokens(entry, len(ids), requested, default_max, param)
        for j in range(seeds_vary):
            f = dict(fields, max_tokens=max_tokens)
            if j and f.get("seed") is not None:
                f["seed"] = f["seed"] + j
            ids_list.append(ids)
            configs.append(make_config(f))
    return ids_list, configs


async def generate(request: Request):
    state = _state(request)
    body = _json(request, S.GENERATE)
    entry = state.entry(body.get("model"))
    ids, configs = await _prepare(state, entry, [body["prompt"]], body, _seed_fields(state, body), "prompt",
                                  state.config.default_max_tokens)
    gens = start_all(state, entry, ids, configs, collect=not body.get("stream"))
    if body.get("stream"):
        async def chunks(i, ev):
            yield {"text": ev.text, "tokens": ev.token_ids, "finish_reason": ev.finish_reason and
                   _seed_reason(ev.finish_reason), "model": entry.id}
        return await _sse(request, gens, chunks, final=None)
    (result,) = await collect_all(gens)
    return response.json(_generate_response(result, entry.id))


async def batch_generate(request: Request):
    state = _state(request)
    body = _json(request, S.BATCH_GENERATE)
    _check_batch(state, body["prompts"], "prompts")
    entry = state.entry(body.get("model"))
    ids, configs = await _prepare(state, entry, body["prompts"], body, _seed_fields(state, body), "prompts",
                                  state.config.default_max_tokens)
    results = await collect_all(start_all(state, entry, ids, configs, collect=True))
    out = [_generate_response(r, entry.id) for r in results]
    return response.json({"generations": [r["text"] for r in out], "results": out})


async def metrics_route(request: Request):
    m = _state(request).metrics
    return response.raw(m.render(), content_type=m.content_type)


# -- model management ------------------------------------------------------------------------------------
async def load_model(request: Request):
    state = _state(request)
    body = _json(request, S.LOAD_MODEL)
    model_id, path = body["id"], body["path"]
    try:
        entry = await state.load_model(model_id, path)
    except ValueError as e:
        if model_id in state.registry or model_id in state.registry.loading() or "already" in str(e):
            raise APIError(409, str(e), param="id", code="model_exists") from None
        raise bad_request(f"cannot load {path!r}: {e}", "path", code="invalid_model") from None
    except (OSError, RuntimeError) as e:
        raise bad_request(f"cannot load {path!r}: {e}", "path", code="invalid_model") from None
    return response.json(entry.info.as_dict(loaded=True), status=201)


async def unload_model(request: Request, model_id: str):
    state = _state(request)
    if model_id not in state.registry:
        raise APIError(404, f"model {model_id!r} does not exist", param="model_id", code="model_not_found")
    await state.unload_model(model_id)
    return response.json({"id": model_id, "deleted": True})


# -- OpenAI API ------------------------------------------------------------------------------------------
def _openai_model(info: dict) -> dict:
    return {"id": info["id"], "object": "model", "created": int(info.get("loaded_at") or 0), "owned_by": "realizar"}


async def openai_models(request: Request):
    models = [_openai_model(m) for m in _state(request).registry.list() if m["loaded"]]
    return response.json({"object": "list", "data": models})


async def openai_model(request: Request, model_id: str):
    for m in _state(request).registry.list():
        if m["id"] == model_id and m["loaded"]:
            return response.json(_openai_model(m))
    raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")


def _reject_unsupported(body: dict) -> None:
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported by this server", "suffix", code="unsupported")
    if body.get("tools"):
        raise bad_request("'tools' are not supported by this server", "tools", code="unsupported")
    fmt = body.get("response_format")
    if fmt and fmt.get("type", "text") != "text":
        raise bad_request("only 'response_format' {\"type\": \"text\"} is supported", "response_format.type",
                          code="unsupported")
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise bad_request("'best_of' must equal 'n' (no server-side ranking)", "best_of", code="unsupported")


# The values of logprobs, top_logprobs and logit_bias are checked where GenerationConfig checks them (a 400
# naming the field): here only what the request's form adds.
def _completion_logprobs_option(body: dict) -> int | None:
    """/v1/completions' logprobs: how many alternatives per token (0: the chosen token's only), or None. With
    echo, the prompt's tokens get theirs too."""
    value = body.get("logprobs")
    return None if value is None or value is False else value


def _chat_logprobs_option(body: dict) -> int | None:
    """/v1/chat/completions' logprobs (a boolean) and top_logprobs (alternatives per token), or None."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad_request(f"'logprobs' must be a boolean (got {want!r}); 'top_logprobs' sets how many", "logprobs")
    if top is not None and not want:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


def _logit_bias_option(body: dict, model: Any) -> dict[int, Any] | None:
    """OpenAI's logit_bias ({"token id": bias}) keyed by token ids of this model, or None."""
    bias = body.get("logit_bias")
    if not bias:
        return None
    n_vocab = vocab_size(model)
    out: dict[int, Any] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"'logit_bias' keys must be token ids, not {key!r}", "logit_bias") from None
        if token < 0 or (n_vocab is not None and token >= n_vocab):
            raise bad_request(f"'logit_bias': {token} is not a token id of this model (vocabulary size {n_vocab})",
                              "logit_bias", code="invalid_token")
        out[token] = value
    return out


def _token_bytes(model: Any, token: int) -> bytes:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "token_to_piece"):
        return tok.token_to_piece(token)
    return model.detokenize([token]).encode()


def _token_text(model: Any, token: int) -> str:
    return _token_bytes(model, token).decode("utf-8", errors="replace")


def _completion_logprobs(model: Any, logprobs: list, offset: int, prompt: tuple[list[int], list] | None = None
                         ) -> tuple[dict, int]:
    """The legacy completions `logprobs` object of some tokens whose text starts at `offset` of the choice's
    text; also the offset after them. top_logprobs has the alternatives and the chosen token (OpenAI's rule).
    prompt: (prompt token ids, their prompt_logprobs) to put first (echo): the first token has none (null)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if prompt is not None:
        ids, prompt_lps = prompt
        first = _token_text(model, ids[0]) if ids else ""
        out = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [offset]}
        offset += len(first)
        logprobs = [*prompt_lps, *logprobs]
    for lp in logprobs:
        text = _token_text(model, lp.token_id)
        top = {_token_text(model, t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def _chat_logprobs(model: Any, logprobs: list) -> dict:
    """The chat `logprobs` object: per token its text, log-probability, UTF-8 bytes and top alternatives."""
    def entry(token: int, logprob: float) -> dict:
        b = _token_bytes(model, token)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}
    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in logprobs], "refusal": None}


def _check_n(state: ServerState, n: int, n_prompts: int) -> None:
    if n > state.config.max_n:
        raise bad_request(f"'n' must be <= {state.config.max_n} (got {n})", "n")
    if n * n_prompts > state.config.max_batch:
        raise bad_request(f"{n_prompts} prompts x n={n} is more than the {state.config.max_batch} completions "
                          f"allowed in one request", "n" if n > 1 else "prompt", code="batch_too_large")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_prompts(prompt: Any) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


async def completions(request: Request):
    state = _state(request)
    body = _json(request, S.COMPLETION)
    _reject_unsupported(body)
    prompts = _completion_prompts(body["prompt"])
    for i, p in enumerate(prompts):
        if isinstance(p, str) and not p:
            raise bad_request("'prompt' must not be empty", "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    n = body.get("n") or 1
    _check_n(state, n, len(prompts))
    entry = state.entry(body.get("model"))
    fields = sampling_fields(body, openai=True)
    fields["logprobs"] = logprobs = _completion_logprobs_option(body)
    fields["logit_bias"] = _logit_bias_option(body, entry.model)
    if logprobs is not None and body.get("echo"):
        fields["prompt_logprobs"] = logprobs
    ids, configs = await _prepare(state, entry, prompts, body, fields, "prompt", 16, seeds_vary=n)
    echo = [(p if isinstance(p, str) else entry.model.detokenize(p)) if body.get("echo") else "" for p in prompts]
    gens = start_all(state, entry, ids, configs, collect=not body.get("stream"))
    created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    prompt_tokens = sum(len(ids[i * n]) for i in range(len(prompts)))

    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": cid, "object": "text_completion", "created": created, "model": entry.id}
        echoed: set[int] = set()
        offsets = [0] * len(gens)  # where each choice's next token's text starts

        async def chunks(i, ev):
            text = ev.text
            if echo[i // n] and i not in echoed:
                echoed.add(i)
                text = echo[i // n] + text
            lps = None
            if logprobs is not None:
                prompt = (ids[i], ev.prompt_logprobs or []) if echo[i // n] and ev.prompt_logprobs is not None else None
                lps, offsets[i] = _completion_logprobs(entry.model, ev.logprobs or [], offsets[i], prompt)
            chunk = dict(base, choices=[{"index": i, "text": text, "logprobs": lps,
                                         "finish_reason": ev.finish_reason}])
            if include_usage:
                chunk["usage"] = None
            yield chunk

        final = (lambda: dict(base, choices=[], usage=_usage(prompt_tokens, sum(g.generated for g in gens)))) \
            if include_usage else None
        return await _sse(request, gens, chunks, final=final)

    results = await collect_all(gens)
    choices = [{"index": i, "text": echo[i // n] + r.text,
                "logprobs": None if logprobs is None else _completion_logprobs(
                    entry.model, r.logprobs or [], 0, (ids[i], r.prompt_logprobs or []) if echo[i // n] else None)[0],
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return response.json({"id": cid, "object": "text_completion", "created": created, "model": entry.id,
                          "choices": choices, "usage": _usage(prompt_tokens, sum(len(r.token_ids) for r in results))})


def _messages(body: dict) -> list[dict]:
    out = []
    for i, m in enumerate(body["messages"]):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"'messages[{i}].content[{j}].text' must be a string",
                                      f"messages[{i}].content[{j}].text")
            content = "".join(p["text"] for p in content)
        if content is None:
            if m["role"] != "assistant":
                raise bad_request(f"'messages[{i}].content' is required", f"messages[{i}].content",
                                  code="missing_field")
            content = ""
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


async def chat_completions(request: Request):
    state = _state(request)
    body = _json(request, S.CHAT_COMPLETION)
    _reject_unsupported(body)
    n = body.get("n") or 1
    _check_n(state, n, 1)
    messages = _messages(body)
    entry = state.entry(body.get("model"))
    try:
        prompt = entry.model.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise bad_request(f"cannot apply the chat template to 'messages': {e}", "messages") from None
    fields = sampling_fields(body, openai=True)
    if body.get("max_completion_tokens") is not None and fields.get("max_tokens") is None:
        fields["max_tokens"] = body["max_completion_tokens"]
    fields["logprobs"] = logprobs = _chat_logprobs_option(body)
    fields["logit_bias"] = _logit_bias_option(body, entry.model)
    ids, configs = await _prepare(state, entry, [prompt], body, fields, "messages", None, seeds_vary=n)
    gens = start_all(state, entry, ids, configs, collect=not body.get("stream"))
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    prompt_tokens = len(ids[0])

    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": entry.id}
        started: set[int] = set()

        def chunk(i, delta, finish, lps=None):
            c = dict(base, choices=[{"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}])
            if include_usage:
                c["usage"] = None
            return c

        async def chunks(i, ev):
            if i not in started:
                started.add(i)
                yield chunk(i, {"role": "assistant", "content": ""}, None)
            if ev.text or (logprobs is not None and ev.logprobs):
                yield chunk(i, {"content": ev.text}, None,
                            None if logprobs is None else _chat_logprobs(entry.model, ev.logprobs or []))
            if ev.finish_reason is not None:
                yield chunk(i, {}, ev.finish_reason)

        final = (lambda: dict(base, choices=[], usage=_usage(prompt_tokens, sum(g.generated for g in gens)))) \
            if include_usage else None
        return await _sse(request, gens, chunks, final=final)

    results = await collect_all(gens)
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": None if logprobs is None else _chat_logprobs(entry.model, r.logprobs or []),
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return response.json({"id": cid, "object": "chat.completion", "created": created, "model": entry.id,
                          "choices": choices, "usage": _usage(prompt_tokens, sum(len(r.token_ids) for r in results))})


# -- SSE -------------------------------------------------------------------------------------------------
async def _sse(request: Request, gens, chunks, final):
    """Stream `data: {json}` events for every engine output of `gens`, comment pings on silence, an optional
    final (usage) event, then `data: [DONE]`. Errors after the headers are sent become an error event."""
    state = _state(request)
    request.ctx.metrics_deferred = True
    status = 200
    try:
        resp = await request.respond(content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS)
        try:
            async with aclosing(merged_events(gens, state.config.sse_ping_interval)) as events:
                async for i, ev in events:
                    if ev is PING:
                        await resp.send(": ping\n\n")
                        continue
                    async for c in chunks(i, ev):
                        await resp.send(f"data: {_dumps(c)}\n\n")
            if final is not None:
                await resp.send(f"data: {_dumps(final())}\n\n")
        except Exception as e:  # after the headers: the error becomes the last event (500s are logged)
            err = to_api_error(e)
            status = err.status
            await resp.send(f"data: {_dumps(err.body())}\n\n")
        await resp.send("data: [DONE]\n\n")
        await resp.eof()
    except BaseException:
        status = 499
        raise
    finally:
        for g in gens:
            g.cancel()
        request.app.ctx.finish_metrics(request, status)
    return None


# -- docs ------------------------------------------------------------------------------------------------
async def openapi_json(request: Request):
    from .openapi import build_spec

    return response.json(build_spec(request.app.ctx.routes, _state(request).config))


async def docs(request: Request):
    from .openapi import build_spec, docs_html

    return response.html(docs_html(build_spec(request.app.ctx.routes, _state(request).config)))


ROUTES: list[Route] = [
    Route("GET", "/health", health, "Liveness and readiness", response=S.HEALTH_RESPONSE, public=True),
    Route("GET", "/metrics", metrics_route, "Prometheus metrics", public=True,
          response_type="text/plain; version=0.0.4"),
    Route("GET", "/models", list_models, "Models served and being loaded", response=S.MODELS_RESPONSE),
    Route("POST", "/models", load_model, "Load a model at run time (admin key)", request=S.LOAD_MODEL,
          response=S.MODEL_INFO, admin=True, status=201),
    Route("DELETE", "/models/{model_id}", unload_model, "Unload a model (admin key)", response=S.UNLOAD_RESPONSE,
          admin=True),
    Route("POST", "/tokenize", tokenize_route, "Text to token ids", request=S.TOKENIZE,
          response=S.TOKENIZE_RESPONSE, needs_model=True),
    Route("POST", "/detokenize", detokenize_route, "Token ids to text", request=S.DETOKENIZE,
          response=S.DETOKENIZE_RESPONSE, needs_model=True),
    Route("POST", "/generate", generate, "Generate a continuation", request=S.GENERATE,
          response=S.GENERATE_RESPONSE, streams=True, needs_model=True),
    Route("POST", "/batch/tokenize", batch_tokenize, "Tokenize several texts", request=S.BATCH_TOKENIZE,
          response=S.BATCH_TOKENIZE_RESPONSE, needs_model=True),
    Route("POST", "/batch/generate", batch_generate, "Generate for several prompts concurrently",
          request=S.BATCH_GENERATE, response=S.BATCH_GENERATE_RESPONSE, needs_model=True),
    Route("GET", "/v1/models", openai_models, "OpenAI: list models", response=S.OPENAI_MODELS_RESPONSE,
          tag="openai"),
    Route("GET", "/v1/models/{model_id}", openai_model, "OpenAI: retrieve a model", tag="openai",
          response=S.OPENAI_MODELS_RESPONSE["properties"]["data"]["items"]),
    Route("POST", "/v1/completions", completions, "OpenAI: text completions", request=S.COMPLETION,
          response=S.COMPLETION_RESPONSE, streams=True, needs_model=True, tag="openai"),
    Route("POST", "/v1/chat/completions", chat_completions, "OpenAI: chat completions", request=S.CHAT_COMPLETION,
          response=S.CHAT_COMPLETION_RESPONSE, streams=True, needs_model=True, tag="openai"),
    Route("GET", "/openapi.json", openapi_json, "This API's OpenAPI document", public=True, tag="docs"),
    Route("GET", "/docs", docs, "API documentation page", public=True, tag="docs", response_type="text/html"),
]
