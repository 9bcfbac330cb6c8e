"""Service configuration: one frozen pydantic-settings class per service, read from `VLSPLIT_*` environment
variables and overridden by CLI flags. This is the only module that reads `os.environ`.

Every setting is declared once, here: its type, range or choices, default and description (what `vlsplit
config` prints and `make settings-docs` writes into the README's tables). Its environment variable is
`VLSPLIT_<FIELD NAME IN UPPER CASE>`, e.g. `VLSPLIT_MODEL=/models/qwen2-vl`, `VLSPLIT_PORT=50052`.

`load` is the entry point: defaults <- environment <- flags, every value checked at once, and a bad one is a
`ConfigError` naming the variable (`VLSPLIT_MAX_IMAGES=-1: must be >= 0`). A class built directly
(`GatewayConfig(max_stop=20)`, in code and tests) is checked the same way but reads no environment.
"""

from __future__ import annotations

import contextvars
import difflib
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, ValidationError, field_validator, \
    model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from .allocator import CHOICES as ALLOCATORS, MARK as ALLOCATOR_MARK  # torch-free
from .hardware import DTYPE_NAMES  # torch-free

PREFIX = "VLSPLIT_"
MiB = 1 << 20
log = logging.getLogger("vlsplit.config")

# Choices, spelled as the modules that act on them spell them (tests/test_config.py checks they agree).
Dtype = Literal[DTYPE_NAMES]  # shared/hardware.py
PayloadDtype = Literal[("", *DTYPE_NAMES[1:])]  # shared/codec.py DTYPES
Allocator = Literal[ALLOCATORS]  # shared/allocator.py
Quantize = Literal["off", "int8"]  # shared/quantize.py MODES
EncoderBackend = Literal["torch", "openvino"]  # services/vision_encoder/engine.py BACKENDS
DecodeAttention = Literal["auto", "paged", "gather"]  # services/llm_decoder/paged_kernel.py MODES
PackedLinear = Literal["off", "head", "all"]  # shared/packed_linear.py MODES
LogLevel = Annotated[Literal["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"],
                     BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)]
# VLSPLIT_* names that are not service settings (the client's token, the allocator's re-exec mark)
OTHER_NAMES = frozenset({PREFIX + "TOKEN", ALLOCATOR_MARK})

_environ: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("vlsplit_environ", default=None)


class ConfigError(ValueError):
    """A setting with a value its service cannot run with; the message names the setting."""


class _Environ(EnvSettingsSource):
    """The environment `load` was given (os.environ or a test's dict), matched case-insensitively.
    `_load_env_vars` is pydantic-settings' hook for where variables come from (its dotenv source overrides it)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in (_environ.get() or {}).items()}


class Settings(BaseSettings):
    """Frozen, checked on construction; the environment is read only inside `load`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid", populate_by_name=True,
                                      validate_default=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,) if _environ.get() is None else (init_settings, _Environ(settings_cls))


