# Over 600 lines on purpose: the whole settings tree in one place, block by block as in
# the YAML, so a key's default, bounds and cross-field checks are found by its path.
"""Typed settings: one YAML file whose blocks mirror the seed design, `${ENV}` interpolation,
and `AIWFE_<BLOCK>__<KEY>=value` environment overrides. Built once at start-up.

The seed's values are the defaults and are requirements: change them in the YAML, not here.

Over 600 lines on purpose: the one settings model, every block and its checks side by side
(split by block, a key's default and its cross-field check would live apart).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

# From the SDK: client channel defaults (one source) and the suite's one ConfigError.
from aiwfe.sdk.channel import DEFAULT_TUNING as _CLIENT
from aiwfe.sdk.channel import ConfigError as ConfigError

ENV_PREFIX = "AIWFE_"
CONFIG_ENV = "AIWFE_CONFIG"
# Set by `aiwfe up` on each of a service's `processes`: which one this is (0 when unset).
PROCESS_INDEX_ENV = "AIWFE_PROCESS_INDEX"
# Well-known variables accepted as they are named in the seed and the README.
ENV_ALIASES = {
    "AIWFE_HOME": "home",
    "JWT_SECRET_KEY": "authentication.jwt.secret_key",
    "AIWFE_INTERNAL_SECRET_KEY": "authentication.internal.secret_key",
    "AIWFE_ADMIN_USERNAME": "authentication.admin.username",
    "AIWFE_ADMIN_PASSWORD": "authentication.admin.password",
}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# Keys that were accepted once but never read, and why they went: setting one is an error
# at start-up that says so, never silently ignored.
REMOVED_KEYS = {
    "rbac.middleware": "permissions come from the role table in memory; nothing to cache",
    "database.pgbouncer": "aiwfe does not run PgBouncer: set its pool in PgBouncer's config",
    "database.connection_strategy.primary_read_write": "database.postgres.dsn is the one"
    " connection string",
    "database.connection_strategy.connection_pooling": "database.postgres.dsn is the one"
    " connection string (point it at PgBouncer to pool)",
    "qdrant.performance.payload_index": "a collection's indexed_fields choose its payload"
    " indexes (none listed, none built)",
    "redis.cache_strategies.api_cache": "response cache TTLs are declared per method in the"
    " contract (cache_ttl_seconds)",
}


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- authentication (seed) -------------------------------------------------------------


class JwtKeySettings(_Block):
    """One extra HMAC verification key (rotation: several kids are valid at once)."""

    kid: str = Field(min_length=1, max_length=64)
    secret_key: str = Field(repr=False)
    algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"

    @field_validator("secret_key")
    @classmethod
    def _strong_enough(cls, v: str) -> str:
        if len(v.encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return v


class JwtSettings(_Block):
    secret_key: str | None = Field(default=None, repr=False)
    algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    expire_hours: float = Field(default=24, gt=0)
    refresh_expire_days: float = Field(default=30, gt=0)
    issuer: str = "aiwfe"
    audience: str = "aiwfe-api"
    leeway_seconds: float = Field(default=30, ge=0, le=300)
    key_id: str = "k1"  # the kid of secret_key (the default key)
    keys: tuple[JwtKeySettings, ...] = ()  # more verification keys, each pinned to its algorithm
    signing_key_id: str | None = None  # kid that signs new tokens; default key_id
    jwks_file: str | None = None  # RS256/EdDSA public keys (JWKS JSON) of an external issuer
    jwks_url: str | None = None
    # An unknown kid refetches jwks_url at most once per this many seconds.
    jwks_refetch_interval: float = Field(default=300, gt=0)

    @field_validator("secret_key")
    @classmethod
    def _strong_enough(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) < 32:
            raise ValueError(
                "must be at least 32 bytes (HS256 keys shorter than the hash are weak)"
            )
        return v

    @model_validator(mode="after")
    def _kids_resolve(self) -> JwtSettings:
        kids = [self.key_id, *(k.kid for k in self.keys)]
        duplicate = next((k for i, k in enumerate(kids) if k in kids[:i]), None)
        if duplicate is not None:
            raise ValueError(f"keys: duplicate kid {duplicate!r}")
        signing = self.signing_key_id or self.key_id
        if signing not in kids:
            raise ValueError(f"signing_key_id: no key with kid {signing!r}")
        return self


class ValidationCacheSettings(_Block):
    cache_enabled: bool = True
    cache_ttl: int = Field(default=300, gt=0)
    cache_max_entries: int = Field(default=100_000, gt=0)
    redis_key_prefix: str = "jwt_cache:"


class RateLimitSettings(_Block):
    login_attempts: int = Field(default=5, gt=0)
    login_window: int = Field(default=300, gt=0)
    login_attempts_per_address: int = Field(default=20, gt=0)
    api_requests: int = Field(default=100, gt=0)
    api_window: int = Field(default=60, gt=0)
    # Per-role API limits; a user gets the most generous of its roles (default api_requests).
    api_requests_per_role: dict[str, PositiveInt] = Field(default_factory=dict)
    # The most quota one gateway replica reserves from Redis per round trip, beyond the
    # calls waiting for it (the relay's fast path spends it without a round trip).
    api_reserve_batch: int = Field(default=10, gt=0, le=1000)
    # How long such reserved quota may be spent; the rest goes back to Redis (capped at
    # a twentieth of api_window).
    api_reserve_lease_ms: int = Field(default=500, gt=0, le=60_000)
    # A password check counts as in flight for at most this long (a crashed replica's
    # checks stop holding the per-username and per-address slots after it).
    login_check_hold: int = Field(default=15, gt=0)


class RevocationSettings(_Block):
    """How revocations reach every gateway replica (push, with a database poll as fallback)."""

    channel: str = "auth:revocations"  # Redis pub/sub channel (under redis.key_prefix)
    poll_interval_seconds: float = Field(default=0.5, gt=0, le=1)  # while the push is down
    reconcile_interval_seconds: float = Field(default=30, gt=0)  # while the push is up


class InternalIdentitySettings(_Block):
    """The gateway-signed assertion that back ends require on every call."""

    secret_key: str | None = Field(default=None, repr=False)
    audience: str = "aiwfe-internal"
    ttl_seconds: int = Field(default=60, gt=0, le=600)

    @field_validator("secret_key")
    @classmethod
    def _strong_enough(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return v


class BootstrapAdminSettings(_Block):
    username: str = "admin"
    password: str | None = Field(default=None, repr=False)


class PasswordPolicySettings(_Block):
    min_length: int = Field(default=12, ge=8)
    max_length: int = Field(default=256, le=4096)


class AuthenticationSettings(_Block):
    jwt: JwtSettings = JwtSettings()
    validation: ValidationCacheSettings = ValidationCacheSettings()
    rate_limiting: RateLimitSettings = RateLimitSettings()
    revocation: RevocationSettings = RevocationSettings()
    internal: InternalIdentitySettings = InternalIdentitySettings()
    admin: BootstrapAdminSettings = BootstrapAdminSettings()
    password_policy: PasswordPolicySettings = PasswordPolicySettings()
    enabled: bool = True  # only the benchmark's "auth off" scenario turns this off


# --- rbac (seed) ------------------------------------------------------------------------


class RoleSettings(_Block):
    permissions: tuple[str, ...] = ()


def _seed_roles() -> dict[str, RoleSettings]:
    return {
        "admin": RoleSettings(permissions=("api:*", "cognitive:*", "data:*", "system:*")),
        "user": RoleSettings(permissions=("api:read", "api:workflow:*", "cognitive:inference")),
        "readonly": RoleSettings(permissions=("api:read",)),
        # External workers: poll and serve any task queue (issue #19), nothing else.
        "worker": RoleSettings(permissions=("worker:queue:*",)),
    }


class RbacSettings(_Block):
    roles: dict[str, RoleSettings] = Field(default_factory=_seed_roles)


# --- database (seed) --------------------------------------------------------------------


class PostgresSettings(_Block):
    dsn: str | None = Field(default=None, repr=False)
    max_connections: int = Field(default=200, gt=0)
    pool_size: int = Field(default=20, gt=0)
    max_overflow: int = Field(default=30, ge=0)
    pool_timeout: float = Field(default=30, gt=0)
    pool_recycle: float = Field(default=3600, gt=0)
    # None disables server-side prepared statements: required through PgBouncer's
    # transaction pooling (PgBouncer < 1.21), which is how production runs.
    prepare_threshold: int | None = None
    # A call in flight this long makes dataplatform probe PostgreSQL (SELECT 1 on a
    # connection of its own, `stall_probe_timeout` s); if it does not answer, every call in
    # flight ends UNAVAILABLE at once instead of at its deadline.
    stall_probe_after: float = Field(default=0.25, gt=0)
    stall_probe_timeout: float = Field(default=0.5, gt=0)


class ConnectionStrategySettings(_Block):
    health_check_interval: float = Field(default=30, gt=0)


class DatabaseSettings(_Block):
    postgres: PostgresSettings = PostgresSettings()
    connection_strategy: ConnectionStrategySettings = ConnectionStrategySettings()


# --- redis (seed) -----------------------------------------------------------------------


class RedisPoolSettings(_Block):
    max_connections: int = Field(default=20, gt=0)
    retry_on_timeout: bool = True
    health_check_interval: int = Field(default=60, ge=0)
    socket_timeout: float = Field(default=0.5, gt=0)


class CacheStrategy(_Block):
    ttl: int = Field(gt=0)
    key_pattern: str


class CacheStrategies(_Block):
    session_cache: CacheStrategy = CacheStrategy(ttl=3600, key_pattern="session:{token}")
    cognitive_cache: CacheStrategy = CacheStrategy(
        ttl=1800, key_pattern="cognitive:{service}:{input_hash}"
    )


class RedisSettings(_Block):
    url: str | None = Field(default=None, repr=False)
    key_prefix: str = ""  # namespaces every key (tests and shared Redis servers)
    connection_pool: RedisPoolSettings = RedisPoolSettings()
    cache_strategies: CacheStrategies = CacheStrategies()


# --- qdrant (seed) ----------------------------------------------------------------------


class VectorsSettings(_Block):
    size: int = Field(default=768, gt=0, le=65536)
    distance: Literal["Cosine", "Dot", "Euclid"] = "Cosine"


class CollectionConfigSettings(_Block):
    vectors: VectorsSettings = VectorsSettings()


class HnswSettings(_Block):
    m: int = 16
    ef_construct: int = 100


class QdrantPerformanceSettings(_Block):
    quantization_enabled: bool = True
    hnsw_config: HnswSettings = HnswSettings()
    # Float32 originals on disk (mmap), read only to rescore; the int8 copies stay in RAM.
    vectors_on_disk: bool = True
    # Search-time HNSW candidate list; null = the engine's default (ef_construct). 200: at
    # 1M x 768 recall@10 is 0.88 with ef 100 and 0.97 with 200 (README, "Vectors at a million").
    hnsw_ef: int | None = Field(default=200, gt=0)
    # int8 candidates fetched per requested hit before rescoring on the originals.
    oversampling: float = Field(default=2.0, ge=1)
    # Embedded engine, originals on disk: every this many searches of a collection, the
    # originals' pages this process mapped meanwhile go back to the page cache, so its RSS
    # does not grow with every distinct query (null: never; README, "Vectors at a million").
    release_originals_every: int | None = Field(default=256, gt=0)


class QdrantConnectionSettings(_Block):
    timeout: float = 30
    retry_attempts: int = 3
    connection_pool_size: int = 10


class QdrantSettings(_Block):
    url: str | None = None  # a Qdrant server; unset = Qdrant's embedded engine
    api_key: str | None = Field(default=None, repr=False)
    path: str | None = None  # embedded engine data dir; default <home>/qdrant
    # The embedded engine in a child process of its own: its calls hold the GIL (a shard's
    # load for seconds), which would stall every other RPC of the data platform meanwhile.
    engine_process: bool = True
    collection_config: CollectionConfigSettings = CollectionConfigSettings()
    performance: QdrantPerformanceSettings = QdrantPerformanceSettings()
    connection: QdrantConnectionSettings = QdrantConnectionSettings()


# --- services and transport -------------------------------------------------------------


class ServiceEndpoint(_Block):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # `aiwfe up` runs this many processes of the service, all listening on `port` with
    # SO_REUSEPORT (the kernel spreads connections over them); one core each at most.
    processes: int = Field(default=1, ge=1, le=256)

    @model_validator(mode="after")
    def _shared_port_is_fixed(self) -> ServiceEndpoint:
        if self.processes > 1 and self.port == 0:
            raise ValueError("processes > 1 need a fixed port (0 would give each its own)")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ServicesSettings(_Block):
    # metrics_port: the Prometheus scrape endpoint of each service process (null disables).
    gateway: ServiceEndpoint = ServiceEndpoint(port=50051, metrics_port=9464)
    cognitive: ServiceEndpoint = ServiceEndpoint(port=50052, metrics_port=9465)
    taskproc: ServiceEndpoint = ServiceEndpoint(port=50053, metrics_port=9466)
    dataplatform: ServiceEndpoint = ServiceEndpoint(port=50054, metrics_port=9467)


class GrpcSettings(_Block):
    """Transport limits, the seed's keepalive options for inter-service channels, and the
    servers' enforcement of their clients' keepalive pings."""

    event_loop: Literal["uvloop", "asyncio"] = "uvloop"  # uvloop measured faster (benchmarks)
    # Client channels' keepalive: the SDK's defaults (aiwfe/sdk/channel.py), one source.
    keepalive_time_ms: int = _CLIENT.keepalive_time_ms
    keepalive_timeout_ms: int = _CLIENT.keepalive_timeout_ms
    keepalive_permit_without_calls: bool = _CLIENT.keepalive_permit_without_calls
    http2_max_pings_without_data: int = _CLIENT.http2_max_pings_without_data
    http2_min_time_between_pings_ms: int = _CLIENT.http2_min_time_between_pings_ms
    http2_min_ping_interval_without_data_ms: int = _CLIENT.http2_min_ping_interval_without_data_ms
    # Servers: a client may ping this often, with or without calls in flight (ours every
    # keepalive_time_ms, grpc-js users often every 10 s); pinging more often earns a strike,
    # and more than server_max_ping_strikes in a row a GOAWAY too_many_pings.
    server_min_ping_interval_ms: int = Field(default=5000, ge=0)
    server_max_ping_strikes: int = Field(default=2, ge=0)
    max_message_bytes: int = Field(default=_CLIENT.max_message_bytes, gt=0, le=64 * 1024 * 1024)
    max_concurrent_streams: int = Field(default=1000, gt=0)
    default_deadline_seconds: float = Field(default=30, gt=0)
    stream_deadline_seconds: float = Field(default=3600, gt=0)
    shutdown_grace_seconds: float = Field(default=10, ge=0)
    retry_max_attempts: int = Field(default=3, ge=1, le=5)

    @model_validator(mode="after")
    def _pings_permitted(self) -> GrpcSettings:
        if self.server_min_ping_interval_ms > self.keepalive_time_ms:
            raise ValueError(
                "server_min_ping_interval_ms must not exceed keepalive_time_ms: servers"
                " would answer the suite's own keepalive pings with GOAWAY too_many_pings"
            )
        return self


class TlsSettings(_Block):
    """TLS for the server port (cert + key) and for inter-service channels (ca_file).

    client_ca_file turns on mTLS for the server (clients must present a certificate it
    signed); client_cert_file/client_key_file are what this service presents as a client.
    """

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        for cert, key in (("cert_file", "key_file"), ("client_cert_file", "client_key_file")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                missing = key if getattr(self, cert) else cert
                raise ValueError(f"{missing} is required together with {cert}/{key}")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file (mTLS) needs cert_file and key_file")
        return self

    @property
    def server_enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)

    @property
    def channel_enabled(self) -> bool:
        return bool(self.ca_file)


class CircuitBreakerSettings(_Block):
    failure_threshold: int = Field(default=5, gt=0)
    timeout: float = Field(default=60, gt=0)


class LoadSheddingSettings(_Block):
    """Each service's bound on the unary calls it works on at once
    (aiwfe/runtime/resilience/limiter.py), and the gateway relay's, per back end, on the
    unary calls it sends straight there.

    Calls over the limit are refused at once with RESOURCE_EXHAUSTED + RetryInfo; streams,
    health and reflection are never counted. The limit adapts between min_limit and
    max_limit to keep latency within `tolerance` times its no-load value and under
    `target_latency_seconds`, the no-load latency being re-measured at min_limit (at most
    every `probe_interval_seconds`, and only while the limit refuses calls at a latency
    over what it allows); `fixed_limit` pins it instead.
    """

    enabled: bool = True
    initial_limit: int = Field(default=256, gt=0)
    min_limit: int = Field(default=8, gt=0)
    max_limit: int = Field(default=1024, gt=0)
    fixed_limit: int | None = Field(default=None, gt=0)
    tolerance: float = Field(default=2.0, ge=1)
    latency_floor_seconds: float = Field(default=0.05, ge=0)
    target_latency_seconds: float = Field(default=0.25, gt=0)
    window_seconds: float = Field(default=0.1, gt=0, le=10)
    min_window_samples: int = Field(default=10, gt=0)
    smoothing: float = Field(default=0.2, gt=0, le=1)
    probe_interval_seconds: float = Field(default=10, gt=0)
    min_retry_after_seconds: float = Field(default=0.05, ge=0, le=10)
    max_retry_after_seconds: float = Field(default=5, gt=0, le=60)

    @model_validator(mode="after")
    def _ordered(self) -> LoadSheddingSettings:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("needs min_limit <= initial_limit <= max_limit")
        if self.min_retry_after_seconds > self.max_retry_after_seconds:
            raise ValueError("needs min_retry_after_seconds <= max_retry_after_seconds")
        return self


class EmbeddingBackendSettings(_Block):
    """One embedding backend: ONNX model, built-in hashing, local path, Ollama, OpenAI.

    `kind` is checked against the backends registered in `cognitive/registry.py` at start-up.
    """

    kind: str
    url: str | None = None  # ollama/openai: server base URL, e.g. http://localhost:11434
    # onnx: a catalogue name (cognitive/model_store.py); ollama/openai: the model to ask for
    model: str | None = None
    api_key: str | None = Field(default=None, repr=False)  # openai: Bearer token
    # http: expected length; onnx: must equal the model's (checked when it loads)
    dimension: int | None = Field(default=None, gt=0, le=65536)
    timeout: float = Field(default=30, gt=0)  # per HTTP call, capped by the caller's deadline
    # onnx: a directory already holding the model's files (air-gapped installs; no download)
    path: str | None = None
    # onnx: a base URL serving the model's files under their catalogue paths (a mirror)
    mirror: str | None = None
    max_tokens: int = Field(default=256, gt=0, le=8192)  # onnx: longer texts are truncated
    # onnx: threads one inference uses (default: one per core, at most 4); on a busy shared
    # host 1 does more per CPU second, while concurrent calls still spread over the cores
    threads: int | None = Field(default=None, gt=0, le=64)


class GenerationBackendSettings(_Block):
    """One LLM backend reached over HTTP (`kind` checked against the registry at start-up)."""

    kind: str
    url: str
    model: str
    api_key: str | None = Field(default=None, repr=False)
    api: Literal["chat", "generate"] = "chat"  # ollama: /api/chat or /api/generate
    timeout: float = Field(default=120, gt=0)  # per read of a streamed chunk


def _default_embedding_backends() -> dict[str, EmbeddingBackendSettings]:
    return {
        "minilm": EmbeddingBackendSettings(kind="onnx", model="all-MiniLM-L6-v2"),
        "builtin": EmbeddingBackendSettings(kind="builtin"),
    }


class EmbeddingSettings(_Block):
    """The embedding backends; the default is all-MiniLM-L6-v2 on ONNX Runtime.

    An onnx backend's weights are fetched into `<home>/models` on first use when `download`
    is on. When the default's weights cannot be had and `fallback_to_builtin` is on, the
    built-in hashing embedder answers instead (one warning line says so and how to fix it);
    off, the service refuses to start.
    """

    default: str = "minilm"
    backends: dict[str, EmbeddingBackendSettings] = Field(
        default_factory=_default_embedding_backends
    )
    download: bool = True
    fallback_to_builtin: bool = True


class GenerationSettings(_Block):
    default: str | None = None  # unset: the only backend, if exactly one is configured
    backends: dict[str, GenerationBackendSettings] = Field(default_factory=dict)


class CognitiveCacheSettings(_Block):
    # The longest an Embed waits on the persistent (PostgreSQL) cache layer, per lookup and
    # per write; past it the layer is skipped and the call goes on in the background.
    persistent_budget_ms: int = Field(default=50, gt=0)


class CognitiveSettings(_Block):
    embedding_dimension: int = Field(default=768, gt=0, le=8192)
    max_texts: int = Field(default=256, gt=0)
    max_text_chars: int = Field(default=32768, gt=0)
    memory_cache_entries: int = Field(default=1000, ge=0)
    memory_cache_ttl: int = Field(default=300, gt=0)
    max_documents: int = Field(default=256, gt=0)
    max_document_chars: int = Field(default=200_000, gt=0)
    max_chunks_per_call: int = Field(default=4096, gt=0)
    chunk_chars: int = Field(default=1000, ge=100)
    chunk_overlap_chars: int = Field(default=200, ge=0)
    cache: CognitiveCacheSettings = CognitiveCacheSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    generation: GenerationSettings = GenerationSettings()

    @model_validator(mode="after")
    def _overlap_under_half(self) -> CognitiveSettings:
        if self.chunk_overlap_chars * 2 >= self.chunk_chars:
            raise ValueError(
                f"chunk_overlap_chars must be under half of chunk_chars ({self.chunk_chars})"
            )
        return self


class TaskProcSettings(_Block):
    """Workflow workers (taskproc) and the limits on submitted workflows."""

    worker_concurrency: int = Field(default=32, gt=0, le=1024)  # steps run at once per process
    claim_batch: int = Field(default=32, gt=0, le=1000)  # steps leased per ClaimSteps call
    lease_seconds: float = Field(default=30, gt=0, le=3600)
    poll_interval: float = Field(default=0.5, gt=0, le=60)  # fallback when no wake-up arrives
    # Eager dispatch: the submission and the completion that make built-in steps runnable
    # lease them to this process's worker (free slots permitting) and return them, with no
    # wake-up and no ClaimSteps; off: every step waits for a claim.
    eager_dispatch: bool = True
    # A watch re-reads the database at least this often; commits are pushed at once (its own
    # replica's in process, other replicas' through Redis when configured).
    watch_poll_interval: float = Field(default=1.0, ge=0.01, le=30)
    # Watch streams (WatchWorkflow + RunWorkflow) one process serves at once; more are
    # refused with RESOURCE_EXHAUSTED + RetryInfo (metric workflow_watch_streams).
    max_watch_streams: int = Field(default=10_000, gt=0, le=1_000_000)
    # The most database re-reads per second this process's watch streams ask dataplatform
    # for while nothing is pushed: with many streams, each re-reads less often (<= 30 s).
    watch_reads_per_second: float = Field(default=200, gt=0)
    # Streams taskproc opens on one connection to dataplatform (at most
    # grpc.max_concurrent_streams); more streams open more connections, never refused.
    streams_per_connection: int = Field(default=500, gt=0)
    # Watches one WatchWorkflowEventsMany stream carries (taskproc's watches of different
    # workflows, multiplexed): taskproc opens another stream past it, dataplatform refuses
    # a watch beyond it with RESOURCE_EXHAUSTED. At least max_watch_streams' default, so
    # one replica's watches take one stream.
    watches_per_stream: int = Field(default=10_000, gt=0, le=1_000_000)
    # PollTask calls one process holds waiting at once (external workers' long polls); more
    # are refused with RESOURCE_EXHAUSTED + RetryInfo (TASK_POLLS_EXHAUSTED).
    max_task_polls: int = Field(default=4096, gt=0, le=1_000_000)
    max_steps: int = Field(default=100, gt=0, le=1000)
    max_name_chars: int = Field(default=64, gt=0, le=256)
    max_input_bytes: int = Field(default=256 * 1024, gt=0)
    max_output_bytes: int = Field(default=1024 * 1024, gt=0)
    default_step_timeout: float = Field(default=60, gt=0)
    max_step_timeout: float = Field(default=3600, gt=0)
    default_workflow_timeout: float = Field(default=3600, gt=0)
    max_workflow_timeout: float = Field(default=7 * 86400, gt=0)
    max_attempts: int = Field(default=100, gt=0)  # upper bound a retry policy may ask for
    # Fan-out (StepSpec.for_each): the most items one step may run (a longer list fails the
    # step for good, or is refused at submit when it comes from the workflow input), and the
    # highest max_concurrency a step may ask for (its default is 10). Each finished item
    # costs a look at its workflow's pending steps, so the bound stays at most 10,000.
    max_fan_out_items: int = Field(default=1000, gt=0, le=10_000)
    max_fan_out_concurrency: int = Field(default=100, gt=0, le=1000)
    # Schedules (ScheduleService; ticked by dataplatform): a tick due longer ago than
    # schedule_grace_seconds was missed (the suite was down) and follows its schedule's
    # catch-up policy; CATCH_UP_POLICY_ALL runs at most the latest schedule_max_catch_up.
    schedule_grace_seconds: float = Field(default=60, gt=0, le=86400)
    schedule_max_catch_up: int = Field(default=100, gt=0, le=10_000)
    # The ticker's longest sleep between looks for due schedules (it sleeps less when it
    # knows the next tick is sooner): the worst lateness of a tick created on another replica.
    schedule_tick_interval: float = Field(default=0.5, gt=0, le=10)
    # Retention (dataplatform): a workflow finished (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)
    # longer than retention_seconds ago is deleted with its steps, attempts, events and
    # signals (0 keeps every workflow). Every retention_interval seconds each replica deletes
    # batches of at most retention_batch workflows, one short transaction each, until none
    # is left (replicas skip each other's rows).
    retention_seconds: float = Field(default=30 * 86400, ge=0, le=10 * 365 * 86400)
    retention_batch: int = Field(default=100, gt=0, le=10_000)
    retention_interval: float = Field(default=60, ge=0.05, le=3600)


class GatewayHttp2Settings(_Block):
    """The relay's connection management on the public port (gateway/relay.py). Its stream
    limit is grpc.max_concurrent_streams and its keepalive enforcement
    grpc.server_min_ping_interval_ms / server_max_ping_strikes, as on every gRPC server; the
    other grpc.* transport options apply to the gRPC servers and channels, not to this port."""

    max_connections: int = Field(default=10000, gt=0)  # more are answered GOAWAY and closed
    idle_timeout_seconds: float = Field(default=300, gt=0)  # no call in flight this long
    # Buffered bytes per client connection, both directions together (half each way).
    max_buffer_bytes: int = Field(default=8 * 1024 * 1024, ge=256 * 1024)
    # Connections to one back end (each holds as many streams as the back end allows;
    # calls beyond them wait for a stream to end).
    max_upstream_connections: int = Field(default=32, gt=0)


class GatewaySettings(_Block):
    """The gateway's front door."""

    # An HTTP/2 relay on the public port passes the calls it can admit at once straight to
    # their back end and everything else to the gateway's gRPC server (see gateway/front.py).
    # Off: the gRPC server takes the port and proxies every call itself.
    relay: bool = True
    http2: GatewayHttp2Settings = GatewayHttp2Settings()


