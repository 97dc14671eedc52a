"""aiwfe.runtime.aio.wait_event: a loop around it stops when its task is cancelled, even
when the event is set in the same loop turn (asyncio.wait_for on 3.11 swallows that
cancel, which once hung dataplatform's stop() for the whole test timeout)."""

from __future__ import annotations

import asyncio

from aiwfe.runtime.aio import cancel_and_wait, wait_event


async def _loop(event: asyncio.Event) -> None:
    while True:
        await wait_event(event, 5)
        event.clear()


async def test_a_cancel_racing_a_set_event_stops_the_loop() -> None:
    for _ in range(20):
        event = asyncio.Event()
        task = asyncio.create_task(_loop(event))
        await asyncio.sleep(0)
        event.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        assert done == {task} and task.cancelled()


async def test_it_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True


async def test_a_loop_that_swallows_a_cancel_is_cancelled_again() -> None:
    """As psycopg waiting for a dead server to confirm a cancellation: the first cancel is
    absorbed, the next one ends the task, and cancel_and_wait returns."""
    absorbed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            absorbed.set()
        await asyncio.sleep(60)  # ended only by a second cancel

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, patience=0.05)
    assert absorbed.is_set() and task.cancelled()
