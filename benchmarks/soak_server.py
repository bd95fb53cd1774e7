"""Soak a real `realizar serve` process with a random mix of good, malformed and abandoned requests.

    .venv/bin/python benchmarks/soak_server.py [--seconds 90] [--seed 1] [--clients 24] [--model PATH]

Clients post completions, chats (some with logprobs), /generate, tokenize and batch requests, streamed and not, with random
fields (valid, out of range or of the wrong type), malformed JSON, over-long prompts, streams dropped after a
few chunks and requests abandoned by a client timeout. It reports the status counts per kind and exits 1 on
any problem: a 5xx other than 503/504, a client-side exception other than a dropped connection, a request
that hangs, or an engine that is not idle afterwards (running or waiting requests, KV blocks in use).
"""
import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

import httpx

# Set by run(): the run's random source, the server's URL, and what the clients saw.
rng = random.Random(1)
URL = ""
stats: dict = {}
problems: list = []


def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]

def note(kind, status, detail=""):
    key = f"{kind}:{status}"
    stats[key] = stats.get(key, 0) + 1
    if isinstance(status, int) and status >= 500 and status not in (503, 504):
        problems.append((kind, status, detail[:300]))

WORDS = ["hello", "Paris", "é", "🙂", "\u0000", "<|im_start|>", "\\n", "tab\t", "漢字", "x" * 50]
def text(n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(0, 12)))

def garbage_value():
    return rng.choice([None, -1, 0, 1.5, "x", [], {}, [1, "a"], True, 10**12, float("nan") if False else 1e308, "🙂"])

def mutate(body):
    b = dict(body)
    k = rng.choice(list(b) + ["bogus"])
    b[k] = garbage_value()
    return b

