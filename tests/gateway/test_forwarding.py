"""The gateway's one forwarding table, seen from a real back end: a recording echo server
registered as cognitive receives exactly the same client headers whether a call took the
relay's fast path or the gRPC proxy (a gateway with `gateway.relay: false`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.app.suite import Suite, start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.runtime.errors import InvalidArgument
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.runtime.resilience.breaker import BreakerState
from aiwfe.runtime.server import RunningService, start_service
from gateway import forwarding
from gateway.forwarding import forwarded_metadata, relayed_headers
from gateway.service import GatewayService
from tests.conftest import bearer, login

EMBED = "/aiwfe.cognitive.v1.CognitiveService/Embed"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_AGENT = "header-probe/7"
EXPIRE, EXPIRE_NOW = b"expire", b"expire-now"
# One or more of each class a gRPC client library lets a caller send (it refuses
# upper-case names and CR/LF values itself; the relay refuses connection-specific fields at
# the HTTP/2 layer, so those are checked on the table below).
SENT: tuple[tuple[str, Any], ...] = (
    ("proxy-authorization", "Basic c2VjcmV0"),  # credentials (authorization is the bearer)
    ("cookie", "session=stolen"),
    ("x-aiwfe-identity", "forged-assertion"),  # internal
    ("x-aiwfe-client-peer", "ipv4:6.6.6.6:6"),
    ("x-aiwfe-anything", "x"),
    ("x-aiwfe-blob-bin", b"\x00\x01"),
    ("http2-settings", "AAMAAABkAAQAAP__"),  # hop-by-hop
    ("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01"),  # trace context
    ("tracestate", "vendor=opaque"),
    ("baggage", "tenant=acme"),
    ("grpc-custom", "reserved"),  # grpc-* (grpc-timeout and the encodings come from the call)
    ("grpc-previous-rpc-attempts", "3"),
    ("cache-control", "no-store"),  # custom metadata
    ("x-request-id", "req-42"),
    ("x-dup", "first"),
    ("x-dup", "second"),
    ("x-blob-bin", b"\x00\xff\x10binary"),  # binary metadata
)
EXPECTED_AS_SENT = {
    ("cache-control", "no-store"),
    ("x-request-id", "req-42"),
    ("x-dup", "first"),
    ("x-dup", "second"),
    ("x-blob-bin", b"\x00\xff\x10binary"),
    ("tracestate", "vendor=opaque"),
    ("baggage", "tenant=acme"),
}


@dataclass
class Seen:
    metadata: list[tuple[str, Any]]
    time_remaining: float
    request: bytes


class Recorder(grpc.GenericRpcHandler):
    """An echo back end for cognitive's Embed that keeps what each call carried."""

    def __init__(self) -> None:
        self.calls: list[Seen] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return grpc.unary_unary_rpc_method_handler(self.echo) if details.method == EMBED else None

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == EXPIRE:  # DEADLINE_EXCEEDED just before the call's deadline
            await asyncio.sleep(max(0.0, (context.time_remaining() or 0.0) - 0.02))
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "ran out of time")
        if request == EXPIRE_NOW:  # the back end's own DEADLINE_EXCEEDED, not the caller's
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "gave up")
        remaining = context.time_remaining()
        metadata = [(k, v) for k, v in context.invocation_metadata() or ()]
        self.calls.append(Seen(metadata, remaining or 0.0, request))
        return request


@pytest.fixture
async def two_paths(base_overrides: dict[str, Any]) -> AsyncIterator[tuple[Suite, Any, Recorder]]:
    """The suite (dataplatform, gateway with its relay) with the recorder as cognitive,
    and a second gateway with `relay: false` against the same back ends."""
    recorder = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recorder,))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    overrides = {**base_overrides, "services": {"cognitive": {"port": port}}}
    suite = await start_suite(overrides, only=("dataplatform", "gateway"))
    full: RunningService | None = None
    try:
        settings = suite.settings
        no_relay = settings.model_copy(
            update={"gateway": settings.gateway.model_copy(update={"relay": False})}
        )
        full = await start_service(GatewayService(no_relay), "127.0.0.1", 0, probe_interval=60)
        yield suite, full, recorder
    finally:
        if full is not None:
            await full.stop(0.5)
        await suite.stop()
        await server.stop(0)


