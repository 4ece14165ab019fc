"""Symmetric RPC (``asyncdist.rpc``, RPyC on asyncio), over real sockets.

Services (``exposed_`` names, ``@rpc.exposed``, hooks, instances per
connection), serving and connecting (both forms, closing, Unix sockets,
secrets), calls in both directions (callbacks, deep recursion, many at
once), netrefs (members, chains, iteration, identity, forwarding to a third
connection, release by count), the access rules, one-way calls, timeouts
and cancellation, blocking methods in threads, remote errors, and the
``asyncdist rpc`` command (a real subprocess).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE, eventually, stop

from asyncdist import (
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    RemoteError,
    UnknownObjectError,
    rpc,
)

#: Upper bound for anything a test waits for (a safety net: tests set their events).
BOUND = 5.0 * SCALE


# -- objects and services ------------------------------------------------------------------------


class Inner:
    """Reached as ``thing.a``: ``b`` is exposed, ``hidden`` is not."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def exposed_b(self, x: Any) -> str:
        self.log.append(x)
        return f"b{x}"

    def hidden(self) -> str:
        self.log.append("hidden")
        return "hidden"


class Thing:
    """A plain object (not of msgpack's types): it travels by reference."""

    def __init__(self, value: int = 1) -> None:
        self.x = value
        self._hidden = "hidden"
        self.exposed_a = Inner()
        self.exposed_count = 0
        self.log: list[str] = []

    def exposed_get(self) -> int:
        return self.x

    @rpc.exposed
    def double(self, y: int) -> int:
        return 2 * y

    @rpc.exposed
    @property
    def value(self) -> int:
        return self.x

    def secret(self) -> str:
        self.log.append("secret")
        return "secret"

    def __len__(self) -> int:
        return 3

    def __str__(self) -> str:
        return "thing-str"

    def __repr__(self) -> str:
        return "thing-repr"

    def __iter__(self) -> Iterator[int]:
        return iter([10, 20, 30])


class Ticker:
    """An async iterable (only ``__aiter__``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def _gen(self) -> AsyncIterator[int]:
        for i in range(self.n):
            await asyncio.sleep(0)
            yield i

    def __aiter__(self) -> AsyncIterator[int]:
        return self._gen()


class Dotty:
    """Follows dotted names itself, as some proxy objects do."""

    def __init__(self) -> None:
        self.inner = "public"

    def __getattr__(self, name: str) -> Any:
        if "." not in name:
            raise AttributeError(name)
        obj: Any = self
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


def module_function(x: int) -> int:
    return x + 100


class Echo(rpc.Service):
    """The main test service (one instance per connection when the class is served)."""

    exposed_version = "1.0"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.things: list[weakref.ref[Thing]] = []
        self.kept: Any = None
        self.setting = "unchanged"
        self.exposed_setting = "initial"

    def exposed_echo(self, x: Any) -> Any:
        return x

    @rpc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b

    @rpc.exposed
    @property
    def ident(self) -> int:
        return id(self)

    def not_exposed(self) -> str:
        self.log.append("not_exposed")
        return "not_exposed"

    def _private(self) -> str:
        self.log.append("_private")
        return "_private"

    def exposed_thing(self, value: int = 1) -> Thing:
        thing = Thing(value)
        self.things.append(weakref.ref(thing))
        return thing

    def exposed_is_thing(self, obj: Any, index: int) -> bool:
        return obj is self.things[index]()

    def exposed_fail(self, message: str) -> None:
        raise ValueError(message)

    def exposed_function(self) -> Any:
        return module_function

    def exposed_big(self, n: int) -> range:
        return range(n)

    def exposed_ticker(self, n: int) -> Ticker:
        return Ticker(n)

    async def exposed_apply(self, f: Any, *args: Any) -> Any:
        return await f(*args)

    def exposed_keep(self, x: Any) -> None:
        self.kept = x

    def exposed_give_back(self) -> Any:
        kept, self.kept = self.kept, None
        return kept

    def exposed_forget(self) -> None:
        self.kept = None

    def exposed_failing_numbers(self) -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("stopped at 2")

    async def exposed_read_x(self, obj: Any) -> Any:
        return await obj.x


def session(server: rpc.Server) -> rpc.Connection:
    """The server side of the one connection to ``server``."""
    connections = server.connections
    assert len(connections) == 1, connections
    return connections[0]


def live_ids(conn: rpc.Connection) -> set[int]:
    """Object ids in a side's table (0 is its service)."""
    return set(conn._objects)


@contextlib.asynccontextmanager
async def pair(
    service: Any = Echo,
    *,
    client: Any = rpc.Service,
    client_options: dict[str, Any] | None = None,
    **server_options: Any,
) -> AsyncIterator[tuple[rpc.Server, rpc.Connection]]:
    """A server on a free port and one client connected to it; both closed on exit."""
    async with (
        rpc.serve(service, port=0, **server_options) as server,
        rpc.connect(port=server.port, service=client, **(client_options or {})) as conn,
    ):
        yield server, conn


# -- services ------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_exposed_methods_attributes_and_decorated_members() -> None:
    async with pair() as (_, conn):
        root = conn.root
        assert await root.echo(1) == 1
        assert await root.echo({"a": [1, 2.5, "x", b"y", None, True]}) == {
            "a": [1, 2.5, "x", b"y", None, True]
        }
        assert await root.version == "1.0"  # exposed_ attribute
        assert await rpc.getattr(root, "version") == "1.0"
        assert await root.add(2, b=3) == 5  # @rpc.exposed method, with a keyword argument
        assert isinstance(await root.ident, int)  # @rpc.exposed property
        assert await root.exposed_echo("by full name") == "by full name"
        with pytest.raises(AttributeError, match="not exposed"):
            await root.not_exposed()


