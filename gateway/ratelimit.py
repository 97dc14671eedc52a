# Over 600 lines on purpose: the login and API limiters share the Redis scripts, the
# in-process fallback and the refusal format; most of it is the API limiter's exact
# sliding window with the relay's leased calls, which only makes sense read together.
"""Rate limits (seed): failed logins per username and per client address, API calls per user.

API: a sliding-window log per user, exact in any window of `api_window` seconds. Redis
holds it as a sorted set of runs (the calls one round trip admitted, or reserved, count
from the same moment: one member each, scored with the time until which they count, their
number in a hash beside it with the running total), so Redis's work is per round trip,
not per call; one Lua script trims it, counts and admits, on Redis's clock, so replicas
agree. Callers waiting on one replica share a round trip (all of them are admitted or
refused at once). A busy user also gets a few calls reserved for the relay's fast path:
they count from the moment they are reserved until their short lease ends; the replica
then settles them (spent ones count from the settling time, unspent ones go back). A
refusal waits for other replicas' leases to settle, so it is final: no call of that user
succeeds anywhere until the oldest counted call really slides out of the window. While
Redis is unreachable the same log is kept in process (each replica then limits alone).

Login: only verified failures count. A password check starts only while the failures
plus the checks in flight stay under the limit (per username and per address, one Lua
script), so a burst verifies at most `login_attempts` wrong passwords; other attempts wait
for the checks ahead of them. A check that ends without a verdict (cancelled, the user
store failing) counts nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import grpc

from aiwfe.runtime.aio import wait_event
from aiwfe.runtime.config import RateLimitSettings
from aiwfe.runtime.errors import ResourceExhausted
from aiwfe.runtime.redis_client import RedisClient

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# The log keeps runs, not calls: the calls one trip admits count from the same moment,
# and so do those it reserves, so each run is one sorted-set member (`<trip>:a`,
# `<trip>:r`) with its count in a hash beside it (KEYS[3], field '#' the total). Exact as
# a member per call would be, at a cost per trip instead of per call.
_RUNS = """
local function trim(key, counts, now, window)
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - window, 'LIMIT', 0, 1000)
  while #old > 0 do
    local gone = 0
    for _, m in ipairs(old) do gone = gone + tonumber(redis.call('HGET', counts, m) or '0') end
    redis.call('ZREM', key, unpack(old))
    redis.call('HDEL', counts, unpack(old))
    redis.call('HINCRBY', counts, '#', -gone)
    old = redis.call('ZRANGEBYSCORE', key, '-inf', now - window, 'LIMIT', 0, 1000)
  end
end
"""
# A lease (calls reserved for a replica's fast path) is open until its replica settles
# it: spent calls then count from now if their lease runs later, the unspent ones go.
# KEYS[2] maps open leases → ms when they end; a lease its replica never settles
# (crashed) closes _LEASE_GRACE_MS after its end, its calls counted as spent until then.
# ARGV[s..s+1] = trip, spent.
_SETTLE = """
local function settle(key, leases, counts, now, s)
  local trip, spent = ARGV[s], tonumber(ARGV[s + 1])
  if redis.call('HDEL', leases, trip) == 0 then return end
  local m = trip .. ':r'
  local had = tonumber(redis.call('HGET', counts, m) or '0')
  if had == 0 then return end
  if spent > 0 then
    redis.call('ZADD', key, 'XX', 'LT', now, m)
    redis.call('HSET', counts, m, spent)
  else
    redis.call('ZREM', key, m)
    redis.call('HDEL', counts, m)
  end
  redis.call('HINCRBY', counts, '#', spent - had)
end
"""
_LEASE_GRACE_MS = 2000
# KEYS[1]: the user's runs (member → ms until which its calls count), KEYS[2]: its open
# leases, KEYS[3]: each run's count and the total ('#').
# ARGV: limit, need, extra, window ms, lease ms, trip id, then a lease to settle first
# (trip '' = none). Admits min(need, free) calls now and reserves up to `extra` (at most a
# quarter of what stays free) until now + lease. Returns {admitted, reserved, retry ms,
# held ms}: when nothing is admitted, either open leases of other replicas may still
# give calls back (held ms: ask again then) or the refusal is final until the oldest
# call slides out (retry ms).
_API_ADMIT = (
    _NOW_MS
    + _RUNS
    + _SETTLE
    + f"local grace = {_LEASE_GRACE_MS}"
    + """
