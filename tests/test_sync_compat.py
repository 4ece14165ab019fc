"""The classic libraries' own spellings in the blocking facade, beyond the seed's examples.

Pyro's one-call servers: ``sync.serve`` and ``sync.Daemon.serveSimple`` (Pyro4's
``Pyro4.Daemon.serveSimple({Cls: "name"}, ns=...)``), and ``asyncdist.objects.serve(daemon=...)``
under them; the module paths ``Pyro4.core``, ``Pyro4.naming``, ``rpyc.classic`` and
``rpyc.connect``; PyCSP's ``TraceInit``/``TraceQuit`` and ``Channel.Disconnect``.

Each server runs in a thread of the test (it blocks, as in a Pyro script);
the test calls it through blocking proxies, then shuts it down and checks
that the call returned, the names left the name server and the daemon closed.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE

from asyncdist import objects, rpc, sync
from asyncdist.errors import CommunicationError, NamingError
from asyncdist.naming import NameServerDaemon

BOUND = 30 * SCALE

pytestmark = pytest.mark.timeout(int(90 * SCALE))


@sync.expose
class Greeter:
    def __init__(self) -> None:
        self.greeted: list[str] = []

    def greet(self, name: str) -> str:
        self.greeted.append(name)
        return f"Hello, {name}."


@sync.expose
class Counter:
    count = 0

    def bump(self) -> int:
        Counter.count += 1
        return Counter.count


@pytest.fixture(autouse=True)
def _stop_the_sync_loop(leak_check: None) -> Iterator[None]:
    yield
    sync.shutdown()


class Running:
    """A blocking server call running in a thread; ``ready`` is set with its daemon and URIs."""

    def __init__(self, target: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        self.daemon: objects.Daemon | None = None
        self.uris: dict[str, str] = {}
        self.error: BaseException | None = None

        def on_ready(daemon: objects.Daemon, uris: dict[str, str]) -> None:
            self.daemon, self.uris = daemon, uris
            self.ready.set()

        def main() -> None:
            try:
                target(*args, ready=on_ready, **kwargs)
            except BaseException as e:  # reported by finish()
                self.error = e
                self.ready.set()

        self.thread = threading.Thread(target=main, name="serving")
        self.thread.start()
        assert self.ready.wait(BOUND), "the server did not start"
        assert self.error is None, self.error

    def stop(self) -> None:
        """Shut the daemon down from this thread; the serving call must return."""
        if self.daemon is not None:
            sync.call(self.daemon.close)
        self.thread.join(BOUND)
        assert not self.thread.is_alive(), "the serving call did not return after shutdown"
        assert self.error is None, self.error


def test_serve_simple_names_the_objects_and_removes_the_names_at_shutdown(
    sync_name_server: NameServerDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    greeter = Greeter()
    server = Running(sync.Daemon.serveSimple, {greeter: "example.greeting", Counter: "example.counter"})
    try:
        # Pyro4's greeting client, unchanged apart from the import.
        with sync.Proxy("PYRONAME:example.greeting") as maker:
            assert maker.greet("Irmen") == "Hello, Irmen."
        with sync.Proxy("PYRONAME:example.counter") as counter:
            assert [counter.bump(), counter.bump()] == [1, 2]
        assert greeter.greeted == ["Irmen"]
        ns = sync.locate_ns()
        assert ns.list(prefix="example.") == server.uris
        ns._release()
        printed = capsys.readouterr().out.splitlines()
        for name, uri in server.uris.items():
            assert re.fullmatch(r"adist:[0-9a-f]{32}@127\.0\.0\.1:\d+", uri)
            assert f"{name}: {uri}" in printed
    finally:
        server.stop()
    ns = sync.locate_ns()
    assert ns.list(prefix="example.") == {}
    ns._release()
    with pytest.raises(CommunicationError), sync.Proxy(server.uris["example.greeting"]) as gone:
        gone.greet("late")


def test_serve_simple_without_the_name_server_and_in_a_given_daemon(
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = sync.Daemon(port=0)
    location = daemon.location
    server = Running(
        sync.Daemon.serveSimple, {Greeter: "not.registered"}, daemon=daemon, ns=False, verbose=False
    )
    try:
        uri = server.uris["not.registered"]
        assert uri.endswith("@" + location)  # served by the daemon given
        assert server.daemon is daemon._daemon
        with sync.Proxy(uri) as maker:
            assert maker.greet("you") == "Hello, you."
        assert capsys.readouterr().out == ""  # verbose=False
    finally:
        # Pyro's way to stop it: the daemon's shutdown, from another thread.
        daemon.shutdown()
        server.thread.join(BOUND)
        assert not server.thread.is_alive()
        assert server.error is None


def test_sync_serve_objects_without_names(sync_name_server: NameServerDaemon) -> None:
    server = Running(sync.serve, {Greeter(): None}, use_ns=True, verbose=False)
    try:
        [(key, uri)] = server.uris.items()
        assert key == uri  # no name: listed by its URI, nothing registered
        ns = sync.locate_ns()
        assert uri not in ns.list().values()
        ns._release()
        with sync.Proxy(uri) as maker:
            assert maker.greet("x") == "Hello, x."
    finally:
        server.stop()


def test_serve_needs_a_running_name_server_for_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDIST_NS_PORT", "1")  # nothing listens there
    with pytest.raises((NamingError, CommunicationError)):
        sync.serve({Greeter: "needs.ns"}, verbose=False)


async def test_objects_serve_takes_a_daemon_started_or_not() -> None:
    for started in (False, True):
        daemon = objects.Daemon(port=0)
        if started:
            await daemon.start()
        ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            objects.serve(
                {Greeter: None},
                daemon=daemon,
                use_ns=False,
                verbose=False,
                ready=lambda d, uris, fut=ready: fut.set_result(uris),
            )
        )
        try:
            [uri] = (await asyncio.wait_for(ready, BOUND)).values()
            async with objects.Proxy(uri) as maker:
                assert await maker.greet("async") == "Hello, async."
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(CommunicationError):
            async with objects.Proxy(uri) as gone:
                await gone.greet("closed")  # the daemon closed with the serve task


async def test_objects_serve_refuses_daemon_options_with_a_daemon() -> None:
    daemon = objects.Daemon(port=0)
    with pytest.raises(TypeError, match="threads"):
        await objects.serve({Greeter: None}, daemon=daemon, use_ns=False, threads=4)


# -- module paths ----------------------------------------------------------------------------------


def test_pyro4_and_rpyc_module_paths_name_the_same_things() -> None:
    Pyro4 = sync
    assert Pyro4.core.Proxy is sync.Proxy
    assert Pyro4.core.Daemon is sync.Daemon
    assert Pyro4.core.expose is sync.expose
    assert Pyro4.naming.locateNS is sync.locateNS
    rpyc = sync
    assert rpyc.classic.connect is sync.classic_connect
    assert rpyc.classic.DEFAULT_SERVER_PORT == 18812
    assert rpyc.connect is sync.rpc_connect
    for name in ("core", "naming", "classic", "connect", "TraceInit", "TraceQuit", "serve"):
        assert name in sync.__all__


def test_pyro4_core_and_naming_serve_and_find_an_object(sync_name_server: NameServerDaemon) -> None:
    """The seed's chain/shop spellings, end to end in one process."""
    Pyro4 = sync
    ns = Pyro4.naming.locateNS()
    daemon = Pyro4.core.Daemon()
    uri = daemon.register(Greeter())
    ns.register("example.core.greeter", uri)
    thread = threading.Thread(target=daemon.requestLoop)
    thread.start()
    try:
        with Pyro4.core.Proxy("PYRONAME:example.core.greeter") as greeter:
            assert greeter.greet("core") == "Hello, core."
    finally:
        ns._release()
        daemon.shutdown()
        thread.join(BOUND)
    assert not thread.is_alive()