class ServerConfig(Settings):
    """What every server has."""

    host: str = Field("127.0.0.1", min_length=1, description="listen address; 0.0.0.0 in containers")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 = pick a free one (printed at start)")
    metrics_port: int = Field(0, ge=-1, le=65535, description="Prometheus HTTP port; 0 = pick a free one, -1 = off")
    drain_s: float = Field(0.0, ge=0, description=(
        "SIGTERM: seconds to keep serving while health says NOT_SERVING, so balancers and Kubernetes endpoints "
        "notice before the port closes (a second SIGTERM or Ctrl-C ends the drain early)"))
    grace_s: float = Field(10.0, ge=0, description=(
        "SIGTERM, after the drain: at most this many seconds for in-flight calls to finish (the process exits when "
        "the last one has)"))
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR (any case)")
    log_json: bool = Field(True, description="one JSON object per log line on stderr; false = plain text")
    port_file: str = Field("", description='if set, write {"port": .., "metrics_port": ..} here once serving')
    tls_cert: str = Field("", description=(
        "TLS certificate (PEM path) of the gRPC port (and the gateway's HTTP port); re-read on the next "
        "handshake after it changes"))
    tls_key: str = Field("", description="its private key (PEM path)")
    tls_client_ca: str = Field("", description=(
        "mutual TLS: callers must present a certificate this CA (PEM path) signed; what encoders and decoders "
        "should require of the gateway"))
    health_port: int = Field(-1, ge=-1, le=65535, description=(
        "a plaintext port serving only gRPC health, for probes that cannot speak TLS (Kubernetes' grpc probe); "
        "-1 = off, 0 = pick a free one"))
    allocator: Allocator = Field("auto", description=(
        "encoder and decoder: the malloc they run with (shared/allocator.py): `auto` = tcmalloc where installed, "
        "else glibc with its mmap/trim thresholds raised (a forward's large tensors then cost no page faults); "
        "`tcmalloc`, `glibc`, or `system` (as started)"))
    max_concurrent_rpcs: int = Field(1024, ge=0, description=(
        "calls handled at once (health watches and probes on the main port count too: use health_port for "
        "probes); one more is refused by gRPC with RESOURCE_EXHAUSTED. 0 = unlimited"))


class CacheConfig(Settings):
    """The embedding cache / image store of the services that use one (encoder, gateway):
    `shared/cache.py::store_for` reads these."""

    redis_url: str = Field("memory", description=(
        "`redis://host:port/db` (`rediss://` with TLS, `redis+cluster://` for a cluster), or `memory` for an "
        "in-process cache"))
    redis_password: SecretStr = Field(SecretStr(""), description=(
        "used when redis_url carries none (keeps the secret out of the URL, e.g. in a Kubernetes Secret)"))
    redis_username: str = Field("", description="ACL user, when redis_url carries none")
    redis_tls_ca: str = Field("", description="rediss://: CA bundle of the server's certificate (\"\" = the system's)")
    redis_tls_cert: str = Field("", description="rediss:// with a client certificate: its PEM path")
    redis_tls_key: str = Field("", description="rediss:// with a client certificate: its key's PEM path")
    redis_timeout_s: float = Field(0.5, gt=0, description=(
        "Redis socket timeout: a slow or absent Redis turns into cache misses, never failed requests"))
    cache_hmac_key: SecretStr = Field(SecretStr(""), description=(
        "signs every cache value (HMAC-SHA256; >= 32 bytes, the same on encoders and gateways, from a Secret): "
        "entries written without it are dropped and recomputed. \"\" = unsigned. Placeholders (.env.example's) "
        "and weak keys (under 32 bytes, fewer than 8 distinct characters) are refused at start"))
    cache_max_entry_bytes: int = Field(2048 * MiB, ge=1, description=(
        "the largest value cached (larger ones are not): Qwen3-VL-2B's largest float32 image payload is 537 MB. "
        "It bounds a parts manifest to cache_max_entry_bytes / cache_part_bytes parts; one naming more is "
        "never followed"))
    cache_part_bytes: int = Field(64 * MiB, ge=1, description=(
        "Redis values above this are stored in parts (Redis's bulk limit is 512 MB)"))
    memory_cache_bytes: int = Field(512 * MiB, ge=0, description="bound of the in-process cache / image store")
    cache_ttl_s: int = Field(24 * 3600, ge=1, description=(
        "embedding cache entries' lifetime (the gateway's: entries it keeps itself, `memory` backend only)"))

    @field_validator("cache_hmac_key")
    @classmethod
    def _strong_key(cls, key: SecretStr) -> SecretStr:
        if key.get_secret_value():
            from .cache import Signer  # the rule lives with the signer

            weakness = Signer.weakness(key.get_secret_value().encode())
            if weakness:
                raise ValueError(f"the key {weakness}: set a random one, e.g. `openssl rand -hex "
                                 "32`, the same on encoders and gateways")
        return key


