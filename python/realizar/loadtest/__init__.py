"""`realizar loadtest`: drive a realizar server with concurrent clients and report latency percentiles,
throughput and error rate per scenario (the seed's load-test scenarios, plus OpenAI completions)."""
from .runner import Report, run_scenario
from .scenarios import SCENARIOS, Scenario

__all__ = ["SCENARIOS", "Report", "Scenario", "run_scenario"]