class Hooks(rpc.Service):
    """Records its hooks; the async variant below awaits in both."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.conns: list[Any] = []
        self.disconnected = asyncio.Event()

    def on_connect(self, conn: Any) -> None:
        self.events.append("connect")
        self.conns.append(conn)

    def on_disconnect(self, conn: Any) -> None:
        self.events.append("disconnect")
        self.conns.append(conn)
        self.disconnected.set()

    def exposed_events(self) -> list[str]:
        return self.events

    def exposed_mark(self) -> None:
        self.events.append("mark")


class AsyncHooks(Hooks):
    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def on_connect(self, conn: Any) -> None:
        self.events.append("connect-start")
        self.conns.append(conn)
        self.entered.set()
        await self.release.wait()
        self.events.append("connect-end")

    async def on_disconnect(self, conn: Any) -> None:
        await asyncio.sleep(0)
        self.events.append("disconnect")
        self.disconnected.set()


async def test_sync_hooks_run_on_connect_and_when_the_client_closes() -> None:
    made: list[Hooks] = []

    def factory() -> Hooks:
        made.append(Hooks())
        return made[-1]

    async with rpc.serve(factory, port=0) as server:
        conn = await rpc.connect(port=server.port)
        assert await conn.root.events() == ["connect"]
        [hooks] = made
        assert isinstance(hooks.conns[0], rpc.Connection)
        assert hooks.conns[0] is session(server)
        await conn.close()
        async with asyncio.timeout(BOUND):
            await hooks.disconnected.wait()
        assert hooks.events == ["connect", "disconnect"]
        assert hooks.conns[0] is hooks.conns[1]  # the same rpc.Connection in both hooks
        await eventually(lambda: server.connections == [], "the server still lists the closed connection")


async def test_async_on_connect_delays_the_peers_calls_until_it_finishes() -> None:
    hooks = AsyncHooks()
    async with pair(hooks) as (_, conn):
        async with asyncio.timeout(BOUND):
            await hooks.entered.wait()
        call = asyncio.ensure_future(conn.root.events())
        # A barrier: the peer answers an unknown handler at once (no gate), and in order.
        barrier = asyncio.ensure_future(conn.conn.call("no-such-handler"))  # sent after the above
        with pytest.raises(AttributeError):
            await barrier
        assert not call.done(), "a call ran before the async on_connect finished"
        hooks.release.set()
        assert await asyncio.wait_for(call, BOUND) == ["connect-start", "connect-end"]
    async with asyncio.timeout(BOUND):
        await hooks.disconnected.wait()
    assert hooks.events[-1] == "disconnect"


async def test_async_on_connect_delays_iteration_too() -> None:
    class Gated(AsyncHooks):
        exposed_items = (1, 2, 3)

    hooks = Gated()
    async with pair(hooks) as (_, conn):
        async with asyncio.timeout(BOUND):
            await hooks.entered.wait()

        async def collect() -> list[int]:
            return [x async for x in conn.root.items]

        items = asyncio.ensure_future(collect())
        barrier = asyncio.ensure_future(conn.conn.call("no-such-handler"))  # sent after the above
        with pytest.raises(AttributeError):
            await barrier
        assert not items.done(), "an iteration ran before the async on_connect finished"
        hooks.release.set()
        assert await asyncio.wait_for(items, BOUND) == [1, 2, 3]


async def test_a_failing_on_connect_closes_that_connection_only() -> None:
    made: list[Hooks] = []

    class RefusesFirst(Hooks):
        def on_connect(self, conn: Any) -> None:
            super().on_connect(conn)
            if len(made) == 1:
                raise RuntimeError("not the first one")

    def factory() -> Hooks:
        made.append(RefusesFirst())
        return made[-1]

    async with rpc.serve(factory, port=0) as server:
        with pytest.raises(ConnectionClosed):
            async with rpc.connect(port=server.port) as refused:
                await refused.root.events()
        async with rpc.connect(port=server.port) as conn:
            assert await conn.root.events() == ["connect"]
        assert len(made) == 2


async def test_a_failing_async_on_connect_fails_the_calls_waiting_for_it() -> None:
    class FailsLater(AsyncHooks):
        async def on_connect(self, conn: Any) -> None:
            self.entered.set()
            await self.release.wait()
            raise RuntimeError("changed my mind")

    hooks = FailsLater()
    async with rpc.serve(hooks, port=0) as server:
        conn = await rpc.connect(port=server.port)
        async with asyncio.timeout(BOUND):
            await hooks.entered.wait()
        call = asyncio.ensure_future(conn.root.mark())
        barrier = asyncio.ensure_future(conn.conn.call("no-such-handler"))
        with pytest.raises(AttributeError):
            await barrier
        hooks.release.set()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(call, BOUND)
        await conn.close()
        assert "mark" not in hooks.events  # the waiting call was refused, not run
        await eventually(lambda: server.connections == [], "the failed connection is still listed")


async def test_a_class_gives_one_instance_per_connection_an_instance_is_shared() -> None:
    async with (
        rpc.serve(Echo, port=0) as server,
        rpc.connect(port=server.port) as c1,
        rpc.connect(port=server.port) as c2,
    ):
        id1, id2 = await c1.root.ident, await c2.root.ident
        assert id1 != id2
        await c1.root.keep("only c1")
        assert await c2.root.give_back() is None
        assert await c1.root.give_back() == "only c1"
        assert {id(s.service) for s in server.connections} == {id1, id2}
    shared = Echo()
    async with (
        rpc.serve(shared, port=0) as server,
        rpc.connect(port=server.port) as c1,
        rpc.connect(port=server.port) as c2,
    ):
        assert await c1.root.ident == await c2.root.ident == id(shared)
        await c1.root.keep("from c1")
        assert await c2.root.give_back() == "from c1"


# -- serving and connecting ----------------------------------------------------------------------


async def test_awaitable_forms_and_idempotent_close() -> None:
    server = await rpc.serve(Echo, port=0)
    try:
        assert server.address == ("127.0.0.1", server.port)
        assert server.port > 0
        conn = await rpc.connect("127.0.0.1", server.port)
        assert not conn.closed
        assert isinstance(conn.root, rpc.Netref)
        assert isinstance(conn.service, rpc.Service)
        assert await conn.root.echo(1) == 1
        thing = await conn.root.thing()
        await conn.close()
        assert conn.closed
        with pytest.raises(ConnectionClosed):
            await thing.get()
        with pytest.raises(ConnectionClosed):
            thing.get.oneway()
        await conn.close()  # idempotent
        await conn.aclose()
        await conn.wait_closed()
        with pytest.raises(ConnectionClosed):
            await conn.root.echo(1)
    finally:
        server.close()
        server.close()  # idempotent
        await server.wait_closed()
    with pytest.raises(ConnectError):
        await rpc.connect(port=server.port)


async def test_server_close_closes_its_connections() -> None:
    hooks = Hooks()
    server = await rpc.serve(hooks, port=0)
    conn = await rpc.connect(port=server.port)
    assert await conn.root.events() == ["connect"]
    assert len(server.connections) == 1
    server.close()
    await server.wait_closed()
    assert hooks.disconnected.is_set(), "wait_closed returned before on_disconnect ran"
    await eventually(lambda: conn.closed, "the client did not see the server close")
    with pytest.raises(ConnectionClosed):
        await conn.root.events()
    await conn.close()


async def test_serve_forever_ends_when_cancelled() -> None:
    server = await rpc.serve(Echo, port=0)
    forever = asyncio.ensure_future(server.serve_forever())
    async with rpc.connect(port=server.port) as conn:
        assert await conn.root.echo("up") == "up"
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever
    with pytest.raises(ConnectError):
        await rpc.connect(port=server.port)


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with rpc.serve(Echo, path=path) as server:
        assert str(server.address) == str(path)
        async with rpc.connect(path=path) as conn:
            assert await conn.root.echo(1) == 1
            assert await conn.root.apply(lambda x: x * 3, 2) == 6  # callbacks over the socket too
    assert not path.exists()


async def test_secret_on_both_sides_and_wrong_or_missing_secret(secret: str) -> None:
    async with rpc.serve(Echo, port=0, secret=secret) as server:
        async with rpc.connect(port=server.port, secret=secret) as conn:
            assert await conn.root.echo(1) == 1
        with pytest.raises(AuthenticationError):
            await rpc.connect(port=server.port, secret="wrong-" + secret)
        with pytest.raises(AuthenticationError):
            await rpc.connect(port=server.port)
        assert server.connections == []
        async with rpc.connect(port=server.port, secret=secret) as conn:  # still serving
            assert await conn.root.echo(2) == 2


# -- calls in both directions --------------------------------------------------------------------


class PingServer(rpc.Service):
    def on_connect(self, conn: Any) -> None:
        self.peer = conn.root

    async def exposed_ping(self, n: int) -> list[str]:
        if n == 0:
            return ["server"]
        return ["server", *await self.peer.pong(n - 1)]

    async def exposed_ask_name(self) -> str:
        return "client is " + await self.peer.name()


class PongClient(rpc.Service):
    def on_connect(self, conn: Any) -> None:
        self.peer = conn.root

    def exposed_name(self) -> str:
        return "pong-client"

    async def exposed_pong(self, n: int) -> list[str]:
        if n == 0:
            return ["client"]
        return ["client", *await self.peer.ping(n - 1)]


@pytest.mark.both_loops
async def test_server_calls_the_clients_service_during_a_call() -> None:
    async with pair(PingServer, client=PongClient) as (server, conn):
        assert await conn.root.ask_name() == "client is pong-client"
        assert isinstance(conn.service, PongClient)
        assert await session(server).root.name() == "pong-client"  # the server side's root


@pytest.mark.both_loops
async def test_recursion_alternating_sides_without_deadlock() -> None:
    depth = 40
    async with pair(PingServer, client=PongClient) as (_, conn):
        async with asyncio.timeout(BOUND * 2):
            chain = await conn.root.ping(depth)
        assert len(chain) == depth + 1
        assert chain == ["server", "client"] * (depth // 2) + ["server"]


class Multiplier:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def times(self, x: int) -> int:
        return x * self.factor


async def test_server_calls_functions_the_client_passed() -> None:
    async def async_double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async with pair() as (_, conn):
        assert await conn.root.apply(lambda x, y: x - y, 10, 3) == 7
        assert await conn.root.apply(Multiplier(5).times, 3) == 15
        assert await conn.root.apply(async_double, 21) == 42
        assert await conn.root.apply(conn.root.add, 1, 2) == 3  # its own member, sent back
        # The callback's exception crosses twice and arrives as itself.
        with pytest.raises(ZeroDivisionError):
            await conn.root.apply(lambda: 1 / 0)


async def test_many_concurrent_calls_each_with_callbacks() -> None:
    async def slow_add(x: int, i: int) -> int:
        await asyncio.sleep(0)
        return x + i

    async with pair() as (_, conn):
        calls = []
        for i in range(200):
            if i % 2:
                calls.append(conn.root.apply(lambda x, i=i: x * i, 2))
            else:
                calls.append(conn.root.apply(slow_add, 2, i))
        async with asyncio.timeout(BOUND * 2):
            results = await asyncio.gather(*calls)
        assert results == [2 * i if i % 2 else 2 + i for i in range(200)]
        # Every callback lent to the server was released again.
        await eventually(lambda: live_ids(conn) == {0}, f"callbacks still lent: {live_ids(conn)}")


# -- netrefs -------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_netref_members_attributes_and_operations() -> None:
    async with pair() as (server, conn):
        ref = await conn.root.thing(7)
        assert isinstance(ref, rpc.Netref)
        assert "Thing" in repr(ref)
        assert await ref.get() == 7
        assert await ref.double(4) == 8  # @rpc.exposed on the object's class
        assert await ref.value == 7  # @rpc.exposed property
        assert await ref.count == 0  # exposed_ attribute
        assert await rpc.getattr(ref, "count") == 0
        await rpc.setattr(ref, "count", 5)
        assert await ref.count == 5
        assert session(server).service.things[0]().exposed_count == 5
        assert await rpc.len(ref) == 3
        assert await rpc.str(ref) == "thing-str"
        assert await rpc.repr(ref) == "thing-repr"
        # Chains resolve on the owner: ref.a.b(...)
        assert await ref.a.b("x") == "bx"
        assert session(server).service.things[0]().exposed_a.log == ["x"]
        # A function by reference is called as ref(...)
        fn = await conn.root.function()
        assert isinstance(fn, rpc.Netref)
        assert await fn(1) == 101
        with pytest.raises(TypeError, match="netref"):
            await rpc.len(42)  # type: ignore[arg-type]


async def test_iterating_sync_async_and_large_iterables() -> None:
    async with pair() as (_, conn):
        thing = await conn.root.thing()
        assert [x async for x in thing] == [10, 20, 30]
        ticker = await conn.root.ticker(5)
        assert [x async for x in ticker] == [0, 1, 2, 3, 4]
        big = await conn.root.big(10_000)
        assert await rpc.len(big) == 10_000
        async with asyncio.timeout(BOUND * 2):
            items = [x async for x in big]
        assert items == list(range(10_000))
        assert [x async for x in conn.root.version] == list("1.0")  # a member path, iterated
        got: list[int] = []

        async def drain(ref: Any) -> None:
            async for x in ref:
                got.append(x)

        with pytest.raises(ValueError, match="stopped at 2"):
            await drain(await conn.root.failing_numbers())
        assert got == [1, 2]  # the items before the error arrived


class Endless(rpc.Service):
    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.produced = 0

    def _numbers(self) -> Iterator[int]:
        try:
            for i in range(10**9):
                self.produced += 1
                yield i
        finally:
            self.closed.set()

    def exposed_numbers(self) -> Iterator[int]:
        return self._numbers()

    def exposed_ping(self) -> str:
        return "pong"


async def test_breaking_out_of_iteration_stops_the_remote_producer() -> None:
    svc = Endless()
    async with pair(svc) as (_, conn):
        numbers = await conn.root.numbers()
        seen = []
        async for x in numbers:
            seen.append(x)
            if x == 9:
                break
        assert seen == list(range(10))
        async with asyncio.timeout(BOUND):
            await svc.closed.wait()
        assert svc.produced < 10_000  # flow control: the producer never ran far ahead
        assert await conn.root.ping() == "pong"  # the connection goes on


async def test_an_async_generator_method_returns_an_iterable_netref() -> None:
    class Gen(rpc.Service):
        async def exposed_count(self, n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

    async with pair(Gen) as (_, conn):
        ref = await conn.root.count(3)
        assert [x async for x in ref] == [0, 1, 2]


async def test_a_netref_sent_back_arrives_as_the_object_itself() -> None:
    async with pair() as (_, conn):
        ref = await conn.root.thing()
        assert await conn.root.is_thing(ref, 0) is True
        other = await conn.root.thing()
        assert await conn.root.is_thing(other, 0) is False
        assert await conn.root.apply(lambda r: r, ref) is ref  # through a callback and back
        # The other way round: a client object lent to the server comes back as itself.
        local = Multiplier(3)
        await conn.root.keep(local)
        assert await conn.root.give_back() is local
        # Receiving the same object twice gives the same netref.
        await conn.root.keep(ref)
        assert await conn.root.give_back() is ref


async def test_a_netref_of_another_connection_can_be_passed_on() -> None:
    async with pair() as (_, conn_a), pair() as (server_b, conn_b):
        thing = await conn_a.root.thing(4)
        # B's server gets a netref to the client's netref, which forwards to A.
        assert await conn_b.root.apply(thing.get) == 4
        fn = await conn_a.root.function()
        assert await conn_b.root.apply(fn, 1) == 101
        await conn_b.root.keep(thing)
        kept = session(server_b).service.kept
        assert isinstance(kept, rpc.Netref)
        assert await kept.get() == 4
        assert await kept.a.b("y") == "by"
        assert [x async for x in kept] == [10, 20, 30]
        # Sent back to the client, it arrives as the client's own netref to A's object.
        assert await conn_b.root.give_back() is thing
        assert await conn_a.root.is_thing(thing, 0) is True


async def test_exposed_decorated_members_through_a_forwarded_netref() -> None:
    async with pair() as (_, conn_a), pair() as (server_b, conn_b):
        thing = await conn_a.root.thing(4)
        await conn_b.root.keep(thing)
        kept = session(server_b).service.kept
        assert await kept.double(5) == 10


async def test_operations_through_a_forwarded_netref() -> None:
    async with pair() as (_, conn_a), pair() as (server_b, conn_b):
        thing = await conn_a.root.thing(4)
        await conn_b.root.keep(thing)
        kept = session(server_b).service.kept
        assert await rpc.str(kept) == "thing-str"
        assert await rpc.len(kept) == 3


# -- release -------------------------------------------------------------------------------------


async def test_the_owner_frees_an_object_when_the_holder_drops_its_netref() -> None:
    async with pair() as (server, conn):
        svc = session(server).service
        ref = await conn.root.thing()
        assert svc.things[0]() is not None
        assert len(live_ids(session(server))) == 2
        del ref
        gc.collect()
        await eventually(lambda: svc.things[0]() is None, "the server kept the released object")
        assert live_ids(session(server)) == {0}
        # The other direction: the client's lent callback is freed once the server drops it.
        local = Multiplier(2)
        wr = weakref.ref(local)
        await conn.root.keep(local)
        del local
        gc.collect()
        assert wr() is not None, "the client dropped an object the server still holds"
        await conn.root.forget()
        gc.collect()
        await eventually(lambda: wr() is None, "the client kept the object the server released")
        assert live_ids(conn) == {0}


async def test_a_netref_dropped_in_another_thread_is_released() -> None:
    async with pair() as (server, conn):
        svc = session(server).service
        box = [await conn.root.thing()]
        dropper = threading.Thread(target=box.clear)  # the last reference goes in that thread
        dropper.start()
        dropper.join(BOUND)
        gc.collect()
        await eventually(lambda: svc.things[0]() is None, "a release from another thread was lost")
        assert live_ids(session(server)) == {0}


async def test_an_object_sent_twice_stays_until_every_netref_is_gone() -> None:
    async with pair() as (server, conn):
        svc = session(server).service
        first = await conn.root.thing()
        await conn.root.keep(first)
        second = await conn.root.give_back()  # sent a second time while `first` lives
        assert second is first
        [oid] = live_ids(session(server)) - {0}
        assert session(server)._objects[oid][1] == 2
        member = first.get  # a member keeps its base netref alive
        del first, second
        gc.collect()
        assert svc.things[0]() is not None, "dropped while a member netref still refers to it"
        assert await member() == 1
        assert live_ids(session(server)) == {0, oid}
        del member
        gc.collect()
        await eventually(lambda: svc.things[0]() is None, "the object outlived both netrefs")
        assert live_ids(session(server)) == {0}


class Lender(rpc.Service):
    def __init__(self) -> None:
        self.obj: Thing | None = Thing(3)
        self.wr = weakref.ref(self.obj)

    def on_connect(self, conn: Any) -> None:
        self.peer = conn.root

    def exposed_lend(self) -> Thing | None:
        return self.obj

    def exposed_drop(self) -> None:
        self.obj = None

    def exposed_lend_again(self) -> None:
        self.peer.take.oneway(self.wr())


class Taker(rpc.Service):
    def __init__(self) -> None:
        self.kept: Any = None
        self.got = asyncio.Event()

    def exposed_take(self, ref: Any) -> None:
        self.kept = ref
        self.got.set()


async def test_a_release_crossing_a_second_send_keeps_the_object() -> None:
    lender, taker = Lender(), Taker()
    async with pair(lender, client=taker) as (server, conn):
        ref = await conn.root.lend()
        await conn.root.drop()  # now only the connection's table holds it
        assert lender.wr() is not None
        conn.root.lend_again.oneway()  # the server sends it again (count 2) ...
        del ref  # ... while the release of the first send (count 1) is on its way
        gc.collect()
        async with asyncio.timeout(BOUND):
            await taker.got.wait()
        kept = taker.kept
        assert isinstance(kept, rpc.Netref)
        assert lender.wr() is not None, "the release of the first send freed the second"
        assert await kept.get() == 3
        taker.kept = None
        del kept
        gc.collect()
        await eventually(lambda: lender.wr() is None, "the object outlived its last netref")
        assert live_ids(session(server)) == {0}


async def test_closing_the_connection_frees_what_the_peer_held() -> None:
    class KeepsConn(Echo):
        def on_connect(self, conn: Any) -> None:
            self.conn = conn  # the service outlives the connection, and keeps it

    async with rpc.serve(KeepsConn, port=0) as server:
        conn = await rpc.connect(port=server.port)
        svc = session(server).service
        ref = await conn.root.thing()
        await conn.close()
        gc.collect()
        await eventually(lambda: svc.things[0]() is None, "objects held for a closed connection stay")
        assert live_ids(svc.conn) == set()
        del ref  # releasing after close is harmless
        gc.collect()


async def test_release_goes_through_a_forwarded_netref() -> None:
    async with pair() as (server_a, conn_a), pair() as (_, conn_b):
        svc_a = session(server_a).service
        thing = await conn_a.root.thing()
        await conn_b.root.keep(thing)
        del thing
        gc.collect()
        assert svc_a.things[0]() is not None, "freed while B still holds it through the client"
        await conn_b.root.forget()
        gc.collect()
        await eventually(lambda: svc_a.things[0]() is None, "A kept the object after B released it")
        assert live_ids(conn_b) == {0}


async def test_an_unknown_object_id_raises_unknown_object_error() -> None:
    async with pair() as (_, conn):
        with pytest.raises(UnknownObjectError):
            await conn.conn.call("rpc.call", 999, None)
        with pytest.raises(UnknownObjectError):
            await conn.conn.call("rpc.getattr", 999, "x")


# -- access rules (B27) --------------------------------------------------------------------------


async def test_private_dunder_dotted_and_unexposed_names_are_refused() -> None:
    hooks_calls: list[Any] = []

    class Guarded(Echo):
        exposed_a = Inner()

        def on_connect(self, conn: Any) -> None:
            hooks_calls.append(conn)

    async with pair(Guarded) as (server, conn):
        svc = session(server).service
        root = conn.root
        wire = conn.conn

        async def drain(stream: Any) -> list[Any]:
            return [x async for x in stream]

        attempts: dict[str, Callable[[], Awaitable[Any]]] = {
            "call _private": lambda: wire.call("rpc.call", 0, "_private"),
            "call not_exposed": lambda: wire.call("rpc.call", 0, "not_exposed"),
            "root.not_exposed()": lambda: root.not_exposed(),
            "call 'a.b'": lambda: wire.call("rpc.call", 0, "a.b", "dotted"),
            "call a.hidden": lambda: wire.call("rpc.call", 0, ["a", "hidden"]),
            "root.a.hidden()": lambda: root.a.hidden(),
            "root.on_connect()": lambda: root.on_connect(None),
            "root.on_disconnect()": lambda: root.on_disconnect(None),
            "getattr __class__": lambda: wire.call("rpc.getattr", 0, "__class__"),
            "getattr __class__.__subclasses__": lambda: wire.call(
                "rpc.getattr", 0, ["__class__", "__subclasses__"]
            ),
            "getattr __init__.__globals__": lambda: wire.call("rpc.getattr", 0, ["__init__", "__globals__"]),
            "rpc.getattr __class__": lambda: rpc.getattr(root, "__class__"),
            "rpc.getattr __dict__": lambda: rpc.getattr(root, "__dict__"),
            "rpc.getattr 'a.b'": lambda: rpc.getattr(root, "a.b"),
            "rpc.getattr log": lambda: rpc.getattr(root, "log"),  # public, not exposed
            "rpc.getattr ''": lambda: rpc.getattr(root, ""),
            "op on _private": lambda: wire.call("rpc.op", 0, "_private", "repr"),
            "iter _private": lambda: drain(wire.stream("rpc.iter", 0, "_private")),
            "iter log": lambda: drain(wire.stream("rpc.iter", 0, "log")),
            "setattr _private": lambda: wire.call("rpc.setattr", 0, None, "_private", 1),
            "setattr log": lambda: wire.call("rpc.setattr", 0, None, "log", ["changed"]),
            "setattr a.log": lambda: wire.call("rpc.setattr", 0, "a", "log", ["changed"]),
        }
        accepted = {}
        for label, attempt in attempts.items():
            try:
                accepted[label] = await attempt()
            except AttributeError:
                pass
        assert accepted == {}, f"not refused: {accepted}"
        fn = await root.function()
        for name in ("__globals__", "__code__", "__builtins__", "__closure__"):
            with pytest.raises(AttributeError):
                await rpc.getattr(fn, name)
        # Nothing ran.
        assert svc.log == []
        assert svc.exposed_a.log == []
        assert len(hooks_calls) == 1
        assert callable(svc._private)
        # Locally, names starting with '_' are never forwarded.
        with pytest.raises(AttributeError):
            root._private  # noqa: B018
        assert await root.echo("still fine") == "still fine"


async def test_methods_cannot_be_replaced_exposed_attributes_can() -> None:
    async with pair() as (server, conn):
        svc = session(server).service
        for name in ("echo", "add", "exposed_echo"):
            with pytest.raises(AttributeError):
                await rpc.setattr(conn.root, name, "replaced")
        with pytest.raises(AttributeError):
            await rpc.setattr(conn.root, "ident", 1)  # a read-only property
        assert await conn.root.echo(1) == 1
        assert await conn.root.add(1, 1) == 2
        await rpc.setattr(conn.root, "setting", "written")  # exposed_setting
        assert svc.exposed_setting == "written"
        assert svc.setting == "unchanged"
        thing = await conn.root.thing()
        with pytest.raises(AttributeError):
            await rpc.setattr(thing, "get", None)
        with pytest.raises(AttributeError):
            await rpc.setattr(thing, "x", 99)  # public, but not exposed
        assert await thing.get() == 1


async def test_allow_public_attrs_permits_public_attributes_only() -> None:
    hooks_calls: list[Any] = []

    class Open(Echo):
        def on_connect(self, conn: Any) -> None:
            hooks_calls.append(conn)

        def exposed_dotty(self) -> Dotty:
            return Dotty()

    async with pair(Open, allow_public_attrs=True) as (server, conn):
        svc = session(server).service
        thing = await conn.root.thing(5)
        assert await thing.x == 5
        await rpc.setattr(thing, "x", 6)
        assert svc.things[0]().x == 6
        assert await thing.secret() == "secret"  # public methods too
        assert await conn.root.log == []  # a plain public attribute of the service
        assert await conn.root.not_exposed() == "not_exposed"
        attempts: dict[str, Callable[[], Awaitable[Any]]] = {
            "_hidden": lambda: rpc.getattr(thing, "_hidden"),
            "__class__": lambda: rpc.getattr(thing, "__class__"),
            "__dict__": lambda: rpc.getattr(thing, "__dict__"),
            "_private()": lambda: conn.conn.call("rpc.call", 0, "_private"),
            "on_connect()": lambda: conn.root.on_connect(None),
            "on_disconnect()": lambda: conn.root.on_disconnect(None),
            "on_connect": lambda: rpc.getattr(conn.root, "on_connect"),
            "setattr _hidden": lambda: rpc.setattr(thing, "_hidden", "changed"),
        }
        accepted = {}
        for label, attempt in attempts.items():
            try:
                accepted[label] = await attempt()
            except AttributeError:
                pass
        assert accepted == {}, f"not refused: {accepted}"
        assert svc.things[0]()._hidden == "hidden"
        with pytest.raises(AttributeError):
            await rpc.setattr(thing, "get", None)  # still: methods are not replaced
        # A dotted name is refused even where the object itself would follow it.
        dotty = await conn.root.dotty()
        assert await dotty.inner == "public"
        for name in ("inner.upper", "inner._hidden", "x.y"):
            with pytest.raises(AttributeError, match=r"identifier|dotted"):
                await rpc.getattr(dotty, name)
            with pytest.raises(AttributeError, match=r"identifier|dotted"):
                await conn.conn.call("rpc.call", dotty._oid, name)
        assert len(hooks_calls) == 1
        assert svc.log == ["not_exposed"]
    # Without the option, the same public attribute is refused.
    async with pair(Open) as (_, conn):
        thing = await conn.root.thing(5)
        with pytest.raises(AttributeError):
            await thing.x
        with pytest.raises(AttributeError):
            await conn.root.read_x(Thing(8))  # the client's objects: refused by the client
    # The client's own option governs what the server may reach of the client's objects.
    async with pair(Open, client_options={"allow_public_attrs": True}) as (_, conn):
        assert await conn.root.read_x(Thing(8)) == 8


# -- one-way calls, timeouts, cancellation, threads -------------------------------------------------


class Recorder(rpc.Service):
    def __init__(self, expected: int = 0) -> None:
        self.seen: list[Any] = []
        self.expected = expected
        self.done = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    def exposed_record(self, x: Any) -> None:
        self.seen.append(x)
        if len(self.seen) == self.expected:
            self.done.set()

    async def exposed_hang(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def exposed_wait(self, timeout: float | None = None) -> Any:
        return timeout

    def exposed_seen(self) -> list[Any]:
        return self.seen


async def test_oneway_returns_at_once_runs_remotely_and_keeps_order() -> None:
    svc = Recorder(expected=500)
    async with pair(svc) as (_, conn):
        assert conn.root.record.oneway("first") is None
        assert svc.seen == []  # nothing ran yet: the call was only queued
        for i in range(499):
            conn.root.record.oneway(i)
        async with asyncio.timeout(BOUND):
            await svc.done.wait()
        assert svc.seen == ["first", *range(499)]
        # A failing one-way call is only logged by the peer; the connection goes on.
        conn.root.nonexistent.oneway()
        assert await conn.root.seen() == svc.seen


async def test_oneway_from_a_plain_thread() -> None:
    svc = Recorder(expected=300)
    async with pair(svc) as (_, conn):
        record = conn.root.record
        errors: list[BaseException] = []

        def worker(name: str) -> None:
            try:
                for i in range(100):
                    record.oneway([name, i])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(f"t{n}",)) for n in range(3)]
        for t in threads:
            t.start()
        try:
            async with asyncio.timeout(BOUND):  # the loop runs while the threads send
                await svc.done.wait()
        finally:
            for t in threads:
                t.join(BOUND)
        assert not errors
        for name in ("t0", "t1", "t2"):
            assert [i for n, i in svc.seen if n == name] == list(range(100)), "one thread's order was lost"
    with pytest.raises(ConnectionClosed):
        record.oneway(["late", 0])


async def test_timeout_raises_and_cancels_the_remote_handler() -> None:
    svc = Recorder()
    async with pair(svc) as (_, conn):
        with pytest.raises(TimeoutError):
            await conn.root.hang(timeout=0.1 * SCALE)
        async with asyncio.timeout(BOUND):
            await svc.cancelled.wait()
        assert await conn.root.seen() == []  # the connection goes on


async def test_cancelling_the_caller_cancels_the_remote_handler() -> None:
    svc = Recorder()
    async with pair(svc) as (_, conn):
        call = asyncio.ensure_future(conn.root.hang())
        async with asyncio.timeout(BOUND):
            await svc.started.wait()
        assert not svc.cancelled.is_set()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(BOUND):
            await svc.cancelled.wait()
        assert await conn.root.seen() == []


async def test_request_passes_a_remote_keyword_named_timeout() -> None:
    async with pair(Recorder()) as (_, conn):
        assert await conn.root.wait.request((), {"timeout": 12.5}) == 12.5
        assert await conn.root.wait.request([], {"timeout": 3}, timeout=BOUND) == 3
        assert await conn.root.wait() is None  # timeout= on a call is never sent
        assert await conn.root.wait(timeout=BOUND) is None


class Blocking(rpc.Service):
    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.barrier = threading.Barrier(2, timeout=BOUND)

    @rpc.exposed(blocking=True)
    def block(self) -> bool:
        self.started.set()
        return self.release.wait(BOUND)

    @rpc.exposed(blocking=True)
    def thread_id(self) -> int:
        return threading.get_ident()

    @rpc.exposed(blocking=True)
    def exposed_meet(self) -> int:
        self.barrier.wait()  # only passes when two calls run at once
        return threading.get_ident()

    def exposed_loop_thread_id(self) -> int:
        return threading.get_ident()

    def exposed_echo(self, x: Any) -> Any:
        return x


async def test_blocking_methods_run_in_threads_and_do_not_stall_the_loop() -> None:
    svc = Blocking()
    async with pair(svc) as (_, conn):
        loop_thread = threading.get_ident()
        assert await conn.root.loop_thread_id() == loop_thread
        assert await conn.root.thread_id() != loop_thread
        blocked = asyncio.ensure_future(conn.root.block())
        await eventually(svc.started.is_set, "the blocking method did not start")
        for i in range(20):
            assert await conn.root.echo(i) == i
        assert not blocked.done()
        svc.release.set()
        assert await asyncio.wait_for(blocked, BOUND) is True
        a, b = await asyncio.gather(conn.root.meet(), conn.root.meet())
        assert loop_thread not in (a, b)


async def test_remote_exceptions_arrive_as_their_type_with_the_traceback() -> None:
    async with pair() as (_, conn):
        with pytest.raises(ValueError, match="boom-123") as info:
            await conn.root.fail("boom-123")
        tb = info.value.remote_traceback  # type: ignore[attr-defined]
        assert "exposed_fail" in tb
        assert "ValueError: boom-123" in tb
        assert any("Remote traceback" in note for note in info.value.__notes__)

        class Custom(Exception):
            pass

        def raise_custom() -> None:
            raise Custom("mine")

        # A type not on the allow-list arrives as RemoteError, still with its traceback.
        with pytest.raises(RemoteError) as remote:
            await conn.root.apply(raise_custom)
        assert "Custom" in remote.value.type_name
        assert "raise_custom" in remote.value.remote_traceback
        assert await conn.root.echo("after errors") == "after errors"


async def test_connect_with_threads_runs_plain_callbacks_in_threads() -> None:
    """``rpc.connect(threads=N)``: the plain callbacks (and client service methods) the server
    calls run in threads of this side, so they may block; without it, on the loop."""
    loop_thread = threading.current_thread().name
    ran_on: list[str] = []

    def plain(x: int) -> int:
        ran_on.append(threading.current_thread().name)
        return x + 1

    async with pair(client_options={"threads": 2}) as (_, conn):
        assert await conn.root.apply(plain, 1) == 2
    async with pair() as (_, conn):
        assert await conn.root.apply(plain, 2) == 3
    assert ran_on[0].startswith("asyncdist-rpc"), ran_on
    assert ran_on[1] == loop_thread
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads"):
            await rpc.connect(port=1, threads=bad)


class Sprayer(rpc.Service):
    """Calls the client's ``record`` one-way ``n`` times (the client's service is its root)."""

    def on_connect(self, conn: rpc.Connection) -> None:
        self.client = conn.root

    def exposed_spray(self, n: int) -> None:
        for i in range(n):
            self.client.record.oneway(i)


class SlowRecorder(rpc.Service):
    """A plain ``record`` that takes a varying while: run concurrently, calls would finish
    out of order."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def exposed_record(self, i: int) -> None:
        time.sleep(0.002 * (3 - i % 4))
        self.seen.append(i)


