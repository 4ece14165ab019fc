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
import random
import weakref
from typing import Any

from . import _trace
from ._channel import ChannelEnd, ReaderEnd, WriterEnd
from ._home import Choice, Home, Offer, Packed
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
    links: set[RemoteLink | None] = set()
    for g in guards:
        if not isinstance(g, Guard):
            raise TypeError(f"not a guard: {g!r}")
        if g.end is not None:
            g.end._check()
            links.add(g.end._link)
    if len(links) > 1:
        raise ValueError(
            "the channel guards of one alternation must all be local channels or all channels of one "
            "channel server (serve the local channels from that server, or split the alternation)"
        )
    link = links.pop() if links else None
    if link is not None:
        guard, msg = await _select_remote(link, guards, order)
    else:
        guard, msg = await _select_local(guards, order)
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


async def _select_remote(link: RemoteLink, guards: tuple[Guard, ...], order: list[int]) -> tuple[Guard, Any]:
    """An alternation over channels of one server: the server commits it atomically."""
    chosen = [i for i in order if isinstance(guards[i], InputGuard | OutputGuard)]
    offers = []
    for i in chosen:
        g = guards[i]
        assert g.end is not None
        kind = g.end.kind
        offers.append((g.end.channel.name, kind, g.msg if isinstance(g, OutputGuard) else None))
    skip = next((g for g in guards if isinstance(g, SkipGuard)), None)
    timeout = _timeout(guards)
    index, msg = await link.alt(offers, skip is not None, timeout.seconds if timeout is not None else None)
    if index >= 0:
        return guards[chosen[index]], msg
    if index == -1 and skip is not None:
        return skip, None
    assert timeout is not None
    return timeout, None


async def _select_local(guards: tuple[Guard, ...], order: list[int]) -> tuple[Guard, Any]:
    loop = asyncio.get_running_loop()
    choice = Choice(loop)
    # Offer the guards in priority order: the first one that can complete at once wins.
    for i in order:
        g = guards[i]
        if isinstance(g, InputGuard):
            offer = Offer(choice, g.end._home, "read", tag=g)
        elif isinstance(g, OutputGuard):
            offer = Offer(choice, g.end._home, "write", g.end._home.pack(g.msg), tag=g)
        else:
            continue
        choice.offers.append(offer)
        offer.home.offer(offer)
        if not choice.open:
            break
    if choice.open:
        skip = next((g for g in guards if isinstance(g, SkipGuard)), None)
        if skip is not None:
            choice.close()
            return skip, None
    timer = None
    if choice.open:
        timeout = _timeout(guards)
        if timeout is not None:
            timeout_offer = Offer(choice, _NO_HOME, "read", tag=timeout)
            timer = loop.call_later(timeout.seconds, _expire, choice, timeout_offer)
    try:
        offer, value = await choice.future
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
    if offer.kind == "read" and offer.home is not _NO_HOME:
        offer.home.claimed()
        if type(value) is Packed:
            value = offer.home.codec.decode(value.data)
    return offer.tag, value


def _expire(choice: Choice, offer: Offer) -> None:
    if choice.open:
        choice.win(offer, None)


class _NoHome(Home):
    """Stands for the home of a timeout: it holds nothing."""

    def withdraw(self, offer: Offer) -> None:
        return None


_NO_HOME: Home = _NoHome.__new__(_NoHome)


async def PriSelect(*guards: Guard) -> tuple[Guard, Any]:
    """Commit one guard, preferring the first ready one in argument order; return ``(guard, msg)``.

    ``msg`` is the value read (InputGuard) or None. A SkipGuard is taken when
    no other guard is ready at once; a TimeoutGuard when nothing became
    ready in time. Raises ChannelPoisoned / ChannelRetired if a guard's
    channel is poisoned or retired.
    """
    return await _select(guards, list(range(len(guards))))


async def AltSelect(*guards: Guard) -> tuple[Guard, Any]:
    """Commit one guard, choosing at random among those ready at once; return ``(guard, msg)``."""
    order = list(range(len(guards)))
    random.shuffle(order)
    return await _select(guards, order)


async def FairSelect(*guards: Guard) -> tuple[Guard, Any]:
    """Commit one guard, preferring the channel chosen least often so far; return ``(guard, msg)``."""

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
