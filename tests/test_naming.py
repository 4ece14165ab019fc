"""The name server: :class:`~asyncdist.naming.NameServerDaemon`, :func:`asyncdist.locate_ns`.

Registration, look-up, listing by prefix and metadata, removal, limits on
what a client may register, storage across restarts, the shared secret,
clean-up of dead registrations, ``adistname:``/``adistmeta:`` proxies that
resolve (and re-resolve) through it, and the ``asyncdist ns`` command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE, conn_of, eventually, free_port, stop

import asyncdist
from asyncdist import (
    AuthenticationError,
    ConnectionClosed,
    Daemon,
    NamingError,
    Proxy,
    UnknownObjectError,
)
from asyncdist.naming import MAX_META_TAGS, NameServer, NameServerDaemon, locate_ns
from asyncdist.objects import NS_OBJECT_ID

#: Upper bound for anything a test waits for (a safety net: tests set their events).
BOUND = 5.0 * SCALE


@asyncdist.expose
class Shop:
    def __init__(self, label: str = "shop") -> None:
        self.label = label
        self.slow_calls = 0
        self.slow_started = asyncio.Event()

    async def who(self) -> str:
        return self.label

    def plain_who(self) -> str:
        return self.label

    async def slow(self) -> None:
        self.slow_calls += 1
        self.slow_started.set()
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def ns_daemon(**kwargs: Any) -> AsyncIterator[NameServerDaemon]:
    """``async with NameServerDaemon(...)`` (typed: Daemon.__aenter__ is annotated as Daemon)."""
    nsd = NameServerDaemon(**kwargs)
    async with nsd:
        yield nsd


@contextlib.asynccontextmanager
async def name_server(**kwargs: Any) -> AsyncIterator[tuple[NameServerDaemon, Proxy]]:
    """A name server on a free port and a connected proxy to it."""
    async with (
        ns_daemon(port=0, **kwargs) as nsd,
        locate_ns(port=nsd.port, secret=kwargs.get("secret")) as ns,
    ):
        yield nsd, ns


# -- registry ------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_register_lookup_list_remove_count_ping() -> None:
    async with name_server() as (nsd, ns):
        assert nsd.uri == f"adist:{NS_OBJECT_ID}@127.0.0.1:{nsd.port}"
        assert isinstance(nsd.nameserver, NameServer)
        assert await ns.ping() is None
        assert await ns.count() == 0
        assert await ns.list() == {}
        u1, u2, u3 = (f"adist:obj{i}@127.0.0.1:{1000 + i}" for i in (1, 2, 3))
        await ns.register("example.shop", u1, ["shop", "fruit"])
        await ns.register("example.bank", u2, ("bank",))
        await ns.register("other.thing", u3)
        assert await ns.count() == 3
        assert await ns.lookup("example.shop") == u1
        uri, tags = await ns.lookup("example.shop", return_metadata=True)
        assert (uri, tags) == (u1, frozenset({"shop", "fruit"}))
        assert await ns.list() == {"example.shop": u1, "example.bank": u2, "other.thing": u3}
        assert await ns.list(prefix="example.") == {"example.shop": u1, "example.bank": u2}
        assert await ns.list(prefix="nothing") == {}
        assert await ns.list(metadata_all=["shop", "fruit"]) == {"example.shop": u1}
        assert await ns.list(metadata_all=["shop", "bank"]) == {}
        assert await ns.list(metadata_any=["bank", "fruit"]) == {"example.shop": u1, "example.bank": u2}
        assert await ns.list(metadata_any=[]) == {}
        assert await ns.list(prefix="example.", metadata_any=["bank"]) == {"example.bank": u2}
        listed = await ns.list(prefix="example.b", return_metadata=True)
        assert {k: tuple(v) for k, v in listed.items()} == {"example.bank": (u2, frozenset({"bank"}))}

        await ns.set_metadata("other.thing", ["new", "tags"])
        assert await ns.list(metadata_all=["new"]) == {"other.thing": u3}
        with pytest.raises(NamingError):
            await ns.set_metadata("no.such.name", ["x"])

        await ns.register("example.shop", u3)  # replaces, metadata too
        assert await ns.lookup("example.shop", return_metadata=True) == (u3, frozenset())

        assert await ns.remove("example.shop") == 1
        assert await ns.remove("example.shop") == 0
        with pytest.raises(NamingError):
            await ns.lookup("example.shop")
        await ns.register("example.a", u1)
        await ns.register("example.b", u1)
        assert await ns.remove(prefix="example.") == 3
        assert await ns.list() == {"other.thing": u3}
        with pytest.raises(NamingError):
            await ns.remove()
        assert await ns.count() == 1


async def test_lookup_of_an_unknown_name_raises_naming_error() -> None:
    async with name_server() as (_, ns):
        with pytest.raises(NamingError, match="unknown name"):
            await ns.lookup("nobody")
        with pytest.raises(LookupError):  # NamingError is also a LookupError
            await ns.lookup("nobody")
        with pytest.raises(NamingError):
            await ns.lookup(12345)


async def test_register_safe_refuses_an_existing_name() -> None:
    async with name_server() as (_, ns):
        await ns.register("name", "adist:first@127.0.0.1:1", safe=True)
        with pytest.raises(NamingError, match="already registered"):
            await ns.register("name", "adist:second@127.0.0.1:2", safe=True)
        assert await ns.lookup("name") == "adist:first@127.0.0.1:1"
        await ns.register("name", "adist:second@127.0.0.1:2")
        assert await ns.lookup("name") == "adist:second@127.0.0.1:2"


@pytest.mark.both_loops
async def test_bad_registrations_are_refused_and_the_name_server_keeps_serving() -> None:
    good = "adist:obj@127.0.0.1:1234"
    bad_calls: list[tuple[Any, Any, Any]] = [
        ("n", "adistname:other", ()),
        ("n", "adistmeta:tag", ()),
        ("n", "http://127.0.0.1:80/", ()),
        ("n", "adist:no-location", ()),
        ("n", "adist:bad id@127.0.0.1:1", ()),
        ("n", "adist:x@127.0.0.1:1" + "0" * 2000, ()),
        ("n", 12345, ()),
        ("n", None, ()),
        ("x" * (1 << 20), good, ()),  # a 1 MiB name
        ("a@b", good, ()),
        ("a b", good, ()),
        ("tab\tname", good, ()),
        ("new\nline", good, ()),
        ("", good, ()),
        (42, good, ()),
        ("n", good, [f"tag{i}" for i in range(MAX_META_TAGS + 1)]),
        ("n", good, ["t" * 129]),
        ("n", good, [""]),
        ("n", good, [1, 2]),
        ("n", good, "a string is not a list of tags"),
    ]
    async with name_server() as (_, ns):
        for name, uri, metadata in bad_calls:
            with pytest.raises(NamingError):
                await ns.register(name, uri, metadata)
            assert await ns.ping() is None
        assert await ns.count() == 0
        await ns.register("n", good, [f"tag{i}" for i in range(MAX_META_TAGS)])
        assert await ns.lookup("n") == good
        with pytest.raises(NamingError):
            await ns.set_metadata("n", [f"tag{i}" for i in range(MAX_META_TAGS + 1)])
        with pytest.raises(NamingError):
            await ns.list(metadata_all=[f"tag{i}" for i in range(MAX_META_TAGS + 1)])
        with pytest.raises(NamingError):
            await ns.list(prefix=123)
        assert await ns.count() == 1


async def test_max_entries_caps_the_registry() -> None:
    async with name_server(max_entries=3) as (_, ns):
        for i in range(3):
            await ns.register(f"n{i}", f"adist:o{i}@127.0.0.1:1")
        with pytest.raises(NamingError, match="full"):
            await ns.register("n3", "adist:o3@127.0.0.1:1")
        await ns.register("n0", "adist:replaced@127.0.0.1:1")  # replacing is not growing
        assert await ns.lookup("n0") == "adist:replaced@127.0.0.1:1"
        assert await ns.count() == 3
        assert await ns.remove("n1") == 1
        await ns.register("n3", "adist:o3@127.0.0.1:1")
        assert await ns.count() == 3


async def test_a_proxy_passed_as_the_uri_is_accepted() -> None:
    async with name_server() as (_, ns), Daemon() as daemon:
        uri = daemon.register(Shop())
        await ns.register("by.proxy", Proxy(uri))
        assert await ns.lookup("by.proxy") == uri
        async with Proxy(uri) as connected:
            assert await connected.who() == "shop"
            await ns.register("by.connected.proxy", connected)
        assert await ns.lookup("by.connected.proxy") == uri
        with pytest.raises(NamingError):
            await ns.register("by.name", Proxy("adistname:by.proxy"))  # not an adist: URI


# -- locating the name server --------------------------------------------------------------------


async def test_locate_ns_with_nothing_listening_raises_naming_error_quickly() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(NamingError) as info:
        await locate_ns(port=port)
    assert time.monotonic() - start < 2.0 * SCALE
    assert isinstance(info.value.__cause__, asyncdist.ConnectError)
    with pytest.raises(NamingError):
        async with locate_ns("127.0.0.1", port):
            pass


async def test_locate_ns_on_a_daemon_without_a_name_server_raises_naming_error() -> None:
    async with Daemon() as daemon:
        daemon.register(Shop())
        with pytest.raises(NamingError) as info:
            await locate_ns(port=daemon.port)
        assert isinstance(info.value.__cause__, UnknownObjectError)
        await eventually(lambda: not daemon.server.connections, "locate_ns left a connection open")


async def test_locate_ns_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with ns_daemon(port=0) as nsd:
        monkeypatch.setenv("ASYNCDIST_NS_HOST", "127.0.0.1")
        monkeypatch.setenv("ASYNCDIST_NS_PORT", str(nsd.port))
        async with locate_ns() as ns:
            await ns.register("from.env", "adist:o@127.0.0.1:1")
        assert "from.env" in nsd.nameserver.list()
        async with Daemon() as daemon:
            nsd.nameserver.register("env.shop", daemon.register(Shop("env")))
            async with Proxy("adistname:env.shop") as p:  # resolved at ASYNCDIST_NS_HOST/PORT
                assert await p.who() == "env"
        monkeypatch.setenv("ASYNCDIST_NS_PORT", str(free_port()))
        with pytest.raises(NamingError):
            await locate_ns()
        async with locate_ns(port=nsd.port) as ns:  # an argument wins over the environment
            assert await ns.lookup("from.env") == "adist:o@127.0.0.1:1"
        monkeypatch.setenv("ASYNCDIST_NS_PORT", "not-a-port")
        with pytest.raises(ValueError):
            await locate_ns()


@pytest.mark.both_loops
async def test_locate_ns_await_and_async_with() -> None:
    async with ns_daemon(port=0) as nsd:
        ns = await locate_ns(port=nsd.port)
        try:
            assert isinstance(ns, Proxy)
            assert ns._conn is not None  # located means connected
            await ns.register("a", "adist:o@127.0.0.1:1")
        finally:
            await ns._release()
        assert conn_of(ns) is None
        async with locate_ns(port=nsd.port) as ns2:
            assert await ns2.lookup("a") == "adist:o@127.0.0.1:1"
            conn = ns2._conn
        assert conn is not None
        assert conn.closed
        await eventually(lambda: not nsd.server.connections, "the name server still lists clients")


# -- storage -------------------------------------------------------------------------------------


async def test_storage_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "ns.db"
    async with name_server(storage=db) as (_, ns):
        await ns.register("kept", "adist:k@127.0.0.1:1", ["a", "b"])
        await ns.register("removed", "adist:r@127.0.0.1:1")
        await ns.register("retagged", "adist:t@127.0.0.1:1", ["old"])
        await ns.register("many.1", "adist:m1@127.0.0.1:1")
        await ns.register("many.2", "adist:m2@127.0.0.1:1")
        assert await ns.remove("removed") == 1
        assert await ns.remove(prefix="many.") == 2
        await ns.set_metadata("retagged", ["new"])
    assert db.exists()
    async with name_server(storage=db) as (_, ns):
        assert await ns.list(return_metadata=True) == {
            "kept": ("adist:k@127.0.0.1:1", frozenset({"a", "b"})),
            "retagged": ("adist:t@127.0.0.1:1", frozenset({"new"})),
        }
        await ns.register("second.run", "adist:s@127.0.0.1:1")
    async with name_server(storage=str(db)) as (_, ns):
        assert sorted(await ns.list()) == ["kept", "retagged", "second.run"]


async def test_without_storage_registrations_are_lost() -> None:
    async with name_server() as (nsd, ns):
        port = nsd.port
        await ns.register("gone", "adist:g@127.0.0.1:1")
    async with ns_daemon(port=port) as nsd, locate_ns(port=nsd.port) as ns:
        assert await ns.count() == 0
        with pytest.raises(NamingError):
            await ns.lookup("gone")


def db_files_open(db: Path) -> list[str]:
    """Open file descriptors of this process on ``db`` (and its -wal/-shm files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(db)):
                found.append(target)
    return found


