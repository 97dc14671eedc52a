"""An asyncio circuit breaker per downstream, as the seed specifies (5 failures, 60 s).

Only failures that belong to the back end count (`counts_as_failure`, the one rule): a
transport failure or the back end's own bare UNAVAILABLE, and DEADLINE_EXCEEDED of our
own deadline. A caller's mistake, a caller's own short deadline, or an answer from a live
server (any other status, or one carrying google.rpc details, such as an UNAVAILABLE it
passes on from its own dependency) never opens it, so no caller can open it for others.

Open, it fails calls at once. Given a health check (an `Upstream` gives grpc.health.v1
Check on its channel), it probes the back end by itself from 0.5 s, doubling to 2 s, and
goes half-open as soon as the back end answers SERVING; the seed's 60 s stays the upper
bound. Half-open admits one probe call at a time; its success closes the breaker.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from aiwfe.runtime import metrics
from aiwfe.runtime.errors import DependencyUnavailable

log = logging.getLogger("aiwfe.breaker")

DETAILS_KEY = "grpc-status-details-bin"
PROBE_FIRST_DELAY = 0.5  # seconds from opening to the first health check
PROBE_MAX_DELAY = 2.0  # health checks back off to this; keeps recovery well within 5 s
PROBE_CALL_HOLD = 2.0  # a probe call silent this long (e.g. a stream) frees the slot

HealthCheck = Callable[[], Awaitable[bool]]


def has_details(trailing: Iterable[tuple[str, Any]] | None) -> bool:
    """Whether a failed call's trailers carried google.rpc details (a live server's answer)."""
    return any(key == DETAILS_KEY for key, _ in trailing or ())


class BreakerState(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


# Read once: an attribute of an Enum class goes through EnumType.__getattr__'s slot on
# every read (~150 ns, ~8x a module constant), and a breaker judges every call.
_CLOSED = BreakerState.CLOSED
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_CANCELLED = grpc.StatusCode.CANCELLED


def counts_as_failure(code: grpc.StatusCode, details: bool, caller_deadline: bool) -> bool:
    """Whether a call's outcome is the back end's own failure: UNAVAILABLE without google.rpc
    details (transport failure, or the back end itself refusing), or DEADLINE_EXCEEDED of our
    own deadline. Details mean a live server answered; nothing else is the back end's fault."""
    if details:
        return False
    if code is _UNAVAILABLE:
        return True
    return code is _DEADLINE_EXCEEDED and not caller_deadline


# Every live breaker, so admins can read their state (SystemService.ListCircuitBreakers).
_LIVE: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def breakers_of(service: str) -> list[CircuitBreaker]:
    """The live breakers held by `service`, sorted by downstream."""
    return sorted((b for b in _LIVE if b.service == service), key=lambda b: b.name)


