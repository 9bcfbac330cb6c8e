"""Decoder-only Prometheus metrics (the common ones are in shared/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# calls
CANCELLED = Counter("vlsplit_decoder_cancelled_total",
                    "Requests stopped before their end because the client went away (cancel, deadline, shutdown)")
PAYLOAD_BYTES = Counter("vlsplit_decoder_payload_bytes_total",
                        "Embedding payload bytes received (0 for requests whose images' KV was cached)")
RESERVED_BYTES = Gauge("vlsplit_decoder_payload_bytes_reserved", "Payload bytes announced by calls in progress")
IDLE_STREAMS = Counter("vlsplit_decoder_idle_streams", "Calls dropped because their request stream went quiet")

# scheduler
QUEUE_DEPTH = Gauge("vlsplit_decoder_queue_depth", "Requests waiting for admission (KV blocks or rows)")
RUNNING = Gauge("vlsplit_decoder_running", "Sequences admitted (prefilling or decoding)")
DROPPED = Counter("vlsplit_decoder_dropped_sequences", "Sequences dropped because their request was cancelled",
                  ["where"])  # waiting (never prefilled) | running | forked
STEP_SECONDS = Histogram("vlsplit_decoder_step_seconds", "Wall time of one engine step (schedule, forward, outputs)",
                         ["kind"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
STEP_ROWS = Histogram("vlsplit_decoder_batch_size", "Sequences advanced by one step",
                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128))
STEP_FAILURES = Counter("vlsplit_decoder_step_failures", "Engine forwards that raised: a step of several requests "
                        "(each then run alone) or one request alone (it fails)", ["kind"])  # batch | alone
PREFILL_TOKENS = Counter("vlsplit_decoder_prefill_tokens", "Prompt tokens computed (tokens reused from cached blocks are not)")

# KV blocks
HIT_TOKENS = Counter("vlsplit_kv_cache_hit_tokens", "Prompt tokens whose KV came from cached blocks")
MISS_TOKENS = Counter("vlsplit_kv_cache_miss_tokens", "Prompt tokens whose KV had to be computed")
EVICTIONS = Counter("vlsplit_kv_cache_evictions", "Cached KV blocks reclaimed for new tokens")
BLOCKS_USED = Gauge("vlsplit_kv_blocks_used", "KV blocks referenced by sequences")
BLOCKS_CACHED = Gauge("vlsplit_kv_blocks_cached", "Unreferenced KV blocks kept for prefix reuse (evictable)")
BLOCKS_FREE = Gauge("vlsplit_kv_blocks_free", "KV blocks holding nothing")
