"""Chat prompts: a model's `tokenizer.chat_template` (Jinja2, as Hugging Face templates are written) rendered in
a sandbox, with ChatML when the model has none.

Templates come from model files, which are untrusted: they run in jinja2's ImmutableSandboxedEnvironment, which
refuses private and internal attributes (`''.__class__`) and methods that mutate lists or dicts. Every template
problem (syntax, undefined name, sandbox refusal, `raise_exception`) surfaces as a ValueError naming it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["CHATML_TEMPLATE", "ChatTemplateError", "render_chat", "validate_messages"]

# ChatML, the format of the Qwen/SmolLM family, for models without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template cannot be compiled or rendered, or the messages are malformed."""


class _TemplateRaised(Exception):
    """What `raise_exception(...)` in a template throws, so its message is kept verbatim."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False,
            separators: Any = None) -> str:
    # Hugging Face's tojson: plain json.dumps, not HTML-escaped like jinja2's built-in filter.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


class _Undefined(jinja2.Undefined):
    """Lenient like Hugging Face's (`{% if tools %}` with no tools is false), except for a value the sandbox
    refused (`''.__class__`): using it in any way raises the SecurityError instead of rendering as ''."""

    __slots__ = ()

    def _check_refused(self) -> None:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()

    def __str__(self) -> str:
        self._check_refused()
        return super().__str__()

    def __iter__(self):
        self._check_refused()
        return super().__iter__()

    def __bool__(self) -> bool:
        self._check_refused()
        return super().__bool__()

    def __len__(self) -> int:
        self._check_refused()
        return super().__len__()


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # as Hugging Face renders them: lenient undefined (`{% if tools %}` with no tools), {% break %}/{% continue %}
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                        undefined=_Undefined)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` checked as a list of {'role': str, 'content': str, ...} dicts; returns plain dict copies."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, not {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, not {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ChatTemplateError(f"messages[{i}] has no '{field}'")
            if not isinstance(message[field], str):
                raise ChatTemplateError(
                    f"messages[{i}]['{field}'] must be a string, not {type(message[field]).__name__}")
        out.append(dict(message))
    return out


def render_chat(template: str | None, messages: Any, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra: Any) -> str:
    """The prompt `template` makes of `messages` (ChatML when `template` is None or empty).

    `extra` goes to the template as more variables (tools, documents, custom flags...).
    """
    checked = validate_messages(messages)
    compiled = _compile(template or CHATML_TEMPLATE)
    variables = dict(extra)
    variables.update(messages=checked, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                     eos_token=eos_token)
    try:
        return compiled.render(**variables)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template refused the messages: {e}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from None
    except jinja2.UndefinedError as e:
        raise ChatTemplateError(f"chat template uses an undefined value: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
