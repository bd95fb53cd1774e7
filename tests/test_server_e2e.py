"""End to end: `realizar serve` as a real process on a free loopback port with the real SmolLM2 model, driven by
the official `openai` package and by raw HTTP (the seed API and bad input)."""
from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from test_server_process import ServerProcess

API_KEY = "sk-test-key"
ADMIN_KEY = "admin-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CTX = 512


@pytest.fixture(scope="module")
def server(model_path):
    pytest.importorskip("realizar.model")
    s = ServerProcess([sys.executable, "-m", "realizar.cli", "serve", "--model", f"smollm2={model_path}",
                       "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--ctx-size", str(CTX),
                       "--max-num-seqs", "16", "--max-body", "256k", "--threads", "2"], ready_timeout=180)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path, body, headers=AUTH):
    return server.json("POST", path, body, headers=headers)


# -- the OpenAI API through the official client ---------------------------------------------------------
def test_openai_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert client.models.retrieve("smollm2").owned_by == "realizar"


def test_openai_completion_matches_seed_generate(client, server):
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.completion_tokens == 8 or c.choices[0].finish_reason == "stop"
    status, g = post(server, "/generate", {"prompt": "The capital of France is", "max_tokens": 8})
    assert status == 200 and g["text"] == c.choices[0].text and g["model"] == "smollm2"
    assert "Paris" in g["text"]


def test_openai_chat_and_stream_agree(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_openai_stream_completion_and_sampling_fields(client):
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, stream=True,
                                       temperature=0.8, top_p=0.9, seed=7,
                                       extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    text = "".join(ch.choices[0].text for ch in stream)
    again = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=0.8,
                                      top_p=0.9, seed=7,
                                      extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert again.choices[0].text == text, "a seed makes sampling reproducible, streamed or not"
    many = client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, n=3, temperature=1.0, seed=1,
                                     extra_body={"ignore_eos": True})
    assert len(many.choices) == 3 and many.usage.completion_tokens == 9


def test_openai_logprobs(client):
    """logprobs through the official client: greedy tokens are their position's most likely, the token strings
    (chat: their bytes) make up the text, and the offsets follow the tokens."""
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.tokens) == c.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert -30 < value <= 0 and top[token] == value == max(top.values()) and len(top) == 3
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert bytes(b for e in content for b in e.bytes).decode() == chat.choices[0].message.content
    for e in content:
        assert [t.logprob for t in e.top_logprobs][0] == e.logprob >= e.top_logprobs[1].logprob
    plain = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi!"}],
                                           max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content
    # echo (lm-eval-harness's loglikelihood requests): the prompt's tokens first, the first without a value
    e = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=1, temperature=0,
                                  logprobs=1, echo=True)
    lp = e.choices[0].logprobs
    assert "".join(lp.tokens) == e.choices[0].text and e.choices[0].text.startswith("The capital of France is")
    assert len(lp.tokens) == 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(-30 < v <= 0 for v in lp.token_logprobs[1:])
    # the generated token's, as the first request gave it (here from a step with every prompt row's logits)
    assert lp.token_logprobs[-1] == pytest.approx(c.choices[0].logprobs.token_logprobs[0], abs=2e-3)


def test_openai_logit_bias(client, server):
    """logit_bias through the official client: -100 bans the greedy first token, 100 forces a token."""
    prompt = "The capital of France is"
    status, g = post(server, "/generate", {"prompt": prompt, "max_tokens": 4})
    assert status == 200
    banned = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={str(g["tokens"][0]): -100})
    assert banned.choices[0].text != g["text"]
    status, d = post(server, "/detokenize", {"tokens": [42, 42, 42]})
    forced = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0.7, seed=1, logit_bias={"42": 100})
    assert status == 200 and forced.choices[0].message.content == d["text"]


def test_openai_error_types(client, server):
    openai = pytest.importorskip("openai")
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=2, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=CTX + 1)
    assert e.value.param == "max_tokens" and e.value.code == "context_length_exceeded"


# -- the seed API over raw HTTP ---------------------------------------------------------------------------
def test_seed_api(server, model_path):
    status, h = server.json("GET", "/health")
    assert status == 200 and h["status"] == "ok" and h["models_loaded"] == 1
    status, m = server.json("GET", "/models", headers=AUTH)
    info = m["models"][0]
    assert info["id"] == "smollm2" and info["architecture"] == "llama" and info["quantization"] == "Q4_1"
    assert info["parameters"] == 134515008 and info["loaded"] is True
    assert info["size_bytes"] == model_path.stat().st_size and info["context_length"] == 8192

    status, t = post(server, "/tokenize", {"text": "Hello world, how are you?"})
    assert status == 200 and t["num_tokens"] == len(t["tokens"]) > 3
    status, d = post(server, "/detokenize", {"tokens": t["tokens"]})
    assert d["text"] == "Hello world, how are you?"
    status, b = post(server, "/batch/tokenize", {"texts": ["Hello world, how are you?", "Paris"]})
    assert b["tokens"][0] == t["tokens"] and len(b["tokens"]) == 2


