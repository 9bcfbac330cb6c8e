"""Service configuration: one frozen dataclass per service, read from `VLSPLIT_*` environment
variables and overridden by CLI flags. This is the only module that reads `os.environ`.

Every field's environment variable is `VLSPLIT_<FIELD NAME IN UPPER CASE>`, e.g.
`VLSPLIT_MODEL=/models/qwen2-vl`, `VLSPLIT_REDIS_URL=redis://cache:6379/0`, `VLSPLIT_PORT=50052`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

PREFIX = "VLSPLIT_"
MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """What every server has."""

    host: str = "127.0.0.1"  # listen address; 0.0.0.0 in containers
    port: int = 0  # gRPC port; 0 = pick a free one (printed at start)
    metrics_port: int = 0  # Prometheus HTTP port; 0 = pick a free one, -1 = off
    drain_s: float = 0.0  # SIGTERM: seconds to keep serving while health says NOT_SERVING (balancers notice)
    grace_s: float = 10.0  # SIGTERM, after the drain: seconds in-flight calls get to finish
    log_level: str = "INFO"
    log_json: bool = True  # one JSON object per log line
    port_file: str = ""  # if set, write {"port": .., "metrics_port": ..} here once serving
    # TLS (PEM paths, re-read when they change). With tls_client_ca, callers must present a certificate
    # it signed (mutual TLS: what encoders and decoders should require of the gateway).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # A plaintext port serving only gRPC health, for probes that cannot speak TLS (Kubernetes' grpc
    # probe); -1 = off, 0 = pick a free one.
    health_port: int = -1
    # Encoder and decoder: the malloc they run with (shared/allocator.py): auto = tcmalloc where installed, else
    # glibc with its mmap/trim thresholds raised (a forward's large tensors then cost no page faults); tcmalloc,
    # glibc, or system (as started).
    allocator: str = "auto"
    # Calls handled at once (health watches and probes on the main port count too: use health_port for
    # probes); one more is refused by gRPC with RESOURCE_EXHAUSTED. 0 = unlimited.
    max_concurrent_rpcs: int = 1024


@dataclass(frozen=True)
class CacheConfig:
    """The embedding cache / image store of the services that use one (encoder, gateway):
    `shared/cache.py::store_for` reads these."""

    redis_url: str = "memory"  # redis://host:port/db, or "memory" for an in-process cache
    redis_password: str = ""  # used when redis_url carries none (keeps the secret out of the URL)
    redis_username: str = ""  # ACL user, when redis_url carries none
    redis_tls_ca: str = ""  # rediss://: CA bundle of the server's certificate ("" = the system's)
    redis_tls_cert: str = ""  # rediss:// with client certificates
    redis_tls_key: str = ""
    # Signs every cache value (HMAC-SHA256; >= 32 bytes, the same on encoders and gateways, from a Secret):
    # entries written without it are dropped and recomputed. "" = unsigned. Placeholders (.env.example's) and weak
    # keys (under 32 bytes, fewer than 8 distinct characters) are refused at start.
    cache_hmac_key: str = ""
    # The largest value cached (larger ones are not): Qwen3-VL-2B's largest float32 image payload is 537 MB. It
    # bounds a parts manifest to cache_max_entry_bytes / cache_part_bytes parts; one naming more is never followed.
    cache_max_entry_bytes: int = 2048 * MiB


@dataclass(frozen=True)
class EncoderConfig(ServerConfig, CacheConfig):
    model: str = ""  # checkpoint directory (required)
    # "auto": bfloat16 where the CPU (AMX / AVX-512 BF16) or CUDA device has it natively, else float32
    # (shared/hardware.py); or float32 / bfloat16 / float16.
    dtype: str = "auto"
    device: str = "cpu"
    quantize: str = "off"  # "int8": the tower's linear weights int8 at load (per output channel)
    # "torch" (the exact reference) or "openvino": the tower converted to OpenVINO at first start (`pip install
    # openvino nncf`; CPU only); int8 then through nncf. The converted IR is cached under openvino_cache_dir
    # ("" = $XDG_CACHE_HOME/vlsplit/openvino or ~/.cache/vlsplit/openvino), keyed by the fingerprint.
    encoder_backend: str = "torch"
    openvino_cache_dir: str = ""
    cache_ttl_s: int = 24 * 3600  # embedding cache entries
    image_ttl_s: int = 3600  # uploaded image bytes kept for Ask(image_id)
    payload_dtype: str = ""  # dtype of cached/sent payloads; "" = the serving dtype (exact)
    memory_cache_bytes: int = 512 * MiB  # bound of the in-process cache / image store
    max_image_bytes: int = 32 * MiB
    max_image_pixels: int = 8192 * 8192
    redis_timeout_s: float = 0.5
    cache_part_bytes: int = 64 * MiB  # Redis values above this are stored in parts (Redis's bulk limit is 512 MB)
    torch_threads: int = 0  # torch intra-op threads; 0 = every CPU this process may use (affinity, cgroup quota)
    # Dynamic batching (services/vision_encoder/batcher.py): different images, one tower forward.
    encode_max_batch: int = 8  # images per forward; 1 = no batching
    encode_max_wait_ms: float = 20.0  # how long an image waits for others; 0 = batch only behind a busy tower
    encode_max_queue: int = 64  # images waiting for or in a forward; one more -> RESOURCE_EXHAUSTED (retry later)
    encode_max_batch_patches: int = 65536  # vision patches per forward (one max-size Qwen2-VL image)
    # Cross-replica single flight (Redis only): one replica encodes a new image, the others wait for
    # its cache entry; a holder that dies is replaced after this many seconds. 0 = off.
    encode_lock_s: float = 30.0
    # Video clips (shared/video.py): each refusal names its setting. Decoding runs in a worker thread, never
    # in the tower's, and stops past video_decode_timeout_s.
    max_video_bytes: int = 64 * MiB
    max_video_seconds: float = 600.0  # the clip's length (frames counted from its packets / its frame rate)
    max_video_source_frames: int = 216_000  # frames the container may hold (1 h at 60 fps)
    max_video_frames: int = 768  # frames sampled from one clip
    max_video_frame_pixels: int = 3840 * 2160  # the clip's own resolution (width x height)
    max_video_tokens: int = 16384  # the clip's tokens in a prompt (the gateway also sends the decoder's context)
    max_video_fps: float = 8.0  # the highest sampling rate a request may ask for
    video_decode_timeout_s: float = 60.0


@dataclass(frozen=True)
class EngineConfig:
    """The decoder engine's KV budget, its scheduler, and the bounds it enforces itself (a request
    past one gets INVALID_ARGUMENT naming it). Also usable alone, by the in-process engine."""

    kv_cache_bytes: int = 2048 * MiB  # the KV block pool, allocated once: running sequences + cached prefixes
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # reuse the KV of any earlier prompt sharing a prefix (image, turns, system)
    max_batch: int = 64  # sequences running at once (decoded together, one token each per step)
    max_step_tokens: int = 2048  # tokens one step computes; long prompts are prefilled in chunks of this
    max_queue: int = 64  # requests waiting for admission; one more -> RESOURCE_EXHAUSTED
    max_model_len: int = 0  # prompt + max_new_tokens; 0 = the model's max_position_embeddings
    max_new_tokens_limit: int = 4096
    max_images: int = 16  # images per request
    max_rows: int = 64  # conversations (AskMany questions) per request
    max_labels: int = 64  # labels per Classify check
    max_label_tokens: int = 32
    max_checks: int = 64  # checks per Classify/Moderate request (the gateway's max_questions)
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    max_request_blocks: int = 0  # KV blocks one request may need; 0 = the whole pool
    max_schema_bytes: int = 64 * 1024  # a response_format JSON schema
    # CPU: weights also pre-packed for oneDNN's small-batch kernels, where supported: "all" (layers +
    # head; the layers' weights are then held twice), "head" (the LM head only), "off"
    packed_linear: str = "all"
    # "int8": the decoder layers' linear weights int8 at load (per output channel, symmetric; the embedding and
    # LM head stay as loaded); few-row calls (decode) on an int8 kernel, larger ones on weights dequantized per call.
    quantize: str = "off"
    # Decode rows (one new token each, sharing no prefix with other rows): "paged" attends all of them in one
    # flex_attention call over the KV pool in place (compiled at load: a C++ compiler on CPU); "gather" copies
    # each row's context and runs SDPA per row; "auto" = paged where it compiles. Engines built in code gather
    # (no compile); the decoder server defaults to auto.
    decode_attention: str = "gather"
    # A step running longer than this turns health NOT_SERVING (Kubernetes restarts the pod); 0 = never. A step
    # is one forward of at most max_step_tokens tokens: seconds on a CPU, so the default leaves wide room.
    step_stall_s: float = 300.0


@dataclass(frozen=True)
class DecoderConfig(ServerConfig, EngineConfig):
    model: str = ""
    dtype: str = "auto"  # as the encoder's: bfloat16 where native, else float32
    decode_attention: str = "auto"
    device: str = "cpu"
    torch_threads: int = 0  # torch intra-op threads; 0 = every CPU this process may use (affinity, cgroup quota)
    default_max_new_tokens: int = 64
    # The payload stream.
    max_payload_bytes: int = 0  # one request's payloads; 0 = the largest image's float32 payload (>= 512 MiB)
    max_receiving_bytes: int = 0  # payload bytes of all calls in progress; 0 = 4 x max_payload_bytes
    stream_idle_s: float = 30.0  # a call whose header or payload chunks stall this long is dropped
    payload_wait_s: float = 600.0  # after need_payload, how long the client may take to fetch/encode the payloads


@dataclass(frozen=True)
class GatewayConfig(ServerConfig, CacheConfig):
    # encoder replicas, the same way: each encode goes to the serving one with the fewest in flight
    encoder: str = "127.0.0.1:50052"
    # decoder replicas: host:port[,host:port...]; a name (or dns:///name:port) resolving to several
    # addresses is one replica per address. Questions about one image go to one replica.
    decoder: str = "127.0.0.1:50053"
    decoder_resolve_s: float = 30.0  # decoder and encoder names are resolved again this often
    decoder_down_s: float = 5.0  # a decoder or encoder replica found unreachable is tried last for this long
    # TLS to encoders and decoders: their CA, and this gateway's client certificate for mutual TLS.
    # upstream_tls_server_name: the name in their certificates when they are dialled by IP (default:
    # the host name given in --encoder / --decoder).
    upstream_tls_ca: str = ""
    upstream_tls_cert: str = ""
    upstream_tls_key: str = ""
    upstream_tls_server_name: str = ""
    redis_timeout_s: float = 0.5
    cache_part_bytes: int = 64 * MiB  # Redis values above this are stored in parts (Redis's bulk limit is 512 MB)
    memory_cache_bytes: int = 512 * MiB
    cache_ttl_s: int = 24 * 3600  # "memory" backend only: entries the gateway keeps itself
    max_image_bytes: int = 32 * MiB
    max_question_chars: int = 8192
    max_questions: int = 64
    # Chat / the OpenAI endpoint: messages, images and text characters per conversation; answers per call (n).
    max_messages: int = 256
    max_images: int = 16
    max_chat_chars: int = 65536
    max_choices: int = 16
    # The image bytes of one request, all its images together (data: URLs, remote fetches, Chat's image data).
    max_request_image_bytes: int = 64 * MiB
    # Embedding payload bytes the gateway holds for requests in progress (fetched for decoders that asked);
    # a request that would pass it is refused with RESOURCE_EXHAUSTED (retry later). 0 = 4 x the decoders'
    # advertised max_payload_bytes.
    max_payload_bytes_in_flight: int = 0
    max_stop: int = 16  # stop strings per request (checked before any image is encoded; the decoder has its own)
    max_video_bytes: int = 64 * MiB  # one clip (the encoder bounds its length, frames, resolution and tokens)
    # The HTTP side (OpenAI-compatible API and web page, services/gateway/http.py): -1 = off, 0 = a free port.
    http_port: int = -1
    served_model_name: str = ""  # the model's name in /v1/models and requests; "" = its model_type (e.g. qwen2_vl)
    max_http_body_bytes: int = 48 * MiB  # a request body (a 32 MiB image is ~43 MiB as a base64 data: URL)
    remote_images: bool = False  # fetch https:// image URLs (public addresses only, no redirects)
    remote_image_timeout_s: float = 10.0
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 4096  # checked here too, before any image is encoded
    deadline_s: float = 120.0  # default deadline when the client sets none
    retry_attempts: int = 5  # per hop, for UNAVAILABLE
    migration_limit: int = 1  # times an answer moves to another decoder after its decoder died mid-answer
    # Client authentication (services/gateway/auth.py): a file of name:sha256(token)[:scopes[:rps[:images]]]
    # lines; "" = off (anyone may call). The limits apply to tokens whose line sets none; 0 = unlimited.
    auth_tokens: str = ""
    auth_requests_per_s: float = 50.0
    auth_images_per_day: int = 0  # 0 with auth on: a warning at start (a client could flush the cache)
    # "replica": each gateway limits a client's requests_per_s alone (N replicas admit N times it); "cluster":
    # one bucket per client in Redis, shared by every replica (Redis failing: each replica alone, logged).
    auth_rate_scope: str = "replica"
    # Distinct clients / replicas one labelled metric keeps (Prometheus series); later ones count as "other".
    metrics_label_limit: int = 100
    # With auth on, an image belongs to the client that sent it ("tenant": another client's id is NOT_FOUND,
    # nothing is shared or timed across clients); "global" shares images and cache entries between clients.
    cache_scope: str = "tenant"


def load(cls: type, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
    """Build `cls` from defaults <- VLSPLIT_* environment <- non-None `overrides`."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = environ.get(PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _parse(f, raw)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cls(**values)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"{PREFIX}{f.name.upper()}={raw!r}: expected true/false")
        return raw.lower() in ("1", "true", "yes")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{PREFIX}{f.name.upper()}={raw!r}: expected {kind.__name__}") from None


def cache_dir() -> Path:
    """Where `vlsplit up` keeps the embedded default checkpoint: $XDG_CACHE_HOME/vlsplit or ~/.cache/vlsplit."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlsplit"


def openvino_cache_dir() -> Path:
    """The default OpenVINO IR cache of the encoder (EncoderConfig.openvino_cache_dir = "")."""
    return cache_dir() / "openvino"


def env_get(name: str, default: str | None = None) -> str | None:
    """For the few non-service settings (e.g. the CLI's log level): `VLSPLIT_<name>`."""
    return os.environ.get(PREFIX + name, default)


__all__ = ["DecoderConfig", "EncoderConfig", "EngineConfig", "GatewayConfig", "ServerConfig", "cache_dir", "env_get", "openvino_cache_dir", "load"]
