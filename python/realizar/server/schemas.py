"""Request and response schemas (JSON Schema, the single source for validation and /openapi.json).

`validate(schema, value)` checks the subset of JSON Schema these schemas use and raises a 400 APIError whose
`param` is the offending field (`messages[1].content`). Semantic checks that need the model (prompt length vs
context, token ids vs vocabulary) live in the routes.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .errors import APIError, bad_request

MAX_STOP = 16
MAX_STOP_CHARS = 1000
MAX_SEED = 2**64 - 1

# -- building blocks -------------------------------------------------------------------------------------
TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
             "description": "token ids"}
STOP = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                  {"type": "array", "maxItems": MAX_STOP,
                   "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}},
                  {"type": "null"}],
        "description": "string(s) that end generation; not included in the output"}
MODEL = {"type": "string", "minLength": 1, "maxLength": 128, "description": "model id (default: the only model)"}
STRATEGY = {"type": "string", "enum": ["greedy", "top_k", "top_p"]}


def _num(minimum=None, maximum=None, exclusive_min=None, integer=False, nullable=True, description=None):
    s: dict[str, Any] = {"type": ["integer", "null"] if integer and nullable else "integer" if integer
                         else ["number", "null"] if nullable else "number"}
    if minimum is not None:
        s["minimum"] = minimum
    if exclusive_min is not None:
        s["exclusiveMinimum"] = exclusive_min
    if maximum is not None:
        s["maximum"] = maximum
    if description:
        s["description"] = description
    return s


# Sampling fields shared by every generating endpoint (vLLM's extras included on the OpenAI ones).
SAMPLING_FIELDS = {
    "top_k": _num(minimum=0, integer=True, description="0 disables top-k"),
    "min_p": _num(minimum=0, maximum=1),
    "repetition_penalty": _num(exclusive_min=0, maximum=10),
    "presence_penalty": _num(minimum=-2, maximum=2),
    "frequency_penalty": _num(minimum=-2, maximum=2),
    "seed": _num(minimum=-(2**63), maximum=MAX_SEED, integer=True),
    "stop": STOP,
    "ignore_eos": {"type": ["boolean", "null"]},
}

SEED_GENERATION_FIELDS = {
    "max_tokens": _num(minimum=1, integer=True, nullable=False, description="tokens to generate (default 50)"),
    "strategy": STRATEGY,
    "temperature": _num(minimum=0, maximum=100),
    "top_p": _num(exclusive_min=0, maximum=1),
    **SAMPLING_FIELDS,
    "model": MODEL,
    "stream": {"type": "boolean"},
}

# -- the seed API ----------------------------------------------------------------------------------------
TOKENIZE = {"type": "object", "additionalProperties": False, "required": ["text"], "properties": {
    "text": {"type": "string"}, "model": MODEL, "add_special": {"type": "boolean"},
    "parse_special": {"type": "boolean"}}}
TOKENIZE_RESPONSE = {"type": "object", "properties": {
    "tokens": {"type": "array", "items": {"type": "integer"}}, "num_tokens": {"type": "integer"}}}

DETOKENIZE = {"type": "object", "additionalProperties": False, "required": ["tokens"], "properties": {
    "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}, "model": MODEL}}
DETOKENIZE_RESPONSE = {"type": "object", "properties": {"text": {"type": "string"}}}

GENERATE = {"type": "object", "additionalProperties": False, "required": ["prompt"], "properties": {
    "prompt": {"anyOf": [{"type": "string", "minLength": 1}, TOKEN_IDS]}, **SEED_GENERATION_FIELDS}}
GENERATE_RESPONSE = {"type": "object", "properties": {
    "text": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}},
    "num_generated": {"type": "integer"}, "finish_reason": {"type": "string", "enum": ["stop", "length"]},
    "model": {"type": "string"}}}

BATCH_TOKENIZE = {"type": "object", "additionalProperties": False, "required": ["texts"], "properties": {
    "texts": {"type": "array", "minItems": 1, "items": {"type": "string"}}, "model": MODEL,
    "add_special": {"type": "boolean"}, "parse_special": {"type": "boolean"}}}
BATCH_TOKENIZE_RESPONSE = {"type": "object", "properties": {
    "tokens": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}}}

BATCH_GENERATE = {"type": "object", "additionalProperties": False, "required": ["prompts"], "properties": {
    "prompts": {"type": "array", "minItems": 1,
                "items": {"anyOf": [{"type": "string", "minLength": 1}, TOKEN_IDS]}},
    **{k: v for k, v in SEED_GENERATION_FIELDS.items() if k != "stream"}}}
BATCH_GENERATE_RESPONSE = {"type": "object", "properties": {
    "generations": {"type": "array", "items": {"type": "string"}},
    "results": {"type": "array", "items": GENERATE_RESPONSE}}}

HEALTH_RESPONSE = {"type": "object", "properties": {
    "status": {"type": "string", "enum": ["ok", "loading", "draining"]}, "version": {"type": "string"},
    "models_loaded": {"type": "integer"}}}
MODEL_INFO = {"type": "object", "properties": {
    "id": {"type": "string"}, "architecture": {"type": ["string", "null"]},
    "quantization": {"type": ["string", "null"]}, "parameters": {"type": ["integer", "null"]},
    "context_length": {"type": ["integer", "null"]}, "loaded": {"type": "boolean"},
    "size_bytes": {"type": ["integer", "null"]}, "path": {"type": ["string", "null"]},
    "loaded_at": {"type": ["number", "null"]}}}
MODELS_RESPONSE = {"type": "object", "properties": {"models": {"type": "array", "items": MODEL_INFO}}}
LOAD_MODEL = {"type": "object", "additionalProperties": False, "required": ["id", "path"], "properties": {
    "id": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:-]+$"},
    "path": {"type": "string", "minLength": 1, "description": "a .gguf path on the server or a pulled name"}}}
UNLOAD_RESPONSE = {"type": "object", "properties": {"id": {"type": "string"}, "deleted": {"type": "boolean"}}}

ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}

# -- OpenAI ----------------------------------------------------------------------------------------------
OPENAI_SAMPLING = {
    "max_tokens": _num(minimum=1, integer=True),
    "temperature": _num(minimum=0, maximum=2),
    "top_p": _num(exclusive_min=0, maximum=1),
    "n": _num(minimum=1, integer=True),
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "logprobs": {"type": ["boolean", "integer", "null"],
                 "description": "completions: alternatives per token (0-20); chat: a boolean (see top_logprobs)"},
    "logit_bias": {"type": ["object", "null"],
                   "description": "{\"token id\": bias in [-100, 100]} added to those tokens' logits"},
    "user": {"type": ["string", "null"]},
    **SAMPLING_FIELDS,
}

COMPLETION = {"type": "object", "required": ["prompt"], "properties": {
    "model": MODEL,
    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                         TOKEN_IDS, {"type": "array", "minItems": 1, "items": TOKEN_IDS}]},
    "echo": {"type": ["boolean", "null"]},
    "suffix": {"type": ["string", "null"]},
    "best_of": _num(minimum=1, integer=True),
    **OPENAI_SAMPLING}}

_TEXT_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
    "name": {"type": "string"}}}
CHAT_COMPLETION = {"type": "object", "required": ["messages"], "properties": {
    "model": MODEL,
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
    "max_completion_tokens": _num(minimum=1, integer=True),
    "response_format": {"type": ["object", "null"]},
    "tools": {"type": ["array", "null"]},
    "tool_choice": {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]},
    "top_logprobs": _num(minimum=0, maximum=20, integer=True),
    **OPENAI_SAMPLING}}

USAGE = {"type": "object", "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"}}}
COMPLETION_RESPONSE = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
    "created": {"type": "integer"}, "model": {"type": "string"},
    "choices": {"type": "array", "items": {"type": "object", "properties": {
        "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {"type": ["object", "null"]},
        "finish_reason": {"type": ["string", "null"]}}}},
    "usage": USAGE}}
CHAT_COMPLETION_RESPONSE = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
    "created": {"type": "integer"}, "model": {"type": "string"},
    "choices": {"type": "array", "items": {"type": "object", "properties": {
        "index": {"type": "integer"},
        "message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}},
        "logprobs": {"type": ["object", "null"]}, "finish_reason": {"type": ["string", "null"]}}}},
    "usage": USAGE}}
OPENAI_MODELS_RESPONSE = {"type": "object", "properties": {
    "object": {"type": "string", "enum": ["list"]},
    "data": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
        "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}}}


# -- parsing and validation ------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """The request body as JSON; 400 invalid_json on anything else (NaN and Infinity included)."""
    if not body:
        raise APIError(400, "request body is empty: expected a JSON object", code="invalid_json")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"malformed JSON in request body: {e}", code="invalid_json") from None


def parse_object(body: bytes, schema: dict) -> dict:
    value = parse_json(body)
    if not isinstance(value, dict):
        raise APIError(400, f"request body must be a JSON object, not {_type_name(value)}", code="invalid_json")
    validate(schema, value)
    return value


_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_ARTICLE = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
            "array": "an array", "object": "an object", "null": "null"}


def _type_name(v: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPE_CHECKS[name](v):
            return name
    return type(v).__name__


def _describe(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_describe(s) for s in schema["anyOf"])
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    parts = []
    for t in types:
        text = _ARTICLE.get(t, t)
        if t == "array" and "items" in schema and schema["items"].get("type") == "integer":
            text = "an array of integers"
        if t == "array" and schema.get("description") == "token ids":
            text = "an array of token ids"
        if t == "array" and "items" in schema and schema["items"].get("type") == "string":
            text = "an array of strings"
        parts.append(text)
    return " or ".join(parts) or "a valid value"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def validate(schema: dict, value: Any, path: str = "") -> None:
    """Raise a 400 APIError naming `path` if `value` does not satisfy `schema`."""
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                validate(option, value, path)
                return
            except APIError as e:
                errors.append(e)
        # the error of the option of the value's own type is the most helpful one
        typed = [e for e, o in zip(errors, schema["anyOf"], strict=True) if _type_matches(o, value)]
        if len(typed) == 1:
            raise typed[0]
        raise bad_request(f"'{path}' must be {_describe(schema)}", path)
    types = schema.get("type")
    if types is not None:
        types_list = [types] if isinstance(types, str) else types
        if not any(_TYPE_CHECKS[t](value) for t in types_list):
            raise bad_request(f"'{path}' must be {_describe(schema)}, not {_type_name(value)}", path)
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(repr(c) for c in schema["enum"])
        raise bad_request(f"'{path}' must be one of {choices} (got {value!r})", path)
    if _TYPE_CHECKS["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            raise bad_request(f"'{path}' must be >= {schema['minimum']} (got {value})", path)
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise bad_request(f"'{path}' must be > {schema['exclusiveMinimum']} (got {value})", path)
        if "maximum" in schema and value > schema["maximum"]:
            raise bad_request(f"'{path}' must be <= {schema['maximum']} (got {value})", path)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise bad_request(f"'{path}' must not be empty" if schema["minLength"] == 1 else
                              f"'{path}' must have at least {schema['minLength']} characters", path)
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise bad_request(f"'{path}' must have at most {schema['maxLength']} characters", path)
        if "pattern" in schema:
            import re

            if not re.fullmatch(schema["pattern"].strip("^$"), value):
                raise bad_request(f"'{path}' must match {schema['pattern']} (got {value!r})", path)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise bad_request(f"'{path}' must not be empty" if schema["minItems"] == 1 else
                              f"'{path}' must have at least {schema['minItems']} items", path)
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise bad_request(f"'{path}' must have at most {schema['maxItems']} items (got {len(value)})", path)
        items = schema.get("items")
        if items is not None:
            if items.get("type") == "integer" and "anyOf" not in items:
                _validate_int_list(items, value, path)
            else:
                for i, item in enumerate(value):
                    validate(items, item, _join(path, i))
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                raise bad_request(f"'{_join(path, name)}' is required", _join(path, name), code="missing_field")
        props = schema.get("properties", {})
        for name, item in value.items():
            sub = props.get(name)
            if sub is not None:
                validate(sub, item, _join(path, name))
            elif schema.get("additionalProperties") is False:
                raise bad_request(f"unknown field '{_join(path, name)}'", _join(path, name), code="unknown_field")


def _validate_int_list(items: dict, value: list, path: str) -> None:
    """Token-id lists can be long: check them in one pass without recursion."""
    lo = items.get("minimum")
    for i, v in enumerate(value):
        if type(v) is not int or (lo is not None and v < lo):
            validate(items, v, _join(path, i))


def _type_matches(schema: dict, value: Any) -> bool:
    types = schema.get("type")
    if types is None:
        return False
    types = [types] if isinstance(types, str) else types
    if not any(_TYPE_CHECKS[t](value) for t in types):
        return False
    if isinstance(value, list) and value and "items" in schema:
        return _type_matches(schema["items"], value[0]) if "type" in schema["items"] else True
    return True
