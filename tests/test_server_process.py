"""A real server process on a free loopback port, serving the fake model of test_server.py: client
disconnects, SSE pings, the body limit, SIGTERM draining. The real model's end-to-end tests are in
test_server_e2e.py (they reuse `ServerProcess`)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`realizar serve` (or any command taking --port) on 127.0.0.1; stopped with SIGTERM."""

    def __init__(self, argv: list[str], env: dict | None = None, ready_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "wb") if os.environ.get("REALIZAR_TEST_QUIET") else None
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_ready(ready_timeout)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.decode(errors="replace"))

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{''.join(self.output)[-3000:]}")
            try:
                status, _, _ = self.request("GET", "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s:\n{''.join(self.output)[-3000:]}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, headers, body bytes) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            h = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers={**h, **(headers or {})})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, headers=None, timeout: float = 60):
        status, hdrs, data = self.request(method, path, body, headers, timeout)
        return status, json.loads(data) if data else None

    def metrics(self) -> dict:
        _, _, data = self.request("GET", "/metrics")
        out = {}
        for fam in text_string_to_metric_families(data.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def fake_server(*args: str) -> ServerProcess:
    return ServerProcess([sys.executable, str(HERE / "test_server.py"), *args])


@pytest.fixture(scope="module")
def server():
    s = fake_server("--delay", "0.03", "--ping", "0.01")
    yield s
    assert s.stop() == 0


def engine_idle(server: ServerProcess, timeout: float = 10) -> dict:
    """Poll /metrics until the fake model's engine runs nothing and holds no KV blocks."""
    end = time.monotonic() + timeout
    while True:
        m = server.metrics()
        running = m[("realizar_num_requests_running", (("model", "fake"),))]
        kv = m[("realizar_kv_cache_usage_ratio", (("model", "fake"),))]
        if (running == 0 and kv == 0) or time.monotonic() > end:
            return {"running": running, "kv": kv}
        time.sleep(0.05)


def wait_running(server: ServerProcess, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while server.metrics()[("realizar_num_requests_running", (("model", "fake"),))] < 1:
        assert time.monotonic() < end, "the request never started running"
        time.sleep(0.02)


def raw_post(server: ServerProcess, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_and_frees_kv(server, stream):
    sock = raw_post(server, "/generate", {"prompt": "abc", "max_tokens": 3000, "stream": stream})
    wait_running(server)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    assert engine_idle(server) == {"running": 0, "kv": 0}
    m = server.metrics()
    assert m[("realizar_request_success_total", (("finished_reason", "cancelled"), ("model", "fake")))] >= 1


def test_openai_stream_disconnect_cancels(server):
    sock = raw_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                     "stream": True, "max_tokens": 3000})
    wait_running(server)
    sock.recv(1024)
    sock.close()
    assert engine_idle(server) == {"running": 0, "kv": 0}


def test_sse_pings_and_done(server):
    status, headers, data = server.request("POST", "/v1/completions", {"prompt": "abc", "max_tokens": 5,
                                                                      "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = data.decode().split("\n\n")
    assert ": ping" in events, "no SSE comment ping during a slow stream"
    datas = [e[6:] for e in events if e.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in datas[:-1]) == "defgh"


def test_body_over_the_limit_is_413(server):
    status, body = server.json("POST", "/generate", {"prompt": "a" * (70 * 1024)})
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = server.json("POST", "/tokenize", b"{" * 1000)
    assert status == 400 and body["error"]["code"] == "invalid_json"


def test_sigterm_drains_running_requests_then_exits_0():
    s = fake_server("--delay", "0.05", "--drain", "20")
    try:
        result = {}

        def long_request():
            result["r"] = s.json("POST", "/generate", {"prompt": "a", "max_tokens": 30})

        t = threading.Thread(target=long_request)
        t.start()
        end = time.monotonic() + 10
        while s.metrics()[("realizar_num_requests_running", (("model", "fake"),))] < 1:
            assert time.monotonic() < end
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        status, body = s.json("GET", "/health")
        assert status == 503 and body["status"] == "draining"
        status, body = s.json("POST", "/tokenize", {"text": "a"})
        assert status == 503 and body["error"]["code"] == "draining"
        t.join(30)
        status, body = result["r"]
        assert status == 200 and body["num_generated"] == 30, "the running request was not allowed to finish"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_promtool_check_metrics(server):
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    server.json("POST", "/generate", {"prompt": "abc", "max_tokens": 2})
    server.json("POST", "/generate", {"prompt": "abc", "max_tokens": 0})
    server.request("GET", "/no/such/route")
    _, _, data = server.request("GET", "/metrics")
    r = subprocess.run([promtool, "check", "metrics"], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_loadtest_tool_against_the_server(server):
    r = subprocess.run([sys.executable, "-m", "realizar.cli", "loadtest", "--url", server.url, "--json",
                        "--scenario", "health", "--scenario", "generate", "-n", "16", "-c", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["scenario"] for x in reports] == ["health", "generate"]
    for x in reports:
        assert x["requests"] == 16 and x["failures"] == 0 and x["p50_ms"] <= x["p99_ms"] <= x["max_ms"]
    assert reports[1]["tokens_per_s"] > 0
