"""The embedded engine in a child process of its own.

qdrant-edge-py 0.9 holds the GIL through its engine calls: a search (1-3 ms), an update
batch, and a shard's load (1.6 s at 200k x 768, seconds at 1M; on a collection's first use
and after every optimize, which the RPC path runs every 10,000 points). In the data
platform's process each of them stalls its event loop, and so every workflow, token and
cache RPC it serves, for as long (README, "The vector engine's own process").
`HostedVectorStore` runs an `EdgeVectorStore` in a child (`python -m
dataplatform.vectors.host FD`) and forwards each call over a socket pair, so the data
platform's loop only ever waits on a socket.

Frames: a 4-byte big-endian length, then a pickle. Both ends are this module and the socket
pair is private to the two processes. The first frame carries the store's path and options;
then requests `(call, method, args)` and replies `(call, ok, result or exception)`.
The child exits when its socket closes (the parent closed it, or died). A child that exits
fails the calls it had with `VectorEngineUnavailable` (UNAVAILABLE to callers); the next call
starts another, at most one start per `RESTART_SECONDS` (a shard that crashes the engine on
load must not make every call fork a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aiwfe.runtime.config import LoggingSettings
from aiwfe.runtime.logs import configure_logging
from aiwfe.runtime.metrics import qdrant_engine_starts

from .base import CollectionSpec, ScoredPoint, Vector, VectorPoint, VectorStore, VectorStoreError
from .edge import EdgeVectorStore

__all__ = ["HostedVectorStore", "VectorEngineUnavailable"]

log = logging.getLogger("aiwfe.dataplatform.vectors")  # not __name__: "__main__" in the child

RESTART_SECONDS = 1.0
_LENGTH = 4
# The store's interface; nothing else is called by name from the other side.
_METHODS = frozenset(
    {
        "create_collection",
        "get_collection",
        "list_collections",
        "delete_collection",
        "upsert",
        "delete",
        "search",
        "count",
        "optimize",
        "stats",
    }
)


class VectorEngineUnavailable(VectorStoreError):
    """The engine's process exited (or is restarting) before the call was answered."""


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_LENGTH, "big") + data


async def _read(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH)
        data = await reader.readexactly(int.from_bytes(head, "big"))
    except asyncio.IncompleteReadError:
        return None
    # Only the two ends of a socket pair this process made can write to it (as with
    # multiprocessing's pipes): no frame comes from outside.
    return pickle.loads(data)  # noqa: S301


