"""Prometheus metrics common to every server (per-service ones live beside their service)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("vlsplit_requests_total", "RPCs handled, by method and final status code", ["method", "code"])
LATENCY = Histogram("vlsplit_request_seconds", "RPC wall time", ["method"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
IN_FLIGHT = Gauge("vlsplit_in_flight_requests", "RPCs being handled now", ["method"])
CACHE = Counter("vlsplit_cache_requests_total", "Embedding-cache look-ups by result", ["result"])  # hit|miss|error
CACHE_REJECTED = Counter("vlsplit_cache_rejected_total",
                         "Cache entries dropped unread: unsigned or forged (HMAC), or stored bytes whose hash is not "
                         "their id", ["reason"])
CACHE_ERRORS = Counter("vlsplit_cache_errors_total", "Cache backend failures (Redis down or slow)", ["op"])
ENCODE_SECONDS = Histogram("vlsplit_encode_seconds", "Time to get an image's embeddings",
                           buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TTFT_SECONDS = Histogram("vlsplit_ttft_seconds", "Time to first token",
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKENS = Counter("vlsplit_generated_tokens_total", "Tokens generated")
TOKENS_PER_S = Histogram("vlsplit_tokens_per_second", "Decode speed of finished generations",
                         buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint; return its port (port 0 picks a free one; -1 = off)."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return server.server_port



OTHER = "other"


class BoundedLabel:
    """A labelled metric whose first label (a client's name, a replica's address) takes at most `limit`
    distinct values: the first ones seen are kept, later ones count as "other", so a large token file or pod
    churn cannot grow the series without bound. `retire` frees a value's slot (a replica gone for good) and
    drops its series."""

    def __init__(self, metric, limit: int = 100):
        self.metric, self.limit = metric, limit
        self._kept: set[str] = set()

    def labels(self, value: str, *rest: str):
        if value not in self._kept:
            if len(self._kept) >= self.limit:
                return self.metric.labels(OTHER, *rest)
            self._kept.add(value)
        return self.metric.labels(value, *rest)

    def retire(self, value: str) -> None:
        if value in self._kept:
            self._kept.discard(value)
            for labels in [k for k in self.metric._metrics if k[0] == value]:  # prometheus_client lists no series
                self.metric.remove(*labels)
