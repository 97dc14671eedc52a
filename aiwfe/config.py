"""Typed settings: one YAML file whose blocks mirror the seed design, `${ENV}` interpolation,
and `AIWFE_<BLOCK>__<KEY>=value` environment overrides. Built once at start-up.

The seed's values are the defaults and are requirements: change them in the YAML, not here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "AIWFE_"
CONFIG_ENV = "AIWFE_CONFIG"
# Well-known variables accepted as they are named in the seed and the README.
ENV_ALIASES = {
    "AIWFE_HOME": "home",
    "JWT_SECRET_KEY": "authentication.jwt.secret_key",
    "AIWFE_INTERNAL_SECRET_KEY": "authentication.internal.secret_key",
    "AIWFE_ADMIN_USERNAME": "authentication.admin.username",
    "AIWFE_ADMIN_PASSWORD": "authentication.admin.password",
}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """Invalid or missing configuration; the message names the offending key."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- authentication (seed) -------------------------------------------------------------


class JwtSettings(_Block):
    secret_key: str | None = Field(default=None, repr=False)
    algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    expire_hours: float = Field(default=24, gt=0)
    refresh_expire_days: float = Field(default=30, gt=0)
    issuer: str = "aiwfe"
    audience: str = "aiwfe-api"
    leeway_seconds: float = Field(default=30, ge=0, le=300)
    key_id: str = "k1"

    @field_validator("secret_key")
    @classmethod
    def _strong_enough(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) < 32:
            raise ValueError(
                "must be at least 32 bytes (HS256 keys shorter than the hash are weak)"
            )
        return v


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
    internal: InternalIdentitySettings = InternalIdentitySettings()
    admin: BootstrapAdminSettings = BootstrapAdminSettings()
    password_policy: PasswordPolicySettings = PasswordPolicySettings()
    enabled: bool = True  # only the benchmark's "auth off" scenario turns this off


# --- rbac (seed) ------------------------------------------------------------------------


class RoleSettings(_Block):
    permissions: tuple[str, ...] = ()


class RbacMiddlewareSettings(_Block):
    cache_permissions: bool = True
    cache_ttl: int = Field(default=600, gt=0)


def _seed_roles() -> dict[str, RoleSettings]:
    return {
        "admin": RoleSettings(permissions=("api:*", "cognitive:*", "data:*", "system:*")),
        "user": RoleSettings(permissions=("api:read", "api:workflow:*", "cognitive:inference")),
        "readonly": RoleSettings(permissions=("api:read",)),
    }


class RbacSettings(_Block):
    roles: dict[str, RoleSettings] = Field(default_factory=_seed_roles)
    middleware: RbacMiddlewareSettings = RbacMiddlewareSettings()


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


class PgBouncerSettings(_Block):
    pool_mode: Literal["transaction", "session", "statement"] = "transaction"
    default_pool_size: int = 20
    reserve_pool_size: int = 5
    max_client_conn: int = 200


class ConnectionStrategySettings(_Block):
    primary_read_write: str = "postgres:5432"
    connection_pooling: str = "pgbouncer:6432"
    health_check_interval: float = Field(default=30, gt=0)


class DatabaseSettings(_Block):
    postgres: PostgresSettings = PostgresSettings()
    pgbouncer: PgBouncerSettings = PgBouncerSettings()
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
    api_cache: CacheStrategy = CacheStrategy(ttl=300, key_pattern="api:{endpoint}:{params_hash}")
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
    payload_index: bool = True
    quantization_enabled: bool = True
    hnsw_config: HnswSettings = HnswSettings()


class QdrantConnectionSettings(_Block):
    timeout: float = 30
    retry_attempts: int = 3
    connection_pool_size: int = 10


class QdrantSettings(_Block):
    url: str | None = None  # a Qdrant server; unset = Qdrant's engine in process
    api_key: str | None = Field(default=None, repr=False)
    path: str | None = None  # embedded engine data dir; default <home>/qdrant
    collection_config: CollectionConfigSettings = CollectionConfigSettings()
    performance: QdrantPerformanceSettings = QdrantPerformanceSettings()
    connection: QdrantConnectionSettings = QdrantConnectionSettings()


# --- services and transport -------------------------------------------------------------


class ServiceEndpoint(_Block):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ServicesSettings(_Block):
    gateway: ServiceEndpoint = ServiceEndpoint(port=50051)
    cognitive: ServiceEndpoint = ServiceEndpoint(port=50052)
    taskproc: ServiceEndpoint = ServiceEndpoint(port=50053)
    dataplatform: ServiceEndpoint = ServiceEndpoint(port=50054)


class GrpcSettings(_Block):
    """Transport limits and the seed's keepalive options for inter-service channels."""

    keepalive_time_ms: int = 30000
    keepalive_timeout_ms: int = 5000
    keepalive_permit_without_calls: bool = True
    http2_max_pings_without_data: int = 0
    http2_min_time_between_pings_ms: int = 10000
    http2_min_ping_interval_without_data_ms: int = 300000
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0, le=64 * 1024 * 1024)
    max_concurrent_streams: int = Field(default=1000, gt=0)
    default_deadline_seconds: float = Field(default=30, gt=0)
    stream_deadline_seconds: float = Field(default=3600, gt=0)
    shutdown_grace_seconds: float = Field(default=10, ge=0)
    retry_max_attempts: int = Field(default=3, ge=1, le=5)


class CircuitBreakerSettings(_Block):
    failure_threshold: int = Field(default=5, gt=0)
    timeout: float = Field(default=60, gt=0)


class CognitiveSettings(_Block):
    embedding_dimension: int = Field(default=768, gt=0, le=8192)
    max_texts: int = Field(default=256, gt=0)
    max_text_chars: int = Field(default=32768, gt=0)
    memory_cache_entries: int = Field(default=1000, ge=0)
    memory_cache_ttl: int = Field(default=300, gt=0)


class LoggingSettings(_Block):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = True


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
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    cognitive: CognitiveSettings = CognitiveSettings()
    logging: LoggingSettings = LoggingSettings()

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