async def test_a_name_server_that_fails_to_start_closes_its_storage(tmp_path: Path) -> None:
    db = tmp_path / "ns.db"
    async with ns_daemon(port=0) as running:
        nsd = NameServerDaemon(port=running.port, storage=db)
        try:
            with pytest.raises(OSError):
                await nsd.start()
            await nsd.aclose()
            assert db_files_open(db) == []
        finally:
            nsd.nameserver.close()  # what the daemon should have done (for the leak check)


# -- secret --------------------------------------------------------------------------------------


async def test_a_name_server_with_a_secret_refuses_clients_without_it(secret: str) -> None:
    async with ns_daemon(port=0, secret=secret) as nsd:
        for wrong in (None, secret[::-1]):
            with pytest.raises((AuthenticationError, NamingError)) as info:
                await locate_ns(port=nsd.port, secret=wrong)
            exc = info.value
            assert isinstance(exc, AuthenticationError) or isinstance(exc.__cause__, AuthenticationError)
            proxy = Proxy(nsd.uri, secret=wrong)
            with pytest.raises(AuthenticationError):
                await proxy.register("intruder", "adist:o@127.0.0.1:1")
            await proxy._release()
        assert nsd.nameserver.count() == 0
        async with locate_ns(port=nsd.port, secret=secret) as ns:
            await ns.register("friend", "adist:o@127.0.0.1:1")
            assert await ns.count() == 1