local key, leases, counts = KEYS[1], KEYS[2], KEYS[3]
if ARGV[7] ~= '' then settle(key, leases, counts, now, 7) end
local limit, need, extra = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, lease, trip = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
trim(key, counts, now, window)
local free = limit - tonumber(redis.call('HGET', counts, '#') or '0')
if free <= 0 then
  local soonest = nil
  local open = redis.call('HGETALL', leases)
  for i = 1, #open, 2 do
    local ends = tonumber(open[i + 1])
    if ends + grace <= now then
      redis.call('HDEL', leases, open[i])
    elseif soonest == nil or ends < soonest then
      soonest = ends
    end
  end
  if soonest then return {0, 0, 0, math.max(10, math.min(100, soonest - now + 10))} end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, 0, tonumber(oldest[2]) + window - now, 0}
end
local admitted = math.min(need, free)
local reserved = math.max(0, math.min(extra, math.floor((free - admitted) / 4)))
if admitted > 0 then
  redis.call('ZADD', key, now, trip .. ':a')
  redis.call('HSET', counts, trip .. ':a', admitted)
end
if reserved > 0 then
  redis.call('ZADD', key, now + lease, trip .. ':r')
  redis.call('HSET', counts, trip .. ':r', reserved)
  redis.call('HSET', leases, trip, now + lease)
  redis.call('PEXPIRE', leases, lease + grace + 1000)
end
redis.call('HINCRBY', counts, '#', admitted + reserved)
redis.call('PEXPIRE', key, window + lease + 1000)
redis.call('PEXPIRE', counts, window + lease + 1000)
return {admitted, reserved, 0, 0}
"""
)
_API_SETTLE = _NOW_MS + _SETTLE + "settle(KEYS[1], KEYS[2], KEYS[3], now, 1)\nreturn 1\n"

# KEYS: username failures, address failures, username checks, address checks (sorted sets
# of check id → ms until which it holds its slot). ARGV: username limit, address limit,
# check id, hold ms. Returns {1} (check), {0, which, pttl} (refused: failures at the
# limit; which 1 = username, 2 = address) or {2} (wait for the checks in flight).
_LOGIN_BEGIN = (
    _NOW_MS
    + """
for i = 1, 2 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[i]) then
    return {0, i, redis.call('PTTL', KEYS[i])}
  end
end
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 2], '-inf', now)
  local failed = tonumber(redis.call('GET', KEYS[i]) or '0')
  if failed + redis.call('ZCARD', KEYS[i + 2]) >= tonumber(ARGV[i]) then return {2, i, 0} end
end
for i = 3, 4 do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
return {1, 0, 0}
"""
)
# KEYS as above. ARGV: check id, failed (1/0), window ms, username limit, address limit.
# A failure starts the window (and the failure that reaches the limit restarts it: the
# lock lasts the whole window).
_LOGIN_END = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[2] == '1' then
  for i = 1, 2 do
    local n = redis.call('INCR', KEYS[i])
    if n == 1 or n >= tonumber(ARGV[i + 3]) then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
  end
end
return 1
"""


def _digest(value: str) -> str:
    """Keys never carry raw usernames or addresses (bounded length, nothing to leak)."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]


# The client's peer, added by the gateway's relay to the calls it passes to the gateway's
# own gRPC server; believed only on that server's private Unix socket.
RELAYED_PEER_KEY = "x-aiwfe-client-peer"


def caller_peer(context: grpc.aio.ServicerContext) -> str | None:
    """The gRPC peer of the client behind a call, through the gateway's relay or not."""
    peer = context.peer()
    if peer and peer.startswith("unix:"):
        for key, value in context.invocation_metadata() or ():
            if key == RELAYED_PEER_KEY:
                return str(value)
    return peer