class CircuitBreaker:
    """CLOSED → (threshold consecutive failures) → OPEN → (health SERVING, or the timeout)
    → HALF_OPEN → (a probe call succeeds) → CLOSED."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        timeout: float = 60.0,
        service: str = "",
        health_check: HealthCheck | None = None,
    ) -> None:
        self.name = name
        self.service = service
        self.failure_threshold = failure_threshold
        self.timeout = timeout
        # Read on every call a front door passes on: a plain attribute (a property runs
        # Python through C each time); only _set_state writes it.
        self.state = BreakerState.CLOSED
        self.failure_count = 0
        self.last_error = ""
        self._opened_at = 0.0
        self._probe_started: float | None = None  # monotonic start of the probe in flight
        self._health_check = health_check
        self._prober: asyncio.Task[None] | None = None
        self._gauge = metrics.circuit_breaker_state.labels(service, name)
        self._gauge.set(0)
        _LIVE.add(self)

    def _set_state(self, value: BreakerState, why: str) -> None:
        if value is self.state:
            return
        self.state = value
        self._gauge.set(value.value)
        if value is BreakerState.OPEN:
            log.warning(
                "circuit breaker %s -> %s OPEN after %d consecutive failures"
                " (last error %s); calls fail at once for up to %.0f s",
                self.service, self.name, self.failure_count, self.last_error, self.timeout,
            )  # fmt: skip
        else:
            log.info("circuit breaker %s -> %s %s (%s)", self.service, self.name, value.name, why)

    def retire(self) -> None:
        """Stops reporting this breaker and probing its downstream (which was closed)."""
        _LIVE.discard(self)
        if self._prober is not None:
            self._prober.cancel()
            self._prober = None

    def open_remaining(self) -> float:
        """Seconds an open breaker keeps failing calls at most (0 otherwise)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.timeout - time.monotonic())

    def before_call(self) -> None:
        """Admits a call or raises UNAVAILABLE (DEPENDENCY_UNAVAILABLE) at once while open."""
        if self.state is BreakerState.CLOSED:
            return
        now = time.monotonic()
        if self.state is BreakerState.OPEN:
            wait = self._opened_at + self.timeout - now
            if wait > 0:
                if self._health_check is not None:  # it may be back as soon as it is healthy
                    wait = min(wait, PROBE_MAX_DELAY)
                    what = "circuit open; probing its health"
                else:
                    what = f"circuit open; retry in {wait:.0f} s"
                raise DependencyUnavailable(
                    self.name, f"{self.name} is unavailable ({what})", circuit="open",
                    retry_after=wait,
                )  # fmt: skip
            self._half_open(f"{self.timeout:.0f} s open timeout passed")
        if self._probe_started is not None and now - self._probe_started < PROBE_CALL_HOLD:
            raise DependencyUnavailable(
                self.name,
                f"{self.name} is unavailable (circuit half-open, probe in flight)",
                circuit="half-open",
            )
        self._probe_started = now

    def record_success(self) -> None:
        self._probe_started = None
        self.failure_count = 0
        if self.state is not _CLOSED:
            self._set_state(_CLOSED, "a call succeeded")

    def record_error(self, error: grpc.aio.AioRpcError, *, caller_deadline: bool = False) -> None:
        """A downstream call's error, judged by `record_status`."""
        self.record_status(
            error.code(),
            has_details(error.trailing_metadata()),
            caller_deadline=caller_deadline,
            message=error.details() or "",
        )

    def record_status(
        self,
        code: grpc.StatusCode,
        details: bool,
        *,
        caller_deadline: bool = False,
        message: str = "",
    ) -> None:
        """A call's outcome: its status, whether its trailers carried google.rpc details,
        and whether a DEADLINE_EXCEEDED was the caller's own (shorter) deadline."""
        if counts_as_failure(code, details, caller_deadline):
            self._failure(code, message)
        elif code is _CANCELLED or code is _DEADLINE_EXCEEDED:
            self._probe_started = None  # the caller left: this says nothing of the back end
        else:
            self.record_success()  # a live server answered

    def record_failure(self, code: grpc.StatusCode | None, message: str = "") -> None:
        """For non-gRPC back ends (HTTP): `code` is what their failure maps to."""
        self.record_status(code or grpc.StatusCode.UNKNOWN, False, message=message)

    def _failure(self, code: grpc.StatusCode, message: str) -> None:
        self._probe_started = None
        self.failure_count += 1
        self.last_error = f"{code.name}: {message}" if message else code.name
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failure_count >= self.failure_threshold
        ):
            self._opened_at = time.monotonic()
            self._set_state(BreakerState.OPEN, "")
            self._start_probing()

    def _half_open(self, why: str) -> None:
        self._probe_started = None
        self._set_state(BreakerState.HALF_OPEN, f"{why}; admitting a probe call")

    def _start_probing(self) -> None:
        check = self._health_check
        if check is None or (self._prober and not self._prober.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (plain sync use): the timeout alone reopens
            return
        self._prober = loop.create_task(self._probe_health(check), name=f"breaker-{self.name}")

    async def _probe_health(self, check: Callable[[], Awaitable[bool]]) -> None:
        """Checks the back end's health with backoff while open; SERVING → half-open."""
        delay = PROBE_FIRST_DELAY
        while self.state is BreakerState.OPEN:
            await asyncio.sleep(delay)
            if self.state is not BreakerState.OPEN:
                return
            try:
                serving = await check()
            except Exception:  # any failure to answer is "not yet"
                serving = False
            if serving and self.state is BreakerState.OPEN:
                self._half_open("health check answered SERVING")
                return
            delay = min(delay * 2, PROBE_MAX_DELAY)
