"""Chat templates: the model's own template against llama.cpp's recorded renders, ChatML, the sandbox, errors."""
from __future__ import annotations

import re

import pytest

from realizar.chat import CHATML_TEMPLATE, ChatTemplateError, render_chat, validate_messages

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model_template(model_path) -> str:
    """tokenizer.chat_template of the test model, read with realizar.gguf (or the gguf package)."""
    try:
        from realizar.gguf import GGUFFile

        return GGUFFile(str(model_path)).metadata["tokenizer.chat_template"]
    except ImportError:
        import gguf

        field = gguf.GGUFReader(str(model_path)).fields["tokenizer.chat_template"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_model_template_matches_llamacpp_renders(model_template, reference):
    renders = reference["variants"]["Q4_1"]["chat_renders"]
    assert renders
    for case in renders:
        assert render_chat(model_template, case["messages"], add_generation_prompt=True) == case["rendered"]


def test_known_template_renders_system_default_and_turns():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]
    out = render_chat(SMOLLM_TEMPLATE, messages)
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                   "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(SMOLLM_TEMPLATE, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize("template", [None, ""])
def test_chatml_fallback(template):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat(template, messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(template, messages, add_generation_prompt=False).endswith("U<|im_end|>\n")
    assert render_chat(CHATML_TEMPLATE, messages) == render_chat(template, messages)


def test_trim_and_lstrip_blocks_are_on():
    template = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_hf_helpers_and_variables():
    template = ("{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') }}|{{ eos_token }}|{{ custom }}"
                "{% if tools %}T{% endif %}{% for m in messages %}{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}")
    out = render_chat(template, [{"role": "user", "content": "é<\"x\">"}], bos_token="<s>", eos_token="</s>",
                      custom="C")
    head, year, eos, rest = out.split("|")
    assert head == '<s>[{"role": "user", "content": "é<\\"x\\">"}]'  # json, not HTML-escaped
    assert re.fullmatch(r"\d{4}", year)
    assert eos == "</s>" and rest == "C"


def test_raise_exception_becomes_value_error():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    assert render_chat(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="Conversation must start with user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("exploit", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% if ''.__class__ %}x{% endif %}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append({'role': 'x', 'content': 'y'}) }}",
    "{{ (messages | first).update({'role': 'x'}) }}",
    "{{ [].__class__.__base__ }}",
])
def test_sandbox_blocks_attribute_exploits(exploit):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render_chat(exploit, [{"role": "user", "content": "x"}])


def test_template_errors_name_the_problem():
    with pytest.raises(ValueError, match="syntax error at line 1"):
        render_chat("{% for %}", [])
    with pytest.raises(ValueError, match="undefined"):
        render_chat("{{ nothing.here }}", [])
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", [])


@pytest.mark.parametrize(("messages", "problem"), [
    ("hello", "must be a list"),
    ({"role": "user", "content": "x"}, "must be a list"),
    ([{"role": "user", "content": "x"}, "oops"], r"messages\[1\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": "a"}, {"role": 7, "content": "b"}], r"messages\[1\]\['role'\] must be a string"),
])
def test_message_validation(messages, problem):
    with pytest.raises(ValueError, match=problem):
        render_chat(None, messages)


def test_validate_messages_copies_and_keeps_extra_fields():
    original = [{"role": "user", "content": "x", "name": "bob"}]
    checked = validate_messages(original)
    assert checked == original and checked[0] is not original[0]
    assert validate_messages([]) == []
