"""RPC classic mode, and what plain RPC servers refuse (RELIABILITY.md B17, B28).

Classic mode (:mod:`asyncdist.rpc.classic`) runs any code a client sends, so
these tests check first that it is hard to start by accident (``allow_classic``,
a secret or mutual TLS off loopback), then what a classic client gets: one
namespace per connection, ``modules``, ``builtins``, remote exceptions of their
own type, the server's prints redirected to the client, teleported functions,
and code that runs in the server's threads. Then the refusals: a plain
:func:`asyncdist.rpc.serve` server never runs client code (B28), and no RPC
connection, classic or not, ever loads a pickled payload (B17): the pickles
sent here would create a marker file if they were loaded.

The non-loopback refusals are checked without awaiting :func:`rpc.classic.serve`
(the check fires when it is called, before anything binds): nothing here listens
anywhere but 127.0.0.1. Servers that must be another process
(``conn.modules.os.getpid()``, standard output) are ``python -m asyncdist
rpc-classic``, killed by PID and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import signal
import ssl
import sys
import threading
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack
import pytest
from _evil import EvilClient, FakeServer, RawPeer, pickle_bomb
from _util import SCALE, eventually, stop

import asyncdist
from asyncdist import (
    ConfigurationError,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
    rpc,
)
from asyncdist import protocol as P
from asyncdist.codec import Pickled
from asyncdist.connection import current_connection

SECRET = "rpc-classic-secret-0123456789abcdef"
#: Upper bound for anything a test waits for (a safety net: the tests set their events).
BOUND = 5.0 * SCALE
BANNER = re.compile(rb"listening on ([0-9.]+):(\d+)")


def now() -> float:
    return asyncio.get_running_loop().time()


async def finish(aw: Any, what: str, timeout: float = BOUND) -> Any:
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        raise AssertionError(f"{what} did not finish within {timeout:g} s") from None


class Echo(rpc.Service):
    """A plain service: nothing here runs code sent by a client."""

    def exposed_echo(self, x: Any) -> Any:
        return x


@contextlib.asynccontextmanager
async def classic_server(**kwargs: Any) -> AsyncIterator[rpc.Server]:
    async with rpc.classic.serve(port=0, allow_classic=True, **kwargs) as server:
        yield server


# -- a classic server in its own process ---------------------------------------------------------


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def readline(self) -> bytes:
        """The next line the server process printed (a safety-net bound)."""
        assert self.proc.stdout is not None
        line = await finish(self.proc.stdout.readline(), "reading the server's output")
        return bytes(line)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    return env


@contextlib.asynccontextmanager
async def classic_process(tmp_path: Path, *extra: str) -> AsyncIterator[Child]:
    """``python -m asyncdist rpc-classic --allow-classic --port 0``; SIGKILLed by PID and reaped."""
    with open(tmp_path / "classic.err", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncdist", "rpc-classic", "--allow-classic", "--port", "0", *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            env=child_env(), cwd=tmp_path,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = await finish(proc.stdout.readline(), "the classic server's start", 20 * SCALE)
        match = BANNER.search(banner)
        assert match, f"no banner: {banner!r} {(tmp_path / 'classic.err').read_text()[-2000:]}"
        assert match.group(1) == b"127.0.0.1"
        yield Child(proc, int(match.group(2)))
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        await stop(proc)


# -- starting a classic server -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", [{}, {"allow_classic": False}, {"allow_classic": 1}, {"allow_classic": "yes"}]
)
async def test_classic_serve_refuses_without_allow_classic(flag: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="allow_classic=True"):
        await rpc.classic.serve(port=0, **flag)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", None])
def test_classic_serve_refuses_a_non_loopback_host_without_a_secret(host: str | None) -> None:
    # Not awaited: the refusal comes at the call, before anything binds (nothing may bind here).
    with pytest.raises(ConfigurationError, match="without authentication"):
        rpc.classic.serve(host, 0, allow_classic=True)


def test_classic_serve_refuses_a_non_loopback_host_with_tls_but_no_client_certificates() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # verify_mode CERT_NONE: not mutual TLS
    with pytest.raises(ConfigurationError, match="without authentication"):
        rpc.classic.serve("0.0.0.0", 0, allow_classic=True, ssl=context)


def test_classic_serve_has_no_insecure_override() -> None:
    with pytest.raises((ConfigurationError, TypeError)):
        rpc.classic.serve("0.0.0.0", 0, allow_classic=True, insecure=True)


def test_classic_serve_off_loopback_with_a_secret_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncdist.rpc")
    rpc.classic.serve("0.0.0.0", 0, allow_classic=True, secret=SECRET)  # not awaited: nothing binds
    assert any(
        r.levelno == logging.WARNING and "classic mode on 0.0.0.0" in r.getMessage() for r in caplog.records
    )


async def test_cli_rpc_classic_without_allow_classic_exits_1(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncdist", "rpc-classic", "--port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=child_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        out, err = await finish(
            proc.communicate(), "asyncdist rpc-classic without --allow-classic", 20 * SCALE
        )
    finally:
        await stop(proc)
    assert proc.returncode == 1
    assert out == b""
    text = err.decode()
    assert text.startswith("asyncdist: error: classic mode lets every client run any code"), text
    assert "--allow-classic" in text
    assert "Traceback" not in text


# -- what a classic client does -----------------------------------------------------------------


async def test_each_connection_has_its_own_namespace() -> None:
    async with (
        classic_server() as server,
        rpc.classic.connect(port=server.port) as one,
        rpc.classic.connect(port=server.port) as two,
    ):
        await one.execute("x = 1\ndef double(v):\n    return 2 * v")
        assert await one.eval("x + 1") == 2
        assert await one.eval("double(21)") == 42
        with pytest.raises(NameError, match="'x' is not defined"):
            await two.eval("x")
        with pytest.raises(NameError, match="'double' is not defined"):
            await two.execute("double(1)")
        await two.execute("x = 'two'")
        assert await one.eval("x") == 1
        assert await two.eval("x") == "two"
        # A new connection starts empty, even after the first one's namespace went away.
        await one.close()
        async with rpc.classic.connect(port=server.port) as three:
            with pytest.raises(NameError):
                await three.eval("x")


async def test_modules_and_builtins() -> None:
    async with classic_server() as server, rpc.classic.connect(port=server.port) as conn:
        assert await conn.modules.sys.platform == sys.platform
        assert await conn.modules.sys.getrecursionlimit() == sys.getrecursionlimit()
        assert await conn.modules["os.path"].join("a", "b") == os.path.join("a", "b")
        assert await conn.modules.json.dumps({"a": [1, 2]}) == '{"a": [1, 2]}'
        assert await conn.modules["xml.sax.saxutils"].escape("<&>") == "&lt;&amp;&gt;"
        assert await conn.builtins.len([1, 2, 3]) == 3
        assert await conn.builtins.sorted([3, 1, 2]) == [1, 2, 3]
        # A module arrives as a netref; its members are reached through it.
        sys_ref = await conn.modules.sys
        assert isinstance(sys_ref, rpc.Netref)
        assert await rpc.getattr(sys_ref, "maxsize") == sys.maxsize
        # Objects that are not values stay on the server.
        obj = await conn.eval("object()")
        assert isinstance(obj, rpc.Netref)
        assert (await rpc.repr(obj)).startswith("<object object at ")
        with pytest.raises(ModuleNotFoundError):
            await conn.modules["no_such_module_asyncdist_test"].anything()


async def test_modules_os_getpid_is_the_server_process(tmp_path: Path) -> None:
    async with classic_process(tmp_path) as child, rpc.classic.connect(port=child.port) as conn:
        assert await conn.modules.os.getpid() == child.pid
        assert await conn.eval("__import__('os').getpid()") == child.pid
        assert await conn.modules.os.getcwd() == str(tmp_path)
        assert child.pid != os.getpid()


async def test_remote_exceptions_keep_their_type_and_the_remote_traceback() -> None:
    async with classic_server() as server, rpc.classic.connect(port=server.port) as conn:
        with pytest.raises(ZeroDivisionError) as info:
            await conn.execute("def divide(a, b):\n    return a / b\n\ndivide(1, 0)")
        tb = info.value.remote_traceback  # type: ignore[attr-defined]
        assert "ZeroDivisionError" in tb
        assert "in divide" in tb
        assert '"<string>"' in tb
        with pytest.raises(KeyError):
            await conn.eval("{}['missing']")
        with pytest.raises(SyntaxError):
            await conn.execute("def (")
        # A class made by the client's code is not rebuilt here: it arrives as RemoteError.
        with pytest.raises(RemoteError) as remote:
            await conn.execute("class Custom(Exception):\n    pass\n\nraise Custom('mine')")
        assert "Custom" in remote.value.type_name
        assert "mine" in str(remote.value)
        # The connection is still fine.
        assert await conn.eval("6 * 7") == 42


class Collected:
    """Accumulates what capsys captured, for polling with eventually()."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.out = ""
        self.err = ""

    def read(self) -> Collected:
        got = self.capsys.readouterr()
        self.out += got.out
        self.err += got.err
        return self


