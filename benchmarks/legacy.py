"""The seed's before-topology, for the `before` scenario: Client → Caddy → API → Database,
and a bare Python byte proxy (`python-proxy`), the floor any Python gateway starts from.

One process (its own, so it does not share the suite's interpreter) serves three hops:
  * `edge`  — a pass-through proxy standing for Caddy (the extra hop);
  * `api`   — the old API front: for EVERY request it asks a separate auth service to
              validate the token, then forwards to cognitive;
  * `auth`  — the separate auth service: full JWT verification (no cache) plus a session
              lookup in PostgreSQL (the users table), per request.
The after-topology is the `gateway` scenario: one hop, tokens cached in process.

Run: python -m benchmarks.legacy --cognitive ADDR --dsn DSN  (secrets via env, as the
harness passes them); prints one JSON line with the addresses, runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

import grpc
import jwt
from psycopg_pool import AsyncConnectionPool

from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import servers

_CHECK = "/legacy.v1.AuthService/CheckToken"


class _Generic(grpc.GenericRpcHandler):
    """Serves every method with a unary handler built once per method by `factory`."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(details.method)
        if handler is None:
            handler = self._handlers[details.method] = grpc.unary_unary_rpc_method_handler(
                self._factory(details.method)
            )
        return handler


async def _serve(handler: grpc.GenericRpcHandler) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _token(context: grpc.aio.ServicerContext) -> bytes:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[7:].encode()
    return b""


async def run(cognitive: str, dsn: str) -> None:
    secret = os.environ[servers.JWT_SECRET_ENV]
    identity = InternalIdentity(os.environ[servers.INTERNAL_SECRET_ENV])
    pool = AsyncConnectionPool(dsn, min_size=4, max_size=10, open=False)
    await pool.open(wait=True)

    async def check(token: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            claims = jwt.decode(
                token.decode(), secret, algorithms=["HS256"], audience="aiwfe-api",
                options={"require": ["exp", "iat", "sub"]},
            )  # fmt: skip
        except jwt.PyJWTError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT roles, disabled FROM users WHERE user_id = %s", (claims["sub"],)
            )
            row = await cur.fetchone()
        if row is None or row[1]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no session")
        return b"ok"

    auth_server, auth_port = await _serve(_Generic(lambda method: check))
    auth_channel = grpc.aio.insecure_channel(f"127.0.0.1:{auth_port}")
    check_call = auth_channel.unary_unary(_CHECK)
    upstream = grpc.aio.insecure_channel(cognitive)

    def api(method: str) -> Any:
        forward = upstream.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            await check_call(_token(context), timeout=10)  # a round trip per request
            metadata = ((IDENTITY_METADATA_KEY, identity.assertion(None, "legacy-api")),)
            return await forward(request, metadata=metadata, timeout=10)

        return handle

    api_server, api_port = await _serve(_Generic(api))
    api_channel = grpc.aio.insecure_channel(f"127.0.0.1:{api_port}")

    def edge(method: str) -> Any:
        forward = api_channel.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            metadata = tuple(
                (k, v) for k, v in context.invocation_metadata() or () if k == "authorization"
            )
            return await forward(request, metadata=metadata, timeout=10)

        return handle

    edge_server, edge_port = await _serve(_Generic(edge))

    def naive(method: str) -> Any:
        forward = upstream.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await forward(
                request, metadata=tuple(context.invocation_metadata() or ()), timeout=10
            )

        return handle

    # The floor for any Python gateway: a bare grpc.aio byte pass-through to cognitive.
    naive_server, naive_port = await _serve(_Generic(naive))
    print(
        json.dumps(
            {
                "edge": f"127.0.0.1:{edge_port}",
                "naive": f"127.0.0.1:{naive_port}",
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in (naive_server, edge_server, api_server, auth_server):
        await server.stop(0.5)
    await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cognitive", required=True)
    parser.add_argument("--dsn", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(run(args.cognitive, args.dsn))
    except ImportError:  # pragma: no cover
        asyncio.run(run(args.cognitive, args.dsn))
    sys.exit(0)


if __name__ == "__main__":
    main()
