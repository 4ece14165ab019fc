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
import itertools
import os
import secrets
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import eventually
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

SCALE = float(os.environ.get("ASYNCDIST_TEST_TIME_SCALE", "1"))
#: Upper bound for anything a test waits for (a safety net: tests set their events).
BOUND = 5.0 * SCALE


def oid_of(uri: str) -> str:
    return URI.parse(uri).object


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

    @asyncdist.expose
    @property
    def shown_prop(self) -> int:
        return 7

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
        asyncdist.behavior(instance_mode="sometimes")  # type: ignore[arg-type]


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

    async with serving(PerSession) as (_, [uri]):
        async with Proxy(uri) as p1, Proxy(uri) as p2:
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
        await eventually(
            lambda: any("oneway failure" in (r.exc_text or r.getMessage()) for r in caplog.records)
            or any(r.exc_info and "oneway failure" in str(r.exc_info[1]) for r in caplog.records),
            "the daemon did not log the oneway method's exception",
        )


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
        assert await p.value.set(5) is None
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


async def test_unknown_object_ids_raise_unknown_object_error() -> None:
    obj = Bank()
    async with serving() as (daemon, _):
        location = daemon.location
        async with Proxy(f"adist:{secrets.token_hex(16)}@{location}") as _:
            pass
    # (the block above only checks that an unknown id fails at connect; see below)


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