async def _serve_classic() -> Any:
    return await rpc.classic.serve(allow_classic=True, port=0)


def test_rpyc_classic_namespace(capfd: pytest.CaptureFixture[str]) -> None:
    rpyc = sync
    server = sync.run(_serve_classic())
    try:
        conn = rpyc.classic.connect("127.0.0.1", server.port)
        try:
            cube = rpyc.classic.teleport_function(conn, lambda v: v * v * v)
            assert cube(3) == 27
            with rpyc.classic.redirected_stdio(conn):
                conn.execute("print('printed on the server, shown here')")
            assert "printed on the server, shown here" in capfd.readouterr().out
        finally:
            conn.close()
    finally:
        sync.run(server.aclose())


# -- PyCSP spellings -----------------------------------------------------------------------------------


def test_pycsp_trace_and_disconnect_from_plain_code(tmp_path: Path) -> None:
    """The seed's ``TraceInit('trace.log')`` ... ``TraceQuit()``, and ``channel.Disconnect()``."""
    trace = tmp_path / "trace.log"
    sync.TraceInit(str(trace))
    try:
        a = sync.Channel("traced")

        @sync.process
        def counter(cout: Any, limit: int) -> None:
            for i in range(limit):
                cout(i)
            sync.poison(cout)

        @sync.process
        def printer(cin: Any) -> list[int]:
            got: list[int] = []
            while True:
                try:
                    got.append(cin())
                except sync.ChannelPoisoned:
                    return got

        assert sync.Parallel(counter(a.writer(), limit=3), printer(a.reader())) == [None, [0, 1, 2]]
    finally:
        sync.TraceQuit()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    writes = [r for r in records if r.get("event") == "write" and r.get("channel") == "traced"]
    assert [r.get("value") for r in writes] == ["0", "1", "2"]
    assert records[-1]["event"] == "trace-quit"

    b = sync.Channel("left")
    end = b.reader()
    b.Disconnect()  # PyCSP's name: the ends made here leave the channel
    with pytest.raises(sync.ChannelRetired, match="disconnected"):
        end()


