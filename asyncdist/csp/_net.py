"""Networked channels: a :class:`ChannelServer` hosts named channels; other processes join them.

The server keeps each channel's :class:`~._channel.Home`; a remote end is a
thin client that asks the server to read, write, poison or retire over one
:class:`~asyncdist.connection.Connection` per (event loop, server). A read
or a write is one call that returns when the home has matched it, so a
rendezvous stays a rendezvous across processes; cancelling the call
withdraws the offer (or gives back a value a cancelled reader was just
given). When a connection is lost, the ends it had joined leave their
channels as if they retired: a dead writer makes the blocked readers raise
:class:`ChannelRetired` (after the buffered values), a dead reader makes
the blocked writers raise it, within the heartbeat bound.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as _ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..connection import Connection, connect
from ..server import Server, serve

if TYPE_CHECKING:
    from ._channel import Kind

__all__ = ["ChannelServer", "RemoteLink", "link_for"]


class _Session:
    """The ends one connection joined, so that they leave when it is lost."""

    def __init__(self, server: ChannelServer, conn: Connection) -> None:
        self.server = server
        self.joined: collections.Counter[tuple[str, Kind]] = collections.Counter()
        self.handlers: dict[str, Callable[..., Any]] = {
            "csp.join": self.join,
            "csp.op": self.op,
            "csp.poison": self.poison,
            "csp.retire": self.retire,
            "csp.leave": self.leave,
        }
        conn.add_close_callback(self.lost)

    def _home(self, name: Any) -> Any:
        home = self.server.homes.get(name) if type(name) is str else None
        if home is None:
            raise LookupError(f"no channel named {str(name)[:80]!r} on this server (join it first)")
        return home

    @staticmethod
    def _kind(kind: Any) -> Kind:
        if kind not in ("read", "write"):
            raise ValueError("kind must be 'read' or 'write'")
        k: Kind = kind
        return k

    def join(self, name: Any, kind: Any, buffer: Any = 0) -> int:
        from ._channel import Home

        if type(name) is not str or not 0 < len(name) <= 1024:
            raise ValueError("a channel name is a string of 1 to 1024 characters")
        if type(buffer) is not int or not 0 <= buffer <= 1_000_000:
            raise ValueError("buffer must be an int from 0 to 1,000,000")
        kind = self._kind(kind)
        home = self.server.homes.get(name)
        if home is None:
            home = self.server.homes[name] = Home(name, buffer, asyncio.get_running_loop())
        home.join(kind)
        self.joined[(name, kind)] += 1
        return home.capacity

    async def op(self, name: Any, kind: Any, value: Any = None) -> Any:
        from ._channel import Choice, Offer

        home = self._home(name)
        choice = Choice(home.loop)
        offer = Offer(choice, home, self._kind(kind), value)
        choice.offers.append(offer)
        if not home.offer(offer):
            try:
                await choice.future
            except asyncio.CancelledError:
                if not choice.future.done() or choice.future.cancelled():
                    choice.close()
                else:
                    home.give_back(choice)
                raise
        return choice.future.result()[1]

    def poison(self, name: Any) -> None:
        self._home(name).poison()

    def retire(self, name: Any, kind: Any) -> None:
        kind = self._kind(kind)
        home = self._home(name)
        if self.joined[(name, kind)] > 0:
            self.joined[(name, kind)] -= 1
            home.leave(kind)

    def leave(self, name: Any, kind: Any) -> None:
        kind = self._kind(kind)
        home = self._home(name)
        if self.joined[(name, kind)] > 0:
            self.joined[(name, kind)] -= 1
            home.disconnect(kind)

    def lost(self, conn: Connection) -> None:
        for (name, kind), count in self.joined.items():
            home = self.server.homes.get(name)
            if home is not None:
                for _ in range(count):
                    home.leave(kind)
        self.joined.clear()


class ChannelServer:
    """Hosts named channels for other processes: ``server = await ChannelServer.start(host, port)``.

    A channel is made when the first client joins it by name (with that
    client's buffer size). Serve until :meth:`close` or cancellation of
    :meth:`serve_forever`.
    """

    def __init__(self) -> None:
        self.homes: dict[str, Any] = {}
        self._server: Server | None = None

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        insecure: bool = False,
        **options: Any,
    ) -> ChannelServer:
        self = cls()
        self._server = await serve(
            lambda conn: _Session(self, conn).handlers,
            host,
            port,
            secret=secret,
            ssl=ssl,
            insecure=insecure,
            **options,
        )
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        address = self._server.address
        assert isinstance(address, tuple)
        return address

    @property
    def port(self) -> int:
        return self.address[1]

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> ChannelServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class RemoteLink:
    """This process's connection to one channel server, opened at first use, shared by its ends."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: tuple[str, int], options: dict[str, Any]
    ) -> None:
        self.loop = loop
        self.address = address
        self.options = options
        self._conn: Connection | None = None
        self._opening: asyncio.Task[Connection] | None = None
        self._joins: list[tuple[str, Kind, int]] = []

    def leave(self, name: str, kind: Kind) -> None:
        """Leave a channel without retiring it (sent once connected)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.notify_nowait("csp.leave", name, kind)

    def join(self, name: str, kind: Kind, buffer: int) -> None:
        """Join now if connected, else as soon as the connection opens (before any operation)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.notify_nowait("csp.join", name, kind, buffer)
        else:
            self._joins.append((name, kind, buffer))
            self._start()

    def _start(self) -> None:
        if self._opening is None or (self._opening.done() and self._conn is None):
            self._opening = self.loop.create_task(self._open())

    async def _open(self) -> Connection:
        host, port = self.address
        conn = await connect(host, port, **self.options)
        for name, kind, buffer in self._joins:
            conn.notify_nowait("csp.join", name, kind, buffer)
        self._joins.clear()
        self._conn = conn
        return conn

    async def connection(self) -> Connection:
        conn = self._conn
        if conn is not None:
            return conn
        self._start()
        assert self._opening is not None
        return await asyncio.shield(self._opening)

    async def call(self, name: str, *args: Any) -> Any:
        conn = await self.connection()
        return await conn.call(name, *args)

    async def aclose(self) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


_links: dict[tuple[asyncio.AbstractEventLoop, tuple[str, int]], RemoteLink] = {}


def link_for(address: tuple[str, int], **options: Any) -> RemoteLink:
    """The link of the running loop to the channel server at ``address`` (made on first use)."""
    loop = asyncio.get_running_loop()
    key = (loop, (address[0], int(address[1])))
    link = _links.get(key)
    if link is None:
        link = _links[key] = RemoteLink(loop, key[1], options)
    return link


async def shutdown() -> None:
    """Close this loop's links to channel servers (PyCSP's ``shutdown()``)."""
    loop = asyncio.get_running_loop()
    for key in [k for k in _links if k[0] is loop]:
        await _links.pop(key).aclose()
