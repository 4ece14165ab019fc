"""Alternation from plain-function processes (threads) and from the blocking facade.

PyCSP programs write their processes as plain functions that call
``AltSelect(InputGuard(cin), ...)`` and block. ``csp.AltSelect``,
``PriSelect`` and ``FairSelect`` do that when called away from their
channels' event loop (a plain process's thread, a script's main thread, a
notebook whose own loop runs in the calling thread) and return an awaitable
on it, as ``cin()`` and ``cout(x)`` do. ``asyncdist.sync`` re-exports them
with the guards. (Cancelling a plain process blocked in a select: test_csp.py,
with the one blocked in a read.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _util import SCALE

from asyncdist import csp, sync
from asyncdist.errors import ChannelPoisoned

#: The bound of one wait (scaled).
BOUND = 10 * SCALE

SELECTS: list[Callable[..., Any]] = [csp.AltSelect, csp.FairSelect, csp.PriSelect]
IDS = ["AltSelect", "FairSelect", "PriSelect"]

pytestmark = pytest.mark.timeout(int(60 * SCALE))


@pytest.fixture(autouse=True)
def _stop_the_sync_loop(leak_check: None) -> Iterator[None]:
    """After each test (before the leak check): stop the sync loop thread and its channels."""
    yield
    sync.shutdown()


async def flag_set(flag: threading.Event) -> bool:
    """Wait for a thread's flag without a sleep loop on this test's side of the wait."""
    return await asyncio.to_thread(flag.wait, BOUND)


@pytest.mark.parametrize("select", SELECTS, ids=IDS)
async def test_a_plain_process_alternates_between_two_writers(select: Callable[..., Any]) -> None:
    a, b = csp.Channel(), csp.Channel()

    @csp.process
    async def writer(cout: csp.WriterEnd, values: range) -> None:
        for v in values:
            await cout(v)

    @csp.process
    def merge(ina: csp.ReaderEnd, inb: csp.ReaderEnd, n: int) -> list[tuple[str, int]]:
        got = []
        for _ in range(n):
            guard, msg = select(csp.InputGuard(ina), csp.InputGuard(inb))  # blocks: no await
            got.append(("a" if guard.end is ina else "b", msg))
        return got

    async with asyncio.timeout(BOUND):
        *_, got = await csp.Parallel(
            writer(a.writer(), range(50)),
            writer(b.writer(), range(100, 150)),
            merge(a.reader(), b.reader(), 100),
        )
    assert sorted(v for k, v in got if k == "a") == list(range(50))
    assert sorted(v for k, v in got if k == "b") == list(range(100, 150))
    # Each channel's values arrive in the order written.
    assert [v for k, v in got if k == "a"] == list(range(50))


async def test_skip_timeout_and_output_guards_from_a_plain_process() -> None:
    idle, out = csp.Channel(), csp.Channel()

    @csp.process
    def chooser(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> list[Any]:
        skip = csp.SkipGuard()
        first = csp.PriSelect(csp.InputGuard(cin), skip)  # nothing to read: the skip guard
        timeout = csp.TimeoutGuard(seconds=0.05)
        start = time.monotonic()
        second = csp.AltSelect(csp.InputGuard(cin), timeout)
        waited = time.monotonic() - start
        sent = csp.OutputGuard(cout, msg="hello")
        third = csp.AltSelect(sent, csp.TimeoutGuard(seconds=BOUND))
        return [first == (skip, None), second == (timeout, None), waited >= 0.05, third == (sent, None)]

    @csp.process
    async def reader(cin: csp.ReaderEnd) -> Any:
        return await cin()

    async with asyncio.timeout(BOUND):
        checks, value = await csp.Parallel(chooser(idle.reader(), out.writer()), reader(out.reader()))
    assert checks == [True, True, True, True]
    assert value == "hello"


async def test_a_select_of_only_timeout_guards_in_a_thread_runs_on_its_own() -> None:
    timeout = csp.TimeoutGuard(seconds=0.02)

    def in_thread() -> Any:
        return csp.AltSelect(timeout), csp.PriSelect(csp.SkipGuard(), timeout)[0]

    (chosen, msg), skipped = await asyncio.to_thread(in_thread)
    assert (chosen, msg) == (timeout, None)
    assert isinstance(skipped, csp.SkipGuard)
    # On a loop it stays an awaitable, as before.
    assert await csp.AltSelect(timeout) == (timeout, None)


async def test_poison_reaches_a_plain_process_blocked_in_a_select() -> None:
    a, b = csp.Channel(), csp.Channel()
    waiting = threading.Event()
    seen: list[type[BaseException]] = []

    @csp.process
    def watcher(ina: csp.ReaderEnd, inb: csp.ReaderEnd) -> None:
        waiting.set()
        try:
            csp.AltSelect(csp.InputGuard(ina), csp.InputGuard(inb))
        except BaseException as e:
            seen.append(type(e))
            raise

    task = asyncio.ensure_future(csp.Parallel(watcher(a.reader(), b.reader())))
    try:
        assert await flag_set(waiting)
        await csp.poison(a)
        async with asyncio.timeout(BOUND):
            assert await task == [None]  # a process ended by poison ends quietly
        assert seen == [ChannelPoisoned]
        with pytest.raises(ChannelPoisoned):
            await b.writer()(1)  # the process's end poisoned its other channel too
    finally:
        await csp.poison(a, b)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_guards_of_channels_of_two_loops_are_refused_from_a_thread() -> None:
    here = csp.Channel()
    there = sync.Channel()

    def in_thread() -> None:
        csp.AltSelect(csp.InputGuard(here.reader()), csp.InputGuard(there.reader()))

    with pytest.raises(ValueError, match="one event loop"):
        await asyncio.to_thread(in_thread)


# -- the blocking facade ------------------------------------------------------------------------


def test_sync_exports_the_alternation() -> None:
    for name in ("AltSelect", "PriSelect", "FairSelect", "InputGuard", "OutputGuard", "SkipGuard",
                 "TimeoutGuard", "ChannelPoisoned", "ChannelRetired"):  # fmt: skip
        assert name in sync.__all__
        assert getattr(sync, name) is getattr(csp, name)


def test_sync_parallel_runs_plain_processes_that_alternate() -> None:
    """The PyCSP style end to end: plain functions only, no asyncio in sight."""
    a, b, results = sync.Channel(), sync.Channel(), sync.Channel()

    @sync.process
    def producer(cout: csp.WriterEnd, values: list[int]) -> None:
        for v in values:
            cout(v)

    @sync.process
    def merger(ina: csp.ReaderEnd, inb: csp.ReaderEnd, cout: csp.WriterEnd) -> None:
        done = 0
        while done < 20:
            _, msg = sync.AltSelect(sync.InputGuard(ina), sync.InputGuard(inb))
            cout(msg)
            done += 1
        sync.poison(cout)

    @sync.process
    def collector(cin: csp.ReaderEnd) -> list[int]:
        got = []
        try:
            while True:
                got.append(cin())
        except sync.ChannelPoisoned:
            return got

    out = sync.Parallel(
        producer(a.writer(), list(range(10))),
        producer(b.writer(), list(range(10, 20))),
        merger(a.reader(), b.reader(), results.writer()),
        collector(results.reader()),
    )
    assert sorted(out[3]) == list(range(20))


def test_sync_select_from_the_main_thread_of_a_script() -> None:
    ch = sync.Channel()

    @sync.process
    def send(cout: csp.WriterEnd) -> None:
        cout("ready")

    pending = sync.Spawn(send(ch.writer()))
    guard = sync.InputGuard(ch.reader())
    assert sync.AltSelect(guard, sync.TimeoutGuard(seconds=BOUND)) == (guard, "ready")
    assert pending.result(timeout=BOUND) == [None]


async def test_sync_select_where_another_loop_runs_blocks_like_a_notebook() -> None:
    """In Jupyter the calling thread runs a loop of its own: the select still blocks and
    returns the result (before, it returned a coroutine bound to the wrong loop)."""
    ch = sync.Channel(buffer=1)
    ch.writer()("from the sync loop")
    guard = sync.InputGuard(ch.reader())
    assert sync.PriSelect(guard) == (guard, "from the sync loop")
    sync.poison(ch.writer())  # blocks too, on the channel's loop
    with pytest.raises(ChannelPoisoned):
        ch.reader()()