class ModelConfig(Settings):
    """What the encoder and the decoder load, and on what."""

    model: str = Field("", description="checkpoint directory (required by the encoder and the decoder)")
    dtype: Dtype = Field("auto", description=(
        "`auto`: bfloat16 where the CPU (AMX / AVX-512 BF16) or CUDA device multiplies it natively, else "
        "float32 (shared/hardware.py; logged, and shown by `vlsplit health --verbose`); or `float32` / "
        "`bfloat16` / `float16`"))
    device: str = Field("cpu", min_length=1, description="`cpu`, `cuda` or `cuda:N`")
    torch_threads: int = Field(0, ge=0, description=(
        "torch intra-op threads of the one forward at a time; 0 = every CPU this process may use (the affinity "
        "mask, capped by a cgroup CPU quota)"))


class EncoderConfig(ModelConfig, CacheConfig, ServerConfig):
    quantize: Quantize = Field("off", description=(
        "`int8`: the tower's linear weights int8 at load (per output channel)"))
    encoder_backend: EncoderBackend = Field("torch", description=(
        "`torch` (the exact reference) or `openvino`: the tower converted to OpenVINO at first start (`pip "
        "install 'vlsplit[openvino]'`; CPU only); int8 then through nncf"))
    openvino_cache_dir: str = Field("", description=(
        "where the converted OpenVINO IR is kept, keyed by the fingerprint (\"\" = $XDG_CACHE_HOME/vlsplit/"
        "openvino or ~/.cache/vlsplit/openvino); replicas may share it"))
    image_ttl_s: int = Field(3600, ge=1, description="uploaded image bytes kept for Ask(image_id)")
    payload_dtype: PayloadDtype = Field("", description=(
        "dtype of cached/sent payloads; \"\" = the serving dtype (exact)"))
    max_image_bytes: int = Field(32 * MiB, ge=1, description="one image's bytes")
    max_image_pixels: int = Field(8192 * 8192, ge=1, description="one image's width x height (from its header)")
    encode_max_batch: int = Field(8, ge=1, description=(
        "dynamic batching (services/vision_encoder/batcher.py): images per tower forward; 1 = no batching"))
    encode_max_wait_ms: float = Field(20.0, ge=0, description=(
        "how long an image waits for others; 0 = batch only behind a busy tower"))
    encode_max_queue: int = Field(64, ge=1, description=(
        "images waiting for or in a forward; one more -> RESOURCE_EXHAUSTED (the gateway tries another encoder)"))
    encode_max_batch_patches: int = Field(65536, ge=1, description=(
        "vision patches per forward (one max-size Qwen2-VL image); an image over it runs alone"))
    encode_lock_s: float = Field(30.0, ge=0, description=(
        "cross-replica single flight (Redis only): one replica encodes a new image, the others wait for its "
        "cache entry; a holder that dies is replaced after this many seconds. 0 = off"))
    max_video_bytes: int = Field(64 * MiB, ge=1, description=(
        "one clip's bytes (also the gateway's); INVALID_ARGUMENT before the bytes are hashed"))
    max_video_seconds: float = Field(600.0, gt=0, description=(
        "the clip's length (frames counted from its packets / its frame rate)"))
    max_video_source_frames: int = Field(216_000, ge=1, description="frames the container may hold (1 h at 60 fps)")
    max_video_frames: int = Field(768, ge=1, description="frames sampled from one clip")
    max_video_frame_pixels: int = Field(3840 * 2160, ge=1, description=(
        "the clip's own resolution (width x height), checked from the stream header before a frame is decoded"))
    max_video_tokens: int = Field(16384, ge=1, description=(
        "the clip's tokens in a prompt, checked before the tower runs (the gateway also sends the decoder's "
        "context)"))
    max_video_fps: float = Field(8.0, gt=0, description="the highest sampling rate (`fps`) a request may ask for")
    video_decode_timeout_s: float = Field(60.0, gt=0, description=(
        "decoding runs in a worker thread, never in the tower's, and stops past this"))


