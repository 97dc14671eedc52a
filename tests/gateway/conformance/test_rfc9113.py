# Over 600 lines on purpose: one test per RFC 9113 requirement, in the RFC's section order.
"""RFC 9113 on the relay's public side, h2spec-style: every server-side MUST that applies
to an intermediary, each case named after its section, sent by a raw client (our framing
plus `hpack`) to a relay in front of a real grpc.aio back end."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import hpack
import pytest

from gateway import h2 as f
from gateway.relay import Decision, Endpoint, Relay, RelayLimits
from tests.gateway.conformance.conftest import Relayed
from tests.gateway.conformance.raw import REQUEST, RawClient, literal_block, message
from tests.gateway.test_relay import Harness, _backend

MAX = f.MAX_WINDOW


async def _client(r: Relayed, settings: tuple[tuple[int, int], ...] = ()) -> RawClient:
    return await RawClient.connect(r.port, settings)


async def _connection_error(r: Relayed, *frames: bytes) -> int:
    """The GOAWAY error code the relay answers `frames` with (then it closes)."""
    client = await _client(r)
    client.send(*frames)
    _, code = await client.goaway()
    assert await client.closed()
    return code


async def _served(client: RawClient, sid: int) -> None:
    """A unary call on `sid` still gets its answer: the connection is healthy."""
    client.call(sid, b"ok")
    body, trailers = await client.response(sid)
    assert body == message(b"ok") and trailers[b"grpc-status"] == b"0"


# --- §3.4 HTTP/2 connection preface -----------------------------------------------------------


async def test_3_4_invalid_preface_closes_the_connection(relayed_port: Relayed) -> None:
    """Bytes that are not the client preface: the connection is closed."""
    client = await RawClient.connect(relayed_port.port, preface=False)
    client.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    assert await client.closed()


async def test_3_4_preface_not_followed_by_settings_is_protocol_error(
    relayed_port: Relayed,
) -> None:
    """The preface's first frame must be SETTINGS: a PING first is PROTOCOL_ERROR."""
    client = await RawClient.connect(relayed_port.port, preface=False)
    client.send(f.PREFACE + f.frame(f.PING, 0, 0, b"12345678"))
    assert (await client.goaway())[1] == f.PROTOCOL_ERROR


# --- §4 frames ----------------------------------------------------------------------------------


async def test_4_1_unknown_frame_type_is_ignored(relayed_port: Relayed) -> None:
    """A frame of an unknown type is ignored; the connection carries on."""
    client = await _client(relayed_port)
    client.send(f.frame(0x20, 0xFF, 1, b"whatever"))
    await client.ping_ack()
    await _served(client, 1)


async def test_4_1_unknown_flags_are_ignored(relayed_port: Relayed) -> None:
    """Undefined flags on a PING are ignored: it is answered as any PING."""
    client = await _client(relayed_port)
    client.send(f.frame(f.PING, 0xF0, 0, b"flagged!"))
    await client.expect(lambda fr: fr[0] == f.PING and fr[1] & f.ACK and fr[3] == b"flagged!")


async def test_4_2_frame_over_max_frame_size_is_frame_size_error(relayed_port: Relayed) -> None:
    """A frame over SETTINGS_MAX_FRAME_SIZE (16 KiB) is FRAME_SIZE_ERROR."""
    client = await _client(relayed_port)
    client.headers(1)
    code = await _connection_error(
        relayed_port, f.frame(f.HEADERS, f.END_HEADERS, 1, literal_block(REQUEST)),
        f.frame(f.DATA, 0, 1, b"x" * (f.MAX_FRAME + 1)),
    )  # fmt: skip
    assert code == f.FRAME_SIZE_ERROR


async def test_4_3_malformed_header_block_is_compression_error(relayed_port: Relayed) -> None:
    """A header block HPACK cannot decode is COMPRESSION_ERROR."""
    code = await _connection_error(
        relayed_port, f.frame(f.HEADERS, f.END_HEADERS, 1, b"\x00\x05ab")
    )
    assert code == f.COMPRESSION_ERROR


async def test_4_3_a_bad_block_on_a_reset_stream_is_still_compression_error(
    relayed_port: Relayed,
) -> None:
    """Header blocks are decoded even on a stream the relay reset (the HPACK state is
    shared), so a bad one there is still COMPRESSION_ERROR."""
    client = await _client(relayed_port)
    client.headers(1, [*REQUEST, (b"Upper", b"x")])
    assert await client.reset_code(1) == f.PROTOCOL_ERROR
    client.send(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, b"\x00\x05ab"))
    assert (await client.goaway())[1] == f.COMPRESSION_ERROR


