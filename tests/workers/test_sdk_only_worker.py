"""The worker from the SDK's own distribution (`pip install ./sdk`): in a process where
none of the server's dependencies can load (OpenTelemetry included, so no task span), it
serves a task of a workflow run by the suite."""

from __future__ import annotations

import asyncio
import sys
import sysconfig
import zipfile
from pathlib import Path

from google.protobuf import json_format

from tests.cli.test_sdk_package import SERVER_ONLY, wheel  # noqa: F401 (the fixture)
from tests.taskproc.helpers import finish, spec, step_status, submit
from tests.workers.conftest import WorkerSuite, queue_name

# As tests/cli/test_sdk_package.py's probe: `python -I -S`, the unpacked wheel first.
_PROBE = """
import importlib.abc, sys
wheel, site, gateway, key, queue, blocked = sys.argv[1:7]
sys.path[:0] = [wheel, site]
blocked = set(blocked.split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"server-only module imported: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
import aiwfe
from aiwfe.sdk import Worker, current_task, task

assert aiwfe.__file__.startswith(wheel), aiwfe.__file__

@task("greet")
def greet(name: str) -> dict:
    worker.stop()  # one task, then a graceful exit
    return {"greeting": f"hello {name}", "attempt": current_task().attempt}

worker = Worker(gateway, key, queues=[queue], tasks=[greet], shutdown_grace=5)
assert worker._tracer is None  # no OpenTelemetry here: no span, no error
worker.run()
print("served")
"""


async def test_the_sdk_distribution_alone_serves_a_task(
    ws: WorkerSuite,
    wheel: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The wheel's worker, with OpenTelemetry and every server dependency blocked, serves
    a sync task (keyword input bound, dict output) and exits 0 after stop()."""
    unpacked = tmp_path / "wheel"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    q = queue_name()
    site = sysconfig.get_paths()["purelib"]
    args = [str(unpacked), site, ws.gateway, ws.worker_key, q, ",".join(SERVER_ONLY)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", _PROBE, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    step = {"name": "g", "op": "task", "inputs": {"queue": q, "type": "greet",
                                                  "input": {"name": "sdk"}}}  # fmt: skip
    wf = await submit(ws.channel, ws.admin, spec(step))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "served"
    done = await finish(ws.channel, ws.admin, wf.workflow_id)
    assert json_format.MessageToDict(step_status(done, "g").output) == {
        "greeting": "hello sdk", "attempt": 1.0
    }  # fmt: skip