class EngineConfig(Settings):
    """The decoder engine's KV budget, its scheduler, and the bounds it enforces itself (a request
    past one gets INVALID_ARGUMENT naming it). Also usable alone, by the in-process engine."""

    kv_cache_bytes: int = Field(2048 * MiB, ge=1, description=(
        "the KV block pool, allocated once: running sequences plus cached prefixes (LRU)"))
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    prefix_caching: bool = Field(True, description=(
        "reuse the KV of any earlier prompt sharing a prefix (image, turns, system prompt)"))
    max_batch: int = Field(64, ge=1, description="sequences running at once (decoded together, one token each a step)")
    max_step_tokens: int = Field(2048, ge=1, description=(
        "tokens one step computes (decode rows + prefill chunks); long prompts are prefilled in chunks of this"))
    max_queue: int = Field(64, ge=0, description=(
        "requests waiting for admission; one more: RESOURCE_EXHAUSTED, \"retry with backoff\""))
    max_model_len: int = Field(0, ge=0, description="prompt + max_new_tokens; 0 = the model's max_position_embeddings")
    max_new_tokens_limit: int = Field(4096, ge=1, description="the most new tokens a request may ask for")
    max_images: int = Field(16, ge=0, description="images (and clips) per request")
    max_rows: int = Field(64, ge=1, description="conversations (AskMany questions) per request")
    max_labels: int = Field(64, ge=1, description="labels per Classify check (and response_format choices)")
    max_label_tokens: int = Field(32, ge=1, description="tokens per label")
    max_checks: int = Field(64, ge=1, description="checks per Classify/Moderate request (the gateway's max_questions)")
    max_stop: int = Field(16, ge=0, description="stop strings per request")
    max_stop_chars: int = Field(256, ge=1, description="characters per stop string")
    max_request_blocks: int = Field(0, ge=0, description="KV blocks one request may need; 0 = the whole pool")
    max_schema_bytes: int = Field(64 * 1024, ge=1, description="a response_format JSON schema")
    packed_linear: PackedLinear = Field("all", description=(
        "CPU: weights also pre-packed for oneDNN's small-batch kernels (decode steps 1.3-2.7x faster here): "
        "`all` (layers + LM head; the layers' weights are then held twice, the dense copy serving prefill chunks "
        "of 256+ rows, where MKL is faster), `head` (the LM head only: no extra memory for an untied head), "
        "`off`. Ignored on GPU and where oneDNN cannot pack the dtype (bf16 without AVX-512). In bf16, one-row "
        "calls go to torch.mv or the packed GEMV, whichever the decoder timed faster at load on this CPU"))
    quantize: Quantize = Field("off", description=(
        "`int8`: the decoder layers' linear weights int8 at load (per output channel, symmetric; the embedding "
        "and LM head stay as loaded), half the bytes of bf16; few-row calls (decode) on an int8 kernel, larger "
        "ones on weights dequantized per call"))
    decode_attention: DecodeAttention = Field("gather", description=(
        "decode rows sharing no prefix with other rows: `paged` attends all of them in one flex_attention call "
        "over the KV pool in place (compiled at load: a C++ compiler on CPU); `gather` copies each row's context "
        "and runs SDPA per row; `auto` = paged where it compiles. Engines built in code gather (no compile)"))
    step_stall_s: float = Field(300.0, ge=0, description=(
        "a step running longer than this turns health NOT_SERVING (Kubernetes restarts the pod); 0 = never. A "
        "step is one forward of at most max_step_tokens tokens: seconds on a CPU, so the default leaves room"))


