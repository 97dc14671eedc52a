"""`aiwfe up` as a user runs it: a subprocess that starts all four services, then a real
client logs in and embeds through the gateway; SIGTERM stops everything. Also `buf curl`
reaching Embed through the gateway with reflection alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
import yaml

from aiwfe.app.cli import check_health
from aiwfe.app.embedded import free_port
from aiwfe.app.launcher import READY_TIMEOUT
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from tests.cognitive.fake_llm import FakeLLMServer, ollama_routes
from tests.conftest import ADMIN_PASSWORD, bearer, login

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class UpProcess:
    proc: subprocess.Popen
    ports: dict[str, int]
    metrics_ports: dict[str, int]
    banner: list[str]
    home: str
    log_path: Path


def processes_with_env(entry: str) -> list[int]:
    """Pids whose environment holds `entry` (our unique home marks the suite's processes)."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.encode() in environ:
            found.append(int(proc_dir.name))
    return found


def buf_binary() -> str | None:
    return (
        os.environ.get("AIWFE_BUF")
        or shutil.which("buf")
        or (str(p) if (p := ROOT / ".tools/node_modules/.bin/buf").exists() else None)
    )


@contextlib.contextmanager
def launch_up(
    database_dsn: str, tmp_path: Path, *args: str, **extra_env: str
) -> Iterator[UpProcess]:
    """`aiwfe up ARGS` on free ports, configured through the environment (plus
    `extra_env`), stopped by SIGTERM at the end if still running."""
    ports = {name: free_port() for name in ("gateway", "cognitive", "taskproc", "dataplatform")}
    metrics_ports = {name: free_port() for name in ports}
    env = {
        **os.environ,
        "AIWFE_HOME": str(tmp_path / "home"),
        "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "AIWFE_DATABASE__POSTGRES__DSN": database_dsn,
        "AIWFE_DATABASE__POSTGRES__POOL_SIZE": "2",
        "AIWFE_LOGGING__LEVEL": "DEBUG",
        # Never fetch the embedding model here: the suite runs on its fall-back.
        "AIWFE_COGNITIVE__EMBEDDING__DOWNLOAD": "false",
        **{f"AIWFE_SERVICES__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        **{f"AIWFE_SERVICES__{n.upper()}__METRICS_PORT": str(p) for n, p in metrics_ports.items()},
        **extra_env,
    }
    log_path = tmp_path / "services.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiwfe", "up", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        start_new_session=True,
    )
    banner = []
    # The launcher gives each service READY_TIMEOUT to start; on a loaded machine the
    # four together may take longer than one service's allowance.
    deadline = time.monotonic() + 3 * READY_TIMEOUT
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line.rstrip())
        if line.startswith("Ctrl-C"):
            break
    if not banner or not banner[-1].startswith("Ctrl-C"):
        log_file.flush()
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        pytest.fail(f"aiwfe up did not finish starting: {banner}\n" + "\n".join(tail))
    try:
        yield UpProcess(proc, ports, metrics_ports, banner, env["AIWFE_HOME"], log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the launcher stops its services in order
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # services then get SIGTERM via PDEATHSIG
                proc.wait(10)
        log_file.close()


@pytest.fixture
def up_process(database_dsn: str, tmp_path: Path) -> Iterator[UpProcess]:
    """`aiwfe up` on free ports, configured only through the environment."""
    with launch_up(database_dsn, tmp_path) as up:
        yield up


def service_pids(home: str) -> dict[str, int]:
    """The pid of each of the suite's services (`python -m <service>` under our home)."""
    pids = {}
    for pid in processes_with_env(f"AIWFE_HOME={home}"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 3 and argv[1] == b"-m" and argv[2].decode() != "aiwfe":
            pids[argv[2].decode()] = pid
    return pids


async def test_up_starts_suite_login_and_embed(up_process) -> None:
    up = up_process
    """The banner names the gateway; all four report SERVING; login and Embed work; SIGTERM
    stops every process."""
    proc, ports, banner, home = up.proc, up.ports, up.banner, up.home
    assert f"gateway: 127.0.0.1:{ports['gateway']}" in banner, banner
    # Without the model's weights: one line saying so and how to fix it.
    fallback = [line for line in banner if line.startswith("embedding: ")]
    assert len(fallback) == 1 and "built-in hashing embedder" in fallback[0], banner
    assert "aiwfe models pull" in fallback[0]
    for port in ports.values():
        assert await check_health(f"127.0.0.1:{port}", "", 5) == "SERVING"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['gateway']}") as ch:
        token = await login(ch)
        reply = await cog_grpc.CognitiveServiceStub(ch).Embed(
            cog_pb.EmbedRequest(texts=["hello from aiwfe up"]), metadata=bearer(token), timeout=10
        )
    assert reply.dimension == 768 and len(reply.embeddings[0].values) == 768
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    rest = proc.stdout.read()
    assert "aiwfe: stopped" in rest
    assert processes_with_env(f"AIWFE_HOME={home}") == []
    for port in ports.values():
        with pytest.raises(grpc.aio.AioRpcError):
            await check_health(f"127.0.0.1:{port}", "", 1)


async def test_up_config_file_reaches_the_services(database_dsn, tmp_path) -> None:
    """`aiwfe up --config FILE`: the services read the file, not only the launcher (a
    generation backend configured only there answers Generate)."""
    llm = await FakeLLMServer(ollama_routes()).start()
    config = tmp_path / "aiwfe.yaml"
    backend = {"kind": "ollama", "url": llm.url, "model": "from-the-file"}
    config.write_text(yaml.safe_dump({"cognitive": {"generation": {"backends": {"f": backend}}}}))
    try:
        with launch_up(database_dsn, tmp_path, "--config", str(config)) as up:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as ch:
                token = await login(ch)
                stream = cog_grpc.CognitiveServiceStub(ch).Generate(
                    cog_pb.GenerateRequest(prompt="hi"), metadata=bearer(token), timeout=10
                )
                text = "".join([reply.text async for reply in stream])
        assert text == "Hello world"
        assert [body["model"] for _, body in llm.requests] == ["from-the-file"]
    finally:
        await llm.stop()


def test_buf_curl_reaches_embed_through_gateway(up_process) -> None:
    up = up_process
    """buf curl, using only the gateway's reflection, logs in and calls Embed with a Bearer."""
    buf = buf_binary()
    if buf is None:
        if os.environ.get("CI"):
            pytest.fail("buf is required in CI (.ci/run installs @bufbuild/buf)")
        pytest.skip("buf not installed (npm install @bufbuild/buf)")
    ports = up.ports
    base = f"http://127.0.0.1:{ports['gateway']}"
    common = [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    login_out = subprocess.run(
        [
            *common,
            "-d",
            json.dumps({"username": "admin", "password": ADMIN_PASSWORD}),
            f"{base}/aiwfe.auth.v1.AuthService/Login",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = json.loads(login_out.stdout)["accessToken"]
    embed_out = subprocess.run(
        [
            *common,
            "-H",
            f"authorization: Bearer {token}",
            "-d",
            '{"texts":["hello"]}',
            f"{base}/aiwfe.cognitive.v1.CognitiveService/Embed",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    reply = json.loads(embed_out.stdout)
    assert reply["dimension"] == 768
    assert len(reply["embeddings"][0]["values"]) == 768


def _scrape(port: int) -> dict[str, float]:
    """Sample name{labels} → value from a Prometheus text endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in samples.items()
        if k.split("{")[0] == name and all(w in k for w in want)
    )  # fmt: skip


async def test_metrics_scrape_and_no_secrets_in_logs(up_process, database_dsn) -> None:
    """Each service's scrape endpoint exports the seed's metric names and their values move
    after traffic; no token, password or password hash appears in any log line."""
    up = up_process
    before = {name: _scrape(port) for name, port in up.metrics_ports.items()}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as ch:
        token = await login(ch)
        stub = cog_grpc.CognitiveServiceStub(ch)
        await stub.Embed(cog_pb.EmbedRequest(texts=["metrics probe"]), metadata=bearer(token))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(cog_pb.EmbedRequest(texts=[]), metadata=bearer(token))
        with pytest.raises(grpc.aio.AioRpcError):
            await login(ch, "admin", "a-wrong-password-for-the-log-test")
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(cog_pb.EmbedRequest(texts=["x"]), metadata=bearer(token + "tampered"))
    # A status can reach the client a moment before the server's interceptor records it:
    # scrape until the last expected sample shows up (bounded).
    deadline = time.monotonic() + 5
    while True:
        after = {name: _scrape(port) for name, port in up.metrics_ports.items()}
        unauthenticated = _total(after["gateway"], "error_rate_total", code="UNAUTHENTICATED")
        if unauthenticated >= 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    embed = "/aiwfe.cognitive.v1.CognitiveService/Embed"
    for service in ("gateway", "cognitive"):
        grew = _total(after[service], "request_rate_counter_total", method=embed) - _total(
            before[service], "request_rate_counter_total", method=embed
        )
        assert grew >= 2, service
        assert (
            _total(after[service], "error_rate_total", method=embed, code="INVALID_ARGUMENT") >= 1
        )
        assert _total(after[service], "request_duration_histogram_count", method=embed) >= 2
    assert _total(after["gateway"], "error_rate_total", code="UNAUTHENTICATED") >= 2
    assert _total(after["dataplatform"], "request_rate_counter_total") > _total(
        before["dataplatform"], "request_rate_counter_total"
    )
    for name, samples in after.items():
        names = {k.split("{")[0] for k in samples}
        assert "workflow_queue_depth" in names, name  # every endpoint answers with the set
        if name != "taskproc":  # the only service this traffic does not reach
            assert "request_duration_histogram_bucket" in names, name
    up.proc.send_signal(signal.SIGTERM)
    up.proc.wait(30)
    logs = up.log_path.read_text()
    assert "DEBUG" in logs or "INFO" in logs
    with psycopg.connect(database_dsn) as conn:
        # Service accounts have no password (an empty hash): only real hashes are secrets.
        rows = conn.execute("SELECT password_hash FROM users WHERE password_hash <> ''")
        hashes = [r[0] for r in rows.fetchall()]
    for secret in [token, ADMIN_PASSWORD, "a-wrong-password-for-the-log-test", *hashes]:
        assert secret not in logs
    assert token.split(".")[2] not in logs  # not even the signature


async def _serving_again(port: int, within: float) -> None:
    """Waits until the service on `port` answers its health check with SERVING."""
    until = time.monotonic() + within
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            if await check_health(f"127.0.0.1:{port}", "", 1) == "SERVING":
                return
        assert time.monotonic() < until, f"127.0.0.1:{port} not SERVING within {within} s"
        await asyncio.sleep(0.1)


async def _embed_through_gateway(gateway_port: int, attempts: int) -> None:
    """Logs in and embeds through the gateway, retrying UNAVAILABLE every 2 s while the
    gateway's channel reconnects (fewer attempts than would open its circuit breaker)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}") as ch:
        token = await login(ch)
        for attempt in range(attempts):
            try:
                reply = await cog_grpc.CognitiveServiceStub(ch).Embed(
                    cog_pb.EmbedRequest(texts=[f"after a restart {time.time_ns()}"]),
                    metadata=bearer(token),
                    timeout=5,
                )
                assert reply.dimension == 768
                return
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert attempt < attempts - 1, f"Embed still failing: {exc}"
                await asyncio.sleep(2)


async def test_up_restarts_a_killed_child_while_the_others_keep_serving(up_process) -> None:
    """kill -9 of cognitive: the launcher logs the death and restarts it after its 1 s
    backoff, the gateway serves Embed again, the other three keep their pids, and SIGTERM
    still drains everything with no restart during shutdown."""
    up = up_process
    before = service_pids(up.home)
    assert set(before) == {"gateway", "cognitive", "taskproc", "dataplatform"}, before
    killed = time.monotonic()
    os.kill(before["cognitive"], signal.SIGKILL)
    await _serving_again(up.ports["cognitive"], within=60)
    serving = time.monotonic()
    await _embed_through_gateway(up.ports["gateway"], attempts=4)
    served = time.monotonic()
    after = service_pids(up.home)
    assert after["cognitive"] != before["cognitive"]
    assert {n: p for n, p in after.items() if n != "cognitive"} == {
        n: p for n, p in before.items() if n != "cognitive"
    }
    print(
        f"\ncognitive killed -> SERVING again in {serving - killed:.2f} s,"
        f" Embed through the gateway in {served - killed:.2f} s"
    )
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0
    rest = up.proc.stdout.read()
    print(rest)
    assert (
        f"aiwfe: cognitive (pid {before['cognitive']}) died (signal SIGKILL)" in rest
        and "restart attempt 1 in 1 s" in rest
    ), rest
    assert f"aiwfe: cognitive restarted (pid {after['cognitive']}, attempt 1)" in rest, rest
    assert rest.count("restart attempt") == 1, rest  # nothing restarted while stopping
    assert "aiwfe: stopped" in rest
    assert processes_with_env(f"AIWFE_HOME={up.home}") == []


def test_up_stops_a_crash_looping_child_with_its_last_errors(database_dsn, tmp_path) -> None:
    """A child that dies at every start (its port taken by another process after a kill -9)
    is restarted 5 times with backoff, then the suite stops (exit code 1) with a message
    naming it and showing its last stderr lines, and no service is left running."""
    fast = {"AIWFE_LAUNCHER__RESTART_BACKOFF": "0.05", "AIWFE_LAUNCHER__RESTART_BACKOFF_MAX": "0.2"}
    with launch_up(database_dsn, tmp_path, **fast) as up:
        port = up.ports["cognitive"]
        # The launcher is paused while the port changes hands: with a 0.05 s backoff its
        # restart could otherwise bind the port again before the squatter does.
        up.proc.send_signal(signal.SIGSTOP)
        try:
            os.kill(service_pids(up.home)["cognitive"], signal.SIGKILL)
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            until = time.monotonic() + 5
            while True:  # the port is free once the kernel has closed the killed process's sockets
                try:
                    squatter.bind(("127.0.0.1", port))
                    break
                except OSError:
                    assert time.monotonic() < until, "the killed child's port never came free"
                    time.sleep(0.01)
            squatter.listen()
        finally:
            up.proc.send_signal(signal.SIGCONT)
        started = time.monotonic()
        try:
            assert up.proc.wait(90) == 1
        finally:
            squatter.close()
        print(f"\ncrash loop detected and the suite stopped in {time.monotonic() - started:.1f} s")
        rest = up.proc.stdout.read()
        assert rest.count("aiwfe: cognitive (pid") == 5, rest  # each death, once
        assert "died (exit code 2)" in rest and "restart attempt 5 in 0.2 s" in rest, rest
        assert "aiwfe: stopped" in rest
        logs = up.log_path.read_text()
        message = logs[logs.index("aiwfe: cognitive is crash-looping") :]
        assert "5 restarts within 60 s" in message, message
        assert f"cannot bind 127.0.0.1:{port}" in message, message  # its last error line
        assert processes_with_env(f"AIWFE_HOME={up.home}") == []