@pytest.mark.parametrize("classic_server", [False, True], ids=["threads=4", "classic server"])
async def test_oneway_calls_run_in_threads_keep_their_order(classic_server: bool) -> None:
    """One-way calls that run in threads (a client connected with ``threads=``, a classic
    server) still run one after another, in the order sent."""
    if classic_server:
        async with rpc.classic.serve(allow_classic=True, port=0) as server:
            conn = await rpc.classic.connect(port=server.port)
            try:
                await conn.execute(
                    "import time\nseen = []\n"
                    "def record(i):\n    time.sleep(0.002 * (3 - i % 4))\n    seen.append(i)\n"
                )
                record = await conn.eval("record")
                for i in range(40):
                    record.oneway(i)

                async def all_seen() -> bool:
                    return bool(await conn.eval("len(seen)") == 40)

                await eventually(all_seen, "the one-way calls did not all run")
                assert await conn.eval("seen") == list(range(40))
            finally:
                await conn.close()
        return
    client = SlowRecorder()
    async with pair(Sprayer, client=client, client_options={"threads": 4}) as (_, conn):
        await conn.root.spray(40)
        await eventually(lambda: len(client.seen) == 40, "the one-way calls did not all run")
        assert client.seen == list(range(40))


# -- the command line ----------------------------------------------------------------------------


