"""Settings: the seed's values as defaults, YAML with ${ENV}, env overrides, precise errors."""

from __future__ import annotations

import pytest

from aiwfe.runtime.config import ConfigError, load_settings


def test_defaults_are_the_seed_values() -> None:
    """Without a file, every seed value (TTLs, pools, roles, limits) is the default."""
    s = load_settings(env={})
    a = s.authentication
    assert (a.jwt.algorithm, a.jwt.expire_hours, a.jwt.refresh_expire_days) == ("HS256", 24, 30)
    assert (a.validation.cache_ttl, a.validation.redis_key_prefix) == (300, "jwt_cache:")
    rl = a.rate_limiting
    assert (rl.login_attempts, rl.login_window, rl.api_requests, rl.api_window) == (5, 300, 100, 60)
    assert s.rbac.roles["admin"].permissions == ("api:*", "cognitive:*", "data:*", "system:*")
    assert s.rbac.roles["user"].permissions == ("api:read", "api:workflow:*", "cognitive:inference")
    assert s.rbac.roles["readonly"].permissions == ("api:read",)
    pg = s.database.postgres
    assert (pg.pool_size, pg.max_overflow, pg.pool_timeout, pg.pool_recycle) == (20, 30, 30, 3600)
    assert s.database.connection_strategy.health_check_interval == 30
    pool = s.redis.connection_pool
    assert (pool.max_connections, pool.retry_on_timeout, pool.health_check_interval) == (
        20,
        True,
        60,
    )
    cs = s.redis.cache_strategies
    assert (cs.session_cache.ttl, cs.cognitive_cache.ttl) == (3600, 1800)
    q = s.qdrant
    assert (q.collection_config.vectors.size, q.collection_config.vectors.distance) == (
        768,
        "Cosine",
    )
    assert (q.performance.hnsw_config.m, q.performance.hnsw_config.ef_construct) == (16, 100)
    assert (
        q.connection.timeout,
        q.connection.retry_attempts,
        q.connection.connection_pool_size,
    ) == (
        30,
        3,
        10,
    )
    assert (s.grpc.keepalive_time_ms, s.grpc.keepalive_timeout_ms) == (30000, 5000)
    assert (s.circuit_breaker.failure_threshold, s.circuit_breaker.timeout) == (5, 60)


def test_workflow_language_defaults_are_the_documented_ones() -> None:
    """#20's and the README's defaults: finished workflows kept 30 days, purged 100 at a time;
    fan-outs of at most 1,000 items and at most 100 at once."""
    tp = load_settings(env={}).taskproc
    assert (tp.retention_seconds, tp.retention_batch) == (30 * 86400, 100)
    assert (tp.max_fan_out_items, tp.max_fan_out_concurrency) == (1000, 100)


def test_yaml_with_env_interpolation_and_overrides(tmp_path) -> None:
    """${VAR} and ${VAR:-default} are substituted, then AIWFE_<BLOCK>__<KEY> overrides win."""
    path = tmp_path / "aiwfe.yaml"
    path.write_text(
        "authentication:\n"
        "  jwt:\n"
        "    secret_key: ${JWT_SECRET}\n"
        "    expire_hours: ${HOURS:-12}\n"
        "services:\n"
        "  gateway:\n"
        "    port: 6000\n"
    )
    env = {"JWT_SECRET": "s" * 40, "AIWFE_SERVICES__GATEWAY__PORT": "7000"}
    s = load_settings(path, env=env)
    assert s.authentication.jwt.secret_key == "s" * 40
    assert s.authentication.jwt.expire_hours == 12
    assert s.services.gateway.port == 7000


def test_seed_variable_names_are_accepted() -> None:
    """JWT_SECRET_KEY and AIWFE_ADMIN_PASSWORD work without a config file."""
    s = load_settings(env={"JWT_SECRET_KEY": "k" * 32, "AIWFE_ADMIN_PASSWORD": "p" * 12})
    assert s.authentication.jwt.secret_key == "k" * 32
    assert s.authentication.admin.password == "p" * 12


def test_secrets_do_not_appear_in_repr() -> None:
    """Secret values never show in a settings repr (and so never in a log line)."""
    s = load_settings(env={"JWT_SECRET_KEY": "very-secret-value-" * 3})
    assert "very-secret-value" not in repr(s)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"AIWFE_DATABASE__POSTGRES__POOL_SIZE": "-1"}, "database.postgres.pool_size"),
        ({"AIWFE_SERVICES__GATEWAY__PORT": "http"}, "services.gateway.port"),
        ({"AIWFE_TASKPROC__RETENTION_SECONDS": "-1"}, "taskproc.retention_seconds"),
        ({"AIWFE_TASKPROC__RETENTION_BATCH": "0"}, "taskproc.retention_batch"),
        ({"AIWFE_TASKPROC__RETENTION_INTERVAL": "0"}, "taskproc.retention_interval"),
        ({"AIWFE_RBAC__NO_SUCH_KEY": "1"}, "rbac.no_such_key"),
        ({"JWT_SECRET_KEY": "short"}, "authentication.jwt.secret_key"),
        (
            {"AIWFE_AUTHENTICATION__RATE_LIMITING__API_REQUESTS_PER_ROLE": '{"user": 0}'},
            "authentication.rate_limiting.api_requests_per_role.user",
        ),
    ],
)
def test_invalid_values_name_the_key(env, key) -> None:
    """An invalid or unknown value refuses to load with a message naming its key."""
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert repr(key) in str(err.value)


