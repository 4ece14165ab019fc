"""Behaviour of :func:`asyncdist.serve` and :func:`asyncdist.connect` over real sockets.

Unix sockets, per-connection handler factories, ``on_connect``, connect
errors, the bind policy, shared-secret authentication (argument and
environment), server shutdown, and :func:`asyncdist.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from _util import SCALE, eventually, free_port

import asyncdist
from asyncdist import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    ConnectionClosedError,
    ConnectionClosedOK,
    connect,
    current_connection,
    serve,
)
from asyncdist.security import WeakSecretWarning
from asyncdist.testing import connection_pair


def echo(x: Any) -> Any:
    return x


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    path = tmp_path / "s.sock"
    if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to ~108 bytes
        pytest.skip(f"temporary path too long for a Unix socket: {path}")
    return path


# -- serve and connect -----------------------------------------------------------------------


@pytest.mark.both_loops
async def test_async_with_connect_closes_the_connection() -> None:
    async with serve({"echo": echo}) as server:
        assert server.address == ("127.0.0.1", server.port)
        async with connect(port=server.port) as conn:
            assert await conn.call("echo", [1, 2]) == [1, 2]
            assert not conn.closed
            await eventually(lambda: len(server.connections) == 1, "the server does not list the client")
        assert conn.closed
        assert isinstance(conn.close_exception, ConnectionClosedOK)
        with pytest.raises(ConnectionClosedOK):
            await conn.call("echo", 1)
        await eventually(lambda: not server.connections, "the server still lists a closed client")
        assert server.stats.opened == 1
        assert server.stats.closed == 1


@pytest.mark.both_loops
async def test_unix_socket_round_trip_mode_0600_removed_at_close(sock_path: Path) -> None:
    async with serve({"echo": echo}, path=sock_path) as server:
        assert server.address == str(sock_path)
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(stat.S_IMODE(st.st_mode))
        with pytest.raises(ValueError):
            _ = server.port
        async with connect(path=sock_path) as conn:
            assert await conn.call("echo", b"over unix") == b"over unix"
            assert await conn.call("echo", {1: (2, 3)}) == {1: (2, 3)}
    assert not sock_path.exists(), "the socket file was left behind"


@pytest.mark.both_loops
async def test_connect_to_a_missing_unix_socket_raises_connect_error(sock_path: Path) -> None:
    with pytest.raises(ConnectError, match=str(sock_path)):
        await connect(path=sock_path)


@pytest.mark.both_loops
async def test_handler_factory_is_called_per_connection() -> None:
    numbers = itertools.count()
    made_for: list[asyncdist.Connection] = []

    def factory(conn: asyncdist.Connection) -> dict[str, Callable[..., Any]]:
        made_for.append(conn)
        number = next(numbers)
        return {
            "number": lambda: number,
            "is_mine": lambda: current_connection() is conn,
        }

    async with serve(factory) as server, connect(port=server.port) as a, connect(port=server.port) as b:
        got = {await a.call("number"), await b.call("number")}
        assert got == {0, 1}
        assert await a.call("number") == await a.call("number")
        assert await a.call("is_mine") is True
        assert await b.call("is_mine") is True
        assert len(made_for) == 2
        assert set(made_for) == set(server.connections)


@pytest.mark.both_loops
async def test_on_connect_sync_gets_the_open_connection() -> None:
    connected: list[asyncdist.Connection] = []
    async with serve({"echo": echo}, on_connect=connected.append) as server:
        async with connect(port=server.port) as conn:
            await eventually(lambda: len(connected) == 1, "on_connect was not called")
            (server_side,) = connected
            assert server_side in server.connections
            assert not server_side.closed
            assert not server_side.is_initiator
            assert server_side.remote_address == conn.local_address
            assert await conn.call("echo", 1) == 1
        assert len(connected) == 1


@pytest.mark.both_loops
async def test_on_connect_async_can_call_the_client() -> None:
    greeted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def on_connect(conn: asyncdist.Connection) -> None:
        greeted.set_result(await conn.call("hello", "server"))

    async with (
        serve({"echo": echo}, on_connect=on_connect) as server,
        connect(port=server.port, handlers={"hello": lambda who: f"hello {who}"}) as conn,
    ):
        assert await asyncio.wait_for(greeted, 2 * SCALE) == "hello server"
        assert await conn.call("echo", 2) == 2


@pytest.mark.both_loops
async def test_failing_async_on_connect_closes_only_that_connection() -> None:
    count = 0

    async def on_connect(conn: asyncdist.Connection) -> None:
        nonlocal count
        count += 1
        if count == 1:
            raise RuntimeError("refuse the first one")

    async with serve({"echo": echo}, on_connect=on_connect) as server:
        async with connect(port=server.port) as first:
            await asyncio.wait_for(first.wait_closed(), 2 * SCALE)
            assert isinstance(first.close_exception, ConnectionClosedError)
        async with connect(port=server.port) as second:
            assert await second.call("echo", "fine") == "fine"


@pytest.mark.both_loops
async def test_connect_to_a_closed_port_raises_connect_error() -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ConnectError, match=str(port)) as info:
        await connect(port=port, handshake_timeout=2.0 * SCALE)
    assert isinstance(info.value, ConnectionError)
    assert loop.time() - t0 < 2.0 * SCALE


@pytest.mark.both_loops
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_connection_dropped_during_the_handshake_raises_connect_error(how: str) -> None:
    """A listener that drops us before the handshake ends: connect() raises ConnectError, as documented."""

    def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    listener = await asyncio.start_server(drop, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(asyncdist.AsyncDistError) as info:
            await connect(port=port, handshake_timeout=2.0 * SCALE)
        assert isinstance(info.value, ConnectError), repr(info.value)
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.mark.both_loops
async def test_connection_refused_over_the_handshake_cap_raises_connect_error() -> None:
    async with serve({"echo": echo}, max_unauthenticated=0) as server:
        with pytest.raises(asyncdist.AsyncDistError) as info:
            await connect(port=server.port, handshake_timeout=2.0 * SCALE)
        assert isinstance(info.value, ConnectError), repr(info.value)
        assert server.stats.refused_unauthenticated == 1


@pytest.mark.both_loops
async def test_serve_forever_ends_when_cancelled_and_closes_the_server() -> None:
    server = await serve({"echo": echo})
    async with connect(port=server.port) as conn:
        runner = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0)
        assert not runner.done()
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert not server.connections
        await asyncio.wait_for(conn.wait_closed(), 2 * SCALE)
        assert isinstance(conn.close_exception, ConnectionClosedOK)


# -- bind policy and authentication -------------------------------------------------------------


def test_public_bind_without_secret_or_tls_is_refused_with_a_fix() -> None:
    with pytest.raises(ConfigurationError) as info:
        serve({"echo": echo}, host="0.0.0.0")
    message = str(info.value)
    assert "0.0.0.0" in message
    assert "secret" in message
    assert "insecure=True" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.both_loops
async def test_public_bind_with_insecure_true_binds() -> None:
    async with serve({"echo": echo}, host="0.0.0.0", insecure=True) as server:
        assert server.sockets[0].getsockname()[0] == "0.0.0.0"
        assert server.port > 0


@pytest.mark.both_loops
async def test_public_bind_with_a_secret_binds_and_authenticates(secret: str) -> None:
    async with serve({"echo": echo}, host="0.0.0.0", secret=secret) as server:
        assert server.sockets[0].getsockname()[0] == "0.0.0.0"
        # Talk to it over loopback only.
        async with connect("127.0.0.1", server.port, secret=secret) as conn:
            assert await conn.call("echo", "authenticated") == "authenticated"
            assert conn.authenticated


@pytest.mark.both_loops
async def test_shared_secret_round_trip(secret: str) -> None:
    async with connection_pair(server_handlers={"echo": echo}, secret=secret) as (client, server_side):
        assert await client.call("echo", {"k": b"v"}) == {"k": b"v"}
        assert client.authenticated
        assert server_side.authenticated
        assert client.peer is not None
        assert client.peer.authenticated
        assert server_side.peer is not None
        assert server_side.peer.authenticated


@pytest.mark.both_loops
async def test_without_a_secret_nothing_is_authenticated() -> None:
    async with connection_pair(server_handlers={"echo": echo}) as (client, server_side):
        assert await client.call("echo", 1) == 1
        assert not client.authenticated
        assert not server_side.authenticated


async def _refused(server: asyncdist.Server, **client_kwargs: Any) -> AuthenticationError:
    """Connect with ``client_kwargs``; return the AuthenticationError; check the server survives."""
    with pytest.raises(AuthenticationError) as info:
        await connect(port=server.port, handshake_timeout=2.0 * SCALE, **client_kwargs)
    await eventually(lambda: server.stats.handshake_failures == 1, "the server did not count the failure")
    assert not server.connections
    return info.value


@pytest.mark.both_loops
async def test_server_with_secret_refuses_client_without(secret: str) -> None:
    async with serve({"echo": echo}, secret=secret) as server:
        exc = await _refused(server)
        assert "secret" in str(exc)
        async with connect(port=server.port, secret=secret) as good:
            assert await good.call("echo", 1) == 1


@pytest.mark.both_loops
async def test_client_with_secret_refuses_server_without(secret: str) -> None:
    async with serve({"echo": echo}) as server:
        exc = await _refused(server, secret=secret)
        assert "secret" in str(exc)
        async with connect(port=server.port) as plain:
            assert await plain.call("echo", 1) == 1


@pytest.mark.both_loops
async def test_wrong_secret_is_refused(secret: str) -> None:
    async with serve({"echo": echo}, secret=secret) as server:
        await _refused(server, secret=secret[::-1])
        async with connect(port=server.port, secret=secret) as good:
            assert await good.call("echo", 1) == 1


@pytest.mark.both_loops
async def test_secret_from_the_environment_is_used(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDIST_SECRET", secret)
    async with serve({"echo": echo}) as server:
        async with connect(port=server.port) as conn:
            assert conn.authenticated
            assert await conn.call("echo", "env") == "env"
        async with connect(port=server.port, secret=secret) as explicit:
            assert explicit.authenticated
        monkeypatch.delenv("ASYNCDIST_SECRET")
        await _refused(server)


@pytest.mark.both_loops
async def test_secret_file_from_the_environment_is_used(
    secret: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = tmp_path / "secret"
    key.write_text(secret + "\n")
    monkeypatch.setenv("ASYNCDIST_SECRET_FILE", str(key))
    async with serve({"echo": echo}) as server, connect(port=server.port, secret=secret) as conn:
        assert conn.authenticated
        assert await conn.call("echo", "file") == "file"


@pytest.mark.both_loops
async def test_short_secret_warns_but_works() -> None:
    with pytest.warns(WeakSecretWarning):
        server_ctx = serve({"echo": echo}, secret="short")
    async with server_ctx as server:
        with pytest.warns(WeakSecretWarning):
            client_ctx = connect(port=server.port, secret="short")
        async with client_ctx as conn:
            assert conn.authenticated
            assert await conn.call("echo", 1) == 1


# -- shutdown ----------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_server_aclose_closes_every_connection() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "finished"

    async with serve({"echo": echo, "slow": slow}) as server, contextlib.AsyncExitStack() as stack:
        port = server.port
        clients = [await stack.enter_async_context(connect(port=port)) for _ in range(3)]
        for c in clients:
            assert await c.call("echo", 1) == 1
        await eventually(lambda: len(server.connections) == 3, "the server does not list 3 clients")
        in_flight = asyncio.create_task(clients[0].call("slow"))
        async with asyncio.timeout(2 * SCALE):
            await started.wait()
        closing = asyncio.create_task(server.aclose())
        await eventually(lambda: all(c.closed for c in clients[1:]), "idle clients were not closed")
        release.set()
        assert await asyncio.wait_for(in_flight, 2 * SCALE) == "finished"
        await asyncio.wait_for(closing, 3 * SCALE)
        assert server.connections == frozenset()
        for c in clients:
            await asyncio.wait_for(c.wait_closed(), 2 * SCALE)
            assert isinstance(c.close_exception, ConnectionClosedOK), c.close_exception
            with pytest.raises(ConnectionClosedOK):
                await c.call("echo", 1)
        with pytest.raises(ConnectError):
            await connect(port=port)
        await server.aclose()  # idempotent


@pytest.mark.both_loops
async def test_server_keeps_serving_others_when_one_client_aborts() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    handlers = {"echo": echo, "slow": slow}
    async with (
        serve(handlers) as server,
        connect(port=server.port) as a,
        connect(port=server.port) as b,
    ):
        await eventually(lambda: len(server.connections) == 2, "the server does not list 2 clients")
        pending = asyncio.create_task(a.call("slow"))
        async with asyncio.timeout(2 * SCALE):
            await started.wait()
        a.abort()
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(pending, 2 * SCALE)
        await eventually(lambda: len(server.connections) == 1, "the server still lists the aborted client")
        await eventually(cancelled.is_set, "the aborted client's handler was not cancelled")
        assert await b.call("echo", "b still works") == "b still works"
        async with connect(port=server.port) as c:
            assert await c.call("echo", "new client") == "new client"
        assert server.stats.closed >= 1


# -- asyncdist.run ------------------------------------------------------------------------------


async def _round_trip() -> tuple[type[asyncio.AbstractEventLoop], Any]:
    async with connection_pair(server_handlers={"echo": echo}) as (client, _):
        return type(asyncio.get_running_loop()), await client.call("echo", (1, "run"))


def test_run_uses_uvloop_when_available() -> None:
    loop_type, value = asyncdist.run(_round_trip())
    assert value == (1, "run")
    assert issubclass(loop_type, uvloop.Loop)


def test_run_with_the_asyncio_loop() -> None:
    loop_type, value = asyncdist.run(_round_trip(), loop="asyncio")
    assert value == (1, "run")
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_run_returns_the_value_and_raises_the_exception() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("from main")

    async def value() -> int:
        await asyncio.sleep(0)
        return 42

    assert asyncdist.run(value()) == 42
    with pytest.raises(KeyError, match="from main"):
        asyncdist.run(fails())