SERVICE_MODULE = textwrap.dedent(
    """
    from asyncdist import rpc


    class Greeter(rpc.Service):
        def exposed_greet(self, name):
            return f"hello {name}"

        async def exposed_call(self, f, x):
            return await f(x)
    """
)


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncdist", "rpc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


async def test_cli_serves_a_service_module(tmp_path: Path) -> None:
    (tmp_path / "rpc_cli_service.py").write_text(SERVICE_MODULE)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "asyncdist",
            "rpc",
            "--service",
            "rpc_cli_service:Greeter",
            "--port",
            "0",
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await eventually(lambda: "listening on" in log.read_text(), "the rpc server did not start", 20.0)
        match = re.search(
            r"asyncdist rpc rpc_cli_service:Greeter listening on 127\.0\.0\.1:(\d+)", log.read_text()
        )
        assert match, log.read_text()
        port = int(match.group(1))
        assert port != 0
        async with rpc.connect(port=port) as conn:
            assert await conn.root.greet("cli") == "hello cli"
            assert await conn.root.call(lambda x: x * 2, 21) == 42
    finally:
        await stop(proc)
    assert proc.returncode == 0, log.read_text()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "--service takes module:Class, not 'nope'"),
        ("no_such_module_xyz:Svc", "cannot import no_such_module_xyz"),
        ("rpc_cli_service:Missing", "rpc_cli_service has no Missing"),
    ],
)
def test_cli_bad_service_spec_exits_1(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "rpc_cli_service.py").write_text(SERVICE_MODULE)
    result = _run_cli("--service", spec, "--port", "0", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "asyncdist: error:" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