def client_address(peer: str | None) -> str:
    """The address part of a gRPC peer string ('ipv4:1.2.3.4:5678' → 'ipv4:1.2.3.4')."""
    if not peer:
        return "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def _refusal(what: str, subject: str, limit: int, reset: float) -> ResourceExhausted:
    reset = max(0.001, reset)
    return ResourceExhausted(
        f"too many {what}; retry in {math.ceil(reset)} s",
        retry_after=reset,
        quota_violations=[(subject, f"at most {limit} {what} per window")],
        reason="RATE_LIMITED",
        metadata={"quota": subject, "limit": str(limit)},
        headers={
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": str(math.ceil(reset)),
        },
    )


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


_MAX_KEYS = 100_000
_CLOSE_SECONDS = 2.0  # what a stopping gateway waits for its Redis settlements


class _LocalWindows:
    """In-process failure counters (the login fallback while Redis is unreachable)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, int]] = {}  # key → (window end, count)

    def count(self, key: str, now: float) -> tuple[int, float]:
        end, n = self._counts.get(key, (0.0, 0))
        return (n, end) if end > now else (0, now)

    def add(self, key: str, window: float, limit: int, now: float) -> None:
        n, end = self.count(key, now)
        if n == 0 or n + 1 >= limit:
            end = now + window
        if len(self._counts) >= _MAX_KEYS:
            self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
            if len(self._counts) >= _MAX_KEYS:  # still full: forget the oldest windows
                self._counts.clear()
        self._counts[key] = (end, n + 1)


class _LocalLog:
    """The API log in process while Redis is unreachable: per user, runs of calls
    [ms until which they count, how many, trip id of a lease], as the Lua script keeps them."""

    def __init__(self) -> None:
        self._logs: dict[str, list[list[Any]]] = {}

    def admit(
        self, key: str, limit: int, need: int, extra: int, window: int, lease: int, trip: str,
        settle: tuple[str, int] | None,
    ) -> tuple[int, int, int, int]:  # fmt: skip
        now = _now_ms()
        if settle is not None:
            self.settle(key, settle)
        if key not in self._logs and len(self._logs) >= _MAX_KEYS:
            self._logs = {k: v for k, v in self._logs.items() if v and v[-1][0] > now - window}
        runs = self._logs.setdefault(key, [])
        runs[:] = [r for r in runs if r[0] > now - window]
        free = limit - sum(r[1] for r in runs)
        if free <= 0:
            if any(r[2] for r in runs):  # a lease still open: it may give calls back
                return 0, 0, 0, 10
            return 0, 0, min(r[0] for r in runs) + window - now, 0
        admitted = min(need, free)
        reserved = max(0, min(extra, (free - admitted) // 4))
        runs.append([now, admitted, ""])
        if reserved:
            runs.append([now + lease, reserved, trip])
        return admitted, reserved, 0, 0

    def settle(self, key: str, lease: tuple[str, int]) -> None:
        now = _now_ms()
        trip, spent = lease
        for run in self._logs.get(key, ()):
            if run[2] == trip:
                run[:] = [min(run[0], now), spent, ""]


@dataclass(slots=True)
class _Quota:
    """One user's calls on this replica."""

    admitted: int = 0  # admitted for callers waiting in `acquire`, not yet taken
    waiting: int = 0  # callers in `acquire`
    left: int = 0  # reserved calls the fast path may still spend
    until: float = 0.0  # monotonic end of their lease here (before Redis's end)
    trip: str = ""  # the lease to settle: trip id and how many it reserved
    reserved: int = 0
    timer: asyncio.TimerHandle | None = None
    last_trip: float = -math.inf
    last_used: int = 0  # calls admitted by the previous trip (waiting and reserved)
    refused_until: float = 0.0  # a final refusal, known here until then
    pending: asyncio.Future[None] | None = None
    limit: int = 0  # the user's limit, as its last waiting call's roles gave it


