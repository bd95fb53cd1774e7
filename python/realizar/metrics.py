"""Prometheus metrics (DESIGN §5): the seed's three HTTP metrics and the engine's, by model.

Each `Metrics` owns its own CollectorRegistry, so several apps (tests) never share counters. Labels carry only
bounded values: the HTTP method, the route pattern (never the raw path), the status code, the model name and
the finish reason -- no prompt text, no request or user ids.

Gauges that describe an engine's present state (running, waiting, KV usage) are read from `engine.stats()` at
scrape time by a custom collector, so they are never stale; histograms and counters are fed per request and
per engine step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = ["CONTENT_TYPE_LATEST", "EngineMetricsObserver", "Metrics"]

PREFIX = "realizar_"

HTTP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                         120.0, 300.0)
# LLM-sized buckets, like vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "http_requests_total", "HTTP requests by method, route pattern and status code.",
            ["method", "endpoint", "status"], registry=r)
        self.http_duration = Histogram(
            "http_request_duration_seconds", "HTTP request duration, from request to last byte queued.",
            ["method", "endpoint", "status"], buckets=HTTP_DURATION_BUCKETS, registry=r)
        self.http_in_flight = Gauge(
            "http_requests_in_flight", "HTTP requests being handled now.", ["method", "endpoint"], registry=r)

        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between consecutive output tokens.",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["model"], buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{PREFIX}request_queue_time_seconds", "Time a request waited before running.",
                                    ["model"], buckets=QUEUE_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.request_success = Counter(f"{PREFIX}request_success", "Finished requests by finish reason.",
                                       ["model", "finished_reason"], registry=r)
        self.batch_size = Histogram(f"{PREFIX}batch_size", "Sequences in one engine step.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self._engines = _EngineStateCollector()
        r.register(self._engines)
        self._in_flight: dict[tuple[str, str], Any] = {}
        self._finished: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    # -- HTTP ----------------------------------------------------------------------------------------
    def http_started(self, method: str, endpoint: str) -> None:
        child = self._in_flight.get((method, endpoint))
        if child is None:
            child = self._in_flight[(method, endpoint)] = self.http_in_flight.labels(method, endpoint)
        child.inc()

    def http_finished(self, method: str, endpoint: str, status: int, duration: float | None,
                      in_flight: bool = True) -> None:
        # labels() costs microseconds per call: the children of each label set are looked up once
        children = self._finished.get((method, endpoint, status))
        if children is None:
            text = str(status)
            children = self._finished[(method, endpoint, status)] = (
                self.http_requests.labels(method, endpoint, text), self.http_duration.labels(method, endpoint, text))
        children[0].inc()
        if duration is not None:
            children[1].observe(duration)
        if in_flight:
            self._in_flight[(method, endpoint)].dec()

    # -- engine --------------------------------------------------------------------------------------
    def observe_request(self, model: str, s: Any) -> None:
        """Record one finished request from the engine's RequestStats (prompt_tokens, generated_tokens,
        finish_reason, queue_time, ttft, inter_token_latencies, e2e); thread-safe."""
        prompt = getattr(s, "prompt_tokens", 0) or 0
        generated = getattr(s, "generated_tokens", 0) or 0
        if prompt:
            self.prompt_tokens.labels(model).inc(prompt)
        if generated:
            self.generation_tokens.labels(model).inc(generated)
        for value, histogram in ((getattr(s, "queue_time", None), self.queue_time),
                                 (getattr(s, "ttft", None), self.ttft),
                                 (getattr(s, "e2e", None), self.e2e)):
            if value is not None:
                histogram.labels(model).observe(value)
        itl = getattr(s, "inter_token_latencies", None)
        if itl:
            child = self.itl.labels(model)
            for dt in itl:
                child.observe(dt)
        self.request_success.labels(model, getattr(s, "finish_reason", None) or "unknown").inc()

    def observe_step(self, model: str, batch_size: int) -> None:
        """Record one engine step of `batch_size` sequences."""
        self.batch_size.labels(model).observe(batch_size)

    def set_engine_source(self, source: Callable[[], Iterable[tuple[str, Mapping[str, Any]]]]) -> None:
        """`source()` yields (model name, engine.stats()) pairs for the running/waiting/KV gauges."""
        self._engines.source = source

    def forget_model(self, model: str) -> None:
        """Drop a model's series (after it is unloaded)."""
        for metric in (self.ttft, self.itl, self.e2e, self.queue_time, self.prompt_tokens, self.generation_tokens,
                       self.batch_size):
            try:
                metric.remove(model)
            except KeyError:
                pass
        for labels in list(_label_sets(self.request_success)):
            if labels[0] == model:
                self.request_success.remove(*labels)

    # -- exposition ----------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST


class EngineMetricsObserver:
    """An engine observer (see realizar.engine) feeding one model's series."""

    def __init__(self, metrics: Metrics, model: str):
        self.metrics = metrics
        self.model = model

    def on_step(self, s: Any) -> None:
        batch = getattr(s, "batch_size", 0)
        if batch:
            self.metrics.observe_step(self.model, batch)

    def on_request_finished(self, s: Any) -> None:
        self.metrics.observe_request(self.model, s)


def _label_sets(metric) -> list[tuple[str, ...]]:
    with metric._lock:  # prometheus_client keeps children in a dict keyed by label values
        return list(metric._metrics)


class _EngineStateCollector:
    """Gauges read from each engine's stats() when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, Mapping[str, Any]]]] | None = None

    def describe(self):
        return []

    def collect(self):
        running = GaugeMetricFamily(f"{PREFIX}num_requests_running", "Requests in the engine's running batch.",
                                    labels=["model"])
        waiting = GaugeMetricFamily(f"{PREFIX}num_requests_waiting", "Requests waiting to be scheduled.",
                                    labels=["model"])
        kv = GaugeMetricFamily(f"{PREFIX}kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1).",
                               labels=["model"])
        config = GaugeMetricFamily(f"{PREFIX}kv_cache_config_info", "The KV cache's settings (value 1), as labels.",
                                   labels=["model", "kv_cache_dtype", "block_size", "num_blocks"])
        for model, stats in (self.source() if self.source else ()):
            running.add_metric([model], float(stats.get("num_running", 0)))
            waiting.add_metric([model], float(stats.get("num_waiting", 0)))
            total = stats.get("kv_blocks_total") or 0
            used = stats.get("kv_blocks_used") or 0
            kv.add_metric([model], float(used) / total if total else 0.0)
            if "kv_cache_dtype" in stats:
                config.add_metric([model, str(stats["kv_cache_dtype"]), str(stats.get("block_size", "")), str(total)], 1.0)
        yield running
        yield waiting
        yield kv
        yield config
