"""/openapi.json, generated from the route table and its JSON schemas, and a self-contained docs page."""
from __future__ import annotations

import copy
import html
import json
import re
from typing import Any

from . import schemas as S

_ERROR_STATUSES = {
    "400": "Invalid request: a field is wrong (named in error.param), or the prompt does not fit the context",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "The waiting queue is full (see Retry-After)",
    "503": "Loading or draining",
    "504": "The request timed out",
}


def _to_openapi(schema: dict) -> dict:
    """JSON Schema (draft 2020-12 style, as OpenAPI 3.1 takes it); a deep copy so the spec can be mutated."""
    return copy.deepcopy(schema)


def _path_params(path: str) -> list[dict]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)]


def build_spec(routes, config) -> dict[str, Any]:
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict[str, Any] = {"operationId": r.name, "summary": r.summary, "tags": [r.tag]}
        params = _path_params(r.path)
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _to_openapi(r.request)}}}
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = {r.response_type: {"schema": _to_openapi(r.response)}}
        else:
            ok["content"] = {r.response_type: {"schema": {"type": "string"}}}
        if r.streams:
            ok["content"]["text/event-stream"] = {"schema": {
                "type": "string", "description": "with \"stream\": true: `data: {json}` events, `: ping` comments, "
                                                 "then `data: [DONE]`"}}
        responses: dict[str, Any] = {str(r.status): ok}
        if r.request is not None or r.needs_model or "{" in r.path or r.admin:
            for status, text in _ERROR_STATUSES.items():
                responses[status] = {"description": text,
                                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if r.path == "/health":
            responses["503"] = {"description": "Loading (no model ready yet) or draining",
                                "content": {"application/json": {"schema": _to_openapi(S.HEALTH_RESPONSE)}}}
        op["responses"] = responses
        if r.admin:
            op["security"] = [{"adminKey": []}]
        elif r.public:
            op["security"] = []
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "realizar", "version": config.version,
                 "description": "LLM inference server: the realizar API and an OpenAI-compatible API."},
        "paths": paths,
        "components": {
            "schemas": {"Error": _to_openapi(S.ERROR)},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"},
                                "adminKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}] if config.api_keys else [],
    }


def docs_html(spec: dict) -> str:
    """One page listing every operation with its request and response schemas; no external assets."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec['info']['title'])} API"
             "</title><style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
             "h2{border-bottom:1px solid #ccc}code.m{font-weight:bold;padding:0 .4em;background:#eef}"
             "pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:85%}</style></head><body>",
             f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>",
             f"<p>{html.escape(spec['info']['description'])} Machine-readable: "
             "<a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            parts.append(f"<h2><code class='m'>{method.upper()}</code> <code>{html.escape(path)}</code></h2>"
                         f"<p>{html.escape(op['summary'])}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append("<h3>Request</h3><pre>" + html.escape(json.dumps(body, indent=2)) + "</pre>")
            for status, resp in op["responses"].items():
                if status.startswith("2"):
                    for ctype, c in resp.get("content", {}).items():
                        parts.append(f"<h3>{status} {html.escape(ctype)}</h3><pre>"
                                     + html.escape(json.dumps(c.get("schema"), indent=2)) + "</pre>")
            errors = [s for s in op["responses"] if not s.startswith("2")]
            if errors:
                parts.append("<p>Errors: " + ", ".join(errors) + " with body <code>{\"error\": {\"message\", "
                             "\"type\", \"param\", \"code\"}}</code>.</p>")
    parts.append("</body></html>")
    return "".join(parts)
