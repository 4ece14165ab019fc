"""Faults and bad input for remote objects and the name server (RELIABILITY.md F15-F17, B17, B27-B30, D5).

Daemons and name servers that a test kills run in their own processes
(``tests/_objects_server.py``): real signals sent by PID (SIGKILL,
SIGSTOP/SIGCONT), real sockets on 127.0.0.1, and a call log file that
outlives the process, so that a restarted daemon can prove how often a call
ran. Bad-input cases attack an in-process :class:`~asyncdist.objects.Daemon`
or :class:`~asyncdist.naming.NameServerDaemon` through a raw
:func:`asyncdist.connect` connection (the object protocol's handlers called
by hand) or a raw-socket :class:`EvilClient`, then check that only the
offending call (or connection) failed and that other clients are served.

Tests synchronise on process output (``READY``, ``STARTED``), counters and
server state, never on fixed sleeps, except where the point is to let a
heartbeat timeout pass. Every process started is SIGKILLed by PID and
reaped in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from _evil import EvilClient, pickle_bomb, traced
from _util import SCALE, eventually, finish, start

from asyncdist import (
    AuthenticationError,
    CommunicationError,
    ConfigurationError,
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionClosedError,
    NamingError,
    ProtocolError,
    Proxy,
    UnknownMethodError,
    UnknownObjectError,
    connect,
    expose,
    locate_ns,
    oneway,
)
from asyncdist import protocol as P
from asyncdist.naming import MAX_META_LEN, MAX_META_TAGS, MAX_URI, NameServerDaemon, publish
from asyncdist.objects import DAEMON_OBJECT_ID, NS_OBJECT_ID, Daemon

SERVER = Path(__file__).with_name("_objects_server.py")
SECRET = "objects-faults-secret-0123456789abcdef"
MIB = 1 << 20
OID = "recorder"

#: Short heartbeats for the tests about frozen peers (scaled).
HB: dict[str, float] = {"heartbeat_interval": 0.1 * SCALE, "heartbeat_timeout": 0.5 * SCALE}
#: A frozen peer is declared dead within the heartbeat timeout, plus two ticks and slack.
HB_BOUND = HB["heartbeat_timeout"] + 2 * HB["heartbeat_interval"] + 0.5 * SCALE
#: A killed process closes its sockets at once: far under the default 10 s heartbeat timeout.
PROMPT = 2.0 * SCALE
#: Connect timeout used where a peer accepts TCP but never completes the handshake.
HANDSHAKE = 0.3 * SCALE

_T = TypeVar("_T")


# -- helpers ------------------------------------------------------------------------------------


def now() -> float:
    return asyncio.get_running_loop().time()


async def raises(aw: Awaitable[Any], timeout: float | None = None) -> BaseException:
    """Await ``aw`` (at most ``timeout`` s, scaled; 5 s by default) and return what it raised."""
    try:
        value = await finish(aw, 5.0 * SCALE if timeout is None else timeout, "the call")
    except AssertionError:
        raise
    except Exception as exc:
        return exc
    raise AssertionError(f"expected an exception, got {value!r}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def daemon_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncdist-daemon") and t.is_alive()]


@dataclass
class Child:
    """A daemon or name server process started by :class:`Children`."""

    proc: asyncio.subprocess.Process
    port: int
    lines: list[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def expect(self, line: bytes, timeout: float = 5.0) -> None:
        """Read stdout until ``line`` (one whole line) appears."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout * SCALE):
            while True:
                got = await self.proc.stdout.readline()
                if not got:
                    raise AssertionError(f"process {self.pid} ended before printing {line!r}")
                self.lines.append(got.rstrip(b"\n"))
                if got.rstrip(b"\n") == line:
                    return


class Children:
    """Processes of ``_objects_server.py``; all SIGKILLed by PID and reaped on exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[Child] = []

    async def start(self, *args: str, secret: str | None = None) -> Child:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        errors = self.directory / f"child-{len(self.children)}.err"
        with open(errors, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SERVER), *args, *(["--secret-stdin"] if secret else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, env=env,
            )  # fmt: skip
        child = Child(proc, 0, [])
        self.children.append(child)
        assert proc.stdin is not None
        if secret:
            proc.stdin.write(secret.encode() + b"\n")
            await proc.stdin.drain()
        proc.stdin.close()
        assert proc.stdout is not None
        line = await finish(proc.stdout.readline(), 20 * SCALE, "the child's start")
        assert line.startswith(b"READY "), f"{args[0]} did not start: {line!r} {errors.read_text()[-2000:]}"
        child.port = int(line.split()[1])
        return child

    async def daemon(self, log: Path, *extra: str, port: int = 0) -> Child:
        """A daemon serving a Recorder as ``recorder``, its calls logged in ``log``."""
        return await self.start("daemon", "--port", str(port), "--oid", OID, "--log", str(log), *extra)

    async def ns(self, *extra: str, port: int = 0, secret: str | None = None) -> Child:
        """An in-memory name server."""
        return await self.start("ns", "--port", str(port), *extra, secret=secret)

    @staticmethod
    async def kill(child: Child) -> None:
        """SIGKILL by PID (a stopped process dies too), reap, and keep the rest of its output."""
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        await child.proc.wait()
        if child.proc.stdout is not None:
            child.lines.extend((await child.proc.stdout.read()).splitlines())

    async def aclose(self) -> None:
        for child in self.children:
            await self.kill(child)
        await asyncio.sleep(0)  # let the pipe transports close


@contextlib.asynccontextmanager
async def children(directory: Path) -> AsyncIterator[Children]:
    kids = Children(directory)
    try:
        yield kids
    finally:
        await kids.aclose()


@contextlib.asynccontextmanager
async def frozen(pid: int) -> AsyncIterator[None]:
    """SIGSTOP ``pid``; SIGCONT it on the way out, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def proxy_to(uri: str, **kwargs: Any) -> AsyncIterator[Proxy]:
    """A proxy, released on exit (it is not connected on entry)."""
    proxy = Proxy(uri, **kwargs)
    try:
        yield proxy
    finally:
        await proxy._release()