async def _call(address: str, token: str, request: bytes) -> bytes:
    options = [("grpc.primary_user_agent", CLIENT_AGENT)]
    async with grpc.aio.insecure_channel(
        address, options=options, compression=grpc.Compression.Gzip
    ) as channel:
        reply: bytes = await channel.unary_unary(EMBED)(
            request, metadata=(*bearer(token), *SENT), timeout=10
        )
        return reply


async def test_both_paths_deliver_the_same_headers_to_the_back_end(two_paths) -> None:
    """Every header class reaches a real back end identically on the relay's fast path and
    through the gRPC proxy: credentials, x-aiwfe-*, hop-by-hop and reserved grpc-* dropped,
    the gateway's own identity, user agent and deadline, the client's trace carried on, and
    custom and binary metadata as sent (a gzip-compressed request arrives intact)."""
    suite, full, recorder = two_paths
    front = suite.running["gateway"].front
    request = cog_pb.EmbedRequest(texts=["compressible " * 40]).SerializeToString()
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await login(channel)
    await _call(suite.address("gateway"), token, request)  # the token is cached now
    fast_before = front.fast_calls
    assert await _call(suite.address("gateway"), token, request) == request
    assert front.fast_calls == fast_before + 1
    assert await _call(full.address, token, request) == request
    fast, proxied = recorder.calls[-2], recorder.calls[-1]

    identity = InternalIdentity.from_settings(suite.settings)
    observed = []
    for seen in (fast, proxied):
        assert seen.request == request
        assert 5 < seen.time_remaining < 11  # the client's 10 s (rounded up on the wire)
        names = Counter(name for name, _ in seen.metadata)
        assert names["user-agent"] == 1 and names[IDENTITY_METADATA_KEY] == 1
        values = dict(seen.metadata)
        assert CLIENT_AGENT not in values["user-agent"]
        assert identity.verify(values[IDENTITY_METADATA_KEY]).username == "admin"
        assert values["traceparent"].split("-")[1] == TRACE_ID
        kept = {
            (name, value)
            for name, value in seen.metadata
            if name not in ("user-agent", IDENTITY_METADATA_KEY, "traceparent")
        }
        assert kept == EXPECTED_AS_SENT
        observed.append(sorted(names.items()))
    assert observed[0] == observed[1]


async def test_a_repeated_header_block_still_carries_the_current_identity(two_paths) -> None:
    """The front door reads a header block its connection repeats only once, but what it
    sends on follows the current identity assertion: once the assertion is signed anew
    (as at its half-life), the back end receives the new one, not the one read first."""
    suite, _, recorder = two_paths
    front = suite.running["gateway"].front
    identity = InternalIdentity.from_settings(suite.settings)
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await login(channel)
        call = channel.unary_unary(EMBED)
        no_store = (*bearer(token), ("cache-control", "no-store"))
        await call(b"", metadata=no_store, timeout=10)  # the token is cached now
        fast_before = front.fast_calls
        assertions = []
        for resign in (False, False, True):
            if resign:
                front._identity._signed.clear()
            await call(b"", metadata=no_store, timeout=10)
            assertions.append(dict(recorder.calls[-1].metadata)[IDENTITY_METADATA_KEY])
        assert front.fast_calls == fast_before + 3
    assert assertions[0] == assertions[1] != assertions[2]
    assert identity.verify(assertions[2]).username == "admin"


