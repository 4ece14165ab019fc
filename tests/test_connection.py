"""Behaviour of :class:`asyncdist.Connection` over real loopback sockets.

Calls (many at once, both directions, nested), values on the wire, remote
exceptions (F13), unserializable results (F14), timeouts and cancellation
(F12), streams with credit, heartbeats against frozen, killed and half-open
peers (F4, F6, F5), and closing. Every test runs on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import random
import select
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE, eventually

import asyncdist
from asyncdist import (
    ConnectionClosedError,
    ConnectionClosedOK,
    RemoteError,
    SerializationError,
    UnknownMethodError,
    current_connection,
)
from asyncdist.testing import FaultProxy, connection_pair, poll_for

PEER = Path(__file__).with_name("_peer.py")

pytestmark = pytest.mark.both_loops


async def finish(task: asyncio.Task[Any], timeout: float, what: str) -> None:
    """Wait for ``task`` to end (without raising its exception); fail if it hangs."""
    done, _ = await asyncio.wait({task}, timeout=timeout * SCALE)
    if not done:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise AssertionError(f"{what}: still waiting after {timeout * SCALE:g} s")


async def collect(stream: AsyncIterator[Any], into: list[Any] | None = None) -> list[Any]:
    """Append every item of ``stream`` to ``into`` (kept if the stream raises); return it."""
    items = [] if into is None else into
    async for item in stream:
        items.append(item)
    return items


def echo(x: Any) -> Any:
    return x


async def aecho(x: Any) -> Any:
    await asyncio.sleep(0)
    return x


# -- many calls, both directions -------------------------------------------------------------


async def test_thousand_concurrent_calls_get_their_own_results() -> None:
    async with connection_pair(server_handlers={"echo": echo, "aecho": aecho}) as (client, _):
        n = 1000
        results = await asyncio.gather(*(client.call("aecho" if i % 2 else "echo", i) for i in range(n)))
        assert results == list(range(n))
        assert client.stats.calls_sent == n
        assert client._pending == {}


async def nest(depth: int) -> list[str]:
    """Call the peer's ``nest`` back, ``depth`` levels deep; return who ran each level."""
    conn = current_connection()
    side = "client" if conn.is_initiator else "server"
    if depth == 0:
        return [side]
    return [side, *await conn.call("nest", depth - 1)]


_seen_in_handler: contextvars.ContextVar[str] = contextvars.ContextVar("seen_in_handler", default="")


@pytest.mark.both_loops
async def test_a_coroutine_handler_starts_at_once_in_a_task_of_its_own() -> None:
    # Coroutine handlers run up to their first await as soon as the call is read (eager start):
    # from the first line they are inside their own task and their own copy of the context.
    tasks: list[asyncio.Task[Any]] = []

    async def prefix(tag: str, suspend: bool) -> list[Any]:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        before = _seen_in_handler.get()
        _seen_in_handler.set(tag)  # must not leak into the next call's context
        async with asyncio.timeout(5 * SCALE):  # needs a current task
            async with asyncio.TaskGroup() as tg:  # so does this
                child = tg.create_task(asyncio.sleep(0, "child"))
            if suspend:
                await asyncio.sleep(0.01)
        assert asyncio.current_task() is task
        return [before, child.result(), asyncdist.current_connection() is not None]

    async with connection_pair(server_handlers={"prefix": prefix}) as (client, _):
        assert await client.call("prefix", "a", False) == ["", "child", True]
        assert await client.call("prefix", "b", True) == ["", "child", True]
        assert (
            await asyncio.gather(*(client.call("prefix", str(i), i % 2 == 0) for i in range(20)))
            == [["", "child", True]] * 20
        )
    assert len({id(t) for t in tasks}) == len(tasks) == 22
    assert all(t.done() for t in tasks)


async def test_calls_both_ways_at_once_with_nested_callbacks_do_not_deadlock() -> None:
    handlers = {"echo": echo, "aecho": aecho, "nest": nest}
    async with connection_pair(handlers, handlers) as (client, server_side):
        n = 1000
        async with asyncio.timeout(10 * SCALE):
            up, down, nested_up, nested_down = await asyncio.gather(
                asyncio.gather(*(client.call("aecho", i) for i in range(n))),
                asyncio.gather(*(server_side.call("aecho", -i) for i in range(n))),
                asyncio.gather(*(client.call("nest", 5) for _ in range(25))),
                asyncio.gather(*(server_side.call("nest", 5) for _ in range(25))),
            )
        assert up == list(range(n))
        assert down == [-i for i in range(n)]
        # client -> server(5) -> client(4) -> server(3) -> client(2) -> server(1) -> client(0)
        assert nested_up == [["server", "client"] * 3] * 25
        assert nested_down == [["client", "server"] * 3] * 25
        assert client._pending == {}
        assert server_side._pending == {}


