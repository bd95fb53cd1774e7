"""The HTTP server through Sanic's ASGI interface, with the real Engine over a tiny fake model.

The fake model spells the alphabet: token 1..26 are 'a'..'z', and the next token after t is t+1 (after 'z',
'a' again), so every output is predictable. The end-to-end tests with the real model and real clients are in
test_server_e2e.py and test_server_openai.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sanic import Sanic

from realizar.engine import Engine, EngineConfig
from realizar.registry import ModelRegistry
from realizar.server import ServerConfig, create_app
from realizar.server.routes import ROUTES

VOCAB = 40
EOS = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class FakeModel:
    vocab_size = VOCAB
    n_ctx = 64
    architecture = "fake"

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return ([27] if add_special else []) + [1 + LETTERS.index(c) for c in text.lower() if c in LETTERS]

    def detokenize(self, tokens) -> str:
        return "".join(LETTERS[t - 1] if 1 <= t <= 26 else "" for t in tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if any(m["content"] == "boom" for m in messages):
            raise ValueError("template refused")
        return " ".join(m["content"] for m in messages)


class FakeDetok:
    def add(self, t: int) -> str:
        return LETTERS[t - 1] if 1 <= t <= 26 else ""

    def flush(self) -> str:
        return ""


class FakeSampler:
    def sample(self, logits: np.ndarray, tokens: list[int]) -> int:
        return int(np.argmax(logits))


class FakeRunner:
    """The engine's model interface: the next token follows the last one through the alphabet."""

    def __init__(self, n_ctx: int = 64, delay: float = 0.0):
        self.n_vocab = VOCAB
        self.n_ctx = n_ctx
        self.eog_ids = frozenset({EOS})
        self.delay = delay
        self.gate: threading.Event | None = None
        self.max_batch = 0

    def kv_bytes_per_token(self) -> int:
        return 100

    def new_cache(self, n_blocks: int, block_size: int):
        return np.zeros((n_blocks, block_size), dtype=np.int64)

    def tokenize(self, text: str) -> list[int]:
        return FakeModel().tokenize(text)

    def detokenizer(self) -> FakeDetok:
        return FakeDetok()

    def sampler(self, config) -> FakeSampler:
        return FakeSampler()

    def forward(self, cache, tokens, seq_lens, pos0, block_tables, logit_rows):
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        self.max_batch = max(self.max_batch, len(seq_lens))
        out = np.full((len(logit_rows), VOCAB), -1e9, dtype=np.float32)
        for i, row in enumerate(logit_rows):
            last = int(tokens[row])
            out[i, 1 + last % 26 if last <= 26 else 1] = 0.0
        return out


