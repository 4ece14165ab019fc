"""Raw-byte peers for the bad-input tests (RELIABILITY.md, C2 and F25/F26).

* :class:`EvilClient`: a plain ``asyncio.open_connection`` client that sends
  whatever bytes a test wants; :meth:`EvilClient.handshake` authenticates by
  hand (the crypto is :class:`asyncdist.protocol.InitiatorHandshake`), after
  which it can speak post-auth messages;
* :class:`FakeServer`: a listener whose script plays a hostile server against
  a real :func:`asyncdist.connect` client;
* :class:`ThrottleProxy`: forwards server-to-client bytes at a fixed rate (a
  slow consumer) and client-to-server bytes at full speed;
* :func:`traced`: the tracemalloc peak of a block.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import struct
import tracemalloc
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncdist import protocol as P
from asyncdist.codec import Codec, decode_plain
from asyncdist.frames import FrameDecoder, frame_header

CHUNK = 64 * 1024
_ANY_LENGTH = 2**32 - 1
_LINGER_RESET = struct.pack("ii", 1, 0)


class PeerClosed(AssertionError):
    """The other side closed the connection while a message was expected."""


class RawPeer:
    """One end of a TCP connection driven by hand: frames in, bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = Codec()
        self._decoder = FrameDecoder(_ANY_LENGTH)
        self._frames: deque[bytes] = deque()
        #: Every byte received so far, in order (small tests only look at it).
        self.received = bytearray()
        self.closed_by_peer = False
        #: The frames :meth:`expect_closed` collected before the close.
        self.last_frames: list[bytes] = []

    @property
    def sockname(self) -> Any:
        return self.writer.get_extra_info("sockname")

    # -- sending ---------------------------------------------------------------------------

    async def send_raw(self, data: bytes | bytearray | memoryview, *, ignore_errors: bool = False) -> bool:
        """Send ``data`` in chunks, waiting for drain; return False if the peer went away."""
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), CHUNK):
                if self.writer.is_closing():
                    raise ConnectionResetError("transport is closing")
                self.writer.write(view[start : start + CHUNK])
                await self.writer.drain()
        except (ConnectionError, OSError):
            if not ignore_errors:
                raise
            return False
        return True

    async def send_frame(self, body: bytes | bytearray | memoryview, *, ignore_errors: bool = False) -> bool:
        """Send one frame: header, then ``body`` (large bodies are not copied)."""
        if not await self.send_raw(frame_header(len(body)), ignore_errors=ignore_errors):
            return False
        return await self.send_raw(body, ignore_errors=ignore_errors)

    async def send_message(self, msg: Any, *, ignore_errors: bool = False) -> bool:
        """Encode ``msg`` with asyncdist's codec and send it as one frame."""
        return await self.send_frame(self.codec.encode(msg), ignore_errors=ignore_errors)

    # -- receiving -------------------------------------------------------------------------

    async def _fill(self) -> bool:
        """Read once; return False at EOF or reset."""
        try:
            data = await self.reader.read(CHUNK)
        except ConnectionError:
            data = b""
        if not data:
            self.closed_by_peer = True
            return False
        if len(self.received) < 1 << 20:
            self.received += data
        self._frames.extend(self._decoder.feed(data))
        return True

    async def recv_frame(self, timeout: float = 5.0) -> bytes:
        """Return the next frame body; raise :class:`PeerClosed` at EOF, TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not self._frames:
                if not await self._fill():
                    raise PeerClosed("the peer closed the connection")
        return self._frames.popleft()

    async def recv_message(self, timeout: float = 5.0, *, answer_pings: bool = True) -> Any:
        """Return the next decoded message, skipping PINGs (answered unless told not to) and PONGs.

        Pass ``answer_pings=False`` while another task is writing: a PONG would
        land between two chunks of its frames.
        """
        while True:
            msg = self.codec.decode(await self.recv_frame(timeout))
            if type(msg) is list and msg and msg[0] == P.PING:
                if answer_pings:
                    await self.send_message([P.PONG, msg[1]])
                continue
            if type(msg) is list and msg and msg[0] == P.PONG:
                continue
            return msg

    async def expect_closed(self, timeout: float = 5.0) -> list[bytes]:
        """Read until the peer closes (EOF or reset); return the frames received meanwhile.

        Fails the test if the connection is still open after ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while await self._fill():
                    pass
        except TimeoutError:
            raise AssertionError(f"the peer did not close the connection within {timeout:g} s") from None
        frames = list(self._frames)
        self._frames.clear()
        self.last_frames = frames
        return frames

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close this end (idempotent) and wait until the socket is released."""
        self.writer.transport.abort()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashed or killed peer would."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        await self.aclose()

    # -- handshake, acceptor side ----------------------------------------------------------

    async def accept_handshake(self, secret: bytes | None, **params: Any) -> dict[str, Any]:
        """Play the acceptor: HELLO, check AUTH, OK. Return the decoded AUTH."""
        hs = P.AcceptorHandshake(secret, **params)
        await self.send_frame(hs.hello())
        auth = await self.recv_frame()
        ok, _ = hs.receive_auth(auth)
        await self.send_frame(ok)
        return dict(decode_plain(auth))


class EvilClient(RawPeer):
    """A client that sends raw bytes to a server; see the module docstring."""

    #: The handshake as it went by (bodies), for replay and reflection tests.
    hello_body: bytes = b""
    auth_body: bytes = b""
    ok_body: bytes = b""
    #: The server's side of this connection, when the test looked it up.
    server_conn: Any = None

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", *, bufsize: int | None = None) -> EvilClient:
        """Connect; ``bufsize`` shrinks the kernel's send and receive buffers (before connect)."""
        if bufsize is None:
            reader, writer = await asyncio.open_connection(host, port)
            return cls(reader, writer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def read_hello(self) -> bytes:
        """Receive the server's HELLO body (kept in :attr:`hello_body`)."""
        self.hello_body = await self.recv_frame()
        return self.hello_body

    async def handshake(self, secret: bytes | None, **params: Any) -> P.PeerInfo:
        """Authenticate by hand: read HELLO, send AUTH, check OK."""
        if not self.hello_body:
            await self.read_hello()
        hs = P.InitiatorHandshake(secret, **params)
        self.auth_body = hs.receive_hello(self.hello_body)
        await self.send_frame(self.auth_body)
        self.ok_body = await self.recv_frame()
        return hs.receive_ok(self.ok_body)

    async def call(self, call_id: int, name: str, *args: Any, timeout: float = 5.0) -> list[Any]:
        """Send a CALL and return the answer (REPLY or ERROR) for that id."""
        await self.send_message([P.CALL, call_id, name, list(args)])
        return await self.answer(call_id, timeout)

    async def answer(self, call_id: int, timeout: float = 5.0) -> list[Any]:
        """Return the next REPLY or ERROR message for ``call_id`` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv_message(timeout)
                if msg[0] in (P.REPLY, P.ERROR) and msg[1] == call_id:
                    return list(msg)


Script = Callable[[RawPeer], Awaitable[None]]


class FakeServer:
    """A hostile server: ``script(peer)`` runs for every accepted connection.

    Exceptions raised by a script (its own assertions) are kept in
    :attr:`errors` for the test to check.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = RawPeer(reader, writer)
        try:
            await self.script(peer)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            await peer.aclose()
            self._tasks.discard(task)


class ThrottleProxy:
    """Loopback proxy: client-to-server at full speed, server-to-client at ``rate`` bytes/s."""

    def __init__(self, target_port: int, rate: float, chunk: int = 1024) -> None:
        self.target_port = target_port
        self.rate = rate
        self.chunk = chunk
        #: Bytes delivered to the client so far.
        self.delivered = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> ThrottleProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            # A small reader limit keeps the proxy's own buffer small: the server must wait.
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port, limit=self.chunk
            )
            self._writers.append(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer, throttle=False),
                self._pipe(up_reader, writer, throttle=True),
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, throttle: bool) -> None:
        try:
            while True:
                data = await src.read(self.chunk if throttle else CHUNK)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
                if throttle:
                    self.delivered += len(data)
                    await asyncio.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            dst.transport.abort()


@dataclass
class Traced:
    """Result of :func:`traced`: bytes allocated at the peak, and still allocated at the end."""

    peak: int = 0
    current: int = 0


@contextlib.contextmanager
def traced() -> Iterator[Traced]:
    """Trace Python allocations inside the block (tracemalloc); report peak and residue."""
    result = Traced()
    tracemalloc.start()
    try:
        yield result
    finally:
        result.current, result.peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()


class TouchOnLoad:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def pickle_bomb(marker: Path) -> bytes:
    """A live pickle whose loading creates ``marker`` (checked on a control file first)."""
    data = pickle.dumps(TouchOnLoad(marker), protocol=5)
    control = marker.with_name(marker.name + "-control")
    pickle.loads(pickle.dumps(TouchOnLoad(control), protocol=5))  # the payload is live
    assert control.exists()
    control.unlink()
    return data