async def test_current_connection_outside_a_handler_raises_lookup_error() -> None:
    with pytest.raises(LookupError):
        current_connection()


async def test_calls_beyond_the_peers_max_in_flight_wait_for_a_slot() -> None:
    running = 0
    most = 0

    async def work(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1
        return i

    async with connection_pair(server_handlers={"work": work}, max_in_flight=8) as (client, _):
        results = await asyncio.gather(*(client.call("work", i) for i in range(200)))
        assert results == list(range(200))
        assert most <= 8


# -- handlers and values ---------------------------------------------------------------------


def plain_kw(a: Any, b: Any = 2, *, c: Any) -> dict[str, Any]:
    return {"a": a, "b": b, "c": c, "kind": "plain"}


async def async_kw(a: Any, b: Any = 2, *, c: Any) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"a": a, "b": b, "c": c, "kind": "async"}


def takes_timeout(*, timeout: float) -> float:
    return timeout


async def test_plain_and_async_handlers_with_kwargs() -> None:
    handlers = {
        "plain_kw": plain_kw,
        "async_kw": async_kw,
        "returns_coroutine": lambda x: aecho(x),
        "takes_timeout": takes_timeout,
    }
    async with connection_pair(server_handlers=handlers) as (client, _):
        assert await client.call("plain_kw", 1, c=3) == {"a": 1, "b": 2, "c": 3, "kind": "plain"}
        assert await client.call("async_kw", 1, 5, c="x") == {"a": 1, "b": 5, "c": "x", "kind": "async"}
        assert await client.call("plain_kw", a=[1], c=None) == {"a": [1], "b": 2, "c": None, "kind": "plain"}
        # A plain function returning an awaitable: the awaitable's result is the reply.
        assert await client.call("returns_coroutine", "awaited") == "awaited"
        # A remote keyword argument named "timeout" goes through request().
        assert await client.request("takes_timeout", (), {"timeout": 7.5}) == 7.5
        # Wrong arguments: the handler's TypeError comes back, the connection stays.
        with pytest.raises(TypeError):
            await client.call("plain_kw", 1)
        assert await client.call("plain_kw", 0, c=0) == {"a": 0, "b": 2, "c": 0, "kind": "plain"}


ROUND_TRIP_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    -(2**63) - 1,
    2**64,
    3**200,
    -(7**150),
    1.5,
    float("inf"),
    "text \u00fc \u2603",
    b"\x00\xffraw bytes",
    (),
    (1, "two", (3.0, (b"4",))),
    set(),
    {1, 2, 3},
    frozenset({"a", "b"}),
    {1: "one", 2: {3: (4, 5)}, -7: [b"x", {8: None}]},
    {"a": {"b": {"c": [1, (2, {3})]}}},
    {(1, 2): "tuple key", 3: frozenset({4})},
    {"mixed": 1, 2: "keys"},
    [1, [2, [3, []]], {"k": (1,)}],
    ({1: {2: {3: 2**100}}},),
]