# -- clean-up ------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_clean_removes_dead_registrations_and_keeps_live_ones(secret: str) -> None:
    async with name_server() as (nsd, ns), Daemon() as live, Daemon(secret=secret) as locked:
        alive_uri = live.register(Shop("alive"))
        gone_obj = Shop("unregistered")
        gone_uri = live.register(gone_obj)
        closed = await Daemon()
        closed_uri = closed.register(Shop("closed"))
        await closed.aclose()
        await ns.register("alive", alive_uri)
        await ns.register("alive.daemon", f"adist:asyncdist.daemon@{live.location}")
        await ns.register("unregistered", gone_uri)
        await ns.register("closed", closed_uri)
        await ns.register("other.secret", locked.register(Shop("locked")))
        live.unregister(gone_obj)
        assert sorted(await ns.clean()) == ["closed", "unregistered"]
        # A daemon that refuses the name server's credentials may only be configured differently.
        assert sorted(await ns.list()) == ["alive", "alive.daemon", "other.secret"]
        assert await ns.clean() == []
        async with Proxy("adistname:alive", ns_port=nsd.port) as p:
            assert await p.who() == "alive"


async def test_autoclean_removes_a_dead_registration() -> None:
    async with name_server(autoclean=0.2 * SCALE) as (_, ns), Daemon() as live:
        alive_uri = live.register(Shop())
        await ns.register("alive", alive_uri)
        closed = await Daemon()
        closed_uri = closed.register(Shop())
        await closed.aclose()
        await ns.register("dead", closed_uri)
        assert await ns.count() == 2

        async def dead_gone() -> bool:
            return "dead" not in await ns.list()

        await eventually(dead_gone, "autoclean did not remove the dead registration", timeout=5.0)
        assert await ns.list() == {"alive": alive_uri}
    with pytest.raises(ValueError):
        NameServerDaemon(port=0, autoclean=0)


