"""asyncio helpers that hold up under cancellation."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits up to `timeout` seconds for `event`; returns whether it is set.

    Not `asyncio.wait_for`: on Python 3.11 it returns instead of raising when the event is
    set in the same loop turn as a cancellation, so a `while True` loop around it swallows
    its task's cancel and the `stop()` that awaits the task hangs (seen once in CI).
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def cancel_and_wait(task: asyncio.Task[None], patience: float = 2.0) -> None:
    """Cancels a background loop and waits until it has ended.

    A loop stuck in a query on a dead link (a blackholed database) does not end on the
    first cancel: psycopg then waits for the server to confirm the cancellation, which
    never comes, and a `stop()` awaiting the task hung the test teardown for 120 s in CI.
    A second cancel makes psycopg close that connection instead, so it is repeated every
    `patience` seconds.
    """
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=patience)
        task.cancel()
    if not task.cancelled() and task.exception() is not None:
        log.warning(
            "%s ended with an error while stopping", task.get_name(), exc_info=task.exception()
        )
