"""Faults and bad input for symmetric RPC (RELIABILITY.md F24, B19, B20 for ``asyncdist.rpc``).

* F24: the connection drops while the server is inside a callback into the
  client (the server aborts it, the client aborts it, or the client process
  is SIGKILLed): pending calls on both sides fail with ``ConnectionClosed``,
  the objects the server lent that client are freed (weakref check), the
  hooks run, and the server keeps serving.
* A server process SIGKILLed or frozen (SIGSTOP) mid-call: the client's call
  fails within the heartbeat bound.
* Bad input on the RPC wire, sent by hand over a raw :func:`asyncdist.connect`
  connection (the ``rpc.*`` handlers called with bad arguments): an error
  reply where a request id is known and the connection stays up; a bad
  object reference closes that connection only (``ProtocolError``). After
  each case another client is still served.
* Netref lifetime under churn, and closing a server with calls in flight.

Servers run in this process on 127.0.0.1 unless a test kills one; processes
are killed by PID and reaped. Tests synchronise on events set by the
services (``started`` callbacks), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _evil import traced
from _util import SCALE, eventually, finish, start, stop

import asyncdist
from asyncdist import (
    ConnectionClosed,
    ProtocolError,
    UnknownMethodError,
    UnknownObjectError,
    rpc,
)
from asyncdist.codec import ObjectRef

#: Short heartbeats for the frozen-peer tests (scaled).
HB: dict[str, float] = {"heartbeat_interval": 0.1 * SCALE, "heartbeat_timeout": 0.5 * SCALE}
#: A frozen peer is declared dead within the heartbeat timeout, plus two ticks and slack.
HB_BOUND = HB["heartbeat_timeout"] + 2 * HB["heartbeat_interval"] + 0.5 * SCALE
#: Upper bound for anything a test waits for (a safety net: the tests set their events).
BOUND = 5.0 * SCALE
BANNER = re.compile(rb"listening on ([0-9.]+):(\d+)")

_T = TypeVar("_T")


def now() -> float:
    return asyncio.get_running_loop().time()


async def outcome(task: asyncio.Future[Any], what: str, timeout: float = BOUND) -> BaseException | None:
    """Wait for ``task`` (bounded) and return what it raised, or None."""
    await finish(asyncio.wait({task}), timeout, what)
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    return env


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL by PID (a stopped process dies too) and reap."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    await stop(proc)


class Lent:
    """An object the server lends a client (it travels by reference)."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    @rpc.exposed
    def ping(self) -> str:
        return "pong " + self.tag


# -- F24: the connection drops while the server is inside a callback into the client ----------


class Recorder:
    """What the services of one test saw (shared by their per-connection instances)."""

    def __init__(self) -> None:
        self.lent: list[weakref.ref[Lent]] = []
        self.calls: list[asyncio.Task[Any]] = []  # the server's calls into clients
        self.handler_ended: list[type[BaseException]] = []
        self.disconnected: list[str] = []


def callback_service(rec: Recorder) -> type[rpc.Service]:
    class Server(rpc.Service):
        async def exposed_call_back(self, f: Any) -> Any:
            """Lend the client an object, and call the client back with it."""
            lent = Lent("for the callback")
            rec.lent.append(weakref.ref(lent))
            # The call into the client is its own task (shielded from this handler's
            # cancellation), so that the test sees how the call itself ended.
            call = asyncio.ensure_future(f(lent))
            rec.calls.append(call)
            try:
                return await asyncio.shield(call)
            except BaseException as exc:
                rec.handler_ended.append(type(exc))  # not exc: its traceback holds `lent`
                raise

        def exposed_echo(self, x: Any) -> Any:
            return x

        def on_disconnect(self, conn: rpc.Connection) -> None:
            rec.disconnected.append("server")

    return Server


def client_service(rec: Recorder) -> type[rpc.Service]:
    class Client(rpc.Service):
        def on_disconnect(self, conn: rpc.Connection) -> None:
            rec.disconnected.append("client")

    return Client


