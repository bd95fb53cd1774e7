"""`realizar loadtest [--url] [--scenario NAME]...`"""
from __future__ import annotations

import asyncio
import json
import os


def add_command(sub) -> None:
    from .scenarios import SCENARIOS

    s = sub.add_parser("loadtest", help="load-test a running realizar server",
                       description="Concurrent keep-alive clients; reports p50/p95/p99/max latency, throughput "
                                   "and error rate per scenario. Scenarios: "
                                   + "; ".join(f"{k} ({v.description})" for k, v in SCENARIOS.items()))
    s.add_argument("--url", default=os.environ.get("REALIZAR_LOADTEST_URL", "http://127.0.0.1:8080"),
                   help="server URL (default http://127.0.0.1:8080) [REALIZAR_LOADTEST_URL]")
    s.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), default=None,
                   help="scenario to run (repeatable; default: all but chat)")
    s.add_argument("--concurrency", "-c", type=int, default=None, help="clients (default: the scenario's)")
    s.add_argument("--requests", "-n", type=int, default=None, help="requests (default: the scenario's)")
    s.add_argument("--api-key", default=os.environ.get("REALIZAR_API_KEY", "").split(",")[0] or None,
                   help="Bearer key [REALIZAR_API_KEY]")
    s.add_argument("--model", default=None, help="model id to send (default: the server's default)")
    s.add_argument("--json", action="store_true", help="one JSON object per scenario")
    s.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args) -> int:
    from .runner import run_scenario
    from .scenarios import SCENARIOS

    names = args.scenario or [n for n in SCENARIOS if n != "chat"]
    failed = False
    for name in names:
        report = asyncio.run(run_scenario(args.url, SCENARIOS[name], args.concurrency, args.requests,
                                          api_key=args.api_key, model=args.model))
        print(json.dumps(report.as_dict()) if args.json else report.text() + "\n", flush=True)
        failed |= report.requests == 0 or len(report.latencies) == 0
    return 1 if failed else 0
