"""Framing: a 4-byte big-endian length, then that many bytes of body (sans-I/O).

::

    offset  size  field
    0       4     body length N, unsigned big-endian; 1 <= N <= max_frame_size
    4       N     body: exactly one msgpack object (see asyncdist.codec / asyncdist.protocol)

:class:`FrameDecoder` turns bytes into frame bodies, whatever the chunking.
It checks the announced length against the limit as soon as the 4 header
bytes are in, before it buffers or reserves anything for the body, so a
header announcing 4 GiB costs nothing. Bodies that fit its scratch buffer are
handed out as views into that buffer; a larger body gets one buffer of
exactly its size, which the caller fills directly (``get_buffer`` /
``buffer_updated``, the shape of :class:`asyncio.BufferedProtocol`), so a
large frame is never copied after the kernel wrote it.

This module does no I/O and imports no asyncio, socket or ssl.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "PREAUTH_MAX_FRAME_SIZE",
    "FrameDecoder",
    "encode_frame",
    "frame_header",
]

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
PREAUTH_MAX_FRAME_SIZE = 1024
_MAX_REPRESENTABLE = 2**32 - 1
_DEFAULT_SCRATCH = 256 * 1024
# Reusing the buffer of large bodies spares a fresh allocation, and its page faults, per frame.
_DEFAULT_RETAIN = 16 * 1024 * 1024
# get_buffer() compacts the scratch buffer when less than this is free at its end
# (a quarter of the buffer for small ones).
_MIN_FREE = 16 * 1024
_MIN_SCRATCH = 2048

_header = struct.Struct(">I")
_unpack_header = _header.unpack_from


def frame_header(length: int) -> bytes:
    """Return the 4-byte header for a body of ``length`` bytes."""
    if not 0 < length <= _MAX_REPRESENTABLE:
        raise ValueError(f"frame body length {length} is out of range")
    return _header.pack(length)


def encode_frame(body: bytes) -> bytes:
    """Return header + ``body`` as one bytes object (for small bodies)."""
    return frame_header(len(body)) + body


class FrameDecoder:
    """Incremental decoder of length-prefixed frames.

    Two ways to feed it, which may not be mixed within one frame:

    * :meth:`feed` takes any bytes and returns the completed bodies as
      ``bytes``;
    * :meth:`get_buffer` returns a writable view to receive into, and
      :meth:`buffer_updated` reports how many bytes were written there and
      returns the completed bodies. Bodies from this path are memoryviews
      that stay valid only until the next call into the decoder,
      so decode them at once. The buffer of a large body is reused for the
      next one (up to ``retain_size`` bytes).

    Both raise :class:`ProtocolError` for a zero-length frame or one above
    ``max_frame_size``; after that the decoder is unusable and the
    connection must be closed. When complete frames precede the bad header
    in the same input, those frames are returned first and the error is
    raised by the next call, or by :meth:`check`, which a caller should run
    after handling each batch. :meth:`eof` raises if the stream ended in the
    middle of a frame.
    """

    __slots__ = (
        "_big",
        "_body",
        "_body_filled",
        "_deferred",
        "_end",
        "_failed",
        "_scratch",
        "_start",
        "_view",
        "batch",
        "max_frame_size",
        "retain_size",
    )

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        *,
        scratch_size: int = _DEFAULT_SCRATCH,
        retain_size: int = _DEFAULT_RETAIN,
    ) -> None:
        if not 0 < max_frame_size <= _MAX_REPRESENTABLE:
            raise ValueError(f"max_frame_size must be in 1..2**32-1, not {max_frame_size}")
        if scratch_size < _MIN_SCRATCH:
            raise ValueError(f"scratch_size must be at least {_MIN_SCRATCH}")
        #: Largest body accepted; may be raised or lowered between frames.
        self.max_frame_size = max_frame_size
        #: Most frames returned per call (0: no limit). With 1, the caller can
        #: change ``max_frame_size`` between frames and fetch the rest with :meth:`more`.
        self.batch = 0
        self._scratch = bytearray(scratch_size)
        self._view = memoryview(self._scratch)
        self._start = 0  # first unparsed byte in scratch
        self._end = 0  # one past the last received byte in scratch
        self._body: memoryview | None = None  # a large body being received in place
        self._body_filled = 0
        #: Large-body buffers up to this size are kept for the next large frame.
        self.retain_size = retain_size
        self._big: bytearray | None = None  # the kept buffer
        self._failed = False
        # An error found after complete frames in the same chunk: raised on the next call,
        # so those frames are still delivered (whole or byte by byte, the same result).
        self._deferred: ProtocolError | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def in_frame(self) -> bool:
        """True while a frame has started but is not complete."""
        return self._body is not None or self._end > self._start

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as part of a complete frame."""
        return self._body_filled + (self._end - self._start)

    def check(self) -> None:
        """Raise the :class:`ProtocolError` found after the frames last returned, if any."""
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc

    def eof(self) -> None:
        """Declare the end of the stream; raise :class:`ProtocolError` inside a frame."""
        self.check()
        if self.in_frame:
            raise ProtocolError(f"connection ended inside a frame ({self.buffered} bytes pending)")

    def resize_scratch(self, size: int) -> None:
        """Replace the scratch buffer by one of ``size`` bytes, keeping unparsed bytes.

        Views handed out before stay valid (they keep the old buffer alive).
        A connection starts small before authentication and grows after it.
        """
        if size < _MIN_SCRATCH:
            raise ValueError(f"scratch_size must be at least {_MIN_SCRATCH}")
        pending = self._view[self._start : self._end]
        if len(pending) > size - HEADER_SIZE:
            raise ValueError("the unparsed bytes do not fit a scratch buffer of that size")
        scratch = bytearray(size)
        scratch[: len(pending)] = pending
        self._scratch = scratch
        self._view = memoryview(scratch)
        self._start, self._end = 0, len(pending)

    def release(self) -> None:
        """Drop every buffer (the stream is over): a partial frame is discarded."""
        self._body = None
        self._body_filled = 0
        self._big = None
        self._scratch = bytearray(_MIN_SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0

    # -- buffered path -----------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Return the writable region where the next received bytes must go."""
        self.check()
        if self._failed:
            raise ProtocolError("frame decoder used after a protocol error")
        body = self._body
        if body is not None:
            return body[self._body_filled :]
        free = len(self._scratch) - self._end
        if free < _MIN_FREE and free < len(self._scratch) // 4:
            start, end = self._start, self._end
            if start:
                self._scratch[: end - start] = self._view[start:end]
                self._start, self._end = 0, end - start
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[memoryview]:
        """Account for ``nbytes`` written into the last :meth:`get_buffer` view."""
        self.check()
        body = self._body
        if body is not None:
            self._body_filled += nbytes
            if self._body_filled < len(body):
                return []
            self._body = None
            self._body_filled = 0
            return [body]
        self._end += nbytes
        return self._parse()

    def more(self) -> list[memoryview]:
        """Return frames already buffered but held back by :attr:`batch`."""
        self.check()
        if self._body is not None or self._failed:
            return []
        return self._parse()

    def _parse(self) -> list[memoryview]:
        frames: list[memoryview] = []
        batch = self.batch
        view = self._view
        start, end = self._start, self._end
        limit = self.max_frame_size
        capacity = len(self._scratch) - HEADER_SIZE
        while end - start >= HEADER_SIZE:
            (length,) = _unpack_header(view, start)
            if length > limit or length == 0:
                self._failed = True
                self._start = self._end = 0
                if length == 0:
                    exc = ProtocolError("zero-length frame")
                else:
                    exc = ProtocolError(f"frame too large: {length} bytes announced, limit {limit}")
                if frames:
                    self._deferred = exc
                    return frames
                raise exc
            available = end - start - HEADER_SIZE
            if available >= length:
                body_start = start + HEADER_SIZE
                frames.append(view[body_start : body_start + length])
                start = body_start + length
                if batch and len(frames) >= batch:
                    break
            elif length > capacity:
                # Too big for the scratch buffer: receive the rest in place.
                big = self._big
                if big is None or len(big) < length:
                    big = bytearray(length)
                self._big = big if len(big) <= self.retain_size else None
                body = memoryview(big)[:length]
                body[:available] = view[start + HEADER_SIZE : end]
                self._body = body
                self._body_filled = available
                start = end = 0
                break
            else:
                break
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames

    # -- plain path --------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data`` and return every body it completed, as ``bytes``."""
        out: list[bytes] = []
        mv = memoryview(data).cast("B")
        pos, total = 0, len(mv)
        while pos < total:
            buf = self.get_buffer()
            n = min(len(buf), total - pos)
            buf[:n] = mv[pos : pos + n]
            pos += n
            out.extend(bytes(f) for f in self.buffer_updated(n))
            if self._deferred is not None:
                break
        return out
