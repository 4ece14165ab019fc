"""Sans-I/O tests of asyncdist.frames and of the whole receive pipeline (no event loop)."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncdist import protocol
from asyncdist.codec import Codec
from asyncdist.errors import ProtocolError
from asyncdist.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    encode_frame,
    frame_header,
)


def test_header_is_big_endian_length() -> None:
    assert frame_header(1) == b"\x00\x00\x00\x01"
    assert frame_header(0x01020304) == b"\x01\x02\x03\x04"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    with pytest.raises(ValueError):
        frame_header(0)
    with pytest.raises(ValueError):
        frame_header(2**32)


def test_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME_SIZE == 64 * 1024 * 1024
    assert FrameDecoder().max_frame_size == DEFAULT_MAX_FRAME_SIZE


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=20), st.data())
@settings(max_examples=200, deadline=None)
def test_any_chunking_gives_the_same_frames(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    decoder = FrameDecoder(scratch_size=64 * 1024)
    out: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    assert out == bodies
    assert not decoder.in_frame
    decoder.eof()


def test_large_frame_is_received_in_place() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, larger than the scratch buffer
    stream = encode_frame(body)
    decoder = FrameDecoder(scratch_size=64 * 1024)
    buf = decoder.get_buffer()
    buf[:100] = stream[:100]
    assert decoder.buffer_updated(100) == []
    # Now the decoder offers exactly the rest of the body: one buffer, no copies after this.
    rest = decoder.get_buffer()
    assert len(rest) == len(body) - 96
    rest[:] = stream[100:]
    frames = decoder.buffer_updated(len(stream) - 100)
    assert len(frames) == 1
    assert bytes(frames[0]) == body
    assert not decoder.in_frame


def test_announced_4_gib_raises_at_once_without_allocating() -> None:
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ProtocolError, match="too large"):
            decoder.feed(b"\xff\xff\xff\xff")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < 64 * 1024


def test_limit_boundary_and_zero_length() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    assert decoder.feed(encode_frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(ProtocolError, match="too large"):
        FrameDecoder(max_frame_size=100).feed(struct.pack(">I", 101))
    with pytest.raises(ProtocolError, match="zero-length"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_decoder_is_unusable_after_an_error() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">I", 11))
    with pytest.raises(ProtocolError):
        decoder.feed(encode_frame(b"ok"))


def test_frames_before_a_bad_header_are_delivered_first() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    assert decoder.feed(encode_frame(b"ok") + struct.pack(">I", 11)) == [b"ok"]
    with pytest.raises(ProtocolError, match="too large"):
        decoder.check()


def test_eof_inside_a_frame_raises() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", 1000) + b"0123456789")
    assert decoder.in_frame
    assert decoder.buffered == 14
    with pytest.raises(ProtocolError, match="inside a frame"):
        decoder.eof()


def test_batch_holds_frames_back_until_more() -> None:
    decoder = FrameDecoder(max_frame_size=8)
    decoder.batch = 1
    buf = decoder.get_buffer()
    stream = encode_frame(b"small") + encode_frame(b"a larger frame")
    buf[: len(stream)] = stream
    first = decoder.buffer_updated(len(stream))
    assert [bytes(f) for f in first] == [b"small"]
    # The limit can change between frames (as after authentication).
    decoder.max_frame_size = 1024
    decoder.batch = 0
    assert [bytes(f) for f in decoder.more()] == [b"a larger frame"]


# -- the whole receive pipeline: frames -> msgpack -> schema ---------------------------------


def _pipeline(chunks: list[bytes]) -> tuple[list[Any], str]:
    """Feed chunks; return the valid messages and how it ended: 'more' or 'error'."""
    decoder = FrameDecoder(max_frame_size=4096)
    codec = Codec()
    messages: list[Any] = []
    try:
        for chunk in chunks:
            for body in decoder.feed(chunk):
                messages.append(protocol.validate(codec.decode(body)))
            decoder.check()
    except ProtocolError:
        return messages, "error"
    return messages, "more"


def _valid_frames() -> st.SearchStrategy[bytes]:
    codec = Codec()
    msgs = st.one_of(
        st.builds(lambda i, v: [protocol.REPLY, i, v], st.integers(0, 2**63 - 1), st.integers()),
        st.builds(
            lambda i, n, a: [protocol.CALL, i, n, a],
            st.integers(0, 2**63 - 1),
            st.text(min_size=1, max_size=20),
            st.lists(st.text(max_size=5), max_size=3),
        ),
        st.builds(lambda p: [protocol.PING, p], st.binary(max_size=64)),
    )
    return msgs.map(lambda m: encode_frame(codec.encode(m)))


@given(st.lists(st.one_of(_valid_frames(), st.binary(max_size=40)), max_size=8))
@settings(max_examples=500, deadline=None)
def test_any_bytes_decode_or_raise_protocol_error_whole_or_byte_by_byte(parts: list[bytes]) -> None:
    data = b"".join(parts)
    whole = _pipeline([data])
    by_byte = _pipeline([data[i : i + 1] for i in range(len(data))])
    assert whole == by_byte
    assert whole[1] in ("more", "error")


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_random_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    messages, end = _pipeline([data])
    assert end in ("more", "error")
    for msg in messages:
        assert isinstance(msg, list)
        assert msg[0] in protocol.KIND_NAMES
