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
import itertools
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Literal

from ..errors import ChannelEnded, ChannelPoisoned, ChannelRetired

__all__ = ["NOT_NOW", "Choice", "Home", "Kind", "Offer", "Packed", "local_homes", "watch"]

Kind = Literal["read", "write"]
#: The channels made on each event loop, by name, so that the loop's channel server can host them.
_local: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakValueDictionary[str, Home]] = (
    weakref.WeakKeyDictionary()
)


def local_homes(loop: asyncio.AbstractEventLoop) -> weakref.WeakValueDictionary[str, Home]:
    """The named channels made on ``loop`` (weakly held)."""
    homes = _local.get(loop)
    if homes is None:
        homes = _local[loop] = weakref.WeakValueDictionary()
    return homes


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


_NO_CHOICE: Final = Choice.__new__(Choice)
#: What :meth:`Home.now` returns when the operation must wait.
NOT_NOW: Final = object()  # excludes nothing in Home._next_live


class Packed:
    """A value as a remote writer encoded it: decoded by the reader that takes it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


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
        #: Values handed to readers that did not take them yet (one may still be given back).
        self.unclaimed = 0
        #: Buffer slots promised to remote writers (credits): ``len(values) + reserved <= capacity``.
        self.reserved = 0
        #: Called with this home when it is poisoned or its readers retired (credits become void).
        self.listeners: list[Callable[[Home], None]] = []
        #: Called (once) when a buffer slot frees up (channel servers top their clients' credits up).
        self.room_waiters: list[Callable[[], None]] = []
        #: Called (once) at the next change of state: alternations spanning several homes watch them.
        self.watchers: list[Callable[[], None]] = []
        #: Decodes values that remote writers sent (set when a channel server hosts this home).
        self.codec: Any = None

    def serve(self, codec: Any) -> None:
        """This channel is now served to other processes: values written from now on are encoded
        with ``codec``; waiting writes whose value cannot travel fail (their value stays theirs),
        buffered values that can are encoded now."""
        self.codec = codec
        for offer in list(self.writers):
            if offer.choice.open and type(offer.value) is not Packed:
                try:
                    offer.value = Packed(codec.encode(offer.value))
                except Exception as exc:
                    self.writers.remove(offer)
                    offer.choice.fail(exc)
        packed: deque[Any] = deque()
        for value in self.values:
            try:
                packed.append(value if type(value) is Packed else Packed(codec.encode(value)))
            except Exception:
                packed.append(value)  # written before: a remote reader that takes it gets the error
        self.values = packed

    def pack(self, value: Any) -> Any:
        """A value written here: as is, or encoded once this channel is served to other processes
        (so that a value that cannot travel fails its write, not the remote reader that took it)."""
        if self.codec is None:
            return value
        return Packed(self.codec.encode(value))

    # -- membership ------------------------------------------------------------------------

    def join(self, kind: Kind) -> None:
        self.joined[kind] += 1

    def leave(self, kind: Kind) -> None:
        """An end retired: when the last of its kind leaves, the other side sees retirement."""
        self.joined[kind] -= 1
        if self.joined[kind] <= 0 and not self.retired[kind]:
            self.retired[kind] = True
            self._fail_waiting()
            if kind == "read":
                self._ended()
            elif self.watchers:
                self.changed()

    def disconnect(self, kind: Kind) -> None:
        """An end leaves without retiring the channel (it may join again)."""
        self.joined[kind] = max(0, self.joined[kind] - 1)

    # -- state checks ------------------------------------------------------------------------

    def ended(self, kind: Kind) -> ChannelEnded | None:
        """Why an offer of ``kind`` can never complete now, or None."""
        if self.poisoned:
            return ChannelPoisoned(f"channel {self.name!r} is poisoned")
        if (
            kind == "read"
            and self.retired["write"]
            and not self.values
            and not self.unclaimed
            and not self._live(self.writers)
        ):
            return ChannelRetired(f"every writer of channel {self.name!r} retired")
        if kind == "write" and self.retired["read"]:
            return ChannelRetired(f"every reader of channel {self.name!r} retired")
        return None

    @staticmethod
    def _live(queue: deque[Offer]) -> bool:
        return any(o.choice.open for o in queue)

    def _room(self) -> bool:
        return len(self.values) + self.reserved < self.capacity

    def free(self) -> int:
        """Buffer slots neither filled nor promised."""
        return max(0, self.capacity - len(self.values) - self.reserved)

    def ready(self, kind: Kind) -> bool:
        """Whether an offer of ``kind`` would complete at once."""
        if kind == "read":
            return bool(self.values) or self._live(self.writers)
        return self._room() or self._live(self.readers)

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
        if self.watchers:
            self.changed()
        return done

    def changed(self) -> None:
        """Tell the watchers that something changed (they look again)."""
        watchers, self.watchers = self.watchers, []
        for w in watchers:
            w()

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

    def now(self, kind: Kind, value: Any = None) -> Any:
        """Do a plain read or write at once if it can complete now, without making a choice.

        Returns the value read (None for a write), or :data:`NOT_NOW` if the
        operation must wait (then offer it with :meth:`offer`); raises the
        channel's end (poison, retirement).
        """
        ended = self.ended(kind)
        if ended is not None:
            raise ended
        if kind == "read":
            if self.values:
                result = self.values.popleft()
                if self.writers and self._room():
                    self._refill_one()
                elif self.room_waiters:
                    self._room_freed()
            else:
                writer = self._next_live(self.writers, _NO_CHOICE) if self.writers else None
                if writer is None:
                    return NOT_NOW
                self._take(self.writers, writer)
                writer.choice.win(writer, None)
                result = writer.value
        else:
            reader = self._next_live(self.readers, _NO_CHOICE) if self.readers and not self.values else None
            if reader is not None:
                self._take(self.readers, reader)
                self._hand(reader, value)
            elif self._room():
                self.values.append(value)
            else:
                return NOT_NOW
            result = None
        if self.watchers:
            self.changed()
        return result

    def _refill_one(self) -> None:
        """A slot freed: the first waiting writer's value moves in (or whoever waits for room hears)."""
        writer = self._next_live(self.writers, _NO_CHOICE)
        if writer is not None:
            self._take(self.writers, writer)
            self.values.append(writer.value)
            writer.choice.win(writer, None)
        elif self.room_waiters:
            self._room_freed()

    def _room_freed(self) -> None:
        waiters, self.room_waiters = self.room_waiters, []
        for w in waiters:
            w()

    def _read(self, offer: Offer) -> bool:
        if self.values:
            value = self.values.popleft()
            writer = self._next_live(self.writers, offer.choice) if self._room() else None
            if writer is not None:  # room again: the first waiting writer's value moves in
                self._take(self.writers, writer)
                self.values.append(writer.value)
                writer.choice.win(writer, None)
            elif self.room_waiters:
                self._room_freed()
            self._hand(offer, value)
            return True
        writer = self._next_live(self.writers, offer.choice)
        if writer is None:
            return False
        self._take(self.writers, writer)
        writer.choice.win(writer, None)
        self._hand(offer, writer.value)
        return True

    def _write(self, offer: Offer) -> bool:
        reader = self._next_live(self.readers, offer.choice)
        if reader is not None and not self.values:
            self._take(self.readers, reader)
            self._hand(reader, offer.value)
            offer.choice.win(offer, None)
            return True
        if self._room():
            self.values.append(offer.value)
            offer.choice.win(offer, None)
            return True
        return False

    def put(self, value: Any, *, promised: bool = True) -> None:
        """A remote writer's value for a slot it was promised (a credit): it never waits.

        ``promised=False``: a value sent with a slot that was taken back meanwhile; it is kept,
        beyond the buffer's size if need be.
        """
        if promised:
            self.reserved = max(0, self.reserved - 1)
        if self.poisoned or self.retired["read"]:
            return  # the channel ended while the value travelled: as if written just before
        if not self.values:
            reader = self._next_live(self.readers, _NO_CHOICE)
            if reader is not None:
                self._take(self.readers, reader)
                self._hand(reader, value)
                return
        self.values.append(value)
        if self.watchers:
            self.changed()

    def release(self, n: int) -> None:
        """``n`` promised slots are given back: waiting writers may move in."""
        self.reserved = max(0, self.reserved - n)
        while self._room():
            writer = self._next_live(self.writers, _NO_CHOICE)
            if writer is None:
                break
            self._take(self.writers, writer)
            if not self._write(writer):  # pragma: no cover - there is room
                self.writers.appendleft(writer)
                break
        if self.watchers:
            self.changed()

    @staticmethod
    def _take(queue: deque[Offer], offer: Offer) -> None:
        try:
            queue.remove(offer)
        except ValueError:
            pass

    def _hand(self, reader: Offer, value: Any) -> None:
        """Commit a read: the value is in the reader's hands, not yet claimed (see :meth:`claimed`)."""
        self.unclaimed += 1
        reader.choice.win(reader, value)

    def claimed(self) -> None:
        """A reader took the value it was handed (it was not cancelled in that instant)."""
        self.unclaimed -= 1
        if not self.unclaimed and self.retired["write"] and self.readers:
            self._fail_waiting()  # the last value in hand was kept: waiting readers see the end now

    def give_back(self, choice: Choice) -> None:
        """A reader was cancelled after its read committed: the value goes back, first in line."""
        fut = choice.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            offer, value = fut.result()
            if offer.kind == "read":
                self.unclaimed -= 1
                self.give_back_value(value)

    def give_back_value(self, value: Any) -> None:
        """Put a value a cancelled reader was given back first in line (beyond capacity if need be)."""
        if self.poisoned:
            return
        self.values.appendleft(value)
        reader = self._next_live(self.readers, _NO_CHOICE)
        if reader is not None:
            self._take(self.readers, reader)
            self._read(reader)
        if self.watchers:
            self.changed()

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
        self._fail_waiting()
        self._ended()

    def _ended(self) -> None:
        if self.watchers:
            self.changed()
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener(self)

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


def watch(guards: list[tuple[Home, Kind]]) -> asyncio.Future[None] | None:
    """None if one of these (home, kind) operations could complete, or fail, now; else a future
    set when one can (cancel it to stop watching)."""

    def now() -> bool:
        return any(home.ready(kind) or home.ended(kind) is not None for home, kind in guards)

    if now():
        return None
    fut: asyncio.Future[None] = guards[0][0].loop.create_future()

    def look() -> None:
        if fut.done():
            return
        if now():
            fut.set_result(None)
        else:
            for home, _ in guards:
                if look not in home.watchers:
                    home.watchers.append(look)

    def stop(_: Any) -> None:
        for home, _kind in guards:
            if look in home.watchers:
                home.watchers.remove(look)

    for home, _ in guards:
        if look not in home.watchers:
            home.watchers.append(look)
    fut.add_done_callback(stop)
    return fut
