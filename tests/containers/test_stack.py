"""compose.yaml run for real on a container engine: the aiwfe image built from
deploy/Dockerfile on the offline Debian base, the stack brought up with compose, then used
from the host through the gateway's published port only.

Runs when AIWFE_CONTAINER_TESTS=1 (the containers stage of .ci/run sets it); the engine and
base image come from scripts/container-engine, and a machine where no engine can start skips
with its reason (a skip is not a pass). Stand-ins, since no image can be pulled here (see
compose.offline.yaml): PostgreSQL, PgBouncer, Redis and Prometheus are Debian's packages; the
OpenTelemetry Collector is tests/containers/otlp_sink.py; there is no Qdrant server, so
dataplatform runs Qdrant's engine in process; Grafana is not started."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import ADMIN_PASSWORD, bearer, login
from tests.taskproc.helpers import TERMINAL, spec

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENGINE = ROOT / "scripts/container-engine"
WHEELHOUSE = ROOT / "deploy/wheelhouse"
BASE_IMAGE = os.environ.get("AIWFE_BASE_IMAGE", "aiwfe-base:bookworm")
AIWFE_IMAGE = "aiwfe:compose-test"
SERVERS_IMAGE = "aiwfe-servers:bookworm"
POSTGRES_PASSWORD = f"pg-{uuid.uuid4().hex}"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The scrape targets deploy/prometheus/prometheus.yml names: four services + the collector.
TARGETS = {
    "gateway:9464",
    "cognitive:9465",
    "taskproc:9466",
    "dataplatform:9467",
    "otel-collector:8888",
}

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("AIWFE_CONTAINER_TESTS") != "1",
        reason="container tests run with AIWFE_CONTAINER_TESTS=1 (the containers stage of .ci/run)",
    ),
    # Image builds (cached after the first) and the stack's start-up, not a speed limit.
    pytest.mark.timeout(1800),
]


def run(*cmd: str | Path, timeout: float = 900, **kw) -> subprocess.CompletedProcess[str]:
    """Runs a command, failing the test with its output when it fails."""
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} -> {result.returncode}\n{result.stdout[-3000:]}"
            f"\n{result.stderr[-3000:]}"
        )
    return result


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin is there, else docker-compose 1.29+."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no compose: neither the docker compose plugin nor docker-compose is installed")


def wheelhouse() -> None:
    """Wheels for the offline image build, downloaded on the host (containers here reach the
    Debian mirror but not PyPI); kept until pyproject.toml changes."""
    stamp = WHEELHOUSE / ".pyproject"
    if stamp.exists() and stamp.read_text() == (ROOT / "pyproject.toml").read_text():
        return
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", WHEELHOUSE, "--only-binary=:all:"]
    # async-timeout: redis needs it below Python 3.11.3 (Debian 12 has 3.11.2), a marker
    # pip evaluates for the host's interpreter, not the image's.
    run(*pip, ROOT, "setuptools>=69", "wheel", "async-timeout>=4.0.3")
    for own in WHEELHOUSE.glob("aiwfe-*"):
        own.unlink()
    stamp.write_text((ROOT / "pyproject.toml").read_text())


def build_images() -> None:
    wheelhouse()
    offline = "--no-index --find-links /wheelhouse"
    build = ["docker", "build", "-q", "--force-rm", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    run(
        *build,
        "--build-arg",
        f"PIP_INSTALL_ARGS={offline}",
        "-f",
        ROOT / "deploy/Dockerfile",
        "-t",
        AIWFE_IMAGE,
        ROOT,
    )
    run(*build, "-f", HERE / "images/servers.Dockerfile", "-t", SERVERS_IMAGE, HERE / "images")


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]
    gateway: str

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(*self.compose, *args, env=self.env, cwd=ROOT, timeout=timeout)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def exec(self, service: str, *cmd: str, env: dict[str, str] | None = None) -> str:
        flags = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        return run("docker", "exec", *flags, self.container(service), *cmd, timeout=60).stdout

    def wait_healthy(self, service: str, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            cid = self.container(service)
            state = run("docker", "inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()
            if state == "healthy":
                return
            time.sleep(1)
        logs = self("logs", "--tail", "40", service).stdout
        pytest.fail(f"{service} not healthy after {timeout} s ({state}):\n{logs}")

    def prometheus(self, path: str) -> dict:
        return json.loads(self.exec("prometheus", "wget", "-qO-", f"http://127.0.0.1:9090{path}"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ready = subprocess.run([ENGINE, "base"], capture_output=True, text=True, timeout=900)
    if ready.returncode == 3:
        pytest.skip(f"no container engine on this machine: {ready.stderr.strip()}")
    assert ready.returncode == 0, ready.stderr
    compose = compose_command()
    started = time.monotonic()
    build_images()
    print(f"\nimages built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    port = free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"aiwfe-ct{os.getpid()}",
        "AIWFE_IMAGE": AIWFE_IMAGE,
        "AIWFE_SERVERS_IMAGE": SERVERS_IMAGE,
        "AIWFE_GATEWAY_PORT": str(port),
        "JWT_SECRET_KEY": uuid.uuid4().hex * 2,
        "AIWFE_INTERNAL_SECRET_KEY": uuid.uuid4().hex * 2,
        "POSTGRES_PASSWORD": POSTGRES_PASSWORD,
        "GRAFANA_ADMIN_PASSWORD": uuid.uuid4().hex,
        "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    s = Stack(
        [*compose, "-f", "compose.yaml", "-f", str(HERE / "compose.offline.yaml")],
        env,
        f"127.0.0.1:{port}",
    )
    try:
        started = time.monotonic()
        # Grafana and the Qdrant server are left out (see the module docstring); the rest
        # start in compose's dependency order, each waiting for its dependencies' health.
        s("up", "-d", "--no-build", "gateway", "prometheus", timeout=600)
        s.wait_healthy("gateway")
        print(f"stack healthy in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield s
    except BaseException:
        with contextlib.suppress(Exception):
            print(s("logs", "--tail", "30").stdout, file=sys.stderr)
        raise
    finally:
        s("down", "-v", "--remove-orphans", timeout=300)


async def _embed(gateway: str) -> cog_pb.EmbedResponse:
    async with grpc.aio.insecure_channel(gateway) as channel:
        token = await login(channel)
        return await cog_grpc.CognitiveServiceStub(channel).Embed(
            cog_pb.EmbedRequest(texts=["the cat sat on the mat", "quarterly revenue grew"]),
            metadata=bearer(token),
            timeout=30,
        )


async def _submit(gateway: str, *steps: dict) -> str:
    async with grpc.aio.insecure_channel(gateway) as channel:
        token = await login(channel)
        reply = await wf_grpc.WorkflowServiceStub(channel).SubmitWorkflow(
            wf_pb.SubmitWorkflowRequest(spec=spec(*steps)), metadata=bearer(token), timeout=30
        )
        return reply.workflow.workflow_id


async def _state(gateway: str, workflow_id: str) -> int:
    async with grpc.aio.insecure_channel(gateway) as channel:
        token = await login(channel)
        reply = await wf_grpc.WorkflowServiceStub(channel).GetWorkflow(
            wf_pb.GetWorkflowRequest(workflow_id=workflow_id), metadata=bearer(token), timeout=10
        )
        return reply.workflow.state


async def _outcome(gateway: str, workflow_id: str, timeout: float = 180) -> wf_pb.Workflow:
    """Polls GetWorkflow until terminal, riding out a back end that is restarting."""
    end = time.monotonic() + timeout
    workflow = wf_pb.Workflow()
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = wf_grpc.WorkflowServiceStub(channel)
        while time.monotonic() < end:
            try:
                token = await login(channel)
                workflow = (
                    await stub.GetWorkflow(
                        wf_pb.GetWorkflowRequest(workflow_id=workflow_id),
                        metadata=bearer(token),
                        timeout=10,
                    )
                ).workflow
                if workflow.state in TERMINAL:
                    return workflow
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
            await asyncio.sleep(1)
    pytest.fail(f"workflow {workflow_id} not terminal after {timeout} s: {workflow}")


def test_login_and_embed_through_the_published_gateway_port(stack: Stack) -> None:
    """Login and Embed from the host: gateway -> cognitive -> dataplatform -> PgBouncer."""
    reply = asyncio.run(_embed(stack.gateway))
    assert len(reply.embeddings) == 2
    assert all(len(e.values) > 0 for e in reply.embeddings)
    assert reply.embeddings[0].values != reply.embeddings[1].values


def test_workflow_runs_to_succeeded(stack: Stack) -> None:
    workflow_id = asyncio.run(
        _submit(
            stack.gateway,
            {"name": "first", "op": "noop"},
            {"name": "second", "op": "noop", "depends_on": ["first"]},
        )
    )
    workflow = asyncio.run(_outcome(stack.gateway, workflow_id))
    assert workflow.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, workflow


def test_pgbouncer_pools_in_transaction_mode_and_carries_the_traffic(stack: Stack) -> None:
    """PgBouncer's admin console: the pool mode compose.yaml asks for, and transactions
    counted for the aiwfe database (dataplatform's traffic went through it)."""
    psql = ["psql", "-h", "127.0.0.1", "-p", "6432", "-U", "aiwfe", "-d", "pgbouncer", "-tA"]
    env = {"PGPASSWORD": POSTGRES_PASSWORD}
    config = stack.exec("pgbouncer", *psql, "-c", "SHOW CONFIG", env=env)
    assert "pool_mode|transaction|" in config
    stats = stack.exec("pgbouncer", *psql, "-F", " ", "-c", "SHOW STATS", env=env)
    aiwfe = next(line.split() for line in stats.splitlines() if line.startswith("aiwfe "))
    assert int(aiwfe[1]) > 0, stats  # total_xact_count


def test_prometheus_scrapes_every_metrics_endpoint(stack: Stack) -> None:
    """Every target in deploy/prometheus/prometheus.yml is up (four services and the
    collector), and the collector stand-in has received the services' spans over OTLP."""
    end = time.monotonic() + 90
    health: dict[str, str] = {}
    spans: set[str] = set()
    while time.monotonic() < end:
        targets = stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["instance"]: t["health"] for t in targets}
        query = stack.prometheus("/api/v1/query?query=otlp_sink_spans_total")["data"]["result"]
        spans = {r["metric"]["service_name"] for r in query if float(r["value"][1]) > 0}
        if set(health) == TARGETS and set(health.values()) == {"up"} and "aiwfe-gateway" in spans:
            break
        time.sleep(2)
    assert health == dict.fromkeys(TARGETS, "up")
    assert "aiwfe-gateway" in spans, spans