async def test_redirected_stdio_shows_the_servers_prints_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = Collected(capsys)
    async with classic_process(tmp_path) as child, rpc.classic.connect(port=child.port) as conn:
        async with conn.redirected_stdio():
            await conn.execute("print('hi python cookbook')")
            await conn.execute("import sys\nprint('to stderr', file=sys.stderr)")
            await conn.execute("import sys\nsys.stdout.write('no newline')")
            await eventually(lambda: "no newline" in seen.read().out, "the prints did not arrive here")
            assert "hi python cookbook\n" in seen.out
            assert "to stderr\n" in seen.err
            assert "to stderr" not in seen.out
        # Left the block: the server's prints stay on the server (its own standard output).
        await conn.execute("import sys\nprint('after the block')\nsys.stdout.flush()")
        await conn.execute("import sys\nprint('after, on stderr', file=sys.stderr)\nsys.stderr.flush()")
        # (The first line of its own: nothing printed inside the block went there too.)
        assert await child.readline() == b"after the block\n"
        seen.read()
        assert "after the block" not in seen.out
        assert "after, on stderr" not in seen.err
    server_err = (tmp_path / "classic.err").read_text()
    assert "after, on stderr" in server_err
    assert "to stderr" not in server_err.replace("after, on stderr", "")


class PerConnection(io.TextIOBase):
    """A ``sys.stdout`` that records which client connection wrote each piece of text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.texts: dict[Any, list[str]] = {}

    def write(self, text: str) -> int:
        try:
            conn: Any = current_connection()
        except LookupError:
            conn = None
        with self.lock:
            self.texts.setdefault(conn, []).append(text)
        return len(text)

    def writable(self) -> bool:
        return True

    def lines(self, conn: Any) -> list[str]:
        with self.lock:
            return "".join(self.texts.get(conn, [])).splitlines()


async def test_two_clients_redirecting_at_once_each_get_their_own_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = PerConnection()
    monkeypatch.setattr(sys, "stdout", recorder)
    n = 20
    async with (
        classic_process(tmp_path) as child,
        rpc.classic.connect(port=child.port) as a,
        rpc.classic.connect(port=child.port) as b,
        rpc.classic.connect(port=child.port) as c,
    ):
        async with a.redirected_stdio(), b.redirected_stdio():
            code = "for i in range({n}):\n    print('{tag}', i)\n"
            # All run at once, in server threads, printing line by line; C does not redirect.
            await asyncio.gather(
                *(a.execute(code.format(n=5, tag=f"A{k}")) for k in range(n // 5)),
                *(b.execute(code.format(n=5, tag=f"B{k}")) for k in range(n // 5)),
                c.execute("import sys\nprint('C is not redirected')\nsys.stdout.flush()"),
            )
            assert await child.readline() == b"C is not redirected\n"  # the server's own output
            await eventually(
                lambda: len(recorder.lines(a.conn)) == n and len(recorder.lines(b.conn)) == n,
                "the prints did not all arrive",
            )
        assert all(line.startswith("A") for line in recorder.lines(a.conn)), recorder.lines(a.conn)
        assert all(line.startswith("B") for line in recorder.lines(b.conn)), recorder.lines(b.conn)
        for tag, conn in (("A", a), ("B", b)):
            got = sorted(recorder.lines(conn.conn))
            assert got == sorted(f"{tag}{k} {i}" for k in range(n // 5) for i in range(5))
        # Only the connections wrote here.
        assert set(recorder.texts) == {a.conn, b.conn}


async def test_teleport_a_lambda_a_closure_and_a_function_using_a_module() -> None:
    async with classic_server() as server, rpc.classic.connect(port=server.port) as conn:
        square = await conn.teleport(lambda x: x * x)
        assert isinstance(square, rpc.Netref)
        assert await square(7) == 49

        offset = 10

        def add(x: int) -> int:
            return x + offset

        remote_add = await conn.teleport(add)
        assert await remote_add(5) == 15

        def checksum(data: bytes) -> int:
            return zlib.crc32(data)

        remote_checksum = await conn.teleport(checksum)
        assert await remote_checksum(b"asyncdist") == zlib.crc32(b"asyncdist")

        def boom() -> None:
            raise LookupError("teleported and raised")

        remote_boom = await conn.teleport(boom)
        with pytest.raises(LookupError, match="teleported and raised"):
            await remote_boom()

        # Only functions travel this way.
        with pytest.raises(TypeError, match="functions"):
            await conn.teleport(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="bytes"):
            await conn.root.teleport("not bytes")


async def test_teleported_function_runs_on_the_server(tmp_path: Path) -> None:
    async with classic_process(tmp_path) as child, rpc.classic.connect(port=child.port) as conn:

        def where() -> tuple[int, str]:
            return os.getpid(), os.getcwd()

        remote = await conn.teleport(where)
        assert await remote() == (child.pid, str(tmp_path))


async def test_slow_code_in_one_client_does_not_stall_another(tmp_path: Path) -> None:
    # The server is another process, so that its stalls cannot hide behind this test's own loop.
    async with (
        classic_process(tmp_path) as child,
        rpc.classic.connect(port=child.port) as slow,
        rpc.classic.connect(port=child.port) as other,
    ):
        await slow.execute("import threading, time\nstarted = threading.Event()\ngate = threading.Event()")
        blocked = asyncio.create_task(slow.execute(f"started.set()\ngate.wait({BOUND})"))
        try:
            # The slow client's own connection is not stalled either: this runs in another thread.
            assert await finish(slow.eval(f"started.wait({BOUND})"), "waiting for the slow code") is True
            t0 = now()
            for i in range(20):
                assert await finish(other.eval(f"{i} + 1"), "eval in the other client", 2 * SCALE) == i + 1
            assert await other.modules.time.monotonic() > 0
            assert now() - t0 < 2 * SCALE
            assert not blocked.done()
        finally:
            await slow.eval("gate.set()")
        assert await finish(blocked, "the slow code") is None

        # The brief's example: a statement that sleeps holds up only its own caller.
        sleeper = asyncio.create_task(slow.execute("started.clear()\nstarted.set()\ntime.sleep(1)"))
        try:
            assert await slow.eval(f"started.wait({BOUND})") is True
            t0 = now()
            assert await other.eval("'fast'") == "fast"
            assert now() - t0 < 0.5 * SCALE
            assert not sleeper.done()
        finally:
            await finish(sleeper, "time.sleep(1)")


SLOW_GENERATOR = """
import threading, pathlib
gate = threading.Event()
def slow(path, seconds):
    pathlib.Path(path).touch()
    gate.wait(seconds)
    yield 1
