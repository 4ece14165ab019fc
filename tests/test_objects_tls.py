"""Remote objects and the name server over (mutual) TLS, with and without a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

import asyncdist
from asyncdist.naming import NameServerDaemon
from asyncdist.security import client_context, server_context, write_certificates

SECRET = "objects-over-tls-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    write_certificates(directory)
    return directory


@asyncdist.expose
class Greeter:
    async def greet(self, name: str) -> str:
        return f"hello {name}"

    async def ask(self, callback: asyncdist.Proxy) -> str:
        answer: str = await callback.answer()
        return answer.upper()


@asyncdist.expose
class Answerer:
    def answer(self) -> str:
        return "over tls"


@pytest.mark.both_loops
async def test_a_proxy_calls_a_daemon_over_mutual_tls_and_is_called_back(pki: Path) -> None:
    server_ssl = server_context(pki / "server.pem", pki / "server.key", cafile=pki / "ca.pem")
    client_ssl = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    async with asyncdist.Daemon(ssl=server_ssl, secret=SECRET) as daemon:
        uri = daemon.register(Greeter())
        async with asyncdist.Proxy(uri, ssl=client_ssl, secret=SECRET) as greeter:
            assert await greeter.greet("Meeta") == "hello Meeta"
            # The callback travels back over the same TLS connection.
            assert await greeter.ask(Answerer()) == "OVER TLS"
            conn = greeter._conn
            assert conn is not None
            assert conn.authenticated
            assert conn._transport is not None
            assert conn._transport.get_extra_info("ssl_object") is not None


async def test_a_proxy_without_a_client_certificate_is_refused(pki: Path) -> None:
    server_ssl = server_context(pki / "server.pem", pki / "server.key", cafile=pki / "ca.pem")
    no_cert = client_context(pki / "ca.pem")
    async with asyncdist.Daemon(ssl=server_ssl) as daemon:
        uri = daemon.register(Greeter())
        proxy = asyncdist.Proxy(uri, ssl=no_cert, handshake_timeout=5.0)
        try:
            with pytest.raises(asyncdist.AuthenticationError):
                await proxy.greet("nobody")
        finally:
            await proxy._release()
        # A plain-TCP proxy gets no further either, and the daemon keeps serving TLS clients.
        plain = asyncdist.Proxy(uri, handshake_timeout=0.5, connect_attempts=1)
        try:
            with pytest.raises((asyncdist.ConnectError, asyncdist.AuthenticationError)):
                await plain.greet("nobody")
        finally:
            await plain._release()
        good = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        async with asyncdist.Proxy(uri, ssl=good) as greeter:
            assert await greeter.greet("Rashmi") == "hello Rashmi"


async def test_name_server_over_tls_resolves_and_cleans(pki: Path) -> None:
    server_ssl = server_context(pki / "server.pem", pki / "server.key", cafile=pki / "ca.pem")
    client_ssl = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    nsd = NameServerDaemon(port=0, ssl=server_ssl, client_ssl=client_ssl)
    async with (
        nsd,
        asyncdist.Daemon(ssl=server_ssl) as live,
        asyncdist.Daemon(ssl=server_ssl) as dead,
        asyncdist.locate_ns(port=nsd.port, ssl=client_ssl) as ns,
    ):
        live_uri = live.register(Greeter())
        await ns.register("tls.live", live_uri)
        await ns.register("tls.dead", dead.register(Greeter()))
        await dead.aclose()
        async with asyncdist.Proxy("adistname:tls.live", ns_port=nsd.port, ssl=client_ssl) as p:
            assert await p.greet("via the name server") == "hello via the name server"
        # The name server probes daemons with its client TLS context: the live one answers.
        assert await ns.clean() == ["tls.dead"]
        assert await ns.list() == {"tls.live": live_uri}