def test_unset_variable_reference_names_the_key(tmp_path) -> None:
    """A ${VAR} with no value and no default is an error naming the key and the variable."""
    path = tmp_path / "aiwfe.yaml"
    path.write_text("redis:\n  url: ${REDIS_URL}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert "'redis.url'" in str(err.value) and "REDIS_URL" in str(err.value)


def test_required_secret_is_named_when_missing() -> None:
    """require() names the dotted key and its environment variable."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={}).require("authentication.internal.secret_key")
    assert "authentication.internal.secret_key" in str(err.value)
    assert "AIWFE_AUTHENTICATION__INTERNAL__SECRET_KEY" in str(err.value)


def test_shipped_example_config_matches_the_defaults() -> None:
    """deploy/aiwfe.yaml loads and states exactly the built-in (seed) defaults."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "deploy" / "aiwfe.yaml"
    env = {"JWT_SECRET_KEY": "k" * 32, "AIWFE_INTERNAL_SECRET_KEY": "i" * 32}
    shipped = load_settings(path, env=env)
    defaults = load_settings(env=env)
    assert shipped == defaults


@pytest.mark.parametrize(
    ("yaml_text", "key", "why"),
    [
        ("rbac:\n  middleware: {cache_ttl: 60}\n", "rbac.middleware", "role table"),
        ("database:\n  pgbouncer: {pool_mode: session}\n", "database.pgbouncer", "PgBouncer"),
        (
            "database:\n  connection_strategy: {primary_read_write: 'db:5432'}\n",
            "database.connection_strategy.primary_read_write",
            "database.postgres.dsn",
        ),
        (
            "database:\n  connection_strategy: {connection_pooling: 'pgb:6432'}\n",
            "database.connection_strategy.connection_pooling",
            "database.postgres.dsn",
        ),
        (
            "redis:\n  cache_strategies:\n    api_cache: {ttl: 5, key_pattern: x}\n",
            "redis.cache_strategies.api_cache",
            "cache_ttl_seconds",
        ),
        (
            "qdrant:\n  performance: {payload_index: false}\n",
            "qdrant.performance.payload_index",
            "indexed_fields",
        ),
    ],
)
def test_a_removed_key_is_a_start_up_error_saying_why(tmp_path, yaml_text, key, why) -> None:
    """Keys that were accepted but never read are gone: setting one stops start-up with
    the key and where its job went, never silently ignored."""
    path = tmp_path / "aiwfe.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert f"invalid configuration key {key!r}: removed (" in str(err.value)
    assert why in str(err.value)


def test_a_misspelt_key_is_still_just_unknown() -> None:
    """Only removed keys get the removal note; a typo reads "unknown key"."""
    with pytest.raises(ConfigError, match=r"'database\.postgress': unknown key"):
        load_settings(env={}, overrides={"database": {"postgress": {}}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"authentication": {"jwt": {"keys": [{"kid": "k1", "secret_key": "s" * 32}]}}},
            "duplicate kid 'k1'",
        ),
        ({"authentication": {"jwt": {"signing_key_id": "k9"}}}, "no key with kid 'k9'"),
        (
            {"cognitive": {"chunk_chars": 400, "chunk_overlap_chars": 200}},
            "chunk_overlap_chars must be under half of chunk_chars (400)",
        ),
    ],
)
def test_cross_field_checks_fail_at_load(overrides, message) -> None:
    """Checks spanning several keys run when the settings load (ConfigError naming the
    block), not later when a component starts."""
    with pytest.raises(ConfigError, match="invalid configuration key") as err:
        load_settings(env={}, overrides=overrides)
    assert message in str(err.value)


def test_processes_share_a_fixed_port() -> None:
    """`services.<name>.processes` is 1 by default; more need a fixed port (with port 0
    each process would bind a port of its own), and fewer than one is refused."""
    assert load_settings(env={}).services.gateway.processes == 1
    two = {"port": 50051, "processes": 2}
    assert (
        load_settings(env={}, overrides={"services": {"gateway": two}}).services.gateway.processes
        == 2
    )
    with pytest.raises(ConfigError, match=r"'services.gateway'.*processes > 1 need a fixed port"):
        load_settings(env={}, overrides={"services": {"gateway": {"port": 0, "processes": 2}}})
    with pytest.raises(ConfigError, match=r"'services.cognitive.processes'"):
        load_settings(env={}, overrides={"services": {"cognitive": {"port": 1, "processes": 0}}})