def test_batch_generate_equals_one_at_a_time(server):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]
    status, batch = post(server, "/batch/generate", {"prompts": prompts, "max_tokens": 6})
    assert status == 200 and len(batch["results"]) == 3
    for prompt, result, text in zip(prompts, batch["results"], batch["generations"], strict=True):
        status, alone = post(server, "/generate", {"prompt": prompt, "max_tokens": 6})
        assert alone["tokens"] == result["tokens"] and alone["text"] == text == result["text"]


def test_generate_stream_sse(server):
    status, headers, data = server.request("POST", "/generate", json.dumps(
        {"prompt": "The capital of France is", "max_tokens": 6, "stream": True}).encode(), headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e[6:] for e in data.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    _, whole = post(server, "/generate", {"prompt": "The capital of France is", "max_tokens": 6})
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum(len(c["tokens"]) for c in chunks) == whole["num_generated"]


BAD_RAW = [
    ("/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/generate", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/generate", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/generate", {"prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("/generate", {"prompt": "hi", "strategy": "nucleus"}, 400, "strategy"),
    ("/generate", {"prompt": "word " * 2000}, 400, "prompt"),
    ("/generate", {"prompt": [1, 10**6]}, 400, "prompt[1]"),
    ("/generate", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("/batch/generate", {"prompts": ["hi"] * 65}, 400, "prompts"),
    ("/v1/completions", {"prompt": "hi", "n": 100}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400, "top_p"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens[0]"),
]


def test_bad_input_over_raw_http(server):
    for path, body, code, param in BAD_RAW:
        status, r = post(server, path, body)
        assert status == code and r["error"]["param"] == param, (path, body, status, r)
        assert set(r["error"]) == {"message", "type", "param", "code"}
    for raw in (b"{not json", b"[]", b"null"):
        status, r = server.json("POST", "/generate", raw, headers=AUTH)
        assert status == 400 and r["error"]["code"] == "invalid_json"
    status, r = server.json("POST", "/generate", json.dumps({"prompt": "x" * 300_000}).encode(), headers=AUTH)
    assert status == 413 and r["error"]["code"] == "body_too_large"
    status, r = server.json("POST", "/generate", {"prompt": "hi"})  # no key
    assert status == 401 and r["error"]["type"] == "authentication_error"
    assert server.request("GET", "/metrics")[0] == 200 and server.json("GET", "/health")[0] == 200


@pytest.mark.slow
def test_admin_load_generate_unload(server, model_path):
    status, r = post(server, "/models", {"id": "second", "path": str(model_path)}, headers=ADMIN)
    assert status == 201 and r["id"] == "second" and r["loaded"]
    status, g = post(server, "/generate", {"prompt": "The capital of France is", "max_tokens": 4,
                                           "model": "second"})
    _, g1 = post(server, "/generate", {"prompt": "The capital of France is", "max_tokens": 4, "model": "smollm2"})
    assert status == 200 and g["tokens"] == g1["tokens"]
    status, r = server.json("DELETE", "/models/second", headers=ADMIN)
    assert status == 200 and r == {"id": "second", "deleted": True}
    status, r = post(server, "/models", {"id": "third", "path": "/nonexistent.gguf"}, headers=ADMIN)
    assert status == 400 and r["error"]["param"] == "path"


def test_disconnect_frees_the_real_engine(server):
    data = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 400, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode()
                 + b"\r\n\r\n" + data)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    end = time.monotonic() + 20
    while True:
        m = server.metrics()
        running = m[("realizar_num_requests_running", (("model", "smollm2"),))]
        kv = m[("realizar_kv_cache_usage_ratio", (("model", "smollm2"),))]
        if running == 0 and kv == 0:
            break
        assert time.monotonic() < end, (running, kv)
        time.sleep(0.05)


def test_metrics_after_real_traffic(server):
    post(server, "/generate", {"prompt": "Hello", "max_tokens": 3})
    m = server.metrics()
    assert m[("realizar_generation_tokens_total", (("model", "smollm2"),))] >= 3
    assert m[("realizar_time_to_first_token_seconds_count", (("model", "smollm2"),))] >= 1
    assert m[("http_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "200")))] >= 1
    assert m[("realizar_batch_size_count", (("model", "smollm2"),))] >= 1


@pytest.mark.slow
def test_serve_demo_uses_the_pulled_model(model_path, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / model_path.name).symlink_to(model_path)  # already pulled: checked, not downloaded
    s = ServerProcess([sys.executable, "-m", "realizar.cli", "serve", "--demo", "--threads", "2", "--ctx-size", "256"],
                      env={"REALIZAR_HOME": str(tmp_path)}, ready_timeout=180)
    try:
        status, body = s.json("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == ["smollm2-135m"]
        status, body = s.json("POST", "/generate", {"prompt": "The capital of France is", "max_tokens": 2})
        assert status == 200 and body["model"] == "smollm2-135m"
    finally:
        assert s.stop() == 0
