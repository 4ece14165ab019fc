"""Secrets, the bind policy, certificates and TLS round trips (real loopback sockets)."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest

import asyncdist
from asyncdist.errors import ConfigurationError
from asyncdist.security import (
    WeakSecretWarning,
    check_bind,
    client_context,
    generate_secret,
    is_loopback,
    resolve_secret,
    server_context,
    write_certificates,
)
from asyncdist.testing import connection_pair


def test_secret_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCDIST_SECRET", raising=False)
    monkeypatch.delenv("ASYNCDIST_SECRET_FILE", raising=False)
    assert resolve_secret() is None
    f = tmp_path / "secret"
    f.write_text("  from-file-0123456789abcdef\n")
    monkeypatch.setenv("ASYNCDIST_SECRET_FILE", str(f))
    assert resolve_secret() == b"from-file-0123456789abcdef"
    monkeypatch.setenv("ASYNCDIST_SECRET", "from-env-0123456789abcdef")
    assert resolve_secret() == b"from-env-0123456789abcdef"
    assert resolve_secret(secret_file=f) == b"from-file-0123456789abcdef"
    assert resolve_secret("given-0123456789abcdef") == b"given-0123456789abcdef"
    assert resolve_secret(b"\x00\x01" * 10) == b"\x00\x01" * 10
    assert resolve_secret(env=False, secret=None) is None


def test_weak_and_empty_secrets(tmp_path: Path) -> None:
    with pytest.warns(WeakSecretWarning, match="only 5 bytes"):
        assert resolve_secret("short") == b"short"
    with pytest.raises(ConfigurationError, match="empty"):
        resolve_secret("")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigurationError, match="empty"):
        resolve_secret(secret_file=empty)
    with pytest.raises(ConfigurationError, match="cannot read"):
        resolve_secret(secret_file=tmp_path / "missing")
    with pytest.raises(TypeError):
        resolve_secret(123)  # type: ignore[arg-type]


def test_generated_secrets_are_strong_and_fresh() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b
    assert len(a.encode()) >= 32


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in (None, "0.0.0.0", "::", "10.1.2.3", "192.168.1.1", "example.invalid"):
        assert not is_loopback(host), host


def test_bind_policy() -> None:
    check_bind("127.0.0.1", secret=None, ssl=None)
    with pytest.raises(ConfigurationError, match="ASYNCDIST_SECRET") as info:
        check_bind("0.0.0.0", secret=None, ssl=None)
    assert "insecure=True" in str(info.value)
    check_bind("0.0.0.0", secret=b"x" * 32, ssl=None)
    check_bind("0.0.0.0", secret=None, ssl=None, insecure=True)
    server_only_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ConfigurationError):
        check_bind("0.0.0.0", secret=None, ssl=server_only_tls)


def test_certificates_are_written_with_private_keys_0600(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path / "pki", hostnames=("node1.example", "10.0.0.5"))
    for path in vars(paths).values():
        assert path.exists()
    for key in (paths.ca_key, paths.server_key, paths.client_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node1.example" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        write_certificates(tmp_path / "pki")
    write_certificates(tmp_path / "pki", overwrite=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    write_certificates(directory)
    return directory


def test_mutual_tls_needs_a_ca(pki: Path) -> None:
    with pytest.raises(ConfigurationError, match="cafile"):
        server_context(pki / "server.pem", pki / "server.key")


@pytest.mark.both_loops
async def test_tls_round_trip(pki: Path) -> None:
    server_ssl = server_context(
        pki / "server.pem", pki / "server.key", cafile=pki / "ca.pem", require_client_cert=False
    )
    client_ssl = client_context(pki / "ca.pem")
    async with connection_pair(
        server_handlers={"echo": lambda x: x}, server_ssl=server_ssl, client_ssl=client_ssl
    ) as (client, server_side):
        assert await client.call("echo", b"over tls") == b"over tls"
        assert client.authenticated  # the client verified the server's certificate
        assert not server_side.authenticated  # the client showed no certificate


@pytest.mark.both_loops
async def test_mutual_tls_round_trip_authenticates_both_ends(pki: Path) -> None:
    server_ssl = server_context(pki / "server.pem", pki / "server.key", cafile=pki / "ca.pem")
    client_ssl = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    big = os.urandom(3 * 1024 * 1024)
    async with connection_pair(
        server_handlers={"echo": lambda x: x}, server_ssl=server_ssl, client_ssl=client_ssl
    ) as (client, server_side):
        assert await client.call("echo", big) == big
        assert client.authenticated
        assert server_side.authenticated


@pytest.mark.both_loops
async def test_tls_plus_secret(pki: Path) -> None:
    server_ssl = server_context(pki / "server.pem", pki / "server.key", cafile=pki / "ca.pem")
    client_ssl = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    async with connection_pair(
        server_handlers={"echo": lambda x: x},
        server_ssl=server_ssl,
        client_ssl=client_ssl,
        secret="tls-and-secret-0123456789abcdef",
    ) as (client, _):
        assert await client.call("echo", 5) == 5
        assert client.peer is not None
        assert client.peer.authenticated  # the HMAC proof, on top of TLS


@pytest.mark.both_loops
async def test_pickles_flow_only_on_authenticated_connections(secret: str) -> None:
    received: list[object] = []
    async with connection_pair(
        server_handlers={"take": received.append}, accept_pickle="load", secret=secret
    ) as (client, _):
        await client.call("take", lambda: 42)
        assert received[0]() == 42  # type: ignore[operator]
    async with connection_pair(server_handlers={"take": received.append}, accept_pickle="load") as (
        client,
        _,
    ):
        with pytest.raises(asyncdist.SerializationError):
            await client.call("take", lambda: 42)
        assert await client.call("take", [1]) is None
