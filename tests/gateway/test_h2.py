"""The relay's header decoder: a memo of repeated blocks that never outlives the table."""

from __future__ import annotations

import hpack
import pytest

from gateway import h2

NAME = b"x-tenant"


def _indexed(index: int) -> bytes:
    return bytes((0x80 | index,))  # an indexed field (RFC 7541 §6.1), index < 127


def test_a_repeated_block_is_answered_from_the_memo() -> None:
    encoder = hpack.Encoder()
    decoder = h2.HeaderDecoder(64 * 1024)
    fields = [(b":path", b"/svc/Method"), (b"authorization", b"Bearer abc", True)]
    first = decoder.decode(encoder.encode(fields))  # indexes :path in the dynamic table
    block = encoder.encode(fields)  # now an index and a never-indexed literal
    second = decoder.decode(block)
    assert second == first == [(b":path", b"/svc/Method"), (b"authorization", b"Bearer abc")]
    assert decoder.decode(bytes(block)) is second  # no second decode


def test_an_index_means_the_new_entry_once_the_table_changed() -> None:
    decoder = h2.HeaderDecoder(64 * 1024)
    first_dynamic = hpack.table.HeaderTable.STATIC_TABLE_LENGTH + 1
    add_a = b"\x40" + bytes((len(NAME),)) + NAME + b"\x01a"  # literal with indexing
    add_b = b"\x40" + bytes((len(NAME),)) + NAME + b"\x01b"
    assert decoder.decode(add_a) == [(NAME, b"a")]
    assert decoder.decode(_indexed(first_dynamic)) == [(NAME, b"a")]
    assert decoder.decode(_indexed(first_dynamic)) == [(NAME, b"a")]  # memoised
    decoder.decode(add_b)  # the same index now names another entry
    assert decoder.decode(_indexed(first_dynamic)) == [(NAME, b"b")]
    decoder.decode(b"\x20")  # a table size update to 0 empties the table
    with pytest.raises(h2.ProtocolViolation) as raised:
        decoder.decode(_indexed(first_dynamic))
    assert raised.value.code == h2.COMPRESSION_ERROR


@pytest.mark.parametrize(
    "block",
    [
        b"\x00\x05ab",  # a name longer than the block
        _indexed(0),  # index 0 does not exist
        b"\x3f\xe2\x1f",  # a table size update to 4,097, above the 4,096 allowed
    ],
)
def test_malformed_blocks_are_compression_errors(block: bytes) -> None:
    with pytest.raises(h2.ProtocolViolation) as raised:
        h2.HeaderDecoder(64 * 1024).decode(block)
    assert raised.value.code == h2.COMPRESSION_ERROR


def test_a_header_list_over_the_limit_is_refused_even_when_repeated() -> None:
    decoder = h2.HeaderDecoder(100)
    block = h2.header_block([(b"x-big", b"v" * 80)])
    for _ in range(2):
        with pytest.raises(h2.ProtocolViolation):
            decoder.decode(block)


def test_a_peer_without_a_table_still_hits_the_memo_with_literals_with_indexing() -> None:
    # An upstream told SETTINGS_HEADER_TABLE_SIZE 0 may still send "literal with
    # indexing" trailers: they change nothing, so the next identical block is memoised.
    decoder = h2.HeaderDecoder(64 * 1024, table_size=0)
    block = b"\x40\x0bgrpc-status\x010"
    first = decoder.decode(block)
    assert first == [(b"grpc-status", b"0")]
    assert decoder.decode(block) is first
    with pytest.raises(h2.ProtocolViolation):
        decoder.decode(_indexed(hpack.table.HeaderTable.STATIC_TABLE_LENGTH + 1))


def test_header_blocks_decode_to_what_was_encoded_every_time() -> None:
    fields = [(b":path", b"/svc/M"), (b"x-id", b"v" * 126), (b"x-a", b"a" * 127)]
    fields += [(b"x-b", b"b" * 128), (b"x-long", b"l" * 300), (b"x-" + b"n" * 130, b"")]
    first = h2.header_block(fields)
    assert h2.header_block(fields) == first  # the second time from the field memo
    assert hpack.Decoder().decode(first, raw=True) == fields