class LauncherSettings(_Block):
    """How `aiwfe up` supervises its children: a child that dies is restarted after
    `restart_backoff` s, doubling per consecutive restart up to `restart_backoff_max`; a
    child that stayed up `backoff_reset_after` s starts again from `restart_backoff`. More
    than `crash_loop_restarts` restarts of one child within `crash_loop_window` s stop the
    suite, showing the child's last `stderr_lines` lines."""

    restart_backoff: float = Field(default=1.0, gt=0)
    restart_backoff_max: float = Field(default=30.0, gt=0)
    backoff_reset_after: float = Field(default=60.0, gt=0)
    crash_loop_restarts: int = Field(default=5, gt=0)
    crash_loop_window: float = Field(default=60.0, gt=0)
    stderr_lines: int = Field(default=20, gt=0, le=10_000)


class LoggingSettings(_Block):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = True


class TelemetrySettings(_Block):
    """Server spans and RPC metrics; exporters come from the standard OTEL_* variables."""

    enabled: bool = True
    # The background loops (workers' claims, wake-up streams, lease extensions, result
    # batches, task claims, sweeps, revocation polls) run unsampled: they export no spans
    # (their cost shows in metrics). True traces them again.
    trace_polling: bool = False
    # A step attempt starting more than this many seconds after its workflow was submitted
    # gets a new trace linked to the submit's; sooner, its span is the submit's child.
    step_link_after_seconds: float = Field(default=60.0, ge=0)


