"""HTTP server speed on the demo model, on loopback (issue targets in brackets; nothing is asserted):

    GET /health req/s [>= 5000]            wrk when installed, else the loadtest client
    POST /tokenize req/s [>= 1000]         idem
    POST /generate, 5 tokens: req/s at concurrency 8 [>= 20] and p50 at concurrency 1 [< 100 ms]
    48 simultaneous 32-token /v1/completions: output tokens/s [>= 8 x 90] (median of --completion-rounds runs)

    python benchmarks/bench_server.py [--model PATH] [--threads 2] [--url http://127.0.0.1:PORT]

Without --url it starts `realizar serve` on a free loopback port and stops it at the end.

The generation figures follow the model's speed, which on a shared machine changes several-fold from one
minute to the next. So the model is also loaded here (same file, same threads) and the 5-token request is
timed both ways, alternately: `model_generate5_p50_ms` is Model.generate alone and
`generate5_c1_overhead_p50_ms` the median of (HTTP request - Model.generate right before it), the cost of the
server itself (HTTP, scheduling, hand-offs) whatever the machine's speed. At concurrency 8, rounds of 16
requests alternate between an Engine in this process (8 threads) and the server: `engine_c8_rps` against
`generate5_c8_paired_rps` (medians over rounds). --no-reference skips all this. The paired figures are for
that comparison only; the targets are read on the back-to-back runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from realizar.loadtest import SCENARIOS, run_scenario
from realizar.loadtest.client import Connection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready")


def wrk(url: str, path: str, body: dict | None, seconds: int, connections: int) -> float | None:
    """Requests/s from wrk (one thread: the machine is small), or None without wrk."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    cmd = [exe, "-t1", f"-c{connections}", f"-d{seconds}s"]
    script = None
    if body is not None:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(json.dumps(body))}\n")
        script.close()
        cmd += ["-s", script.name]
    try:
        out = subprocess.run([*cmd, url + path], capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        if script is not None:
            os.unlink(script.name)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  wrk {path}: {errors.group(1)} non-2xx responses", file=sys.stderr)
    return float(m.group(1)) if m else None


async def paired_generate(url: str, model, n: int) -> dict[str, float]:
    """Model.generate in this process, then the same request over HTTP, n times alternately (medians, ms)."""
    gen = SCENARIOS["generate"]
    conn = Connection(url)
    alone, http, diffs, mismatches = [], [], [], 0
    try:
        for i in range(n):
            body = gen.body_for(i)
            t0 = time.perf_counter()
            res = model.generate(body["prompt"], max_tokens=body["max_tokens"], strategy=body["strategy"])
            t1 = time.perf_counter()
            status, payload = await conn.request("POST", "/generate", body)
            t2 = time.perf_counter()
            if status != 200:
                raise SystemExit(f"POST /generate answered {status}: {payload[:200]!r}")
            mismatches += json.loads(payload)["tokens"] != list(res.tokens)
            alone.append(t1 - t0)
            http.append(t2 - t1)
            diffs.append((t2 - t1) - (t1 - t0))
    finally:
        await conn.close()
    if mismatches:  # then the two sides did different work and the difference means nothing
        print(f"  reference: {mismatches} of {n} generations differ between the server and the model",
              file=sys.stderr)
    return {"model_generate5_p50_ms": statistics.median(alone) * 1e3,
            "generate5_c1_paired_p50_ms": statistics.median(http) * 1e3,
            "generate5_c1_overhead_p50_ms": statistics.median(diffs) * 1e3}


def paired_c8(url: str, model, rounds: int, per_round: int = 16) -> dict[str, float]:
    """Rounds of `per_round` 5-token requests from 8 clients, alternately through an Engine here and over HTTP."""
    from realizar import Engine, EngineConfig

    gen = SCENARIOS["generate"]
    local, http = [], []
    with Engine(model, EngineConfig(max_num_seqs=48, max_model_len=512)) as engine:
        def client(it) -> None:
            for i in it:
                body = gen.body_for(i)
                engine.generate(body["prompt"], max_tokens=body["max_tokens"], strategy=body["strategy"])

        for _ in range(rounds):
            it = iter(range(per_round))
            threads = [threading.Thread(target=client, args=(it,)) for _ in range(8)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            local.append(per_round / (time.perf_counter() - t0))
            http.append(asyncio.run(run_scenario(url, gen, 8, per_round)).as_dict()["throughput_rps"])
    return {"engine_c8_rps": statistics.median(local), "generate5_c8_paired_rps": statistics.median(http)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="GGUF path or pulled name (default: the demo model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--seconds", type=int, default=5, help="wrk duration per endpoint")
    p.add_argument("--completion-rounds", type=int, default=3,
                   help="runs of the 48 x 32-token completions; their medians are reported (one run moves by "
                        "+-10%% on a shared machine)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-reference", action="store_true",
                   help="do not load the model here to time it alone against the server (see above)")
    a = p.parse_args()

    proc = None
    url = a.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "realizar.cli", "serve", "--model", f"bench={a.model}", "--port", str(port),
               "--host", "127.0.0.1", "--max-num-seqs", "48", "--log-level", "warning"]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        proc = subprocess.Popen(cmd)
        wait_ready(url, proc)
    results: dict[str, float] = {"load_average_start": os.getloadavg()[0]}  # the machine may be shared
    model = None
    try:
        if not a.no_reference:
            from realizar import Model

            model = Model.load(a.model, threads=a.threads)
            model.generate("Hello", max_tokens=2, strategy="greedy")  # warm-up
        tok_body = {"text": "The capital of France is Paris, and the capital of Spain is Madrid."}
        for name, path, body, scenario in (("health_rps", "/health", None, "health"),
                                           ("tokenize_rps", "/tokenize", tok_body, "tokenize")):
            rps = wrk(url, path, body, a.seconds, 16)
            if rps is None:
                rps = asyncio.run(run_scenario(url, SCENARIOS[scenario], 16, 2000)).as_dict()["throughput_rps"]
                name += "_python_client"
            results[name] = rps

        gen = SCENARIOS["generate"]
        asyncio.run(run_scenario(url, gen, 1, 3))  # warm-up
        r1 = asyncio.run(run_scenario(url, gen, 1, 30)).as_dict()
        results["generate5_c1_p50_ms"] = r1["p50_ms"]
        if model is not None:
            results.update(asyncio.run(paired_generate(url, model, 30)))
        r8 = asyncio.run(run_scenario(url, gen, 8, 80)).as_dict()
        results["generate5_c8_rps"] = r8["throughput_rps"]
        results["generate5_c8_p50_ms"] = r8["p50_ms"]
        if model is not None:
            results.update(paired_c8(url, model, 5))

        comps = [asyncio.run(run_scenario(url, SCENARIOS["completions"], 48, 48)).as_dict()
                 for _ in range(max(a.completion_rounds, 1))]
        results["completions48x32_tokens_per_s"] = statistics.median(c["tokens_per_s"] for c in comps)
        results["completions48x32_p50_ms"] = statistics.median(c["p50_ms"] for c in comps)
        results["completions48x32_failures"] = sum(c["failures"] for c in comps)
        if len(comps) > 1:
            results["completions48x32_min_tokens_per_s"] = min(c["tokens_per_s"] for c in comps)
            results["completions48x32_max_tokens_per_s"] = max(c["tokens_per_s"] for c in comps)
    finally:
        results["load_average_end"] = os.getloadavg()[0]
        if model is not None:
            model.close()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if a.json:
        print(json.dumps(results))
    else:
        targets = {"health_rps": ">= 5000", "tokenize_rps": ">= 1000", "generate5_c8_rps": ">= 20",
                   "generate5_c1_p50_ms": "< 100", "completions48x32_tokens_per_s": ">= 720"}
        for k, v in results.items():
            print(f"{k:40s} {v:10.1f}   {targets.get(k.replace('_python_client', ''), '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