class HostedVectorStore(VectorStore):
    """An `EdgeVectorStore(path, **options)` in a child process, started on first use.

    Args:
        path: The embedded store's root directory (the child opens it).
        log: how the child logs (dataplatform's settings: its lines look like the parent's).
        **options: `EdgeVectorStore`'s keyword options.
    """

    def __init__(self, path: Path, log: LoggingSettings | None = None, **options: Any) -> None:
        self.path = Path(path)
        self.log = log or LoggingSettings()
        self.options = options
        self._writer: asyncio.StreamWriter | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ended: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._specs: dict[str, CollectionSpec] = {}
        self._calls = itertools.count()
        self._starting: asyncio.Future[asyncio.StreamWriter] | None = None
        self._started_at: float | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The engine process's pid while one runs."""
        return self._proc.pid if self._proc is not None and self._writer is not None else None

    def resident_bytes(self) -> int:
        """The engine process's resident memory; 0 while none runs."""
        pid = self.pid
        if pid is None:
            return 0
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # exiting, or no /proc here
            return 0
        return pages * os.sysconf("SC_PAGE_SIZE")

    # ------------------------------------------------------------ the interface

    async def create_collection(self, spec: CollectionSpec) -> None:
        await self._call("create_collection", spec)
        self._specs[spec.name] = spec

    async def get_collection(self, name: str) -> CollectionSpec:
        # Every RPC asks first (to validate against the spec): answered here, not by a
        # round trip. Specs never change, and this process makes every catalogue change.
        spec = self._specs.get(name)
        if spec is None:
            spec = await self._call("get_collection", name)
            self._specs[name] = spec
        return spec

    async def list_collections(self) -> list[CollectionSpec]:
        specs: list[CollectionSpec] = await self._call("list_collections")
        return specs

    async def delete_collection(self, name: str) -> None:
        self._specs.pop(name, None)
        try:
            await self._call("delete_collection", name)
        finally:  # a get_collection meanwhile may have cached it again
            self._specs.pop(name, None)

    async def upsert(self, name: str, points: Sequence[VectorPoint]) -> int:
        written: int = await self._call("upsert", name, list(points))
        return written

    async def delete(self, name: str, ids: Sequence[str]) -> int:
        deleted: int = await self._call("delete", name, list(ids))
        return deleted

    async def search(
        self,
        name: str,
        query: Vector,
        top_k: int = 10,
        filter: Mapping[str, str] | None = None,
        score_threshold: float | None = None,
    ) -> list[ScoredPoint]:
        hits: list[ScoredPoint] = await self._call(
            "search", name, query, top_k, dict(filter or {}), score_threshold
        )
        return hits

    async def count(self, name: str, filter: Mapping[str, str] | None = None) -> int:
        n: int = await self._call("count", name, dict(filter or {}))
        return n

    async def optimize(self, name: str) -> None:
        await self._call("optimize", name)

    async def stats(self, name: str) -> dict[str, int]:
        stats: dict[str, int] = await self._call("stats", name)
        return stats

    async def close(self) -> None:
        """Closes the engine (it flushes and closes every shard), waits for it to exit."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._starting)
        if self._writer is not None:
            # The child's end of stream: it answers the calls it has, closes the store
            # (flushing every shard) and exits.
            with contextlib.suppress(ConnectionError):
                self._writer.write_eof()
        if self._ended is not None:
            await asyncio.shield(self._ended)

    # ------------------------------------------------------------ the child

    async def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("vector store is closed")
        writer = await self._running()
        call = next(self._calls)
        answer = asyncio.get_running_loop().create_future()
        self._pending[call] = answer
        try:
            writer.write(_frame((call, method, args)))
            await writer.drain()
            ok, value = await answer
        except ConnectionError as exc:
            raise VectorEngineUnavailable("the vector engine's process is gone") from exc
        finally:
            self._pending.pop(call, None)
        if not ok:
            raise value
        return value

    async def _running(self) -> asyncio.StreamWriter:
        """The engine's stream, starting the engine if none runs. The start is a task of
        its own: a caller that gives up (its deadline) must not abandon it half done."""
        if self._closed:
            raise RuntimeError("vector store is closed")
        if self._writer is not None:
            return self._writer
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
            # Its callers may all have gone: the outcome is read here, not left unread.
            self._starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._starting)

    async def _start(self) -> asyncio.StreamWriter:
        if self._ended is not None:
            await self._ended  # the last one has let go of the shards' locks
        if self._started_at is not None and time.monotonic() - self._started_at < RESTART_SECONDS:
            raise VectorEngineUnavailable("the vector engine is restarting, retry shortly")
        self._started_at = time.monotonic()
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=_child_env(),
            )
            reader, writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()  # a child already started sees its socket close, and exits
            raise
        finally:
            theirs.close()
        qdrant_engine_starts.inc()
        self._proc = proc
        writer.write(_frame((str(self.path), self.options, self.log.model_dump())))
        self._writer = writer
        self._ended = asyncio.create_task(self._answers(reader, writer, proc))
        return writer

    async def _answers(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proc: asyncio.subprocess.Process,
    ) -> None:
        """Hands each reply to its caller; when the child's stream ends, fails the rest and
        waits for the process (its shards' locks) to be gone."""
        try:
            while (reply := await _read(reader)) is not None:
                call, ok, value = reply
                answer = self._pending.get(call)
                if answer is not None and not answer.done():
                    answer.set_result((ok, value))
        except Exception as exc:  # a broken stream ends this engine like its exit
            log.warning("vector engine stream broke: %s", exc)
        finally:
            self._writer = None
            writer.close()
            gone = VectorEngineUnavailable("the vector engine's process exited; retry")
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(gone)
            try:
                code = await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                code = await proc.wait()
            if code != 0 or not self._closed:
                log.warning("vector engine process %d exited with %s", proc.pid, code)


def _child_env() -> dict[str, str]:
    """This environment; from a source tree (a checkout, a worktree) with that tree first on
    the path, so the child runs the parent's code and not another copy installed elsewhere.
    An installed package's site-packages is the child's anyway (and first on the path it
    could shadow the standard library)."""
    root = str(Path(__file__).resolve().parents[2])
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    if root in installed:
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


# ---------------------------------------------------------------- child side


async def _serve(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    opened = await _read(reader)
    if opened is None:
        return
    path, options, logs = opened
    configure_logging("dataplatform", LoggingSettings(**logs))
    store = EdgeVectorStore(Path(path), **{**options, "threads": False})
    log.info("vector engine process %d serving %s", os.getpid(), path)
    running: set[asyncio.Task[None]] = set()

    async def answer(call: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in _METHODS:
                raise RuntimeError(f"no such vector store call: {method!r}")
            reply: tuple[Any, ...] = (call, True, await getattr(store, method)(*args))
        except Exception as exc:  # the caller's to map (NOT_FOUND, INVALID_ARGUMENT, ...)
            reply = (call, False, exc)
        try:
            data = _frame(reply)
            if not reply[1]:  # an exception must also unpickle (its __init__ may differ)
                pickle.loads(data[_LENGTH:])  # noqa: S301 - our own bytes
        except Exception:  # one that does not cross: its type and message
            plain = RuntimeError(f"{type(reply[2]).__name__}: {reply[2]}")
            data = _frame((call, False, plain))
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()

    try:
        while (request := await _read(reader)) is not None:
            call, method, args = request
            task = asyncio.create_task(answer(call, method, args))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        if running:
            await asyncio.wait(running)  # writes the parent sent are finished, not dropped
        await store.close()
        writer.close()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when this
    # process ends (by closing its socket), so the shards are closed in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging("dataplatform", LoggingSettings())  # until the parent's settings come
    asyncio.run(_serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
