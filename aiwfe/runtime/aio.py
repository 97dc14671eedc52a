"""asyncio helpers that hold up under cancellation."""

from __future__ import annotations

import asyncio


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
