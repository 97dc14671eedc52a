"""compose.yaml and the Dockerfile, checked without a Docker engine: the compose JSON
schema, then a cross-check of services, references, ports and env against the settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiwfe.app.suite import SERVICE_ORDER
from aiwfe.runtime.config import ENV_ALIASES, ENV_PREFIX, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, ${VAR-default}.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRETS = {
    "JWT_SECRET_KEY": "j" * 40,
    "AIWFE_INTERNAL_SECRET_KEY": "i" * 40,
    "POSTGRES_PASSWORD": "pg-password",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password",
}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What `docker compose` substitutes, for the variables given in env."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise AssertionError(f"required variable {name} unset: {arg}")
        return arg or ""

    return _VAR.sub(repl, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), SECRETS)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_matches_the_compose_spec_schema() -> None:
    """check-jsonschema validates compose.yaml against the vendored compose-spec schema."""
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is a dev dependency"
    result = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_seed_stack_is_complete(compose) -> None:
    """All of the seed's infrastructure and the four services are there; PgBouncer runs
    in transaction mode with the seed's pool sizes; Grafana provisions deploy/grafana."""
    services = compose["services"]
    expected = {"postgres", "pgbouncer", "redis", "qdrant", "otel-collector", "prometheus"}
    assert expected | {"grafana", *SERVICE_ORDER} <= set(services)
    pgb = environment(services["pgbouncer"])
    # The seed's database.pgbouncer block: PgBouncer's own settings (aiwfe does not run it,
    # so they live here, not in aiwfe's configuration).
    assert pgb["PGBOUNCER_POOL_MODE"] == "transaction"
    assert int(pgb["PGBOUNCER_DEFAULT_POOL_SIZE"]) == 20
    assert int(pgb["PGBOUNCER_RESERVE_POOL_SIZE"]) == 5
    assert int(pgb["PGBOUNCER_MAX_CLIENT_CONN"]) == 200
    grafana_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana_mounts["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_only_gateway_and_grafana_are_published(compose) -> None:
    """No back end, database or cache publishes a port to the host."""
    published = {n for n, s in compose["services"].items() if s.get("ports")}
    assert published == {"gateway", "grafana"}
    assert compose["services"]["gateway"]["ports"] == ["50051:50051"]


def test_dependencies_exist_and_wait_for_health(compose) -> None:
    """Every depends_on target exists; the aiwfe services wait for service_healthy of
    targets that declare a health check."""
    services = compose["services"]
    for name, service in services.items():
        for target, cond in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
    for name in SERVICE_ORDER:
        assert "healthcheck" in services[name]
    for name in ("cognitive", "taskproc", "gateway"):
        conds = {c["condition"] for c in services[name]["depends_on"].values()}
        assert conds == {"service_healthy"}, name


def test_service_env_maps_to_real_settings_and_ports_agree(compose) -> None:
    """Every AIWFE_* variable of each service is a real settings key (load_settings with
    exactly that env raises no ConfigError); the service binds 0.0.0.0 on the port its
    health check probes; peers are addressed by compose service names; the DSN goes
    through PgBouncer; secrets are interpolated, never literal."""
    raw = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in SERVICE_ORDER:
        env = environment(services[name])
        for var in env:
            if var.startswith(ENV_PREFIX) and var != "AIWFE_CONFIG":
                assert var in ENV_ALIASES or "__" in var, f"{name}: {var} maps to no key"
        config = env.pop("AIWFE_CONFIG")
        mount = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert config in mount, f"{name}: AIWFE_CONFIG {config} is not mounted"
        try:
            settings = load_settings(ROOT / mount[config], env=env)
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")
        own = getattr(settings.services, name)
        assert own.host == "0.0.0.0", name
        assert services[name]["healthcheck"]["test"] == [
            "CMD",
            "aiwfe",
            "health",
            f"127.0.0.1:{own.port}",
        ]
        for peer in SERVICE_ORDER:
            if peer != name:
                assert getattr(settings.services, peer).host == peer
        # Only the gateway holds the token-signing key.
        jwt_key = SECRETS["JWT_SECRET_KEY"] if name == "gateway" else None
        assert settings.authentication.jwt.secret_key == jwt_key
        assert settings.authentication.internal.secret_key == SECRETS["AIWFE_INTERNAL_SECRET_KEY"]
        if settings.redis.url:
            assert settings.redis.url.split("//")[1].split(":")[0] in services
        raw_env = raw["services"][name].get("environment", {})
        for key in ("AIWFE_DATABASE__POSTGRES__DSN", "JWT_SECRET_KEY"):
            if key in raw_env:
                assert "${" in raw_env[key], f"{name}: {key} must come from the environment"
    dsn = load_settings(
        ROOT / "deploy/aiwfe.yaml", env=environment(services["dataplatform"])
    ).database.postgres.dsn
    assert dsn is not None and "@pgbouncer:6432/" in dsn


def test_prometheus_scrapes_the_configured_metrics_ports(compose) -> None:
    """Prometheus targets are the services' metrics ports from the settings."""
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    settings = Settings()
    for name in SERVICE_ORDER:
        port = getattr(settings.services, name).metrics_port
        assert f"{name}:{port}" in targets


def test_dockerfile_is_multi_stage_non_root_with_grpc_healthcheck() -> None:
    """The image builds in one stage and runs in another as a non-root user, ships all
    four services, and its HEALTHCHECK speaks grpc.health.v1 through `aiwfe health`."""
    text = (ROOT / "deploy/Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert "COPY --from=build" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*\n(?:.*\n)*?.*CMD .*aiwfe health", text, re.M)
    assert health, "HEALTHCHECK must run aiwfe health"
    for package in ("aiwfe", *SERVICE_ORDER):
        assert re.search(rf"^COPY {package} {package}$", text, re.M), package
    for source in re.findall(r"^COPY (?!--)(\S+) ", text, re.M):
        assert (ROOT / source).exists(), source
    assert re.search(r'^ENTRYPOINT \["aiwfe"\]', text, re.M)


def test_dockerfile_base_is_an_argument_without_dev_dependencies() -> None:
    """Users build on an official Python image, tests on the offline Debian base, through
    one BASE_IMAGE argument used by every stage but the last, which is empty (`scratch`) and
    gets only files of those stages (the base pruned, the virtualenv); no `# syntax=` line (it
    forces a pull of the frontend image); the runtime gets the package without its dev
    extra."""
    text = (ROOT / "deploy/Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    first_from = text.index("\nFROM ")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.1\d", text[:first_from], re.M)
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert set(bases[:-1]) == {"${BASE_IMAGE}"} and bases[-1] == "scratch"
    last = text[text.rindex("\nFROM ") :]
    assert "RUN " not in last  # an empty image has no shell to run anything at build time
    assert "[dev]" not in text
