"""An asyncio circuit breaker per downstream, as the seed specifies.

Only failures that mean the downstream is sick count (UNAVAILABLE, DEADLINE_EXCEEDED of
our own deadline); a caller's mistake (INVALID_ARGUMENT, NOT_FOUND, INTERNAL, UNKNOWN, its
own short deadline, ...) never opens it.
"""

from __future__ import annotations

import enum
import time
import weakref

import grpc

from aiwfe import metrics
from aiwfe.errors import Unavailable

DETAILS_KEY = "grpc-status-details-bin"
SICK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class BreakerState(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


# Every live breaker, so admins can read their state (SystemService.ListCircuitBreakers).
_LIVE: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def breakers_of(service: str) -> list[CircuitBreaker]:
    """The live breakers held by `service`, sorted by downstream."""
    return sorted((b for b in _LIVE if b.service == service), key=lambda b: b.name)


class CircuitBreaker:
    """CLOSED → (threshold consecutive failures) → OPEN → (timeout) → HALF_OPEN → one probe."""

    def __init__(
        self, name: str, failure_threshold: int = 5, timeout: float = 60.0, service: str = ""
    ) -> None:
        self.name = name
        self.service = service
        self.failure_threshold = failure_threshold
        self.timeout = timeout
        self._state = BreakerState.CLOSED
        self.failure_count = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._gauge = metrics.circuit_breaker_state.labels(service, name)
        self._gauge.set(0)
        _LIVE.add(self)

    @property
    def state(self) -> BreakerState:
        return self._state

    @state.setter
    def state(self, value: BreakerState) -> None:
        if value is not self._state:
            self._state = value
            self._gauge.set(value.value)

    def retire(self) -> None:
        """Stops reporting this breaker (its downstream was closed)."""
        _LIVE.discard(self)

    def open_remaining(self) -> float:
        """Seconds an open breaker keeps failing calls at once (0 otherwise)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.timeout - time.monotonic())

    def before_call(self) -> None:
        """Admits a call or raises Unavailable at once while the circuit is open."""
        if self._state is BreakerState.CLOSED:
            return
        now = time.monotonic()
        if self.state is BreakerState.OPEN:
            wait = self._opened_at + self.timeout - now
            if wait > 0:
                raise Unavailable(
                    f"{self.name} is unavailable (circuit open; retry in {wait:.0f} s)",
                    reason="CIRCUIT_OPEN",
                    metadata={"downstream": self.name},
                )
            self.state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            raise Unavailable(
                f"{self.name} is unavailable (circuit half-open, probe in flight)",
                reason="CIRCUIT_OPEN",
                metadata={"downstream": self.name},
            )
        self._probe_in_flight = True

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
        self.failure_count = 0
        self._probe_in_flight = False

    def record_error(self, error: grpc.aio.AioRpcError) -> None:
        """Counts a downstream's error, unless a live server answered it: an UNAVAILABLE
        that carries google.rpc details (e.g. cognitive saying its LLM backend is down)
        means the downstream is up and only its own dependency is not."""
        details = any(key == DETAILS_KEY for key, _ in error.trailing_metadata() or ())
        self.record_status(error.code(), details)

    def record_status(
        self, code: grpc.StatusCode, details: bool, *, caller_deadline: bool = False
    ) -> None:
        """A call's outcome by its status, and whether its trailers carried details;
        `caller_deadline`: it ran out of the caller's own (shorter) deadline, not ours."""
        if (code is grpc.StatusCode.UNAVAILABLE and details) or caller_deadline:
            self.record_success()
            return
        self.record_failure(code)

    def record_failure(self, code: grpc.StatusCode | None) -> None:
        """Counts a failure if `code` means the downstream is sick; otherwise it is a success."""
        if code not in SICK_CODES:
            self.record_success()
            return
        self._probe_in_flight = False
        self.failure_count += 1
        if self.state is BreakerState.HALF_OPEN or self.failure_count >= self.failure_threshold:
            self.state = BreakerState.OPEN
            self._opened_at = time.monotonic()