class Hidden:
    """A base that is not exposed: its members stay hidden in an exposed subclass."""

    def inherited(self) -> str:
        return "inherited"


@expose
class Target(Hidden):
    """The object attacked by the traversal tests; its private members would leave a marker."""

    def __init__(self, marker: Path | None = None) -> None:
        self._marker = marker
        self.data = "a plain attribute, never a member"
        self._value = 1

    def _private(self) -> str:
        if self._marker is not None:
            self._marker.touch()
        return "private"

    def echo(self, x: Any) -> Any:
        return x

    async def aecho(self, x: Any) -> Any:
        return x

    def numbers(self, n: int) -> Any:
        yield from range(n)

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, v: int) -> None:
        self._value = v

    @property
    def fixed(self) -> str:
        return "read-only"


@expose
class Blocker:
    """Plain methods that block their thread until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def block(self, tag: str) -> str:
        with self._lock:
            self.entered += 1
        self.gate.wait(20 * SCALE)
        return tag

    def plain(self) -> str:
        return "plain"

    async def aping(self) -> str:
        return "async"


@expose
class Sink:
    """A slow one-way plain method, counted."""

    def __init__(self) -> None:
        self.done = 0
        self._lock = threading.Lock()

    @oneway
    def note(self, i: int, padding: bytes) -> None:
        time.sleep(0.001)
        with self._lock:
            self.done += 1

    def plain(self) -> str:
        return "plain"

    async def aping(self) -> str:
        return "async"


# -- F15: a daemon dies or freezes during a call -----------------------------------------------


async def test_f15_killed_daemon_fails_the_call_once_then_the_proxy_reconnects_lazily(
    tmp_path: Path,
) -> None:
    log = tmp_path / "calls.log"
    async with children(tmp_path) as kids:
        first = await kids.daemon(log)
        uri = f"adist:{OID}@127.0.0.1:{first.port}"
        # Default heartbeats (10 s): the failure must come from the closed socket, not a timer.
        async with proxy_to(uri, connect_attempts=3) as proxy:
            assert await proxy.pid() == first.pid
            call = start(proxy.slow("k1"))
            await first.expect(b"STARTED k1")
            await kids.kill(first)
            t0 = now()
            with pytest.raises(ConnectionClosed):
                await finish(call, PROMPT, "the call in flight on a killed daemon")
            assert now() - t0 < PROMPT

            # Not back: the next call tries connect_attempts times, then gives up clearly.
            assert "not connected" in repr(proxy)
            t0 = now()
            exc = await raises(proxy.pid(), timeout=PROMPT)
            assert isinstance(exc, ConnectError), repr(exc)
            assert isinstance(exc, CommunicationError)
            assert "3 attempt" in str(exc)
            assert now() - t0 < PROMPT

            # Back on the same port with the same object id: the next call reconnects by itself.
            second = await kids.daemon(log, port=first.port)
            assert "not connected" in repr(proxy)  # lazy: nothing was dialled meanwhile
            assert await finish(proxy.pid(), PROMPT, "the call after the restart") == second.pid
            # At most once: the call that was in flight was never sent again.
            assert await proxy.executions("k1") == 1
            assert log.read_text().splitlines() == ["k1"]
        await kids.kill(second)
        assert not any(line.startswith(b"STARTED") for line in second.lines), second.lines


async def test_f15_frozen_daemon_fails_the_call_within_the_heartbeat_bound(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    async with children(tmp_path) as kids:
        child = await kids.daemon(log)
        uri = f"adist:{OID}@127.0.0.1:{child.port}"
        async with proxy_to(uri, connect_attempts=2, handshake_timeout=HANDSHAKE, **HB) as proxy:
            assert await proxy.pid() == child.pid
            call = start(proxy.slow("k2"))
            await child.expect(b"STARTED k2")
            async with frozen(child.pid):
                t0 = now()
                with pytest.raises(ConnectionClosed) as info:
                    await finish(call, HB_BOUND, "the call in flight on a frozen daemon")
                assert now() - t0 < HB_BOUND
                cause = info.value.__cause__
                assert isinstance(cause, ConnectionClosedError), repr(cause)
                assert "no data from the peer" in str(cause)
                # Still frozen: TCP connects (the kernel's backlog) but the handshake never
                # completes; each attempt is bounded by handshake_timeout.
                t0 = now()
                exc = await raises(proxy.pid(), timeout=PROMPT + 2 * HANDSHAKE)
                assert isinstance(exc, ConnectError), repr(exc)
                assert now() - t0 < 2 * HANDSHAKE + PROMPT
            # Woken up: the proxy reconnects, and the frozen call ran once (it is not retried).
            assert await finish(proxy.pid(), PROMPT, "the call after SIGCONT") == child.pid
            assert await proxy.executions("k2") == 1


# -- F16: the name server restarts -------------------------------------------------------------


async def test_f16_name_server_restart_loses_registrations_until_daemons_publish_again(
    tmp_path: Path,
) -> None:
    async with children(tmp_path) as kids:
        ns = await kids.ns()
        daemon = await kids.daemon(
            tmp_path / "calls.log", "--publish", "svc", "--ns-port", str(ns.port), "--every", str(0.2 * SCALE)
        )
        name = f"adistname:svc@127.0.0.1:{ns.port}"

        async def registered() -> bool:
            try:
                async with locate_ns(port=ns.port, handshake_timeout=PROMPT) as nsp:
                    return bool(await nsp.lookup("svc") == f"adist:{OID}@127.0.0.1:{daemon.port}")
            except (NamingError, CommunicationError):
                return False

        await eventually(registered, "the daemon never registered")
        async with proxy_to(name) as resolved:
            assert await resolved.pid() == daemon.pid

            await kids.kill(ns)
            # The outage: lookups fail fast and clearly (connection refused).
            t0 = now()
            exc = await raises(locate_ns(port=ns.port, handshake_timeout=HANDSHAKE), timeout=PROMPT)
            assert isinstance(exc, NamingError), repr(exc)
            assert isinstance(exc.__cause__, CommunicationError)
            async with proxy_to(name, handshake_timeout=HANDSHAKE) as fresh:
                exc = await raises(fresh.pid(), timeout=PROMPT)
                assert isinstance(exc, NamingError | CommunicationError), repr(exc)
            assert now() - t0 < PROMPT
            # A proxy that resolved before the outage talks to the daemon directly.
            assert await resolved.pid() == daemon.pid

            # Restarted in memory (daemon frozen, so that it cannot publish yet): the
            # registrations are gone. The name server is documented as not persistent.
            async with frozen(daemon.pid):
                await kids.ns(port=ns.port)
                async with locate_ns(port=ns.port) as nsp:
                    assert await nsp.count() == 0
                    with pytest.raises(NamingError, match="unknown name"):
                        await nsp.lookup("svc")
                async with proxy_to(name) as fresh:
                    exc = await raises(fresh.pid())
                    assert isinstance(exc, NamingError), repr(exc)
            # The daemon's publish() registers again within its period.
            await eventually(registered, "the daemon did not register again", timeout=5.0)
            async with proxy_to(name) as fresh:
                assert await fresh.pid() == daemon.pid


async def test_f16_frozen_name_server_lookup_is_bounded_by_the_connect_timeout(tmp_path: Path) -> None:
    async with children(tmp_path) as kids:
        ns = await kids.ns()
        async with frozen(ns.pid):
            t0 = now()
            exc = await raises(locate_ns(port=ns.port, handshake_timeout=HANDSHAKE), timeout=PROMPT)
            assert isinstance(exc, NamingError), repr(exc)
            assert isinstance(exc.__cause__, ConnectError)
            assert now() - t0 < HANDSHAKE + PROMPT


async def test_f16_frozen_name_server_adistname_proxy_honours_its_handshake_timeout(
    tmp_path: Path,
) -> None:
    async with children(tmp_path) as kids:
        ns = await kids.ns()
        async with frozen(ns.pid):
            name = f"adistname:svc@127.0.0.1:{ns.port}"
            async with proxy_to(name, handshake_timeout=HANDSHAKE, connect_attempts=1) as proxy:
                bound = min(HANDSHAKE + PROMPT, 8.0)  # under the 10 s default it must not use
                t0 = now()
                exc = await raises(proxy.pid(), timeout=bound)
                assert isinstance(exc, NamingError | CommunicationError), repr(exc)
                assert now() - t0 < bound


# -- F17: stale name server entries ------------------------------------------------------------


async def test_f17_stale_entry_resolves_fails_fast_and_clean_removes_it(tmp_path: Path) -> None:
    async with (
        children(tmp_path) as kids,
        NameServerDaemon(port=0) as nsd,
        Daemon() as live,
        locate_ns(port=nsd.port) as ns,
    ):
        live_uri = live.register(Target(), "target")
        dead = await kids.daemon(tmp_path / "calls.log")
        dead_uri = f"adist:{OID}@127.0.0.1:{dead.port}"
        unknown_uri = f"adist:no-such-object@127.0.0.1:{live.port}"
        await ns.register("stale", dead_uri)
        await ns.register("live", live_uri)
        await ns.register("gone-object", unknown_uri)
        await kids.kill(dead)

        assert await ns.lookup("stale") == dead_uri  # resolving works...
        async with proxy_to(f"adistname:stale@127.0.0.1:{nsd.port}", connect_attempts=2) as proxy:
            t0 = now()
            exc = await raises(proxy.pid(), timeout=PROMPT)  # ... the call fails fast
            assert isinstance(exc, ConnectError), repr(exc)
            assert now() - t0 < PROMPT

        removed = await finish(ns.clean(1.0 * SCALE), PROMPT + 2 * SCALE, "clean()")
        assert removed == ["gone-object", "stale"]
        assert await ns.list() == {"live": live_uri}
        assert await ns.clean(1.0 * SCALE) == []
        async with proxy_to(f"adistname:live@127.0.0.1:{nsd.port}") as proxy:
            assert await proxy.echo("here") == "here"


async def test_f17_autoclean_removes_a_stale_entry_within_its_period(tmp_path: Path) -> None:
    period = 0.5 * SCALE
    nsd = NameServerDaemon(port=0, autoclean=period)
    async with (
        children(tmp_path) as kids,
        nsd,
        Daemon() as live,
        locate_ns(port=nsd.port) as ns,
    ):
        live_uri = live.register(Target(), "target")
        dead = await kids.daemon(tmp_path / "calls.log")
        await ns.register("live", live_uri)
        await ns.register("stale", f"adist:{OID}@127.0.0.1:{dead.port}")
        await kids.kill(dead)
        t0 = now()
        await eventually(
            lambda: "stale" not in nsd.nameserver.list(),
            "autoclean kept the stale entry",
            timeout=5.0,
        )
        assert now() - t0 < 2 * period + 1.0 * SCALE  # one period, plus one probe
        assert await ns.list() == {"live": live_uri}


async def test_f17_clean_keeps_a_daemon_that_does_not_answer_in_time(tmp_path: Path) -> None:
    async with (
        children(tmp_path) as kids,
        NameServerDaemon(port=0) as nsd,
        locate_ns(port=nsd.port) as ns,
    ):
        slow = await kids.daemon(tmp_path / "calls.log")
        await ns.register("slow", f"adist:{OID}@127.0.0.1:{slow.port}")
        async with frozen(slow.pid):
            removed = await finish(ns.clean(HANDSHAKE), PROMPT + HANDSHAKE, "clean()")
        assert removed == []
        assert await ns.count() == 1


# -- B17: pickles to a daemon and to the name server ---------------------------------------------


@pytest.mark.parametrize("role", ["daemon", "nameserver"])
async def test_b17_pickle_from_an_authenticated_peer_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, role: str
) -> None:
    marker = tmp_path / "pwned"
    bomb = msgpack.ExtType(3, pickle_bomb(marker))
    server = NameServerDaemon(port=0, secret=SECRET) if role == "nameserver" else Daemon(secret=SECRET)
    async with server:
        if role == "nameserver":
            oid, args = NS_OBJECT_ID, ["register", "evil", bomb]
        else:
            oid, args = "target", ["echo", bomb]
            server.register(Target(), oid)
        honest_uri = server.uri_for(oid)
        async with proxy_to(honest_uri, secret=SECRET) as honest:
            await honest._connect()
            evil = await EvilClient.open(server.port)
            try:
                await evil.handshake(SECRET.encode(), pickle="load")
                await eventually(lambda: len(server.server.connections) == 2, "evil never opened")
                (evil_side,) = [c for c in server.server.connections if c.remote_address == evil.sockname]
                await evil.send_message([P.CALL, 3, "o.call", [oid, *args]])
                frames = await evil.expect_closed(5 * SCALE)
            finally:
                await evil.aclose()
            assert frames == []  # no answer: the whole connection is refused
            await eventually(lambda: evil_side.close_exception is not None, "server side never closed")
            cause = evil_side.close_exception.__cause__ if evil_side.close_exception else None
            assert isinstance(cause, ProtocolError), repr(cause)
            assert "pickled payload refused" in str(cause)
            assert server.server.stats.protocol_errors == 1
            assert not marker.exists()
            # The others are served: the session from before, and a new one.
            async with proxy_to(honest_uri, secret=SECRET) as fresh:
                for proxy in (honest, fresh):
                    if role == "nameserver":
                        assert await proxy.count() == 0
                    else:
                        assert await proxy.echo(1) == 1
    assert not marker.exists()
    assert all(str(marker) not in r.getMessage() for r in caplog.records)


async def test_b17_name_server_never_loads_pickles_even_when_configured_to(tmp_path: Path) -> None:
    # Asking a name server, a daemon or a proxy to load pickles is refused outright.
    with pytest.raises(ConfigurationError, match="never accept pickled payloads"):
        NameServerDaemon(port=0, secret=SECRET, accept_pickle="load")
    with pytest.raises(ConfigurationError, match="never accept pickled payloads"):
        Daemon(secret=SECRET, accept_pickle="opaque")
    with pytest.raises(ConfigurationError, match="never accept pickled payloads"):
        Proxy("adist:x@127.0.0.1:1", accept_pickle="load")
    # And a peer that claims it may send pickles still gets its payload refused on the wire.
    marker = tmp_path / "pwned"
    bomb = msgpack.ExtType(3, pickle_bomb(marker))
    async with NameServerDaemon(port=0, secret=SECRET) as nsd:
        evil = await EvilClient.open(nsd.port)
        try:
            await evil.handshake(SECRET.encode(), pickle="load")
            await evil.send_message([P.CALL, 3, "o.call", [NS_OBJECT_ID, "register", "evil", bomb]])
            with contextlib.suppress(Exception):
                await evil.answer(3, timeout=2 * SCALE)
        finally:
            await evil.aclose()
    assert not marker.exists()


# -- B27: attribute traversal ------------------------------------------------------------------

TRAVERSAL_NAMES: list[Any] = [
    "_private",
    "_marker",
    "__class__",
    "__globals__",
    "__subclasses__",
    "__init__",
    "__dict__",
    "__reduce_ex__",
    "a.b.c",
    "echo.__globals__",
    "value.fget",
    "",
    "x" * MIB,
    "inherited",  # from a base class that is not exposed
    "data",  # a plain attribute
    5,
    [1, "echo"],
    None,
    {"name": "echo"},
]


def _is_attribute_error(exc: BaseException) -> bool:
    return type(exc) is AttributeError and len(str(exc)) < 400


async def test_b27_traversal_through_every_object_handler(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    target = Target(marker)
    async with Daemon() as daemon, connect(port=daemon.port) as conn:
        oid = "target"
        daemon.register(target, oid)
        for name in TRAVERSAL_NAMES:
            what = repr(name)[:40]
            accesses: list[tuple[str, tuple[Any, ...]]] = [("o.call", ()), ("o.get", ()), ("o.set", (2,))]
            for handler, extra in accesses:
                exc = await raises(conn.call(handler, oid, name, *extra))
                assert _is_attribute_error(exc), f"{handler} {what}: {exc!r}"[:300]
            exc = await raises(_drain(conn, "o.iter", oid, name))
            assert _is_attribute_error(exc), f"o.iter {what}: {exc!r}"[:300]
            results, error = await conn.call("o.batch", oid, [[name, [], {}]], False)
            assert results == []
            assert _is_attribute_error(error), f"o.batch {what}: {error!r}"[:300]
            await conn.notify("o.note", oid, name)
            # As an object id, the same names find nothing.
            lookups: list[tuple[str, tuple[Any, ...]]] = [
                ("o.meta", ()),
                ("o.call", ("echo",)),
                ("o.get", ("value",)),
            ]
            for handler, rest in lookups:
                exc = await raises(conn.call(handler, name, *rest))
                assert type(exc) is UnknownObjectError, f"{handler} id {what}: {exc!r}"[:300]
        # A property is not a method and a method is not a property; read-only stays read-only.
        mismatches: list[tuple[str, str, tuple[Any, ...]]] = [
            ("o.call", "value", ()),
            ("o.get", "echo", ()),
            ("o.set", "echo", (1,)),
            ("o.set", "fixed", ("x",)),
        ]
        for handler, member, args in mismatches:
            exc = await raises(conn.call(handler, oid, member, *args))
            assert _is_attribute_error(exc), f"{handler} {member}: {exc!r}"
        assert await conn.call("o.meta", oid) == {
            "methods": ["aecho", "echo", "numbers"],
            "oneway": [],
            "streams": ["numbers"],
            "properties": ["fixed", "value"],
            "writable": ["value"],
        }
        assert await conn.call("o.call", oid, "echo", 7) == 7  # the connection stays up
        assert not conn.closed
        assert target.value == 1
        async with proxy_to(daemon.uri_for(oid)) as other:  # and so does the daemon
            assert await other.echo(8) == 8
    assert not marker.exists()


async def _drain(conn: Connection, name: str, *args: Any) -> list[Any]:
    async with conn.stream(name, *args) as items:
        return [item async for item in items]


async def test_b27_proxy_cannot_reach_private_or_dunder_members(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    async with Daemon() as daemon:
        uri = daemon.register(Target(marker), "target")
        async with proxy_to(uri) as proxy:
            assert type(proxy) is Proxy
            assert proxy.__class__ is Proxy  # the local class, never the remote one
            for name in ("_private", "__globals__", "__subclasses__", "_marker"):
                with pytest.raises(AttributeError):
                    getattr(proxy, name)
            for name in ("_private", "__class__", "__init__", "__globals__", "a.b.c", ""):
                with pytest.raises(AttributeError):
                    await proxy._call(name)  # refused locally
            # Names that are identifiers go to the daemon, which refuses them.
            for name in ("inherited", "data"):
                exc = await raises(proxy._call(name))
                assert type(exc) is AttributeError, repr(exc)
            # A batch checks nothing locally: the daemon does.
            batch = proxy.batch()
            batch.echo(1)
            batch._add("__class__")
            batch.echo(2)
            with pytest.raises(AttributeError) as info:
                await batch()
            assert info.value.batch_results == [1]  # type: ignore[attr-defined]
            assert await proxy.echo("fine") == "fine"
    assert not marker.exists()


# -- B28: classic-mode requests ----------------------------------------------------------------

CLASSIC_HANDLERS = [
    "classic.execute",
    "classic.eval",
    "classic.modules",
    "rpc.eval",
    "rpc.exec",
    "o.exec",
    "o.eval",
    "o.__init__",
    "o.call.__globals__",
    "exec",
    "eval",
    "execute",
    "modules",
    "__import__",
    "no.such.handler",
    "x" * 256,
]


async def test_b28_classic_mode_requests_to_a_daemon_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close()"
    async with Daemon() as daemon, connect(port=daemon.port) as conn:
        daemon.register(Target(), "target")
        for name in CLASSIC_HANDLERS:
            exc = await raises(conn.call(name, code))
            assert type(exc) is UnknownMethodError, f"{name}: {exc!r}"
            assert isinstance(exc, AttributeError)
            await conn.notify(name, code)
        # An empty handler name is not even a valid request: an error reply, the connection stays.
        exc = await raises(conn.call("", code))
        assert type(exc) is ProtocolError, repr(exc)
        # The daemon's own object and a served object have no exec/eval either.
        for oid in (DAEMON_OBJECT_ID, "target"):
            for method in ("exec", "eval", "execute", "modules", "getmodule"):
                exc = await raises(conn.call("o.call", oid, method, code))
                assert type(exc) is AttributeError, f"{oid}.{method}: {exc!r}"
        assert await conn.call("o.call", DAEMON_OBJECT_ID, "ping") is None
        assert not conn.closed
    assert not marker.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- B29: unknown and unguessable object ids ---------------------------------------------------


async def test_b29_unknown_unregistered_and_random_object_ids() -> None:
    async with Daemon() as daemon:
        uri = daemon.register(Target(), "target")
        where = f"127.0.0.1:{daemon.port}"
        for oid in (secrets.token_hex(16), "0", "1", "target2", "asyncdist.daemonx", "TARGET"):
            async with proxy_to(f"adist:{oid}@{where}") as proxy:
                exc = await raises(proxy.echo(1))
                assert type(exc) is UnknownObjectError, f"{oid}: {exc!r}"
        async with connect(port=daemon.port) as conn:
            bad_ids: list[Any] = [5, None, [1], {"a": 1}, "x" * MIB]
            for bad_id in bad_ids:
                exc = await raises(conn.call("o.call", bad_id, "echo", 1))
                assert type(exc) is UnknownObjectError, repr(exc)[:200]
                assert len(str(exc)) < 400
        async with proxy_to(uri) as connected:
            assert await connected.echo(1) == 1
            daemon.unregister("target")
            exc = await raises(connected.echo(2))  # the same connection, the object is gone
            assert type(exc) is UnknownObjectError, repr(exc)
        async with proxy_to(uri) as late:
            exc = await raises(late.echo(3))
            assert type(exc) is UnknownObjectError, repr(exc)
        daemon.unregister(DAEMON_OBJECT_ID)  # ignored: the daemon's own object stays
        async with proxy_to(f"adist:{DAEMON_OBJECT_ID}@{where}") as own:
            await own.ping()


async def test_b29_object_ids_are_random_128_bit() -> None:
    async with Daemon() as daemon:
        ids = [daemon.register(Target()).split(":")[1].split("@")[0] for _ in range(1000)]
        ids.append(daemon.register(Blocker).split(":")[1].split("@")[0])  # a class, too
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", oid) for oid in ids), ids[:3]
    values = [int(oid, 16) for oid in ids]
    # Not sequential: consecutive ids are far apart.
    assert all(abs(a - b) > 2**64 for a, b in itertools.pairwise(values))
    # Every one of the 128 bits is set in about half of the ids (9 sigma either way).
    for bit in range(128):
        ones = sum(v >> bit & 1 for v in values)
        assert 350 < ones < 650, (bit, ones)


# -- B30: name server abuse ------------------------------------------------------------------------


async def test_b30_name_server_with_a_secret_refuses_clients_without_it() -> None:
    nsd = NameServerDaemon(port=0, secret=SECRET)
    async with nsd, Daemon(secret=SECRET) as daemon:
        uri = daemon.register(Target(), "target")
        for secret in (None, "another-secret-0123456789abcdef-0123"):
            exc = await raises(locate_ns(port=nsd.port, secret=secret))
            assert isinstance(exc, AuthenticationError | NamingError), repr(exc)
            exc = await raises(publish("evil", uri, ns_port=nsd.port, secret=secret, every=0.1))
            assert isinstance(exc, AuthenticationError | NamingError), repr(exc)
            async with proxy_to(f"adistname:target@127.0.0.1:{nsd.port}", secret=secret) as proxy:
                exc = await raises(proxy.echo(1))
                assert isinstance(exc, AuthenticationError | NamingError), repr(exc)
            # Raw: the handshake itself fails, nothing is ever called.
            exc = await raises(connect(port=nsd.port, secret=secret))
            assert isinstance(exc, AuthenticationError), repr(exc)
        assert nsd.nameserver.count() == 0
        async with locate_ns(port=nsd.port, secret=SECRET) as ns:
            await ns.register("target", uri)
            assert await ns.count() == 1
        async with proxy_to(f"adistname:target@127.0.0.1:{nsd.port}", secret=SECRET) as proxy:
            assert await proxy.echo("ok") == "ok"


BAD_REGISTRATIONS: list[tuple[str, tuple[Any, ...], dict[str, Any], type[BaseException]]] = [
    # name
    ("1 MiB name", ("n" * MIB, "{uri}"), {}, NamingError),
    ("1025-char name", ("n" * 1025, "{uri}"), {}, NamingError),
    ("empty name", ("", "{uri}"), {}, NamingError),
    ("name with @", ("a@b", "{uri}"), {}, NamingError),
    ("name with space", ("a b", "{uri}"), {}, NamingError),
    ("name with control", ("a\x00b", "{uri}"), {}, NamingError),
    ("int name", (5, "{uri}"), {}, NamingError),
    ("None name", (None, "{uri}"), {}, NamingError),
    ("list name", (["a"], "{uri}"), {}, NamingError),
    ("bytes name", (b"abc", "{uri}"), {}, NamingError),
    # uri
    ("1 MiB uri", ("n", "adist:x@127.0.0.1:1" + "0" * MIB), {}, NamingError),
    ("uri over the limit", ("n", "adist:" + "x" * MAX_URI + "@127.0.0.1:1"), {}, NamingError),
    ("adistname uri", ("n", "adistname:other"), {}, NamingError),
    ("garbage uri", ("n", "not a uri"), {}, NamingError),
    ("bad port", ("n", "adist:x@127.0.0.1:99999"), {}, NamingError),
    ("int uri", ("n", 5), {}, NamingError),
    ("None uri", ("n", None), {}, NamingError),
    ("dict uri", ("n", {"uri": "{uri}"}), {}, NamingError),
    # metadata
    ("too many tags", ("n", "{uri}", [f"t{i}" for i in range(MAX_META_TAGS + 1)]), {}, NamingError),
    ("long tag", ("n", "{uri}", ["t" * (MAX_META_LEN + 1)]), {}, NamingError),
    ("1 MiB tag", ("n", "{uri}", ["t" * MIB]), {}, NamingError),
    ("100k tags", ("n", "{uri}", [str(i) for i in range(100_000)]), {}, NamingError),
    ("empty tag", ("n", "{uri}", [""]), {}, NamingError),
    ("str metadata", ("n", "{uri}", "tags"), {}, NamingError),
    ("dict metadata", ("n", "{uri}", {"a": "b"}), {}, NamingError),
    ("int metadata", ("n", "{uri}", 5), {}, NamingError),
    ("int tag", ("n", "{uri}", [5]), {}, NamingError),
    ("None tag", ("n", "{uri}", [None]), {}, NamingError),
    # arity
    ("no arguments", (), {}, TypeError),
    ("name only", ("n",), {}, TypeError),
    ("too many", ("n", "{uri}", [], False, "extra"), {}, TypeError),
    ("unknown keyword", ("n", "{uri}"), {"evil": 1}, TypeError),
]


async def test_b30_malformed_registrations_get_a_clear_error_and_the_name_server_serves_on() -> None:
    async with (
        NameServerDaemon(port=0) as nsd,
        Daemon() as daemon,
        connect(port=nsd.port) as conn,
        locate_ns(port=nsd.port) as ns,
    ):
        uri = daemon.register(Target(), "target")

        def fill(value: Any) -> Any:
            return uri if value == "{uri}" else value

        for what, args, kwargs, error in BAD_REGISTRATIONS:
            exc = await raises(conn.request("o.call", (NS_OBJECT_ID, "register", *map(fill, args)), kwargs))
            assert type(exc) is error, f"{what}: {exc!r}"[:300]
            assert len(str(exc)) < 400, f"{what}: the error echoes the input"
            assert await ns.count() == 0, what
        # The boundaries are accepted.
        await ns.register("n" * 1024, uri, ["t" * MAX_META_LEN] + [f"t{i}" for i in range(MAX_META_TAGS - 1)])
        # The other methods check their arguments too.
        for method, args in (
            ("lookup", (5,)),
            ("lookup", (None,)),
            ("lookup", (["n"],)),
            ("list", (5,)),
            ("list", (None, "tag")),
            ("list", (None, None, 5)),
            ("remove", ()),
            ("remove", (None, 5)),
            ("set_metadata", (5, [])),
            ("set_metadata", ("n" * 1024, "tag")),
            ("set_metadata", ("n" * 1024, ["t" * MIB])),
        ):
            exc = await raises(conn.call("o.call", NS_OBJECT_ID, method, *args))
            assert type(exc) is NamingError, f"{method}{args!r}: {exc!r}"[:300]
        assert await ns.remove(5) == 0
        assert await ns.count() == 1
        assert not conn.closed
        await ns.ping()
        async with proxy_to(f"adistname:{'n' * 1024}@127.0.0.1:{nsd.port}") as proxy:
            assert await proxy.echo("still") == "still"


async def _fill_and_overflow(conn: Connection, uri: str, start: int, count: int) -> list[Any]:
    """``count`` registrations of new names in one batch; return their results."""
    calls = [["register", [f"name-{i}", uri], {}] for i in range(start, start + count)]
    results, error = await conn.call("o.batch", NS_OBJECT_ID, calls, True)
    assert error is None
    assert len(results) == count
    return list(results)


async def _registration_cap(tmp_path: Path, attempts: int, batch: int) -> None:
    uri = "adist:target@127.0.0.1:1"
    async with children(tmp_path) as kids:
        ns = await kids.ns("--max-entries", "1000")
        async with connect(port=ns.port) as conn, locate_ns(port=ns.port) as nsp:
            assert await _fill_and_overflow(conn, uri, 0, 1000) == [None] * 1000
            with pytest.raises(NamingError, match="full"):  # the 1001st
                await nsp.register("name-1000", uri)
            await nsp.register("name-0", uri, ["replaced"])  # replacing is not growing
            done = 1001
            baseline: int | None = None
            while done < attempts:
                n = min(batch, attempts - done)
                results = await _fill_and_overflow(conn, uri, done, n)
                assert all(type(r) is NamingError and "full" in str(r) for r in results)
                done += n
                if baseline is None:
                    baseline = rss_kib(ns.pid)  # after the first batch of refusals
            assert await nsp.count() == 1000
            assert baseline is not None
            growth = rss_kib(ns.pid) - baseline
            assert growth < 24 * 1024, f"the name server grew by {growth} KiB"
            assert await nsp.lookup("name-999") == uri
            with pytest.raises(NamingError):
                await nsp.lookup(f"name-{attempts - 1}")
            # Room again after a removal.
            assert await nsp.remove("name-1") == 1
            await nsp.register("newcomer", uri)
            assert await nsp.count() == 1000


async def test_b30_registration_cap_holds_and_memory_stays_bounded(tmp_path: Path) -> None:
    await _registration_cap(tmp_path, attempts=10_000, batch=3_000)


@pytest.mark.slow
async def test_b30_registration_cap_holds_for_100k_registrations(tmp_path: Path) -> None:
    await _registration_cap(tmp_path, attempts=100_000, batch=10_000)


# -- malformed object-protocol messages --------------------------------------------------------


async def test_malformed_object_protocol_messages_fail_that_call_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="asyncdist.connection")  # bad notes are logged
    async with Daemon() as daemon, connect(port=daemon.port) as conn:
        oid = "target"
        uri = daemon.register(Target(), oid)
        bad_calls: list[tuple[str, tuple[Any, ...], type[BaseException]]] = [
            ("o.batch", (oid, "not a list"), ValueError),
            ("o.batch", (oid, {"echo": [1]}), ValueError),
            ("o.batch", (oid, None), ValueError),
            ("o.batch", (oid, 5), ValueError),
            ("o.batch", (oid, [["aecho", [i], {}] for i in range(10_001)]), ValueError),
            ("o.batch", (oid,), TypeError),
            ("o.release", (), TypeError),
            ("o.release", ("x",), TypeError),
            ("o.call", (), TypeError),
            ("o.call", (oid,), TypeError),
            ("o.get", (oid,), TypeError),
            ("o.get", (oid, "value", "extra"), TypeError),
            ("o.set", (oid, "value"), TypeError),
            ("o.meta", (), TypeError),
            ("o.meta", (oid, "extra"), TypeError),
            ("o.ping", ("extra",), TypeError),
            ("o.call", (oid, "echo"), TypeError),  # echo's own argument is missing
            ("o.call", (oid, "echo", 1, 2), TypeError),
        ]
        for handler, args, error in bad_calls:
            exc = await raises(conn.call(handler, *args))
            assert type(exc) is error, f"{handler}{repr(args)[:60]}: {exc!r}"[:300]
        results, error = await conn.call("o.batch", "no-such-object", [["echo", [1], {}]])
        assert results == []
        assert type(error) is UnknownObjectError
        exc = await raises(conn.request("o.call", (oid, "echo", 1), {"y": 2}))
        assert type(exc) is TypeError, repr(exc)
        exc = await raises(_drain(conn, "o.iter"))
        assert type(exc) is TypeError, repr(exc)

        # Bad items fail one by one (return_exceptions) or stop the batch at the first.
        items: list[Any] = [
            "x",
            5,
            None,
            [],
            ["echo"],
            ["echo", [], {}, 1],
            ["echo", "not a list", {}],
            ["echo", [1], []],
            ["echo", [1], {"y": 2}],
            [5, [], {}],
            ["_private", [], {}],
            ["numbers", [3], {}],
            ["value", [], {}],
            ["echo", [1], {}],
        ]
        results, error = await conn.call("o.batch", oid, items, True)
        assert error is None
        kinds = [type(r).__name__ for r in results]
        assert kinds == ["ValueError"] * 8 + ["TypeError", "AttributeError", "AttributeError"] + [
            "TypeError",
            "AttributeError",
            "int",
        ], kinds
        assert results[-1] == 1
        results, error = await conn.call("o.batch", oid, [["echo", [1], {}], *items], False)
        assert results == [1]
        assert type(error) is ValueError
        # The boundary: 10,000 calls are one batch.
        results, error = await conn.call("o.batch", oid, [["aecho", [i], {}] for i in range(10_000)])
        assert error is None
        assert results == list(range(10_000))

        # o.release with garbage does nothing, and cannot free a registered object.
        for args in (("x", "y"), (None, None), (oid, 10**9), (oid, -(10**9)), ([1], {}), (oid, 1.5)):
            assert await conn.call("o.release", *args) is None
            await conn.notify("o.release", *args)
        await conn.notify("o.release")
        await conn.notify("o.batch", oid, "not a list")
        await conn.notify("o.call")

        assert await conn.call("o.call", oid, "echo", "alive") == "alive"
        assert not conn.closed
        assert daemon.server.stats.protocol_errors == 0
        async with proxy_to(uri) as proxy:
            assert await proxy.echo(2) == 2


# -- floods and the thread pool ------------------------------------------------------------------


async def test_oneway_flood_is_paced_and_does_not_block_other_clients() -> None:
    sink = Sink()
    limit = 64
    notes = 5000
    padding = bytes(2048)  # 10 MiB in all, against a read buffer of 256 KiB
    async with Daemon(threads=4, max_in_flight=limit) as daemon:
        uri = daemon.register(sink, "sink")
        async with proxy_to(uri) as other:
            assert await other.aping() == "async"
            peak = {"tasks": 0, "backlog": 0, "queued": 0}
            paused = False

            def watch() -> bool:
                nonlocal paused
                for conn in daemon.server.connections:
                    peak["tasks"] = max(peak["tasks"], len(conn._tasks))
                    peak["backlog"] = max(peak["backlog"], len(conn._backlog))
                    paused = paused or conn._reading_paused
                pool = daemon._pool
                if pool is not None:  # plain calls running or queued for a thread
                    peak["queued"] = max(peak["queued"], pool.busy)
                return paused

            # A raw client that writes as fast as the socket takes it and never reads.
            flood = await EvilClient.open(daemon.port)
            try:
                await flood.handshake(None)

                async def send() -> None:
                    for i in range(notes):
                        await flood.send_message([P.NOTIFY, "o.note", ["sink", "note", i, padding]])

                with traced() as mem:
                    sender = asyncio.create_task(send())
                    try:
                        await eventually(watch, "the flooded connection never paused reading")
                        # Other clients are served meanwhile, async and plain methods alike.
                        t0 = now()
                        assert await finish(other.aping(), 0.5 * SCALE, "an async call") == "async"
                        assert await finish(other.plain(), 1.0 * SCALE, "a plain call") == "plain"
                        assert now() - t0 < 1.0 * SCALE
                        assert sink.done < notes  # the flood was still going on
                        while not sender.done() or sink.done < notes:
                            watch()
                            await asyncio.sleep(0.01)
                            assert now() - t0 < 20 * SCALE, f"the flood is not done: {sink.done}"
                        await sender
                    finally:
                        sender.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sender
            finally:
                await flood.aclose()
            assert sink.done == notes  # paced, nothing dropped
            assert peak["tasks"] <= limit, peak
            assert peak["queued"] <= limit + 1, peak
            # The backlog is bounded by one read (256 KiB of notes), not by the flood.
            assert peak["backlog"] <= limit + 256 * 1024 // len(padding) + 1, peak
            assert mem.peak < 4 * MIB, f"peak {mem.peak} bytes"
            assert await other.aping() == "async"


async def test_oneway_flood_from_a_proxy_keeps_the_sender_buffer_bounded() -> None:
    sink = Sink()
    notes = 5000
    padding = bytes(2048)
    async with Daemon(threads=4, max_in_flight=64) as daemon:
        uri = daemon.register(sink, "sink")
        async with proxy_to(uri) as proxy:
            assert await proxy.aping() == "async"
            with traced() as mem:
                for i in range(notes):
                    await proxy.note(i, padding)  # one-way: returns once queued
            await eventually(lambda: sink.done == notes, "the notes were not all run", timeout=20)
    assert mem.peak < 4 * MIB, f"peak {mem.peak} bytes"


async def test_busy_thread_pool_keeps_async_methods_and_heartbeats_alive() -> None:
    blocker = Blocker()
    async with Daemon(threads=2) as daemon:
        uri = daemon.register(blocker, "blocker")
        try:
            async with proxy_to(uri, **HB) as proxy:
                first = start(proxy.block("a"))
                second = start(proxy.block("b"))
                await eventually(lambda: blocker.entered == 2, "the two blocking calls never started")
                third = start(proxy.plain())
                t0 = now()
                # Three heartbeat timeouts pass: the connection must not be declared dead.
                while now() - t0 < 3 * HB["heartbeat_timeout"]:
                    assert await finish(proxy.aping(), 0.5 * SCALE, "an async call") == "async"
                    assert not third.done()  # the third plain call waits for a thread
                    await asyncio.sleep(HB["heartbeat_interval"])
                conn = proxy._conn
                assert conn is not None
                assert not conn.closed
                assert conn.rtt is not None  # PONGs came back while the threads were busy
                blocker.gate.set()
                results = await finish(asyncio.gather(first, second, third), PROMPT, "the released calls")
                assert list(results) == ["a", "b", "plain"]
        finally:
            blocker.gate.set()


async def test_daemon_close_with_blocked_threads_returns_within_close_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = Blocker()
    close_timeout = 0.3 * SCALE
    before = set(daemon_threads())
    try:
        daemon = Daemon(threads=2, close_timeout=close_timeout)
        async with daemon:
            uri = daemon.register(blocker, "blocker")
            async with proxy_to(uri) as proxy:
                calls = [start(proxy.block("a")), start(proxy.block("b"))]
                await eventually(lambda: blocker.entered == 2, "the two blocking calls never started")
                t0 = now()
                await finish(daemon.aclose(), 2 * close_timeout + PROMPT, "Daemon.aclose()")
                assert now() - t0 < 2 * close_timeout + 1.0 * SCALE
                for call in calls:
                    with pytest.raises(ConnectionClosed):
                        await finish(call, PROMPT, "a call on the closed daemon")
        assert any("still running in threads" in r.getMessage() for r in caplog.records)
        assert blocker.gate.is_set() is False  # the threads were still blocked at close
    finally:
        blocker.gate.set()
    await eventually(lambda: set(daemon_threads()) <= before, "the daemon's threads were not released")
