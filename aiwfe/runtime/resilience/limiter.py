"""Adaptive concurrency limit: how many unary calls a service works on at once.

The gradient family, as Envoy's adaptive concurrency filter (after Netflix
concurrency-limits' Gradient2): the limit follows the ratio of the service's no-load
latency to its latency now. Calls over the limit are refused at once (the shedding
interceptor answers them RESOURCE_EXHAUSTED with RetryInfo) instead of waiting in the
event loop, where every call in flight shares the CPU and all of them slow down together.

Every `window_seconds` (once it holds `min_window_samples` completions) the window's mean
latency `short` is compared with `min_rtt`, the no-load latency (latency under
`latency_floor_seconds` counts as no overload), and with the absolute
`target_latency_seconds`:

    gradient = clamp(min(max(tolerance * min_rtt, floor) / short, target / short), 0.5, 1)
    limit    = smoothed(limit * gradient + sqrt(limit))

`sqrt(limit)` is the headroom that lets the limit probe upwards while latency holds; it is
only added when the window used more than half of the limit. `min_rtt` is lowered at once
by any faster window, and raised only by a probe: a window run at `min_limit`, as Envoy
does it (an average of loaded windows, as Gradient2 keeps, would drift up with the load
and let the limit creep with it). Only calls admitted after the probe began are measured
(Envoy's fix for the same skew: calls admitted at the full limit would end in the probe's
window with their loaded latency).

The probe refuses every call over `min_limit` while it runs (Envoy documents the same
rise in 503s), so it runs only when a stale `min_rtt` could be costing callers: when it
is due (every `probe_interval_seconds`) and the last window both refused calls and ran
over the latency allowed. A service whose latency holds within tolerance, or whose limit
refuses nobody, is never probed: its callers are never refused for a measurement.

No library on PyPI fits (the candidates are 0.1 releases that pace a client's outbound
calls and wait for a slot instead of refusing), so this is a small module of our own.

Two places use it, with the same settings (`load_shedding`): every service's gRPC server
(`LoadSheddingInterceptor`, aiwfe/runtime/interceptors.py), and the gateway's relay, which keeps
one limiter per back end for the calls it sends straight there (gateway/front.py) and
refuses at the first HEADERS frame, before a call can queue anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aiwfe.runtime.config import LoadSheddingSettings
from aiwfe.runtime.errors import ResourceExhausted

REFUSED_SHARE = 0.05  # of a window's calls; more makes the RetryInfo delay grow


class ConcurrencyLimiter:
    """Admission by a concurrency limit, adaptive or fixed (`fixed_limit`). Not
    thread-safe: used from the event loop only."""

    __slots__ = (
        "_admitted",
        "_cfg",
        "_clock",
        "_count",
        "_limit",
        "_max_seen",
        "_next_probe",
        "_probe_began",
        "_probing",
        "_refused",
        "_retry_after",
        "_sum",
        "_window_end",
        "in_flight",
        "min_rtt",
        "refused",
        "short",
    )

    def __init__(
        self, cfg: LoadSheddingSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._limit = float(cfg.fixed_limit or cfg.initial_limit)
        self.min_rtt: float | None = None  # no-load latency (s)
        self.short: float | None = None  # the last window's mean latency (s)
        self.in_flight = 0
        self.refused = 0  # since start (tests, diagnostics)
        self._sum = 0.0
        self._count = 0
        self._admitted = 0  # this window
        self._refused = 0  # this window
        self._max_seen = 0
        self._retry_after = cfg.min_retry_after_seconds
        now = clock()
        self._window_end = now + cfg.window_seconds
        self._probing = False
        self._probe_began = now
        self._next_probe = now + cfg.probe_interval_seconds

    @property
    def limit(self) -> int:
        """The limit in force (min_limit while min_rtt is being measured)."""
        return self._cfg.min_limit if self._probing else int(self._limit)

    def try_acquire(self, time_remaining: float | None = None) -> float | None:
        """A start time to pass to `release`, or None: refuse the call now.

        A call is also refused, when others are in flight, if its remaining deadline is
        shorter than what admitted calls take now: it would end DEADLINE_EXCEEDED after
        using the capacity anyway.
        """
        if self.in_flight >= self.limit or (
            self.in_flight  # idle: admitted, so a stale estimate cannot lock callers out
            and time_remaining is not None
            and self.short is not None
            and time_remaining < self.short
        ):
            self.refused += 1
            self._refused += 1
            return None
        self.in_flight += 1
        self._admitted += 1
        if self.in_flight > self._max_seen:
            self._max_seen = self.in_flight
        return self._clock()

    def cancel(self) -> None:
        """Gives back a slot whose call was not run after all (no latency to learn from)."""
        self.in_flight -= 1
        self._admitted -= 1

    def refusal(self, who: str = "server") -> ResourceExhausted:
        """What a refused call is answered: RESOURCE_EXHAUSTED, reason OVERLOADED, RetryInfo
        (`who`: the service at its limit, as its message names it)."""
        return ResourceExhausted(
            f"{who} overloaded: {self.in_flight} calls in flight (limit {self.limit}); "
            "retry after the delay given",
            retry_after=self._retry_after,
            reason="OVERLOADED",
            metadata={"limit": str(self.limit)},
        )

    def release(self, started: float) -> None:
        """Ends an admitted call and feeds its latency to the limit."""
        self.in_flight -= 1
        now = self._clock()
        if self._probing and started < self._probe_began:
            return  # admitted at the full limit: its latency is no no-load measure
        self._sum += now - started
        self._count += 1
        if now >= self._window_end and self._count >= self._cfg.min_window_samples:
            self._update(self._sum / self._count, now)
            self._sum, self._count, self._max_seen = 0.0, 0, self.in_flight
            self._admitted = self._refused = 0
            self._window_end = now + self._cfg.window_seconds

    def retry_after(self) -> float:
        """What a refused caller is told to wait (RetryInfo)."""
        return self._retry_after

    def _pace_retries(self) -> None:
        """Refused callers that come back at once keep the queue in front of the
        interceptors full (a refusal is a call too), and every call waits in it, admitted
        or not, where no handler sees it. So the RetryInfo delay grows while a
        window refuses more than `REFUSED_SHARE` of its calls and shrinks while it does
        not: it settles where the callers awake are about as many as the limit admits."""
        if self._refused > REFUSED_SHARE * (self._admitted + self._refused):
            self._retry_after = min(self._cfg.max_retry_after_seconds, self._retry_after * 1.5)
        else:
            floor = self._cfg.min_retry_after_seconds
            self._retry_after = max(floor, self._retry_after * 0.9)

    def _update(self, short: float, now: float) -> None:
        cfg = self._cfg
        self.short = short
        self._pace_retries()
        if self._probing or self.min_rtt is None or short < self.min_rtt:
            self.min_rtt = short
        if self._probing:
            self._probing = False
            self._next_probe = now + cfg.probe_interval_seconds
            return
        if cfg.fixed_limit:
            return
        # Latency under the floor is no overload, however far over min_rtt (a burst).
        allowed = max(cfg.tolerance * self.min_rtt, cfg.latency_floor_seconds)
        if now >= self._next_probe:
            if short > allowed and self._refused and self._max_seen > cfg.min_limit:
                self._probing = True  # at min_limit every window is a no-load measure
                self._probe_began = now
            else:
                # min_rtt is not what holds callers back (latency within what it allows,
                # or nobody refused): a probe would only refuse them. Look again later.
                self._next_probe = now + cfg.probe_interval_seconds
        gradient = min(allowed / short, cfg.target_latency_seconds / short)
        gradient = max(0.5, min(1.0, gradient))
        limit = self._limit
        headroom = math.sqrt(limit) if self._max_seen * 2 >= limit else 0.0
        limit += (limit * gradient + headroom - limit) * cfg.smoothing
        self._limit = max(float(cfg.min_limit), min(float(cfg.max_limit), limit))
