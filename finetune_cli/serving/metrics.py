"""`/metrics`: the server's counters and histograms in Prometheus' text format (prometheus_client, one registry per
app, so two servers in one process never mix their counts). Labels take only values the server knows (its
endpoints, its model names), never raw client input: a client cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/feedback": "feedback",
    "/v1/models": "models",
    "/metrics": "metrics",
    "/health": "health",
    "/": "page",
}


def endpoint(path: str) -> str:
    """The endpoint label of a request path: one of ENDPOINTS' values, `page` for the page's files, else `other`."""
    if path in ENDPOINTS:
        return ENDPOINTS[path]
    if path.startswith("/v1/models/"):
        return "models"
    return "page" if path.startswith("/static/") else "other"


class Metrics:
    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.models = set(engine.served)
        self.requests = Counter(
            "ftune_requests",
            "HTTP requests, by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "ftune_request_duration_seconds",
            "Time from a request's arrival to its last byte, by endpoint and model",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "ftune_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first text",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "ftune_prompt_tokens", "Prompt tokens of generation requests", ["model"], registry=registry
        )
        self.generated = Counter("ftune_generated_tokens", "Tokens generated", ["model"], registry=registry)
        Gauge("ftune_queue_depth", "Requests waiting for a place in a batch", registry=registry).set_function(
            lambda: len(engine.waiting)
        )
        Gauge("ftune_running_batch_size", "Requests decoding together now", registry=registry).set_function(
            lambda: len(engine.running)
        )
        Gauge("ftune_max_batch", "--max-batch", registry=registry).set(engine.max_batch)

    def observe(self, path: str, status: int | None, seconds: float, info: dict) -> None:
        """Count one finished request: `info` is what the handler learnt (the model it served, its tokens and the
        time of its first text)."""
        name = endpoint(path)
        model = info.get("model") if info.get("model") in self.models else ""
        self.requests.labels(name, model, str(status or 0)).inc()
        self.latency.labels(name, model).observe(seconds)
        seq = info.get("seq")
        if seq is not None and model:
            self.prompt_tokens.labels(model).inc(len(seq.prompt))
            self.generated.labels(model).inc(len(seq.tokens))
        if "first" in info and model:
            self.first_token.labels(model).observe(info["first"] - info["start"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
