"""serve(): accept authenticated connections over TCP or a Unix socket.

Each accepted connection is a :class:`~asyncdist.connection.Connection`
that speaks first (HELLO) and must finish the handshake (TLS included)
within ``handshake_timeout``. At most ``max_unauthenticated`` connections
may be in the handshake at once; more are closed on arrival, before any
buffer is allocated for them, so a flood of silent connections costs bounded
memory and file descriptors and never touches sessions that are already
open. A connection that breaks the protocol, or fails its TLS handshake, is
closed and counted alone; the server keeps serving everyone else.

The server accepts on its own sockets and attaches each one with
:meth:`asyncio.loop.connect_accepted_socket`, which reports a failed TLS
handshake to the server (``create_server`` would drop it silently).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import ssl as _ssl
import stat
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._log import get_logger
from .connection import Connection, Handler, Options, _AwaitableContext
from .errors import AsyncDistError, ConnectionClosedError, ProtocolError, TLSError
from .security import check_bind, resolve_secret

__all__ = ["Server", "ServerStats", "serve"]

log = get_logger("asyncdist.server")

HandlerTable = Mapping[str, Handler]
HandlerFactory = Callable[[Connection], HandlerTable]
OnConnect = Callable[[Connection], Awaitable[None] | None]


@dataclass
class ServerStats:
    """Counters of a server since it started."""

    accepted: int = 0
    refused_unauthenticated: int = 0
    opened: int = 0
    handshake_failures: int = 0
    protocol_errors: int = 0
    closed: int = 0


class Server:
    """A listening asyncdist server (made by :func:`serve`)."""

    def __init__(
        self,
        handlers: HandlerTable | HandlerFactory | None,
        *,
        secret: bytes | None,
        options: Options,
        on_connect: OnConnect | None,
        max_unauthenticated: int,
        tls: _ssl.SSLContext | None = None,
    ) -> None:
        self._handlers = handlers
        self._tls = tls
        self._secret = secret
        self.options = options
        self._on_connect = on_connect
        self._max_unauth = max_unauthenticated
        self._listeners: list[socket.socket] = []
        self._handshaking: set[Connection] = set()
        self._open: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting: set[asyncio.Task[Any]] = set()
        self._attaching = 0
        self._path: str | None = None
        self._address: tuple[str, int] | None = None
        self._closing = False
        self._closed = asyncio.get_running_loop().create_future()
        self.stats = ServerStats()

    # -- public ------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """``(host, port)`` of the first listening socket, or the Unix socket path."""
        if self._path is not None:
            return self._path
        assert self._address is not None
        return self._address

    @property
    def tcp_address(self) -> tuple[str, int]:
        """``(host, port)`` of a TCP server (raises ValueError for a Unix socket server)."""
        address = self.address
        if isinstance(address, str):
            raise ValueError("a Unix socket server has no host and port")
        return address

    @property
    def port(self) -> int:
        """The TCP port (useful after binding port 0)."""
        return self.tcp_address[1]

    @property
    def connections(self) -> frozenset[Connection]:
        """Connections that completed the handshake and are not closed yet."""
        return frozenset(self._open)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return tuple(self._listeners)

    def close(self) -> None:
        """Stop listening and start closing every connection gracefully. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for task in list(self._accepting):
            task.cancel()  # accept loops, and TLS handshakes still in progress
        for sock in self._listeners:
            sock.close()
        for conn in list(self._handshaking):
            conn.abort()
        for conn in list(self._open):
            self._track(conn.close("server shutting down"))
        loop = asyncio.get_running_loop()
        self._track(self._finish_close(loop))

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` finished: listener and every connection closed."""
        await asyncio.shield(self._closed)

    async def aclose(self) -> None:
        """:meth:`close` and :meth:`wait_closed`."""
        self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until the server is closed (cancelling this closes it)."""
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        where = self.address if self._listeners else "?"
        return f"<Server {where} open={len(self._open)}>"

    # -- internals ---------------------------------------------------------------------

    def _track(self, coro: Coroutine[Any, Any, Any], *, accepting: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if accepting:
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)

    async def _finish_close(self, loop: asyncio.AbstractEventLoop) -> None:
        conns = list(self._open) + list(self._handshaking)
        for conn in conns:
            await conn.wait_closed()
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        if self._path is not None:
            try:
                if stat.S_ISSOCK(os.stat(self._path).st_mode):
                    os.unlink(self._path)
            except OSError:
                pass
        if not self._closed.done():
            self._closed.set_result(None)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if self._closing:
                    return
                # E.g. out of file descriptors: back off instead of spinning.
                log.warning("accept() failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.stats.accepted += 1
            if self._closing or len(self._handshaking) + self._attaching >= self._max_unauth:
                self._refuse(client)
                continue
            self._attaching += 1  # counts against the cap until its Connection exists
            self._track(self._attach(client), accepting=True)

    def _refuse(self, client: socket.socket) -> None:
        client.close()
        self.stats.refused_unauthenticated += 1
        refused = self.stats.refused_unauthenticated
        if refused in (1, 10, 100, 1000) or refused % 10000 == 0:
            log.warning(
                "refusing connections: %d are already in the handshake (refused so far: %d)",
                len(self._handshaking),
                refused,
            )

    async def _attach(self, client: socket.socket) -> None:
        conn: Connection | None = None
        attaching = True

        def factory() -> Connection:
            nonlocal conn, attaching
            attaching = False
            self._attaching -= 1
            handlers = self._handlers if isinstance(self._handlers, Mapping) else None
            conn = Connection(
                initiator=False,
                secret=self._secret,
                handlers=handlers,
                options=self.options,
                on_open=self._opened,
                on_lost=self._lost,
            )
            self._handshaking.add(conn)
            return conn

        loop = asyncio.get_running_loop()
        timeout = self.options.handshake_timeout
        try:
            await loop.connect_accepted_socket(
                factory,
                client,
                ssl=self._tls,
                ssl_handshake_timeout=timeout if self._tls is not None else None,
            )
        except BaseException as exc:
            client.close()
            if attaching:
                self._attaching -= 1
            if conn is None:
                if not isinstance(exc, asyncio.CancelledError):
                    log.warning("could not attach an accepted connection: %s", exc)
                return
            error: AsyncDistError
            if isinstance(exc, asyncio.CancelledError):
                error = ConnectionClosedError("the server closed during the TLS handshake")
            elif isinstance(exc, _ssl.SSLError):
                error = TLSError(f"TLS handshake failed: {exc.reason or exc}")
            elif isinstance(exc, TimeoutError):
                error = ProtocolError(f"no TLS handshake within {timeout:g} s (is the client using TLS?)")
            else:
                error = ConnectionClosedError(f"connection lost during the TLS handshake: {exc!r}")
            conn.tls_failed(error)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _opened(self, conn: Connection) -> None:
        self._handshaking.discard(conn)
        self._open.add(conn)
        self.stats.opened += 1
        if self._handlers is not None and not isinstance(self._handlers, Mapping):
            conn.handlers = self._handlers(conn)
        if self._on_connect is not None:
            result = self._on_connect(conn)
            if inspect.isawaitable(result):
                self._track(self._run_on_connect(conn, result))

    async def _run_on_connect(self, conn: Connection, aw: Awaitable[None]) -> None:
        try:
            await aw
        except Exception:
            log.exception("on_connect failed for %s; closing it", conn.remote_address)
            conn.abort()

    def _lost(self, conn: Connection) -> None:
        if conn in self._handshaking:
            self._handshaking.discard(conn)
            self.stats.handshake_failures += 1
        else:
            self._open.discard(conn)
            self.stats.closed += 1
        exc = conn.close_exception
        cause = exc.__cause__ if exc is not None else None
        if isinstance(cause, ProtocolError):
            self.stats.protocol_errors += 1


async def _bind_tcp(
    host: str | None, port: int, backlog: int, reuse_port: bool | None
) -> list[socket.socket]:
    try:
        # A numeric address needs no lookup (and no executor thread).
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE | socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    socks: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, type_, proto, _, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # every address on the port the first one got
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_unix(path: str, backlog: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket file from an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


async def _start(
    server: Server,
    host: str | None,
    port: int | None,
    path: str | None,
    backlog: int,
    reuse_port: bool | None,
) -> Server:
    if path is not None:
        server._listeners = [_bind_unix(path, backlog)]
        server._path = path
    else:
        server._listeners = await _bind_tcp(host, port or 0, backlog, reuse_port)
        server._address = server._listeners[0].getsockname()[:2]
    for sock in server._listeners:
        server._track(server._accept_loop(sock), accepting=True)
    return server


def serve(
    handlers: HandlerTable | HandlerFactory | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    *,
    path: str | os.PathLike[str] | None = None,
    secret: str | bytes | None = None,
    secret_file: str | os.PathLike[str] | None = None,
    ssl: _ssl.SSLContext | None = None,
    insecure: bool = False,
    on_connect: OnConnect | None = None,
    options: Options | None = None,
    max_unauthenticated: int = 64,
    backlog: int = 1024,
    reuse_port: bool | None = None,
    **option_overrides: Any,
) -> _AwaitableContext[Server]:
    """Listen for asyncdist connections; ``await`` it or use ``async with``.

    ``handlers`` is one mapping of name to handler shared by every
    connection, or a function ``(connection) -> mapping`` called for each
    connection once it is authenticated. ``on_connect(connection)`` (sync
    or async) runs after that. Binds 127.0.0.1 by default; a non-loopback
    ``host`` without a secret or mutual TLS raises
    :class:`~asyncdist.errors.ConfigurationError` unless ``insecure=True``.
    ``path`` serves on a Unix socket (mode 0600) instead of TCP. Keyword
    arguments named like :class:`~asyncdist.connection.Options` fields
    override ``options``.
    """
    opts = replace(options or Options(), **option_overrides)
    key = resolve_secret(secret, secret_file=secret_file)
    if path is None:
        check_bind(host, secret=key, ssl=ssl, insecure=insecure)
        if insecure and key is None and ssl is None:
            log.warning("serving on %s:%s WITHOUT authentication (insecure=True)", host, port)

    async def start() -> Server:
        server = Server(
            handlers,
            secret=key,
            options=opts,
            on_connect=on_connect,
            max_unauthenticated=max_unauthenticated,
            tls=ssl,
        )
        return await _start(
            server,
            host,
            port,
            os.fspath(path) if path is not None else None,
            backlog,
            reuse_port,
        )

    return _AwaitableContext(start)