class Harness:
    """An app with one fake model 'fake' (or more), and an httpx client over its ASGI interface."""

    def __init__(self, config: ServerConfig | None = None, runner: FakeRunner | None = None, models=("fake",)):
        self.config = config or ServerConfig()
        self.runners: dict[str, FakeRunner] = {}
        self.default_runner = runner
        self.app = create_app(self.config, model_loader=self.load, engine_factory=self.engine)
        self.state = self.app.ctx.state
        for name in models:
            self.state.add_loaded(name, FakeModel(), self.engine(FakeModel(), self.config, name, None),
                                  {"architecture": "fake", "quantization": "F32", "parameters": 123,
                                   "context_length": 64, "size_bytes": 456})

    def load(self, model_id: str, path: str, config: ServerConfig):
        if path == "missing.gguf":
            raise FileNotFoundError(f"{path}: no such file")
        return FakeModel(), {"architecture": "fake", "context_length": 64, "path": path}

    def engine(self, model, config: ServerConfig, model_id: str, context_length):
        runner = self.default_runner if self.default_runner and not self.runners else FakeRunner()
        self.runners[model_id] = runner
        return Engine(None, EngineConfig(max_num_seqs=config.max_num_seqs, max_queue=config.max_queue,
                                         kv_cache_bytes=100 * 16 * 64, max_model_len=context_length), _runner=runner)

    def run(self, scenario):
        """Run `await scenario(client)` on a fresh event loop, then close the engines."""

        async def main():
            Sanic.test_mode = True
            self.app.asgi = True
            await self.app._startup()
            transport = httpx.ASGITransport(app=self.app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                    return await scenario(client)
            finally:
                await self.state.close()

        return asyncio.run(main())

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def one(client):
            return await client.request(method, path, **kwargs)

        return self.run(one)


def err(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- shapes of the seed API -------------------------------------------------------------------------------
def test_health_models_and_seed_endpoints():
    h = Harness()

    async def scenario(c):
        r = await c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok", "version": h.config.version, "models_loaded": 1}
        models = (await c.get("/models")).json()["models"]
        assert [m["id"] for m in models] == ["fake"]
        assert {"id", "architecture", "quantization", "parameters", "context_length", "loaded",
                "size_bytes"} <= set(models[0])
        assert models[0]["loaded"] is True and models[0]["parameters"] == 123

        r = await c.post("/tokenize", json={"text": "abc"})
        assert r.json() == {"tokens": [27, 1, 2, 3], "num_tokens": 4}
        r = await c.post("/tokenize", json={"text": "abc", "add_special": False, "model": "fake"})
        assert r.json() == {"tokens": [1, 2, 3], "num_tokens": 3}
        assert (await c.post("/detokenize", json={"tokens": [8, 9]})).json() == {"text": "hi"}
        r = await c.post("/batch/tokenize", json={"texts": ["a", "bc"]})
        assert r.json() == {"tokens": [[27, 1], [27, 2, 3]]}

        r = await c.post("/generate", json={"prompt": "abc", "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json() == {"text": "defgh", "tokens": [4, 5, 6, 7, 8], "num_generated": 5,
                            "finish_reason": "length", "model": "fake"}
        r = await c.post("/generate", json={"prompt": "abc", "max_tokens": 10, "stop": ["g"]})
        assert r.json()["text"] == "def" and r.json()["finish_reason"] == "stop"
        r = await c.post("/generate", json={"prompt": [24], "max_tokens": 4, "strategy": "greedy"})
        assert r.json()["text"] == "yzab"

        r = await c.post("/batch/generate", json={"prompts": ["a", "x", "m"], "max_tokens": 3})
        body = r.json()
        assert body["generations"] == ["bcd", "yza", "nop"]
        assert [x["num_generated"] for x in body["results"]] == [3, 3, 3]

    h.run(scenario)


def test_batch_generate_runs_items_concurrently():
    runner = FakeRunner(delay=0.01)
    h = Harness(runner=runner)
    prompts = [LETTERS[i % 26] for i in range(12)]
    r = h.call("POST", "/batch/generate", json={"prompts": prompts, "max_tokens": 6})
    assert r.status_code == 200
    assert runner.max_batch >= 6, "batch items should share engine steps"


def test_generate_stream_sse():
    h = Harness()
    r = h.call("POST", "/generate", json={"prompt": "abc", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == "defg"
    assert chunks[-1]["finish_reason"] == "length"


# -- OpenAI shapes ----------------------------------------------------------------------------------------
def test_openai_models_and_completions():
    h = Harness()

    async def scenario(c):
        r = (await c.get("/v1/models")).json()
        assert r["object"] == "list" and r["data"][0]["id"] == "fake" and r["data"][0]["object"] == "model"
        assert (await c.get("/v1/models/fake")).json()["id"] == "fake"
        assert (await c.get("/v1/models/nope")).status_code == 404

        r = await c.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 3,
                                                   "temperature": 0})
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["choices"] == [{"index": 0, "text": "def", "logprobs": None, "finish_reason": "length"}]
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}

        r = await c.post("/v1/completions", json={"model": "fake", "prompt": ["a", "x"], "max_tokens": 2, "n": 2,
                                                   "echo": True, "temperature": 0})
        assert [ch["text"] for ch in r.json()["choices"]] == ["abc", "abc", "xyz", "xyz"]
        assert [ch["index"] for ch in r.json()["choices"]] == [0, 1, 2, 3]

        r = await c.post("/v1/chat/completions", json={"model": "fake", "max_tokens": 2, "temperature": 0,
                                                        "messages": [{"role": "user", "content": "abc"}]})
        body = r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "de"}
        assert body["choices"][0]["finish_reason"] == "length"

        r = await c.post("/v1/chat/completions", json={
            "model": "fake", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": [
                {"type": "text", "text": "a"}]}]})
        events = [e[len("data: "):] for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1]) == "bcd"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)

    h.run(scenario)


