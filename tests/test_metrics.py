"""realizar.metrics: names and labels of DESIGN §5, engine observer, exposition that Prometheus parses."""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from realizar.metrics import EngineMetricsObserver, Metrics

DESIGN_NAMES = {
    "http_requests", "http_request_duration_seconds", "http_requests_in_flight",
    "realizar_time_to_first_token_seconds", "realizar_inter_token_latency_seconds",
    "realizar_e2e_request_latency_seconds", "realizar_request_queue_time_seconds", "realizar_num_requests_running",
    "realizar_num_requests_waiting", "realizar_kv_cache_usage_ratio", "realizar_prompt_tokens",
    "realizar_generation_tokens", "realizar_request_success", "realizar_batch_size",
}


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def value(m: Metrics, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError((name, labels))


def test_every_design_metric_is_exported():
    m = Metrics()
    m.set_engine_source(lambda: [("tiny", {"num_running": 2, "num_waiting": 1, "kv_blocks_total": 8,
                                           "kv_blocks_used": 2, "kv_cache_dtype": "q8_0", "block_size": 16})])
    fams = families(m)
    assert DESIGN_NAMES <= set(fams)
    assert fams["http_requests"].type == "counter" and fams["realizar_batch_size"].type == "histogram"
    assert value(m, "realizar_num_requests_running", model="tiny") == 2
    assert value(m, "realizar_num_requests_waiting", model="tiny") == 1
    assert value(m, "realizar_kv_cache_usage_ratio", model="tiny") == 0.25
    assert value(m, "realizar_kv_cache_config_info", model="tiny", kv_cache_dtype="q8_0", block_size="16",
                 num_blocks="8") == 1


def test_http_metrics_move():
    m = Metrics()
    m.http_started("POST", "/generate")
    assert value(m, "http_requests_in_flight", method="POST", endpoint="/generate") == 1
    m.http_finished("POST", "/generate", 200, 0.02)
    m.http_finished("GET", "/x", 404, None, in_flight=False)
    assert value(m, "http_requests_in_flight", method="POST", endpoint="/generate") == 0
    assert value(m, "http_requests_total", method="POST", endpoint="/generate", status="200") == 1
    assert value(m, "http_request_duration_seconds_count", method="POST", endpoint="/generate", status="200") == 1
    assert value(m, "http_requests_total", method="GET", endpoint="/x", status="404") == 1


def test_engine_observer_feeds_request_and_step_metrics():
    m = Metrics()
    obs = EngineMetricsObserver(m, "tiny")
    obs.on_step(SimpleNamespace(batch_size=3))
    obs.on_request_finished(SimpleNamespace(prompt_tokens=5, generated_tokens=4, finish_reason="length",
                                            queue_time=0.01, ttft=0.05, inter_token_latencies=[0.02, 0.03, 0.02],
                                            e2e=0.2))
    obs.on_request_finished(SimpleNamespace(prompt_tokens=5, generated_tokens=0, finish_reason="cancelled",
                                            queue_time=None, ttft=None, inter_token_latencies=[], e2e=0.1))
    assert value(m, "realizar_prompt_tokens_total", model="tiny") == 10
    assert value(m, "realizar_generation_tokens_total", model="tiny") == 4
    assert value(m, "realizar_request_success_total", model="tiny", finished_reason="length") == 1
    assert value(m, "realizar_request_success_total", model="tiny", finished_reason="cancelled") == 1
    assert value(m, "realizar_inter_token_latency_seconds_count", model="tiny") == 3
    assert value(m, "realizar_time_to_first_token_seconds_count", model="tiny") == 1
    assert value(m, "realizar_request_queue_time_seconds_count", model="tiny") == 1
    assert value(m, "realizar_e2e_request_latency_seconds_count", model="tiny") == 2
    assert value(m, "realizar_batch_size_sum", model="tiny") == 3
    m.forget_model("tiny")
    text = m.render().decode()
    assert 'model="tiny"' not in text


def test_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.http_finished("GET", "/health", 200, 0.001, in_flight=False)
    assert "/health" not in b.render().decode()