@pytest.mark.parametrize("who", ["server aborts", "client aborts", "client closes its socket"])
async def test_f24_drop_inside_a_callback_fails_pending_calls_on_both_sides(who: str) -> None:
    rec = Recorder()
    async with rpc.serve(callback_service(rec), port=0) as server:
        conn = await rpc.connect(port=server.port, service=client_service(rec))
        try:
            inside = asyncio.Event()
            held: list[Any] = []
            callback_ended: list[BaseException] = []

            async def callback(lent: Any) -> None:
                held.append(lent)  # the client keeps its netref: the drop must free the object anyway
                assert await lent.ping() == "pong for the callback"
                inside.set()
                try:
                    await asyncio.Event().wait()
                except BaseException as exc:
                    callback_ended.append(exc)
                    raise

            call = start(conn.root.call_back(callback))
            await finish(inside.wait(), BOUND, "the callback")
            (session,) = server.connections
            assert len(session._objects) == 2  # the service and the lent object
            if who == "server aborts":
                session.conn.abort()
            elif who == "client aborts":
                conn.conn.abort()
            else:
                transport = conn.conn._transport
                assert transport is not None
                transport.abort()  # the socket goes, without any goodbye

            # Pending calls on both sides fail with ConnectionClosed; nothing hangs.
            exc = await outcome(call, "the client's call")
            assert isinstance(exc, ConnectionClosed), repr(exc)
            (server_call,) = rec.calls
            exc = await outcome(server_call, "the server's call into the client")
            assert isinstance(exc, ConnectionClosed), repr(exc)
            await finish(conn.wait_closed(), BOUND, "the client's close")
            await finish(session.wait_closed(), BOUND, "the server side's close")
            # The handler that was waiting for the callback ended (cancelled with its connection).
            await eventually(lambda: rec.handler_ended, "the server's handler did not end")
            assert issubclass(rec.handler_ended[0], ConnectionClosed | asyncio.CancelledError)
            await eventually(lambda: callback_ended, "the client's callback did not end")
            # The objects held for that connection are freed, although the client kept a netref.
            assert held
            del exc, server_call
            rec.calls.clear()  # (the failed call's traceback holds its arguments)
            assert session._objects == {}
            await eventually(lambda: gc.collect() >= 0 and rec.lent[0]() is None, "the lent object leaked")
            # Both sides' on_disconnect hooks ran.
            await eventually(lambda: sorted(rec.disconnected) == ["client", "server"], "hooks did not run")
            assert conn.closed
            with pytest.raises(ConnectionClosed):
                await held[0].ping()
        finally:
            await conn.close()

        # The server keeps serving, callbacks included.
        async with rpc.connect(port=server.port) as again:
            assert await again.root.echo("next") == "next"

            async def quick(lent: Any) -> str:
                return str(await lent.ping())

            assert await finish(again.root.call_back(quick), BOUND, "a callback on a new connection") == (
                "pong for the callback"
            )
        assert not server.connections


CLIENT_SCRIPT = """
import asyncio, sys
from asyncdist import rpc

async def main(port):
    conn = await rpc.connect(port=port)
    async def callback(lent):
        assert await lent.ping() == "pong for the callback"
        print("INSIDE", flush=True)
        await asyncio.Event().wait()
    await conn.root.call_back(callback)

asyncio.run(main(int(sys.argv[1])))
"""


async def test_f24_client_process_killed_inside_a_callback(tmp_path: Path) -> None:
    rec = Recorder()
    async with rpc.serve(callback_service(rec), port=0) as server:
        with open(tmp_path / "client.err", "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT_SCRIPT, str(server.port),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
                env=child_env(),
            )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = await finish(proc.stdout.readline(), 20 * SCALE, "the client process's callback")
            assert line == b"INSIDE\n", (line, (tmp_path / "client.err").read_text()[-2000:])
            (session,) = server.connections
            assert len(session._objects) == 2
            t0 = now()
            await kill(proc)
            (server_call,) = rec.calls
            # Default heartbeats (10 s): the failure comes from the closed socket, promptly.
            exc = await outcome(server_call, "the server's call into the killed client", 2 * SCALE)
            assert isinstance(exc, ConnectionClosed), repr(exc)
            assert now() - t0 < 2 * SCALE
            del exc, server_call
            rec.calls.clear()  # (the failed call's traceback holds its arguments)
            await finish(session.wait_closed(), BOUND, "the server side's close")
            assert session._objects == {}
            await eventually(lambda: gc.collect() >= 0 and rec.lent[0]() is None, "the lent object leaked")
            assert rec.disconnected == ["server"]
            assert not server.connections
        finally:
            await kill(proc)
        async with rpc.connect(port=server.port) as again:
            assert await again.root.echo("next") == "next"