def test_openai_logprobs_shapes():
    """logprobs in OpenAI's shapes: completions' tokens / token_logprobs / top_logprobs (the alternatives and the
    chosen token) / text_offset, with echo the prompt's first; chat's content entries with bytes and top_logprobs;
    streamed, per chunk. The fake model puts all probability on the next letter: log-probability 0, the others at
    the -9999 floor."""
    h = Harness()

    def events(r):
        sse = [e[len("data: "):] for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert sse[-1] == "[DONE]"
        return [json.loads(e) for e in sse[:-1]]

    async def scenario(c):
        base = {"model": "fake", "prompt": "abc", "max_tokens": 3, "temperature": 0}
        r = await c.post("/v1/completions", json=dict(base, logprobs=1, n=2))
        for ch in r.json()["choices"]:
            assert ch["text"] == "def"
            assert ch["logprobs"] == {"tokens": ["d", "e", "f"], "token_logprobs": [0.0, 0.0, 0.0],
                                      "top_logprobs": [{"d": 0.0}, {"e": 0.0}, {"f": 0.0}], "text_offset": [0, 1, 2]}
        r = await c.post("/v1/completions", json=dict(base, logprobs=2))
        tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
        assert tops == [{"d": 0.0, "": -9999.0}, {"e": 0.0, "": -9999.0}, {"f": 0.0, "": -9999.0}]  # id 0 is ""
        r = await c.post("/v1/completions", json=dict(base, logprobs=0, stream=True))
        lps = [ch["choices"][0]["logprobs"] for ch in events(r)]
        assert sum((lp["tokens"] for lp in lps), []) == ["d", "e", "f"]
        assert sum((lp["text_offset"] for lp in lps), []) == [0, 1, 2]
        assert (await c.post("/v1/completions", json=base)).json()["choices"][0]["logprobs"] is None
        # echo: the prompt's tokens first ([27] is the fake's "" start token), the first without a log-probability
        want = {"tokens": ["", "a", "b", "c", "d", "e", "f"], "token_logprobs": [None] + [0.0] * 6,
                "top_logprobs": [None] + [{t: 0.0} for t in "abcdef"], "text_offset": [0, 0, 1, 2, 3, 4, 5]}
        r = await c.post("/v1/completions", json=dict(base, logprobs=1, echo=True))
        assert r.json()["choices"][0]["text"] == "abcdef" and r.json()["choices"][0]["logprobs"] == want
        r = await c.post("/v1/completions", json=dict(base, logprobs=1, echo=True, stream=True))
        lps = [ch["choices"][0]["logprobs"] for ch in events(r)]
        assert {k: sum((lp[k] for lp in lps), []) for k in want} == want

        chat = {"model": "fake", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "a"}]}
        r = await c.post("/v1/chat/completions", json=dict(chat, logprobs=True, top_logprobs=1))
        entry = {"token": "b", "logprob": 0.0, "bytes": [98]}
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert content[0] == dict(entry, top_logprobs=[entry])
        assert "".join(e["token"] for e in content) == "bcd" and all(e["logprob"] == 0.0 for e in content)
        r = await c.post("/v1/chat/completions", json=dict(chat, logprobs=True, stream=True))
        streamed = [e for ch in events(r) if ch["choices"][0]["logprobs"]
                    for e in ch["choices"][0]["logprobs"]["content"]]
        assert [e["token"] for e in streamed] == ["b", "c", "d"] and all(e["top_logprobs"] == [] for e in streamed)
        r = await c.post("/v1/chat/completions", json=dict(chat, logprobs=False))
        assert r.json()["choices"][0]["logprobs"] is None

    h.run(scenario)


