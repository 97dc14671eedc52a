"""A TCP fault proxy for resilience tests: put it between a client and a real server.

Modes (switch at any time; they apply to open connections too):

- ``pass_through()``: bytes flow both ways (the initial mode).
- ``cut()``: every open connection is reset and new ones are reset on accept, like a
  server that went away (clients see ECONNRESET / "server closed the connection").
- ``delay(seconds)``: every chunk is held ``seconds`` before it is forwarded (order kept).
- ``blackhole()``: connections are accepted but nothing is forwarded either way; bytes are
  held, as TCP would keep retransmitting them, and flow again once the mode changes back
  (a network partition: the peer never answers, nothing fails fast).

Usage::

    async with FaultProxy("127.0.0.1", 5432) as proxy:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        proxy.cut()
        ...
        proxy.pass_through()

It runs in the test's event loop and needs no privileges.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

Mode = Literal["pass", "cut", "delay", "blackhole"]
_CHUNK = 64 * 1024


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``upstream_host:upstream_port`` with injectable faults."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.delay_seconds = 0.0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stops listening and closes every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()  # also wakes handlers a blackhole holds
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ modes

    def pass_through(self) -> None:
        """Forward everything again (held bytes of a blackhole flow now)."""
        self.mode = "pass"
        self.delay_seconds = 0.0
        self._flowing.set()

    def cut(self) -> None:
        """Reset every open connection and every new one until the mode changes."""
        self.mode = "cut"
        self._flowing.set()
        self._reset_all()

    def delay(self, seconds: float) -> None:
        """Hold each chunk `seconds` before forwarding it."""
        self.mode = "delay"
        self.delay_seconds = seconds
        self._flowing.set()

    def blackhole(self) -> None:
        """Accept and hold, never forward, until the mode changes."""
        self.mode = "blackhole"
        self._flowing.clear()

    # ------------------------------------------------------------- plumbing

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "cut":
            _reset(writer)
            return
        self._writers.add(writer)
        # A blackhole accepts but never reaches the server: wait until traffic may flow.
        await self._flowing.wait()
        if self.mode == "cut" or writer.is_closing():
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        self._spawn(self._pump(reader, up_writer, writer))
        self._spawn(self._pump(up_reader, writer, up_writer))

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if self.mode == "delay" and self.delay_seconds > 0:
                    await asyncio.sleep(self.delay_seconds)
                if self.mode == "cut":
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other so the client sees the connection drop.
            for w in (dst, src_writer):
                self._writers.discard(w)
                if not w.is_closing():
                    w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort (RST) rather than close (FIN): what a crashed server or a reset link looks like."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