async def test_f24_a_client_dropping_fails_another_clients_call_into_it_only() -> None:
    """The server, serving B, calls into A's function; A drops: B gets the error, B stays up."""
    functions: dict[str, Any] = {}
    started = asyncio.Event()

    class Hub(rpc.Service):
        def exposed_register(self, name: str, f: Any) -> None:
            functions[name] = f

        async def exposed_invoke(self, name: str) -> Any:
            return await functions[name]()

        def exposed_forget(self) -> None:
            functions.clear()

    async with rpc.serve(Hub, port=0) as server:
        a = await rpc.connect(port=server.port)
        b = await rpc.connect(port=server.port)
        try:

            async def hang() -> None:
                started.set()
                await asyncio.Event().wait()

            await a.root.register("a", hang)
            call = start(b.root.invoke("a"))
            await finish(started.wait(), BOUND, "A's function")
            a.conn.abort()
            exc = await outcome(call, "B's call")
            assert isinstance(exc, ConnectionClosed), repr(exc)  # the remote ConnectionClosed, rebuilt
            assert not b.closed
            with pytest.raises(KeyError):
                await b.root.invoke("missing")
            with pytest.raises(ConnectionClosed):  # the server's netref to A is dead, not hanging
                await finish(b.root.invoke("a"), BOUND, "a call into the closed connection")
            await b.root.forget()
        finally:
            await a.close()
            await b.close()


# -- a server process killed or frozen mid-call --------------------------------------------------

HANG_SERVICE = """
import asyncio
from asyncdist import rpc

class Hang(rpc.Service):
    async def exposed_hang(self, started):
        await started()
        await asyncio.Event().wait()

    def exposed_echo(self, x):
        return x
"""