# -- bad input: always 4xx with the error body, naming the field -------------------------------------------
BAD = [
    ("/generate", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/generate", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("/generate", {"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ("/generate", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/generate", {"prompt": "a", "max_tokens": 1000}, "max_tokens"),
    ("/generate", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/generate", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/generate", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("/generate", {"prompt": "a", "top_k": -1}, "top_k"),
    ("/generate", {"prompt": "a", "strategy": "beam"}, "strategy"),
    ("/generate", {"prompt": "a", "strategy": "top_k", "top_k": 0}, "top_k"),
    ("/generate", {"prompt": "a", "seed": 2**64}, "seed"),
    ("/generate", {"prompt": "a", "stop": [""]}, "stop[0]"),
    ("/generate", {"prompt": "a", "stop": 3}, "stop"),
    ("/generate", {"prompt": "a", "seed": "x"}, "seed"),
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"prompt": []}, "prompt"),
    ("/generate", {"prompt": [1, -2]}, "prompt[1]"),
    ("/generate", {"prompt": [1, 99]}, "prompt[1]"),
    ("/generate", {"prompt": "a" * 80}, "prompt"),
    ("/generate", {}, "prompt"),
    ("/generate", {"prompt": "a", "max_token": 3}, "max_token"),
    ("/generate", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/tokenize", {"text": 5}, "text"),
    ("/tokenize", {}, "text"),
    ("/detokenize", {"tokens": "ab"}, "tokens"),
    ("/detokenize", {"tokens": [1, 500]}, "tokens[1]"),
    ("/batch/tokenize", {"texts": []}, "texts"),
    ("/batch/tokenize", {"texts": ["a"] * 65}, "texts"),
    ("/batch/generate", {"prompts": ["a"] * 65}, "prompts"),
    ("/batch/generate", {"prompts": ["a", 3]}, "prompts[1]"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "a", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "a", "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "ignore_eos": "no"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"40": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"3": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"3": "1"}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logit_bias": {"-1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [[1], "a"]}, "prompt[1]"),
    ("/v1/completions", {"prompt": ["a"] * 40, "n": 2}, "n"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"content": "a"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "boom"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_p": -1}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "response_format": {"type": "json_object"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/models", {"id": "x"}, "path"),
]


def test_every_bad_field_is_a_400_naming_it():
    h = Harness(ServerConfig(admin_keys=["adm"]))

    async def scenario(c):
        failures = []
        for path, body, param in BAD:
            r = await c.post(path, json=body, headers={"Authorization": "Bearer adm"})
            if r.status_code != 400 or err(r)["param"] != param or err(r)["type"] != "invalid_request_error":
                failures.append((path, body, r.status_code, r.text[:300]))
        assert not failures, failures

    h.run(scenario)


def test_malformed_bodies_unknown_model_and_routes():
    h = Harness(models=("fake", "other"))

    async def scenario(c):
        for raw in (b"{", b"", b"[1, 2]", b'"text"', b'{"text": NaN}', b"\xff\xfe"):
            r = await c.post("/tokenize", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (raw, r.text)
            assert err(r)["code"] == "invalid_json"
        r = await c.post("/generate", json={"prompt": "a", "model": "nope"})
        assert r.status_code == 404 and err(r)["code"] == "model_not_found" and err(r)["param"] == "model"
        r = await c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 404
        r = await c.post("/tokenize", json={"text": "a"})  # two models: which one?
        assert r.status_code == 400 and err(r)["param"] == "model"
        r = await c.get("/no/such/route")
        assert r.status_code == 404 and err(r)["code"] == "route_not_found"
        r = await c.get("/generate")
        assert r.status_code == 405 and err(r)

    h.run(scenario)


def test_context_limits():
    h = Harness()

    async def scenario(c):
        r = await c.post("/generate", json={"prompt": "a" * 63})
        assert r.status_code == 400 and err(r)["code"] == "context_length_exceeded" and err(r)["param"] == "prompt"
        # without max_tokens the seed default is clamped to what fits
        r = await c.post("/generate", json={"prompt": "a" * 60})
        assert r.status_code == 200 and r.json()["num_generated"] == 64 - 61
        r = await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 61})
        assert r.status_code == 400 and err(r)["code"] == "context_length_exceeded"
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "abc"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60  # fills the context

    h.run(scenario)


def test_queue_full_is_429_with_retry_after():
    runner = FakeRunner()
    runner.gate = threading.Event()
    h = Harness(ServerConfig(max_num_seqs=1, max_queue=1), runner=runner)

    async def scenario(c):
        tasks = [asyncio.ensure_future(c.post("/generate", json={"prompt": "a", "max_tokens": 2})) for _ in range(5)]
        await asyncio.sleep(0.3)
        runner.gate.set()
        rs = await asyncio.gather(*tasks)
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 429 in codes, codes
        limited = next(r for r in rs if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and err(limited)["type"] == "rate_limit_error"

    h.run(scenario)


def test_request_timeout_is_504_and_frees_the_engine():
    runner = FakeRunner(delay=0.05)
    h = Harness(ServerConfig(request_timeout=0.3), runner=runner)

    async def scenario(c):
        r = await c.post("/generate", json={"prompt": "a", "max_tokens": 50})
        assert r.status_code == 504 and err(r)["code"] == "timeout"
        engine = h.state.registry.entry("fake").engine
        for _ in range(100):
            s = engine.stats()
            if s["num_running"] == 0 and s["kv_blocks_used"] == s["prefix_cache_blocks"]:
                break
            await asyncio.sleep(0.02)
        assert s["num_running"] == 0 and s["num_waiting"] == 0

    h.run(scenario)


def test_timeout_backstop_when_the_engine_ignores_deadlines():
    runner = FakeRunner(delay=0.05)
    h = Harness(ServerConfig(request_timeout=0.2), runner=runner)
    engine = h.state.registry.entry("fake").engine
    submit = engine.submit
    engine.submit = lambda prompt, config, timeout=None, collect=False: submit(prompt, config, collect=collect)  # no deadline
    t0 = time.monotonic()
    r = h.call("POST", "/generate", json={"prompt": "a", "max_tokens": 60})
    assert r.status_code == 504 and time.monotonic() - t0 < 2.5


def test_auth_keys_and_public_routes():
    h = Harness(ServerConfig(api_keys=["k1", "k2"], admin_keys=["adm"]))

    async def scenario(c):
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        r = await c.post("/tokenize", json={"text": "a"})
        assert r.status_code == 401 and err(r)["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await c.post("/tokenize", json={"text": "a"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and err(r)["code"] == "invalid_api_key"
        r = await c.post("/tokenize", json={"text": "a"}, headers={"Authorization": "Basic k1"})
        assert r.status_code == 401
        for key in ("k1", "k2", "adm"):
            r = await c.post("/tokenize", json={"text": "a"}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, key
        r = await c.post("/models", json={"id": "m2", "path": "x.gguf"}, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 401
        assert (await c.get("/v1/models")).status_code == 401

    h.run(scenario)


def test_admin_load_and_unload_models():
    h = Harness(ServerConfig(admin_keys=["adm"]))
    admin = {"Authorization": "Bearer adm"}

    async def scenario(c):
        r = await c.post("/models", json={"id": "m2", "path": "x.gguf"}, headers=admin)
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "m2" and r.json()["loaded"] is True
        assert {m["id"] for m in (await c.get("/models")).json()["models"]} == {"fake", "m2"}
        r = await c.post("/generate", json={"prompt": "a", "max_tokens": 2, "model": "m2"})
        assert r.json()["text"] == "bc"
        r = await c.post("/models", json={"id": "m2", "path": "x.gguf"}, headers=admin)
        assert r.status_code == 409
        r = await c.post("/models", json={"id": "m3", "path": "missing.gguf"}, headers=admin)
        assert r.status_code == 400 and err(r)["param"] == "path"
        r = await c.post("/models", json={"id": "bad/id", "path": "x.gguf"}, headers=admin)
        assert r.status_code == 400 and err(r)["param"] == "id"
        assert (await c.delete("/models/m2", headers=admin)).json() == {"id": "m2", "deleted": True}
        assert (await c.delete("/models/m2", headers=admin)).status_code == 404
        r = await c.post("/generate", json={"prompt": "a", "max_tokens": 2, "model": "m2"})
        assert r.status_code == 404

    h.run(scenario)


def test_admin_routes_disabled_without_admin_key():
    h = Harness()
    r = h.call("POST", "/models", json={"id": "m2", "path": "x.gguf"})
    assert r.status_code == 403 and err(r)["code"] == "admin_disabled"


def test_health_loading_and_draining():
    gate = threading.Event()
    h = Harness(models=())
    real_load = h.load

    def slow_load(*args):
        gate.wait(10)
        return real_load(*args)

    h.state.model_loader = slow_load

    async def scenario(c):
        task = asyncio.ensure_future(h.state.load_model("m", "x.gguf"))
        await asyncio.sleep(0.05)
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert (await c.get("/models")).json()["models"][0]["loaded"] is False
        r = await c.post("/tokenize", json={"text": "a"})
        assert r.status_code == 503 and err(r)["code"] == "loading"
        gate.set()
        await task
        assert (await c.get("/health")).json()["status"] == "ok"
        h.state.draining = True
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        r = await c.post("/tokenize", json={"text": "a"})
        assert r.status_code == 503 and err(r)["code"] == "draining"

    h.run(scenario)


def test_cors_off_by_default_and_allowed_origins():
    h = Harness()
    r = h.call("GET", "/health", headers={"Origin": "http://x.example"})
    assert "access-control-allow-origin" not in r.headers
    h = Harness(ServerConfig(cors_origins=["http://ok.example"]))

    async def scenario(c):
        r = await c.get("/health", headers={"Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = await c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await c.options("/v1/chat/completions", headers={"Origin": "http://ok.example",
                                                             "Access-Control-Request-Method": "POST"})
        assert r.status_code == 204 and "POST" in r.headers["access-control-allow-methods"]

    h.run(scenario)


# -- metrics ----------------------------------------------------------------------------------------------
def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move():
    h = Harness()

    async def scenario(c):
        before = _samples((await c.get("/metrics")).text)
        await c.post("/generate", json={"prompt": "abc", "max_tokens": 4})
        await c.post("/generate", json={"prompt": "abc", "max_tokens": 0})
        await c.get("/models/zzz-raw-path-never-a-label")
        return before, _samples((await c.get("/metrics")).text)

    before, after = h.run(scenario)
    key = ("http_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "200")))
    assert after[key] == before.get(key, 0) + 1
    assert after[("http_requests_total", (("endpoint", "/generate"), ("method", "POST"), ("status", "400")))] == 1
    assert after[("realizar_generation_tokens_total", (("model", "fake"),))] == 4
    assert after[("realizar_prompt_tokens_total", (("model", "fake"),))] == 4
    assert after[("realizar_request_success_total", (("finished_reason", "length"), ("model", "fake")))] == 1
    assert after[("realizar_e2e_request_latency_seconds_count", (("model", "fake"),))] == 1
    assert after[("realizar_time_to_first_token_seconds_count", (("model", "fake"),))] == 1
    assert after[("realizar_inter_token_latency_seconds_count", (("model", "fake"),))] == 3
    assert after[("realizar_batch_size_count", (("model", "fake"),))] >= 4
    assert after[("realizar_num_requests_running", (("model", "fake"),))] == 0
    assert ("realizar_kv_cache_usage_ratio", (("model", "fake"),)) in after
    labels = {v for (_, ls) in after for (_, v) in ls}
    assert not any("zzz" in v or "abc" in v for v in labels), "raw paths or prompt text in labels"


# -- OpenAPI ----------------------------------------------------------------------------------------------
def test_openapi_describes_every_route():
    h = Harness()

    async def scenario(c):
        return (await c.get("/openapi.json")).json(), (await c.get("/docs"))

    spec, docs = h.run(scenario)
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = set()
    for route in h.app.router.routes:
        path = "/" + route.path.strip("/")
        for part in route.params.values():
            path = path.replace(f"<{part.name}>", f"{{{part.name}}}").replace(f"<{part.name}:{part.label}>",
                                                                             f"{{{part.name}}}")
        for method in route.methods:
            if method not in ("HEAD", "OPTIONS"):
                served.add((method, path))
    assert documented == served
    assert {(r.method, r.path) for r in ROUTES} == served
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if op["operationId"].startswith("post_") and path not in ("/models",):
                assert "requestBody" in op, path
    assert spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["messages"]["type"] == "array"
    assert docs.status_code == 200 and "/v1/chat/completions" in docs.text


def test_registry_is_the_public_one():
    import realizar

    assert realizar.ModelRegistry is ModelRegistry


def test_sanic_response_timeout_never_cuts_a_generation():
    h = Harness(ServerConfig(request_timeout=900))
    assert h.app.config.RESPONSE_TIMEOUT > 900
    assert h.app.config.REQUEST_MAX_SIZE == h.config.max_body


# -- a real server process over the fake model (used by test_server_process.py) ---------------------------
def serve_fake(port: int, delay: float, ping: float, max_body: int, drain: float) -> int:
    from realizar.server import run_server

    def load(model_id, path, config):
        model = FakeModel()
        model.n_ctx = 4096
        return model, {"architecture": "fake", "context_length": 4096, "path": path}

    def engine(model, config, model_id, context_length):
        return Engine(None, EngineConfig(max_num_seqs=config.max_num_seqs, max_queue=config.max_queue,
                                         kv_cache_bytes=100 * 16 * 1024, max_model_len=context_length),
                      _runner=FakeRunner(n_ctx=4096, delay=delay))

    config = ServerConfig(models=[("fake", "fake.gguf")], host="127.0.0.1", port=port, sse_ping_interval=ping,
                          max_body=max_body, drain_timeout=drain)
    return run_server(config, model_loader=load, engine_factory=engine)


if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(description="serve the fake model (for the process tests)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--ping", type=float, default=15.0)
    p.add_argument("--max-body", type=int, default=64 * 1024)
    p.add_argument("--drain", type=float, default=10.0)
    a = p.parse_args()
    sys.exit(serve_fake(a.port, a.delay, a.ping, a.max_body, a.drain))


def test_serve_flags_and_their_environment_twins(monkeypatch):
    from realizar.cli import build_parser
    from realizar.cli_serve import server_config

    for k in [k for k in os.environ if k.startswith("REALIZAR_")]:
        monkeypatch.delenv(k)
    parser = build_parser()
    assert server_config(parser.parse_args(["serve"])).port == 8080
    assert server_config(parser.parse_args(["serve"])).pack
    assert not server_config(parser.parse_args(["serve", "--no-pack"])).pack
    assert server_config(parser.parse_args(["serve"])).kv_cache_dtype == "f16"
    assert server_config(parser.parse_args(["serve", "--kv-cache-dtype", "q8_0"])).kv_cache_dtype == "q8_0"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-cache-dtype", "q4"])
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of f16, q8_0"):
        ServerConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="CPU only"):
        ServerConfig(kv_cache_dtype="q8_0", device="cuda")
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert "REALIZAR_" in (action.help or ""), f"{action.option_strings} has no REALIZAR_* twin"

    for k, v in {"REALIZAR_PORT": "9000", "REALIZAR_API_KEY": "k1,k2", "REALIZAR_MAX_BODY": "1M",
                 "REALIZAR_MODEL": "x=/p/x.gguf,y=/p/y.gguf", "REALIZAR_DEMO": "1", "REALIZAR_HOST": "0.0.0.0",
                 "REALIZAR_CORS_ORIGINS": "http://a.example", "REALIZAR_MAX_QUEUE": "7",
                 "REALIZAR_REQUEST_TIMEOUT": "12.5", "REALIZAR_ADMIN_KEY": "adm", "REALIZAR_NO_PACK": "1",
                 "REALIZAR_KV_CACHE_DTYPE": "q8_0"}.items():
        monkeypatch.setenv(k, v)
    parser = build_parser()  # flag defaults come from the environment when the parser is built
    c = server_config(parser.parse_args(["serve"]))
    assert c.port == 9000 and c.host == "0.0.0.0" and c.api_keys == ["k1", "k2"] and c.max_body == 1 << 20
    assert c.models == [("smollm2-135m", "smollm2-135m"), ("x", "/p/x.gguf"), ("y", "/p/y.gguf")]
    assert c.cors_origins == ["http://a.example"] and c.max_queue == 7 and c.request_timeout == 12.5
    assert c.admin_keys == ["adm"] and not c.pack and c.kv_cache_dtype == "q8_0"

    c = server_config(parser.parse_args(["serve", "--port", "81", "--api-key", "z", "--model", "m.gguf",
                                         "--max-body", "512k"]))
    assert c.port == 81 and c.api_keys == ["z"] and c.models[1] == ("m", "m.gguf") and c.max_body == 512 * 1024
    monkeypatch.delenv("REALIZAR_DEMO")
    monkeypatch.delenv("REALIZAR_MODEL")
    c = server_config(build_parser().parse_args(["serve"]))
    assert c.models == [] and c.port == 9000


def test_engine_factory_uses_the_kv_cache_dtype(model_path):
    from realizar.model import Model
    from realizar.server.runtime import default_engine_factory

    m = Model.load(model_path, threads=1)
    engine = default_engine_factory(m, ServerConfig(kv_cache_dtype="q8_0"), "m", 64)
    try:
        assert engine.stats()["kv_cache_dtype"] == "q8_0"
        assert len(engine.generate("The capital of France is", max_tokens=3, ignore_eos=True).tokens) == 3
    finally:
        engine.close()
        m.close()
