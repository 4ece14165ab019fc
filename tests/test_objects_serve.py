"""asyncdist.objects.serve(): Pyro's one-call server with names in the name server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import asyncdist
from asyncdist.naming import NameServerDaemon
from asyncdist.objects import Daemon, serve


@asyncdist.expose
class Greeting:
    def welcomeMessage(self, name: str) -> str:
        return "Hi welcome " + name


@asyncdist.expose
@asyncdist.behavior(instance_mode="percall")
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n


async def test_serve_registers_names_and_removes_them_when_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    nsd = NameServerDaemon(port=0)
    async with nsd, asyncdist.locate_ns(port=nsd.port) as ns:
        ready = asyncio.Event()
        seen: dict[str, str] = {}

        def on_ready(daemon: Daemon, uris: dict[str, str]) -> None:
            seen.update(uris)
            ready.set()

        unnamed = Greeting()
        task = asyncio.create_task(
            serve(
                {Greeting(): "example.greeting", Counter: "example.counter", unnamed: None},
                ns_port=nsd.port,
                ready=on_ready,
            )
        )
        try:
            async with asyncio.timeout(10):
                await ready.wait()
            assert set(await ns.list(prefix="example.")) == {"example.greeting", "example.counter"}
            async with asyncdist.Proxy("adistname:example.greeting", ns_port=nsd.port) as greeting:
                assert await greeting.welcomeMessage("LiLei") == "Hi welcome LiLei"
            async with asyncdist.Proxy("adistname:example.counter", ns_port=nsd.port) as counter:
                assert [await counter.bump() for _ in range(3)] == [1, 1, 1]  # percall, as declared
            unnamed_uri = next(uri for key, uri in seen.items() if key == uri)
            async with asyncdist.Proxy(unnamed_uri) as direct:
                assert await direct.welcomeMessage("Ken") == "Hi welcome Ken"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert await ns.list(prefix="example.") == {}
        out = capsys.readouterr().out
        assert f"example.greeting: {seen['example.greeting']}" in out
        assert unnamed_uri in out


async def test_serve_without_a_name_server_fails_with_naming_error() -> None:
    with pytest.raises(asyncdist.NamingError):
        await serve({Greeting(): "nowhere"}, ns_port=1, verbose=False, handshake_timeout=1.0)


async def test_serve_without_use_ns_needs_no_name_server() -> None:
    started = asyncio.Event()
    uris: dict[str, str] = {}

    def on_ready(daemon: Daemon, found: dict[str, str]) -> None:
        uris.update(found)
        started.set()

    task = asyncio.create_task(serve({Greeting(): "local"}, use_ns=False, verbose=False, ready=on_ready))
    try:
        async with asyncio.timeout(10):
            await started.wait()
        async with asyncdist.Proxy(uris["local"]) as greeting:
            assert await greeting.welcomeMessage("Meeta") == "Hi welcome Meeta"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