class ApiLimiter:
    """API requests per user per sliding window; the limit is the most generous of the
    user's roles."""

    def __init__(self, settings: RateLimitSettings, redis: RedisClient) -> None:
        self._window_ms = settings.api_window * 1000
        self._lease_ms = max(1, min(settings.api_reserve_lease_ms, self._window_ms // 20))
        self._default = settings.api_requests
        self._per_role = dict(settings.api_requests_per_role)
        self._batch = settings.api_reserve_batch
        self._redis = redis
        self._admit = redis.client.register_script(_API_ADMIT) if redis.client else None
        self._settle = redis.client.register_script(_API_SETTLE) if redis.client else None
        self._quotas: dict[str, _Quota] = {}
        self._local = _LocalLog()
        self._replica = uuid.uuid4().hex[:8]
        self._trips = itertools.count()
        self._settling: set[asyncio.Task[None]] = set()
        self.limit_for = lru_cache(maxsize=1024)(self._limit_for)

    def _limit_for(self, roles: tuple[str, ...]) -> int:
        return max((self._per_role.get(r, self._default) for r in roles), default=self._default)

    def batch_for(self, limit: int) -> int:
        """The most calls reserved per trip: the configured batch, or 1% of a large limit
        (at most 1,000), so a high limit costs one round trip per hundreds of requests."""
        return max(self._batch, min(1000, limit // 100))

    def try_local(self, user_id: str) -> bool:
        """Spends one reserved call (the relay's hot path); False when none is left in lease.

        A busy user (a lease reserved within the window) found without quota gets its next
        lease asked for from here at once, sized on its last one, rather than once one of
        its calls has passed the gateway server's queue (~0.15 s under load) to `acquire`
        and regrown from two calls a round trip at a time: meanwhile its calls take the full
        path, where that server's own load shedding refuses them late."""
        q = self._quotas.get(user_id)
        if q is None:
            return False
        if self._spend(user_id, q):
            return True
        now = time.monotonic()
        if (
            q.pending is None
            and q.limit
            and now >= q.refused_until
            and now - q.last_trip < self._window_ms / 1000
        ):
            q.pending = asyncio.ensure_future(self._refill(user_id, q))
        return False

    def _spend(self, user_id: str, q: _Quota) -> bool:
        """Spends one reserved call of `q`, if its lease has one left.

        A lease down to its last half of calls (or of its time) is renewed ahead, in the
        background, while its rest is still spent: a busy user's calls never find the
        relay without quota while a trip is on its way (half the time leaves room for a
        round trip slowed by a busy event loop; a quarter, ~100 ms, did not always)."""
        if q.left <= 0:
            return False
        now = time.monotonic()
        if now >= q.until:
            return False
        q.left -= 1
        if (
            q.pending is None
            and q.limit
            and (q.left * 2 <= q.reserved or now >= q.until - self._lease_ms * 0.4 / 1000)
        ):
            q.pending = asyncio.ensure_future(self._refill(user_id, q))
        return True

    async def acquire(self, user_id: str, roles: tuple[str, ...]) -> None:
        """Admits one request or raises ResourceExhausted with retry and quota details."""
        q = self._quotas.get(user_id)
        if q is None:
            if len(self._quotas) >= _MAX_KEYS:
                self._forget_idle()
            q = self._quotas[user_id] = _Quota()
        limit = q.limit = self.limit_for(roles)
        q.waiting += 1
        try:
            while True:
                if q.admitted > 0:
                    q.admitted -= 1
                    return
                if self._spend(user_id, q):
                    return
                now = time.monotonic()
                if now < q.refused_until:
                    raise _refusal("requests", "api:user", limit, q.refused_until - now)
                if q.pending is None:
                    q.pending = asyncio.ensure_future(self._trip(user_id, q, limit))
                # Shielded: a caller that gives up does not cancel the others' answer.
                await asyncio.shield(q.pending)
        finally:
            q.waiting -= 1
            # Slots admitted for callers that gave up are not kept for later ones (they
            # stay counted in the log: the safe side).
            q.admitted = min(q.admitted, q.waiting)

    def _keys(self, user_id: str) -> list[str]:
        """The user's log of runs, open leases and run counts in Redis (`_API_ADMIT`)."""
        key = self._redis.key(f"ratelimit:api-runs:{_digest(user_id)}")
        return [key, key + ":leases", key + ":counts"]

    def _forget_idle(self) -> None:
        self._quotas = {k: q for k, q in self._quotas.items() if q.waiting or q.trip or q.pending}

    def _take_lease(self, q: _Quota) -> tuple[str, int] | None:
        """The lease to settle (trip, calls spent); nothing is left to spend."""
        if not q.trip:
            return None
        lease = (q.trip, q.reserved - q.left)
        q.trip, q.left = "", 0
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        return lease

    async def _trip(self, user_id: str, q: _Quota, limit: int) -> None:
        """One decision for every caller waiting now, and a lease for the calls that follow."""
        try:
            settle = self._take_lease(q)
            need = max(1, q.waiting - q.admitted)
            started = time.monotonic()
            # Reserve for the calls that usually follow: two, or twice the last trip's
            # calls for a user seen again within the window (or twice what it spent of it).
            busy = started - q.last_trip < self._window_ms / 1000
            recent = max(q.last_used if busy else 0, settle[1] if settle else 0)
            extra = min(self.batch_for(limit), max(2, 2 * recent))
            trip = f"{self._replica}{next(self._trips)}"
            keys = self._keys(user_id)
            window, lease = self._window_ms, self._lease_ms
            result = None
            if settle is not None:
                self._local.settle(user_id, settle)  # reserved in process (Redis was down)?
            if self._admit is not None:
                flat = settle or ("", 0)
                result = await self._redis.eval_script(
                    self._admit, keys, [limit, need, extra, window, lease, trip, *flat]
                )
            if result is None:
                result = self._local.admit(user_id, limit, need, extra, window, lease, trip, settle)
            admitted, reserved, retry_ms, held_ms = (int(x) for x in result)
            q.last_trip, q.last_used = started, admitted + reserved
            q.admitted += admitted
            if reserved:
                self._install(user_id, q, trip, reserved, started)
            if admitted == 0:
                if held_ms > 0:
                    await asyncio.sleep(held_ms / 1000)
                else:
                    q.refused_until = time.monotonic() + retry_ms / 1000
        finally:
            q.pending = None

    async def _refill(self, user_id: str, q: _Quota) -> None:
        """A new lease for a busy user's fast path, reserved while the current one is still
        spent (or asked for by the relay once it is gone); the current one is settled once
        the new one is in place. Both count in the log meanwhile, so the limit holds (a
        renewal near the limit just reserves less, or nothing: then the relay asks no more
        and calls wait for a trip of `acquire`, which refuses them or waits for leases)."""
        try:
            started = time.monotonic()
            extra = min(self.batch_for(q.limit), max(2, 2 * q.reserved))
            trip = f"{self._replica}{next(self._trips)}"
            window, lease = self._window_ms, self._lease_ms
            args = [q.limit, 0, extra, window, lease, trip, "", 0]
            result = None
            if self._admit is not None:
                result = await self._redis.eval_script(self._admit, self._keys(user_id), args)
            if result is None:
                result = self._local.admit(user_id, q.limit, 0, extra, window, lease, trip, None)
            reserved = int(result[1])
            if not reserved:
                q.last_trip = -math.inf  # not busy for the relay until a trip admits again
                return
            q.last_trip, q.last_used = started, reserved
            old = self._take_lease(q)
            self._install(user_id, q, trip, reserved, started)
            if old is not None:
                self._settle_in_background(user_id, old)
        finally:
            q.pending = None

    def _install(self, user_id: str, q: _Quota, trip: str, reserved: int, started: float) -> None:
        """Makes `reserved` calls of lease `trip` spendable by the fast path."""
        # Spent only before Redis's lease ends: it began after `started`; a fifth of it is
        # margin for the settlement to arrive in time.
        q.until = started + self._lease_ms * 0.8 / 1000
        q.trip, q.reserved, q.left = trip, reserved, reserved
        delay = max(0.0, q.until - time.monotonic())
        q.timer = asyncio.get_running_loop().call_later(delay, self._lease_ended, user_id, q)

    def _lease_ended(self, user_id: str, q: _Quota) -> None:
        q.timer = None
        lease = self._take_lease(q)
        if lease is None:
            return
        self._settle_in_background(user_id, lease)

    def _settle_in_background(self, user_id: str, lease: tuple[str, int]) -> None:
        """Closes `lease` in the log: spent calls stay counted, the rest go back."""
        if self._settle is None:
            self._local.settle(user_id, lease)
            return
        task = asyncio.ensure_future(self._settle_lease(user_id, lease))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        """Settles what this replica holds before it stops: the unspent calls of its leases
        go back to their users at once (a lease never settled counts them for the whole
        window, as for a crashed replica), after the trips in flight."""
        trips = {q.pending for q in self._quotas.values() if q.pending is not None}
        if trips:
            await asyncio.wait(trips, timeout=_CLOSE_SECONDS)
        for user_id, q in self._quotas.items():
            if (lease := self._take_lease(q)) is not None:
                self._settle_in_background(user_id, lease)
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=_CLOSE_SECONDS)

    async def _settle_lease(self, user_id: str, lease: tuple[str, int]) -> None:
        if self._settle is None:
            raise RuntimeError("a lease was settled without a Redis settle script")
        # The lease may have been reserved in process while Redis was down: settling it
        # there too is a no-op otherwise.
        self._local.settle(user_id, lease)
        await self._redis.eval_script(self._settle, self._keys(user_id), list(lease))


# Logins of one username waiting on one replica for a check slot; beyond, refused (a
# flood of attempts must not turn into as many polling loops).
MAX_QUEUED_LOGINS = 64


class LoginLimiter:
    """Failed logins: `login_attempts` per username and `login_attempts_per_address` per
    client address, each per `login_window` seconds; only verified failures count."""

    def __init__(self, settings: RateLimitSettings, redis: RedisClient) -> None:
        self._cfg = settings
        self._redis = redis
        self._failures = _LocalWindows()
        self._checks: dict[str, int] = {}  # key → checks in flight (without Redis)
        self._begin = redis.client.register_script(_LOGIN_BEGIN) if redis.client else None
        self._end = redis.client.register_script(_LOGIN_END) if redis.client else None
        self._ending: set[asyncio.Task[None]] = set()
        self._queued: dict[str, int] = {}  # username key → logins waiting here for a slot
        self._ended: dict[str, asyncio.Event] = {}  # username key → set when a check ends
        self._starting: dict[str, asyncio.Lock] = {}  # username key → its queue for a slot

    async def close(self) -> None:
        """Waits for the password checks' slots being given back (shielded from their
        cancelled calls), so a stopping gateway leaves none held until it lapses."""
        if self._ending:
            await asyncio.wait(set(self._ending), timeout=_CLOSE_SECONDS)

    def _keys(self, username: str, address: str) -> list[str]:
        user, addr = _digest(username), _digest(address)
        return [
            self._redis.key(f"ratelimit:login:user:{user}"),
            self._redis.key(f"ratelimit:login:addr:{addr}"),
            self._redis.key(f"ratelimit:login:checks:user:{user}"),
            self._redis.key(f"ratelimit:login:checks:addr:{addr}"),
        ]

    def _refused(self, which: int, reset: float) -> ResourceExhausted:
        if which == 0:
            return _refusal("failed logins", "login:username", self._cfg.login_attempts, reset)
        return _refusal(
            "failed logins", "login:client_address", self._cfg.login_attempts_per_address, reset
        )

    @asynccontextmanager
    async def check(self, username: str, address: str) -> AsyncIterator[_Check]:
        """Holds a password-check slot for the block; `failed()` inside it counts one
        failure when the block ends. Refuses (ResourceExhausted) when either limit is
        spent; waits while the checks in flight could still reach it."""
        keys = self._keys(username, address)
        queued = self._queued.get(keys[0], 0)
        if queued >= MAX_QUEUED_LOGINS:  # a flood waiting for one account: not served
            raise _refusal("concurrent logins", "login:username", MAX_QUEUED_LOGINS, 1.0)
        attempt = _Check(uuid.uuid4().hex, in_redis=False)
        self._queued[keys[0]] = queued + 1
        lock = self._starting.setdefault(keys[0], asyncio.Lock())
        try:
            async with lock:  # one login per username asks Redis for a slot at a time here
                attempt.in_redis = await self._start(keys, attempt.id)
        finally:
            if self._queued[keys[0]] <= 1:
                del self._queued[keys[0]]
                del self._starting[keys[0]]
                self._ended.pop(keys[0], None)  # nobody here waits on it any more
            else:
                self._queued[keys[0]] -= 1
        try:
            yield attempt
        finally:
            # Shielded: a cancelled login still gives its slot back (and counts nothing).
            task = asyncio.ensure_future(self._finish(keys, attempt))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
            await asyncio.shield(task)

    async def _start(self, keys: list[str], check_id: str) -> bool:
        """Takes a slot: True in Redis, False in process (Redis unreachable)."""
        cfg = self._cfg
        limits = (cfg.login_attempts, cfg.login_attempts_per_address)
        hold = cfg.login_check_hold
        give_up = time.monotonic() + hold
        pause = 0.01
        while True:
            result = None
            if self._begin is not None:
                result = await self._redis.eval_script(
                    self._begin, keys, [limits[0], limits[1], check_id, hold * 1000]
                )
            if result is not None:
                if int(result[0]) == 1:
                    return True
                if int(result[0]) == 0:
                    raise self._refused(int(result[1]) - 1, int(result[2]) / 1000)
            elif self._start_local(keys, limits):
                return False
            if time.monotonic() > give_up:  # checks stuck in flight: say when to retry
                raise self._refused(0, 1.0)
            # Woken when a check of this username ends here; other replicas' are polled.
            ended = self._ended.setdefault(keys[0], asyncio.Event())
            await wait_event(ended, pause)
            pause = min(0.25, pause * 2)

    def _start_local(self, keys: list[str], limits: tuple[int, int]) -> bool:
        now = time.monotonic()
        for which in range(2):
            n, end = self._failures.count(keys[which], now)
            if n >= limits[which]:
                raise self._refused(which, end - now)
        for which in range(2):
            if (
                self._failures.count(keys[which], now)[0] + self._checks.get(keys[which + 2], 0)
                >= limits[which]
            ):
                return False
        for key in keys[2:]:
            self._checks[key] = self._checks.get(key, 0) + 1
        return True

    async def _finish(self, keys: list[str], attempt: _Check) -> None:
        try:
            await self._end_check(keys, attempt)
        finally:
            ended = self._ended.pop(keys[0], None)
            if ended is not None:
                ended.set()

    async def _end_check(self, keys: list[str], attempt: _Check) -> None:
        cfg = self._cfg
        if attempt.in_redis:
            done = await self._redis.eval_script(
                self._end,
                keys,
                [
                    attempt.id,
                    int(attempt.failure),
                    cfg.login_window * 1000,
                    cfg.login_attempts,
                    cfg.login_attempts_per_address,
                ],
            )
            if done is not None or not attempt.failure:
                return  # (a lost slot frees itself after login_check_hold)
        else:
            for key in keys[2:]:
                if self._checks.get(key, 0) <= 1:
                    self._checks.pop(key, None)
                else:
                    self._checks[key] -= 1
        if attempt.failure:
            now = time.monotonic()
            limits = (cfg.login_attempts, cfg.login_attempts_per_address)
            for which in range(2):
                self._failures.add(keys[which], cfg.login_window, limits[which], now)


@dataclass(slots=True)
class _Check:
    """One password check holding its slot."""

    id: str
    in_redis: bool
    failure: bool = False

    def failed(self) -> None:
        """The password was checked and was wrong (or the account cannot log in)."""
        self.failure = True
