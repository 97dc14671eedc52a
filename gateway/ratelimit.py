"""Rate limits (seed): failed logins per username and per client address, API calls per user.

Both are fixed windows counted atomically in Redis by one Lua script each (no
read-then-write race), with an in-process limiter while Redis is unreachable (then each
replica enforces the limit on its own).

Login: an attempt reserves one failure on both counters *before* the password is checked,
and a successful login gives it back; so N concurrent guesses can never exceed the limit.

API: local-first. Paying a Redis round trip on every request would cost more than the
whole authentication path, so each replica reserves quota from the shared Redis counter in
small batches (atomically, never more than the limit in total) and spends it in process.
Batches shrink as the window fills, so at most a few requests of quota can sit unused on
another replica. A user found exhausted is refused locally until the window ends.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import grpc

from aiwfe.config import RateLimitSettings
from aiwfe.errors import ResourceExhausted
from aiwfe.redis_client import RedisClient

# KEYS: username counter, address counter. ARGV: user limit, address limit, window ms.
# Returns {1} when an attempt is reserved, else {0, which (1 user, 2 address), pttl}.
_LOGIN_RESERVE = """
local u = tonumber(redis.call('GET', KEYS[1]) or '0')
local a = tonumber(redis.call('GET', KEYS[2]) or '0')
if u >= tonumber(ARGV[1]) then return {0, 1, redis.call('PTTL', KEYS[1])} end
if a >= tonumber(ARGV[2]) then return {0, 2, redis.call('PTTL', KEYS[2])} end
for i = 1, 2 do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return {1, 0, 0}
"""
_LOGIN_REFUND = """
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 1
"""
# KEYS: the user's counter for this window. ARGV: limit, max batch, window ms.
# Returns {granted, used after the grant, pttl}.
_API_RESERVE = """
local limit = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[2]), math.max(1, math.floor((limit - used) / 4)))
if used >= limit then return {0, used, redis.call('PTTL', KEYS[1])} end
grant = math.min(grant, limit - used)
used = redis.call('INCRBY', KEYS[1], grant)
if used == grant then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {grant, used, redis.call('PTTL', KEYS[1])}
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


