"""The server side of a stream that carries many watches, each under a watch_id the client
picks (dataplatform's WatchWorkflowEventsMany, taskproc's WatchWorkflows).

A task per watch queues its tagged messages and then its end; the handler is the stream's
one writer (`Many.responses`). A watch's error is its end alone; a mistake of the stream's
own (a watch_id already open, one watch too many, an undecodable message) ends the stream
and so every watch. A watch costs its task and its frames, nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, Generic, TypeVar

from aiwfe.runtime.errors import InvalidArgument, ResourceExhausted

Request = TypeVar("Request")
Response = TypeVar("Response")
_QUEUE = 64  # messages waiting for the writer: then the watches wait for it


class Many(Generic[Response]):
    """One stream's open watches by watch_id and the queue its writer drains (responses;
    an exception ends the stream with its status; None ends it with OK once the client is
    done sending and no watch is open)."""

    __slots__ = ("limit", "method", "out", "reading", "subject", "watches")

    def __init__(self, method: str, limit: int, subject: str) -> None:
        self.method = method  # named in the refusal of one watch too many
        self.limit = limit
        self.subject = subject  # the setting that bounds it (the refusal's QuotaFailure)
        self.watches: dict[int, asyncio.Task[None]] = {}
        self.out: asyncio.Queue[Response | Exception | None] = asyncio.Queue(_QUEUE)
        self.reading = True

    def start(self, watch_id: int, run: Coroutine[Any, Any, None]) -> None:
        if watch_id in self.watches:
            run.close()
            raise InvalidArgument(
                [("watch.watch_id", f"{watch_id} names a watch open on this stream")]
            )
        if len(self.watches) >= self.limit:
            run.close()
            raise ResourceExhausted(
                f"a {self.method} stream carries at most {self.limit} open watches:"
                " open another stream",
                quota_violations=[(self.subject, f"at most {self.limit}")],
                reason="STREAM_WATCHES_EXHAUSTED",
                metadata={"limit": str(self.limit)},
            )
        self.watches[watch_id] = asyncio.create_task(run)

    def cancel(self, watch_id: int) -> None:
        """Ends an open watch with no answer (an id not open is ignored)."""
        task = self.watches.pop(watch_id, None)
        if task is not None:
            task.cancel()

    async def ended(self, watch_id: int, end: Response) -> None:
        """Sends a watch's last message. It is forgotten first: its id is free once the
        client reads the end. The stream ends with the last watch once the client is done."""
        if self.watches.get(watch_id) is asyncio.current_task():
            del self.watches[watch_id]
        await self.out.put(end)
        if not self.reading and not self.watches:
            await self.out.put(None)

    async def done_reading(self) -> None:
        """The client sent its last request: the stream ends once no watch is open."""
        self.reading = False
        if not self.watches:
            await self.out.put(None)

    async def read(
        self, requests: AsyncIterator[Request], handle: Callable[[Request], None]
    ) -> None:
        """Hands each request to `handle` (which starts or cancels a watch), then marks the
        client done; the stream's own error (a watch_id in use, one watch too many, an
        undecodable message) goes to the writer."""
        try:
            async for request in requests:
                handle(request)
            await self.done_reading()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.out.put(exc)

    async def responses(self, reader: Coroutine[Any, Any, None]) -> AsyncGenerator[Response, None]:
        """The stream's messages, while `reader` starts and cancels its watches (it puts
        its own error in `out`); every watch is cancelled and awaited at the end."""
        task = asyncio.create_task(reader)
        try:
            while (item := await self.out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            task.cancel()
            tasks = [task, *self.watches.values()]
            for each in tasks:
                each.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # every watch unwatched