def test_workflow_submitted_before_a_dataplatform_restart_completes(stack: Stack) -> None:
    """Stop and start dataplatform (its in-process state is gone, PostgreSQL keeps the
    workflow): a workflow submitted before the stop still runs to SUCCEEDED."""
    workflow_id = asyncio.run(
        _submit(
            stack.gateway,
            *(
                {
                    "name": f"s{i}",
                    "op": "noop",
                    "inputs": {"sleep_ms": 1500},
                    **({"depends_on": [f"s{i - 1}"]} if i else {}),
                }
                for i in range(4)
            ),
        )
    )
    # Still running when dataplatform goes: the restart happens in the middle of it.
    assert asyncio.run(_state(stack.gateway, workflow_id)) not in TERMINAL
    stack("stop", "dataplatform")
    assert (
        run(
            "docker",
            "ps",
            "-q",
            "--filter",
            "status=running",
            "--filter",
            f"id={stack.container('dataplatform')}",
        ).stdout.strip()
        == ""
    )
    stack("start", "dataplatform")
    stack.wait_healthy("dataplatform")
    workflow = asyncio.run(_outcome(stack.gateway, workflow_id))
    assert workflow.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, workflow
    assert [s.name for s in workflow.steps] == ["s0", "s1", "s2", "s3"]


