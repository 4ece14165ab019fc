"""Alternations whose channels live in several homes: this loop's channels and channel servers.

Each server here runs on an event loop of its own, in a thread (a real socket
on 127.0.0.1), so the channels joined with ``Channel(name, connect=...)`` are
real networked channels. A home commits only its own channels atomically; an
alternation spanning homes must still commit exactly one guard, lose no value
and take none twice, also against other spanning alternations and under
cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _util import SCALE

from asyncdist import csp
from asyncdist.errors import ChannelPoisoned, ChannelRetired
from asyncdist.loop import new_event_loop

pytestmark = pytest.mark.timeout(60)

BOUND = 20 * SCALE
SELECTS = (csp.AltSelect, csp.PriSelect, csp.FairSelect)


class ServerThread:
    """A ChannelServer on its own event loop in a thread; stopped and joined by ``close()``."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, name="csp-server-thread", daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the channel server thread did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.server = await csp.ChannelServer.start("127.0.0.1", 0)
            self.port = self.server.port
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.aclose())
        self.loop.close()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def servers() -> Iterator[list[ServerThread]]:
    started = [ServerThread(), ServerThread()]
    try:
        yield started
    finally:
        for s in started:
            s.close()


async def _write_all(end: csp.WriterEnd, values: list[int]) -> None:
    for v in values:
        await end(v)
    await csp.retire(end)


async def _drain(end: csp.ReaderEnd, into: list[Any]) -> None:
    async for value in end:
        into.append(value)


async def _alternate_reads(
    ends: list[csp.ReaderEnd], into: list[Any], rng: random.Random, chosen: collections.Counter[str]
) -> None:
    """Read by alternation until a channel retires, then drain the rest with plain reads."""
    select = rng.choice(SELECTS)
    try:
        while True:
            guard, value = await select(*[csp.InputGuard(e) for e in ends])
            assert isinstance(guard, csp.InputGuard)
            chosen[guard.end.channel.name] += 1
            into.append(value)
    except ChannelRetired:
        for end in ends:
            await _drain(end, into)


@pytest.mark.parametrize("layout", ["local+server", "server+server"])
async def test_spanning_alternations_take_every_value_exactly_once(
    servers: list[ServerThread], layout: str
) -> None:
    n = 150
    rng = random.Random(5)
    if layout == "local+server":
        a, b = csp.Channel("span-a"), csp.Channel("span-b", connect=servers[0].address)
    else:
        a = csp.Channel("span-a", connect=servers[0].address)
        b = csp.Channel("span-b", connect=servers[1].address)
    got: list[Any] = []
    chosen: collections.Counter[str] = collections.Counter()
    async with asyncio.timeout(BOUND):
        await asyncio.gather(
            _write_all(a.writer(), list(range(n))),
            _write_all(b.writer(), list(range(1000, 1000 + n))),
            *[_alternate_reads([a.reader(), b.reader()], got, rng, chosen) for _ in range(3)],
        )
    dupes = [v for v, k in collections.Counter(got).items() if k > 1]
    assert not dupes, f"taken twice: {dupes[:10]}"
    assert sorted(got) == list(range(n)) + list(range(1000, 1000 + n))
    assert chosen["span-a"] > 0, chosen  # both homes were chosen by alternations
    assert chosen["span-b"] > 0, chosen
    await csp.shutdown()


async def test_spanning_alternations_survive_cancellation_churn(servers: list[ServerThread]) -> None:
    n = 120
    rng = random.Random(11)
    a, b = csp.Channel("churn-a"), csp.Channel("churn-b", connect=servers[0].address)
    ra, rb = a.reader(), b.reader()
    got: list[Any] = []

    async def one() -> Any:
        _guard, value = await rng.choice(SELECTS)(csp.InputGuard(ra), csp.InputGuard(rb))
        return value

    writers = asyncio.gather(
        _write_all(a.writer(), list(range(n))), _write_all(b.writer(), list(range(1000, 1000 + n)))
    )
    cancelled = 0
    async with asyncio.timeout(BOUND):
        while len(got) < 2 * n:
            tasks = [asyncio.create_task(one()) for _ in range(rng.randrange(1, 4))]
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002]))
            for t in tasks:
                if rng.random() < 0.4:
                    t.cancel()
            await asyncio.wait(tasks)
            for t in tasks:
                if t.cancelled():
                    cancelled += 1
                elif t.exception() is None:
                    got.append(t.result())
                else:
                    assert isinstance(t.exception(), ChannelRetired), t.exception()
                    await _drain(ra, got)
                    await _drain(rb, got)
        await writers
    assert cancelled > 5
    assert sorted(got) == list(range(n)) + list(range(1000, 1000 + n)), "a value was lost or taken twice"
    await csp.shutdown()