async def test_the_callers_own_short_deadline_never_counts_against_the_back_end(
    two_paths,
) -> None:
    """Calls that end DEADLINE_EXCEEDED because the caller's own deadline (shorter than the
    gateway's) ran out leave the back end's breaker closed, on the relay's fast path and
    through the proxy; the back end's own DEADLINE_EXCEEDED still opens it."""
    suite, full, _ = two_paths
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await login(channel)
    front = suite.running["gateway"].front
    await _call(suite.address("gateway"), token, b"")  # the token is cached now
    no_store = (*bearer(token), ("cache-control", "no-store"))  # else the cache's full path
    relayed = suite.running["gateway"]
    for address, running in ((relayed.address, relayed), (full.address, full)):
        breaker = running.service.upstreams["aiwfe.cognitive.v1"].breaker
        fast_before = front.fast_calls
        async with grpc.aio.insecure_channel(address) as channel:

            async def code(message: bytes, timeout: float | None) -> grpc.StatusCode:
                try:
                    await channel.unary_unary(EMBED)(message, metadata=no_store, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            caller = await asyncio.gather(*(code(EXPIRE, 0.5) for _ in range(10)))
            assert set(caller) == {grpc.StatusCode.DEADLINE_EXCEEDED}
            assert breaker.state is BreakerState.CLOSED
            if running is relayed:
                # Some took the fast path; how many depends on the quota the relay holds
                # reserved (the rest waited for quota on the full path).
                assert front.fast_calls > fast_before
            own = await asyncio.gather(*(code(EXPIRE_NOW, None) for _ in range(6)))
            assert set(own) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
            assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("te", "trailers"),
        ("host", "elsewhere.example"),
        ("authorization", "Bearer x"),
        ("X-AIWFE-Identity", "forged"),
        ("x-Aiwfe-Client-Peer", "forged"),
        ("grpc-timeout", "1S"),
        ("grpc-status", "0"),
        ("user-agent", "someone/1"),
        ("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01"),
        ("x-custom", "kept"),
        ("x-custom-bin", "AAE="),
        ("grpc-encoding", "gzip"),
    ],
)
def test_one_table_decides_both_representations(name: str, value: str) -> None:
    """The relay's byte headers and the proxy's metadata are judged by one table: a header
    a client may send either way is kept by both or by neither (the encodings, which go
    with the message bytes, only where the bytes pass as sent)."""
    headers = [(b":path", b"/p"), (name.encode(), value.encode())]
    relayed = relayed_headers(headers)
    assert relayed_headers(headers) == relayed  # judged again from the memo, alike
    if name != name.lower():  # only a raw HTTP/2 client can send it: refused, never kept
        assert relayed is None
        with pytest.raises(InvalidArgument):
            forwarded_metadata([(name, value)])
        return
    assert relayed is not None
    kept_relayed = [(n.decode(), v.decode()) for n, v in relayed[0]]
    kept_proxied = forwarded_metadata([(name, value)])
    if name == "grpc-encoding":
        assert (kept_relayed, kept_proxied) == ([(name, value)], [])
    else:
        assert kept_relayed == kept_proxied
        assert (kept_proxied != []) == name.startswith("x-custom")


def test_the_relays_memo_of_judged_headers_stays_bounded() -> None:
    """Headers unique per call, or large, never grow the memo of judged headers past its
    bound, and a big value is judged without being kept."""
    for i in range(2 * forwarding._MEMO_LIMIT):
        relayed_headers([(b"x-request-id", f"req-{i}".encode())])
        assert len(forwarding._pairs) <= forwarding._MEMO_LIMIT
    big = (b"x-big", b"v" * 60_000)
    assert relayed_headers([big]) == ([big], [])
    assert big not in forwarding._pairs


async def h2_call(address: str, headers: list[tuple[str, str]], message: bytes) -> dict:
    """One unary gRPC call from a raw HTTP/2 client that sends `headers` unchecked and
    unchanged; the status fields it ends with ({} when the stream is reset)."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        conn.initiate_connection()
        conn.send_headers(1, headers)
        conn.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        writer.write(conn.data_to_send())
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                return {}
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamReset):
                    return {}
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    fields = dict(event.headers)
                    if b"grpc-status" in fields:
                        return fields
            writer.write(conn.data_to_send())
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def grpc_headers(address: str, path: str, token: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", f"Bearer {token}"),
    ]


async def test_a_crlf_value_on_the_full_path_is_invalid_argument(base_overrides, caplog) -> None:
    """With the relay off, a request header whose value holds CR/LF (which only a raw
    HTTP/2 client can send) is answered INVALID_ARGUMENT, not INTERNAL, with nothing
    logged as an unhandled error."""
    suite = await start_suite(
        {**base_overrides, "gateway": {"relay": False}}, only=("dataplatform", "gateway")
    )
    try:
        address = suite.address("gateway")
        async with grpc.aio.insecure_channel(address) as channel:
            token = await login(channel)
        headers = [*grpc_headers(address, EMBED, token), ("x-note", "line\r\nInjected: yes")]
        body = cog_pb.EmbedRequest(texts=["x"]).SerializeToString()
        with caplog.at_level("ERROR", logger="aiwfe.errors"):
            status = await h2_call(address, headers, body)
        assert status[b"grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]).encode()
        assert not [r for r in caplog.records if "unhandled" in r.getMessage()]
    finally:
        await suite.stop()