def assert_same(got: Any, want: Any, where: str = "value") -> None:
    """Equal and of exactly the same types, all the way down."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} instead of {type(want).__name__}"
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
        # Keys themselves keep their types too.
        for key in got:
            match = next(k for k in want if k == key)
            assert type(key) is type(match), f"{where}: key {key!r}"
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


async def test_values_round_trip_with_their_types() -> None:
    handlers = {"echo": echo, "aecho": aecho, "echo_kw": lambda *, value: value}
    async with connection_pair(server_handlers=handlers) as (client, _):
        for value in ROUND_TRIP_VALUES:
            assert_same(await client.call("echo", value), value, f"echo {value!r}")
            assert_same(await client.call("aecho", value), value, f"aecho {value!r}")
            assert_same(await client.call("echo_kw", value=value), value, f"echo_kw {value!r}")
        everything = tuple(ROUND_TRIP_VALUES)
        assert_same(await client.call("echo", everything), everything)


async def test_notify_reaches_plain_and_async_handlers() -> None:
    got: list[Any] = []
    plain_seen = asyncio.Event()
    async_seen = asyncio.Event()

    def note(x: Any, *, tag: str) -> None:
        got.append(("plain", x, tag))
        plain_seen.set()

    async def anote(x: Any) -> str:
        await asyncio.sleep(0)
        got.append(("async", x))
        async_seen.set()
        return "ignored"

    handlers = {"note": note, "anote": anote, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        assert await client.notify("note", {1: 2}, tag="t") is None
        async with asyncio.timeout(2 * SCALE):
            await plain_seen.wait()
        assert await client.notify("anote", (1, 2)) is None
        async with asyncio.timeout(2 * SCALE):
            await async_seen.wait()
        assert got == [("plain", {1: 2}, "t"), ("async", (1, 2))]
        # A notification to a missing handler is dropped; the connection stays.
        await client.notify("no_such_handler", 1)
        assert await client.call("echo", "after") == "after"
        assert server_side.stats.notifies_received == 3
        assert client._pending == {}


async def test_unknown_handler_raises_unknown_method_error() -> None:
    async with connection_pair(server_handlers={"echo": echo}) as (client, _):
        with pytest.raises(UnknownMethodError, match="no_such_method") as info:
            await client.call("no_such_method", 1)
        assert isinstance(info.value, AttributeError)
        assert not client.closed
        assert await client.call("echo", 1) == 1


# -- remote exceptions (F13, F14) --------------------------------------------------------------


class LedgerError(Exception):
    """Never registered: must arrive as RemoteError."""


class QuotaError(Exception):
    """Registered in its test: must arrive as itself."""


def lookup_account(name: str) -> None:
    raise KeyError("unknown account")


async def async_lookup_account(name: str) -> None:
    await asyncio.sleep(0)
    raise KeyError("unknown account")


async def test_remote_builtin_exception_keeps_type_args_message_and_traceback() -> None:
    calls = 0

    def counted_lookup(name: str) -> None:
        nonlocal calls
        calls += 1
        lookup_account(name)

    handlers = {"lookup": counted_lookup, "alookup": async_lookup_account, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        local = KeyError("unknown account")
        for name, function in (("lookup", "lookup_account"), ("alookup", "async_lookup_account")):
            with pytest.raises(KeyError) as info:
                await client.call(name, "bob")
            exc = info.value
            assert type(exc) is KeyError
            assert exc.args == ("unknown account",)
            assert str(exc) == str(local)
            assert function in exc.remote_traceback  # type: ignore[attr-defined]
            assert "KeyError" in exc.remote_traceback  # type: ignore[attr-defined]
        assert calls == 1, "a failing call must not be retried"
        assert not client.closed
        assert not server_side.closed
        assert await client.call("echo", "still open") == "still open"


async def test_unregistered_exception_arrives_as_remote_error() -> None:
    def ledger() -> None:
        raise LedgerError("ledger is locked")

    async with connection_pair(server_handlers={"ledger": ledger, "echo": echo}) as (client, _):
        with pytest.raises(RemoteError) as info:
            await client.call("ledger")
        exc = info.value
        assert not isinstance(exc, LedgerError)
        assert exc.type_name == f"{LedgerError.__module__}.{LedgerError.__qualname__}"
        assert exc.message == "ledger is locked"
        assert exc.remote_args == ("ledger is locked",)
        assert "def ledger" in exc.remote_traceback or "in ledger" in exc.remote_traceback
        assert await client.call("echo", 1) == 1


async def test_registered_exception_arrives_as_its_own_class() -> None:
    asyncdist.register_error(QuotaError)

    async def quota() -> None:
        raise QuotaError("quota exceeded", 3)

    async with connection_pair(server_handlers={"quota": quota, "echo": echo}) as (client, _):
        with pytest.raises(QuotaError) as info:
            await client.call("quota")
        assert type(info.value) is QuotaError
        assert info.value.args == ("quota exceeded", 3)
        assert "quota" in info.value.remote_traceback  # type: ignore[attr-defined]
        assert await client.call("echo", 1) == 1


async def test_exception_with_unserializable_argument_still_arrives() -> None:
    lock = threading.Lock()

    def fail() -> None:
        raise ValueError(lock)

    async with connection_pair(server_handlers={"fail": fail, "echo": echo}) as (client, _):
        with pytest.raises(ValueError) as info:
            await client.call("fail")
        assert str(info.value) == str(ValueError(lock))
        assert await client.call("echo", 1) == 1


async def test_unserializable_result_fails_that_call_only() -> None:
    def make_lock() -> threading.Lock:
        return threading.Lock()

    async def amake_lock() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"lock": threading.Lock()}

    handlers = {"make_lock": make_lock, "amake_lock": amake_lock, "aecho": aecho}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        results = await asyncio.gather(
            client.call("aecho", 1),
            client.call("make_lock"),
            client.call("aecho", 2),
            client.call("amake_lock"),
            client.call("aecho", 3),
            return_exceptions=True,
        )
        assert results[0::2] == [1, 2, 3]
        assert isinstance(results[1], SerializationError), results[1]
        assert isinstance(results[3], SerializationError), results[3]
        assert not client.closed
        assert not server_side.closed
        assert await client.call("aecho", "after") == "after"


async def test_unserializable_argument_raises_locally_and_leaks_no_id() -> None:
    async with connection_pair(server_handlers={"echo": echo}) as (client, _):
        with pytest.raises(SerializationError):
            await client.call("echo", threading.Lock())
        assert client._pending == {}
        assert await client.call("echo", 1) == 1


# -- timeouts and cancellation (F12) ---------------------------------------------------------


def cancellable(started: asyncio.Event, cancelled: asyncio.Event) -> Callable[..., Any]:
    async def slow(seconds: float = 30.0) -> str:
        started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "finished"

    return slow


async def test_call_timeout_raises_timeout_error_and_cancels_the_remote_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    handlers = {"slow": cancellable(started, cancelled), "echo": echo}
    async with connection_pair(server_handlers=handlers, close_timeout=1.0 * SCALE) as (client, server_side):
        assert await client.call("slow", 0, timeout=5 * SCALE) == "finished"
        started.clear()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await client.call("slow", timeout=0.1 * SCALE)
        assert loop.time() - t0 < 1.0 * SCALE
        assert started.is_set()
        await eventually(cancelled.is_set, "the remote handler was not cancelled after the caller's timeout")
        assert client._pending == {}, "the timed-out call's id is still pending"
        await eventually(lambda: not server_side._call_tasks, "server still tracks the timed-out call")
        assert await client.call("echo", 1) == 1


async def test_cancelling_the_caller_cancels_the_remote_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    handlers = {"slow": cancellable(started, cancelled), "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        task = asyncio.create_task(client.call("slow"))
        async with asyncio.timeout(2 * SCALE):
            await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(cancelled.is_set, "the remote handler did not get CancelledError", timeout=1.0)
        assert client._pending == {}
        await eventually(lambda: not server_side._call_tasks, "server still tracks the cancelled call")
        assert not client.closed
        assert await client.call("echo", 1) == 1


@pytest.mark.both_loops
async def test_a_handler_returning_a_future_is_answered_when_it_is_done() -> None:
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[Any]] = []

    def later(x: int) -> asyncio.Future[Any]:
        fut = loop.create_future()
        pending.append(fut)
        return fut

    def in_thread(x: int) -> asyncio.Future[Any]:
        return loop.run_in_executor(None, lambda: x * 2)

    handlers = {"later": later, "in_thread": in_thread, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        assert await client.call("in_thread", 21) == 42
        # A value, an exception, a cancellation by the handler's side, a cancellation by the caller.
        calls = [asyncio.create_task(client.call("later", i)) for i in range(4)]
        await eventually(lambda: len(pending) == 4, "the handlers did not all run")
        pending[0].set_result("value")
        pending[1].set_exception(KeyError("gone"))
        pending[2].cancel()
        assert await calls[0] == "value"
        with pytest.raises(KeyError, match="gone"):
            await calls[1]
        with pytest.raises(asyncdist.RemoteError, match="CancelledError"):  # as for a cancelled task
            await calls[2]
        calls[3].cancel()
        with pytest.raises(asyncio.CancelledError):
            await calls[3]
        await eventually(pending[3].cancelled, "the caller's cancel did not cancel the future")
        await eventually(lambda: not server_side._call_tasks, "the server still tracks a finished call")
        assert not server_side._tasks
        assert await client.call("echo", 1) == 1


async def test_cancel_racing_completion_gives_result_or_cancelled_and_leaks_no_ids() -> None:
    rng = random.Random(20240611)

    async def quick(i: int, delay: float) -> int:
        if delay:
            await asyncio.sleep(delay)
        return i

    handlers = {"quick": quick, "echo": lambda i, delay: i}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        outcomes = {"result": 0, "cancelled": 0}
        for i in range(300):
            name = "echo" if i % 4 == 3 else "quick"
            delay = rng.choice([0.0, rng.uniform(0, 0.002)])
            task = asyncio.create_task(client.call(name, i, delay))
            if i < 100:
                # A sweep over every point of the first loop iterations (deterministic).
                for _ in range(i % 10):
                    await asyncio.sleep(0)
            elif i % 2:
                for _ in range(rng.randrange(0, 10)):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(rng.uniform(0, 0.003))
            task.cancel()
            what = f"call {i} ({name}, delay {delay:.4f}) neither returned nor was cancelled"
            await finish(task, 2.0, what)
            if task.cancelled():
                outcomes["cancelled"] += 1
            else:
                assert task.result() == i  # any other exception fails the test here
                outcomes["result"] += 1
        assert outcomes["result"] > 0, outcomes
        assert outcomes["cancelled"] > 0, outcomes
        assert client._pending == {}
        assert client._streams == {}
        assert not client._slot_waiters
        with contextlib.suppress(TimeoutError):
            await poll_for(lambda: not server_side._call_tasks and not server_side._incoming, 2 * SCALE)
        leaked = sorted(server_side._call_tasks)
        assert not leaked, f"{len(leaked)} call ids leaked in the server's _call_tasks: {leaked[:10]}"
        assert not server_side._incoming, (
            f"call ids leaked in _incoming: {sorted(server_side._incoming)[:10]}"
        )
        assert not server_side._peer_cancelled
        assert not client.closed
        assert not server_side.closed
        assert await client.call("echo", "ok", 0) == "ok"


# -- streams ---------------------------------------------------------------------------------


async def agen(n: int, *, start: int = 0) -> AsyncIterator[int]:
    for i in range(start, start + n):
        await asyncio.sleep(0)
        yield i


def gen(n: int, *, start: int = 0) -> Iterator[int]:
    yield from range(start, start + n)


async def test_stream_yields_every_item_in_order() -> None:
    handlers = {"agen": agen, "gen": gen}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        for name in ("agen", "gen"):
            assert [x async for x in client.stream(name, 500)] == list(range(500))
            assert [x async for x in client.stream(name, 10, start=5, credit=3)] == list(range(5, 15))
            assert [x async for x in client.stream(name, 0)] == []
        assert client._streams == {}
        await eventually(lambda: not server_side._call_tasks, "producer tasks left on the server")


async def test_stream_backpressure_stops_the_producer_at_the_credit() -> None:
    produced = 0

    async def numbers(n: int) -> AsyncIterator[int]:
        nonlocal produced
        for i in range(n):
            produced += 1
            yield i

    credit = 4
    async with connection_pair(server_handlers={"numbers": numbers, "echo": echo}) as (client, _):
        async with client.stream("numbers", 100, credit=credit) as st:
            first = await anext(st)
            await eventually(lambda: produced >= credit, "the producer did not start")
            # Many round trips: a producer ignoring credit would have sent more by now.
            for _ in range(20):
                await client.call("echo", None)
            assert credit <= produced <= credit + 1, f"producer ran ahead: {produced} items"
            assert len(st._items) == credit - 1
            rest = [x async for x in st]
        assert [first, *rest] == list(range(100))
        assert produced == 100


@pytest.mark.parametrize("kind", ["async", "plain"])
async def test_leaving_a_stream_early_runs_the_remote_generators_finally(kind: str) -> None:
    cleaned = asyncio.Event()

    async def aforever() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    def forever() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    handlers = {"forever": aforever if kind == "async" else forever, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        got = []
        async with client.stream("forever", credit=4) as st:
            async for x in st:
                got.append(x)
                if x == 10:
                    break
        assert got == list(range(11))
        await eventually(cleaned.is_set, "the remote generator's finally did not run")
        await eventually(
            lambda: not server_side._call_tasks and not server_side._producers,
            "the producer is still tracked on the server",
        )
        assert client._streams == {}
        assert await client.call("echo", 1) == 1


async def test_breaking_out_of_a_bare_async_for_cancels_the_remote_generator() -> None:
    cleaned = asyncio.Event()

    async def forever() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    async with connection_pair(server_handlers={"forever": forever, "echo": echo}) as (client, server_side):

        async def first_three() -> list[int]:
            got = []
            async for x in client.stream("forever", credit=4):
                got.append(x)
                if len(got) == 3:
                    break
            return got

        assert await first_three() == [0, 1, 2]
        gc.collect()
        await eventually(cleaned.is_set, "the remote generator still runs after `break` (no async with)")
        assert client._streams == {}, "the abandoned stream still holds a call slot"
        await eventually(lambda: not server_side._call_tasks, "the producer is still tracked on the server")


async def test_closing_a_stream_at_any_moment_leaks_nothing() -> None:
    handlers = {"agen": agen, "gen": gen, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        for i in range(60):
            st = client.stream("agen" if i % 2 else "gen", 5, credit=2)
            task = asyncio.create_task(anext(st))
            for _ in range(i % 10):
                await asyncio.sleep(0)
            task.cancel()
            await finish(task, 2.0, f"stream {i}: first item neither arrived nor was cancelled")
            assert task.cancelled() or task.result() == 0
            await st.aclose()
        assert client._streams == {}
        with contextlib.suppress(TimeoutError):
            await poll_for(lambda: not server_side._call_tasks and not server_side._producers, 2 * SCALE)
        assert not server_side._call_tasks, f"producers leaked: {sorted(server_side._call_tasks)[:10]}"
        assert not server_side._producers
        assert not server_side._incoming
        assert await client.call("echo", 1) == 1


async def test_cancelling_a_stream_consumer_cancels_the_remote_generator() -> None:
    cleaned = asyncio.Event()
    waiting = asyncio.Event()

    async def stalls() -> AsyncIterator[int]:
        try:
            yield 0
            waiting.set()
            await asyncio.Event().wait()
            yield 1
        finally:
            cleaned.set()

    async with connection_pair(server_handlers={"stalls": stalls, "echo": echo}) as (client, server_side):
        got: list[int] = []

        async def consume() -> None:
            async for x in client.stream("stalls"):
                got.append(x)

        task = asyncio.create_task(consume())
        async with asyncio.timeout(2 * SCALE):
            await waiting.wait()
        await eventually(lambda: got == [0], "the first item did not arrive")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(cleaned.is_set, "the remote generator was not cancelled")
        assert client._streams == {}
        await eventually(lambda: not server_side._call_tasks, "the producer is still tracked on the server")


async def test_exception_inside_the_generator_reaches_the_consumer() -> None:
    async def failing(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ValueError("item source broke")

    def pfailing(n: int) -> Iterator[int]:
        yield from range(n)
        raise KeyError("missing item")

    handlers = {"failing": failing, "pfailing": pfailing, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, _):
        got = []
        with pytest.raises(ValueError, match="item source broke") as info:
            await collect(client.stream("failing", 3), got)
        assert got == [0, 1, 2]
        assert "failing" in info.value.remote_traceback  # type: ignore[attr-defined]
        got = []
        with pytest.raises(KeyError) as kinfo:
            await collect(client.stream("pfailing", 2), got)
        assert got == [0, 1]
        assert kinfo.value.args == ("missing item",)
        assert client._streams == {}
        assert await client.call("echo", 1) == 1


async def test_call_on_a_stream_handler_and_stream_on_a_value_handler_raise_type_error() -> None:
    async def value() -> int:
        return 42

    handlers = {"agen": agen, "gen": gen, "value": value, "pvalue": lambda: 42, "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        with pytest.raises(TypeError, match="stream"):
            await client.call("agen", 3)
        with pytest.raises(TypeError):
            await client.call("gen", 3)
        for name in ("value", "pvalue"):
            with pytest.raises(TypeError):
                await collect(client.stream(name))
        assert client._pending == {}
        assert client._streams == {}
        assert not client.closed
        assert await client.call("echo", 1) == 1
        await eventually(lambda: not server_side._call_tasks, "calls still tracked on the server")


# -- heartbeats (F4, F5, F6) -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def peer_process() -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """Start ``tests/_peer.py`` (a server in its own process); yield it and its port; reap it."""
    proc = subprocess.Popen(
        [sys.executable, str(PEER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=PEER.parent.parent,
    )
    try:
        assert proc.stdout is not None
        out = proc.stdout

        def ready() -> bool:
            return bool(select.select([out], [], [], 0)[0])

        await eventually(ready, "the peer process did not print its port", timeout=20.0)
        line = out.readline()
        assert line, f"the peer process exited early with status {proc.wait()}"
        yield proc, int(line)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


async def test_frozen_peer_is_declared_dead_within_the_heartbeat_bound(fast: dict[str, float]) -> None:
    async with peer_process() as (proc, port), asyncdist.connect(port=port, **fast) as conn:
        assert await conn.call("echo", "hi") == "hi"
        assert await conn.call("pid") == proc.pid
        pending = asyncio.create_task(conn.call("sleep", 60))
        loop = asyncio.get_running_loop()
        proc.send_signal(signal.SIGSTOP)
        t0 = loop.time()
        bound = fast["heartbeat_timeout"] + 2 * fast["heartbeat_interval"] + 0.5 * SCALE
        await finish(pending, bound + 2.0, "a call to a frozen peer")
        elapsed = loop.time() - t0
        with pytest.raises(ConnectionClosedError):
            pending.result()
        assert elapsed <= bound, f"frozen peer detected after {elapsed:.2f} s (bound {bound:.2f} s)"
        assert isinstance(conn.close_exception, ConnectionClosedError)
        with pytest.raises(ConnectionClosedError):
            await conn.call("echo", 1)


async def test_killed_peer_fails_pending_calls_promptly() -> None:
    # Default (slow) heartbeat: the failure must come from the socket closing, not a timer.
    async with peer_process() as (proc, port), asyncdist.connect(port=port) as conn:
        assert await conn.call("echo", "hi") == "hi"
        pending = [asyncio.create_task(conn.call("sleep", 60)) for _ in range(5)]
        assert await conn.call("echo", "sent") == "sent"  # the sleeps are running remotely
        loop = asyncio.get_running_loop()
        proc.kill()
        t0 = loop.time()
        for task in pending:
            await finish(task, 3.0, "a call to a killed peer")
            with pytest.raises(ConnectionClosedError):
                task.result()
        assert loop.time() - t0 < 2.0 * SCALE
        assert conn.closed
        with pytest.raises(ConnectionClosedError):
            await conn.call("echo", 1)


async def test_half_open_link_is_detected_by_both_sides(fast: dict[str, float]) -> None:
    accepted: list[asyncdist.Connection] = []

    async def sleep(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    handlers = {"echo": echo, "sleep": sleep}
    async with (
        asyncdist.serve(handlers, on_connect=accepted.append, **fast) as server,
        FaultProxy(server.port) as proxy,
        asyncdist.connect(port=proxy.port, **fast) as client,
    ):
        assert await client.call("echo", 1) == 1
        await eventually(lambda: len(accepted) == 1, "the server did not accept the connection")
        server_side = accepted[0]
        pending = asyncio.create_task(client.call("sleep", 60))
        loop = asyncio.get_running_loop()
        proxy.blackhole()
        t0 = loop.time()
        bound = fast["heartbeat_timeout"] + 2 * fast["heartbeat_interval"] + 0.5 * SCALE
        async with asyncio.timeout(bound + 2.0 * SCALE):
            await client.wait_closed()
            await server_side.wait_closed()
        elapsed = loop.time() - t0
        assert elapsed <= bound, f"half-open link detected after {elapsed:.2f} s (bound {bound:.2f} s)"
        assert isinstance(client.close_exception, ConnectionClosedError)
        assert isinstance(server_side.close_exception, ConnectionClosedError)
        await finish(pending, 1.0, "a call over a half-open link")
        with pytest.raises(ConnectionClosedError):
            pending.result()
        await eventually(lambda: not server.connections, "the server still lists the dead connection")


async def test_long_running_handler_does_not_cause_a_false_death(fast: dict[str, float]) -> None:
    async def long(tag: str) -> str:
        await asyncio.sleep(3 * fast["heartbeat_timeout"])
        return tag

    handlers = {"long": long}
    async with connection_pair(handlers, handlers, **fast) as (client, server_side):
        up, down = await asyncio.gather(client.call("long", "up"), server_side.call("long", "down"))
        assert (up, down) == ("up", "down")
        assert not client.closed
        assert not server_side.closed
        assert client.rtt is not None
        assert server_side.rtt is not None


# -- closing ---------------------------------------------------------------------------------


async def test_graceful_close_waits_for_calls_in_flight() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "finished"

    async with connection_pair(server_handlers={"slow": slow}) as (client, server_side):
        call = asyncio.create_task(client.call("slow"))
        async with asyncio.timeout(2 * SCALE):
            await started.wait()
        closing = asyncio.create_task(client.close())
        await eventually(lambda: client.closed, "close() did not start")
        assert not call.done()
        assert not closing.done()
        with pytest.raises(ConnectionClosedOK):
            await client.call("slow")
        release.set()
        assert await asyncio.wait_for(call, 2 * SCALE) == "finished"
        await asyncio.wait_for(closing, 2 * SCALE)
        assert isinstance(client.close_exception, ConnectionClosedOK)
        await asyncio.wait_for(server_side.wait_closed(), 2 * SCALE)
        assert isinstance(server_side.close_exception, ConnectionClosedOK)


async def test_close_is_idempotent_and_close_callbacks_run_once() -> None:
    seen: list[asyncdist.Connection] = []
    server_seen: list[asyncdist.Connection] = []
    async with connection_pair(server_handlers={"echo": echo, "gen": gen}) as (client, server_side):
        client.add_close_callback(seen.append)
        server_side.add_close_callback(server_seen.append)
        await asyncio.gather(client.close(), client.close())
        await client.close()
        client.abort()
        await client.wait_closed()
        assert seen == [client]
        late: list[asyncdist.Connection] = []
        client.add_close_callback(late.append)
        assert late == [client]
        assert isinstance(client.close_exception, ConnectionClosedOK)
        with pytest.raises(ConnectionClosedOK):
            await client.call("echo", 1)
        with pytest.raises(ConnectionClosedOK):
            await client.notify("echo", 1)
        with pytest.raises(ConnectionClosedOK):
            await collect(client.stream("gen", 1))
        await asyncio.wait_for(server_side.wait_closed(), 2 * SCALE)
        assert server_seen == [server_side]
        assert isinstance(server_side.close_exception, ConnectionClosedOK)
        with pytest.raises(ConnectionClosedOK):
            await server_side.call("echo", 1)
        await server_side.close()
        assert server_seen == [server_side]


async def test_peer_closing_gracefully_completes_or_fails_pending_calls_with_closed_ok() -> None:
    finishing, stuck, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def finishes() -> str:
        finishing.set()
        await release.wait()
        return "done"

    async def never() -> None:
        stuck.set()
        await asyncio.Event().wait()

    handlers = {"finishes": finishes, "never": never}
    async with connection_pair(server_handlers=handlers, close_timeout=0.3 * SCALE) as (
        client,
        server_side,
    ):
        a = asyncio.create_task(client.call("finishes"))
        b = asyncio.create_task(client.call("never"))
        async with asyncio.timeout(2 * SCALE):
            await finishing.wait()
            await stuck.wait()
        closing = asyncio.create_task(server_side.close())
        await eventually(lambda: server_side.closed, "the server side did not start closing")
        release.set()
        await finish(a, 3.0, "a call the closing peer finished")
        await finish(b, 3.0, "a call the closing peer never finished")
        assert a.result() == "done"
        with pytest.raises(ConnectionClosedOK):
            b.result()
        await asyncio.wait_for(closing, 2 * SCALE)
        await asyncio.wait_for(client.wait_closed(), 2 * SCALE)
        assert isinstance(client.close_exception, ConnectionClosedOK)
        with pytest.raises(ConnectionClosedOK):
            await client.call("finishes")


async def test_abort_fails_pending_calls_with_closed_error() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    handlers = {"slow": cancellable(started, cancelled), "echo": echo}
    async with connection_pair(server_handlers=handlers) as (client, server_side):
        pending = asyncio.create_task(client.call("slow"))
        async with asyncio.timeout(2 * SCALE):
            await started.wait()
        client.abort()
        await finish(pending, 2.0, "a call pending when the connection was aborted")
        with pytest.raises(ConnectionClosedError):
            pending.result()
        await asyncio.wait_for(client.wait_closed(), 2 * SCALE)
        assert isinstance(client.close_exception, ConnectionClosedError)
        with pytest.raises(ConnectionClosedError):
            await client.call("echo", 1)
        client.abort()
        await client.close()
        # The peer notices, and the handler it was running is cancelled.
        await asyncio.wait_for(server_side.wait_closed(), 2 * SCALE)
        assert isinstance(server_side.close_exception, ConnectionClosedError)
        await eventually(cancelled.is_set, "the server's handler was not cancelled")


async def test_closing_fails_an_open_stream_with_closed_ok() -> None:
    async def forever() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    async with connection_pair(server_handlers={"forever": forever}) as (client, _):
        st = client.stream("forever", credit=2)
        assert await anext(st) == 0
        await asyncio.wait_for(client.close(), 3 * SCALE)
        with pytest.raises(ConnectionClosedOK):
            await collect(st)


async def test_wait_closed_returns_once_every_task_is_done() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    handlers = {"slow": cancellable(started, cancelled)}
    async with connection_pair(handlers, handlers) as (client, server_side):
        pending = asyncio.create_task(server_side.call("slow"))
        async with asyncio.timeout(2 * SCALE):
            await started.wait()
        waiter = asyncio.create_task(client.wait_closed())
        await asyncio.sleep(0)
        assert not waiter.done()
        server_side.abort()
        await asyncio.wait_for(waiter, 2 * SCALE)
        assert cancelled.is_set()  # the client's handler task ended before wait_closed() returned
        assert not client._tasks
        await finish(pending, 1.0, "a call pending on an aborted connection")
        with pytest.raises(ConnectionClosedError):
            pending.result()