# --- §5.1 stream states -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        f.frame(f.DATA, 0, 1, b"x"),
        f.rst_stream(1, f.CANCEL),
        f.window_update(1, 100),
    ],
    ids=["data", "rst_stream", "window_update"],
)
async def test_5_1_frame_on_idle_stream_is_protocol_error(
    relayed_port: Relayed, frame: bytes
) -> None:
    """DATA, RST_STREAM or WINDOW_UPDATE on a stream never opened is PROTOCOL_ERROR."""
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_5_1_priority_on_idle_stream_is_allowed(relayed_port: Relayed) -> None:
    """PRIORITY may name an idle stream; the stream can still be opened after it."""
    client = await _client(relayed_port)
    client.send(f.frame(f.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"))
    await _served(client, 1)


async def _half_closed(client: RawClient) -> None:
    """Stream 1: the whole request sent, the response still streaming (Hang)."""
    fields = [(n, b"/t.T/Hang" if n == b":path" else v) for n, v in REQUEST]
    client.headers(1, fields)
    client.send(f.frame(f.DATA, f.END_STREAM, 1, message(b"")))
    await client.expect(lambda fr: fr[0] == f.DATA and fr[2] == 1)


async def test_5_1_half_closed_remote_data_is_stream_closed(relayed_port: Relayed) -> None:
    """DATA after the client's END_STREAM is a stream error STREAM_CLOSED; the back end's
    call is cancelled and the connection serves on."""
    client = await _client(relayed_port)
    await _half_closed(client)
    client.send(f.frame(f.DATA, 0, 1, b"more"))
    assert await client.reset_code(1) == f.STREAM_CLOSED
    await asyncio.wait_for(relayed_port.backend.cancelled.wait(), 5)
    await _served(client, 3)


async def test_5_1_half_closed_remote_headers_is_stream_closed(relayed_port: Relayed) -> None:
    """HEADERS after the client's END_STREAM is a stream error STREAM_CLOSED."""
    client = await _client(relayed_port)
    await _half_closed(client)
    client.headers(1, [(b"x-late", b"1")], end_stream=True)
    assert await client.reset_code(1) == f.STREAM_CLOSED


async def test_5_1_half_closed_remote_window_update_is_allowed(relayed_port: Relayed) -> None:
    """WINDOW_UPDATE on a half-closed (remote) stream is normal flow control."""
    client = await _client(relayed_port)
    await _half_closed(client)
    client.send(f.window_update(1, 1000))
    await client.ping_ack()
    assert not any(fr[0] in (f.RST_STREAM, f.GOAWAY) for fr in client.seen)


@pytest.mark.parametrize("ftype", [f.DATA, f.HEADERS])
async def test_5_1_closed_stream_data_or_headers_is_stream_closed(
    relayed_port: Relayed, ftype: int
) -> None:
    """DATA or HEADERS on a stream both sides ended is a connection error STREAM_CLOSED."""
    client = await _client(relayed_port)
    await _served(client, 1)
    if ftype == f.DATA:
        client.send(f.frame(f.DATA, 0, 1, b"late"))
    else:
        client.headers(1, end_stream=True)
    assert (await client.goaway())[1] == f.STREAM_CLOSED


async def test_5_1_closed_stream_window_update_and_rst_are_ignored(relayed_port: Relayed) -> None:
    """WINDOW_UPDATE and RST_STREAM just after a stream closed are ignored (§5.1)."""
    client = await _client(relayed_port)
    await _served(client, 1)
    client.send(f.window_update(1, 10), f.rst_stream(1, f.CANCEL))
    await client.ping_ack()
    await _served(client, 3)


async def test_5_1_frames_on_a_stream_the_relay_reset_are_ignored(relayed_port: Relayed) -> None:
    """After the relay resets a stream, the client's frames already in flight on it (DATA,
    HEADERS, WINDOW_UPDATE, RST_STREAM) are ignored, not a connection error."""
    client = await _client(relayed_port)
    client.headers(1, [*REQUEST, (b"Upper", b"x")])
    assert await client.reset_code(1) == f.PROTOCOL_ERROR
    client.send(f.frame(f.DATA, 0, 1, message(b"late")))
    client.headers(1, [(b"x-trailer", b"1")], end_stream=True)
    client.send(f.window_update(1, 5), f.rst_stream(1, f.CANCEL))
    await client.ping_ack()
    await _served(client, 3)
    assert not any(fr[0] == f.GOAWAY for fr in client.seen)


async def test_5_1_1_even_stream_id_is_protocol_error(relayed_port: Relayed) -> None:
    """A client may only open odd-numbered streams."""
    block = literal_block(REQUEST)
    code = await _connection_error(relayed_port, f.frame(f.HEADERS, f.END_HEADERS, 2, block))
    assert code == f.PROTOCOL_ERROR


async def test_5_1_1_lower_unused_stream_id_is_protocol_error(relayed_port: Relayed) -> None:
    """Opening stream 3 after stream 5 is an unexpected stream identifier."""
    client = await _client(relayed_port)
    await _served(client, 5)
    client.headers(3, end_stream=True)
    assert (await client.goaway())[1] == f.PROTOCOL_ERROR


async def test_5_1_2_streams_over_the_limit_are_refused() -> None:
    """More concurrent streams than SETTINGS_MAX_CONCURRENT_STREAMS: REFUSED_STREAM."""
    server, _, port = await _backend()
    harness = Harness(port, max_streams=2)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    try:
        client = await RawClient.connect(relay_port)
        settings = await client.expect(lambda fr: fr[0] == f.SETTINGS and not fr[1] & f.ACK)
        assert (f.MAX_CONCURRENT_STREAMS, 2) in f.parse_settings(settings[3])
        hang = [(n, b"/t.T/Hang" if n == b":path" else v) for n, v in REQUEST]
        for sid in (1, 3, 5):
            client.headers(sid, hang)
        assert await client.reset_code(5) == f.REFUSED_STREAM
        assert {fr[2] for fr in client.seen if fr[0] == f.RST_STREAM} == {5}
        client.close()
    finally:
        await harness.relay.stop(0.2)
        await server.stop(0)


# --- §5.3 priority, §5.4 error handling, §5.5 extensions ----------------------------------------


async def test_5_3_1_headers_depending_on_itself_is_stream_error(relayed_port: Relayed) -> None:
    """A stream made to depend on itself is a stream error PROTOCOL_ERROR."""
    client = await _client(relayed_port)
    payload = (1).to_bytes(4, "big") + b"\x10" + literal_block(REQUEST)
    client.send(f.frame(f.HEADERS, f.END_HEADERS | f.PRIORITY_FLAG, 1, payload))
    assert await client.reset_code(1) == f.PROTOCOL_ERROR
    await _served(client, 3)


async def test_5_3_1_priority_depending_on_itself_is_stream_error(relayed_port: Relayed) -> None:
    """A PRIORITY frame making a stream depend on itself is a stream error."""
    client = await _client(relayed_port)
    client.send(f.frame(f.PRIORITY, 0, 3, (3).to_bytes(4, "big") + b"\x10"))
    assert await client.reset_code(3) == f.PROTOCOL_ERROR
    await _served(client, 5)


async def test_5_4_1_goaway_names_the_last_stream_processed(relayed_port: Relayed) -> None:
    """A connection error's GOAWAY carries the highest stream id the relay processed."""
    client = await _client(relayed_port)
    await _served(client, 7)
    client.send(f.frame(f.DATA, 0, 0, b"x"))
    assert await client.goaway() == (7, f.PROTOCOL_ERROR)


# --- §6.1 DATA, §6.2 HEADERS, §6.3 PRIORITY, §6.4 RST_STREAM -------------------------------------


async def test_6_1_data_on_stream_0_is_protocol_error(relayed_port: Relayed) -> None:
    """DATA must belong to a stream."""
    assert await _connection_error(relayed_port, f.frame(f.DATA, 0, 0, b"x")) == f.PROTOCOL_ERROR


async def test_6_1_padding_as_long_as_the_payload_is_protocol_error(relayed_port: Relayed) -> None:
    """A DATA frame whose padding length is not less than its payload is PROTOCOL_ERROR."""
    client = await _client(relayed_port)
    client.headers(1)
    client.send(f.frame(f.DATA, f.PADDED, 1, b"\x05abcd"))
    assert (await client.goaway())[1] == f.PROTOCOL_ERROR


async def test_6_1_padded_data_is_relayed_without_padding(relayed_port: Relayed) -> None:
    """Padding is stripped: the back end sees the message alone."""
    client = await _client(relayed_port)
    client.headers(1)
    client.send(f.frame(f.DATA, f.PADDED | f.END_STREAM, 1, b"\x03" + message(b"pad") + b"\0\0\0"))
    body, trailers = await client.response(1)
    assert body == message(b"pad") and trailers[b"grpc-status"] == b"0"


async def test_6_2_headers_on_stream_0_is_protocol_error(relayed_port: Relayed) -> None:
    """HEADERS must belong to a stream."""
    frame = f.frame(f.HEADERS, f.END_HEADERS, 0, literal_block(REQUEST))
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_2_headers_padding_too_long_is_protocol_error(relayed_port: Relayed) -> None:
    """HEADERS whose padding exceeds the frame is PROTOCOL_ERROR."""
    frame = f.frame(f.HEADERS, f.END_HEADERS | f.PADDED, 1, b"\xff" + literal_block(REQUEST))
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_3_priority_on_stream_0_is_protocol_error(relayed_port: Relayed) -> None:
    """PRIORITY must name a stream."""
    frame = f.frame(f.PRIORITY, 0, 0, b"\x00\x00\x00\x01\x10")
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_3_priority_of_wrong_length_is_stream_frame_size_error(
    relayed_port: Relayed,
) -> None:
    """A PRIORITY frame not 5 bytes long is a stream error FRAME_SIZE_ERROR."""
    client = await _client(relayed_port)
    client.send(f.frame(f.PRIORITY, 0, 1, b"\x00\x00\x00\x03"))
    assert await client.reset_code(1) == f.FRAME_SIZE_ERROR
    await _served(client, 3)


async def test_6_4_rst_stream_on_stream_0_is_protocol_error(relayed_port: Relayed) -> None:
    """RST_STREAM must name a stream."""
    assert await _connection_error(relayed_port, f.rst_stream(0, f.CANCEL)) == f.PROTOCOL_ERROR


async def test_6_4_rst_stream_of_wrong_length_is_frame_size_error(relayed_port: Relayed) -> None:
    """A RST_STREAM frame not 4 bytes long is FRAME_SIZE_ERROR."""
    client = await _client(relayed_port)
    client.headers(1)
    client.send(f.frame(f.RST_STREAM, 0, 1, b"\x00\x00\x08"))
    assert (await client.goaway())[1] == f.FRAME_SIZE_ERROR


async def test_6_4_rst_stream_cancels_the_back_end_call(relayed_port: Relayed) -> None:
    """RST_STREAM from the client cancels the call upstream."""
    client = await _client(relayed_port)
    await _half_closed(client)
    client.send(f.rst_stream(1, f.CANCEL))
    await asyncio.wait_for(relayed_port.backend.cancelled.wait(), 5)
    await _served(client, 3)


# --- §6.5 SETTINGS ------------------------------------------------------------------------------


async def test_6_5_settings_are_acknowledged(relayed_port: Relayed) -> None:
    """Every SETTINGS frame gets an ACK with an empty payload."""
    client = await _client(relayed_port, ((f.MAX_CONCURRENT_STREAMS, 10),))
    ack = await client.expect(lambda fr: fr[0] == f.SETTINGS and fr[1] & f.ACK)
    assert ack[3] == b""


async def test_6_5_settings_ack_with_payload_is_frame_size_error(relayed_port: Relayed) -> None:
    """A SETTINGS ACK carrying a payload is FRAME_SIZE_ERROR."""
    frame = f.frame(f.SETTINGS, f.ACK, 0, b"\x00\x01\x00\x00\x00\x00")
    assert await _connection_error(relayed_port, frame) == f.FRAME_SIZE_ERROR


async def test_6_5_settings_on_a_stream_is_protocol_error(relayed_port: Relayed) -> None:
    """SETTINGS belongs to the connection, never to a stream."""
    frame = f.frame(f.SETTINGS, 0, 1, b"")
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_5_settings_length_not_a_multiple_of_6_is_frame_size_error(
    relayed_port: Relayed,
) -> None:
    """A SETTINGS payload that is not whole settings is FRAME_SIZE_ERROR."""
    frame = f.frame(f.SETTINGS, 0, 0, b"\x00\x03\x00\x00")
    assert await _connection_error(relayed_port, frame) == f.FRAME_SIZE_ERROR


@pytest.mark.parametrize(
    ("setting", "value", "code"),
    [
        (f.ENABLE_PUSH, 2, f.PROTOCOL_ERROR),
        (f.INITIAL_WINDOW_SIZE, MAX + 1, f.FLOW_CONTROL_ERROR),
        (f.MAX_FRAME_SIZE, f.MAX_FRAME - 1, f.PROTOCOL_ERROR),
        (f.MAX_FRAME_SIZE, 1 << 24, f.PROTOCOL_ERROR),
    ],
    ids=["enable_push_2", "initial_window_over_max", "max_frame_too_small", "max_frame_too_big"],
)
async def test_6_5_2_setting_out_of_range_is_connection_error(
    relayed_port: Relayed, setting: int, value: int, code: int
) -> None:
    """Out-of-range SETTINGS values are the connection errors §6.5.2 names."""
    assert await _connection_error(relayed_port, f.settings([(setting, value)])) == code


async def test_6_5_2_unknown_setting_is_ignored(relayed_port: Relayed) -> None:
    """An unknown setting identifier is ignored, and acknowledged."""
    client = await _client(relayed_port, ((0x99, 7),))
    await client.expect(lambda fr: fr[0] == f.SETTINGS and fr[1] & f.ACK)
    await _served(client, 1)


async def test_6_5_2_header_table_size_0_client_is_never_sent_table_references(
    relayed_port: Relayed,
) -> None:
    """A client allowing no HPACK dynamic table decodes every block the relay sends (its
    own and the back end's) with a decoder that has none."""
    client = await _client(relayed_port, ((f.HEADER_TABLE_SIZE, 0),))
    client.decoder.max_allowed_table_size = 0
    client.decoder.header_table_size = 0
    for sid in (1, 3, 5):
        await _served(client, sid)


async def test_6_5_2_max_frame_size_default_is_honoured_for_relay_answers() -> None:
    """A 20 KiB message the relay answers itself (its response cache) reaches a client with
    the default SETTINGS_MAX_FRAME_SIZE in frames of at most 16 KiB (a strict `h2` client
    too), not as one oversized frame."""
    reply = bytes(range(256)) * 80  # 20 KiB

    def decide(headers: f.Headers, peer: str, up: object) -> Decision:
        return Decision("up", headers, answer=lambda request: reply)

    relay = Relay(decide, {"up": Endpoint(b"none", host="127.0.0.1", port=9)}, 10)
    port = await relay.start("127.0.0.1", 0)
    try:
        raw = await RawClient.connect(port)  # its reader refuses frames over 16 KiB
        raw.call(1)
        body, trailers = await raw.response(1)
        assert body == message(reply) and trailers[b"grpc-status"] == b"0"
        assert sum(1 for fr in raw.seen if fr[0] == f.DATA) >= 2
        (conn,) = relay.clients  # its budget for buffered answers is whole again
        assert conn.budget == RelayLimits().max_buffer_bytes // 2 and not conn.streams

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn.send_headers(1, [(n.decode(), v.decode()) for n, v in REQUEST])
        conn.send_data(1, message(b"q"), end_stream=True)
        writer.write(conn.data_to_send())
        received, ended = b"", False
        while not ended:
            for event in conn.receive_data(await asyncio.wait_for(reader.read(65536), 5)):
                if isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            writer.write(conn.data_to_send())
        assert received == message(reply)
        writer.close()
    finally:
        await relay.stop(0.2)


# --- §6.7 PING, §6.8 GOAWAY ---------------------------------------------------------------------


async def test_6_7_ping_is_acknowledged_with_its_payload(relayed_port: Relayed) -> None:
    """A PING is answered by a PING ACK with the same 8 bytes."""
    client = await _client(relayed_port)
    await client.ping_ack(b"\x01\x02\x03\x04\x05\x06\x07\x08")


async def test_6_7_ping_ack_is_not_answered(relayed_port: Relayed) -> None:
    """A PING ACK from the client gets no answer."""
    client = await _client(relayed_port)
    client.send(f.frame(f.PING, f.ACK, 0, b"unasked!"))
    await client.ping_ack()
    assert not any(fr[0] == f.PING and fr[3] == b"unasked!" for fr in client.seen)


async def test_6_7_ping_on_a_stream_is_protocol_error(relayed_port: Relayed) -> None:
    """PING belongs to the connection."""
    frame = f.frame(f.PING, 0, 1, b"12345678")
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_7_ping_of_wrong_length_is_frame_size_error(relayed_port: Relayed) -> None:
    """A PING not 8 bytes long is FRAME_SIZE_ERROR."""
    frame = f.frame(f.PING, 0, 0, b"1234567")
    assert await _connection_error(relayed_port, frame) == f.FRAME_SIZE_ERROR


async def test_6_8_goaway_on_a_stream_is_protocol_error(relayed_port: Relayed) -> None:
    """GOAWAY belongs to the connection."""
    frame = f.frame(f.GOAWAY, 0, 1, f.goaway(0, 0)[9:])
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_8_drain_is_a_two_phase_goaway(relayed_port: Relayed) -> None:
    """Shutting down: GOAWAY(2^31-1) and a PING first, so a stream the client opens
    meanwhile is still served; once the PING is answered, GOAWAY with the last stream id;
    a call in flight finishes."""
    client = await _client(relayed_port)
    await _half_closed(client)
    stopping = asyncio.ensure_future(relayed_port.relay.stop(2.0))
    assert (await client.goaway())[0] == MAX
    ping = await client.expect(lambda fr: fr[0] == f.PING and not fr[1] & f.ACK)
    await _served(client, 3)  # opened after the first GOAWAY: still served
    client.send(f.frame(f.PING, f.ACK, 0, ping[3]))
    assert await client.goaway() == (3, f.NO_ERROR)
    client.send(f.rst_stream(1, f.CANCEL))  # the last call ends: the relay may close
    assert await client.closed()
    await stopping


async def test_6_8_client_goaway_lets_its_calls_finish(relayed_port: Relayed) -> None:
    """A client's GOAWAY: its call in flight still completes, then the relay closes."""
    client = await _client(relayed_port)
    client.headers(1)
    client.send(f.goaway(1, f.NO_ERROR))
    client.send(f.frame(f.DATA, f.END_STREAM, 1, message(b"bye")))
    body, _ = await client.response(1)
    assert body == message(b"bye")
    assert await client.closed()


# --- §6.9 WINDOW_UPDATE and flow control --------------------------------------------------------


async def test_6_9_request_bytes_of_reset_streams_return_to_the_connection_window(
    relayed_port: Relayed,
) -> None:
    """DATA the client sent on streams it then reset (never passed on upstream) is given
    back to the connection's window: 100 such streams of 64 KiB (more than the 4 MiB
    window) leave the connection serving, with no FLOW_CONTROL_ERROR."""
    client = await _client(relayed_port)
    chunk = b"\x00" * 16384
    for n in range(100):
        sid = 2 * n + 1
        client.headers(sid)
        client.send(*(f.frame(f.DATA, 0, sid, chunk) for _ in range(4)))
        client.send(f.rst_stream(sid, f.CANCEL))
        await asyncio.sleep(0)
    await _served(client, 201)


async def test_6_9_zero_connection_increment_is_protocol_error(relayed_port: Relayed) -> None:
    """A zero increment on the connection is a connection error PROTOCOL_ERROR."""
    assert await _connection_error(relayed_port, f.window_update(0, 0)) == f.PROTOCOL_ERROR


async def test_6_9_zero_stream_increment_is_stream_error(relayed_port: Relayed) -> None:
    """A zero increment on a stream is a stream error PROTOCOL_ERROR."""
    client = await _client(relayed_port)
    await _half_closed(client)
    client.send(f.window_update(1, 0))
    assert await client.reset_code(1) == f.PROTOCOL_ERROR
    await _served(client, 3)


async def test_6_9_window_update_of_wrong_length_is_frame_size_error(
    relayed_port: Relayed,
) -> None:
    """A WINDOW_UPDATE not 4 bytes long is FRAME_SIZE_ERROR."""
    frame = f.frame(f.WINDOW_UPDATE, 0, 0, b"\x00\x00\x01")
    assert await _connection_error(relayed_port, frame) == f.FRAME_SIZE_ERROR


async def test_6_9_1_connection_window_overflow_is_flow_control_error(
    relayed_port: Relayed,
) -> None:
    """A connection window pushed over 2^31-1 is a connection error FLOW_CONTROL_ERROR."""
    frames = (f.window_update(0, MAX - f.DEFAULT_WINDOW), f.window_update(0, 1))
    assert await _connection_error(relayed_port, *frames) == f.FLOW_CONTROL_ERROR


async def test_6_9_1_stream_window_overflow_is_flow_control_error(relayed_port: Relayed) -> None:
    """A stream window pushed over 2^31-1 is a stream error FLOW_CONTROL_ERROR; the call
    upstream is cancelled, the connection serves on."""
    client = await _client(relayed_port)
    await _half_closed(client)
    client.send(f.window_update(1, MAX))
    assert await client.reset_code(1) == f.FLOW_CONTROL_ERROR
    await asyncio.wait_for(relayed_port.backend.cancelled.wait(), 5)
    await _served(client, 3)


async def test_6_9_1_data_beyond_the_connection_window_is_flow_control_error() -> None:
    """A client sending more than the relay's connection window (half the buffer cap; an
    upstream that never reads holds the rest) is a connection error FLOW_CONTROL_ERROR."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    upstream = await asyncio.start_server(deaf, "127.0.0.1", 0)
    harness = Harness(
        upstream.sockets[0].getsockname()[1], limits=RelayLimits(max_buffer_bytes=256 * 1024)
    )
    port = await harness.relay.start("127.0.0.1", 0)
    try:
        client = await RawClient.connect(port)
        client.headers(1, [(n, b"/t.T/Upload" if n == b":path" else v) for n, v in REQUEST])
        for _ in range(20):  # 320 KiB: over the 128 KiB window plus the 64 KiB passed on
            client.send(f.frame(f.DATA, 0, 1, b"\0" * f.MAX_FRAME))
        assert (await client.goaway())[1] == f.FLOW_CONTROL_ERROR
    finally:
        await harness.relay.stop(0.2)
        upstream.close()


async def test_6_9_2_initial_window_change_adjusts_open_streams(relayed_port: Relayed) -> None:
    """With SETTINGS_INITIAL_WINDOW_SIZE 0 the response DATA waits; raising it opens the
    windows of the streams already open, and the response flows."""
    client = await _client(relayed_port, ((f.INITIAL_WINDOW_SIZE, 0),))
    client.call(1, b"wait")
    await client.expect(lambda fr: fr[0] == f.HEADERS and fr[2] == 1)
    with pytest.raises(TimeoutError):
        await client.expect(lambda fr: fr[0] == f.DATA, timeout=0.3)
    client.send(f.settings([(f.INITIAL_WINDOW_SIZE, 100)]))
    body, trailers = await client.response(1)
    assert body == message(b"wait") and trailers[b"grpc-status"] == b"0"


async def test_6_9_2_initial_window_change_overflow_is_flow_control_error(
    relayed_port: Relayed,
) -> None:
    """A SETTINGS_INITIAL_WINDOW_SIZE change that takes an open stream's window over
    2^31-1 is a connection error FLOW_CONTROL_ERROR."""
    client = await _client(relayed_port)
    await _half_closed(client)
    sent = sum(len(fr[3]) for fr in client.seen if fr[0] == f.DATA and fr[2] == 1)
    client.send(f.window_update(1, MAX - (f.DEFAULT_WINDOW - sent)))  # exactly the maximum
    await client.ping_ack()
    client.send(f.settings([(f.INITIAL_WINDOW_SIZE, f.DEFAULT_WINDOW + 1)]))
    assert (await client.goaway())[1] == f.FLOW_CONTROL_ERROR


# --- §6.10 CONTINUATION -------------------------------------------------------------------------


async def test_6_10_header_block_split_over_continuations_is_served(relayed_port: Relayed) -> None:
    """A request header block in HEADERS plus two CONTINUATION frames is one block."""
    client = await _client(relayed_port)
    block = literal_block([*REQUEST, (b"x-pad", b"p" * 60)])
    third = len(block) // 3
    client.send(
        f.frame(f.HEADERS, 0, 1, block[:third]),
        f.frame(f.CONTINUATION, 0, 1, block[third : 2 * third]),
        f.frame(f.CONTINUATION, f.END_HEADERS, 1, block[2 * third :]),
        f.frame(f.DATA, f.END_STREAM, 1, message(b"cont")),
    )
    body, _ = await client.response(1)
    assert body == message(b"cont")


async def test_6_10_interrupted_header_block_is_protocol_error(relayed_port: Relayed) -> None:
    """Any frame but the CONTINUATION of an unfinished header block is PROTOCOL_ERROR."""
    frames = (f.frame(f.HEADERS, 0, 1, literal_block(REQUEST)), f.frame(f.PING, 0, 0, b"8" * 8))
    assert await _connection_error(relayed_port, *frames) == f.PROTOCOL_ERROR


async def test_6_10_continuation_on_another_stream_is_protocol_error(
    relayed_port: Relayed,
) -> None:
    """A CONTINUATION must continue the same stream's block."""
    block = literal_block(REQUEST)
    frames = (
        f.frame(f.HEADERS, 0, 1, block[:10]),
        f.frame(f.CONTINUATION, f.END_HEADERS, 3, block[10:]),
    )
    assert await _connection_error(relayed_port, *frames) == f.PROTOCOL_ERROR


async def test_6_10_continuation_without_headers_is_protocol_error(relayed_port: Relayed) -> None:
    """A CONTINUATION that follows no HEADERS is PROTOCOL_ERROR."""
    frame = f.frame(f.CONTINUATION, f.END_HEADERS, 1, literal_block(REQUEST))
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


async def test_6_10_push_promise_from_a_client_is_protocol_error(relayed_port: Relayed) -> None:
    """Clients cannot push."""
    frame = f.frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\x00\x00\x00\x02")
    assert await _connection_error(relayed_port, frame) == f.PROTOCOL_ERROR


# --- §8.2-8.3 request header validation (and gRPC's grpc-timeout) ------------------------------

_PSEUDO = {n: v for n, v in REQUEST if n[:1] == b":"}
_REGULAR = [(n, v) for n, v in REQUEST if n[:1] != b":"]


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in REQUEST if n != name]


MALFORMED = {
    "8_2_1_uppercase_name": [*REQUEST, (b"X-Tenant", b"a")],
    "8_2_1_space_in_name": [*REQUEST, (b"x tenant", b"a")],
    "8_2_1_nul_in_name": [*REQUEST, (b"x\x00tenant", b"a")],
    "8_2_1_colon_in_name": [*REQUEST, (b"x:tenant", b"a")],
    "8_2_1_empty_name": [*REQUEST, (b"", b"a")],
    "8_2_1_cr_in_value": [*REQUEST, (b"x-tenant", b"a\rb")],
    "8_2_1_lf_in_value": [*REQUEST, (b"x-tenant", b"a\nb")],
    "8_2_1_nul_in_value": [*REQUEST, (b"x-tenant", b"a\x00b")],
    "8_2_1_leading_space_in_value": [*REQUEST, (b"x-tenant", b" a")],
    "8_2_1_trailing_tab_in_value": [*REQUEST, (b"x-tenant", b"a\t")],
    "8_2_2_connection": [*REQUEST, (b"connection", b"keep-alive")],
    "8_2_2_keep_alive": [*REQUEST, (b"keep-alive", b"timeout=5")],
    "8_2_2_proxy_connection": [*REQUEST, (b"proxy-connection", b"close")],
    "8_2_2_transfer_encoding": [*REQUEST, (b"transfer-encoding", b"chunked")],
    "8_2_2_upgrade": [*REQUEST, (b"upgrade", b"h2c")],
    "8_2_2_te_not_trailers": [*_without(b"te"), (b"te", b"gzip")],
    "8_3_unknown_pseudo_header": [(b":foo", b"bar"), *REQUEST],
    "8_3_status_in_a_request": [(b":status", b"200"), *REQUEST],
    "8_3_pseudo_header_after_a_regular_one": [*REQUEST, (b":authority", b"late")],
    "8_3_duplicate_path": [(b":path", b"/t.T/Echo"), *REQUEST],
    "8_3_duplicate_method": [(b":method", b"POST"), *REQUEST],
    "8_3_1_missing_method": _without(b":method"),
    "8_3_1_missing_scheme": _without(b":scheme"),
    "8_3_1_missing_path": _without(b":path"),
    "8_3_1_empty_path": [(n, b"" if n == b":path" else v) for n, v in REQUEST],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
async def test_8_2_malformed_request_is_stream_error(
    relayed_port: Relayed, fields: list[tuple[bytes, bytes]]
) -> None:
    """A malformed request (RFC 9113 §8.2-8.3) is a stream error, RST_STREAM(PROTOCOL_ERROR),
    after an INVALID_ARGUMENT answer (what a gRPC client reports instead of INTERNAL): it is
    never decided on or forwarded, and the connection serves the next call."""
    client = await _client(relayed_port)
    client.headers(1, fields)
    client.send(f.frame(f.DATA, f.END_STREAM, 1, message(b"bad")))
    assert await client.reset_code(1) == f.PROTOCOL_ERROR
    answer = next(fr for fr in client.seen if fr[0] == f.HEADERS and fr[2] == 1)
    assert answer[1] & f.END_STREAM
    assert dict(client.decoder.decode(answer[3], raw=True))[b"grpc-status"] == b"3"
    assert relayed_port.harness.decided == 0 and relayed_port.backend.metadata == []
    await _served(client, 3)
    assert relayed_port.harness.decided == 1


@pytest.mark.parametrize("value", [b"abc", b"-1S", b"123456789S", b"10x", b"", b"1 S"])
async def test_8_grpc_timeout_malformed_is_invalid_argument(
    relayed_port: Relayed, value: bytes
) -> None:
    """A malformed grpc-timeout gets INVALID_ARGUMENT from the relay itself (trailers
    only), never reaching a back end."""
    client = await _client(relayed_port)
    client.headers(1, [*REQUEST, (b"grpc-timeout", value)])
    client.send(f.frame(f.DATA, f.END_STREAM, 1, message(b"x")))
    body, trailers = await client.response(1)
    assert body == b"" and trailers[b"grpc-status"] == b"3"
    assert b"grpc-timeout" in trailers[b"grpc-message"]
    assert relayed_port.harness.decided == 0 and relayed_port.backend.metadata == []
    await _served(client, 3)


async def test_8_grpc_timeout_well_formed_is_forwarded(relayed_port: Relayed) -> None:
    """A well-formed grpc-timeout (8 digits and a unit) and te: trailers pass."""
    client = await _client(relayed_port)
    client.headers(1, [*REQUEST, (b"grpc-timeout", b"99999999u")])
    client.send(f.frame(f.DATA, f.END_STREAM, 1, message(b"t")))
    body, _ = await client.response(1)
    assert body == message(b"t")


@pytest.mark.parametrize(
    ("trailers", "end_stream"),
    [([(b":path", b"/x")], True), ([(b"x-t", b"1")], False), ([(b"Bad", b"1")], True)],
    ids=["pseudo_header_in_trailers", "trailers_without_end_stream", "uppercase_trailer"],
)
async def test_8_1_malformed_request_trailers_are_stream_error(
    relayed_port: Relayed, trailers: list[tuple[bytes, bytes]], end_stream: bool
) -> None:
    """Request trailers with a pseudo-header, a bad name, or without END_STREAM are
    malformed: a stream error."""
    client = await _client(relayed_port)
    client.headers(1, [(n, b"/t.T/Upload" if n == b":path" else v) for n, v in REQUEST])
    client.send(f.frame(f.DATA, 0, 1, message(b"part")))
    client.headers(1, trailers, end_stream=end_stream)
    assert await client.reset_code(1) == f.PROTOCOL_ERROR
    await _served(client, 3)


def test_hpack_public_api_only() -> None:
    """The decoder uses hpack's public API: a table size announced is the one in force."""
    decoder = f.HeaderDecoder(1024, table_size=0)
    with pytest.raises(f.ProtocolViolation):
        decoder.decode(hpack.Encoder().encode([(b"x-a", b"1")]) + b"\xbe")  # index 62