class DecoderConfig(EngineConfig, ModelConfig, ServerConfig):
    decode_attention: DecodeAttention = Field("auto", description=(
        "decode rows sharing no prefix with other rows: `paged` attends all of a step's rows in one "
        "flex_attention call over the KV pool in place, no context copied (compiled by torch.compile at start: "
        "a C++ compiler on CPU, 5-20 s the first time; set TORCHINDUCTOR_CACHE_DIR to a volume to keep it across "
        "restarts); `gather` copies each row's context and runs SDPA per row; `auto` = paged where it compiles, "
        "else gather (logged; `backend` in `vlsplit health --verbose`). Rows over a shared prefix (AskMany, "
        "Moderate) use the cascade either way"))
    default_max_new_tokens: int = Field(64, ge=1, description="new tokens of a request that asks for no number")
    max_payload_bytes: int = Field(0, ge=0, description=(
        "one request's payloads; 0 = the largest image's float32 payload (>= 512 MiB)"))
    max_receiving_bytes: int = Field(0, ge=0, description=(
        "payload bytes of all calls in progress together; 0 = 4 x max_payload_bytes"))
    stream_idle_s: float = Field(30.0, gt=0, description=(
        "a call whose header or next payload chunk is this late is dropped (DEADLINE_EXCEEDED)"))
    payload_wait_s: float = Field(600.0, gt=0, description=(
        "after need_payload, how long the client may take to fetch (or encode) the payloads"))

    @model_validator(mode="after")
    def _fits(self) -> DecoderConfig:
        if self.max_step_tokens < self.max_batch:
            raise ValueError(f"{PREFIX}MAX_STEP_TOKENS={self.max_step_tokens} must be >= {PREFIX}MAX_BATCH="
                             f"{self.max_batch} (every running sequence decodes one token a step)")
        _check_default_tokens(self.default_max_new_tokens, self.max_new_tokens_limit)
        return self