# -- adistname: and adistmeta: proxies -----------------------------------------------------------


@pytest.mark.both_loops
async def test_adistname_and_adistmeta_proxies_resolve_through_the_name_server() -> None:
    async with name_server() as (nsd, ns), Daemon() as daemon:
        await ns.register("example.shop", daemon.register(Shop("shop")), ["fruit", "shop"])
        await ns.register("example.bank", daemon.register(Shop("bank")), ["money"])
        async with Proxy("adistname:example.shop", ns_port=nsd.port) as p:
            assert await p.who() == "shop"
            assert await p.plain_who() == "shop"
            assert p._target is not None
            assert p._target.scheme == "adist"
        async with Proxy("example.bank", ns_port=nsd.port) as p:
            assert await p.who() == "bank"
        async with Proxy(f"adistname:example.shop@127.0.0.1:{nsd.port}") as p:
            assert await p.who() == "shop"
        async with Proxy("adistmeta:fruit,shop", ns_port=nsd.port) as p:
            assert await p.who() == "shop"
        async with Proxy(f"adistmeta:money@127.0.0.1:{nsd.port}") as p:
            assert await p.who() == "bank"
        for unknown in ("adistname:nobody", "adistmeta:fruit,money"):
            p = Proxy(unknown, ns_port=nsd.port)
            with pytest.raises(NamingError):
                await p.who()
            await p._release()


