"""Ollama and OpenAI-compatible backends over HTTP (httpx), each behind a circuit breaker.

Wire formats: Ollama `/api/embed` (batch), `/api/generate` and `/api/chat` (NDJSON lines,
the last with `"done": true`); OpenAI `/v1/embeddings` and `/v1/chat/completions` (SSE
`data:` chunks ending with `data: [DONE]`). Timeouts come from the caller's remaining
deadline. A backend's error body (`{"error": "..."}` or `{"error": {"message": ...}}`)
reaches the caller as a clear status: UNAVAILABLE when the server is down or failing,
FAILED_PRECONDITION when it is misconfigured (unknown model, bad key), INVALID_ARGUMENT
when it rejects the input; never INTERNAL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from aiwfe.runtime.channels import remaining_timeout
from aiwfe.runtime.config import (
    ConfigError,
    EmbeddingBackendSettings,
    GenerationBackendSettings,
    Settings,
)
from aiwfe.runtime.errors import (
    AiwfeError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from aiwfe.runtime.resilience.breaker import CircuitBreaker
from cognitive.registry import GenerationParams, embedding_kind, generation_kind

_MAX_ERROR_CHARS = 500


class HttpBackend:
    """Shared plumbing: one pooled client, one breaker, deadline-bound calls, error mapping."""

    kind = "http"

    def __init__(
        self,
        name: str,
        url: str,
        model: str,
        api_key: str | None,
        timeout: float,
        settings: Settings,
        field: str,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.model_name = model
        self.model = f"{self.kind}/{model}"
        self._timeout = timeout
        self._field = field  # the request field a 400 from the backend is blamed on
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
        self.breaker = CircuitBreaker(
            f"{self.kind}:{name}",
            settings.circuit_breaker.failure_threshold,
            settings.circuit_breaker.timeout,
            service="cognitive",
        )

    def _call_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(remaining_timeout(self._timeout))

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POSTs `body` and returns the decoded JSON reply, through the breaker."""
        self.breaker.before_call()
        try:
            reply = await self._client.post(path, json=body, timeout=self._call_timeout())
            if reply.status_code >= 400:
                raise self._http_error(reply.status_code, reply.text)
            data = reply.json()
        except httpx.TimeoutException as exc:
            raise self._failed(
                DeadlineExceeded(
                    f"{self._what()} timed out: {exc!r}",
                    reason="BACKEND_TIMEOUT",
                    metadata={"backend": self.name},
                )
            ) from None
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            raise self._failed(
                Unavailable(
                    f"{self._what()} is unreachable: {exc!r}",
                    reason="BACKEND_UNREACHABLE",
                    metadata={"backend": self.name},
                )
            ) from None
        except AiwfeError as exc:
            raise self._failed(exc) from None
        self.breaker.record_success()
        return data

    @asynccontextmanager
    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """Opens a streamed POST; the breaker judges the status line, not the whole stream."""
        self.breaker.before_call()
        # Each read may wait `timeout`; the whole stream is bounded by the caller's deadline
        # (the gRPC server cancels this task when it passes).
        timeout = httpx.Timeout(self._timeout, connect=remaining_timeout(self._timeout))
        try:
            async with self._client.stream("POST", path, json=body, timeout=timeout) as reply:
                if reply.status_code >= 400:
                    text = (await reply.aread()).decode("utf-8", "replace")
                    raise self._failed(self._http_error(reply.status_code, text))
                self.breaker.record_success()
                yield reply
        except httpx.TimeoutException as exc:
            raise self._failed(
                DeadlineExceeded(
                    f"{self._what()} timed out: {exc!r}",
                    reason="BACKEND_TIMEOUT",
                    metadata={"backend": self.name},
                )
            ) from None
        except httpx.TransportError as exc:
            raise self._failed(
                Unavailable(
                    f"{self._what()} is unreachable: {exc!r}",
                    reason="BACKEND_UNREACHABLE",
                    metadata={"backend": self.name},
                )
            ) from None

    def _what(self) -> str:
        return f"{self.kind} backend {self.name!r} ({self.url}, model {self.model_name!r})"

    def _failed(self, exc: AiwfeError) -> AiwfeError:
        self.breaker.record_failure(exc.code)
        return exc

    def _http_error(self, status: int, text: str) -> AiwfeError:
        """Maps an HTTP error status and body to the status a caller can act on."""
        message = f"{self._what()} answered HTTP {status}: {error_message(text)}"
        meta = {"backend": self.name, "httpStatus": str(status)}
        if status in (401, 403, 404):
            return FailedPrecondition(message, reason="BACKEND_MISCONFIGURED", metadata=meta)
        if status == 429:
            return ResourceExhausted(message, reason="BACKEND_RATE_LIMITED", metadata=meta)
        if status in (400, 413, 422):
            return InvalidArgument(
                [(self._field, message)],
                message=message,
                reason="BACKEND_REJECTED_REQUEST",
                metadata=meta,
            )
        return Unavailable(message, reason="BACKEND_FAILED", metadata=meta)

    def _stream_error(self, error: Any) -> AiwfeError:
        """An error reported inside an open stream (the status line was already 200)."""
        text = error if isinstance(error, str) else json.dumps({"error": error})
        return self._failed(
            Unavailable(
                f"{self._what()} failed mid-stream: {error_message(text)}",
                reason="BACKEND_FAILED",
                metadata={"backend": self.name},
            )
        )

    async def close(self) -> None:
        self.breaker.retire()
        await self._client.aclose()