# Run inside the image as its user: the default embedder's code path (cognitive/onnx_backend.py)
# on ONNX Runtime and tokenizers as the image ships them (trimmed: see deploy/Dockerfile).
ONNX_IN_IMAGE = """
import json, pathlib, sys
from cognitive.onnx_backend import OnnxEmbedder
e = OnnxEmbedder(pathlib.Path("/model"), max_tokens=256)
print(json.dumps(e.encode(json.loads(sys.argv[1])).tolist()))
"""


def test_onnx_embedder_runs_in_the_image(stack: Stack) -> None:
    """The stack above embeds on the offline fall-back (no weights can be fetched here), so
    the ONNX runtime is proven separately: the image encodes with the tests' tiny BERT-shaped
    model (tests/cognitive/tiny_model.py) and matches the vectors computed by hand."""
    import tempfile

    from tests.cognitive import tiny_model

    texts = ["how to add the feature", "segfault crash bug"]
    # Not pytest's tmp_path (mode 700): the image's user (uid 10001) reads the mount.
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model.build(Path(tmp) / "tiny")
        for path in (Path(tmp), folder):
            path.chmod(0o755)
        out = run(
            *("docker", "run", "--rm", "--network", "none", "-v", f"{folder}:/model:ro"),
            *("--entrypoint", "python", AIWFE_IMAGE, "-c", ONNX_IN_IMAGE, json.dumps(texts)),
            timeout=120,
        ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    for text, vector in zip(texts, got, strict=True):
        assert vector == pytest.approx(tiny_model.expected(text).tolist(), abs=1e-5)