class GatewayConfig(CacheConfig, ServerConfig):
    encoder: str = Field("127.0.0.1:50052", min_length=1, description=(
        "encoder replicas, as `decoder`: each encode goes to the serving one with the fewest in flight"))
    decoder: str = Field("127.0.0.1:50053", min_length=1, description=(
        "decoder replicas: host:port[,host:port...]; a name (or dns:///name:port) resolving to several "
        "addresses is one replica per address. Questions about one image go to one replica"))
    decoder_resolve_s: float = Field(30.0, gt=0, description="decoder and encoder names are resolved again this often")
    replica_down_s: float = Field(5.0, ge=0, validation_alias=AliasChoices(
        PREFIX + "REPLICA_DOWN_S", PREFIX + "DECODER_DOWN_S"), description=(
        "a decoder or encoder replica found unreachable is tried last for this long (was VLSPLIT_DECODER_DOWN_S, "
        "still read, with a warning)"))
    upstream_tls_ca: str = Field("", description="TLS to encoders and decoders: their CA (PEM path)")
    upstream_tls_cert: str = Field("", description="this gateway's client certificate for mutual TLS (PEM path)")
    upstream_tls_key: str = Field("", description="its key (PEM path)")
    upstream_tls_server_name: str = Field("", description=(
        "the name in their certificates when they are dialled by IP (default: the host name in --encoder / "
        "--decoder)"))
    max_image_bytes: int = Field(32 * MiB, ge=1, description="one image's bytes (the gRPC message limit is this + 1 MiB)")
    max_question_chars: int = Field(8192, ge=1, description="one question's characters")
    max_questions: int = Field(64, ge=1, description="questions per AskMany, checks per Moderate")
    max_messages: int = Field(256, ge=1, description="Chat / the OpenAI endpoint: messages per conversation")
    max_images: int = Field(16, ge=0, description="images and clips per conversation")
    max_chat_chars: int = Field(65536, ge=1, description="text characters per conversation")
    max_choices: int = Field(16, ge=1, description="answers per call (n)")
    max_request_image_bytes: int = Field(64 * MiB, ge=0, description=(
        "the image bytes of one request, all its images together (data: URLs, remote fetches, Chat's image data)"))
    max_payload_bytes_in_flight: int = Field(0, ge=0, description=(
        "embedding payload bytes the gateway holds for requests in progress; a request that would pass it is "
        "refused with RESOURCE_EXHAUSTED (retry later). 0 = 4 x the decoders' advertised max_payload_bytes"))
    max_stop: int = Field(16, ge=0, description=(
        "stop strings per request, checked before any image is encoded (the decoder has its own)"))
    max_video_bytes: int = Field(64 * MiB, ge=1, description=(
        "one clip's bytes (the encoder bounds its length, frames, resolution and tokens)"))
    http_port: int = Field(-1, ge=-1, le=65535, description=(
        "the OpenAI-compatible API and web page (services/gateway/http.py): -1 = off, 0 = a free port"))
    served_model_name: str = Field("", description=(
        "the model's name in /v1/models and requests; \"\" = its model_type (e.g. qwen2_vl)"))
    max_http_body_bytes: int = Field(48 * MiB, ge=1, description=(
        "an HTTP request body (a 32 MiB image is ~43 MiB as a base64 data: URL)"))
    remote_images: bool = Field(False, description="fetch https:// image URLs (public addresses only, no redirects)")
    remote_image_timeout_s: float = Field(10.0, gt=0, description=(
        "a remote fetch's resolution, connection and body together"))
    default_max_new_tokens: int = Field(64, ge=1, description="new tokens of a request that asks for no number")
    max_new_tokens_limit: int = Field(4096, ge=1, description="checked here too, before any image is encoded")
    deadline_s: float = Field(120.0, gt=0, description="default deadline when the client sets none")
    retry_attempts: int = Field(5, ge=2, le=5, description=(
        "attempts per hop for UNAVAILABLE, the first included (gRPC's retry policy takes 2 to 5)"))
    migration_limit: int = Field(1, ge=0, description=(
        "times an answer moves to another decoder after its decoder died mid-answer"))
    auth_tokens: str = Field("", description=(
        "client authentication (services/gateway/auth.py): a file of name:sha256(token)[:scopes[:rps[:images]]] "
        "lines, reloaded when it changes; \"\" = off (anyone may call)"))
    auth_requests_per_s: float = Field(50.0, ge=0, description=(
        "requests/s of a client whose token line sets none; 0 = unlimited"))
    auth_images_per_day: int = Field(0, ge=0, description=(
        "images/day of a client whose token line sets none; 0 = unlimited (with auth on: a warning at start, a "
        "client could flush the cache)"))
    auth_rate_scope: Literal["replica", "cluster"] = Field("replica", description=(
        "`replica`: each gateway limits a client's requests_per_s alone (N replicas admit N times it); "
        "`cluster`: one bucket per client in Redis, shared by every replica (needs redis_url; Redis failing: "
        "each replica alone, logged)"))
    metrics_label_limit: int = Field(100, ge=1, description=(
        "distinct clients / replicas one labelled metric keeps (Prometheus series); later ones count as `other`"))
    cache_scope: Literal["tenant", "global"] = Field("tenant", description=(
        "with auth on, an image belongs to the client that sent it (`tenant`: another client's id is NOT_FOUND, "
        "nothing is shared or timed across clients); `global` shares images and cache entries between clients"))

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        if self.auth_rate_scope == "cluster" and self.redis_url == "memory":
            raise ValueError(f"{PREFIX}AUTH_RATE_SCOPE=cluster shares rates through Redis: set {PREFIX}REDIS_URL")
        _check_default_tokens(self.default_max_new_tokens, self.max_new_tokens_limit)
        return self


SERVICES: dict[str, type[Settings]] = {"encoder": EncoderConfig, "decoder": DecoderConfig, "gateway": GatewayConfig}


def _check_default_tokens(default: int, limit: int) -> None:
    if default > limit:
        raise ValueError(f"{PREFIX}DEFAULT_MAX_NEW_TOKENS={default} must be <= {PREFIX}MAX_NEW_TOKENS_LIMIT={limit}")