class _LocalWindows:
    """In-process fixed-window counters (the fallback while Redis is unreachable)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._counts: dict[str, tuple[float, int]] = {}  # key → (window end, count)
        self._max = max_keys

    def count(self, key: str, now: float) -> tuple[int, float]:
        end, n = self._counts.get(key, (0.0, 0))
        return (n, end) if end > now else (0, now)

    def add(self, key: str, delta: int, window: float, now: float) -> None:
        n, end = self.count(key, now)
        if n == 0:
            end = now + window
        if len(self._counts) >= self._max:
            self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
            if len(self._counts) >= self._max:  # still full: forget the oldest windows
                self._counts.clear()
        self._counts[key] = (end, max(0, n + delta))


class LoginLimiter:
    """Failed logins: `login_attempts` per username and `login_attempts_per_address` per
    client address, each per `login_window` seconds."""

    def __init__(self, settings: RateLimitSettings, redis: RedisClient) -> None:
        self._cfg = settings
        self._redis = redis
        self._local = _LocalWindows()
        self._reserve = redis.client.register_script(_LOGIN_RESERVE) if redis.client else None
        self._refund = redis.client.register_script(_LOGIN_REFUND) if redis.client else None

    def _keys(self, username: str, address: str) -> list[str]:
        return [
            self._redis.key(f"ratelimit:login:user:{_digest(username)}"),
            self._redis.key(f"ratelimit:login:addr:{_digest(address)}"),
        ]

    async def reserve(self, username: str, address: str) -> None:
        """Counts one attempt as failed until `refund`; refuses when either limit is spent."""
        cfg = self._cfg
        keys = self._keys(username, address)
        limits = (cfg.login_attempts, cfg.login_attempts_per_address)
        result = None
        if self._reserve is not None:
            result = await self._redis.eval_script(
                self._reserve, keys, [limits[0], limits[1], cfg.login_window * 1000]
            )
        if result is not None:
            if int(result[0]) == 1:
                return
            which = int(result[1]) - 1
            raise self._refused(which, int(result[2]) / 1000)
        now = time.monotonic()
        for which, key in enumerate(keys):
            n, end = self._local.count(key, now)
            if n >= limits[which]:
                raise self._refused(which, end - now)
        for key in keys:
            self._local.add(key, 1, cfg.login_window, now)

    def _refused(self, which: int, reset: float) -> ResourceExhausted:
        if which == 0:
            return _refusal("failed logins", "login:username", self._cfg.login_attempts, reset)
        return _refusal(
            "failed logins", "login:client_address", self._cfg.login_attempts_per_address, reset
        )

    async def refund(self, username: str, address: str) -> None:
        """A successful login: its reserved attempt was not a failure."""
        keys = self._keys(username, address)
        if self._refund is not None and await self._redis.eval_script(self._refund, keys, []):
            return
        now = time.monotonic()
        for key in keys:
            if self._local.count(key, now)[0]:
                self._local.add(key, -1, self._cfg.login_window, now)


@dataclass(slots=True)
class _Allowance:
    window: int  # window index (epoch seconds // window)
    left: int  # quota reserved by this replica, not yet spent
    exhausted: bool = False


class ApiLimiter:
    """API requests per user per window; the limit is the most generous of the user's roles."""

    def __init__(self, settings: RateLimitSettings, redis: RedisClient) -> None:
        self._window = settings.api_window
        self._default = settings.api_requests
        self._per_role = dict(settings.api_requests_per_role)
        self._batch = settings.api_reserve_batch
        self._redis = redis
        self._script = redis.client.register_script(_API_RESERVE) if redis.client else None
        self._allowances: dict[str, _Allowance] = {}
        self._local = _LocalWindows()
        self.limit_for = lru_cache(maxsize=1024)(self._limit_for)

    def _limit_for(self, roles: tuple[str, ...]) -> int:
        return max((self._per_role.get(r, self._default) for r in roles), default=self._default)

    def batch_for(self, limit: int) -> int:
        """Quota reserved per Redis trip: the configured batch, or 1% of a large limit (at
        most 1,000), so a high limit costs one round trip per hundreds of requests while a
        small one (the seed's 100/min) keeps its fine-grained batches."""
        return max(self._batch, min(1000, limit // 100))

    def try_local(self, user_id: str) -> bool:
        """Spends one locally reserved request (the hot path); False when none is left."""
        a = self._allowances.get(user_id)
        if a is None or a.left <= 0 or a.window != int(time.time()) // self._window:
            return False
        a.left -= 1
        return True

    async def acquire(self, user_id: str, roles: tuple[str, ...]) -> None:
        """Admits one request or raises ResourceExhausted with retry and quota details."""
        if self.try_local(user_id):
            return
        limit = self.limit_for(roles)
        now = time.time()
        window = int(now) // self._window
        reset = (window + 1) * self._window - now
        a = self._allowances.get(user_id)
        if a is None or a.window != window:
            if len(self._allowances) > 100_000:
                self._allowances.clear()  # bounded; stale windows are worthless anyway
            a = self._allowances[user_id] = _Allowance(window, 0)
        if a.exhausted:
            raise _refusal("requests", "api:user", limit, reset)
        result = None
        if self._script is not None:
            key = self._redis.key(f"ratelimit:api:{user_id}:{window}")
            result = await self._redis.eval_script(
                self._script, [key], [limit, self.batch_for(limit), self._window * 1000 + 1000]
            )
        if result is not None:
            granted = int(result[0])
            if granted > 0:
                a.left += granted - 1
                return
            a.exhausted = True
            raise _refusal("requests", "api:user", limit, reset)
        local_key = f"{user_id}:{window}"
        mono = time.monotonic()
        n, _ = self._local.count(local_key, mono)
        if n >= limit:
            raise _refusal("requests", "api:user", limit, reset)
        # Without Redis this replica's count is the record: reserve a batch from it too,
        # so the next calls are admitted by try_local (the gateway relay's fast path).
        grant = max(1, min(self.batch_for(limit), limit - n))
        self._local.add(local_key, grant, reset, mono)
        a.left += grant - 1
