"""Gateway authentication cost: `python -m benchmarks.auth`.

In-process microbenchmarks of the real interceptor logic (no network): the cached
authn + rate-limit + authz path per call (CPU time), the same including the handler
wrapping grpc needs, the same with the API limiter on the real Redis (`AIWFE_BENCH_REDIS`,
default redis://127.0.0.1:6379/0; skipped if unreachable) at the seed's 100 calls per
minute raised to 1,000 (batches of 10), and a cold HS256 verification; printed next to
the seed's targets.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid

import grpc

from aiwfe.runtime.config import load_settings
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.redis_client import RedisClient
from gateway.authn import AuthInterceptor
from gateway.policies import method_table
from gateway.ratelimit import ApiLimiter
from gateway.tokens import TokenService

SEED_TARGETS_MS = {"jwt_validation": 20.0, "session_lookup": 10.0, "total": 30.0}
EMBED = "/aiwfe.cognitive.v1.CognitiveService/Embed"


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: tuple) -> None:
        self.method = method
        self.invocation_metadata = metadata


async def _bench(n: int) -> dict[str, float]:
    settings = load_settings(
        env={},
        overrides={
            "authentication": {
                "jwt": {"secret_key": secrets.token_urlsafe(32)},
                # A limit that never refuses: we measure the admit path, not refusals.
                "rate_limiting": {"api_requests": 10**9},
            }
        },
    )
    redis = RedisClient(settings.redis)  # unconfigured: in-process limiter + L1 only
    tokens = TokenService(settings.authentication, redis)
    methods = method_table()
    interceptor = AuthInterceptor(
        methods,
        tokens,
        Rbac(settings.rbac),
        limiter=ApiLimiter(settings.authentication.rate_limiting, redis),
    )
    token = tokens.issue("3f1c2d4e-0000-4000-8000-000000000001", "bench", ["user"]).token
    metadata = (("authorization", f"Bearer {token}"), ("user-agent", "bench"))
    info = methods[EMBED]
    await interceptor.admit(info, metadata)  # warm: L1 filled, quota reserved

    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)

    async def continuation(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    details = _Details(EMBED, metadata)
    out: dict[str, float] = {}
    for name, step in (
        ("admit", lambda: interceptor.admit(info, metadata)),
        ("intercept_service", lambda: interceptor.intercept_service(continuation, details)),
    ):
        cpu = time.process_time()
        for _ in range(n):
            await step()
        out[name] = (time.process_time() - cpu) / n * 1e6
    cold = min(n // 10, 5000)
    key = tokens.keys.signing
    cpu = time.process_time()
    for _ in range(cold):
        tokens.decode(token, key)
    out["hs256_verify"] = (time.process_time() - cpu) / cold * 1e6
    cpu = time.process_time()
    for _ in range(cold):
        await tokens.verify_signature(token)
    out["hs256_full"] = (time.process_time() - cpu) / cold * 1e6
    out["admit_redis"] = await _admit_on_redis(secrets.token_urlsafe(32))
    return out


async def _admit_on_redis(secret: str, calls: int = 900) -> float:
    """CPU µs per admitted call with the limiter's log in Redis (1,000 calls per minute:
    a round trip per batch of up to 10 calls); NaN without a reachable Redis."""
    settings = load_settings(
        env={},
        overrides={
            "authentication": {
                "jwt": {"secret_key": secret},
                "rate_limiting": {"api_requests": 1000},
            },
            "redis": {
                "url": os.environ.get("AIWFE_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
                "key_prefix": f"aiwfe-bench:{uuid.uuid4().hex[:8]}:",
            },
        },
    )
    redis = RedisClient(settings.redis)
    try:
        if not await redis.ping():
            return float("nan")
        tokens = TokenService(settings.authentication, redis)
        limiter = ApiLimiter(settings.authentication.rate_limiting, redis)
        interceptor = AuthInterceptor(method_table(), tokens, Rbac(settings.rbac), limiter=limiter)
        token = tokens.issue(str(uuid.uuid4()), "bench", ["user"]).token
        metadata = (("authorization", f"Bearer {token}"),)
        info = method_table()[EMBED]
        await interceptor.admit(info, metadata)
        cpu = time.process_time()
        for _ in range(calls):
            await interceptor.admit(info, metadata)
        return (time.process_time() - cpu) / calls * 1e6
    finally:
        await redis.close()


def main(n: int = 50_000) -> None:
    r = asyncio.run(_bench(n))
    rows = [
        ("cached authn+ratelimit+authz (admit)", r["admit"], "≤ 50 µs goal"),
        ("  + grpc handler wrapping (intercept_service)", r["intercept_service"], ""),
        ("  admit, limiter log in Redis (1,000/min)", r["admit_redis"], "≤ 50 µs goal"),
        ("cold HS256 verify (jwt.decode + claims)", r["hs256_verify"], ""),
        ("cold HS256 incl. header/kid/alg pinning", r["hs256_full"], ""),
    ]
    print(f"{'path':48} {'CPU µs/call':>12}  note")
    for name, us, note in rows:
        print(f"{name:48} {us:12.1f}  {note}")
    print()
    print(f"{'seed target':20} {'seed ms':>8} {'ours ms':>10}")
    ours = {
        "jwt_validation": r["hs256_full"] / 1000,
        "session_lookup": r["admit"] / 1000,
        "total": (r["hs256_full"] + r["intercept_service"]) / 1000,
    }
    for name, ms in SEED_TARGETS_MS.items():
        print(f"{name:20} {ms:8.1f} {ours[name]:10.4f}")


if __name__ == "__main__":
    main()