"""


async def test_iterating_a_slow_generator_does_not_stall_other_clients(tmp_path: Path) -> None:
    started = tmp_path / "generator-started"
    hold = 2.0 * SCALE
    async with (
        classic_process(tmp_path) as child,
        rpc.classic.connect(port=child.port) as slow,
        rpc.classic.connect(port=child.port) as other,
    ):
        await slow.execute(SLOW_GENERATOR)
        gen = await slow.eval(f"slow({str(started)!r}, {hold})")

        async def consume() -> list[Any]:
            return [x async for x in gen]

        consuming = asyncio.create_task(consume())
        try:
            # Watched on the file system: the server's loop may be the thing that is stuck.
            await eventually(started.exists, "the generator did not start")
            t0 = now()
            assert await finish(other.eval("'fast'"), "eval in the other client") == "fast"
            elapsed = now() - t0
            assert elapsed < 0.5 * SCALE, f"the other client waited {elapsed:.2f} s for the generator"
            assert not consuming.done()
        finally:
            await slow.eval("gate.set()")
            assert await finish(consuming, "the iteration", hold + BOUND) == [1]


async def test_redirection_ends_when_the_client_drops(capsys: pytest.CaptureFixture[str]) -> None:
    original = sys.stdout, sys.stderr
    async with classic_server() as server:
        conn = await rpc.classic.connect(port=server.port)
        try:
            async with conn.redirected_stdio():
                assert sys.stdout is not original[0]  # the server's router (same process here)
                conn.conn.abort()
            await finish(conn.wait_closed(), "the client's close")
            await eventually(lambda: not server.connections, "the server kept the connection")
            await eventually(lambda: (sys.stdout, sys.stderr) == original, "the router was left installed")
        finally:
            await conn.close()
        async with rpc.classic.connect(port=server.port) as again:
            await again.execute("print('not redirected')")
    assert "not redirected" in capsys.readouterr().out


# -- B28: classic requests to a plain server ------------------------------------------------------


@pytest.mark.parametrize("public", [False, True], ids=["default", "allow_public_attrs"])
async def test_b28_classic_client_to_a_plain_server_gets_permission_error(public: bool) -> None:
    async with rpc.serve(Echo, port=0, allow_public_attrs=public) as server:
        with pytest.raises(PermissionError, match="classic mode is off"):
            await rpc.classic.connect(port=server.port)
        await eventually(lambda: not server.connections, "the refused connection stayed open")
        async with rpc.connect(port=server.port) as conn:
            assert await conn.root.echo("still serving") == "still serving"


def touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


@pytest.mark.parametrize("public", [False, True], ids=["default", "allow_public_attrs"])
@pytest.mark.parametrize(
    "attempt",
    ["execute", "eval", "modules", "modules-chain", "builtins", "teleport", "namespace", "rpc.classic"],
)
async def test_b28_plain_server_runs_no_client_code(tmp_path: Path, attempt: str, public: bool) -> None:
    marker = tmp_path / "ran"
    code = touch_code(marker)
    async with (
        rpc.serve(Echo, port=0, allow_public_attrs=public) as server,
        rpc.connect(port=server.port) as conn,
    ):
        root = conn.root
        if attempt == "execute":
            aw: Any = root.execute(code)
        elif attempt == "eval":
            aw = root.eval(f"({code}, 1)")
        elif attempt == "modules":
            aw = rpc.getattr(root, "modules")
        elif attempt == "modules-chain":
            aw = root.modules.os.system(f"touch {marker}")
        elif attempt == "builtins":
            aw = root.builtins.exec(code)
        elif attempt == "teleport":
            aw = root.teleport(cloudpickle.dumps(lambda: marker.touch()))
        elif attempt == "namespace":
            aw = rpc.getattr(root, "namespace")
        else:
            aw = conn.conn.call("rpc.classic")
        expected = PermissionError if attempt == "rpc.classic" else AttributeError
        with pytest.raises(expected):
            await finish(aw, attempt)
        assert not marker.exists()
        # The refusal was an error reply: the connection is still fine.
        assert await conn.root.echo(1) == 1
        # Bytes that happen to be a pickle are just bytes on a plain server.
        blob = cloudpickle.dumps(lambda: marker.touch())
        assert await conn.root.echo(blob) == blob
    assert not marker.exists()


# -- B17: no RPC connection loads pickles --------------------------------------------------------


@pytest.mark.parametrize("policy", ["load", "opaque"])
async def test_b17_pickle_policies_other_than_refuse_are_configuration_errors(policy: str) -> None:
    with pytest.raises(ConfigurationError, match="pickle"):
        rpc.serve(Echo, port=0, accept_pickle=policy)
    with pytest.raises(ConfigurationError, match="pickle"):
        rpc.classic.serve(port=0, allow_classic=True, accept_pickle=policy)
    async with rpc.serve(Echo, port=0) as server:  # a live server: the refusal is not a failed connect
        with pytest.raises(ConfigurationError, match="pickle"):
            await rpc.connect(port=server.port, accept_pickle=policy)
        with pytest.raises(ConfigurationError, match="pickle"):
            await rpc.classic.connect(port=server.port, accept_pickle=policy)
        assert not server.connections


async def test_b17_servers_never_send_pickled_values(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = pickle_bomb(marker)

    class Giver(rpc.Service):
        def exposed_give(self) -> Pickled:
            return Pickled(bomb)

        async def exposed_push(self, f: Any) -> Any:
            return await f(Pickled(bomb))

    async with (
        rpc.serve(Giver, port=0, secret=SECRET) as server,
        rpc.connect(port=server.port, secret=SECRET) as conn,
    ):
        with pytest.raises(asyncdist.SerializationError, match="does not accept pickled"):
            await conn.root.give()
        with pytest.raises(asyncdist.SerializationError, match="does not accept pickled"):
            await conn.root.push(lambda x: x)
        assert not conn.closed
    async with (
        rpc.classic.serve(port=0, allow_classic=True, secret=SECRET) as server,
        rpc.classic.connect(port=server.port, secret=SECRET) as classic,
    ):
        await classic.execute(f"from asyncdist.codec import Pickled\nblob = {bomb!r}")
        with pytest.raises(asyncdist.SerializationError, match="does not accept pickled"):
            await classic.eval("Pickled(blob)")
        assert await classic.eval("len(blob)") == len(bomb)
    assert not marker.exists()


@contextlib.asynccontextmanager
async def rpc_server(kind: str) -> AsyncIterator[rpc.Server]:
    if kind == "classic":
        async with rpc.classic.serve(port=0, allow_classic=True, secret=SECRET) as server:
            yield server
    else:
        async with rpc.serve(Echo, port=0, secret=SECRET) as server:
            yield server


async def honest_call(server: rpc.Server, kind: str) -> None:
    """A client of ``server`` still gets answers."""
    if kind == "classic":
        async with rpc.classic.connect(port=server.port, secret=SECRET) as conn:
            assert await conn.eval("1 + 1") == 2
    else:
        async with rpc.connect(port=server.port, secret=SECRET) as conn:
            assert await conn.root.echo("ok") == "ok"


def server_side(server: rpc.Server, known: list[rpc.Connection]) -> list[rpc.Connection]:
    return [s for s in server.connections if all(s is not k for k in known)]


@pytest.mark.parametrize("kind", ["plain", "classic"])
@pytest.mark.parametrize("via", ["asyncdist.connect", "raw-frames"])
async def test_b17_pickled_payload_from_an_authenticated_client_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, via: str
) -> None:
    marker = tmp_path / "pwned"
    bomb = pickle_bomb(marker)
    path: Any = "echo" if kind == "plain" else "eval"
    async with rpc_server(kind) as server:
        honest: Any = await (
            rpc.classic.connect(port=server.port, secret=SECRET)
            if kind == "classic"
            else rpc.connect(port=server.port, secret=SECRET)
        )
        try:
            await eventually(lambda: len(server.connections) == 1, "the honest client is not served")
            known = list(server.connections)
            if via == "asyncdist.connect":
                async with asyncdist.connect(port=server.port, secret=SECRET) as raw:
                    assert raw.authenticated
                    raw._codec.send_pickle = True  # the server said it refuses pickles: send anyway
                    await eventually(lambda: server_side(server, known), "no server side for the attacker")
                    (attacked,) = server_side(server, known)
                    with pytest.raises(ConnectionClosed):
                        await finish(raw.call("rpc.call", 0, path, Pickled(bomb)), "the pickled call")
                    assert raw.closed
            else:
                evil = await EvilClient.open(server.port)
                try:
                    await evil.handshake(SECRET.encode())
                    await eventually(lambda: server_side(server, known), "no server side for the attacker")
                    (attacked,) = server_side(server, known)
                    body = msgpack.packb([P.CALL, 1, "rpc.call", [0, path, msgpack.ExtType(3, bomb)]])
                    await evil.send_frame(body)
                    frames = await evil.expect_closed()
                    assert all(b"pwned" not in f for f in frames)
                finally:
                    await evil.aclose()
            await finish(attacked.wait_closed(), "the attacked connection's close")
            cause = attacked.conn.close_exception
            assert cause is not None
            assert isinstance(cause.__cause__, ProtocolError), repr(cause.__cause__)
            assert "pickled payload refused" in str(cause.__cause__)
            assert not marker.exists()
            # The honest client connected before the attack is still served, and so is a new one.
            if kind == "classic":
                assert await honest.eval("'still here'") == "still here"
            else:
                assert await honest.root.echo("still here") == "still here"
            await honest_call(server, kind)
        finally:
            await honest.close()
    assert not marker.exists()
    assert all(str(marker) not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["plain", "classic"])
async def test_b17_pickled_reply_from_a_server_is_refused_by_rpc_clients(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    bomb = pickle_bomb(marker)

    async def script(peer: RawPeer) -> None:
        await peer.accept_handshake(SECRET.encode())
        msg = await peer.recv_message()
        assert msg[0] == P.CALL
        await peer.send_frame(msgpack.packb([P.REPLY, msg[1], msgpack.ExtType(3, bomb)]))
        await peer.expect_closed()

    async with FakeServer(script) as fake:
        if kind == "classic":
            # The first call a classic client makes is its "rpc.classic" check.
            with pytest.raises(ConnectionClosed):
                await finish(rpc.classic.connect(port=fake.port, secret=SECRET), "classic connect")
        else:
            async with rpc.connect(port=fake.port, secret=SECRET) as conn:
                with pytest.raises(ConnectionClosed):
                    await finish(conn.root.echo(1), "the call")
                assert conn.closed
                closed = conn.conn.close_exception
                assert closed is not None
                assert isinstance(closed.__cause__, ProtocolError), repr(closed.__cause__)
                assert "pickled payload refused" in str(closed.__cause__)
        await eventually(lambda: not fake._tasks, "the fake server's script did not end")
    assert not fake.errors, fake.errors
    assert not marker.exists()