async def one(client):
    kind = rng.choice(["comp", "comp_stream_abort", "chat", "chat_stream", "chat_stream_abort", "gen", "gen_stream_abort",
                       "tok", "detok", "batch_gen", "batch_tok", "bad_json", "mutated", "timeout_abort", "long_prompt",
                       "stop", "n", "logprobs"])
    try:
        if kind == "comp":
            r = await client.post("/v1/completions", json={"prompt": text(), "max_tokens": rng.randint(1, 40),
                                                           "temperature": rng.choice([0, 0.7, 1.5]), "seed": rng.randint(0, 9)})
            note(kind, r.status_code, r.text)
        elif kind == "logprobs":  # valid, out of range or mistyped; chat or completions; streamed or not
            value = rng.choice([0, 1, 5, 20, 21, -1, True, "3"])
            stream = rng.random() < 0.5
            if rng.random() < 0.5:
                body = {"prompt": text(), "max_tokens": rng.randint(1, 20), "logprobs": value, "stream": stream,
                        "echo": rng.random() < 0.5}
                path = "/v1/completions"
            else:
                body = {"messages": [{"role": "user", "content": text()}], "max_tokens": rng.randint(1, 20),
                        "logprobs": rng.choice([True, False, value]), "top_logprobs": value, "stream": stream}
                path = "/v1/chat/completions"
            if rng.random() < 0.3:  # a logit bias, valid or not
                body["logit_bias"] = {str(rng.randint(-5, 60000)): rng.choice([-100, 5, 100, 101, "x"])}
            r = await client.post(path, json=body)
            note(kind, r.status_code, r.text)
        elif kind == "n":
            r = await client.post("/v1/completions", json={"prompt": [text(), text()], "max_tokens": rng.randint(1, 10),
                                                           "n": rng.randint(1, 3), "temperature": 0.8})
            note(kind, r.status_code, r.text)
        elif kind == "stop":
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text()}],
                                  "max_tokens": rng.randint(1, 30), "stop": [rng.choice(["a", "e", " ", "\n", "The"])]})
            note(kind, r.status_code, r.text)
        elif kind in ("chat", "chat_stream", "chat_stream_abort"):
            body = {"messages": [{"role": rng.choice(["user", "system", "assistant"]), "content": text()}
                                 for _ in range(rng.randint(1, 3))],
                    "max_tokens": rng.randint(1, 40), "stream": kind != "chat",
                    "stream_options": {"include_usage": True} if kind != "chat" else None}
            body = {k: v for k, v in body.items() if v is not None}
            if kind == "chat":
                r = await client.post("/v1/chat/completions", json=body)
                note(kind, r.status_code, r.text)
            else:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    n = rng.randint(0, 5) if kind.endswith("abort") else 10**9
                    got = 0
                    async for _line in r.aiter_lines():
                        got += 1
                        if got > n:
                            break
                    note(kind, r.status_code)
        elif kind in ("comp_stream_abort", "gen_stream_abort"):
            path = "/v1/completions" if kind.startswith("comp") else "/generate"
            async with client.stream("POST", path, json={"prompt": text(), "max_tokens": rng.randint(5, 60), "stream": True}) as r:
                n, got = rng.randint(0, 4), 0
                async for _line in r.aiter_lines():
                    got += 1
                    if got > n:
                        break
                note(kind, r.status_code)
        elif kind == "gen":
            r = await client.post("/generate", json={"prompt": text(), "max_tokens": rng.randint(1, 30),
                                                     "temperature": rng.choice([0, 1.0]), "top_k": rng.randint(0, 50),
                                                     "top_p": rng.choice([0.5, 1.0])})
            note(kind, r.status_code, r.text)
        elif kind == "tok":
            r = await client.post("/tokenize", json={"text": text()})
            note(kind, r.status_code, r.text)
        elif kind == "detok":
            r = await client.post("/detokenize", json={"tokens": [rng.randint(-5, 50000) for _ in range(rng.randint(0, 8))]})
            note(kind, r.status_code, r.text)
        elif kind == "batch_gen":
            r = await client.post("/batch/generate", json={"prompts": [text() for _ in range(rng.randint(0, 6))],
                                                           "max_tokens": rng.randint(1, 12)})
            note(kind, r.status_code, r.text)
        elif kind == "batch_tok":
            r = await client.post("/batch/tokenize", json={"texts": [text() for _ in range(rng.randint(0, 6))]})
            note(kind, r.status_code, r.text)
        elif kind == "bad_json":
            path = rng.choice(["/v1/completions", "/v1/chat/completions", "/generate", "/tokenize", "/batch/generate"])
            raw = rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b'{"prompt": "a", "max_tokens": }', b"1e999", b'{"prompt":"' + b"a" * 5000 + b'"'])
            r = await client.post(path, content=raw, headers={"content-type": "application/json"})
            note(kind, r.status_code, r.text)
        elif kind == "mutated":
            path, body = rng.choice([("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
                                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
                                     ("/generate", {"prompt": "hi", "max_tokens": 4}),
                                     ("/tokenize", {"text": "hi"}), ("/detokenize", {"tokens": [1, 2]}),
                                     ("/batch/generate", {"prompts": ["a", "b"], "max_tokens": 3})])
            b = mutate(body)
            r = await client.post(path, json=b)
            note(kind, r.status_code, r.text + " " + json.dumps(b, default=str)[:200])
        elif kind == "timeout_abort":
            try:
                await client.post("/v1/completions", json={"prompt": text(), "max_tokens": 60},
                                  timeout=rng.uniform(0.05, 1.0))
                note(kind, "done")
            except httpx.TimeoutException:
                note(kind, "client-timeout")
        elif kind == "long_prompt":
            r = await client.post("/v1/completions", json={"prompt": "word " * rng.choice([100, 600, 2000]), "max_tokens": rng.randint(1, 600)})
            note(kind, r.status_code, r.text)
    except httpx.TimeoutException:
        note(kind, "TIMEOUT")
        problems.append((kind, "timeout", ""))
    except Exception as e:
        note(kind, type(e).__name__)
        if not isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
            problems.append((kind, type(e).__name__, str(e)[:200]))

async def worker(end):
    async with httpx.AsyncClient(base_url=URL, timeout=120) as client:
        while time.monotonic() < end:
            await one(client)

async def main(seconds: float, clients: int):
    async with httpx.AsyncClient(base_url=URL, timeout=5) as c:
        for _ in range(120):
            try:
                if (await c.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    end = time.monotonic() + seconds
    await asyncio.gather(*[worker(end) for _ in range(clients)])
    # settle, then check the engine is idle
    await asyncio.sleep(3)
    async with httpx.AsyncClient(base_url=URL, timeout=10) as c:
        h = await c.get("/health")
        m = (await c.get("/metrics")).text
    print("health", h.status_code, h.text[:200])
    idle = True
    for line in m.splitlines():
        if re.match(r"realizar_(num_requests_running|num_requests_waiting|kv_cache_usage_ratio)\{", line):
            print(line)
            idle = idle and float(line.rsplit(" ", 1)[1]) == 0.0
    if h.status_code != 200 or not idle:
        problems.append(("after", h.status_code, "engine not idle" if not idle else h.text[:200]))


def run(argv=None) -> int:
    global rng, URL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/realizar/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--max-queue", type=int, default=256)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    port = free_port()
    URL = f"http://127.0.0.1:{port}"
    srv = subprocess.Popen([sys.executable, "-m", "realizar.cli", "serve", "--model", f"demo={args.model}", "--port",
                            str(port), "--max-num-seqs", "8", "--max-queue", str(args.max_queue), "--threads", "2",
                            "--ctx-size", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(main(args.seconds, args.clients))
        with open(f"/proc/{srv.pid}/status") as f:
            print([x for x in f.read().splitlines() if x.startswith("VmRSS")][0].replace("\t", " "))
    finally:
        srv.terminate()
        srv.wait(30)
    print("server exit", srv.returncode)
    if srv.returncode != 0:
        problems.append(("exit", srv.returncode, ""))
    print(json.dumps(dict(sorted(stats.items()))))
    print("problems:", len(problems))
    for p in problems[:30]:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run())
