"""Helpers for testing code built on asyncdist (and for asyncdist's own tests).

* :func:`connection_pair`: a real server and a real client connection on
  127.0.0.1, both ends' handlers given, everything closed on exit;
* :class:`FaultProxy`: a TCP proxy on loopback between a client and a
  server that can delay, blackhole (half-open: nothing passes, nothing is
  closed), reset or cut traffic on demand;
* :func:`poll_for`: wait for a condition with a deadline, without fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from .connection import Connection, Handler, connect
from .server import serve

__all__ = ["FaultProxy", "connection_pair", "poll_for"]


async def poll_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, *, interval: float = 0.01
) -> None:
    """Return as soon as ``predicate()`` is true; raise TimeoutError after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def connection_pair(
    client_handlers: Mapping[str, Handler] | None = None,
    server_handlers: Mapping[str, Handler] | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Yield ``(client, server_side)``: two ends of one real loopback connection.

    ``kwargs`` (``secret``, ``ssl`` options, :class:`~asyncdist.connection.Options`
    fields) go to both :func:`~asyncdist.server.serve` and
    :func:`~asyncdist.connection.connect`, except ``server_ssl`` and
    ``client_ssl`` which go to one side each.
    """
    server_ssl = kwargs.pop("server_ssl", None)
    client_ssl = kwargs.pop("client_ssl", None)
    accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

    def on_connect(conn: Connection) -> None:
        if not accepted.done():
            accepted.set_result(conn)

    async with (
        serve(server_handlers or {}, port=0, ssl=server_ssl, on_connect=on_connect, **kwargs) as server,
        connect(port=server.port, ssl=client_ssl, handlers=client_handlers, **kwargs) as client,
    ):
        server_side = await asyncio.wait_for(asyncio.shield(accepted), 10)
        yield client, server_side


class FaultProxy:
    """A loopback TCP proxy whose traffic can be disturbed on demand.

    ``async with FaultProxy(target_port) as proxy:`` then connect to
    ``proxy.port``. Methods act on every current connection through it:
    :meth:`blackhole` stops forwarding both ways without closing anything
    (a half-open link), :meth:`resume` forwards again, :meth:`reset`
    aborts both sides (RST), :meth:`set_delay` delays each chunk.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.delay = 0.0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Bytes forwarded so far, both directions together.
        self.forwarded = 0

    @property
    def port(self) -> int:
        """The port to connect to instead of the target's."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> FaultProxy:
        """Start listening on 127.0.0.1 (a free port)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def blackhole(self) -> None:
        """Stop forwarding in both directions; keep every socket open."""
        self._open.clear()

    def resume(self) -> None:
        """Forward again after :meth:`blackhole`."""
        self._open.set()

    def set_delay(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds``."""
        self.delay = seconds

    def reset(self) -> None:
        """Abort every connection through the proxy, both sides (TCP RST)."""
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
        self._writers.clear()

    async def aclose(self) -> None:
        """Stop listening and close every connection through the proxy."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await self._open.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                if dst.is_closing():
                    break
                dst.write(data)
                self.forwarded += len(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not dst.is_closing():
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()
