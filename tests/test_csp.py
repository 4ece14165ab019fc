"""CSP channels and processes (PyCSP re-created), in one process: ``asyncdist.csp``.

Channels (rendezvous and buffered, the PyCSP 0.3 kinds), poison and retire
with their propagation through ``@csp.process`` endings, ``Parallel`` /
``Sequence`` / ``Spawn``, plain-function processes in threads, and
alternation (``AltSelect``, ``FairSelect``, ``PriSelect``) with its guards,
including many alternations competing for the same channels. Networked
channels, multiprocess and tracing are not built yet and not tested here.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
from _util import SCALE

from asyncdist import csp
from asyncdist.errors import AsyncDistError, ChannelEnded, ChannelPoisoned, ChannelRetired

#: The bound of one test (scaled).
BOUND = 10 * SCALE

Select = Callable[..., Coroutine[Any, Any, tuple[csp.Guard, Any]]]
SELECTS: list[Select] = [csp.AltSelect, csp.FairSelect, csp.PriSelect]


# -- helpers ------------------------------------------------------------------------------


async def settle(rounds: int = 20) -> None:
    """Let every runnable task run ``rounds`` times (no wall-clock time involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def yield_some(rng: random.Random, most: int = 3) -> None:
    for _ in range(rng.randrange(most + 1)):
        await asyncio.sleep(0)


async def finish(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` if it still runs and wait for it (test clean-up)."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def wait_for_flag(flag: threading.Event, seconds: float) -> bool:
    """Poll a thread's flag from the loop without using a worker thread."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not flag.is_set():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture
def seeded_random(request: pytest.FixtureRequest) -> Iterator[int]:
    """Seed the global ``random`` (AltSelect's shuffle) from the test's ``seed``; restore it after."""
    seed: int = request.param
    state = random.getstate()
    random.seed(seed)
    try:
        yield seed
    finally:
        random.setstate(state)


# -- the seed example ------------------------------------------------------------------------


@csp.process
async def counter(cout: csp.WriterEnd, limit: int) -> None:
    for i in range(limit):
        await cout(i)
    await csp.poison(cout)


@csp.process
async def printer(cin: csp.ReaderEnd) -> None:
    while True:
        print(await cin())


async def test_seed_counter_printer_prints_0_to_4_and_ends_by_poison(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = csp.Channel("A")
    async with asyncio.timeout(BOUND):
        results = await csp.Parallel(counter(a.writer(), limit=5), printer(a.reader()))
    assert results == [None, None]
    assert capsys.readouterr().out.split() == ["0", "1", "2", "3", "4"]
    with pytest.raises(ChannelPoisoned):
        await a.reader()()


def test_errors_are_asyncdist_errors() -> None:
    assert issubclass(ChannelPoisoned, ChannelEnded)
    assert issubclass(ChannelRetired, ChannelEnded)
    assert issubclass(ChannelEnded, AsyncDistError)
    assert csp.ChannelPoisoned is ChannelPoisoned
    assert csp.ChannelRetired is ChannelRetired


# -- channels: rendezvous and buffered ----------------------------------------------------------


@pytest.mark.both_loops
async def test_rendezvous_write_completes_only_when_a_reader_took_the_value() -> None:
    ch = csp.Channel()
    cin, cout = ch.reader(), ch.writer()
    written = asyncio.Event()

    async def write() -> None:
        await cout("x")
        written.set()

    async with asyncio.timeout(BOUND):
        w = asyncio.create_task(write())
        await settle()
        assert not written.is_set(), "a rendezvous write completed with no reader"
        assert not w.done()
        assert await cin() == "x"
        await written.wait()
        await w


async def test_rendezvous_read_waits_for_a_writer() -> None:
    ch = csp.Channel()
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        r = asyncio.create_task(cin())
        await settle()
        assert not r.done()
        await cout(7)  # the reader is waiting: the write completes at once
        assert await r == 7


@pytest.mark.parametrize("n", [1, 3, 10])
async def test_buffered_n_writes_complete_without_reader_and_the_next_blocks(n: int) -> None:
    ch = csp.Channel("buf", buffer=n)
    assert ch.buffer == n
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        for i in range(n):
            await cout(i)  # no reader: completes because there is room
        extra = asyncio.create_task(cout(n))
        await settle()
        assert not extra.done(), f"write {n + 1} completed on a full buffer of {n}"
        assert await cin() == 0
        await extra  # room again: the blocked write moves in
        assert [await cin() for _ in range(n)] == list(range(1, n + 1))  # FIFO


def test_negative_buffer_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="buffer"):
            csp.Channel(buffer=-1)

    asyncio.run(main())


def test_a_channel_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="event loop"):
        csp.Channel()


@pytest.mark.both_loops
@pytest.mark.parametrize("buffer", [0, 1, 7])
async def test_many_writers_many_readers_deliver_every_value_exactly_once(buffer: int) -> None:
    ch = csp.Channel(buffer=buffer)
    total, writers, readers = 1000, 4, 4
    rng = random.Random(buffer)

    @csp.process
    async def writer(cout: csp.WriterEnd, values: range) -> int:
        for v in values:
            await cout(v)
            await yield_some(rng, 1)
        await csp.retire(cout)
        return len(values)

    @csp.process
    async def reader(cin: csp.ReaderEnd) -> list[int]:
        got = []
        async for v in cin:
            got.append(v)
            await yield_some(rng, 1)
        return got

    per = total // writers
    procs = [writer(ch.writer(), range(k * per, (k + 1) * per)) for k in range(writers)]
    procs += [reader(ch.reader()) for _ in range(readers)]
    async with asyncio.timeout(BOUND):
        results = await csp.Parallel(*procs)
    assert results[:writers] == [per] * writers
    received = [v for got in results[writers:] for v in got]
    assert collections.Counter(received) == collections.Counter(range(total))
    for got in results[writers:]:  # each reader sees each writer's values in the order written
        for k in range(writers):
            mine = [v for v in got if v // per == k]
            assert mine == sorted(mine)
    assert sum(1 for got in results[writers:] if got) > 1  # the readers shared the work


async def test_channel_ends_can_be_sent_over_a_channel() -> None:
    carrier = csp.Channel(buffer=1)
    data = csp.Channel(buffer=1)
    async with asyncio.timeout(BOUND):
        await carrier.writer()(data.writer())
        end = await carrier.reader()()
        assert isinstance(end, csp.WriterEnd)
        await end("through a mobile end")
        assert await data.reader()() == "through a mobile end"


# -- channel kinds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "many_readers", "many_writers"),
    [
        (csp.One2OneChannel, False, False),
        (csp.One2AnyChannel, True, False),
        (csp.Any2OneChannel, False, True),
        (csp.Any2AnyChannel, True, True),
        (csp.Channel, True, True),
    ],
)
async def test_channel_kinds_refuse_a_second_end_where_they_allow_one(
    kind: type[csp.Channel], many_readers: bool, many_writers: bool
) -> None:
    ch = kind("k")
    ch.reader()
    ch.writer()
    if many_readers:
        ch.reader()
    else:
        with pytest.raises(ValueError, match=kind.__name__):
            ch.reader()
    if many_writers:
        ch.writer()
    else:
        with pytest.raises(ValueError, match=kind.__name__):
            ch.writer()


async def test_the_refusal_of_a_second_writer_names_writers() -> None:
    ch = csp.One2OneChannel("k")
    ch.writer()
    with pytest.raises(ValueError, match=r"allows 1 writer end"):
        ch.writer()


async def test_one2one_channel_still_works_after_refusing_an_end() -> None:
    ch = csp.One2OneChannel(buffer=1)
    cin, cout = ch.reader(), ch.writer()
    with pytest.raises(ValueError):
        ch.writer()
    async with asyncio.timeout(BOUND):
        await cout(1)
        assert await cin() == 1


# -- poison --------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_poison_fails_pending_readers_and_writers_and_every_later_operation() -> None:
    rdv = csp.Channel()
    full = csp.Channel(buffer=1)
    async with asyncio.timeout(BOUND):
        await full.writer()("kept")
        readers = [asyncio.create_task(rdv.reader()()) for _ in range(3)]
        writers = [asyncio.create_task(full.writer()(i)) for i in range(3)]
        await settle()
        assert not any(t.done() for t in readers + writers)
        await csp.poison(rdv.writer())
        await csp.poison(full)  # a channel can be poisoned directly too
        for t in readers + writers:
            with pytest.raises(ChannelPoisoned):
                await t
        for ch in (rdv, full):
            with pytest.raises(ChannelPoisoned):
                await ch.reader()()  # the buffered value is gone with the poison
            with pytest.raises(ChannelPoisoned):
                await ch.writer()(0)
        await csp.poison(rdv.reader())  # poisoning twice is harmless


@pytest.mark.parametrize("poison_at", ["sink", "source"])
async def test_one_poison_shuts_down_a_pipeline_of_four_processes(poison_at: str) -> None:
    chans = [csp.Channel(f"c{i}") for i in range(3)]
    passed: list[int] = []

    @csp.process
    async def source(cout: csp.WriterEnd) -> str:
        for i in range(10**9):
            await cout(i)
            if poison_at == "source" and i == 9:
                await csp.poison(cout)
        return "unreachable"

    @csp.process
    async def relay(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> str:
        while True:
            await cout(await cin() * 10)

    @csp.process
    async def sink(cin: csp.ReaderEnd) -> str:
        while True:
            passed.append(await cin())
            if poison_at == "sink" and len(passed) == 10:
                await csp.poison(cin)

    async with asyncio.timeout(BOUND):
        results = await csp.Parallel(
            source(chans[0].writer()),
            relay(chans[0].reader(), chans[1].writer()),
            relay(chans[1].reader(), chans[2].writer()),
            sink(chans[2].reader()),
        )
    assert results == [None] * 4
    assert passed[:10] == [i * 100 for i in range(10)]
    for ch in chans:
        with pytest.raises(ChannelPoisoned):
            await ch.writer()(0)


async def test_a_failing_process_raises_in_parallel_and_its_neighbours_end_poisoned() -> None:
    a, b = csp.Channel("a"), csp.Channel("b")
    ended: dict[str, BaseException] = {}

    @csp.process
    async def source(cout: csp.WriterEnd) -> None:
        try:
            while True:
                await cout(1)
        except ChannelEnded as e:
            ended["source"] = e
            raise

    @csp.process
    async def broken(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> None:
        for _ in range(3):
            await cout(await cin())
        raise ValueError("broken worker")

    @csp.process
    async def sink(cin: csp.ReaderEnd) -> None:
        try:
            while True:
                await cin()
        except ChannelEnded as e:
            ended["sink"] = e
            raise

    async with asyncio.timeout(BOUND):
        with pytest.raises(ExceptionGroup) as info:
            await csp.Parallel(source(a.writer()), broken(a.reader(), b.writer()), sink(b.reader()))
    group = info.value
    assert len(group.exceptions) == 1
    assert isinstance(group.exceptions[0], ValueError)
    assert str(group.exceptions[0]) == "broken worker"
    assert isinstance(ended["source"], ChannelPoisoned)
    assert isinstance(ended["sink"], ChannelPoisoned)


async def test_a_process_failing_with_a_base_exception_is_raised_in_a_group() -> None:
    class Stop(BaseException):
        pass

    @csp.process
    async def stops() -> None:
        raise Stop("stop")

    @csp.process
    async def fine() -> int:
        return 1

    async with asyncio.timeout(BOUND):
        with pytest.raises(BaseExceptionGroup) as info:
            await csp.Parallel(stops(), fine())
    assert [type(e) for e in info.value.exceptions] == [Stop]


async def test_sequence_raises_a_failure_as_is_and_stops() -> None:
    ran: list[str] = []

    @csp.process
    async def step(name: str, fail: bool) -> str:
        ran.append(name)
        if fail:
            raise KeyError(name)
        return name

    async with asyncio.timeout(BOUND):
        with pytest.raises(KeyError):
            await csp.Sequence(step("a", False), step("b", True), step("c", False))
    assert ran == ["a", "b"]


# -- retire --------------------------------------------------------------------------------


async def test_retiring_one_of_two_writers_keeps_the_channel_then_buffered_values_drain() -> None:
    ch = csp.Channel(buffer=4)
    cin = ch.reader()
    w1, w2 = ch.writer(), ch.writer()
    async with asyncio.timeout(BOUND):
        await w1("a")
        await csp.retire(w1)
        with pytest.raises(ChannelRetired):
            await w1("again")  # a retired end is done for
        await w2("b")
        assert await cin() == "a"
        await w2("c")
        await w2("d")
        await csp.retire(w2)  # every writer retired: readers drain, then ChannelRetired
        assert [await cin(), await cin()] == ["b", "c"]
        assert await cin() == "d"
        with pytest.raises(ChannelRetired):
            await cin()
        with pytest.raises(ChannelRetired):
            await ch.reader()()


async def test_retiring_the_last_writer_fails_waiting_readers() -> None:
    ch = csp.Channel()
    cout = ch.writer()
    async with asyncio.timeout(BOUND):
        waiting = [asyncio.create_task(ch.reader()()) for _ in range(2)]
        await settle()
        await csp.retire(cout)
        for t in waiting:
            with pytest.raises(ChannelRetired):
                await t


async def test_retiring_every_reader_fails_writers() -> None:
    ch = csp.Channel(buffer=1)
    r1, r2 = ch.reader(), ch.reader()
    cout = ch.writer()
    async with asyncio.timeout(BOUND):
        await cout(0)
        blocked = asyncio.create_task(cout(1))
        await settle()
        await csp.retire(r1)
        await settle()
        assert not blocked.done(), "one reader end is left: the channel is not retired"
        await csp.retire(r2)
        with pytest.raises(ChannelRetired):
            await blocked
        with pytest.raises(ChannelRetired):
            await cout(2)


async def test_async_for_over_a_reader_stops_at_retirement() -> None:
    ch = csp.Channel(buffer=2)

    @csp.process
    async def produce(cout: csp.WriterEnd) -> None:
        for i in range(5):
            await cout(i)
        await csp.retire(cout)

    @csp.process
    async def consume(cin: csp.ReaderEnd) -> list[int]:
        return [x async for x in cin]

    async with asyncio.timeout(BOUND):
        assert await csp.Parallel(produce(ch.writer()), consume(ch.reader())) == [None, [0, 1, 2, 3, 4]]


async def test_poison_propagates_through_a_process_that_reads_with_async_for() -> None:
    a, b = csp.Channel("a"), csp.Channel("b")

    @csp.process
    async def relay(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> None:
        async for x in cin:
            await cout(x)

    @csp.process
    async def sink(cin: csp.ReaderEnd) -> None:
        while True:
            await cin()

    task = asyncio.ensure_future(
        csp.Parallel(counter(a.writer(), limit=3), relay(a.reader(), b.writer()), sink(b.reader()))
    )
    try:
        async with asyncio.timeout(2 * SCALE):
            assert await asyncio.shield(task) == [None, None, None]
    finally:
        await csp.poison(b)
        await finish(task)


@pytest.mark.parametrize("buffer", [0, 3])
async def test_retirement_propagates_down_a_pipeline_after_every_value(buffer: int) -> None:
    chans = [csp.Channel(buffer=buffer) for _ in range(3)]

    @csp.process
    async def source(cout: csp.WriterEnd) -> None:
        for i in range(20):
            await cout(i)
        await csp.retire(cout)

    @csp.process
    async def relay(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> None:
        while True:
            await cout(await cin() + 1)

    @csp.process
    async def sink(cin: csp.ReaderEnd) -> list[int]:
        got = []
        while True:
            try:
                got.append(await cin())
            except ChannelRetired:
                return got

    async with asyncio.timeout(BOUND):
        results = await csp.Parallel(
            source(chans[0].writer()),
            relay(chans[0].reader(), chans[1].writer()),
            relay(chans[1].reader(), chans[2].writer()),
            sink(chans[2].reader()),
        )
    assert results == [None, None, None, list(range(2, 22))]


# -- processes -----------------------------------------------------------------------------


async def test_parallel_returns_results_in_argument_order() -> None:
    gate = csp.Channel()

    @csp.process
    async def late(cin: csp.ReaderEnd) -> str:
        return f"late got {await cin()}"

    @csp.process
    async def early(cout: csp.WriterEnd) -> str:
        await cout("go")
        return "early"

    @csp.process
    async def plain(x: int) -> int:
        return x * 2

    async with asyncio.timeout(BOUND):
        assert await csp.Parallel(late(gate.reader()), plain(21), early(gate.writer())) == [
            "late got go",
            42,
            "early",
        ]
        assert await csp.Parallel() == []


async def test_sequence_runs_processes_one_after_the_other() -> None:
    log: list[str] = []

    @csp.process
    async def step(name: str) -> str:
        log.append(f"{name} start")
        await asyncio.sleep(0.01 * SCALE)
        log.append(f"{name} end")
        return name

    async with asyncio.timeout(BOUND):
        assert await csp.Sequence(step("a"), step("b"), step("c")) == ["a", "b", "c"]
    assert log == ["a start", "a end", "b start", "b end", "c start", "c end"]


async def test_spawn_starts_without_waiting_and_returns_a_future() -> None:
    ch = csp.Channel()

    @csp.process
    async def send(cout: csp.WriterEnd) -> str:
        await cout("spawned")
        return "sent"

    fut = csp.Spawn(send(ch.writer()))
    try:
        assert isinstance(fut, asyncio.Future)
        async with asyncio.timeout(BOUND):
            assert await ch.reader()() == "spawned"  # it runs while we do not await it
            assert await fut == ["sent"]
    finally:
        await finish(fut)


@pytest.mark.both_loops
async def test_cancelling_parallel_cancels_every_process_and_leaves_no_task() -> None:
    ch = csp.Channel()
    started: set[str] = set()
    cancelled: set[str] = set()

    def watched(name: str, body: Callable[[], Awaitable[Any]]) -> csp.Process:
        @csp.process
        async def proc() -> None:
            started.add(name)
            try:
                await body()
            except asyncio.CancelledError:
                cancelled.add(name)
                raise

        return proc()

    reader, writer = ch.reader(), csp.Channel().writer()
    other = csp.Channel()
    procs = [
        watched("reader", reader),
        watched("writer", lambda: writer("nobody reads")),
        watched("sleeper", lambda: asyncio.sleep(3600)),
        watched("alt", lambda: csp.AltSelect(csp.InputGuard(other.reader()))),
    ]
    task = asyncio.ensure_future(csp.Parallel(*procs))
    async with asyncio.timeout(BOUND):
        while len(started) < 4:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cancelled == {"reader", "writer", "sleeper", "alt"}
    # Nothing is left waiting on the channels: a writer finds no phantom reader.
    later = asyncio.create_task(ch.writer()("after"))
    await settle()
    assert not later.done()
    await finish(later)


async def test_a_timeout_around_parallel_cancels_its_processes() -> None:
    cancelled = asyncio.Event()

    @csp.process
    async def forever(cin: csp.ReaderEnd) -> None:
        try:
            await cin()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    ch = csp.Channel()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05 * SCALE):
            await csp.Parallel(forever(ch.reader()))
    assert cancelled.is_set()


# -- plain-function processes (threads) --------------------------------------------------------


@pytest.mark.parametrize("buffer", [0, 2])
async def test_plain_function_processes_interoperate_with_async_ones(buffer: int) -> None:
    a, b = csp.Channel("a", buffer=buffer), csp.Channel("b", buffer=buffer)
    threads: set[str] = set()

    @csp.process
    async def source(cout: csp.WriterEnd) -> None:
        for i in range(50):
            await cout(i)
        await csp.retire(cout)

    @csp.process
    def square(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> str:  # plain: runs in a thread
        threads.add(threading.current_thread().name)
        while True:
            x = cin()  # blocks this thread, not the loop
            cout(x * x)

    @csp.process
    def plain_sink(cin: csp.ReaderEnd) -> list[int]:
        threads.add(threading.current_thread().name)
        got = []
        try:
            while True:
                got.append(cin())
        except ChannelRetired:
            return got

    async with asyncio.timeout(BOUND):
        results = await csp.Parallel(
            source(a.writer()), square(a.reader(), b.writer()), plain_sink(b.reader())
        )
    assert results == [None, None, [i * i for i in range(50)]]
    assert threading.main_thread().name not in threads


async def test_a_plain_writer_and_an_async_reader_rendezvous() -> None:
    ch = csp.Channel()
    done_writing = threading.Event()

    @csp.process
    def write(cout: csp.WriterEnd) -> None:
        cout("from a thread")
        done_writing.set()

    task = asyncio.ensure_future(csp.Parallel(write(ch.writer())))
    try:
        async with asyncio.timeout(BOUND):
            await asyncio.sleep(0.05 * SCALE)
            assert not done_writing.is_set(), "the thread's rendezvous write completed with no reader"
            assert await ch.reader()() == "from a thread"
            assert await task == [None]
    finally:
        if not task.done():
            await csp.poison(ch)
            await finish(task)


async def test_a_plain_process_poisoned_while_blocked_propagates() -> None:
    a, b = csp.Channel(), csp.Channel()
    seen: list[type[BaseException]] = []

    @csp.process
    def relay(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> None:
        try:
            cout(cin())
        except BaseException as e:
            seen.append(type(e))
            raise

    task = asyncio.ensure_future(csp.Parallel(relay(a.reader(), b.writer())))
    try:
        async with asyncio.timeout(BOUND):
            await asyncio.sleep(0.05 * SCALE)
            await csp.poison(a)
            assert await task == [None]
            with pytest.raises(ChannelPoisoned):
                await b.reader()()  # the thread's ending poisoned its other end
        assert seen == [ChannelPoisoned]
    finally:
        await csp.poison(a, b)
        await finish(task)


async def test_seed_example_with_plain_function_processes() -> None:
    a = csp.Channel("A")
    printed: list[int] = []

    @csp.process
    def plain_counter(cout: csp.WriterEnd, limit: int) -> None:
        for i in range(limit):
            cout(i)
        csp.poison(cout)  # type: ignore[unused-coroutine]  # as in PyCSP's seed: the bug

    @csp.process
    def plain_printer(cin: csp.ReaderEnd) -> None:
        while True:
            printed.append(cin())

    task = asyncio.ensure_future(csp.Parallel(plain_counter(a.writer(), limit=5), plain_printer(a.reader())))
    try:
        async with asyncio.timeout(2 * SCALE):
            assert await asyncio.shield(task) == [None, None]
    finally:
        await csp.poison(a)  # unblock the printer thread if the poison did not happen
        await finish(task)
    assert printed == [0, 1, 2, 3, 4]


async def test_a_network_of_many_plain_function_processes_does_not_deadlock() -> None:
    n = 40  # more than any default executor's workers (at most 32)
    chans = [csp.Channel(f"p{i}") for i in range(n - 1)]

    @csp.process
    def source(cout: csp.WriterEnd) -> None:
        i = 0
        while True:
            cout(i)
            i += 1

    @csp.process
    def relay(cin: csp.ReaderEnd, cout: csp.WriterEnd) -> None:
        while True:
            cout(cin())

    @csp.process
    async def sink(cin: csp.ReaderEnd) -> list[int]:
        got = [await cin() for _ in range(5)]
        await csp.poison(cin)
        return got

    procs = [source(chans[0].writer())]
    procs += [relay(chans[i].reader(), chans[i + 1].writer()) for i in range(n - 2)]
    procs.append(sink(chans[-1].reader()))
    task = asyncio.ensure_future(csp.Parallel(*procs))
    try:
        async with asyncio.timeout(3 * SCALE):
            results = await asyncio.shield(task)
    finally:
        await csp.poison(*chans)  # a deadlocked network: poison lets every thread end
        await finish(task)
    assert results[-1] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("blocked_in", ["read", "select"])
async def test_cancelling_parallel_ends_a_plain_process_blocked_on_a_channel(blocked_in: str) -> None:
    ch = csp.Channel()
    started, ended = threading.Event(), threading.Event()
    seen: list[type[BaseException]] = []

    @csp.process
    def blocked(cin: csp.ReaderEnd) -> None:
        started.set()
        try:
            if blocked_in == "read":
                cin()
            else:  # a plain process's select blocks too (test_csp_plain_select.py)
                csp.FairSelect(csp.InputGuard(cin))
        except BaseException as e:
            seen.append(type(e))
            raise
        finally:
            ended.set()

    task = asyncio.ensure_future(csp.Parallel(blocked(ch.reader())))
    try:
        assert await wait_for_flag(started, BOUND)
        await asyncio.sleep(0.05 * SCALE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        thread_ended = await wait_for_flag(ended, 2 * SCALE)
    finally:
        await csp.poison(ch)  # unblock the thread (and its pending task) if cancellation did not
        await wait_for_flag(ended, BOUND)
        await settle()
    assert thread_ended, f"the thread is still blocked ({blocked_in}) after Parallel was cancelled ({seen})"


# -- cancellation never loses a value ------------------------------------------------------------


@pytest.mark.parametrize("buffer", [0, 2])
async def test_a_reader_cancelled_after_its_read_committed_gives_the_value_back(buffer: int) -> None:
    ch = csp.Channel(buffer=buffer)
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        r = asyncio.create_task(cin())
        await settle()
        await cout("first")  # commits with the waiting reader...
        r.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await r
        if buffer:
            await cout("second")
        assert await cin() == "first"  # the value is back, first in line
        if buffer:
            assert await cin() == "second"


async def test_a_waiting_reader_that_is_cancelled_takes_no_value() -> None:
    ch = csp.Channel()
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        r = asyncio.create_task(cin())
        await settle()
        r.cancel()
        with pytest.raises(asyncio.CancelledError):
            await r
        w = asyncio.create_task(cout("kept"))
        await settle()
        assert not w.done(), "a write completed with a cancelled reader"
        assert await cin() == "kept"
        await w


@pytest.mark.parametrize("how", ["read", "AltSelect"])
async def test_a_writer_racing_the_cancellation_of_a_waiting_reader_loses_no_value(how: str) -> None:
    ch = csp.Channel()
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        if how == "read":
            r: asyncio.Task[Any] = asyncio.create_task(cin())
        else:
            r = asyncio.create_task(csp.AltSelect(csp.InputGuard(cin)))
        await settle()
        w = asyncio.create_task(cout("precious"))  # runs before the reader sees its cancellation
        r.cancel()
        with pytest.raises(asyncio.CancelledError):
            await r
        try:
            async with asyncio.timeout(0.5 * SCALE):
                got = await cin()
        finally:
            await finish(w)
    assert got == "precious"


@pytest.mark.parametrize("buffer", [0, 3])
async def test_random_reader_cancellations_lose_no_value(buffer: int) -> None:
    """Two writers, rounds of 1-3 readers of which some are cancelled: every value arrives once."""
    total = 100
    lost: dict[int, list[int]] = {}
    for seed in range(50):
        rng = random.Random(seed)
        ch = csp.Channel(buffer=buffer)
        cin = ch.reader()

        async def write(values: range, cout: csp.WriterEnd, rng: random.Random = rng) -> None:
            for v in values:
                await cout(v)
                await yield_some(rng, 2)
            await csp.retire(cout)  # the readers end when both writers retired and all is read

        writers = [
            asyncio.create_task(write(range(50), ch.writer())),
            asyncio.create_task(write(range(50, total), ch.writer())),
        ]
        got: list[int] = []
        readers: list[asyncio.Task[Any]] = []
        try:
            async with asyncio.timeout(BOUND):
                retired = False
                while not retired:
                    readers = [asyncio.create_task(cin()) for _ in range(rng.randrange(1, 4))]
                    await yield_some(rng)
                    for r in readers:
                        if rng.random() < 0.4:
                            r.cancel()
                    await asyncio.wait(readers)  # a cancelled reader does not cancel us
                    for r in readers:
                        if r.cancelled():
                            continue
                        if isinstance(r.exception(), ChannelRetired):
                            retired = True
                        else:
                            got.append(r.result())
                await asyncio.gather(*writers)
        finally:
            for t in [*writers, *readers]:
                await finish(t)
        counts = collections.Counter(got)
        assert all(n == 1 for n in counts.values()), f"seed {seed}: delivered twice"
        if len(got) != total:
            lost[seed] = sorted(set(range(total)) - set(got))
    assert not lost, f"values lost (by seed): {lost}"


@pytest.mark.parametrize("buffer", [0, 1])
async def test_the_bound_holds_after_a_value_was_given_back(buffer: int) -> None:
    ch = csp.Channel(buffer=buffer)
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        r = asyncio.create_task(cin())
        await settle()
        await cout("x")  # taken by the waiting reader...
        expected = ["x"]
        if buffer:
            await cout("y")  # ...and the buffer fills before the reader resumes
            expected.append("y")
        r.cancel()  # ...which is cancelled before it resumes: "x" goes back, first in line
        with pytest.raises(asyncio.CancelledError):
            await r
        w = asyncio.create_task(cout("z"))
        await settle()
        assert not w.done()
        assert await cin() == "x"
        await settle()
        try:
            # Rendezvous: nobody took "z" yet. Buffered: the buffer still holds "y" (full).
            assert not w.done(), f"the write of z completed early (buffer={buffer})"
        finally:
            assert [await cin() for _ in range(len(expected))] == [*expected[1:], "z"]
            await w


# -- alternation ---------------------------------------------------------------------------


async def test_priselect_prefers_the_first_ready_guard() -> None:
    a, b = csp.Channel(buffer=3), csp.Channel(buffer=3)
    ain, bin_ = a.reader(), b.reader()
    async with asyncio.timeout(BOUND):
        for i in range(3):
            await a.writer()(f"a{i}")
            await b.writer()(f"b{i}")
        got = [(await csp.PriSelect(csp.InputGuard(ain), csp.InputGuard(bin_)))[1] for _ in range(6)]
    assert got == ["a0", "a1", "a2", "b0", "b1", "b2"]


@pytest.mark.parametrize("select", SELECTS)
async def test_an_alternation_commits_exactly_one_of_several_ready_guards(select: Select) -> None:
    a, b = csp.Channel(buffer=1), csp.Channel(buffer=1)
    out = csp.Channel(buffer=1)
    async with asyncio.timeout(BOUND):
        for _ in range(20):
            await a.writer()("a")
            await b.writer()("b")
            ga, gb = csp.InputGuard(a.reader()), csp.InputGuard(b.reader())
            gout = csp.OutputGuard(out.writer(), msg="o")
            guard, msg = await select(ga, gb, gout)
            assert guard in (ga, gb, gout)
            taken = "a" if guard is ga else "b" if guard is gb else "o"
            assert msg == (None if taken == "o" else taken)
            # Exactly the committed guard happened: its input is gone (or its output is there),
            # the other inputs still hold their values, no output was made for another guard.
            for name, end in {"a": a.reader(), "b": b.reader(), "o": out.reader()}.items():
                g, v = await csp.PriSelect(csp.InputGuard(end), csp.SkipGuard())
                there = not isinstance(g, csp.SkipGuard)
                assert there == ((name == "o") == (name == taken)), f"guard {name} (taken: {taken})"
                if there:
                    assert v == name


async def test_an_alternation_does_not_rendezvous_with_itself() -> None:
    ch = csp.Channel()
    cin, cout = ch.reader(), ch.writer()
    async with asyncio.timeout(BOUND):
        for select in SELECTS:
            skip = csp.SkipGuard()
            assert await select(csp.InputGuard(cin), csp.OutputGuard(cout, msg=1), skip) == (skip, None)
        # Waiting on both ends of one channel, it is matched by someone else only.
        gin, gout = csp.InputGuard(cin), csp.OutputGuard(cout, msg="mine")
        alt = asyncio.create_task(csp.AltSelect(gin, gout))
        await settle()
        assert not alt.done()
        await cout("theirs")
        assert await alt == (gin, "theirs")


@pytest.mark.parametrize("select", SELECTS)
async def test_output_guard_writes_to_a_waiting_reader(select: Select) -> None:
    ch = csp.Channel()
    async with asyncio.timeout(BOUND):
        r = asyncio.create_task(ch.reader()())
        await settle()
        guard = csp.OutputGuard(ch.writer(), msg=42)
        assert await select(guard, csp.TimeoutGuard(seconds=BOUND)) == (guard, None)
        assert await r == 42


@pytest.mark.parametrize("select", SELECTS)
async def test_output_guard_waits_for_a_reader(select: Select) -> None:
    ch = csp.Channel()
    guard = csp.OutputGuard(ch.writer(), msg="later")
    async with asyncio.timeout(BOUND):
        alt = asyncio.create_task(select(guard))
        await settle()
        assert not alt.done()
        assert await ch.reader()() == "later"
        assert await alt == (guard, None)


@pytest.mark.parametrize("select", SELECTS)
async def test_timeout_guard_fires_when_nothing_is_ready_and_leaves_no_offer(select: Select) -> None:
    ch = csp.Channel()
    cin, cout = ch.reader(), ch.writer()
    timeout = csp.TimeoutGuard(seconds=0.05 * SCALE)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BOUND):
        start = loop.time()
        guard, msg = await select(csp.InputGuard(cin), timeout)
        assert (guard, msg) == (timeout, None)
        assert loop.time() - start >= 0.04 * SCALE
        w = asyncio.create_task(cout("after"))
        await settle()
        assert not w.done(), "a write was taken by an alternation that had timed out"
        assert await cin() == "after"
        await w


@pytest.mark.parametrize("select", SELECTS)
async def test_timeout_guard_is_not_taken_when_a_guard_becomes_ready(select: Select) -> None:
    ch = csp.Channel()
    async with asyncio.timeout(BOUND):
        alt = asyncio.create_task(select(csp.InputGuard(ch.reader()), csp.TimeoutGuard(seconds=BOUND)))
        await settle()
        await ch.writer()("in time")
        guard, msg = await alt
    assert isinstance(guard, csp.InputGuard)
    assert msg == "in time"


@pytest.mark.parametrize("select", SELECTS)
async def test_skip_guard_is_taken_only_when_nothing_is_ready_now(select: Select) -> None:
    ch = csp.Channel(buffer=1)
    cin = ch.reader()
    skip = csp.SkipGuard()
    async with asyncio.timeout(BOUND):
        assert await select(csp.InputGuard(cin), skip) == (skip, None)
        await ch.writer()("ready")
        guard, msg = await select(csp.InputGuard(cin), skip)
        assert isinstance(guard, csp.InputGuard)
        assert msg == "ready"
        # The skipped alternation left no offer behind: a rendezvous write still blocks.
        rdv = csp.Channel()
        assert await select(csp.InputGuard(rdv.reader()), skip) == (skip, None)
        w = asyncio.create_task(rdv.writer()("x"))
        await settle()
        assert not w.done()
        await finish(w)


@pytest.mark.parametrize("select", SELECTS)
async def test_a_guard_on_a_poisoned_channel_raises(select: Select) -> None:
    poisoned, fine = csp.Channel(), csp.Channel()
    pin, fin = poisoned.reader(), fine.reader()
    await csp.poison(poisoned)
    async with asyncio.timeout(BOUND):
        with pytest.raises(ChannelPoisoned):
            await select(csp.InputGuard(pin), csp.InputGuard(fin), csp.TimeoutGuard(seconds=BOUND))
        with pytest.raises(ChannelPoisoned):
            await select(csp.OutputGuard(poisoned.writer(), msg=1), csp.SkipGuard())
        # Poisoned while the alternation waits:
        other = csp.Channel()
        alt = asyncio.create_task(select(csp.InputGuard(fin), csp.InputGuard(other.reader())))
        await settle()
        await csp.poison(other)
        with pytest.raises(ChannelPoisoned):
            await alt
        w = asyncio.create_task(fine.writer()("not for a dead alternation"))
        await settle()
        assert not w.done()
        assert await fin() == "not for a dead alternation"
        await w


async def test_a_guard_on_a_retired_channel_raises_retired() -> None:
    ch = csp.Channel()
    cin = ch.reader()
    await csp.retire(ch.writer())
    async with asyncio.timeout(BOUND):
        with pytest.raises(ChannelRetired):
            await csp.AltSelect(csp.InputGuard(cin), csp.TimeoutGuard(seconds=BOUND))


def test_guards_check_their_arguments() -> None:
    async def main() -> None:
        ch = csp.Channel()
        with pytest.raises(TypeError):
            csp.InputGuard(ch.writer())  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            csp.OutputGuard(ch.reader(), msg=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            csp.TimeoutGuard(seconds=-1)
        with pytest.raises(ValueError):
            await csp.AltSelect()
        with pytest.raises(TypeError):
            await csp.PriSelect(ch.reader())  # type: ignore[arg-type]

    asyncio.run(main())


async def test_fairselect_alternates_between_two_always_ready_channels() -> None:
    a, b = csp.Channel(buffer=200), csp.Channel(buffer=200)
    async with asyncio.timeout(BOUND):
        for i in range(200):
            await a.writer()(i)
            await b.writer()(i)
        ga, gb = csp.InputGuard(a.reader()), csp.InputGuard(b.reader())
        picks: collections.Counter[str] = collections.Counter()
        for _ in range(200):
            guard, _msg = await csp.FairSelect(ga, gb)
            picks["a" if guard is ga else "b"] += 1
        # PriSelect, by contrast, keeps taking the first one:
        pri: collections.Counter[str] = collections.Counter()
        for _ in range(20):
            guard, _msg = await csp.PriSelect(ga, gb)
            pri["a" if guard is ga else "b"] += 1
    assert abs(picks["a"] - picks["b"]) <= 20, picks
    assert pri == {"a": 20}


async def test_altselect_chooses_among_ready_guards_at_random() -> None:
    a, b = csp.Channel(buffer=400), csp.Channel(buffer=400)
    async with asyncio.timeout(BOUND):
        for i in range(400):
            await a.writer()(i)
            await b.writer()(i)
        ga, gb = csp.InputGuard(a.reader()), csp.InputGuard(b.reader())
        picks: collections.Counter[str] = collections.Counter()
        for _ in range(400):
            guard, _msg = await csp.AltSelect(ga, gb)
            picks["a" if guard is ga else "b"] += 1
    assert 100 < picks["a"] < 300, picks


@pytest.mark.both_loops
@pytest.mark.parametrize("seeded_random", range(6), indirect=True)
@pytest.mark.parametrize("buffer", [0, 2])
async def test_competing_alternations_deliver_every_value_exactly_once(
    seeded_random: int, buffer: int
) -> None:
    """8 reading alternations over the same 3 channels against writers that alternate too."""
    rng = random.Random(seeded_random)
    chans = [csp.Channel(f"s{i}", buffer=buffer) for i in range(3)]
    per_writer, n_writers, n_readers = 150, 4, 8
    total = per_writer * n_writers
    received: list[tuple[int, Any]] = []
    all_in = asyncio.Event()

    @csp.process
    async def reader(k: int, ins: list[csp.ReaderEnd]) -> None:
        select = SELECTS[k % 3]
        guards = [csp.InputGuard(cin) for cin in ins]
        while True:
            guard, msg = await select(*guards)
            assert guard in guards
            received.append((guards.index(guard), msg))
            if len(received) >= total:
                all_in.set()
            await yield_some(rng)

    @csp.process
    async def writer(k: int, outs: list[csp.WriterEnd]) -> int:
        values = range(k * per_writer, (k + 1) * per_writer)
        for v in values:
            if k == 0:  # one writer writes plainly, to a channel of its choice
                await outs[v % 3](v)
            else:
                select = SELECTS[k % 3]
                guards = [csp.OutputGuard(cout, msg=v) for cout in outs]
                guard, msg = await select(*guards)
                assert guard in guards
                assert msg is None
            await yield_some(rng)
        return len(values)

    @csp.process
    async def closer(ends: list[csp.WriterEnd]) -> str:
        await all_in.wait()
        await csp.poison(*ends)
        return "closed"

    procs = [reader(k, [c.reader() for c in chans]) for k in range(n_readers)]
    procs += [writer(k, [c.writer() for c in chans]) for k in range(n_writers)]
    procs.append(closer([c.writer() for c in chans]))
    try:
        async with asyncio.timeout(BOUND):
            results = await csp.Parallel(*procs)
    except TimeoutError:
        values = [v for _, v in received]
        missing = sorted(set(range(total)) - set(values))
        pytest.fail(f"{len(received)} of {total} values arrived; missing {missing[:20]}")
    assert results == [None] * n_readers + [per_writer] * n_writers + ["closed"]
    values = [v for _, v in received]
    dupes = [v for v, n in collections.Counter(values).items() if n > 1]
    assert not dupes, f"delivered twice: {dupes[:20]}"
    assert sorted(values) == list(range(total))
    assert {i for i, _ in received} == {0, 1, 2}  # every channel carried values
