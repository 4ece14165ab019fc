"""Remote objects (Pyro): ``expose``/``oneway``/``behavior``, :class:`Daemon`, :class:`Proxy`.

Exposure rules, instance modes, one-way calls, threads and the loop,
properties, remote generators, batches, errors, the daemon's registry and
addresses, proxy connections and timeouts, callbacks over the client's own
connection, chains of daemons through a name server, and URI parsing.
Everything runs in this process over 127.0.0.1 (or a Unix socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE, conn_of, eventually
from hypothesis import given
from hypothesis import strategies as st

import asyncdist
from asyncdist import (
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    Daemon,
    Proxy,
    RemoteError,
    UnknownObjectError,
)
from asyncdist.naming import NameServerDaemon
from asyncdist.objects import DAEMON_OBJECT_ID, URI

#: Upper bound for anything a test waits for (a safety net: tests set their events).
BOUND = 5.0 * SCALE


def oid_of(uri: str) -> str:
    return URI.parse(uri).object


@contextlib.asynccontextmanager
async def ns_daemon() -> AsyncIterator[NameServerDaemon]:
    """A name server on a free port (typed: Daemon.__aenter__ is annotated as Daemon)."""
    nsd = NameServerDaemon(port=0)
    async with nsd:
        yield nsd


@contextlib.asynccontextmanager
async def serving(*objs: Any, **kwargs: Any) -> AsyncIterator[tuple[Daemon, list[str]]]:
    """A started daemon serving ``objs``; closed on exit."""
    async with Daemon(**kwargs) as daemon:
        yield daemon, [daemon.register(obj) for obj in objs]


# -- exposure ------------------------------------------------------------------------------------


class HiddenBase:
    """Not exposed: nothing of it is reachable through a subclass either."""

    def base_method(self) -> str:
        return "base"

    def replaced(self) -> str:
        return "base"


@asyncdist.expose
class Exposed(HiddenBase):
    def __init__(self) -> None:
        self.plain_attribute = 42
        self._value = 1

    def ping(self) -> str:
        return "pong"

    def replaced(self) -> str:
        return "exposed"

    def overridden(self) -> str:
        return "exposed"

    @property
    def value(self) -> int:
        return self._value

    def _private(self) -> str:
        return "private"


class NotExposedSub(Exposed):
    """Not exposed itself: an override without the decorator hides the member."""

    def overridden(self) -> str:
        return "sub"

    def added(self) -> str:
        return "added"


class MethodLevel:
    def __init__(self) -> None:
        self.plain_attribute = 42

    @asyncdist.expose
    def shown(self) -> str:
        return "shown"

    def hidden(self) -> str:
        return "hidden"

    @asyncdist.expose  # type: ignore[prop-decorator]
    @property
    def shown_prop(self) -> int:
        return 7

    @property
    @asyncdist.expose
    def getter_exposed(self) -> int:
        return 9

    @property
    def hidden_prop(self) -> int:
        return 8


class NothingExposed:
    def method(self) -> int:
        return 1


class OnlyHiddenBase(HiddenBase):
    pass


async def test_class_level_expose_shows_public_methods_and_properties() -> None:
    async with serving(Exposed()) as (_, [uri]), Proxy(uri) as p:
        assert await p.ping() == "pong"
        assert await p.replaced() == "exposed"
        assert await p.value == 1
        meta = p._meta
        assert meta is not None
        assert meta["methods"] == {"ping", "replaced", "overridden"}
        assert meta["properties"] == {"value"}
        for name in ("base_method", "_private", "plain_attribute"):
            with pytest.raises(AttributeError):
                await p._call(name)
        assert await p.ping() == "pong"


async def test_members_of_a_non_exposed_base_and_undecorated_overrides_stay_hidden() -> None:
    async with serving(NotExposedSub()) as (_, [uri]), Proxy(uri) as p:
        assert await p.ping() == "pong"
        assert await p.replaced() == "exposed"
        with pytest.raises(AttributeError):
            await p.base_method()
        with pytest.raises(AttributeError):
            await p.overridden()  # overridden without the decorator in a non-exposed class
        with pytest.raises(AttributeError):
            await p.added()
        assert await p.ping() == "pong"


async def test_method_level_expose() -> None:
    async with serving(MethodLevel()) as (_, [uri]), Proxy(uri) as p:
        assert await p.shown() == "shown"
        assert await p.shown_prop == 7
        assert await p.getter_exposed == 9
        with pytest.raises(AttributeError):
            await p.hidden()
        with pytest.raises(AttributeError):
            await p.hidden_prop
        with pytest.raises(AttributeError):
            await p.plain_attribute
        assert await p.shown() == "shown"


@pytest.mark.both_loops
@pytest.mark.parametrize(
    "name",
    [
        "_private",
        "__class__",
        "__dict__",
        "__init__",
        "__getattribute__",
        "ping.__globals__",
        "a.b",
        "1abc",
        "a-b",
        "with space",
        "",
        "x" * 300,
        123,
        None,
        ["ping"],
    ],
)
async def test_private_dunder_dotted_and_bad_names_are_refused_on_the_wire(name: Any) -> None:
    async with serving(Exposed()) as (_, [uri]), Proxy(uri) as p:
        assert p._conn is not None
        oid = oid_of(uri)
        for kind, args in (("o.call", [oid, name]), ("o.get", [oid, name]), ("o.set", [oid, name, 1])):
            with pytest.raises(AttributeError):
                await p._conn.request(kind, args)
        with pytest.raises(AttributeError):
            await p._conn.request("o.iter", [oid, name])
        assert await p.ping() == "pong"  # the daemon keeps serving


async def test_plain_instance_attributes_are_not_reachable() -> None:
    obj = Exposed()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        assert p._conn is not None
        for kind in ("o.get", "o.call"):
            with pytest.raises(AttributeError):
                await p._conn.request(kind, [oid_of(uri), "plain_attribute"])
        with pytest.raises(AttributeError):
            await p._conn.request("o.set", [oid_of(uri), "plain_attribute", 0])
        assert obj.plain_attribute == 42


async def test_registering_a_class_or_object_without_exposed_members_raises_type_error() -> None:
    async with Daemon() as daemon:
        for what in (NothingExposed, NothingExposed(), OnlyHiddenBase(), object()):
            with pytest.raises(TypeError):
                daemon.register(what)
        assert list(daemon.objects) == [DAEMON_OBJECT_ID]


def test_decorators_refuse_what_they_do_not_apply_to() -> None:
    with pytest.raises(TypeError):
        asyncdist.expose(42)
    with pytest.raises(TypeError):
        asyncdist.oneway(property(lambda self: 1))
    with pytest.raises(ValueError):
        asyncdist.behavior(instance_mode="sometimes")  # type: ignore[call-overload]


# -- instance modes ------------------------------------------------------------------------------


def counting_creator(made: list[weakref.ref[Any]]) -> Any:
    def create(cls: type) -> Any:
        obj = cls()
        obj.serial = len(made) + 1
        made.append(weakref.ref(obj))
        return obj

    return create


async def test_instance_mode_single_shares_one_instance() -> None:
    made: list[weakref.ref[Any]] = []

    @asyncdist.behavior(instance_mode="single", instance_creator=counting_creator(made))
    @asyncdist.expose
    class Single:
        serial = 0

        def who(self) -> int:
            return self.serial

    async with serving(Single) as (daemon, [uri]):
        assert made == []  # made at the first call, not at registration
        async with Proxy(uri) as p1, Proxy(uri) as p2:
            assert [await p1.who(), await p2.who(), await p1.who()] == [1, 1, 1]
        assert len(made) == 1
        assert daemon.objects[oid_of(uri)] is made[0]()


async def test_instance_mode_session_makes_one_per_connection_and_drops_it() -> None:
    made: list[weakref.ref[Any]] = []

    @asyncdist.behavior(instance_mode="session", instance_creator=counting_creator(made))
    @asyncdist.expose
    class PerSession:
        serial = 0

        def who(self) -> int:
            return self.serial

        async def awho(self) -> int:
            return self.serial

    async with serving(PerSession) as (_, [uri]), Proxy(uri) as p1, Proxy(uri) as p2:
        a = [await p1.who(), await p1.awho(), await p1.who()]
        b = [await p2.who(), await p2.awho()]
        assert len(set(a)) == 1
        assert len(set(b)) == 1
        assert a[0] != b[0]
        assert len(made) == 2
        first = made[a[0] - 1]
        await p1._release()

        def first_gone() -> bool:
            gc.collect()
            return first() is None

        await eventually(first_gone, "the session instance outlived its connection")
        assert made[b[0] - 1]() is not None  # the other connection's instance lives on
        assert await p2.who() == b[0]


async def test_a_session_instance_does_not_outlive_the_registration_of_its_id() -> None:
    @asyncdist.behavior(instance_mode="session")
    @asyncdist.expose
    class Before:
        def who(self) -> str:
            return "before"

    @asyncdist.behavior(instance_mode="session")
    @asyncdist.expose
    class After:
        def who(self) -> str:
            return "after"

    async with Daemon() as daemon:
        uri = daemon.register(Before, object_id="svc")
        async with Proxy(uri) as p:
            assert await p.who() == "before"
            daemon.register(After, object_id="svc", force=True)
            async with Proxy(uri) as fresh:
                assert await fresh.who() == "after"
            assert await p.who() == "after"


async def test_instance_mode_percall_makes_a_new_instance_every_call() -> None:
    made: list[weakref.ref[Any]] = []

    @asyncdist.behavior(instance_mode="percall", instance_creator=counting_creator(made))
    @asyncdist.expose
    class PerCall:
        serial = 0

        def who(self) -> int:
            return self.serial

        async def awho(self) -> int:
            return self.serial

    async with serving(PerCall) as (_, [uri]), Proxy(uri) as p:
        assert [await p.who(), await p.awho(), await p.who()] == [1, 2, 3]
        assert len(made) == 3


async def test_behavior_without_creator_uses_the_class_and_defaults_to_single() -> None:
    @asyncdist.behavior
    @asyncdist.expose
    class Default:
        def ident(self) -> int:
            return id(self)

    async with serving(Default) as (daemon, [uri]), Proxy(uri) as p1, Proxy(uri) as p2:
        assert await p1.ident() == await p2.ident()
        assert isinstance(daemon.objects[oid_of(uri)], Default)


# -- oneway --------------------------------------------------------------------------------------


@asyncdist.expose
class OneWay:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.astarted = asyncio.Event()
        self.arelease = asyncio.Event()
        self.afinished = asyncio.Event()
        self.failed = threading.Event()

    @asyncdist.oneway
    def fire(self) -> str:
        self.started.set()
        self.release.wait(BOUND)
        self.finished.set()
        return "ignored"

    @asyncdist.oneway
    async def afire(self) -> str:
        self.astarted.set()
        await self.arelease.wait()
        self.afinished.set()
        return "ignored"

    @asyncdist.oneway
    def explode(self) -> None:
        self.failed.set()
        raise ValueError("oneway failure")

    def ping(self) -> str:
        return "pong"


@pytest.mark.both_loops
async def test_oneway_returns_before_the_method_finishes() -> None:
    obj = OneWay()
    try:
        async with serving(obj) as (_, [uri]), Proxy(uri) as p:
            assert await p.fire() is None
            assert await p.afire() is None
            await eventually(obj.started.is_set, "the oneway method did not start")
            await asyncio.wait_for(obj.astarted.wait(), BOUND)
            assert not obj.finished.is_set()
            assert not obj.afinished.is_set()
            assert await p.ping() == "pong"  # the connection is free meanwhile
            obj.release.set()
            obj.arelease.set()
            await eventually(obj.finished.is_set, "the oneway method did not finish")
            await asyncio.wait_for(obj.afinished.wait(), BOUND)
    finally:
        obj.release.set()


async def test_oneway_exceptions_are_not_reported_to_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    obj = OneWay()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        assert await p.explode() is None
        await eventually(obj.failed.is_set, "the oneway method did not run")
        assert await p.ping() == "pong"

        def logged() -> bool:
            return any(
                r.exc_info is not None and isinstance(r.exc_info[1], ValueError) for r in caplog.records
            )

        await eventually(logged, "the daemon did not log the oneway method's exception")


# -- threads and the loop ------------------------------------------------------------------------


@asyncdist.expose
class Where:
    def __init__(self) -> None:
        self.slow_started = threading.Event()
        self.slow_release = threading.Event()

    def plain_thread(self) -> int:
        return threading.get_ident()

    async def async_thread(self) -> int:
        return threading.get_ident()

    def plain_conn(self) -> int:
        return id(asyncdist.current_connection())

    async def async_conn(self) -> int:
        return id(asyncdist.current_connection())

    def slow(self) -> str:
        self.slow_started.set()
        self.slow_release.wait(1.0 * BOUND)
        return "slow done"

    def fast(self, x: int) -> int:
        return x + 1

    async def afast(self, x: int) -> int:
        return x * 2


@pytest.mark.both_loops
async def test_plain_methods_run_in_threads_async_methods_on_the_loop() -> None:
    async with serving(Where()) as (daemon, [uri]), Proxy(uri) as p:
        loop_thread = threading.get_ident()
        assert await p.plain_thread() != loop_thread
        assert await p.async_thread() == loop_thread
        conns = {id(c) for c in daemon.server.connections}
        assert len(conns) == 1
        assert await p.plain_conn() in conns
        assert await p.async_conn() in conns


async def test_a_slow_plain_method_does_not_block_other_calls() -> None:
    obj = Where()
    try:
        async with serving(obj) as (_, [uri]), Proxy(uri) as p:
            slow = asyncio.ensure_future(p.slow())
            await eventually(obj.slow_started.is_set, "the slow method did not start")
            results = await asyncio.wait_for(
                asyncio.gather(*(p.fast(i) for i in range(20)), *(p.afast(i) for i in range(20))), BOUND
            )
            assert results == [i + 1 for i in range(20)] + [i * 2 for i in range(20)]
            assert not slow.done()
            obj.slow_release.set()
            assert await asyncio.wait_for(slow, BOUND) == "slow done"
    finally:
        obj.slow_release.set()


# -- properties ----------------------------------------------------------------------------------


@asyncdist.expose
class Props:
    def __init__(self) -> None:
        self._v = 1
        self.setter_thread = 0

    @property
    def value(self) -> int:
        return self._v

    @value.setter
    def value(self, v: int) -> None:
        self.setter_thread = threading.get_ident()
        self._v = v

    @property
    def readonly(self) -> str:
        return "fixed"

    def method(self) -> str:
        return "m"


@pytest.mark.both_loops
async def test_properties_read_and_write() -> None:
    obj = Props()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        assert await p.value == 1
        assert await p.value.get() == 1
        await p.value.set(5)
        assert obj._v == 5
        assert obj.setter_thread not in (0, threading.get_ident())
        assert await p.value == 5
        assert await p.readonly == "fixed"


async def test_property_errors() -> None:
    obj = Props()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        with pytest.raises(AttributeError):
            await p.readonly.set("other")
        with pytest.raises(AttributeError):
            p.value = 1
        with pytest.raises(AttributeError):
            await p.value()
        with pytest.raises(AttributeError):
            await p.method  # a method is not a property
        with pytest.raises(AttributeError):
            await p.method.set(1)
        assert await p.readonly == "fixed"
        assert obj._v == 1


# -- generators ----------------------------------------------------------------------------------


@asyncdist.expose
class Gens:
    def __init__(self) -> None:
        self.sync_closed = threading.Event()
        self.async_closed = asyncio.Event()
        self.sync_produced = 0
        self.async_produced = 0

    def count(self, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                self.sync_produced += 1
                yield i
        finally:
            self.sync_closed.set()

    async def acount(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                self.async_produced += 1
                yield i * 10
                await asyncio.sleep(0)
        finally:
            self.async_closed.set()

    async def stuck(self) -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
            yield 2
        finally:
            self.async_closed.set()

    def ping(self) -> str:
        return "pong"


@pytest.mark.both_loops
async def test_remote_generators_sync_and_async() -> None:
    obj = Gens()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        assert [x async for x in p.count(5)] == [0, 1, 2, 3, 4]
        assert [x async for x in p.acount(4)] == [0, 10, 20, 30]
        assert [x async for x in p.count(0)] == []
        assert obj.sync_closed.is_set()
        assert obj.async_closed.is_set()


async def test_breaking_out_early_stops_the_remote_generator() -> None:
    obj = Gens()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        got = []
        async for x in p.count(100_000):
            got.append(x)
            if x == 2:
                break
        assert got == [0, 1, 2]
        got = []
        async for x in p.acount(100_000):
            got.append(x)
            if x == 20:
                break
        assert got == [0, 10, 20]
        await eventually(obj.sync_closed.is_set, "the remote generator was not closed")
        await asyncio.wait_for(obj.async_closed.wait(), BOUND)
        assert obj.sync_produced < 1000
        assert obj.async_produced < 1000


async def test_proxy_timeout_bounds_a_remote_generator() -> None:
    obj = Gens()
    async with serving(obj) as (_, [uri]), Proxy(uri, timeout=0.2 * SCALE) as p:
        got = []
        outer = asyncio.timeout(1.0 * SCALE)

        async def consume() -> None:
            async with outer:
                async for x in p.stuck():
                    got.append(x)

        with pytest.raises(TimeoutError):
            await consume()
        assert got == [1]
        assert not outer.expired(), "the proxy's timeout did not apply to the stream"
        await asyncio.wait_for(obj.async_closed.wait(), BOUND)


async def test_awaiting_a_generator_method_raises_type_error() -> None:
    obj = Gens()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        with pytest.raises(TypeError):
            await p.count(3)
        with pytest.raises(TypeError):
            await p.acount(3)
        with pytest.raises(TypeError):
            async for _ in p.ping():
                pass
        assert [x async for x in p.count(2)] == [0, 1]


# -- batches -------------------------------------------------------------------------------------


@asyncdist.expose
class Batched:
    def __init__(self) -> None:
        self.log: list[Any] = []
        self.done = asyncio.Event()

    def add(self, a: int, b: int = 0) -> int:
        self.log.append(("add", a, b))
        return a + b

    async def aadd(self, a: int, b: int) -> int:
        self.log.append(("aadd", a, b))
        return a + b

    def fail(self, message: str) -> None:
        self.log.append(("fail", message))
        raise ValueError(message)

    async def mark_done(self) -> None:
        self.done.set()

    def batch(self) -> str:
        return "the remote batch"


@pytest.mark.both_loops
async def test_batch_returns_results_in_order() -> None:
    obj = Batched()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        b = p.batch()
        b.add(1, 2)
        b.aadd(3, 4)
        b.add(5, b=6)
        assert len(b) == 3
        assert await b() == [3, 7, 11]
        assert len(b) == 0  # emptied once sent
        assert obj.log == [("add", 1, 2), ("aadd", 3, 4), ("add", 5, 6)]
        assert await b() == []


async def test_batch_stops_at_the_first_error() -> None:
    obj = Batched()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        b = p.batch()
        b.add(1, 1)
        b.aadd(2, 2)
        b.fail("second")
        b.add(100, 100)
        with pytest.raises(ValueError, match="second") as info:
            await b()
        assert info.value.batch_results == [2, 4]  # type: ignore[attr-defined]
        assert ("add", 100, 100) not in obj.log
        assert obj.log == [("add", 1, 1), ("aadd", 2, 2), ("fail", "second")]
        b.nothing_here()
        b.add(1, 1)
        with pytest.raises(AttributeError):
            await b()
        assert obj.log[-1] == ("fail", "second")


async def test_batch_return_exceptions() -> None:
    obj = Batched()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        b = p.batch()
        b.add(1, 1)
        b.fail("one")
        b.nothing_here()
        b.aadd(2, 2)
        results = await b(return_exceptions=True)
        assert results is not None
        assert results[0] == 2
        assert isinstance(results[1], ValueError)
        assert str(results[1]) == "one"
        assert isinstance(results[2], AttributeError)
        assert results[3] == 4
        assert obj.log[-1] == ("aadd", 2, 2)


async def test_oneway_batch() -> None:
    obj = Batched()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        b = p.batch()
        b.add(1, 2)
        b.aadd(3, 4)
        b.mark_done()
        assert await b(oneway=True) is None
        await asyncio.wait_for(obj.done.wait(), BOUND)
        assert obj.log == [("add", 1, 2), ("aadd", 3, 4)]


async def test_a_remote_method_named_batch_is_reached_with_call() -> None:
    async with serving(Batched()) as (_, [uri]), Proxy(uri) as p:
        assert await p._call("batch") == "the remote batch"
        assert isinstance(p.batch(), asyncdist.objects.Batch)
        with pytest.raises(AttributeError):
            await p._call("_private")


# -- errors --------------------------------------------------------------------------------------


class CustomError(Exception):
    """Not on the allow-list: arrives as RemoteError."""


@asyncdist.expose
class Bank:
    def __init__(self) -> None:
        self.accounts = {"alice": 10}

    def balance(self, name: str) -> int:
        if name not in self.accounts:
            raise KeyError("unknown account")
        return self.accounts[name]

    async def abalance(self, name: str) -> int:
        return self.balance(name)

    def custom(self) -> None:
        raise CustomError("custom failure", 7)


@pytest.mark.both_loops
async def test_user_exceptions_keep_their_type_and_remote_traceback() -> None:
    async with serving(Bank()) as (_, [uri]), Proxy(uri) as p:
        assert await p.balance("alice") == 10
        for method in (p.balance, p.abalance):
            with pytest.raises(KeyError) as info:
                await method("bob")
            assert info.value.args == ("unknown account",)
            tb = info.value.remote_traceback  # type: ignore[attr-defined]
            assert "in balance" in tb
            assert "KeyError" in tb
        assert await p.abalance("alice") == 10


async def test_a_custom_exception_arrives_as_remote_error() -> None:
    async with serving(Bank()) as (_, [uri]), Proxy(uri) as p:
        with pytest.raises(RemoteError) as info:
            await p.custom()
        assert info.value.type_name.endswith("CustomError")
        assert "custom failure" in info.value.message
        assert "in custom" in info.value.remote_traceback
        assert await p.balance("alice") == 10


async def test_unknown_unregistered_and_unregistered_after_use_ids() -> None:
    obj = Bank()
    async with Daemon() as daemon:
        random_proxy = Proxy(f"adist:{secrets.token_hex(16)}@{daemon.location}", connect_attempts=1)
        with pytest.raises(UnknownObjectError):
            await random_proxy.balance("alice")
        await random_proxy._release()

        uri = daemon.register(obj)
        daemon.unregister(obj)
        before_use = Proxy(uri)
        with pytest.raises(UnknownObjectError):
            await before_use.balance("alice")
        await before_use._release()

        uri = daemon.register(obj)
        async with Proxy(uri) as p:
            assert await p.balance("alice") == 10
            daemon.unregister(uri)
            with pytest.raises(UnknownObjectError):
                await p.balance("alice")
            with pytest.raises(UnknownObjectError):
                await p.abalance("alice")
            assert p._conn is not None
            with pytest.raises(UnknownObjectError):
                await p._conn.request("o.get", [oid_of(uri), "accounts"])
            daemon.register(obj, oid_of(uri))
            assert await p.balance("alice") == 10  # same connection, the id is back


# -- the daemon ----------------------------------------------------------------------------------


@asyncdist.expose
class Echo:
    def echo(self, x: Any) -> Any:
        return x

    async def aecho(self, x: Any) -> Any:
        return x

    def square(self, x: int) -> int:
        return x * x


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    path = tmp_path / "d.sock"
    if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to ~108 bytes
        pytest.skip(f"temporary path too long for a Unix socket: {path}")
    return path


@pytest.mark.both_loops
async def test_register_returns_uris_with_random_distinct_ids() -> None:
    async with Daemon() as daemon:
        objs = [Echo() for _ in range(20)]
        uris = [daemon.register(obj) for obj in objs]
        ids = set()
        for uri, obj in zip(uris, objs, strict=True):
            parsed = URI.parse(uri)
            assert uri == f"adist:{parsed.object}@127.0.0.1:{daemon.port}"
            assert parsed.scheme == "adist"
            assert (parsed.host, parsed.port) == ("127.0.0.1", daemon.port)
            assert len(parsed.object) == 32
            int(parsed.object, 16)
            ids.add(parsed.object)
            assert daemon.uri_for(obj) == uri
            assert daemon.uri_for(parsed.object) == uri
            assert daemon.objects[parsed.object] is obj
        assert len(ids) == 20
        assert set(daemon.objects) == ids | {DAEMON_OBJECT_ID}
        async with Proxy(uris[7]) as p:
            assert await p.echo("seven") == "seven"


async def test_register_with_object_id_twice_and_force() -> None:
    async with Daemon() as daemon:
        first, second = Echo(), Echo()
        uri = daemon.register(first, object_id="my.echo-1_x")
        assert uri == f"adist:my.echo-1_x@{daemon.location}"
        with pytest.raises(ValueError):
            daemon.register(first)  # the same object again
        with pytest.raises(ValueError):
            daemon.register(second, object_id="my.echo-1_x")  # the same id again
        with pytest.raises(ValueError):
            daemon.register(second, object_id="bad id")
        with pytest.raises(ValueError):
            daemon.register(second, object_id=DAEMON_OBJECT_ID)
        assert daemon.objects["my.echo-1_x"] is first
        assert daemon.register(second, object_id="my.echo-1_x", force=True) == uri
        assert daemon.objects["my.echo-1_x"] is second
        assert daemon.uri_for(second) == uri
        with pytest.raises(KeyError):
            daemon.uri_for(first)
        daemon.register(Echo, object_id="by.class")
        with pytest.raises(ValueError):
            daemon.register(Echo)
        assert daemon.objects["by.class"] is Echo


async def test_nat_host_and_port_go_into_the_uris() -> None:
    async with Daemon(nat_host="gateway.example", nat_port=4321) as daemon:
        uri = daemon.register(Echo(), object_id="echo")
        assert uri == "adist:echo@gateway.example:4321"
        assert daemon.location == "gateway.example:4321"
        assert daemon.port != 4321
    async with Daemon(nat_host="::1") as daemon:
        assert daemon.register(Echo(), object_id="e") == f"adist:e@[::1]:{daemon.port}"


async def test_unregister_by_object_id_uri_and_class() -> None:
    async with Daemon() as daemon:
        a, b, c = Echo(), Echo(), Echo()
        ua, ub, uc = daemon.register(a), daemon.register(b), daemon.register(c)
        ud = daemon.register(Echo)
        daemon.unregister(a)
        daemon.unregister(oid_of(ub))
        daemon.unregister(uc)
        daemon.unregister(Echo)
        assert set(daemon.objects) == {DAEMON_OBJECT_ID}
        for obj in (a, b, c, Echo):
            with pytest.raises(KeyError):
                daemon.uri_for(obj)
        daemon.unregister("no-such-id")  # unknown ones are ignored
        daemon.unregister(DAEMON_OBJECT_ID)  # the daemon's own object stays
        assert set(daemon.objects) == {DAEMON_OBJECT_ID}
        for uri in (ua, ub, uc, ud):
            p = Proxy(uri, connect_attempts=1)
            with pytest.raises(UnknownObjectError):
                await p.echo(1)
            await p._release()
        assert daemon.register(a) != ua  # registered again: a new id


async def test_serve_forever_returns_after_close_from_another_task() -> None:
    daemon = Daemon()
    await daemon.start()
    uri = daemon.register(Echo())
    server = asyncio.ensure_future(daemon.serve_forever())
    try:
        async with Proxy(uri) as p:
            assert await p.echo(1) == 1
            assert not server.done()
            daemon.close()
            await asyncio.wait_for(server, BOUND)
        assert server.exception() is None
        p = Proxy(uri, connect_attempts=1)
        with pytest.raises(ConnectError):
            await p.echo(1)
        await p._release()
    finally:
        server.cancel()
        await daemon.aclose()


async def test_cancelling_serve_forever_closes_the_daemon() -> None:
    daemon = await Daemon()
    uri = daemon.register(Echo())
    server = asyncio.ensure_future(daemon.serve_forever())
    async with Proxy(uri, connect_attempts=1) as p:
        assert await p.echo(2) == 2
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        await daemon.wait_closed()
        assert p._conn is not None
        assert p._conn.closed
        with pytest.raises(ConnectError):
            await p.echo(3)  # the next call reconnects, and nothing listens any more


@pytest.mark.both_loops
async def test_many_clients_at_once() -> None:
    async with serving(Echo()) as (daemon, [uri]):
        proxies = [Proxy(uri) for _ in range(20)]
        try:

            async def client(n: int, p: Proxy) -> None:
                values = [(n, i) for i in range(50)]
                calls = [p.aecho([n, i]) if i % 2 else p.square(n * 100 + i) for i in range(50)]
                results = await asyncio.gather(*calls)
                for (n_, i), result in zip(values, results, strict=True):
                    assert result == ([n_, i] if i % 2 else (n_ * 100 + i) ** 2)

            await asyncio.wait_for(asyncio.gather(*(client(n, p) for n, p in enumerate(proxies))), BOUND)
            assert len(daemon.server.connections) == 20
            assert daemon.server.stats.opened == 20
        finally:
            for p in proxies:
                await p._release()


async def test_unix_socket_daemon(sock_path: Path) -> None:
    async with Daemon(path=sock_path) as daemon:
        uri = daemon.register(Echo(), object_id="echo")
        assert uri == f"adist:echo@./u:{sock_path}"
        assert daemon.location == f"./u:{sock_path}"
        parsed = URI.parse(uri)
        assert (parsed.path, parsed.host, parsed.port) == (str(sock_path), None, None)
        async with Proxy(uri) as p:
            assert await p.echo("over unix") == "over unix"
            assert await p.aecho([1, 2]) == [1, 2]
    assert not sock_path.exists()


async def test_a_daemon_with_a_secret_refuses_clients_without_it(secret: str) -> None:
    async with serving(Echo(), secret=secret) as (_, [uri]):
        p = Proxy(uri)
        with pytest.raises(AuthenticationError):
            await p.echo(1)
        await p._release()
        wrong = Proxy(uri, secret=secret[::-1])
        with pytest.raises(AuthenticationError):
            await wrong.echo(1)
        await wrong._release()
        async with Proxy(uri, secret=secret) as good:
            assert await good.echo(1) == 1


async def test_async_with_daemon_starts_and_closes() -> None:
    daemon = Daemon()
    assert "not started" in repr(daemon)
    with pytest.raises(RuntimeError):
        _ = daemon.port
    async with daemon as d:
        assert d is daemon
        uri = daemon.register(Echo())
        assert str(daemon.port) in repr(daemon)
        with pytest.raises(RuntimeError):
            await daemon.start()
        async with Proxy(uri) as p:
            assert await p.echo(1) == 1
    p = Proxy(uri, connect_attempts=1)
    with pytest.raises(ConnectError):
        await p.echo(1)
    await p._release()


@pytest.mark.both_loops
async def test_the_daemon_object_answers_ping_and_registered() -> None:
    async with serving(Echo(), Echo()) as (daemon, uris):
        uri = f"adist:{DAEMON_OBJECT_ID}@{daemon.location}"
        assert daemon.uri_for(DAEMON_OBJECT_ID) == uri
        async with Proxy(uri) as p:
            assert await p.ping() is None
            assert await p.registered() == sorted([DAEMON_OBJECT_ID, *(oid_of(u) for u in uris)])
            info = await p.info()
            assert daemon.location in info
            assert "3 objects" in info


# -- proxies -------------------------------------------------------------------------------------


@asyncdist.expose
class Service:
    def __init__(self) -> None:
        self.hang_started = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.calls = 0

    async def hang(self) -> None:
        self.calls += 1
        self.hang_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise

    async def echo(self, x: Any) -> Any:
        self.calls += 1
        return x

    def plain(self, x: int) -> int:
        return -x

    @property
    def name(self) -> str:
        return "service"


@pytest.mark.both_loops
async def test_a_proxy_connects_lazily_and_shares_one_connection() -> None:
    async with serving(Service()) as (daemon, [uri]):
        p = Proxy(uri)
        try:
            assert p._conn is None
            assert "not connected" in repr(p)
            assert daemon.server.stats.accepted == 0
            results = await asyncio.gather(*(p.echo(i) for i in range(100)), *(p.plain(i) for i in range(5)))
            assert results == [*range(100), 0, -1, -2, -3, -4]
            assert daemon.server.stats.opened == 1
            assert len(daemon.server.connections) == 1
            assert "(connected)" in repr(p)
            assert str(uri) in repr(p)
        finally:
            await p._release()


async def test_release_then_a_call_reconnects() -> None:
    async with serving(Service()) as (daemon, [uri]):
        async with Proxy(uri) as p:
            first = p._conn
            assert first is not None
            assert daemon.server.stats.opened == 1
            await p._release()
            assert first.closed
            assert conn_of(p) is None
            await p._release()  # idempotent
            assert await p.echo("again") == "again"
            second = conn_of(p)
            assert second is not None
            assert second is not first
            assert daemon.server.stats.opened == 2
        assert conn_of(p) is None
        await eventually(lambda: not daemon.server.connections, "the daemon still lists a connection")


@pytest.mark.both_loops
async def test_proxy_timeout_raises_and_cancels_the_remote_method() -> None:
    obj = Service()
    async with serving(obj) as (_, [uri]), Proxy(uri, timeout=0.2 * SCALE) as p:
        with pytest.raises(TimeoutError):
            await p.hang()
        await asyncio.wait_for(obj.hang_cancelled.wait(), BOUND)
        assert await p.echo(1) == 1  # the connection is still fine
        p._timeout = None
        assert await p.name == "service"


async def test_cancelling_the_caller_cancels_the_remote_method() -> None:
    obj = Service()
    async with serving(obj) as (_, [uri]), Proxy(uri) as p:
        call = asyncio.ensure_future(p.hang())
        await asyncio.wait_for(obj.hang_started.wait(), BOUND)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(obj.hang_cancelled.wait(), BOUND)
        assert await p.echo(2) == 2


def test_proxy_names_equality_hash_and_repr() -> None:
    p = Proxy("shop")
    assert p._uri == URI("adistname", "shop")
    assert str(p._uri) == "adistname:shop"
    assert Proxy("adistname:shop") == p
    uri = "adist:abc@127.0.0.1:9999"
    a, b, c = Proxy(uri), Proxy(URI.parse(uri)), Proxy("adist:abd@127.0.0.1:9999")
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert a != uri
    assert repr(a) == f"<asyncdist.Proxy {uri} (not connected)>"
    with pytest.raises(ValueError):
        Proxy("adist:no-location")
    with pytest.raises(ValueError):
        Proxy(uri, connect_attempts=0)
    with pytest.raises(AttributeError):
        _ = a._no_such_local_name


async def test_dir_lists_remote_members_after_connect() -> None:
    async with serving(Service()) as (_, [uri]):
        p = Proxy(uri)
        try:
            assert "echo" not in dir(p)
            await p._connect()
            names = dir(p)
            assert {"echo", "hang", "plain", "name", "_release", "batch"} <= set(names)
            assert "calls" not in names
        finally:
            await p._release()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_proxy_reused_after_its_event_loop_closed_closes_the_old_connection() -> None:
    async with serving(Echo()) as (daemon, [uri]):
        p: Proxy | None = Proxy(uri)
        conns: list[Any] = []

        async def use() -> None:
            assert p is not None
            assert await p.echo(1) == 1
            conns.append(conn_of(p))

        def two_runs() -> None:
            asyncio.run(use())
            asyncio.run(use())  # the first loop is closed: the proxy starts afresh

        thread = threading.Thread(target=two_runs)
        thread.start()
        await eventually(lambda: not thread.is_alive(), "the other loops did not finish")
        thread.join()
        try:
            assert len(conns) == 2
            assert conns[0] is not conns[1]
            await eventually(
                lambda: len(daemon.server.connections) <= 1,
                "the connection of the closed loop is still open",
                timeout=1.0,
            )
        finally:
            p = None
            conns.clear()
            gc.collect()


async def test_a_proxy_used_from_another_event_loop_raises_runtime_error() -> None:
    async with serving(Service()) as (_, [uri]), Proxy(uri) as p:
        assert await p.echo(1) == 1
        outcome: list[BaseException | Any] = []

        async def use_elsewhere() -> None:
            for call in (lambda: p.echo(2), lambda: p.name.get(), lambda: p._call("echo", 3)):
                try:
                    outcome.append(await call())
                except BaseException as exc:
                    outcome.append(exc)

        thread = threading.Thread(target=asyncio.run, args=(use_elsewhere(),))
        thread.start()
        await eventually(lambda: not thread.is_alive(), "the other loop did not finish")
        thread.join()
        assert len(outcome) == 3
        for result in outcome:
            assert isinstance(result, RuntimeError), result
        assert await p.echo(4) == 4  # still fine in its own loop


# -- callbacks and references --------------------------------------------------------------------


@asyncdist.expose
class Child:
    def __init__(self, label: str) -> None:
        self.label = label

    def get_label(self) -> str:
        return self.label

    async def alabel(self) -> str:
        return self.label.upper()


@asyncdist.expose
class Hub:
    """The daemon side of the callback tests."""

    def __init__(self) -> None:
        self.kept: list[Any] = []
        self.child = Child("child")
        self.made: list[weakref.ref[Child]] = []

    async def call_back(self, cb: Any, x: int) -> Any:
        assert isinstance(cb, Proxy)
        return [await cb.notify(x), await cb.anotify(x + 1), await cb.plain_notify(x + 2)]

    async def ping(self, cb: Any, n: int) -> int:
        if n == 0:
            return 0
        return 1 + int(await cb.pong(n - 1))

    async def keep(self, obj: Any) -> str:
        self.kept.append(obj)
        return type(obj).__name__

    async def drop(self) -> None:
        self.kept.clear()

    def make_child(self, label: str) -> Child:
        child = Child(label)
        self.made.append(weakref.ref(child))
        return child

    async def myself(self) -> Hub:
        return self

    async def is_me(self, obj: Any) -> bool:
        return obj is self

    async def the_child(self) -> Child:
        return self.child

    async def is_the_child(self, obj: Any) -> bool:
        return obj is self.child

    async def echo(self, obj: Any) -> Any:
        return obj

    async def hand_on(self, other: Any, cb: Any) -> Any:
        """Pass a callback proxy of one connection on to a third party over another."""
        async with other:
            return await other.call_back(cb, 1)

    async def call_third_party(self, other: Any, x: Any) -> Any:
        assert isinstance(other, Proxy)
        async with other:
            return await other.aecho(x)


@asyncdist.expose
class ClientCallback:
    """Lives in the client: no daemon on this side."""

    def __init__(self, hub: Proxy | None = None) -> None:
        self.hub = hub
        self.seen: list[int] = []
        self.depth_threads: set[int] = set()

    async def notify(self, x: int) -> str:
        self.seen.append(x)
        return f"notified {x}"

    async def anotify(self, x: int) -> int:
        self.seen.append(x)
        return threading.get_ident()

    def plain_notify(self, x: int) -> int:
        self.seen.append(x)
        return threading.get_ident()

    async def pong(self, n: int) -> int:
        assert self.hub is not None
        self.depth_threads.add(threading.get_ident())
        if n == 0:
            return 0
        return 1 + int(await self.hub.ping(self, n - 1))


@pytest.mark.both_loops
async def test_a_client_object_passed_as_argument_is_called_back_over_the_same_connection() -> None:
    async with serving(Hub()) as (daemon, [uri]), Proxy(uri) as p:
        cb = ClientCallback()
        result = await p.call_back(cb, 10)
        assert result[:2] == ["notified 10", threading.get_ident()]
        assert result[2] != threading.get_ident()  # a plain callback method runs in a thread
        assert cb.seen == [10, 11, 12]
        assert daemon.server.stats.opened == 1  # no other connection, no daemon on the client side
        assert await p.keep(cb) == "Proxy"


@pytest.mark.both_loops
async def test_nested_ping_pong_through_a_callback_does_not_deadlock() -> None:
    async with serving(Hub()) as (daemon, [uri]), Proxy(uri) as p:
        cb = ClientCallback(p)
        assert await asyncio.wait_for(p.ping(cb, 50), BOUND) == 50
        assert cb.depth_threads == {threading.get_ident()}
        assert daemon.server.stats.opened == 1


async def test_returned_exposed_objects_become_proxies_and_come_home_as_themselves() -> None:
    hub = Hub()
    async with serving(hub) as (daemon, [uri]), Proxy(uri) as p:
        child = await p.make_child("made")
        assert isinstance(child, Proxy)
        assert await child.get_label() == "made"
        assert await child.alabel() == "MADE"
        mine = await p.the_child()
        assert isinstance(mine, Proxy)
        assert await mine.get_label() == "child"
        assert await p.is_the_child(mine) is True
        assert await p.is_the_child(child) is False
        assert await p.echo(mine) == mine
        assert list(daemon.objects) == [DAEMON_OBJECT_ID, oid_of(uri)]  # never registered
        assert daemon.server.stats.opened == 1


async def test_a_registered_object_travels_as_a_proxy_and_comes_home_as_itself() -> None:
    hub = Hub()
    async with serving(hub) as (daemon, [uri]), Proxy(uri) as p:
        me = await p.myself()
        assert isinstance(me, Proxy)
        assert str(me._uri) == uri
        assert me == p  # the same object, over the same connection
        assert await p.is_me(me) is True
        assert await me.is_me(me) is True
        assert await p.is_me(Child("x")) is False
        assert await me.echo(7) == 7  # a derived proxy calls over the same connection
        assert daemon.server.stats.opened == 1


async def test_an_object_returned_by_reference_is_freed_after_the_client_drops_its_proxy() -> None:
    hub = Hub()
    async with serving(hub) as (_, [uri]), Proxy(uri) as p:
        child = await p.make_child("temporary")
        assert await child.get_label() == "temporary"
        [ref] = hub.made
        gc.collect()
        assert ref() is not None  # exported while the client holds a proxy
        del child

        def freed() -> bool:
            gc.collect()
            return ref() is None

        await eventually(freed, "the daemon kept an object no client refers to")
        assert await p.echo(1) == 1


async def test_a_dropped_proxy_closes_its_connection() -> None:
    async with serving(Echo()) as (daemon, [uri]):
        p = Proxy(uri)
        assert await p.echo(1) == 1
        conn = p._conn
        assert conn is not None
        del p
        gc.collect()
        await eventually(lambda: conn.closed, "a proxy nobody refers to kept its connection open")
        await eventually(lambda: not daemon.server.connections, "the daemon still lists the connection")


async def test_a_client_callback_object_is_freed_after_the_daemon_drops_its_proxy() -> None:
    hub = Hub()
    async with serving(hub) as (_, [uri]), Proxy(uri) as p:
        cb = ClientCallback()
        ref = weakref.ref(cb)
        assert await p.keep(cb) == "Proxy"
        assert await p.keep(cb) == "Proxy"
        del cb
        gc.collect()
        assert ref() is not None  # the daemon still holds a proxy to it
        await p.drop()

        def freed() -> bool:
            gc.collect()
            return ref() is None

        await eventually(freed, "the callback object outlived every proxy to it")
        assert await p.echo(5) == 5


async def test_a_callback_proxy_whose_connection_closed_raises_connection_closed() -> None:
    hub = Hub()
    async with serving(hub) as (_, [uri]):
        cb = ClientCallback()
        async with Proxy(uri) as p:
            await p.keep(cb)
        kept = hub.kept[0]
        await eventually(lambda: kept._conn is None or kept._conn.closed, "the connection did not close")
        with pytest.raises(ConnectionClosed):
            await kept.notify(1)
        assert cb.seen == []


async def test_a_proxy_passed_as_argument_reaches_a_third_party() -> None:
    async with serving(Hub()) as (hub_daemon, [hub_uri]), serving(Echo()) as (echo_daemon, [echo_uri]):
        async with Proxy(hub_uri) as hub, Proxy(echo_uri) as echo:
            assert await echo.echo("direct") == "direct"
            assert await hub.call_third_party(echo, [1, "x"]) == [1, "x"]
            assert echo_daemon.server.stats.opened == 2  # the hub dialled the echo daemon itself
            unconnected = Proxy(echo_uri)
            assert await hub.call_third_party(unconnected, "late") == "late"
            assert unconnected._conn is None
        assert hub_daemon.server.stats.opened == 1


async def test_an_adistname_proxy_passed_as_argument_keeps_its_name_server() -> None:
    async with (
        ns_daemon() as nsd,
        serving(Hub()) as (_, [hub_uri]),
        serving(Echo()) as (_, [echo_uri]),
    ):
        nsd.nameserver.register("third.echo", echo_uri)
        async with Proxy(hub_uri) as hub:
            named = Proxy("adistname:third.echo", ns_port=nsd.port)
            assert await hub.call_third_party(named, "by name") == "by name"


async def test_a_callback_handed_on_to_a_third_party_is_forwarded_back_to_the_client() -> None:
    async with serving(Hub()) as (_, [first_uri]), serving(Hub()) as (second_daemon, [second_uri]):
        async with Proxy(first_uri) as first:
            cb = ClientCallback()
            result = await first.hand_on(Proxy(second_uri), cb)
            assert result[:2] == ["notified 1", threading.get_ident()]
            assert cb.seen == [1, 2, 3]
        assert second_daemon.server.stats.opened == 1  # the first hub dialled the second


# -- chains through a name server ----------------------------------------------------------------


@asyncdist.expose
class Chain:
    """The Pyro chain example: each link forwards to the next by name until it is back home."""

    def __init__(self, name: str, next_name: str, ns_port: int) -> None:
        self.name = name
        self.next_name = next_name
        self.ns_port = ns_port
        self.next: Proxy | None = None

    async def process(self, message: list[str]) -> list[str]:
        if self.next is None:
            self.next = Proxy("adistname:chain." + self.next_name, ns_port=self.ns_port)
        if self.name in message:
            return ["complete at " + self.name]
        message.append(self.name)
        result: list[str] = await self.next.process(message)
        result.insert(0, "passed on from " + self.name)
        return result


@pytest.mark.both_loops
async def test_a_chain_of_three_daemons_found_through_the_name_server() -> None:
    async with ns_daemon() as nsd:
        links = [Chain(str(i), str(i % 3 + 1), nsd.port) for i in (1, 2, 3)]
        try:
            async with (
                serving(links[0]) as (_, [u1]),
                serving(links[1]) as (_, [u2]),
                serving(links[2]) as (_, [u3]),
            ):
                async with asyncdist.locate_ns(port=nsd.port) as ns:
                    for name, uri in (("1", u1), ("2", u2), ("3", u3)):
                        await ns.register("chain." + name, uri)
                async with Proxy("adistname:chain.1", ns_port=nsd.port) as first:
                    result = await asyncio.wait_for(first.process(["hello"]), BOUND)
                assert result == [
                    "passed on from 1",
                    "passed on from 2",
                    "passed on from 3",
                    "complete at 1",
                ]
                async with Proxy(u2) as second:
                    assert await second.process(["x"]) == [
                        "passed on from 2",
                        "passed on from 3",
                        "passed on from 1",
                        "complete at 2",
                    ]
        finally:
            for link in links:
                if link.next is not None:
                    await link.next._release()


# -- URIs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "obj", "host", "port", "path"),
    [
        ("adist:abc@127.0.0.1:9090", "adist", "abc", "127.0.0.1", 9090, None),
        ("ADIST:abc@localhost:1", "adist", "abc", "localhost", 1, None),
        ("adist:a.b-c_D9@[::1]:65535", "adist", "a.b-c_D9", "::1", 65535, None),
        ("adist:x@./u:/tmp/some dir/s.sock", "adist", "x", None, None, "/tmp/some dir/s.sock"),
        ("adistname:example.shop", "adistname", "example.shop", None, None, None),
        ("adistname:example.shop@ns.example:9091", "adistname", "example.shop", "ns.example", 9091, None),
        ("AdistName:ünïcode/name", "adistname", "ünïcode/name", None, None, None),
        ("adistmeta:tag1,tag2", "adistmeta", "tag1,tag2", None, None, None),
        ("adistmeta:tag1@10.0.0.1:9090", "adistmeta", "tag1", "10.0.0.1", 9090, None),
    ],
)
def test_uri_parse_valid(
    text: str, scheme: str, obj: str, host: str | None, port: int | None, path: str | None
) -> None:
    uri = URI.parse(text)
    assert (uri.scheme, uri.object, uri.host, uri.port, uri.path) == (scheme, obj, host, port, path)
    assert URI.parse(str(uri)) == uri
    assert URI.parse(uri) is uri
    if scheme == "adistmeta":
        assert uri.tags == frozenset(obj.split(","))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "pyro:abc@host:1",
        "adist:",
        "adist:abc",
        "adist:@host:1",
        "adist:abc@host",
        "adist:abc@:1",
        "adist:abc@host:",
        "adist:abc@host:0",
        "adist:abc@host:65536",
        "adist:abc@host:-1",
        "adist:abc@host:1x",
        "adist:abc@::1:80",
        "adist:abc@[::1]80",
        "adist:abc@[::1",
        "adist:ab c@host:1",
        "adist:a/b@host:1",
        "adist:" + "a" * 129 + "@host:1",
        "adist:abc@./u:",
        "adistname:",
        "adistname:a b",
        "adistname:a\tb",
        "adistname:" + "n" * 1025,
        "adistname:x@./u:/tmp/s",
        "adistmeta:",
        "adistmeta:,,",
        "adist:abc@host:1" + "x" * 5000,
    ],
)
def test_uri_parse_malformed_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        URI.parse(text)


def test_uri_parse_refuses_non_strings() -> None:
    for value in (None, 123, b"adist:abc@h:1", ["adist:abc@h:1"]):
        with pytest.raises(ValueError):
            URI.parse(value)  # type: ignore[arg-type]


_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-."
_HOST_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-."


@given(
    oid=st.text(alphabet=_ID_CHARS, min_size=1, max_size=128),
    host=st.one_of(
        st.text(alphabet=_HOST_CHARS, min_size=1, max_size=60),
        st.ip_addresses().map(str),
    ),
    port=st.integers(min_value=1, max_value=65535),
)
def test_uri_round_trip(oid: str, host: str, port: int) -> None:
    location = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    text = f"adist:{oid}@{location}"
    uri = URI.parse(text)
    assert (uri.scheme, uri.object, uri.host, uri.port, uri.path) == ("adist", oid, host, port, None)
    assert str(uri) == text
    assert URI.parse(str(uri)) == uri


@given(name=st.text(min_size=1, max_size=200).filter(lambda s: s.isprintable() and "@" not in s))
def test_uri_names_round_trip(name: str) -> None:
    if any(c.isspace() for c in name):
        with pytest.raises(ValueError):
            URI.parse("adistname:" + name)
        return
    uri = URI.parse("adistname:" + name)
    assert uri.object == name
    assert str(uri) == "adistname:" + name