@contextlib.asynccontextmanager
async def rpc_process(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``python -m asyncdist rpc --service hangsvc:Hang --port 0`` with short heartbeats."""
    (tmp_path / "hangsvc.py").write_text(HANG_SERVICE)
    options = [f"--option=heartbeat_interval={HB['heartbeat_interval']}"]
    options.append(f"--option=heartbeat_timeout={HB['heartbeat_timeout']}")
    with open(tmp_path / "server.err", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncdist", "rpc", "--service", "hangsvc:Hang", "--port", "0", *options,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            env=child_env(), cwd=tmp_path,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = await finish(proc.stdout.readline(), 20 * SCALE, "the rpc server's start")
        match = BANNER.search(banner)
        assert match, f"no banner: {banner!r} {(tmp_path / 'server.err').read_text()[-2000:]}"
        yield proc, int(match.group(2))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        await kill(proc)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
async def test_server_process_killed_or_frozen_mid_call_fails_the_call_within_the_heartbeat_bound(
    tmp_path: Path, how: str
) -> None:
    disconnected = asyncio.Event()

    class Client(rpc.Service):
        def on_disconnect(self, conn: rpc.Connection) -> None:
            disconnected.set()

    async with rpc_process(tmp_path) as (proc, port):
        conn = await rpc.connect(port=port, service=Client, **HB)
        try:
            assert await conn.root.echo(1) == 1
            started = asyncio.Event()

            async def on_start() -> None:
                started.set()

            call = start(conn.root.hang(on_start))
            await finish(started.wait(), BOUND, "the server's hang()")
            os.kill(proc.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGSTOP)
            t0 = now()
            exc = await outcome(call, "the call in flight", HB_BOUND)
            assert isinstance(exc, ConnectionClosed), repr(exc)
            assert now() - t0 < HB_BOUND
            if how == "SIGSTOP":  # the heartbeat found it, not the socket
                closed = conn.conn.close_exception
                assert closed is not None
                assert "no data from the peer" in str(closed.__cause__)
            await finish(disconnected.wait(), BOUND, "the client's on_disconnect")
            assert conn.closed
            with pytest.raises(ConnectionClosed):
                await conn.root.echo(2)
        finally:
            await conn.close()


# -- bad input on the RPC wire (B19, B20) -------------------------------------------------------


class Target(rpc.Service):
    """The service attacked by the bad-input tests; ``_secret`` would leave a marker."""

    marker: Path | None = None

    def exposed_echo(self, x: Any) -> Any:
        return x

    def exposed_make(self, tag: str = "") -> Lent:
        return Lent(tag)

    def _secret(self) -> None:
        if self.marker is not None:
            self.marker.touch()


@contextlib.asynccontextmanager
async def attacked() -> AsyncIterator[tuple[rpc.Server, rpc.Connection]]:
    """A server of Target and an honest client connected before the attack."""
    async with rpc.serve(Target, port=0) as server, rpc.connect(port=server.port) as honest:
        assert await honest.root.echo(0) == 0
        yield server, honest


async def still_served(server: rpc.Server, honest: rpc.Connection) -> None:
    assert await finish(honest.root.echo("honest"), BOUND, "the honest client's call") == "honest"
    async with rpc.connect(port=server.port) as fresh:
        assert await finish(fresh.root.echo("fresh"), BOUND, "a new client's call") == "fresh"


LONG = "x" * 300

BAD_CALLS = [
    pytest.param(("rpc.call", 999, "echo", 1), UnknownObjectError, "no object #999", id="unknown-oid"),
    pytest.param(("rpc.call", -1, "echo", 1), UnknownObjectError, "no object", id="negative-oid"),
    pytest.param(("rpc.call", "0", "echo", 1), UnknownObjectError, "no object", id="str-oid"),
    pytest.param(("rpc.call", True, "echo", 1), UnknownObjectError, "no object", id="bool-oid"),
    pytest.param(("rpc.call", None, "echo", 1), UnknownObjectError, "no object", id="none-oid"),
    pytest.param(("rpc.call", [0], "echo", 1), UnknownObjectError, "no object", id="list-oid"),
    pytest.param(("rpc.call", 0, 5, 1), AttributeError, "member path", id="int-path"),
    pytest.param(("rpc.call", 0, 1.5, 1), AttributeError, "member path", id="float-path"),
    pytest.param(("rpc.call", 0, {"a": 1}, 1), AttributeError, "member path", id="dict-path"),
    pytest.param(("rpc.call", 0, [["echo"]], 1), AttributeError, "member name", id="nested-list-path"),
    pytest.param(("rpc.call", 0, ["echo"] * 1000, 1), AttributeError, "1 to 64 names", id="1000-names"),
    pytest.param(("rpc.call", 0, [], 1), AttributeError, "1 to 64 names", id="empty-path"),
    pytest.param(("rpc.call", 0, "", 1), AttributeError, "non-empty", id="empty-name"),
    pytest.param(("rpc.call", 0, LONG, 1), AttributeError, "at most 256", id="long-name"),
    pytest.param(("rpc.call", 0, "echo.x", 1), AttributeError, "identifier", id="dotted-name"),
    pytest.param(("rpc.call", 0, "__class__", 1), AttributeError, "private", id="dunder"),
    pytest.param(("rpc.call", 0, "_secret"), AttributeError, "private", id="private"),
    pytest.param(("rpc.call", 0, ["make", "__globals__"]), AttributeError, "private", id="globals"),
    pytest.param(("rpc.call", 0, "on_connect", None), AttributeError, "not exposed", id="hook"),
    pytest.param(("rpc.call", 0, "nothing"), AttributeError, "not exposed", id="missing-name"),
    pytest.param(("rpc.call", 0, "echo"), TypeError, None, id="missing-args"),
    pytest.param(("rpc.call", 0, "echo", 1, 2), TypeError, None, id="extra-args"),
    pytest.param(("rpc.call",), TypeError, None, id="no-args-at-all"),
    pytest.param(("rpc.call", 0, "echo", 1, {}, 9), TypeError, None, id="too-many"),
    pytest.param(("rpc.op", 0, None, "nope"), ValueError, "unknown operation", id="op-unknown"),
    pytest.param(("rpc.op", 0, None, 5), ValueError, "unknown operation", id="op-int"),
    pytest.param(("rpc.op", 0, None, None), ValueError, "unknown operation", id="op-none"),
    pytest.param(("rpc.op", 0, None, "__len__"), ValueError, "unknown operation", id="op-dunder"),
    pytest.param(("rpc.op", 999, None, "len"), UnknownObjectError, "no object", id="op-unknown-oid"),
    pytest.param(("rpc.op", 0, None, "len"), TypeError, "len", id="op-len-of-service"),
    pytest.param(("rpc.getattr", 0, 12), AttributeError, "member path", id="getattr-int-path"),
    pytest.param(("rpc.getattr", 0, None), AttributeError, "member path", id="getattr-none-path"),
    pytest.param(("rpc.getattr", 0, "__dict__"), AttributeError, "private", id="getattr-dict"),
    pytest.param(("rpc.setattr", 0, None, "echo", 1), AttributeError, "method", id="setattr-method"),
    pytest.param(("rpc.setattr", 0, None, 5, 1), AttributeError, "member name", id="setattr-int-name"),
    pytest.param(("rpc.setattr", 0, None, "_secret", 1), AttributeError, "private", id="setattr-private"),
    pytest.param(
        ("rpc.setattr", 0, None, "marker", 1), AttributeError, "not exposed", id="setattr-unexposed"
    ),
    pytest.param(("rpc.iter", 0, None), TypeError, "not iterable", id="iter-service"),
    pytest.param(("rpc.iter", 999, None), UnknownObjectError, "no object", id="iter-unknown-oid"),
    pytest.param(("rpc.classic",), PermissionError, "classic mode is off", id="classic"),
    pytest.param(("rpc.classic", 1), TypeError, None, id="classic-args"),
    pytest.param(("rpc.nope", 0), UnknownMethodError, None, id="unknown-handler"),
]


@pytest.mark.parametrize(("args", "error", "match"), BAD_CALLS)
async def test_bad_rpc_request_gets_an_error_reply_and_the_connection_stays_up(
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    args: tuple[Any, ...],
    error: type[Exception],
    match: str | None,
) -> None:
    marker = tmp_path / "private-ran"
    Target.marker = marker
    try:
        async with attacked() as (server, honest), asyncdist.connect(port=server.port) as raw:
            name, *rest = args
            if name == "rpc.iter":
                with pytest.raises(error, match=match):
                    async for _ in raw.stream(name, *rest):
                        pass
            else:
                with pytest.raises(error, match=match):
                    await finish(raw.call(name, *rest), BOUND, "the bad request")
            assert not raw.closed
            assert await raw.call("rpc.call", 0, "echo", 1) == 1  # the same connection still works
            await still_served(server, honest)
            assert not marker.exists()
            assert not raw.closed
    finally:
        Target.marker = None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a traceback was logged"


RPC_DEL_JUNK = [
    pytest.param(("junk",), id="str"),
    pytest.param((None,), id="none"),
    pytest.param(({"1": 1},), id="dict"),
    pytest.param(([1, 2],), id="flat-list"),
    pytest.param(([[1]],), id="short-pair"),
    pytest.param(([[1, 2, 3]],), id="long-pair"),
    pytest.param(([["a", 1]],), id="str-oid"),
    pytest.param(([[1, "a"]],), id="str-count"),
    pytest.param(([[1, 1.5]],), id="float-count"),
    pytest.param(([[True, 1]],), id="bool-oid"),
    pytest.param(([[0, 1000]],), id="release-the-service"),
    pytest.param(([[999, 1]],), id="unknown-oid"),
    pytest.param(([[1, -5]],), id="negative-count"),
    pytest.param(([],), id="empty"),
    pytest.param((), id="no-args"),
    pytest.param(([[1, 1]], "extra"), id="extra-arg"),
    pytest.param(([[i, 1] for i in range(10_000)],), id="10000-pairs"),
]


@pytest.mark.parametrize("args", RPC_DEL_JUNK)
async def test_junk_rpc_del_harms_nobody_else(
    caplog: pytest.LogCaptureFixture, args: tuple[Any, ...]
) -> None:
    caplog.set_level(logging.CRITICAL, logger="asyncdist.connection")  # bad notifications are logged
    async with attacked() as (server, honest):
        # The honest client holds object #1 of its own connection; the attacker names #1 too.
        lent = await honest.root.make("honest")
        assert await lent.ping() == "pong honest"
        async with asyncdist.connect(port=server.port) as raw:
            await raw.notify("rpc.del", *args)
            # A call after the notification: either an answer (the connection stayed up) or
            # ConnectionClosed (it was closed as a protocol error): never a hang.
            try:
                assert await finish(raw.call("rpc.call", 0, "echo", 1), BOUND, "the next call") == 1
            except ConnectionClosed:
                assert raw.closed
            else:
                # The service itself is never released, whatever count comes back.
                assert await raw.call("rpc.call", 0, "echo", "service") == "service"
        # Object tables are per connection: the honest client's object is untouched.
        assert await lent.ping() == "pong honest"
        await still_served(server, honest)


def session_of(server: rpc.Server, known: list[rpc.Connection]) -> rpc.Connection:
    (session,) = [s for s in server.connections if all(s is not k for k in known)]
    return session


BAD_REFS = [
    pytest.param(ObjectRef("b", {"i": 999}), "never lent", id="b-never-lent"),
    pytest.param(ObjectRef("b", {"i": 1}), "never lent", id="b-another-connections-object"),
    pytest.param(ObjectRef("b", {"i": "1"}), "bad object reference", id="b-str-id"),
    pytest.param(ObjectRef("b", {"i": 1.0}), "bad object reference", id="b-float-id"),
    pytest.param(ObjectRef("b", {"i": None}), "bad object reference", id="b-none-id"),
    pytest.param(ObjectRef("b", {}), "bad object reference", id="b-no-id"),
    pytest.param(ObjectRef("r", {"i": "1", "t": "x"}), "bad object reference", id="r-str-id"),
    pytest.param(ObjectRef("r", {"i": [1]}), "bad object reference", id="r-list-id"),
    pytest.param(ObjectRef("x", {"i": 1}), "bad object reference", id="unknown-kind"),
]


@pytest.mark.parametrize("where", ["args", "kwargs", "setattr-value", "rpc.del"])
@pytest.mark.parametrize(("ref", "match"), BAD_REFS)
async def test_bad_object_reference_closes_only_that_connection(
    caplog: pytest.LogCaptureFixture, ref: ObjectRef, match: str, where: str
) -> None:
    caplog.set_level(logging.ERROR)
    async with attacked() as (server, honest):
        # The honest client holds object #1 of its connection (the attacker may not use it).
        lent = await honest.root.make("honest")
        known = list(server.connections)
        async with asyncdist.connect(port=server.port) as raw:
            await eventually(lambda: len(server.connections) == 2, "the attacker is not served")
            session = session_of(server, known)
            if where == "args":
                aw = raw.call("rpc.call", 0, "echo", ref)
            elif where == "kwargs":
                aw = raw.call("rpc.call", 0, "echo", {"x": ref})
            elif where == "setattr-value":
                aw = raw.call("rpc.setattr", 0, None, "echo", ref)
            else:
                await raw.notify("rpc.del", [[ref, 1]])
                aw = raw.call("rpc.call", 0, "echo", 1)
            with pytest.raises(ConnectionClosed):
                await finish(aw, BOUND, "the call with a bad reference")
            assert raw.closed
            await finish(session.wait_closed(), BOUND, "the attacked connection's close")
            closed = session.conn.close_exception
            assert closed is not None
            assert isinstance(closed.__cause__, ProtocolError), repr(closed.__cause__)
            assert match in str(closed.__cause__)
            assert session._objects == {}
        assert await lent.ping() == "pong honest"
        await still_served(server, honest)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_references_that_are_fine_on_a_raw_connection() -> None:
    """Controls for the bad-reference cases: a real object of this connection comes back whole."""
    async with attacked() as (server, honest), asyncdist.connect(port=server.port) as raw:
        ref = await raw.call("rpc.call", 0, "make", "raw")
        assert isinstance(ref, ObjectRef)  # a raw connection has no netrefs: it sees the reference
        assert ref.uri == "r"
        oid = ref.meta["i"]
        assert type(oid) is int
        assert oid > 0
        assert ref.meta["t"] == "Lent"
        assert await raw.call("rpc.call", oid, "ping") == "pong raw"
        # Sent back with kind "b": the server sees its own object (and lends it again).
        again = await raw.call("rpc.call", 0, "echo", ObjectRef("b", {"i": oid}))
        assert isinstance(again, ObjectRef)
        assert again.uri == "r"
        assert again.meta["i"] == oid
        # Another connection's id means nothing here, and this one's means nothing there.
        with pytest.raises(UnknownObjectError):
            await honest.conn.call("rpc.call", oid, "ping")
        # Released (twice lent, twice released): the object is gone.
        await raw.notify("rpc.del", [[oid, 2]])
        with pytest.raises(UnknownObjectError):
            await raw.call("rpc.call", oid, "ping")
        await still_served(server, honest)


# -- netref lifetime under churn ---------------------------------------------------------------


async def test_netrefs_dropped_under_churn_are_released_and_memory_stays_bounded() -> None:
    class Factory(rpc.Service):
        def exposed_make(self, i: int) -> Lent:
            return Lent(str(i))

        async def exposed_call(self, f: Any, i: int) -> Any:
            return await f(i)

    async with rpc.serve(Factory, port=0) as server, rpc.connect(port=server.port) as conn:
        assert await conn.root.make(-1) is not None
        (session,) = server.connections
        largest = 0
        n = 1000
        with traced() as mem:
            for i in range(n):
                ref = await conn.root.make(i)
                assert isinstance(ref, rpc.Netref)
                del ref
                largest = max(largest, len(session._objects))
        # Released as they go: the table never holds more than a few objects at once.
        assert largest <= 16, largest
        assert mem.peak < 4 << 20, mem.peak
        await eventually(lambda: list(session._objects) == [0], "the server's table did not empty")
        assert len(session._oid_of) == 1
        await eventually(lambda: not conn._proxies, "the client's netref table did not empty")

        # The other way: functions the client lends the server, dropped after each call.
        mine = conn._objects
        largest = 0
        for i in range(200):
            assert await conn.root.call(lambda x: x * 2, i) == 2 * i
            largest = max(largest, len(mine))
        assert largest <= 16, largest
        await eventually(lambda: list(mine) == [0], "the client's table did not empty")
        await eventually(lambda: not session._proxies, "the server's netref table did not empty")


async def test_netrefs_to_one_shared_object_under_concurrent_churn() -> None:
    """Many calls at once return the same object, dropped and sent again meanwhile: the counts agree."""

    class Shared(rpc.Service):
        def __init__(self) -> None:
            self.shared = Lent("shared")

        def exposed_get(self) -> Lent:
            return self.shared

        def exposed_pair(self) -> list[Lent]:
            return [self.shared, self.shared]

        def exposed_is_shared(self, x: Any) -> bool:
            return x is self.shared

    async with rpc.serve(Shared, port=0) as server, rpc.connect(port=server.port) as conn:
        (session,) = server.connections

        async def one(i: int) -> str:
            ref = await conn.root.get()
            if i % 2:
                await asyncio.sleep(0)
            assert await conn.root.is_shared(ref)  # sent back: the object itself
            first, second = await conn.root.pair()
            assert first is second is ref  # one netref per object and connection
            return str(await ref.ping())

        for _ in range(20):
            assert await asyncio.gather(*(one(i) for i in range(30))) == ["pong shared"] * 30
        await eventually(lambda: list(session._objects) == [0], "the shared object was never released")
        # Lent again after its release: a new id, and it works.
        ref = await conn.root.get()
        assert await ref.ping() == "pong shared"


# -- closing a server with calls in flight ------------------------------------------------------


async def test_closing_a_server_with_calls_in_flight_ends_every_call() -> None:
    entered = {"hang": asyncio.Event(), "block": threading.Event(), "stream": asyncio.Event()}

    class Busy(rpc.Service):
        async def exposed_hang(self) -> None:
            entered["hang"].set()
            await asyncio.Event().wait()

        @rpc.exposed(blocking=True)
        def block(self, seconds: float) -> str:
            entered["block"].set()
            time.sleep(seconds)
            return "blocked and done"

        async def exposed_call_back(self, f: Any) -> Any:
            return await f()

        async def exposed_numbers(self) -> Any:
            async def gen() -> Any:
                for i in range(1000):
                    if i == 3:
                        entered["stream"].set()
                    yield i
                    await asyncio.sleep(0.01)

            return Gen(gen())

        def exposed_echo(self, x: Any) -> Any:
            return x

    class Gen:
        def __init__(self, agen: Any) -> None:
            self.agen = agen

        def __aiter__(self) -> Any:
            return self.agen

    close_timeout = 0.5 * SCALE
    server = await rpc.serve(Busy, port=0, close_timeout=close_timeout)
    clients = [await rpc.connect(port=server.port) for _ in range(3)]
    in_callback = asyncio.Event()

    async def callback() -> None:
        in_callback.set()
        await asyncio.Event().wait()

    async def consume(ref: Any) -> list[int]:
        return [x async for x in ref]

    try:
        stream = await clients[2].root.numbers()
        calls = {
            "hang": start(clients[0].root.hang()),
            "block": start(clients[0].root.block(0.2 * SCALE)),
            "callback": start(clients[1].root.call_back(callback)),
            "stream": start(consume(stream)),
        }
        await finish(entered["hang"].wait(), BOUND, "hang()")
        await finish(in_callback.wait(), BOUND, "the callback")
        await finish(entered["stream"].wait(), BOUND, "the stream")
        await finish(asyncio.to_thread(entered["block"].wait, BOUND), BOUND, "block()")
        t0 = now()
        await finish(server.aclose(), close_timeout + BOUND, "the server's close")
        for what, task in calls.items():
            exc = await outcome(task, what, close_timeout + BOUND)
            if what == "block":  # it finished within close_timeout: its result came back
                assert exc is None, repr(exc)
                assert task.result() == "blocked and done"
            else:
                assert isinstance(exc, ConnectionClosed), (what, repr(exc))
        assert now() - t0 < close_timeout + 2 * SCALE
        for client in clients:
            await finish(client.wait_closed(), BOUND, "a client's close")
            assert client.closed
        assert not server.connections
        await server.aclose()  # idempotent
        with pytest.raises(OSError):
            await rpc.connect(port=server.port)
    finally:
        server.close()
        for client in clients:
            await client.close()
        await server.wait_closed()
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncdist-rpc")]


@pytest.mark.parametrize("closing", ["client", "server"])
async def test_graceful_close_lets_a_call_in_progress_finish_its_callbacks(closing: str) -> None:
    class Twice(rpc.Service):
        async def exposed_two_steps(self, first: Any, second: Any) -> Any:
            await first()  # the close begins while the server waits for this callback
            return await second(1)

    async with rpc.serve(Twice, port=0, close_timeout=BOUND) as server:
        conn = await rpc.connect(port=server.port, close_timeout=BOUND)
        try:
            entered, go = asyncio.Event(), asyncio.Event()

            async def first() -> None:
                entered.set()
                await go.wait()

            async def second(x: int) -> int:
                return x + 1

            call = start(conn.root.two_steps(first, second))
            await finish(entered.wait(), BOUND, "the first callback")
            (session,) = server.connections
            if closing == "client":
                closer = start(conn.close())
                await eventually(lambda: conn.closed, "the client's close did not begin")
            else:
                closer = start(server.aclose())
                await eventually(lambda: session.closed, "the server's close did not begin")
            go.set()
            exc = await outcome(call, "the call in progress")
            await finish(closer, BOUND, "the close")
            assert exc is None, repr(exc)
            assert call.result() == 2
        finally:
            await conn.close()
