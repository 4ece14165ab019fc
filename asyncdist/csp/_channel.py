"""Channels: the home of a channel's state, its reader and writer ends, poison and retire.

Every channel has one *home* (:class:`Home`) that holds its state: the
buffered values, the reads and writes waiting, and whether it is poisoned
or retired. A read or a write is an *offer* made on behalf of a *choice*
(:class:`Choice`): a plain read or write is a choice of one offer; an
alternation is one choice with an offer per guard. The home matches a read
offer with a write offer only when both choices are still open and commits
both at once, so a value is never lost or delivered twice, and an
alternation commits exactly one of its guards. Matching is synchronous on
the home's event loop, which makes it atomic.

Semantics (PyCSP's): ``buffer=0`` is a rendezvous, a write completes when a
reader has taken the value; ``buffer=N`` is a bounded queue. Poison makes
every pending and later operation raise :class:`ChannelPoisoned`. Retire:
when every writer end that joined has retired, reads raise
:class:`ChannelRetired` once the buffer is drained; when every reader end
has retired, writes raise it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal

from ..errors import ChannelEnded, ChannelPoisoned, ChannelRetired
from ._net import RemoteLink, link_for

__all__ = [
    "Any2AnyChannel",
    "Any2OneChannel",
    "Channel",
    "ChannelEnd",
    "Choice",
    "Home",
    "Offer",
    "One2AnyChannel",
    "One2OneChannel",
    "ReaderEnd",
    "WriterEnd",
]

Kind = Literal["read", "write"]
_names = itertools.count(1)
_MISSING: Final = object()


class Choice:
    """One operation waiting to happen: a read, a write, or an alternation over several offers.

    ``commit()`` succeeds once; the winner's outcome is set on ``future``.
    """

    __slots__ = ("_open", "future", "offers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[tuple[Offer, Any]] = loop.create_future()
        self.offers: list[Offer] = []
        self._open = True

    @property
    def open(self) -> bool:
        """Still waiting to be committed (a cancelled waiter's future closes it at once)."""
        return self._open and not self.future.done()

    def close(self) -> None:
        """Withdraw every offer of this choice (it was committed, cancelled or timed out)."""
        self._open = False
        for offer in self.offers:
            offer.home.withdraw(offer)
        self.offers.clear()

    def win(self, offer: Offer, value: Any) -> None:
        self.close()
        if not self.future.done():
            self.future.set_result((offer, value))

    def fail(self, exc: BaseException) -> None:
        self.close()
        if not self.future.done():
            self.future.set_exception(exc)


class Offer:
    """A read or a write offered to a channel's home on behalf of a choice."""

    __slots__ = ("choice", "home", "kind", "tag", "value")

    def __init__(self, choice: Choice, home: Home, kind: Kind, value: Any = None, tag: Any = None) -> None:
        self.choice = choice
        self.home = home
        self.kind = kind
        self.value = value
        #: What the choice knows this offer by (an alternation's guard).
        self.tag = tag


class Home:
    """The state of one channel, on the event loop that hosts it."""

    def __init__(self, name: str, buffer: int, loop: asyncio.AbstractEventLoop) -> None:
        if buffer < 0:
            raise ValueError("buffer must be 0 (a rendezvous) or a positive capacity")
        self.name = name
        self.capacity = buffer
        self.loop = loop
        self.values: deque[Any] = deque()
        self.readers: deque[Offer] = deque()
        self.writers: deque[Offer] = deque()
        self.poisoned = False
        self.joined = {"read": 0, "write": 0}
        self.retired = {"read": False, "write": False}
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []

    # -- membership ------------------------------------------------------------------------

    def join(self, kind: Kind) -> None:
        self.joined[kind] += 1

    def leave(self, kind: Kind) -> None:
        """An end retired: when the last of its kind leaves, the other side sees retirement."""
        self.joined[kind] -= 1
        if self.joined[kind] <= 0 and not self.retired[kind]:
            self.retired[kind] = True
            self._emit("retire", kind=kind)
            self._fail_waiting()

    def disconnect(self, kind: Kind) -> None:
        """An end leaves without retiring the channel (it may join again)."""
        self.joined[kind] = max(0, self.joined[kind] - 1)

    # -- state checks ------------------------------------------------------------------------

    def ended(self, kind: Kind) -> ChannelEnded | None:
        """Why an offer of ``kind`` can never complete now, or None."""
        if self.poisoned:
            return ChannelPoisoned(f"channel {self.name!r} is poisoned")
        if kind == "read" and self.retired["write"] and not self.values and not self._live(self.writers):
            return ChannelRetired(f"every writer of channel {self.name!r} retired")
        if kind == "write" and self.retired["read"]:
            return ChannelRetired(f"every reader of channel {self.name!r} retired")
        return None

    @staticmethod
    def _live(queue: deque[Offer]) -> bool:
        return any(o.choice.open for o in queue)

    def ready(self, kind: Kind) -> bool:
        """Whether an offer of ``kind`` would complete at once."""
        if kind == "read":
            return bool(self.values) or self._live(self.writers)
        return len(self.values) < self.capacity or self._live(self.readers)

    # -- offers ------------------------------------------------------------------------------

    def offer(self, offer: Offer) -> bool:
        """Try to complete ``offer`` now; queue it if it must wait. True if it completed."""
        ended = self.ended(offer.kind)
        if ended is not None:
            offer.choice.fail(ended)
            return True
        done = self._read(offer) if offer.kind == "read" else self._write(offer)
        if not done:
            (self.readers if offer.kind == "read" else self.writers).append(offer)
        return done

    def _next_live(self, queue: deque[Offer], exclude: Choice) -> Offer | None:
        while queue:
            other = queue[0]
            if not other.choice.open:
                queue.popleft()
                continue
            if other.choice is exclude:  # an alternation cannot read from itself
                for candidate in itertools.islice(queue, 1, None):
                    if candidate.choice.open and candidate.choice is not exclude:
                        return candidate
                return None
            return other
        return None

    def _read(self, offer: Offer) -> bool:
        if self.values:
            value = self.values.popleft()
            writer = self._next_live(self.writers, offer.choice) if len(self.values) < self.capacity else None
            if writer is not None:  # room again: the first waiting writer's value moves in
                self._take(self.writers, writer)
                self.values.append(writer.value)
                writer.choice.win(writer, None)
                self._emit("write", value=writer.value)
            offer.choice.win(offer, value)
            self._emit("read", value=value)
            return True
        writer = self._next_live(self.writers, offer.choice)
        if writer is None:
            return False
        self._take(self.writers, writer)
        writer.choice.win(writer, None)
        offer.choice.win(offer, writer.value)
        self._emit("write", value=writer.value)
        self._emit("read", value=writer.value)
        return True

    def _write(self, offer: Offer) -> bool:
        reader = self._next_live(self.readers, offer.choice)
        if reader is not None and not self.values:
            self._take(self.readers, reader)
            reader.choice.win(reader, offer.value)
            offer.choice.win(offer, None)
            self._emit("write", value=offer.value)
            self._emit("read", value=offer.value)
            return True
        if len(self.values) < self.capacity:
            self.values.append(offer.value)
            offer.choice.win(offer, None)
            self._emit("write", value=offer.value)
            return True
        return False

    @staticmethod
    def _take(queue: deque[Offer], offer: Offer) -> None:
        try:
            queue.remove(offer)
        except ValueError:
            pass

    def give_back(self, choice: Choice) -> None:
        """A reader was cancelled after its read committed: the value goes back, first in line."""
        fut = choice.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            offer, value = fut.result()
            if offer.kind == "read":
                self.values.appendleft(value)
                self._emit("give-back", value=value)
                reader = self._next_live(self.readers, choice)
                if reader is not None:
                    self._take(self.readers, reader)
                    self._read(reader)

    def withdraw(self, offer: Offer) -> None:
        """Remove a waiting offer whose choice is closed (cheap: also done lazily)."""
        queue = self.readers if offer.kind == "read" else self.writers
        if queue and queue[-1] is offer:
            queue.pop()

    # -- ending ------------------------------------------------------------------------------

    def poison(self) -> None:
        if self.poisoned:
            return
        self.poisoned = True
        self.values.clear()
        self._emit("poison")
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for queue in (self.readers, self.writers):
            waiting = [o for o in queue if o.choice.open]
            queue.clear()
            for offer in waiting:
                ended = self.ended(offer.kind)
                if ended is None:
                    queue.append(offer)  # still possible (a read of buffered values)
                else:
                    offer.choice.fail(ended)

    def _emit(self, event: str, **fields: Any) -> None:
        for observe in self.observers:
            observe(event, {"channel": self.name, **fields})


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


class ChannelEnd:
    """A reader or writer end of a channel: what processes are given."""

    kind: Kind

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._home = channel._home
        self._link = channel._link
        self._active = True
        if self._link is not None:
            self._link.join(channel.name, self.kind, channel._buffer)
        else:
            self._home.join(self.kind)

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
            return await self._link.call("csp.op", self.channel.name, self.kind, value)
        choice = Choice(self._home.loop)
        offer = Offer(choice, self._home, self.kind, value)
        choice.offers.append(offer)
        if not self._home.offer(offer):
            try:
                await choice.future
            except asyncio.CancelledError:
                if not choice.future.done() or choice.future.cancelled():
                    choice.close()
                else:
                    self._home.give_back(choice)
                raise
        _, result = choice.future.result()
        return result

    async def poison(self) -> None:
        """Poison the channel (the same as ``await csp.poison(end)``)."""
        if self._link is not None:
            await self._link.call("csp.poison", self.channel.name)
        else:
            self._home.poison()

    async def retire(self) -> None:
        """Leave the channel for good; the last end of a kind to leave retires that side."""
        if self._active:
            self._active = False
            if self._link is not None:
                await self._link.call("csp.retire", self.channel.name, self.kind)
            else:
                self._home.leave(self.kind)

    def disconnect(self) -> None:
        """Leave without retiring or poisoning (PyCSP's ``Channel.Disconnect()``)."""
        if self._active:
            self._active = False
            if self._link is not None:
                self._link.leave(self.channel.name, self.kind)
            else:
                self._home.disconnect(self.kind)

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
    give to processes. The channel belongs to the event loop it is made in
    (a plain process in a thread reaches it through that loop).
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
        self.name = name if name is not None else f"channel-{next(_names)}"
        self._buffer = buffer
        self._link: RemoteLink | None = None
        if connect is not None:
            if name is None:
                raise ValueError("a networked channel needs a name: Channel('B', connect=(host, port))")
            _current_loop()
            self._link = link_for(connect, **options)
            self._home: Home = _REMOTE
        else:
            self._home = Home(self.name, buffer, _current_loop())
        self._ends = {"read": 0, "write": 0}
        self._lock = threading.Lock()

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

    def reader(self) -> ReaderEnd:
        """A new reader end (it joins the channel's readers)."""
        self._new_end("read")
        return ReaderEnd(self)

    def writer(self) -> WriterEnd:
        """A new writer end (it joins the channel's writers)."""
        self._new_end("write")
        return WriterEnd(self)

    async def poison(self) -> None:
        """Poison the channel."""
        if self._link is not None:
            await self._link.call("csp.poison", self.name)
        else:
            self._home.poison()

    def disconnect(self) -> None:
        """Nothing to release for a local channel; ends of a networked one leave it one by one."""

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
