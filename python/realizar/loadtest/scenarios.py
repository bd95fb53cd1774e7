"""Load-test scenarios: the seed plan's (health, tokenize, generate, batch tokenize, batch generate) and the
OpenAI endpoints. Each names a request and the default number of clients and requests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "Water boils at", "My favourite book is"]


@dataclass(frozen=True)
class Scenario:
    name: str
    method: str
    path: str
    body: dict[str, Any] | None = None
    concurrency: int = 8
    requests: int = 100
    description: str = ""
    vary: list[str] = field(default_factory=list)  # body fields cycled through PROMPTS per request

    def body_for(self, i: int, model: str | None = None) -> dict[str, Any] | None:
        if self.body is None:
            return None
        body = dict(self.body)
        for key in self.vary:
            if key == "prompts":
                body[key] = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(len(body[key]))]
            elif key == "messages":
                body[key] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            else:
                body[key] = PROMPTS[i % len(PROMPTS)]
        if model is not None and self.path != "/health":
            body["model"] = model
        return body


SCENARIOS = {s.name: s for s in [
    Scenario("health", "GET", "/health", None, 10, 1000, "GET /health"),
    Scenario("tokenize", "POST", "/tokenize", {"text": PROMPTS[0]}, 5, 500, "POST /tokenize", ["text"]),
    Scenario("generate", "POST", "/generate", {"prompt": PROMPTS[0], "max_tokens": 5, "strategy": "greedy"}, 8, 80,
             "POST /generate, 5 tokens", ["prompt"]),
    Scenario("batch_tokenize", "POST", "/batch/tokenize", {"texts": PROMPTS[:3]}, 5, 100,
             "POST /batch/tokenize, 3 texts"),
    Scenario("batch_generate", "POST", "/batch/generate", {"prompts": PROMPTS[:2], "max_tokens": 5}, 3, 15,
             "POST /batch/generate, 2 prompts x 5 tokens", ["prompts"]),
    Scenario("completions", "POST", "/v1/completions",
             {"prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0, "ignore_eos": True}, 48, 48,
             "POST /v1/completions, 32 tokens each", ["prompt"]),
    Scenario("chat", "POST", "/v1/chat/completions",
             {"messages": [], "max_tokens": 32, "temperature": 0, "ignore_eos": True}, 16, 32,
             "POST /v1/chat/completions, 32 tokens each", ["messages"]),
]}