async def test_spanning_output_guards_commit_exactly_one_write(servers: list[ServerThread]) -> None:
    rounds = 60
    a, b = csp.Channel("out-a"), csp.Channel("out-b", connect=servers[0].address)
    read: list[Any] = []
    committed: list[tuple[str, Any]] = []

    async def offerer(k: int) -> None:
        wa, wb = a.writer(), b.writer()
        for r in range(rounds):
            msg = (k, r)
            guard, _ = await csp.AltSelect(csp.OutputGuard(wa, msg=msg), csp.OutputGuard(wb, msg=msg))
            assert isinstance(guard, csp.OutputGuard)
            committed.append((guard.end.channel.name, msg))
        await csp.retire(wa, wb)

    async def reader(ch: csp.Channel) -> None:
        end = ch.reader()
        async for value in end:
            read.append((ch.name, tuple(value)))

    async with asyncio.timeout(BOUND):
        await asyncio.gather(offerer(0), offerer(1), reader(a), reader(b))
    assert len(committed) == 2 * rounds
    # Every message was written once, on the channel the alternation says it chose.
    assert sorted(read) == sorted(committed)
    await csp.shutdown()


async def test_two_spanning_alternations_facing_each_other_both_progress(servers: list[ServerThread]) -> None:
    """Both sides are alternations over the same two homes: they must meet, not wait on each other."""
    meetings = 40
    a, b = csp.Channel("face-a"), csp.Channel("face-b", connect=servers[0].address)
    ra, rb, wa, wb = a.reader(), b.reader(), a.writer(), b.writer()
    got: list[Any] = []

    async def sender() -> None:
        for i in range(meetings):
            await csp.AltSelect(csp.OutputGuard(wa, msg=i), csp.OutputGuard(wb, msg=i))

    async def receiver() -> None:
        for _ in range(meetings):
            _, value = await csp.AltSelect(csp.InputGuard(ra), csp.InputGuard(rb))
            got.append(value)

    async with asyncio.timeout(BOUND):
        await asyncio.gather(sender(), receiver())
    assert got == list(range(meetings))
    await csp.shutdown()


async def test_spanning_timeout_and_skip_guards(servers: list[ServerThread]) -> None:
    a, b = csp.Channel("idle-a"), csp.Channel("idle-b", connect=servers[0].address)
    ra, rb = a.reader(), b.reader()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BOUND):
        guard, msg = await csp.PriSelect(csp.InputGuard(ra), csp.InputGuard(rb), csp.SkipGuard())
        assert isinstance(guard, csp.SkipGuard)
        assert msg is None
        started = loop.time()
        guard, msg = await csp.AltSelect(csp.InputGuard(ra), csp.InputGuard(rb), csp.TimeoutGuard(0.3))
        assert isinstance(guard, csp.TimeoutGuard)
        assert msg is None
        assert loop.time() - started >= 0.29
        # A value that arrives while the spanning alternation waits wins over the timeout.
        writer = asyncio.create_task(b.writer()("late"))
        guard, msg = await csp.AltSelect(csp.InputGuard(ra), csp.InputGuard(rb), csp.TimeoutGuard(10))
        assert isinstance(guard, csp.InputGuard)
        assert guard.end is rb
        assert msg == "late"
        await writer
        # Nothing is left behind: both channels are empty and still usable.
        guard, msg = await csp.PriSelect(csp.InputGuard(ra), csp.InputGuard(rb), csp.SkipGuard())
        assert isinstance(guard, csp.SkipGuard)
    await csp.shutdown()


async def test_spanning_alternation_sees_poison_of_either_home(servers: list[ServerThread]) -> None:
    a, b = csp.Channel("pz-a"), csp.Channel("pz-b", connect=servers[0].address)
    ra, rb = a.reader(), b.reader()
    async with asyncio.timeout(BOUND):
        waiting = asyncio.create_task(csp.AltSelect(csp.InputGuard(ra), csp.InputGuard(rb)))
        await asyncio.sleep(0.05)  # let it wait (a poison before it starts raises just the same)
        await csp.poison(b.writer())
        with pytest.raises(ChannelPoisoned):
            await waiting
        with pytest.raises(ChannelPoisoned):
            await csp.PriSelect(csp.InputGuard(ra), csp.InputGuard(rb))
    await csp.shutdown()


async def test_a_new_writer_after_the_last_one_left_streams_again(servers: list[ServerThread]) -> None:
    """Credits are per link and channel: when this link's last writer end of a channel retires or
    disconnects, its promised slots lapse on both sides, and a later writer end starts afresh."""
    ch = csp.Channel("again", 8, connect=servers[0].address)
    got: list[Any] = []
    async with asyncio.timeout(BOUND):
        first = ch.writer()
        for i in range(5):
            await first(i)  # the first write waits for its answer and brings credits; the rest stream
        first.disconnect()  # the last writer end of this link leaves (without retiring the channel)
        second = ch.writer()
        for i in range(5, 8):
            await second(i)  # 8 values: the buffer is full, and no slot was lost to stale credits
        reader = csp.Channel("again", 8, connect=servers[0].address).reader()
        got += [await reader() for _ in range(8)]
        for i in range(8, 16):
            await second(i)
        await csp.retire(second)  # the link's last writer: the write side retires
        got += [value async for value in reader]
    assert got == list(range(16))
    await csp.shutdown()
