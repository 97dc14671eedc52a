"""A strict HTTP/2 client (python-hyper `h2`, default SETTINGS, so 16 KiB frames at most)
through the real gateway: a 20 KiB Embed answer from the relay's response cache arrives
in frames it accepts."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from tests.conftest import bearer
from tests.gateway.conftest import Gateway

EMBED = "/aiwfe.cognitive.v1.CognitiveService/Embed"


async def _strict_call(address: str, token: str, request: bytes) -> bytes:
    """One unary call with `h2`'s default settings; the response message."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "POST"), (":scheme", "http"), (":path", EMBED), (":authority", address),
            ("content-type", "application/grpc"), ("te", "trailers"),
            ("authorization", f"Bearer {token}"),
        ],
    )  # fmt: skip
    conn.send_data(1, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
    writer.write(conn.data_to_send())
    body, trailers, ended = b"", {}, False
    try:
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "closed before the response ended"
            for event in conn.receive_data(data):  # raises on a frame over 16 KiB
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert trailers.get(b"grpc-status") == b"0", trailers
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    return body[5:]


async def test_a_strict_client_receives_a_20_kib_cached_answer(gw: Gateway) -> None:
    """Seven 768-d embeddings (> 20 KiB) answered by the relay from its cache reach an `h2`
    client with default settings intact."""
    front = gw.suite.running["gateway"].front
    token = (await gw.login(await gw.create_user(["user"], "strict"))).access_token
    request = cog_pb.EmbedRequest(texts=[f"strict client text {i}" for i in range(7)])
    stub = cog_grpc.CognitiveServiceStub(gw.channel)
    stored = await stub.Embed(request, metadata=bearer(token), timeout=10)  # cached now
    answered = front.answered_calls
    reply = await _strict_call(gw.suite.address("gateway"), token, request.SerializeToString())
    assert front.answered_calls == answered + 1
    assert len(reply) > 20 * 1024
    assert reply == stored.SerializeToString()
