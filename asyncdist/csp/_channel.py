"""Channels and their ends: :class:`Channel`, :class:`ReaderEnd`, :class:`WriterEnd`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Final

from ..errors import ChannelRetired
from . import _trace
from ._home import NOT_NOW, Choice, Home, Kind, Offer, Packed, local_homes
from ._net import RemoteLink, link_for, local_server

__all__ = [
    "Any2AnyChannel",
    "Any2OneChannel",
    "Channel",
    "ChannelEnd",
    "One2AnyChannel",
    "One2OneChannel",
    "ReaderEnd",
    "WriterEnd",
]

_names = itertools.count(1)


class ThreadScope:
    """The channel operation a plain process's thread is blocked in, so that it can be cancelled."""

    def __init__(self) -> None:
        self.current: concurrent.futures.Future[Any] | None = None
        self.cancelled = False
        self.lock = threading.Lock()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.current is not None:
                self.current.cancel()


#: The scope of the plain process running in this thread (None outside one).
thread_scope = threading.local()


def _run_here(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a channel operation from a thread that is not the channel's loop (a plain process)."""
    scope: ThreadScope | None = getattr(thread_scope, "scope", None)
    if scope is None:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()
    with scope.lock:
        if scope.cancelled:
            coro.close()
            raise concurrent.futures.CancelledError("the process was cancelled")
        fut = scope.current = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result()
    finally:
        scope.current = None


def now_or_awaitable(coro: Coroutine[Any, Any, Any], loops: set[asyncio.AbstractEventLoop], what: str) -> Any:
    """On the channels' loop: ``coro``, to await. In any other thread (a plain process, a
    script, a notebook whose own loop runs there): its result, blocking, as ``cin()`` does.

    ``loops`` are the loops of the channels ``coro`` works on; from another
    thread it runs on theirs (they must be one) and a cancelled process stops
    it. With none (an alternation of only timeout and skip guards) it is
    awaited where a loop runs, else run on a loop of its own in this thread.
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and (not loops or running in loops):
        return coro
    if len(loops) > 1:
        coro.close()
        raise ValueError(f"{what} outside their event loop: give ends of channels of one event loop")
    if loops:
        return _run_here(loops.pop(), coro)
    scope: ThreadScope | None = getattr(thread_scope, "scope", None)
    if scope is not None and scope.cancelled:
        coro.close()
        raise concurrent.futures.CancelledError("the process was cancelled")
    return asyncio.run(coro)


class ChannelEnd:
    """A reader or writer end of a channel: what processes are given.

    An end of a local channel works on its home directly; an end of a
    networked channel (``Channel(name, connect=...)``, or an end that
    arrived from another process) goes through this loop's link to the
    channel's server. Ends can be sent over channels and to other processes
    (mobile ends): the receiver gets an end of the same channel.
    """

    kind: Kind

    def __init__(self, channel: Channel, *, joined: bool = False) -> None:
        self.channel = channel
        self._home = channel._home
        self._link = channel._link
        self._active = True
        if not joined:
            if self._link is not None:
                self._on_own_loop(self._link.send, "csp.join", channel.name, self.kind, channel._buffer)
            else:
                self._on_own_loop(self._home.join, self.kind)

    def _on_own_loop(self, func: Callable[..., None], *args: Any) -> None:
        """Run ``func`` now on the channel's loop, or hand it to that loop from another thread."""
        if self._on_loop():
            func(*args)
        else:
            self._loop.call_soon_threadsafe(func, *args)

    def _check(self) -> None:
        if not self._active:
            raise ChannelRetired(f"this {self.kind} end of {self.channel.name!r} retired or disconnected")

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self._link.loop if self._link is not None else self._home.loop

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _op(self, value: Any = None) -> Any:
        self._check()
        if self._link is not None:
            result = await self._link.op(self.channel.name, self.kind, value)
        else:
            home = self._home
            packed = home.pack(value) if self.kind == "write" else None
            result = home.now(self.kind, packed)
            if result is NOT_NOW:  # it must wait: offer it, as a choice of one
                choice = Choice(home.loop)
                offer = Offer(choice, home, self.kind, packed)
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
                result = choice.future.result()[1]
                if self.kind == "read":
                    home.claimed()
            if type(result) is Packed:
                result = home.codec.decode(result.data)
        if _trace.tracer is not None:
            _trace.event(
                self.kind, channel=self.channel.name, value=value if self.kind == "write" else result
            )
        return result

    async def poison(self) -> None:
        """Poison the channel (the same as ``await csp.poison(end)``)."""
        await self.channel.poison()

    async def retire(self) -> None:
        """Leave the channel for good; the last end of a kind to leave retires that side."""
        if self._active:
            self._active = False
            if _trace.tracer is not None:
                _trace.event("retire", channel=self.channel.name, kind=self.kind)
            if self._link is not None:
                await self._link.call("csp.retire", self.channel.name, self.kind)
            else:
                self._home.leave(self.kind)

    def disconnect(self) -> None:
        """Leave without retiring or poisoning (PyCSP's ``Channel.Disconnect()``)."""
        if self._active:
            self._active = False
            if self._link is not None:
                self._on_own_loop(self._link.send, "csp.leave", self.channel.name, self.kind)
            else:
                self._on_own_loop(self._home.disconnect, self.kind)
            self.channel._ends_left(self)

    def __repr__(self) -> str:
        return f"<{self.kind} end of {self.channel!r}>"


class ReaderEnd(ChannelEnd):
    """``await cin()`` reads a value (a plain process calls ``cin()`` and blocks)."""

    kind: Kind = "read"

    def __call__(self) -> Any:
        if self._on_loop():
            return self._op()
        return _run_here(self._loop, self._op())

    def __aiter__(self) -> ReaderEnd:
        return self

    async def __anext__(self) -> Any:
        """The next value; the loop ends when the writers retired (poison still raises)."""
        try:
            return await self._op()
        except ChannelRetired:
            raise StopAsyncIteration from None


class WriterEnd(ChannelEnd):
    """``await cout(x)`` writes a value (a plain process calls ``cout(x)`` and blocks)."""

    kind: Kind = "write"

    def __call__(self, value: Any) -> Any:
        if self._on_loop():
            return self._op(value)
        return _run_here(self._loop, self._op(value))


class Channel:
    """A channel: any number of readers and writers (PyCSP's Any2Any).

    ``Channel(name=None, buffer=0)``: ``buffer=0`` is a rendezvous,
    ``buffer=N`` a bounded queue. ``reader()`` and ``writer()`` make ends to
    give to processes. A local channel belongs to the event loop it is made
    in (a plain process in a thread reaches it through that loop); a
    :class:`~asyncdist.csp.ChannelServer` running on that loop serves it to
    other processes by name. ``Channel(name, connect=(host, port))`` joins
    the channel of that name on the channel server at that address (made
    there on first use, with this ``buffer``); other keyword arguments are
    :func:`asyncdist.connect` options (``secret``, ``ssl``, heartbeats...).
    """

    max_readers: int | None = None
    max_writers: int | None = None

    def __init__(
        self,
        name: str | None = None,
        buffer: int = 0,
        *,
        connect: tuple[str, int] | None = None,
        **options: Any,
    ) -> None:
        if type(buffer) is not int or buffer < 0:
            raise ValueError("buffer must be 0 (a rendezvous) or a positive capacity")
        self.name = name if name is not None else f"channel-{next(_names)}"
        self._buffer = buffer
        self._link: RemoteLink | None = None
        self._ends = {"read": 0, "write": 0}
        self._made: weakref.WeakSet[ChannelEnd] = weakref.WeakSet()
        self._lock = threading.Lock()
        loop = _current_loop()
        if connect is not None:
            if name is None:
                raise ValueError("a networked channel needs a name: Channel('B', connect=(host, port))")
            server = local_server(loop, connect)
            if server is not None:  # this loop's own server: use the channel directly
                self._home: Home = server.home(self.name, buffer)
            else:
                self._link = link_for(connect, **options)
                self._home = _REMOTE
        else:
            if options:
                raise TypeError(f"unexpected arguments for a local channel: {', '.join(options)}")
            self._home = Home(self.name, buffer, loop)
            local_homes(loop).setdefault(self.name, self._home)

    @classmethod
    def _attached(cls, name: str, buffer: int, *, home: Home | None, link: RemoteLink | None) -> Channel:
        """A channel object for an end that arrived from elsewhere (its home or link given)."""
        channel = cls.__new__(cls)
        channel.name = name
        channel._buffer = buffer
        channel._link = link
        channel._home = home if home is not None else _REMOTE
        channel._ends = {"read": 0, "write": 0}
        channel._made = weakref.WeakSet()
        channel._lock = threading.Lock()
        return channel

    @property
    def buffer(self) -> int:
        return self._buffer

    def _new_end(self, kind: Kind) -> None:
        limit = self.max_readers if kind == "read" else self.max_writers
        with self._lock:
            if limit is not None and self._ends[kind] >= limit:
                role = "reader" if kind == "read" else "writer"
                raise ValueError(
                    f"{type(self).__name__} {self.name!r} allows {limit} {role} end(s); it has one"
                )
            self._ends[kind] += 1

    def _ends_left(self, end: ChannelEnd) -> None:
        with self._lock:
            self._ends[end.kind] = max(0, self._ends[end.kind] - 1)

    def reader(self) -> ReaderEnd:
        """A new reader end (it joins the channel's readers)."""
        self._new_end("read")
        end = ReaderEnd(self)
        self._made.add(end)
        return end

    def writer(self) -> WriterEnd:
        """A new writer end (it joins the channel's writers)."""
        self._new_end("write")
        end = WriterEnd(self)
        self._made.add(end)
        return end

    async def poison(self) -> None:
        """Poison the channel: every pending and later read or write on any end raises."""
        if _trace.tracer is not None:
            _trace.event("poison", channel=self.name)
        if self._link is not None:
            await self._link.call("csp.poison", self.name)
        else:
            self._home.poison()

    def disconnect(self) -> None:
        """Every end made from this channel object leaves it, without poisoning or retiring it.

        PyCSP's ``Channel.Disconnect()``: a client of a networked channel is
        done with it; the channel and its other ends go on (and this process
        may join it again with a new ``Channel(name, connect=...)``).
        """
        for end in list(self._made):
            end.disconnect()

    Disconnect = disconnect  # PyCSP's name

    def __repr__(self) -> str:
        extra = f", buffer={self.buffer}" if self.buffer else ""
        return f"{type(self).__name__}({self.name!r}{extra})"


class One2OneChannel(Channel):
    """One reader end and one writer end at most."""

    max_readers = 1
    max_writers = 1


class One2AnyChannel(Channel):
    """One writer end, any number of readers."""

    max_writers = 1


class Any2OneChannel(Channel):
    """Any number of writers, one reader end."""

    max_readers = 1


class Any2AnyChannel(Channel):
    """Any number of readers and writers (the same as :class:`Channel`)."""


class _Remote(Home):
    """The home of a networked channel is on its server; this stands in for it here."""

    def __init__(self) -> None:
        self.name = "(remote)"


_REMOTE: Final = _Remote()


def _current_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "make channels inside the event loop that runs the processes (in an async function "
            "run by asyncdist.run or asyncio.run)"
        ) from None
