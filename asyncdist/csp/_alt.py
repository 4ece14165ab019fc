"""Alternation: commit exactly one of several guards (``AltSelect``, ``FairSelect``, ``PriSelect``).

All the offers of one alternation share one :class:`~._channel.Choice`; a
channel's home commits a guard only while that choice is open, and closing
it withdraws every other offer, so an alternation never takes two values
and never loses one, however many alternations compete for the same
channels.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import weakref
from typing import Any

from . import _trace
from ._channel import ChannelEnd, ReaderEnd, WriterEnd, now_or_awaitable
from ._home import Choice, Home, Offer, Packed, watch
from ._net import RemoteLink

__all__ = [
    "AltSelect",
    "FairSelect",
    "Guard",
    "InputGuard",
    "OutputGuard",
    "PriSelect",
    "SkipGuard",
    "TimeoutGuard",
]


class Guard:
    """One alternative of an alternation."""

    end: ChannelEnd | None = None


class InputGuard(Guard):
    """Ready when ``cin`` can be read; the alternation returns ``(guard, value)``."""

    def __init__(self, cin: ReaderEnd) -> None:
        if not isinstance(cin, ReaderEnd):
            raise TypeError("InputGuard needs a reader end")
        self.end: ChannelEnd = cin

    def __repr__(self) -> str:
        return f"InputGuard({self.end!r})"


class OutputGuard(Guard):
    """Ready when ``msg`` can be written to ``cout``; the alternation returns ``(guard, None)``."""

    def __init__(self, cout: WriterEnd, msg: Any) -> None:
        if not isinstance(cout, WriterEnd):
            raise TypeError("OutputGuard needs a writer end")
        self.end: ChannelEnd = cout
        self.msg = msg

    def __repr__(self) -> str:
        return f"OutputGuard({self.end!r}, msg={self.msg!r})"


class TimeoutGuard(Guard):
    """Ready once ``seconds`` have passed since the alternation started."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"TimeoutGuard(seconds={self.seconds:g})"


class SkipGuard(Guard):
    """Always ready, with the lowest priority: taken when nothing else is ready now."""

    def __repr__(self) -> str:
        return "SkipGuard()"


# How often each channel was chosen by FairSelect: the least chosen ready one wins.
_chosen: weakref.WeakKeyDictionary[Home | RemoteLink, collections.Counter[str]] = weakref.WeakKeyDictionary()


def _fair_key(guard: Guard) -> tuple[Home | RemoteLink, str] | None:
    end = guard.end
    if end is None:
        return None
    return (end._link if end._link is not None else end._home), end.channel.name


async def _select(guards: tuple[Guard, ...], order: list[int]) -> tuple[Guard, Any]:
    if not guards:
        raise ValueError("an alternation needs at least one guard")
    groups: dict[RemoteLink | None, list[int]] = {}
    for i in order:
        g = guards[i]
        if not isinstance(g, Guard):
            raise TypeError(f"not a guard: {g!r}")
        if g.end is not None:
            g.end._check()
            groups.setdefault(g.end._link, []).append(i)
    skip = next((g for g in guards if isinstance(g, SkipGuard)), None)
    timeout = _timeout(guards)
    if len(groups) <= 1:
        owner, chosen = next(iter(groups.items()), (None, []))
        seconds = timeout.seconds if timeout is not None else None
        outcome = await _commit(owner, guards, chosen, skip=skip is not None, timeout=seconds)
    else:
        outcome = await _select_spanning(groups, guards, skip is not None, timeout)
    if outcome is not None:
        guard, msg = outcome
    else:  # nothing committed: with a skip guard nothing waits, else the timeout passed
        fallback = skip if skip is not None else timeout
        assert fallback is not None
        guard, msg = fallback, None
    if _trace.tracer is not None:
        _trace.event(
            "select",
            guard=type(guard).__name__,
            channel=guard.end.channel.name if guard.end is not None else None,
            value=msg,
        )
    return guard, msg


