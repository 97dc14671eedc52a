"""A local HTTP/1.1 server speaking Ollama's and OpenAI's wire formats, for backend tests.

Neither Ollama nor an OpenAI-compatible server can run here, so the tests talk to this one:
real sockets, real HTTP, NDJSON lines ending with `"done": true`, SSE `data:` events ending
with `data: [DONE]`, and their JSON error bodies with 4xx/5xx statuses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Reply = tuple[int, str, list[bytes]]  # status, content type, body pieces (streamed in order)


def vector_for(text: str, dim: int = 8) -> list[float]:
    """A deterministic fake embedding (so tests can check which text a vector belongs to)."""
    base = float(len(text))
    return [base + i / 10 for i in range(dim)]


def ndjson(*objects: dict[str, Any]) -> list[bytes]:
    return [json.dumps(o).encode() + b"\n" for o in objects]


def sse(*objects: dict[str, Any] | str) -> list[bytes]:
    return [f"data: {o if isinstance(o, str) else json.dumps(o)}\n\n".encode() for o in objects]


def ollama_routes() -> dict[str, Callable[[dict[str, Any]], Reply]]:
    """Well-behaved Ollama endpoints."""

    def embed(body: dict[str, Any]) -> Reply:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = {"model": body["model"], "embeddings": [vector_for(t) for t in inputs]}
        return 200, "application/json", [json.dumps(data).encode()]

    def chat(body: dict[str, Any]) -> Reply:
        pieces = ["Hel", "lo ", "world"]
        lines = [
            {"model": body["model"], "message": {"role": "assistant", "content": p}, "done": False}
            for p in pieces
        ]
        lines.append({"model": body["model"], "message": {"content": ""}, "done": True})
        return 200, "application/x-ndjson", ndjson(*lines)

    def generate(body: dict[str, Any]) -> Reply:
        lines: list[dict[str, Any]] = [
            {"model": body["model"], "response": p, "done": False} for p in ["One ", "two"]
        ]
        lines.append({"model": body["model"], "response": "", "done": True})
        return 200, "application/x-ndjson", ndjson(*lines)

    return {"/api/embed": embed, "/api/chat": chat, "/api/generate": generate}


def openai_routes() -> dict[str, Callable[[dict[str, Any]], Reply]]:
    """Well-behaved OpenAI-compatible endpoints (embedding items deliberately out of order)."""

    def embeddings(body: dict[str, Any]) -> Reply:
        items = [
            {"object": "embedding", "index": i, "embedding": vector_for(t)}
            for i, t in enumerate(body["input"])
        ]
        data = {"object": "list", "model": body["model"], "data": items[::-1]}
        return 200, "application/json", [json.dumps(data).encode()]

    def chat(body: dict[str, Any]) -> Reply:
        events: list[dict[str, Any] | str] = [
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
            {"choices": [{"index": 0, "delta": {"content": "Stream"}}]},
            {"choices": [{"index": 0, "delta": {"content": "ed!"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            "[DONE]",
        ]
        return 200, "text/event-stream", [b": keep-alive\n\n", *sse(*events)]

    return {"/v1/embeddings": embeddings, "/v1/chat/completions": chat}


def error(status: int, body: dict[str, Any]) -> Callable[[dict[str, Any]], Reply]:
    return lambda _: (status, "application/json", [json.dumps(body).encode()])


@dataclass
class FakeLLMServer:
    """Serves `routes` on a free loopback port; records every request body it receives."""

    routes: dict[str, Callable[[dict[str, Any]], Reply]]
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port: int = 0
    stalled: set[str] = field(default_factory=set)  # paths that never answer until stop()
    gate: asyncio.Event | None = None  # when given, every answer waits until it is set
    _server: asyncio.Server | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeLLMServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            _, path, _ = request_line.decode().split(" ", 2)
            length = 0
            for _ in range(100):  # bounded header count
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = json.loads(await reader.readexactly(length)) if length else {}
            self.requests.append((path, body))
            if path in self.stalled:
                await self._release.wait()
                return
            if self.gate is not None:
                await self.gate.wait()
            route = self.routes.get(path)
            status, ctype, pieces = (
                route(body) if route else error(404, {"error": "404 page not found"})(body)
            )
            # No Content-Length and Connection: close: the body ends at EOF, as streams do.
            head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode())
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
        finally:
            writer.close()