def error_message(text: str) -> str:
    """The human message of an error body: Ollama's `error` string, OpenAI's `error.message`."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        data = None
    message: Any = text
    if isinstance(data, dict) and "error" in data:
        error = data["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
    message = str(message).strip() or "(empty body)"
    return message[:_MAX_ERROR_CHARS]


def _check_vectors(backend: HttpBackend, vectors: Any, count: int) -> list[Any]:
    if not isinstance(vectors, list) or len(vectors) != count:
        raise backend._failed(
            Unavailable(
                f"{backend._what()} returned a malformed embedding reply",
                reason="BACKEND_REPLY_INVALID",
                metadata={"backend": backend.name},
            )
        )
    return vectors


class OllamaBackend(HttpBackend):
    """Ollama: `/api/embed` for batches, `/api/chat` or `/api/generate` streamed as NDJSON."""

    kind = "ollama"

    def __init__(self, name: str, cfg: Any, settings: Settings, field: str) -> None:
        super().__init__(name, cfg.url, cfg.model, cfg.api_key, cfg.timeout, settings, field)
        self._api = getattr(cfg, "api", "chat")

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        data = await self._post_json("/api/embed", {"model": self.model_name, "input": texts})
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        return _check_vectors(self, vectors, len(texts))

    async def generate(self, params: GenerationParams) -> AsyncIterator[str]:
        options: dict[str, Any] = {}
        if params.max_tokens:
            options["num_predict"] = params.max_tokens
        if params.temperature:
            options["temperature"] = params.temperature
        body: dict[str, Any] = {"model": self.model_name, "stream": True, "options": options}
        if self._api == "chat":
            messages = [{"role": "system", "content": params.system}] if params.system else []
            body["messages"] = [*messages, {"role": "user", "content": params.prompt}]
            path = "/api/chat"
        else:
            body["prompt"] = params.prompt
            if params.system:
                body["system"] = params.system
            path = "/api/generate"
        async with self._stream(path, body) as reply:
            async for line in reply.aiter_lines():
                if not line.strip():
                    continue
                try:
                    chunk = json.loads(line)
                except json.JSONDecodeError:
                    raise self._stream_error(f"undecodable line {line[:80]!r}") from None
                if "error" in chunk:
                    raise self._stream_error(chunk["error"])
                piece = (
                    chunk.get("message", {}).get("content", "")
                    if self._api == "chat"
                    else chunk.get("response", "")
                )
                if piece:
                    yield piece
                if chunk.get("done"):
                    return
        raise self._stream_error("stream ended without a done:true line")


class OpenAIBackend(HttpBackend):
    """OpenAI-compatible: `/v1/embeddings`, `/v1/chat/completions` streamed as SSE."""

    kind = "openai"

    def __init__(self, name: str, cfg: Any, settings: Settings, field: str) -> None:
        # Accept a base URL with or without the /v1 suffix (both spellings are common).
        url = cfg.url.rstrip("/").removesuffix("/v1")
        super().__init__(name, url, cfg.model, cfg.api_key, cfg.timeout, settings, field)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        data = await self._post_json("/v1/embeddings", {"model": self.model_name, "input": texts})
        items = data.get("data") if isinstance(data, dict) else None
        items = _check_vectors(self, items, len(texts))
        ordered = sorted(items, key=lambda item: item.get("index", 0))
        return [item["embedding"] for item in ordered]

    async def generate(self, params: GenerationParams) -> AsyncIterator[str]:
        messages = [{"role": "system", "content": params.system}] if params.system else []
        body: dict[str, Any] = {
            "model": self.model_name,
            "stream": True,
            "messages": [*messages, {"role": "user", "content": params.prompt}],
        }
        if params.max_tokens:
            body["max_tokens"] = params.max_tokens
        if params.temperature:
            body["temperature"] = params.temperature
        async with self._stream("/v1/chat/completions", body) as reply:
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": keep-alive"), event: lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    raise self._stream_error(f"undecodable event {payload[:80]!r}") from None
                if "error" in chunk:
                    raise self._stream_error(chunk["error"])
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        raise self._stream_error("stream ended without data: [DONE]")


@embedding_kind("ollama")
@embedding_kind("openai")
def make_embedding_backend(
    name: str, cfg: EmbeddingBackendSettings, settings: Settings
) -> OllamaBackend | OpenAIBackend:
    """An HTTP embedding backend from its config block."""
    key = f"cognitive.embedding.backends.{name}"
    if not cfg.url or not cfg.model:
        raise ConfigError(f"configuration key {key!r} needs url and model for kind {cfg.kind}")
    if cfg.kind == "ollama":
        return OllamaBackend(name, cfg, settings, "texts")
    return OpenAIBackend(name, cfg, settings, "texts")


@generation_kind("ollama")
@generation_kind("openai")
def make_generation_backend(
    name: str, cfg: GenerationBackendSettings, settings: Settings
) -> OllamaBackend | OpenAIBackend:
    """An HTTP generation backend from its config block."""
    if cfg.kind == "ollama":
        return OllamaBackend(name, cfg, settings, "prompt")
    return OpenAIBackend(name, cfg, settings, "prompt")