def _timeout(guards: tuple[Guard, ...]) -> TimeoutGuard | None:
    timeouts = [g for g in guards if isinstance(g, TimeoutGuard)]
    return min(timeouts, key=lambda g: g.seconds) if timeouts else None


async def _commit(
    owner: RemoteLink | None,
    guards: tuple[Guard, ...],
    chosen: list[int],
    *,
    skip: bool,
    timeout: float | None,
    stop: asyncio.Future[Any] | None = None,
) -> tuple[Guard, Any] | None:
    """Commit one of the channel guards ``chosen`` (indices, by priority), all homed by ``owner``
    (this loop, or one server): ``(guard, msg)``, or None when ``skip`` found nothing ready, or
    ``timeout`` passed, or ``stop`` was set first."""
    if owner is not None:
        return await _commit_remote(owner, guards, chosen, skip, timeout, stop)
    return await _commit_local(guards, chosen, skip, timeout, stop)


async def _commit_remote(
    link: RemoteLink,
    guards: tuple[Guard, ...],
    chosen: list[int],
    skip: bool,
    timeout: float | None,
    stop: asyncio.Future[Any] | None,
) -> tuple[Guard, Any] | None:
    """Over channels of one server: the server commits it atomically."""
    offers = []
    for i in chosen:
        g = guards[i]
        assert g.end is not None
        offers.append((g.end.channel.name, g.end.kind, g.msg if isinstance(g, OutputGuard) else None))
    index, msg = await link.alt(offers, skip, timeout, stop)
    return (guards[chosen[index]], msg) if index >= 0 else None


async def _commit_local(
    guards: tuple[Guard, ...],
    chosen: list[int],
    skip: bool,
    timeout: float | None,
    stop: asyncio.Future[Any] | None,
) -> tuple[Guard, Any] | None:
    """Over channels of this loop: one choice, an offer per guard, committed by their homes."""
    loop = asyncio.get_running_loop()
    choice = Choice(loop)
    # Offer the guards in priority order: the first one that can complete at once wins.
    for i in chosen:
        g = guards[i]
        assert g.end is not None
        home = g.end._home
        if isinstance(g, OutputGuard):
            offer = Offer(choice, home, "write", home.pack(g.msg), tag=g)
        else:
            offer = Offer(choice, home, "read", tag=g)
        choice.offers.append(offer)
        home.offer(offer)
        if not choice.open:
            break
    if choice.open and skip:
        choice.close()
        return None
    timer = None
    if choice.open and timeout is not None:
        timer = loop.call_later(timeout, _expire, choice, Offer(choice, _NO_HOME, "read", tag=None))
    try:
        if stop is None or choice.future.done():
            await choice.future
        else:
            await asyncio.wait((choice.future, stop), return_when=asyncio.FIRST_COMPLETED)
            if choice.open:
                choice.close()
                return None
    except asyncio.CancelledError:
        if not choice.future.done() or choice.future.cancelled():
            choice.close()
        elif choice.future.exception() is None:
            won, _ = choice.future.result()
            if won.home is not _NO_HOME:
                won.home.give_back(choice)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    offer, value = choice.future.result()
    if offer.home is _NO_HOME:
        return None
    if offer.kind == "read":
        offer.home.claimed()
        if type(value) is Packed:
            value = offer.home.codec.decode(value.data)
    return offer.tag, value


