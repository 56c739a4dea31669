"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "trimformer_requests",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "trimformer_request_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            ["path", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "trimformer_in_flight_requests", "requests being handled", registry=self.registry
        )
        self.batch_size = Histogram(
            "trimformer_batch_size", "texts per onnxruntime call", buckets=_ROWS, registry=self.registry
        )
        self.queue_seconds = Histogram(
            "trimformer_queue_seconds",
            "time a request's texts waited before their batch ran",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "trimformer_inference_seconds",
            "time of one onnxruntime call",
            buckets=_SECONDS,
            registry=self.registry,
        )

    def request_done(self, path: str, status: int) -> None:
        route = _route(path)
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()


def _route(path: str) -> str:
    """The endpoint a path is, as a label: model names and unknown paths (a scanner's) must not
    each become a time series."""
    if path in ("/predict", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"):
        return path
    if path.startswith("/v2/models/"):
        for suffix in ("infer", "ready"):
            if path.endswith("/" + suffix):
                return f"/v2/models/{{name}}/{suffix}"
        return "/v2/models/{name}"
    return "other"
