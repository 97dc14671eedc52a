"""The process entry point shared by every service (aiwfe.runtime.server.serve)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

from aiwfe.runtime.config import load_settings
from aiwfe.runtime.server import Service, serve


class _Bare(Service):
    name = "cognitive"  # any configured service name: its port and metrics settings apply


async def test_serve_moves_start_up_objects_out_of_the_collectors_sight() -> None:
    """Once serving, what start-up built is frozen (a full collection skips it), and
    SIGTERM still stops the process's service cleanly."""
    settings = load_settings(
        env={
            "JWT_SECRET_KEY": "k" * 32,
            "AIWFE_SERVICES__COGNITIVE__PORT": "0",
            "AIWFE_SERVICES__COGNITIVE__METRICS_PORT": "null",
        }
    )
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    task = asyncio.create_task(serve(_Bare, settings))
    try:
        async with asyncio.timeout(10):
            while gc.get_freeze_count() == 0:
                assert not task.done(), task
                await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 10_000  # the interpreter, grpc, the bootstrap
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # serve's handler turns it into a clean stop
        await asyncio.wait_for(task, 30)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        gc.unfreeze()