async def test_an_adistname_proxy_without_a_reachable_name_server_raises_naming_error() -> None:
    p = Proxy("adistname:anything", ns_port=free_port())
    start = time.monotonic()
    with pytest.raises(NamingError):
        await p.who()
    assert time.monotonic() - start < 2.0 * SCALE
    await p._release()


@pytest.mark.parametrize("how", ["aclose", "abort"])
async def test_an_adistname_proxy_reaches_the_new_object_after_a_restart(how: str) -> None:
    old, new = Shop("old"), Shop("new")
    async with name_server() as (nsd, ns):
        first = await Daemon(close_timeout=0.2 * SCALE)
        try:
            await ns.register("svc", first.register(old))
            p = Proxy("adistname:svc", ns_port=nsd.port, connect_attempts=1)
            try:
                assert await p.who() == "old"
                in_flight = asyncio.ensure_future(p.slow())
                await asyncio.wait_for(old.slow_started.wait(), BOUND)
                if how == "abort":
                    for conn in first.server.connections:
                        conn.abort()
                await first.aclose()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(in_flight, BOUND)

                async with Daemon() as second:
                    new_uri = second.register(new)
                    await ns.register("svc", new_uri)
                    assert await p.who() == "new"
                    assert p._target is not None
                    assert str(p._target) == new_uri
                    assert old.slow_calls == 1  # the call in flight was not retried
                    assert new.slow_calls == 0
            finally:
                await p._release()
        finally:
            await first.aclose()


async def test_an_adistname_proxy_to_a_removed_name_fails_on_reconnect() -> None:
    async with name_server() as (nsd, ns), Daemon() as daemon:
        await ns.register("svc", daemon.register(Shop()))
        p = Proxy("adistname:svc", ns_port=nsd.port, connect_attempts=1)
        assert await p.who() == "shop"
        await p._release()
        daemon.unregister(next(iter(daemon.objects.keys() - {"asyncdist.daemon"})))
        with pytest.raises(UnknownObjectError):
            await p.who()
        await p._release()
        await ns.remove("svc")
        with pytest.raises(NamingError):
            await p.who()
        await p._release()