async def _select_spanning(
    groups: dict[RemoteLink | None, list[int]],
    guards: tuple[Guard, ...],
    skip: bool,
    timeout: TimeoutGuard | None,
) -> tuple[Guard, Any] | None:
    """An alternation over channels of several homes (this loop and servers, or several servers).

    Each home commits atomically only its own channels, so the alternation
    never has offers at two of them at once: it tries every group without
    waiting (in priority order), then waits with offers at one group chosen
    at random while watching the others; when a watched channel becomes
    ready it takes its offers back (or keeps what committed meanwhile) and
    tries again. Exactly one guard commits; random choice of the waiting
    group breaks the symmetry of alternations that wait for each other.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout.seconds if timeout is not None else None
    owners = list(groups)
    while True:
        for owner in owners:  # in priority order: groups are keyed by their best guard
            outcome = await _commit(owner, guards, groups[owner], skip=True, timeout=None)
            if outcome is not None:
                return outcome
        if skip:
            return None
        remaining = deadline - loop.time() if deadline is not None else None
        if remaining is not None and remaining <= 0:
            return None
        waiting = random.choice(owners)
        stop: asyncio.Future[None] = loop.create_future()
        watchers = [
            asyncio.ensure_future(_watch(owner, guards, groups[owner]))
            for owner in owners
            if owner is not waiting
        ]
        for w in watchers:
            w.add_done_callback(functools.partial(_wake, stop))
        try:
            outcome = await _commit(
                waiting, guards, groups[waiting], skip=False, timeout=remaining, stop=stop
            )
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        if outcome is not None:
            return outcome
        if not stop.done() and deadline is not None and loop.time() >= deadline:
            return None


def _wake(stop: asyncio.Future[None], _: Any) -> None:
    if not stop.done():
        stop.set_result(None)


async def _watch(owner: RemoteLink | None, guards: tuple[Guard, ...], chosen: list[int]) -> None:
    pairs = []
    for i in chosen:
        end = guards[i].end
        assert end is not None
        pairs.append((end, end.kind))
    if owner is not None:
        await owner.watch([(end.channel.name, kind) for end, kind in pairs])
        return
    fut = watch([(end._home, kind) for end, kind in pairs])
    if fut is not None:
        try:
            await fut
        finally:
            fut.cancel()


def _expire(choice: Choice, offer: Offer) -> None:
    if choice.open:
        choice.win(offer, None)


class _NoHome(Home):
    """Stands for the home of a timeout: it holds nothing."""

    def withdraw(self, offer: Offer) -> None:
        return None


_NO_HOME: Home = _NoHome.__new__(_NoHome)


def PriSelect(*guards: Guard) -> Any:
    """Commit one guard, preferring the first ready one in argument order; return ``(guard, msg)``.

    ``msg`` is the value read (InputGuard) or None. A SkipGuard is taken when
    no other guard is ready at once; a TimeoutGuard when nothing became
    ready in time. Raises ChannelPoisoned / ChannelRetired if a guard's
    channel is poisoned or retired.

    ``await csp.PriSelect(...)`` in a coroutine; a plain process (in a thread)
    calls ``csp.PriSelect(...)`` and blocks. The same holds for
    :func:`AltSelect` and :func:`FairSelect`.
    """
    return now_or_awaitable(_select(guards, list(range(len(guards)))), _loops(guards), "PriSelect")


def AltSelect(*guards: Guard) -> Any:
    """Commit one guard, choosing at random among those ready at once; return ``(guard, msg)``."""
    order = list(range(len(guards)))
    random.shuffle(order)
    return now_or_awaitable(_select(guards, order), _loops(guards), "AltSelect")


def FairSelect(*guards: Guard) -> Any:
    """Commit one guard, preferring the channel chosen least often so far; return ``(guard, msg)``."""
    return now_or_awaitable(_fair(guards), _loops(guards), "FairSelect")


def _loops(guards: tuple[Guard, ...]) -> set[asyncio.AbstractEventLoop]:
    return {g.end._loop for g in guards if isinstance(g, Guard) and g.end is not None}


async def _fair(guards: tuple[Guard, ...]) -> tuple[Guard, Any]:
    def used(i: int) -> int:
        key = _fair_key(guards[i])
        if key is None:
            return 0
        counts = _chosen.get(key[0])
        return counts[key[1]] if counts is not None else 0

    order = sorted(range(len(guards)), key=used)
    guard, msg = await _select(guards, order)
    key = _fair_key(guard)
    if key is not None:
        _chosen.setdefault(key[0], collections.Counter())[key[1]] += 1
    return guard, msg
