"""Run a scenario with N concurrent keep-alive clients and summarise it."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from .client import Connection
from .scenarios import Scenario


@dataclass
class Report:
    scenario: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: dict[str, int] = field(default_factory=dict)  # status or exception name -> count
    duration: float = 0.0
    completion_tokens: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]

    def as_dict(self) -> dict:
        n = self.requests
        return {
            "scenario": self.scenario, "concurrency": self.concurrency, "requests": n,
            "successes": len(self.latencies), "failures": n - len(self.latencies),
            "error_rate": (n - len(self.latencies)) / n if n else 0.0, "errors": self.errors,
            "duration_s": round(self.duration, 3),
            "throughput_rps": round(n / self.duration, 2) if self.duration else 0.0,
            "tokens_per_s": round(self.completion_tokens / self.duration, 1) if self.duration else 0.0,
            "p50_ms": round(self.percentile(50) * 1e3, 2), "p95_ms": round(self.percentile(95) * 1e3, 2),
            "p99_ms": round(self.percentile(99) * 1e3, 2),
            "max_ms": round(max(self.latencies) * 1e3, 2) if self.latencies else float("nan"),
        }

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"=== {d['scenario']} (concurrency {d['concurrency']}) ===",
                 f"requests {d['requests']}  successes {d['successes']}  failures {d['failures']}  "
                 f"error rate {d['error_rate']:.2%}",
                 f"duration {d['duration_s']:.2f} s  throughput {d['throughput_rps']:.1f} req/s"
                 + (f"  {d['tokens_per_s']:.1f} completion tokens/s" if self.completion_tokens else ""),
                 f"latency p50 {d['p50_ms']:.1f} ms  p95 {d['p95_ms']:.1f} ms  p99 {d['p99_ms']:.1f} ms  "
                 f"max {d['max_ms']:.1f} ms"]
        if self.errors:
            lines.append("errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())))
        return "\n".join(lines)


async def run_scenario(url: str, scenario: Scenario, concurrency: int | None = None, requests: int | None = None,
                       api_key: str | None = None, model: str | None = None, timeout: float = 300.0) -> Report:
    """Send `requests` requests from `concurrency` clients (each with one keep-alive connection)."""
    concurrency = concurrency or scenario.concurrency
    total = requests or scenario.requests
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = Report(scenario.name, concurrency)
    counter = iter(range(total))

    async def client() -> None:
        conn = Connection(url, headers)
        try:
            for i in counter:
                t0 = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(
                        conn.request(scenario.method, scenario.path, scenario.body_for(i, model)), timeout)
                except Exception as e:  # a load test counts failures, it does not stop on them
                    report.errors[type(e).__name__] = report.errors.get(type(e).__name__, 0) + 1
                    await conn.close()
                    continue
                if status == 200:
                    report.latencies.append(time.perf_counter() - t0)
                    if scenario.path.startswith("/v1/"):
                        report.completion_tokens += json.loads(payload).get("usage", {}).get("completion_tokens", 0)
                    elif scenario.path.endswith("generate"):
                        body = json.loads(payload)
                        results = body.get("results", [body])
                        report.completion_tokens += sum(r.get("num_generated", 0) for r in results)
                else:
                    report.errors[str(status)] = report.errors.get(str(status), 0) + 1
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, total))))
    report.duration = time.perf_counter() - t0
    return report