# -- the command line ----------------------------------------------------------------------------

BANNER = re.compile(r"asyncdist name server at (adist:asyncdist\.naming@127\.0\.0\.1:(\d+))")


@contextlib.asynccontextmanager
async def ns_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, str]]:
    """Start a name server command; yield it, its port and its banner; SIGTERM and reap it on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    if "ASYNCDIST_TEST_TIME_SCALE" in os.environ:
        env["ASYNCDIST_TEST_TIME_SCALE"] = os.environ["ASYNCDIST_TEST_TIME_SCALE"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20 * SCALE):
            line = (await proc.stdout.readline()).decode()
        match = BANNER.search(line)
        if match is None:
            await stop(proc)
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
            raise AssertionError(f"no banner from {args}: {line!r}, stderr: {err[-2000:]}")
        yield proc, int(match.group(2)), line
    finally:
        await stop(proc)


@pytest.mark.parametrize(
    "command", [("-m", "asyncdist", "ns"), ("-m", "asyncdist.naming")], ids=["asyncdist-ns", "naming"]
)
async def test_the_command_line_name_server(command: tuple[str, ...]) -> None:
    async with ns_process(*command, "--port", "0") as (proc, port, line):
        assert port != 0
        assert "not persistent" in line
        async with locate_ns(port=port) as ns:
            await ns.register("cli.name", "adist:o@127.0.0.1:1")
            assert await ns.lookup("cli.name") == "adist:o@127.0.0.1:1"
            async with Daemon() as daemon:
                await ns.register("cli.shop", daemon.register(Shop("via cli")))
                async with Proxy("adistname:cli.shop", ns_port=port) as p:
                    assert await p.who() == "via cli"
        proc.terminate()
        async with asyncio.timeout(10 * SCALE):
            assert await proc.wait() == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "Traceback" not in err, err


async def test_python_m_asyncdist_naming_starts_without_warnings() -> None:
    async with ns_process("-m", "asyncdist.naming", "--port", "0") as (proc, port, _):
        async with locate_ns(port=port) as ns:
            assert await ns.ping() is None
        await stop(proc)
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "Warning" not in err, err


#: Runs ``asyncdist ns`` and sends itself SIGTERM the moment the ready banner is written: a
#: supervisor that stops the server as soon as it reports ready, without a race.
STOP_WHEN_READY = """
import os, signal, sys

class StopWhenReady:
    def __init__(self, out):
        self._out = out

    def write(self, text):
        n = self._out.write(text)
        if "asyncdist name server at" in text:
            self._out.flush()
            os.kill(os.getpid(), signal.SIGTERM)
        return n

    def __getattr__(self, name):
        return getattr(self._out, name)

sys.stdout = StopWhenReady(sys.stdout)
from asyncdist.cli import main
sys.exit(main(["ns", "--port", "0"]))
"""


async def test_sigterm_right_after_the_banner_closes_the_name_server_gracefully() -> None:
    async with ns_process("-c", STOP_WHEN_READY) as (proc, _, _):
        async with asyncio.timeout(10 * SCALE):
            assert await proc.wait() == 0


async def test_the_command_line_storage_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "cli-ns.db"
    async with ns_process("-m", "asyncdist", "ns", "--port", "0", "--storage", str(db)) as (proc, port, line):
        assert str(db) in line
        async with locate_ns(port=port) as ns:
            await ns.register("persistent", "adist:p@127.0.0.1:1", ["tag"])
        proc.terminate()
        async with asyncio.timeout(10 * SCALE):
            assert await proc.wait() == 0
    second = ns_process("-m", "asyncdist", "ns", "--port", "0", "--storage", str(db))
    async with second as (_, port, _), locate_ns(port=port) as ns:
        assert await ns.lookup("persistent", return_metadata=True) == (
            "adist:p@127.0.0.1:1",
            frozenset({"tag"}),
        )
