"""realizar's server against llama.cpp's `llama-server -np 16` (continuous batching in C++), side by side.

    .venv/bin/python benchmarks/compare_llama_server.py --llama-server PATH/llama-server [--model FILE]
        [--threads 2] [--np 16] [--concurrency 1 4 16 32] [--requests-per-client 2] [--max-tokens 32]

Both servers run at once on the same model file and thread count, idle while the other is measured; each
concurrency level is measured on one, then the other, alternating which goes first. A level sends, from C
client threads, R requests each: `POST /v1/completions` with a distinct ~20-token prompt, max_tokens 32,
temperature 0 and ignore_eos, so every request decodes exactly 32 tokens on both servers. Printed per level
and server: aggregate output tokens/s (sum of usage.completion_tokens over the wall time) and p50/p95 request
latency; then the ratio. Build llama-server from the llama-cpp-python source distribution's vendor/llama.cpp
(`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`, then
`cmake -S vendor/llama.cpp -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server`).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engine import find_model, make_prompts, run_clients  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], port: int, model_name: str):
        self.name, self.port, self.model_name = name, port, model_name
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        self.log = tempfile.TemporaryFile()  # llama-server logs every request: a pipe would fill and block it
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} exited with {self.proc.returncode}: {self.log.read().decode()[-2000:]}")
            try:
                status, _ = self.post("/v1/completions", {"model": model_name, "prompt": "Hi", "max_tokens": 1})
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise SystemExit(f"{name} did not answer within 120 s")

    def post(self, path: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            return r.status, (json.loads(data) if data else {})
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_level(server: Server, concurrency: int, per_client: int, max_tokens: int, offset: int) -> dict:
    def send(prompt: str) -> int:
        body = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        status, out = server.post("/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"{server.name}: HTTP {status}: {str(out)[:200]}")
        return int(out.get("usage", {}).get("completion_tokens", 0))

    prompts = make_prompts(offset + concurrency * per_client)[offset:]
    return run_clients(send, prompts, concurrency)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    ap.add_argument("--model", default=None, help="GGUF file (default: the demo model, as the tests find it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--np", type=int, default=16, help="llama-server parallel slots (default 16)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every level this many times (median reported)")
    args = ap.parse_args()
    model = args.model or find_model()

    p_ours, p_llama = free_port(), free_port()
    realizar_bin = [sys.executable, "-m", "realizar.cli", "serve", "--model", f"m={model}", "--port", str(p_ours),
                    "--threads", str(args.threads), "--max-num-seqs", str(max(args.concurrency))]
    llama_bin = [args.llama_server, "-m", model, "--port", str(p_llama), "-t", str(args.threads), "-tb",
                 str(args.threads), "-np", str(args.np), "-c", str(256 * args.np), "--alias", "m"]
    servers = []
    try:
        servers.append(Server("realizar", realizar_bin, p_ours, "m"))
        servers.append(Server("llama-server", llama_bin, p_llama, "m"))
        print(f"model {model}, {args.threads} threads, llama-server -np {args.np}; "
              f"{args.max_tokens}-token completions, {args.requests_per_client} per client; load {os.getloadavg()[0]:.1f}",
              flush=True)
        print(f"{'conc':>4} | {'realizar tok/s':>14} {'p50 s':>6} {'p95 s':>6} | {'llama-server tok/s':>18} "
              f"{'p50 s':>6} {'p95 s':>6} | ratio", flush=True)
        offset = 0
        for level, c in enumerate(args.concurrency):
            results: dict[str, list[dict]] = {s.name: [] for s in servers}
            for rnd in range(args.rounds):
                order = servers if (level + rnd) % 2 == 0 else servers[::-1]
                for s in order:
                    results[s.name].append(run_level(s, c, args.requests_per_client, args.max_tokens, offset))
                    offset += c * args.requests_per_client
            med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
            a, b = med["realizar"], med["llama-server"]
            print(f"{c:>4} | {a['tok_s']:>14.1f} {a['p50_s']:>6.2f} {a['p95_s']:>6.2f} | {b['tok_s']:>18.1f} "
                  f"{b['p50_s']:>6.2f} {b['p95_s']:>6.2f} | {a['tok_s'] / b['tok_s']:.2f}x", flush=True)
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
