"""`services.<name>.processes: 2` under `aiwfe up`, with real processes: two gateways and
two cognitives each share their service's port (SO_REUSEPORT), both take calls, a token
revoked through one is refused by both within a second, health answers SERVING on every
connection, a killed process is restarted while its twin keeps the port served, and
SIGTERM drains the calls in flight on both."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.cognitive.fake_llm import FakeLLMServer, ollama_routes
from tests.conftest import bearer, login
from tests.taskproc.helpers import finish, spec, submit
from tests.test_up import UpProcess, _scrape, launch_up, processes_with_env

pytestmark = pytest.mark.slow

CONNECTIONS = 16  # all 16 on one of two processes: a 1 in 2**15 chance
SERVICES = ("GATEWAY", "COGNITIVE", "TASKPROC", "DATAPLATFORM")


def _own_redis_keys() -> dict[str, str]:
    """A key prefix of this test's own: the session's database (so its admin) is shared,
    and these tests' calls would otherwise fill the admin's API window for the next ones."""
    return {"AIWFE_REDIS__KEY_PREFIX": f"aiwfe-test:{uuid.uuid4().hex[:8]}:"}


def _pids(home: str, service: str) -> set[int]:
    """The pids of `service`'s processes in the suite under `home`."""
    found = set()
    for pid in processes_with_env(f"AIWFE_HOME={home}"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", service.encode()]:
            found.add(pid)
    return found


def _channels(port: int) -> list[grpc.aio.Channel]:
    """Channels with a connection each (grpc would otherwise share one between them)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CONNECTIONS)
    ]


def _by_process(samples: dict[str, float], name: str, **labels: str) -> dict[str, float]:
    """process label → summed value of `name` samples having `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    out: dict[str, float] = {}
    for key, value in samples.items():
        if key.split("{")[0] == name and all(w in key for w in want):
            process = key.split('process="', 1)[1].split('"', 1)[0]
            out[process] = out.get(process, 0.0) + value
    return out


def _refused(up: UpProcess) -> dict[str, float]:
    """Embed calls each gateway process refused as unauthenticated, by process."""
    return _by_process(
        _scrape(up.metrics_ports["gateway"]), "request_rate_counter_total",
        method="/aiwfe.cognitive.v1.CognitiveService/Embed", code="UNAUTHENTICATED",
    )  # fmt: skip


def _exited(pid: int) -> bool:
    """Whether `pid` has exited (gone, or a zombie whose sockets are closed). A zombie
    leader alone is not enough: its other threads (grpc's) still hold the descriptor table,
    and with it the listener, which takes new connections until the last thread ends and
    then resets them."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    return "\nState:\tZ" in status and len(threads) <= 1


def _listening(pid: int, port: int) -> bool:
    """Whether `pid` holds a socket listening on `port` (IPv4, from /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = Path(f"/proc/{pid}/fd").iterdir()
        return any(os.readlink(fd) in inodes for fd in fds)
    except OSError:
        return False


async def _embed(channel: grpc.aio.Channel, token: str, text: str) -> grpc.StatusCode:
    try:
        await cog_grpc.CognitiveServiceStub(channel).Embed(
            cog_pb.EmbedRequest(texts=[text]), metadata=bearer(token), timeout=10
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def two_each(database_dsn: str, tmp_path: Path) -> Iterator[UpProcess]:
    """`aiwfe up` with two gateway and two cognitive processes (1 s restart backoff)."""
    with launch_up(
        database_dsn,
        tmp_path,
        AIWFE_SERVICES__GATEWAY__PROCESSES="2",
        AIWFE_SERVICES__COGNITIVE__PROCESSES="2",
        **_own_redis_keys(),
    ) as up:
        yield up


async def test_two_processes_share_a_port_and_see_every_revocation(two_each) -> None:
    """Both gateways and both cognitives take calls on their one port (per-process series
    in the one scrape); a token revoked through one gateway is refused by both a second
    later; after kill -9 of one gateway the port keeps answering SERVING and calls, the
    launcher restarts it, and the new process refuses the revoked token too."""
    up = two_each
    gw, cog = up.ports["gateway"], up.ports["cognitive"]
    assert f"gateway: 127.0.0.1:{gw} (2 processes)" in up.banner, up.banner
    assert f"cognitive: 127.0.0.1:{cog} (2 processes)" in up.banner, up.banner
    gateways = _pids(up.home, "gateway")
    assert len(gateways) == 2 and len(_pids(up.home, "cognitive")) == 2
    channels = _channels(gw)
    try:
        token = await login(channels[0])
        codes = await asyncio.gather(
            *(_embed(ch, token, f"before {i}") for i, ch in enumerate(channels))
        )
        assert set(codes) == {grpc.StatusCode.OK}, codes
        served = _by_process(
            _scrape(up.metrics_ports["gateway"]), "request_rate_counter_total",
            method="/aiwfe.cognitive.v1.CognitiveService/Embed", code="OK",
        )  # fmt: skip
        assert set(served) == {"0", "1"} and min(served.values()) > 0, served
        # Cognitive's own port over 16 connections: both processes answer (here: a call
        # without the gateway's identity assertion, refused and counted).
        for ch in _channels(cog):
            async with ch:
                assert await _embed(ch, token, "direct") == grpc.StatusCode.UNAUTHENTICATED
        refusals = _by_process(
            _scrape(up.metrics_ports["cognitive"]), "request_rate_counter_total",
            method="/aiwfe.cognitive.v1.CognitiveService/Embed", code="UNAUTHENTICATED",
        )  # fmt: skip
        assert set(refusals) == {"0", "1"} and min(refusals.values()) > 0, refusals

        await auth_grpc.AuthServiceStub(channels[0]).Logout(
            auth_pb.LogoutRequest(), metadata=bearer(token), timeout=10
        )
        await asyncio.sleep(1.0)  # the bound under test: every process refuses it by then
        codes = await asyncio.gather(
            *(_embed(ch, token, f"after {i}") for i, ch in enumerate(channels))
        )
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, codes
        refused = _refused(up)
        assert set(refused) == {"0", "1"} and min(refused.values()) > 0, refused

        victim = max(gateways)
        os.kill(victim, signal.SIGKILL)
        # Until its sockets are closed, the kernel may still queue a new connection on the
        # dying process's listener (and reset it): clients retry such a connect.
        for _ in range(100):
            if _exited(victim):
                break
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw}") as ch:  # a new connection
            fresh = await login(ch)
        for ch in _channels(gw):  # new connections all reach the live twin
            async with ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert await _embed(ch, fresh, "while one is down") == grpc.StatusCode.OK
        restarted: set[int] = set()
        for _ in range(150):  # the 1 s backoff, then start-up
            restarted = _pids(up.home, "gateway") - gateways
            if restarted and _listening(min(restarted), gw):
                break
            await asyncio.sleep(0.2)
        assert len(restarted) == 1 and len(_pids(up.home, "gateway")) == 2
        before = _refused(up)
        codes = await asyncio.gather(
            *(_embed(ch, token, f"restarted {i}") for i, ch in enumerate(_channels(gw)))
        )
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, codes
        after = _refused(up)
        assert all(after[p] > before.get(p, 0) for p in ("0", "1")), (before, after)
    finally:
        for ch in channels:
            await ch.close()
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0
    rest = up.proc.stdout.read()
    assert f"aiwfe: gateway.1 (pid {victim}) died (signal SIGKILL)" in rest or (
        f"aiwfe: gateway.0 (pid {victim}) died (signal SIGKILL)" in rest
    ), rest
    assert "restarted (pid" in rest and rest.count("restart attempt") == 1, rest
    assert processes_with_env(f"AIWFE_HOME={up.home}") == []


async def test_sigterm_drains_calls_in_flight_on_both_processes(database_dsn, tmp_path) -> None:
    """Generate streams held open (the model answers only later) on both gateway processes
    when `aiwfe up` gets SIGTERM all finish with the model's answer, then every process
    exits."""
    gate = asyncio.Event()
    llm = await FakeLLMServer(ollama_routes(), gate=gate).start()
    config = tmp_path / "aiwfe.yaml"
    backend = {"kind": "ollama", "url": llm.url, "model": "slow"}
    config.write_text(yaml.safe_dump({"cognitive": {"generation": {"backends": {"f": backend}}}}))
    try:
        with launch_up(
            database_dsn, tmp_path, "--config", str(config),
            AIWFE_SERVICES__GATEWAY__PROCESSES="2", AIWFE_SERVICES__COGNITIVE__PROCESSES="2",
            **_own_redis_keys(),
        ) as up:  # fmt: skip
            await _drain_both(up, gate)
    finally:
        await llm.stop()


async def _drain_both(up: UpProcess, gate: asyncio.Event) -> None:
    channels = _channels(up.ports["gateway"])
    try:
        token = await login(channels[0])

        async def one(ch: grpc.aio.Channel) -> str:
            stream = cog_grpc.CognitiveServiceStub(ch).Generate(
                cog_pb.GenerateRequest(prompt="hi"), metadata=bearer(token), timeout=60
            )
            return "".join([reply.text async for reply in stream])

        in_flight = [asyncio.create_task(one(ch)) for ch in channels]
        busy: dict[str, float] = {}
        for _ in range(100):
            busy = _by_process(
                await asyncio.to_thread(_scrape, up.metrics_ports["gateway"]),
                "concurrent_requests", method="/aiwfe.cognitive.v1.CognitiveService/Generate",
            )  # fmt: skip
            if sum(busy.values()) == CONNECTIONS:
                break
            await asyncio.sleep(0.1)
        assert set(busy) == {"0", "1"} and min(busy.values()) > 0, busy  # on both
        assert sum(busy.values()) == CONNECTIONS, busy
        up.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # the processes are draining when the model answers
        finished = [t.exception() or t.result() for t in in_flight if t.done()]
        assert not finished, finished
        gate.set()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        assert results == ["Hello world"] * CONNECTIONS, results
    finally:
        for ch in channels:
            await ch.close()
    assert await asyncio.to_thread(up.proc.wait, 30) == 0
    assert processes_with_env(f"AIWFE_HOME={up.home}") == []


async def test_all_four_services_as_two_processes_run_workflows(database_dsn, tmp_path) -> None:
    """taskproc and dataplatform as two processes each too (their replicas share work
    through PostgreSQL): 16 workflows of two steps, submitted over 16 connections, all
    succeed, and SIGTERM stops all eight processes."""
    two = {f"AIWFE_SERVICES__{n}__PROCESSES": "2" for n in SERVICES}
    with launch_up(database_dsn, tmp_path, **two, **_own_redis_keys()) as up:
        for name in SERVICES:
            assert f"{name.lower()}: 127.0.0.1:{up.ports[name.lower()]} (2 processes)" in (
                up.banner
            ), up.banner
            assert len(_pids(up.home, name.lower())) == 2
        channels = _channels(up.ports["gateway"])
        steps = ({"name": "a", "op": "noop"}, {"name": "b", "op": "noop", "depends_on": ["a"]})
        try:
            token = await login(channels[0])
            submitted = await asyncio.gather(*(submit(ch, token, spec(*steps)) for ch in channels))
            done = await asyncio.gather(
                *(
                    finish(ch, token, wf.workflow_id)
                    for ch, wf in zip(channels, submitted, strict=True)
                )
            )
        finally:
            for ch in channels:
                await ch.close()
        assert [wf.state for wf in done] == [wf_pb.WORKFLOW_STATE_SUCCEEDED] * CONNECTIONS
        up.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.proc.wait, 30) == 0
        assert processes_with_env(f"AIWFE_HOME={up.home}") == []