class Settings(_Block):
    """The whole configuration; every service reads the blocks it needs."""

    home: str = "~/.aiwfe"  # data dir for embedded engines and generated secrets
    authentication: AuthenticationSettings = AuthenticationSettings()
    rbac: RbacSettings = RbacSettings()
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    qdrant: QdrantSettings = QdrantSettings()
    services: ServicesSettings = ServicesSettings()
    grpc: GrpcSettings = GrpcSettings()
    tls: TlsSettings = TlsSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    load_shedding: LoadSheddingSettings = LoadSheddingSettings()
    cognitive: CognitiveSettings = CognitiveSettings()
    taskproc: TaskProcSettings = TaskProcSettings()
    gateway: GatewaySettings = GatewaySettings()
    launcher: LauncherSettings = LauncherSettings()
    logging: LoggingSettings = LoggingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    def require(self, dotted: str) -> Any:
        """Returns the value at a dotted key, or raises ConfigError naming it when unset."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        if value in (None, ""):
            env = ENV_PREFIX + dotted.upper().replace(".", "__")
            raise ConfigError(f"configuration key {dotted!r} is required (YAML or {env})")
        return value


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"configuration key {path!r} references unset environment variable {name}"
        )

    substituted = _INTERPOLATION.sub(repl, value)
    # A whole-value reference to an unset-but-defaulted-empty variable means "unset".
    return None if substituted == "" and _INTERPOLATION.fullmatch(value) else substituted


def _apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, raw in env.items():
        if name in ENV_ALIASES:
            keys = ENV_ALIASES[name].split(".")
        elif name.startswith(ENV_PREFIX) and "__" in name:
            keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        else:
            continue
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = _parse_scalar(raw)


def _parse_scalar(raw: str) -> Any:
    """Env values are YAML scalars or JSON lists/objects, so `AIWFE_X__PORT=5` is an int."""
    if raw.startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return parsed if isinstance(parsed, str | int | float | bool) or parsed is None else raw


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Builds Settings from the YAML file (or $AIWFE_CONFIG), env overrides and overrides.

    Raises:
        ConfigError: naming the first invalid key.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"configuration file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping at the top level")
        data = _interpolate(loaded, env, "")
    _apply_env_overrides(data, env)
    if overrides:
        _deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].replace("Extra inputs are not permitted", "unknown key")
        if err["type"] == "extra_forbidden":
            why = next((w for k, w in REMOVED_KEYS.items() if f"{key}.".startswith(f"{k}.")), None)
            if why:
                msg = f"removed ({why})"
        raise ConfigError(f"invalid configuration key {key!r}: {msg}") from None


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        elif isinstance(value, Mapping):
            base[key] = {}
            _deep_merge(base[key], value)
        else:
            base[key] = value