# -- SCOOP's shared constants ----------------------------------------------------------------------------


def test_scoop_shared_constants_reach_the_tasks_of_the_default_pool() -> None:
    import _sync_tasks as tasks

    shared = sync.shared  # from scoop import shared
    shared.setConst(factor=3)
    assert sync.map(tasks.times_factor, [1, 2, 3]) == [3, 6, 9]
    assert sync.map(tasks.const_or, ["factor", "unset"], ["d", "d"]) == [3, "d"]
    assert shared.getConst("factor") == 3  # here too
    assert shared.get_const("factor") == 3
    assert shared.getConst("unset") is None  # SCOOP's answer for a constant that never came
    with pytest.raises(KeyError, match="unset"):
        shared.get_const("unset")
    shared.set_const(factor=3)  # the same value again: allowed
    with pytest.raises(ValueError, match="factor"):
        shared.setConst(factor=4)


# -- remote references sent back; RPyC's classic helpers --------------------------------------------


@sync.expose
class Mirror:
    def echo(self, x: Any) -> Any:
        return x


def test_blocking_handles_sent_back_arrive_as_what_they_stand_for() -> None:
    server = sync.run(rpc.classic.serve(allow_classic=True, port=0))
    try:
        with sync.classic_connect("127.0.0.1", server.port) as conn:
            conn.execute("class T:\n    pass\nt = T()\nholder = T()")
            t = conn.eval("t")
            assert isinstance(t, sync.RemoteRef)
            assert conn.builtins.id(t) == conn.eval("id(t)")  # the object itself, not a wrapper
            assert conn.eval("lambda xs, d: xs[0] is t and d['k'] is t")([t], {"k": t}) is True
            conn.eval("holder").x = t
            assert conn.eval("holder.x is t") is True
    finally:
        sync.run(server.aclose())
    daemon = sync.Daemon()
    uri = daemon.register(Mirror())
    thread = threading.Thread(target=daemon.request_loop)
    thread.start()
    try:
        with sync.Proxy(uri) as mirror:
            back = mirror.echo(mirror)  # a proxy as an argument travels as a proxy
            assert isinstance(back, sync.Proxy)
            assert str(back._uri) == str(mirror._uri)
            back._release()
    finally:
        daemon.shutdown()
        thread.join(BOUND)
    assert not thread.is_alive()


def test_rpyc_classic_obtain_deliver_upload_download(tmp_path: Path) -> None:
    import fractions
    import os

    rpyc = sync
    server = sync.run(rpc.classic.serve(allow_classic=True, port=0))
    try:
        with rpyc.classic.connect("127.0.0.1", server.port) as conn:
            third = conn.eval("__import__('fractions').Fraction(1, 3)")
            assert isinstance(third, sync.RemoteRef)
            assert rpyc.classic.obtain(third) == fractions.Fraction(1, 3)  # a local copy
            assert rpyc.classic.obtain(42) == 42  # a value is returned as it is
            there = rpyc.classic.deliver(conn, fractions.Fraction(2, 7))
            assert isinstance(there, sync.RemoteRef)
            assert str(there) == "2/7"
            assert conn.builtins.isinstance(there, conn.modules.fractions.Fraction) is True

            local = tmp_path / "local"
            (local / "sub").mkdir(parents=True)
            big = os.urandom(600_000)  # more than two copy chunks
            (local / "big.bin").write_bytes(big)
            (local / "sub" / "note.txt").write_text("hello")
            rpyc.classic.upload(conn, str(local), str(tmp_path / "remote"))
            assert (tmp_path / "remote" / "big.bin").read_bytes() == big
            assert (tmp_path / "remote" / "sub" / "note.txt").read_text() == "hello"
            rpyc.classic.download(conn, str(tmp_path / "remote"), str(tmp_path / "back"))
            assert (tmp_path / "back" / "big.bin").read_bytes() == big
            assert (tmp_path / "back" / "sub" / "note.txt").read_text() == "hello"
            rpyc.classic.upload(conn, str(local / "sub" / "note.txt"), str(tmp_path / "one.txt"))
            assert (tmp_path / "one.txt").read_text() == "hello"
    finally:
        sync.run(server.aclose())
    plain_server = sync.run(rpc.serve(PlainService, port=0))
    try:
        with sync.rpc_connect("127.0.0.1", plain_server.port) as plain:
            thing = plain.root.thing()
            with pytest.raises(TypeError, match="classic"):
                rpyc.classic.obtain(thing)
    finally:
        sync.run(plain_server.aclose())


class PlainService(rpc.Service):
    def exposed_thing(self) -> Any:
        return Mirror()