def load(cls: type, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
    """Build `cls` from defaults <- VLSPLIT_* environment <- non-None `overrides` (CLI flags); a bad value
    raises ConfigError naming it. Deprecated names and likely typos of known ones are logged."""
    environ = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _warn_about_names(environ)
    token = _environ.set(environ)
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError("; ".join(_message(error, cls, overrides, environ) for error in exc.errors())) from None
    finally:
        _environ.reset(token)


def replace(config: Settings, **changes) -> Settings:
    """`config` with `changes` (as dataclasses.replace: an unknown name is a TypeError)."""
    unknown = sorted(set(changes) - set(type(config).model_fields))
    if unknown:
        raise TypeError(f"{type(config).__name__} has no setting {unknown[0]!r}")
    return config.model_copy(update=changes)


def env_names(cls: type[Settings]) -> dict[str, str]:
    """Every environment variable `cls` reads -> its field (deprecated aliases included)."""
    names = {}
    for name, field in cls.model_fields.items():
        aliases = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
        for env in [PREFIX + name.upper(), *aliases]:
            names[env] = name
    return names


def deprecated_names(cls: type[Settings]) -> dict[str, str]:
    """Old environment variable -> the one that replaced it (the later choices of a field's AliasChoices)."""
    return {old: PREFIX + name.upper() for old, name in env_names(cls).items() if old != PREFIX + name.upper()}


def settings(config: Settings) -> list[tuple[str, Any, str]]:
    """(environment variable, value as shown, description) of every setting, secrets masked."""
    return [(PREFIX + name.upper(), shown(getattr(config, name)), field.description or "")
            for name, field in type(config).model_fields.items()]


def shown(value: Any) -> Any:
    """A value as `vlsplit config` shows it: secrets as ********** when set, passwords out of URLs."""
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            return value.replace(f":{parts.password}@", ":**********@", 1)
    return value


def _message(error: dict, cls: type, overrides: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """One pydantic error as `VLSPLIT_NAME=value: why` (`name=value (a command-line flag): why` for a flag)."""
    if not error["loc"]:  # a model validator: its message names the settings
        return str(error.get("ctx", {}).get("error", error["msg"]))
    names = env_names(cls)
    field = names.get(str(error["loc"][0]).upper(), str(error["loc"][0]))
    secret = field in cls.model_fields and cls.model_fields[field].annotation is SecretStr
    value = "**********" if secret else shown(error["input"])
    if field in overrides:
        where = f"{field}={value} (a command-line flag)"
    else:
        upper = {k.upper() for k in environ}
        env = next((e for e, f in names.items() if f == field and e in upper), PREFIX + field.upper())
        where = f"{env}={value}"
    return f"{where}: {_why(error)}"


def _why(error: dict) -> str:
    ctx, kind = error.get("ctx", {}), error["type"]
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
              "less_than": "< {lt}"}
    if kind in bounds:
        return "must be " + bounds[kind].format(**{k: _number(v) for k, v in ctx.items()})
    if kind == "literal_error":
        return "expected one of " + ctx["expected"].replace("'", "").replace(" or ", ", ")
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "expected a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "expected a number"
    if kind in ("bool_parsing", "bool_type"):
        return "expected true or false"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"]


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _warn_about_names(environ: Mapping[str, str]) -> None:
    known: dict[str, str] = {}
    deprecated: dict[str, str] = {}
    for cls in SERVICES.values():
        known.update(env_names(cls))
        deprecated.update(deprecated_names(cls))
    for name in sorted(n.upper() for n in environ if n.upper().startswith(PREFIX)):
        if name in deprecated:
            log.warning("%s is deprecated: use %s", name, deprecated[name])
        elif name not in known and name not in OTHER_NAMES:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.85)
            if close:
                log.warning("%s is not a setting (ignored): did you mean %s?", name, close[0])


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


__all__ = ["ConfigError", "DecoderConfig", "EncoderConfig", "EngineConfig", "GatewayConfig", "MiB", "PREFIX",
           "SERVICES", "ServerConfig", "cache_dir", "env_get", "env_names", "load", "openvino_cache_dir", "replace",
           "settings"]
