"""Decoder-only Prometheus metrics (the common ones are in shared/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CANCELLED = Counter("vlsplit_decoder_cancelled_total",
                    "Generations stopped before their end because the client went away (cancel, deadline, shutdown)")
QUEUE_DEPTH = Gauge("vlsplit_decoder_queue_depth", "Generations admitted and waiting for a running slot")
RUNNING = Gauge("vlsplit_decoder_running", "Generations holding a running slot")
PAYLOAD_BYTES = Counter("vlsplit_decoder_payload_bytes_total",
                        "Embedding payload bytes received (0 for requests served from the prefix cache)")
