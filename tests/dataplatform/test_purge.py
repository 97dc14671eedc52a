"""The periodic purge: a failure is logged, never swallowed, and the other purge still runs."""

from __future__ import annotations

import logging

import pytest

from aiwfe.runtime.server import RunningService
from dataplatform.service import DataPlatformService


async def test_a_failing_purge_is_logged_and_the_next_still_runs(
    dataplatform: RunningService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cache purge raising leaves a warning with its traceback, and tokens are still
    purged in the same round."""
    service = dataplatform.service
    assert isinstance(service, DataPlatformService)
    purged: list[str] = []

    async def broken() -> int:
        raise OSError("disk on fire")

    async def tokens() -> int:
        purged.append("tokens")
        return 0

    monkeypatch.setattr(service.cache, "purge_expired", broken)
    monkeypatch.setattr(service.tokens, "purge_expired", tokens)
    with caplog.at_level(logging.WARNING, logger="aiwfe.dataplatform"):
        await service.purge_expired()
    assert purged == ["tokens"]
    [record] = [r for r in caplog.records if "purging expired" in r.getMessage()]
    assert record.getMessage() == "purging expired cache entries failed"
    assert record.exc_info is not None and "disk on fire" in str(record.exc_info[1])
