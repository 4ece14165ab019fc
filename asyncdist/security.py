"""Secrets, bind policy, TLS contexts and certificates.

The handshake itself is sans-I/O in :mod:`asyncdist.protocol`; this module
holds what configures it:

* :func:`resolve_secret`: the shared secret from ``secret=``, a file, or the
  environment (``ASYNCDIST_SECRET``, ``ASYNCDIST_SECRET_FILE``);
* :func:`check_bind`: refuse a non-loopback listener without a secret or TLS;
* :func:`server_context` / :func:`client_context`: TLS (mutual by default)
  from PEM files, TLS 1.2 at least;
* :func:`write_certificates`: a private CA plus server and client
  certificates, made with ``cryptography`` (``asyncdist certs DIR``).

Without TLS the HMAC handshake proves, at connect time, that the peer holds
the secret; the stream after it is neither encrypted nor integrity-protected.
On untrusted networks use TLS and a secret together. Anyone who holds the
secret is trusted: on a compute cluster that means they can run code.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

__all__ = [
    "MIN_SECRET_LENGTH",
    "CertificatePaths",
    "check_bind",
    "client_context",
    "generate_secret",
    "is_loopback",
    "resolve_secret",
    "server_context",
    "write_certificates",
]

#: Secrets shorter than this (in bytes) are accepted with a warning.
MIN_SECRET_LENGTH = 16

SecretLike = str | bytes | os.PathLike[str] | None


class WeakSecretWarning(UserWarning):
    """The shared secret is shorter than :data:`MIN_SECRET_LENGTH` bytes."""


def generate_secret() -> str:
    """Return a fresh random secret (32 bytes, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _read_secret_file(path: str | os.PathLike[str]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {os.fspath(path)!r}: {exc}") from exc
    data = data.strip()
    if not data:
        raise ConfigurationError(f"secret file {os.fspath(path)!r} is empty")
    return data


def resolve_secret(
    secret: str | bytes | None = None,
    *,
    secret_file: str | os.PathLike[str] | None = None,
    env: bool = True,
) -> bytes | None:
    """Return the shared secret as bytes, or None for none.

    Order: ``secret`` (str is UTF-8 encoded), then ``secret_file``, then
    (when ``env``) ``ASYNCDIST_SECRET``, then the file named by
    ``ASYNCDIST_SECRET_FILE``. Surrounding whitespace of a file is dropped.
    An empty secret is an error; one shorter than 16 bytes is accepted with
    a :class:`WeakSecretWarning`.
    """
    value: bytes | None
    if secret is not None:
        if isinstance(secret, str):
            value = secret.encode()
        elif isinstance(secret, bytes | bytearray | memoryview):
            value = bytes(secret)
        else:
            raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")
    elif secret_file is not None:
        value = _read_secret_file(secret_file)
    elif env and os.environ.get("ASYNCDIST_SECRET"):
        value = os.environ["ASYNCDIST_SECRET"].encode()
    elif env and os.environ.get("ASYNCDIST_SECRET_FILE"):
        value = _read_secret_file(os.environ["ASYNCDIST_SECRET_FILE"])
    else:
        return None
    if not value:
        raise ConfigurationError("the shared secret is empty")
    if len(value) < MIN_SECRET_LENGTH:
        warnings.warn(
            f"the shared secret is only {len(value)} bytes; use at least {MIN_SECRET_LENGTH} "
            "(`asyncdist secret` prints a strong one)",
            WeakSecretWarning,
            stacklevel=2,
        )
    return value


def is_loopback(host: str | None) -> bool:
    """True if ``host`` names only loopback addresses (None, "all interfaces", is not)."""
    if host is None:
        return False
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_bind(
    host: str | None, *, secret: bytes | None, ssl: ssl.SSLContext | None, insecure: bool = False
) -> None:
    """Refuse to listen on a non-loopback address without a secret or mutual TLS.

    ``insecure=True`` overrides the refusal (the caller should log a warning).
    """
    if is_loopback(host) or insecure:
        return
    if secret is not None:
        return
    if ssl is not None and ssl.verify_mode == CERT_REQUIRED:
        return
    raise ConfigurationError(
        f"refusing to listen on {host!r} without authentication: anyone who can reach it could "
        "use it. Set a shared secret (secret=..., ASYNCDIST_SECRET or ASYNCDIST_SECRET_FILE; "
        "`asyncdist secret` makes one) or mutual TLS (`asyncdist certs DIR`), or pass "
        "insecure=True / --insecure if this network is trusted."
    )


CERT_REQUIRED = ssl.CERT_REQUIRED


def server_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
    *,
    cafile: str | os.PathLike[str] | None = None,
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """A TLS server context; with ``cafile`` and ``require_client_cert`` it is mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ConfigurationError("mutual TLS needs cafile= to verify client certificates")
    return ctx


def client_context(
    cafile: str | os.PathLike[str],
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A TLS client context that verifies the server against ``cafile``.

    Pass ``certfile``/``keyfile`` for mutual TLS. ``check_hostname=False``
    is reasonable only with a private cluster CA, whose certificates are
    trusted for this cluster alone.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


@dataclass(frozen=True)
class CertificatePaths:
    """Where :func:`write_certificates` put its files (PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def write_certificates(
    directory: str | os.PathLike[str],
    *,
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    days: int = 825,
    overwrite: bool = False,
    not_before: datetime.datetime | None = None,
) -> CertificatePaths:
    """Write a private CA and a server and a client certificate signed by it.

    ``hostnames`` become the server certificate's subject alternative names
    (IP addresses as IP entries). Keys are ECDSA P-256, written with mode
    0600. Refuses to overwrite existing files unless ``overwrite``.
    ``not_before`` moves the validity window (tests make expired ones).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertificatePaths(
        out / "ca.pem",
        out / "ca.key",
        out / "server.pem",
        out / "server.key",
        out / "client.pem",
        out / "client.key",
    )
    if not overwrite:
        existing = [str(p) for p in vars(paths).values() if p.exists()]
        if existing:
            raise ConfigurationError(f"refusing to overwrite {', '.join(existing)}")

    start = not_before or (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5))
    end = start + datetime.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "asyncdist cluster"),
                x509.NameAttribute(NameOID.COMMON_NAME, common),
            ]
        )

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("asyncdist CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert, server_key = leaf(
        hostnames[0] if hostnames else "asyncdist server", ExtendedKeyUsageOID.SERVER_AUTH, sans
    )
    client_cert, client_key = leaf("asyncdist client", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    pem = serialization.Encoding.PEM
    paths.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    write_key(paths.ca_key, ca_key)
    paths.server_cert.write_bytes(server_cert.public_bytes(pem))
    write_key(paths.server_key, server_key)
    paths.client_cert.write_bytes(client_cert.public_bytes(pem))
    write_key(paths.client_key, client_key)
    return paths
