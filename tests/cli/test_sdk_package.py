"""The client SDK as its own distribution (sdk/pyproject.toml, `pip install ./sdk`): the
wheel holds only aiwfe.sdk and the public contracts, requires only grpcio, protobuf and
PyJWT, and logs in and calls a running suite from a process where none of the server's
dependencies (pydantic, PyYAML, OpenTelemetry, psycopg, ...) nor the services can load."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from aiwfe.app.suite import Suite
from tests.conftest import ADMIN_PASSWORD

ROOT = Path(__file__).resolve().parents[2]
# What the full distribution needs and the SDK must not (the import-linter contract
# "The SDK imports only ..." checks the SDK's own imports; this checks what it runs).
SERVER_ONLY = (
    "pydantic", "yaml", "opentelemetry", "psycopg", "psycopg_pool", "redis",
    "prometheus_client", "argon2", "cryptography", "numpy", "httpx", "qdrant_client",
    "grpc_health", "grpc_reflection", "gateway", "cognitive", "taskproc", "dataplatform",
)  # fmt: skip

# Runs in `python -I -S` with sys.path = [the unpacked wheel, site-packages], so `aiwfe`
# is the wheel's (the editable install's .pth is never read) and SERVER_ONLY cannot load.
_PROBE = """
import asyncio, importlib.abc, sys
wheel, site, gateway, password, blocked = sys.argv[1:6]
sys.path[:0] = [wheel, site]
blocked = set(blocked.split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"server-only module imported: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
import aiwfe
from aiwfe.sdk.client import AsyncClient

assert aiwfe.__file__.startswith(wheel), aiwfe.__file__

async def main():
    async with AsyncClient(gateway, timeout=10) as client:
        await client.login("admin", password)
        print((await client.whoami()).username)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdk-wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", str(ROOT / "sdk"), "-w", str(out)],
        check=True,
    )  # fmt: skip
    return next(out.glob("aiwfe_sdk-*.whl"))


def test_wheel_holds_the_sdk_and_public_contracts_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = next(zf.read(n) for n in names if n.endswith(".dist-info/METADATA"))
    packages = {n.split("/")[1] for n in names if n.startswith("aiwfe/") and n.count("/") > 1}
    assert packages == {"sdk", "auth", "cognitive", "options", "system", "taskproc"}
    requires = {
        re.split(r"[\s=<>!~;\[]", line.split(":", 1)[1].strip())[0].lower()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    }
    assert requires == {"grpcio", "protobuf", "pyjwt"}


async def test_sdk_works_without_the_server_dependencies(
    wheel: Path, suite: Suite, tmp_path: Path
) -> None:
    unpacked = tmp_path / "wheel"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    site = sysconfig.get_paths()["purelib"]
    args = [str(unpacked), site, suite.address("gateway"), ADMIN_PASSWORD, ",".join(SERVER_ONLY)]
    # The suite serves on this event loop: the probe must not block it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", _PROBE, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "admin"
