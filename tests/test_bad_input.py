"""Bad input against a real server (RELIABILITY.md C2: B1-B26, B31, B32; C1: F25, F26).

Each case starts ``asyncdist.serve(port=0)`` on 127.0.0.1 with a small frame
limit, connects an honest :func:`asyncdist.connect` client, then attacks the
server from a raw-socket "evil client" (``tests/_evil.py``). After the attack
it checks what the fixture rule of C2 asks:

1. the server closed the evil connection because of the stated error, counted
   it in ``Server.stats`` and logged it once at WARNING without the payload
   (after the handshake the error is also the ``__cause__`` of the server-side
   connection's ``close_exception``);
2. the honest client connected before the attack still completes a call;
3. the server still serves a new honest connection;
4. tracemalloc growth during the attack stays small (< 2 x frame limit for the
   big cases, < 1 MiB before authentication).

No record at ERROR level may appear anywhere (no traceback in the server,
no "exception was never retrieved"): the harness checks that on exit.
Attacks in the other direction (a hostile server against ``connect``) use
:class:`FakeServer`.

Not covered here: B22 (compression bomb) does not apply, asyncdist has no
compression; ``test_b22_nothing_compressed_is_accepted`` checks that nothing
compressed is accepted instead. B27-B30 belong to the paradigm layers
(remote objects, RPC, name server), which this transport does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import re
import socket
import ssl
import sys
import time
import weakref
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from _evil import EvilClient, FakeServer, RawPeer, ThrottleProxy, pickle_bomb, traced
from _util import SCALE, eventually

from asyncdist import (
    AuthenticationError,
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionClosedError,
    Options,
    ProtocolError,
    RemoteError,
    Server,
    TLSError,
    connect,
    serve,
)
from asyncdist import protocol as P
from asyncdist.codec import Codec, decode_plain, encode_plain
from asyncdist.frames import PREAUTH_MAX_FRAME_SIZE, encode_frame, frame_header
from asyncdist.security import CertificatePaths, client_context, server_context, write_certificates
from asyncdist.server import ServerStats
from asyncdist.testing import poll_for

SECRET = "bad-input-secret-0123456789abcdef"
SECRET_B = SECRET.encode()
#: The frame limit of the servers under attack (the default is 64 MiB).
LIMIT = 1 << 20
KIB = 1024
MIB = 1 << 20

pytestmark = pytest.mark.both_loops


def now() -> float:
    return asyncio.get_running_loop().time()


# -- the server under attack -------------------------------------------------------------------


@dataclasses.dataclass
class Harness:
    """A server under attack, an honest client connected before the attack, and checks."""

    server: Server
    honest: Connection
    secret: str | None
    caplog: pytest.LogCaptureFixture
    calls: list[tuple[Any, ...]]
    release: asyncio.Event
    base: ServerStats
    _opened: list[weakref.ref[Connection]]
    evils: list[EvilClient] = dataclasses.field(default_factory=list)
    #: Failures the server must have counted so far (compared with ``delta()``).
    expected: Counter[str] = dataclasses.field(default_factory=Counter)
    #: TLS context of new honest clients (the server's is given to serve()).
    client_ssl: ssl.SSLContext | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def secret_bytes(self) -> bytes | None:
        return self.secret.encode() if self.secret is not None else None

    def delta(self) -> dict[str, int]:
        """Server counters that changed since the honest client connected."""
        now_, base = dataclasses.asdict(self.server.stats), dataclasses.asdict(self.base)
        return {k: now_[k] - base[k] for k in now_ if now_[k] != base[k]}

    def server_conns(self) -> list[Connection]:
        """Server-side connections that completed the handshake (still referenced somewhere)."""
        return [c for c in (ref() for ref in self._opened) if c is not None]

    def server_side(self, evil: RawPeer) -> Connection | None:
        for conn in self.server_conns():
            if conn.remote_address == evil.sockname:
                return conn
        return None

    async def evil(
        self, *, handshake: bool = True, bufsize: int | None = None, keep_server_side: bool = True
    ) -> EvilClient:
        """Connect an evil client (authenticated by hand unless ``handshake=False``).

        After the handshake the server's side of it is kept in ``evil.server_conn``
        (unless ``keep_server_side=False``), so that it can be inspected after it closed.
        """
        evil = await EvilClient.open(self.port, bufsize=bufsize)
        self.evils.append(evil)
        if handshake:
            await evil.handshake(self.secret_bytes)
            await eventually(lambda: self.server_side(evil) is not None, "the server never opened it")
            if keep_server_side:
                evil.server_conn = self.server_side(evil)
        return evil

    def records_about(self, peer: RawPeer) -> list[logging.LogRecord]:
        """asyncdist log records whose first argument is ``peer``'s address."""
        return [
            r
            for r in self.caplog.records
            if r.name.startswith("asyncdist")
            and isinstance(r.args, tuple)
            and r.args
            and r.args[0] == peer.sockname
        ]

    async def rejected(
        self,
        evil: EvilClient,
        error: type[BaseException] = ProtocolError,
        match: str = "",
        *,
        logged: bool | None = True,
        timeout: float = 5.0,
    ) -> BaseException | None:
        """Assert that the server closed ``evil`` because of ``error``; return that error.

        ``logged``: True, exactly one WARNING about this peer (the error is
        taken from it); False, none; None, not checked.
        """
        await evil.expect_closed(timeout * SCALE)
        conn: Connection | None = evil.server_conn
        cause: BaseException | None = None
        if conn is None:  # it failed in the handshake
            self.expected["handshake_failures"] += 1
        else:
            await eventually(lambda: conn.close_exception is not None, "server side never closed")
            exc = conn.close_exception
            assert isinstance(exc, ConnectionClosedError), repr(exc)
            cause = exc.__cause__
            self.expected["closed"] += 1
        if error is ProtocolError:
            self.expected["protocol_errors"] += 1
        keys = list(self.expected)
        await eventually(
            lambda: {k: self.delta().get(k, 0) for k in keys} == dict(self.expected),
            f"server counters {self.delta()} do not show {dict(self.expected)}",
        )
        if logged is not None:
            records = self.records_about(evil)
            if not logged:
                assert records == []
            else:
                assert len(records) == 1, [r.getMessage() for r in records]
                record = records[0]
                assert record.levelno == logging.WARNING
                assert len(record.getMessage()) < 400, "the log line dumps too much"
                assert isinstance(record.args, tuple)
                logged_error = record.args[1]
                assert isinstance(logged_error, BaseException)
                if cause is None:
                    cause = logged_error
                else:
                    assert logged_error is cause
        if cause is not None or logged:
            assert isinstance(cause, error), f"expected {error.__name__}, got {cause!r}"
            assert re.search(match, str(cause)), f"{match!r} not in {str(cause)!r}"
        return cause

    async def survives(self) -> None:
        """The session from before the attack still works, and so does a new one."""
        assert await self.honest.call("echo", "still here", timeout=5 * SCALE) == "still here"
        async with connect(
            port=self.port, secret=self.secret, ssl=self.client_ssl, handshake_timeout=5 * SCALE
        ) as fresh:
            assert await fresh.call("echo", 42, timeout=5 * SCALE) == 42


def make_handlers(calls: list[tuple[Any, ...]], release: asyncio.Event) -> dict[str, Callable[..., Any]]:
    def echo(x: Any) -> Any:
        return x

    def record(*args: Any) -> None:
        calls.append(("record", *args))

    def size(data: bytes) -> int:
        calls.append(("size", len(data)))
        return len(data)

    async def block(tag: str) -> str:
        calls.append(("block", tag))
        try:
            await release.wait()
        except asyncio.CancelledError:
            calls.append(("cancelled", tag))
            raise
        return tag

    def produce(n: int, size: int) -> Any:
        return ([i, bytes(size)] for i in range(n))

    return {"echo": echo, "record": record, "size": size, "block": block, "produce": produce}


@contextlib.asynccontextmanager
async def harness(
    caplog: pytest.LogCaptureFixture,
    *,
    secret: str | None = SECRET,
    max_unauthenticated: int = 64,
    ssl_context: ssl.SSLContext | None = None,
    client_ssl: ssl.SSLContext | None = None,
    **options: Any,
) -> AsyncIterator[Harness]:
    options.setdefault("max_frame_size", LIMIT)
    options.setdefault("close_timeout", 1.0 * SCALE)
    opened: list[weakref.ref[Connection]] = []
    calls: list[tuple[Any, ...]] = []
    release = asyncio.Event()

    def on_connect(conn: Connection) -> None:
        opened.append(weakref.ref(conn))

    async with (
        serve(
            make_handlers(calls, release),
            port=0,
            secret=secret,
            ssl=ssl_context,
            on_connect=on_connect,
            max_unauthenticated=max_unauthenticated,
            **options,
        ) as server,
        connect(port=server.port, secret=secret, ssl=client_ssl) as honest,
    ):
        await eventually(lambda: server.stats.opened == 1, "the honest client was not opened")
        h = Harness(
            server,
            honest,
            secret,
            caplog,
            calls,
            release,
            dataclasses.replace(server.stats),
            opened,
            client_ssl=client_ssl,
        )
        try:
            yield h
        finally:
            release.set()
            for evil in h.evils:
                await evil.aclose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


def frames_answering(frames: list[bytes], call_id: int) -> list[Any]:
    """Decoded REPLY/ERROR messages for ``call_id`` among ``frames``."""
    codec = Codec()
    out = []
    for body in frames:
        msg = codec.decode(body)
        if type(msg) is list and msg and msg[0] in (P.REPLY, P.ERROR) and msg[1] == call_id:
            out.append(msg)
    return out


def auth_fields(hello: bytes, secret: bytes | None = SECRET_B) -> dict[str, Any]:
    """A valid AUTH for ``hello``, decoded, for tests to tamper with."""
    return dict(decode_plain(P.InitiatorHandshake(secret).receive_hello(hello)))


# -- B1-B4: framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["preauth", "postauth"])
async def test_b1_4gib_header_is_refused_before_any_allocation(
    caplog: pytest.LogCaptureFixture, phase: str
) -> None:
    async with harness(caplog, max_frame_size=64 * MIB) as h:
        evil = await h.evil(handshake=phase == "postauth")
        if phase == "preauth":
            await evil.read_hello()
        limit = 64 * MIB if phase == "postauth" else PREAUTH_MAX_FRAME_SIZE
        with traced() as mem:
            await evil.send_raw(b"\xff\xff\xff\xff")
            await h.rejected(
                evil, ProtocolError, f"frame too large: 4294967295 bytes announced, limit {limit}"
            )
        assert mem.peak < MIB, f"{mem.peak} bytes allocated for a rejected header"
        await h.survives()


def call_of_size(total: int, call_id: int) -> tuple[bytes, int]:
    """A CALL of ``size`` whose body is exactly ``total`` bytes; also the payload length."""
    codec = Codec()
    n = total - 64
    n += total - len(codec.encode([P.CALL, call_id, "size", [bytes(n)]]))
    body = codec.encode([P.CALL, call_id, "size", [bytes(n)]])
    assert len(body) == total
    return body, n


async def test_b2_frame_limit_is_inclusive_and_per_server(caplog: pytest.LogCaptureFixture) -> None:
    at_limit, n = call_of_size(LIMIT, 7)
    over_limit, _ = call_of_size(LIMIT + 1, 8)
    async with harness(caplog) as h:
        evil = await h.evil()
        with traced() as mem:
            await evil.send_frame(at_limit)
            assert await evil.answer(7) == [P.REPLY, 7, n]
            await evil.send_frame(over_limit, ignore_errors=True)
            await h.rejected(
                evil, ProtocolError, f"frame too large: {LIMIT + 1} bytes announced, limit {LIMIT}"
            )
        # The accepted frame needs its body buffer plus the decoded bytes (2 x limit), and the
        # evil client has a 256 KiB read buffer of its own (asyncio reads 256 KiB at a time).
        assert mem.peak < 2 * LIMIT + 256 * KIB
        assert h.calls == [("size", n)]
        await h.survives()


@pytest.mark.parametrize("phase", ["preauth", "postauth"])
async def test_b3_zero_length_frame(caplog: pytest.LogCaptureFixture, phase: str) -> None:
    async with harness(caplog) as h:
        evil = await h.evil(handshake=phase == "postauth")
        with traced() as mem:
            await evil.send_raw(b"\x00\x00\x00\x00")
            await h.rejected(evil, ProtocolError, "zero-length frame")
        assert mem.peak < MIB
        await h.survives()


async def test_b4_truncated_frame_then_fin(caplog: pytest.LogCaptureFixture) -> None:
    async with harness(caplog) as h:
        evil = await h.evil()
        body = Codec().encode([P.CALL, 1, "record", [bytes(1000 - 14)]])
        assert len(body) == 1000
        await evil.send_raw(frame_header(1000) + body[:10])
        evil.writer.write_eof()
        await h.rejected(evil, ProtocolError, "connection ended inside a frame", logged=None)
        assert h.calls == [], "a partial message reached a handler"
        await h.survives()


# -- B5, B6: slow peers ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["silent", "trickle"])
async def test_b5_preauth_slowloris_is_closed_at_the_handshake_deadline(
    caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    deadline = 0.3 * SCALE
    async with harness(caplog, handshake_timeout=deadline) as h:
        evil = await h.evil(handshake=False)
        hello = await evil.read_hello()
        start = now()
        dripping: asyncio.Task[None] | None = None
        if mode == "trickle":
            data = encode_frame(P.InitiatorHandshake(SECRET_B).receive_hello(hello))

            async def drip() -> None:
                for i in range(len(data)):
                    if not await evil.send_raw(data[i : i + 1], ignore_errors=True):
                        return
                    await asyncio.sleep(0.1 * SCALE)  # the attack's pace: one byte per 0.1 s

            dripping = asyncio.ensure_future(drip())
        try:
            with traced() as mem:
                await h.rejected(evil, ProtocolError, logged=False, timeout=deadline + 2)
        finally:
            if dripping is not None:
                dripping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dripping
        elapsed = now() - start
        assert deadline * 0.8 <= elapsed < deadline + 1.0 * SCALE
        assert mem.peak < MIB
        await h.survives()


async def test_b5_unauthenticated_connections_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    cap = 3
    async with harness(caplog, max_unauthenticated=cap, handshake_timeout=10 * SCALE) as h:
        silent = [await h.evil(handshake=False) for _ in range(cap)]
        for evil in silent:
            await evil.read_hello()
        extra = await h.evil(handshake=False)
        assert await extra.expect_closed(2 * SCALE) == []
        assert not extra.received, "a connection over the cap got a HELLO"
        assert h.delta()["refused_unauthenticated"] == 1
        # Existing sessions are not touched by the flood of silent connections.
        assert await h.honest.call("echo", 1) == 1
        # A new client while the cap is full is refused with a typed error, quickly.
        start = now()
        with pytest.raises((ConnectError, ConnectionClosed)):
            await connect(port=h.port, secret=SECRET, handshake_timeout=5 * SCALE)
        assert now() - start < 2 * SCALE
        for evil in silent:
            await evil.aclose()
        await eventually(lambda: h.delta().get("handshake_failures") == cap, "silent ones not released")
        await h.survives()


async def test_b6_postauth_slowloris_is_closed_by_the_frame_progress_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timers = {"heartbeat_interval": 0.05 * SCALE, "heartbeat_timeout": 0.3 * SCALE}
    async with harness(caplog, min_frame_progress=4096, **timers) as h:
        evil = await h.evil()

        async def trickle() -> None:
            await evil.send_raw(frame_header(LIMIT))
            for _ in range(1000):
                if not await evil.send_raw(b"\x00", ignore_errors=True):
                    return
                await asyncio.sleep(0.02 * SCALE)  # the attack's pace: 50 bytes/s

        start = now()
        task = asyncio.ensure_future(trickle())
        try:
            with traced() as mem:
                await h.rejected(evil, ProtocolError, "frame stalled", timeout=3)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert now() - start < 1.5 * SCALE
        assert mem.peak < 2 * LIMIT
        await h.survives()


# -- B7, B8: not asyncdist, or another version -------------------------------------------------


def tls_client_hello() -> bytes:
    """The first bytes a TLS client sends (a ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16"
    return data


@pytest.mark.parametrize("garbage", ["http", "tls"])
async def test_b7_garbage_instead_of_the_handshake(caplog: pytest.LogCaptureFixture, garbage: str) -> None:
    data = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" if garbage == "http" else tls_client_hello()
    async with harness(caplog, handshake_timeout=10 * SCALE) as h:
        evil = await h.evil(handshake=False)
        start = now()
        with traced() as mem:
            await evil.send_raw(data[:8])  # decided within these 8 bytes, long before the deadline
            cause = await h.rejected(evil, ProtocolError, "frame too large", timeout=2)
        assert now() - start < 2 * SCALE
        assert "GET" not in str(cause)
        assert mem.peak < MIB
        await h.survives()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("version", 2, r"expected version 1, got 2"),
        ("magic", "pyro5", r"not an asyncdist peer \(magic 'pyro5'\)"),
    ],
)
async def test_b8_auth_from_another_version_or_protocol(
    caplog: pytest.LogCaptureFixture, field: str, value: Any, match: str
) -> None:
    async with harness(caplog) as h:
        evil = await h.evil(handshake=False)
        auth = auth_fields(await evil.read_hello())
        auth[field] = value
        await evil.send_frame(encode_plain(auth))
        await h.rejected(evil, ProtocolError, match)
        await h.survives()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("version", 2, r"expected version 1, got 2"),
        ("magic", "pyro5", r"not an asyncdist peer"),
    ],
)
async def test_b8_client_refuses_a_server_of_another_version(field: str, value: Any, match: str) -> None:
    async def script(peer: RawPeer) -> None:
        hello = dict(decode_plain(P.AcceptorHandshake(SECRET_B).hello()))
        hello[field] = value
        await peer.send_frame(encode_plain(hello))
        await peer.expect_closed()
        assert peer.received == b"", "the client answered a HELLO of another version"

    async with FakeServer(script) as fake:
        with pytest.raises(ProtocolError, match=match):
            await connect(port=fake.port, secret=SECRET, handshake_timeout=3 * SCALE)
    assert fake.errors == []


# -- B9-B15: malformed bodies ------------------------------------------------------------------


def nested_tuples(depth: int) -> bytes:
    body = msgpack.packb(None)
    for _ in range(depth):
        body = msgpack.packb([msgpack.ExtType(4, body)])
    return body


#: body, the exception the ProtocolError wraps, what it says after and before authentication
#: (before it, bodies over the 1 KiB cap are refused on their header, ext types at once).
MALFORMED = [
    pytest.param(b"\xc1", msgpack.FormatError, "FormatError", "FormatError", id="B9-0xc1"),
    pytest.param(
        msgpack.packb([9, b"12345678"]) + b"\x00",
        msgpack.ExtraData,
        "ExtraData",
        "ExtraData",
        id="B10-trailing",
    ),
    pytest.param(
        b"\xdd\xff\xff\xff\xff" + bytes(5),
        ValueError,
        "exceeds max_array_len",
        "exceeds max_array_len",
        id="B11-array-2**32-1",
    ),
    pytest.param(
        b"\x91" * 3000 + b"\xc0", msgpack.StackError, "StackError", "frame too large", id="B12-nested-3000"
    ),
    pytest.param(
        nested_tuples(100), None, "nested too deeply", "extension type 4 is not allowed", id="B12-nested-ext"
    ),
    pytest.param(
        b"\x94\x01\x01\xa2\xff\xfe\x90",
        UnicodeDecodeError,
        "UnicodeDecodeError",
        "UnicodeDecodeError",
        id="B14-bad-utf8",
    ),
    pytest.param(
        msgpack.packb([P.CALL, 1, "record", [msgpack.ExtType(42, b"x")]]),
        None,
        "unknown extension type 42",
        "extension type 42 is not allowed",
        id="B15-ext-42",
    ),
]


@pytest.mark.parametrize(("body", "wrapped", "match", "preauth_match"), MALFORMED)
async def test_b9_to_b15_malformed_body_after_auth(
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    wrapped: type[BaseException] | None,
    match: str,
    preauth_match: str,
) -> None:
    async with harness(caplog) as h:
        evil = await h.evil()
        with traced() as mem:
            await evil.send_frame(body)
            cause = await h.rejected(evil, ProtocolError, match)
        if wrapped is not None:
            assert isinstance(cause, ProtocolError)
            assert isinstance(cause.__cause__, wrapped)
        assert h.calls == []
        assert mem.peak < MIB
        await h.survives()


@pytest.mark.parametrize(("body", "wrapped", "match", "preauth_match"), MALFORMED)
async def test_b9_to_b15_malformed_body_before_auth(
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    wrapped: type[BaseException] | None,
    match: str,
    preauth_match: str,
) -> None:
    async with harness(caplog) as h:
        evil = await h.evil(handshake=False)
        await evil.read_hello()
        with traced() as mem:
            await evil.send_frame(body)
            cause = await h.rejected(evil, ProtocolError, preauth_match)
        if wrapped is not None and preauth_match == match:
            assert isinstance(cause, ProtocolError)
            assert isinstance(cause.__cause__, wrapped)
        assert mem.peak < MIB
        await h.survives()


async def test_b13_maps_with_non_string_keys_are_accepted(caplog: pytest.LogCaptureFixture) -> None:
    value = {1: "a", 2.5: "b", None: "c", (1, 2): "d"}
    async with harness(caplog) as h:
        evil = await h.evil()
        assert await evil.call(5, "echo", value) == [P.REPLY, 5, value]
        assert await h.honest.call("echo", value) == value
        assert h.delta().get("protocol_errors", 0) == 0


MERSENNE_61 = 2**61 - 1  # hash(i * MERSENNE_61) == 0 for every int i


def colliding_map_call(n: int) -> bytes:
    """A CALL of ``record`` with one map argument of ``n`` distinct int keys that all hash to 0.

    Keys are big-int ext values (type 8, 16 bytes), written by hand so that
    the test never builds the colliding dict itself.
    """
    head = b"\x94\x01\x09" + msgpack.packb("record") + b"\x91\xdf" + n.to_bytes(4, "big")
    entries = [
        b"\xd8\x08" + (i * MERSENNE_61).to_bytes(16, "big", signed=True) + b"\xc0" for i in range(1, n + 1)
    ]
    return head + b"".join(entries)


@pytest.fixture(scope="module")
def million_colliding_keys() -> bytes:
    # The crafted bytes are what they claim: distinct int keys, one hash.
    sample = Codec().decode(colliding_map_call(4))
    keys = list(sample[3][0])
    assert len(set(keys)) == 4
    assert {hash(k) for k in keys} == {0}
    return colliding_map_call(1_000_000)


async def test_b13_a_million_colliding_keys_are_refused_fast(
    caplog: pytest.LogCaptureFixture, million_colliding_keys: bytes
) -> None:
    body = million_colliding_keys
    async with harness(caplog, max_frame_size=32 * MIB) as h:
        evil = await h.evil()
        start = time.monotonic()
        await evil.send_frame(body, ignore_errors=True)
        await h.rejected(evil, ProtocolError, "colliding hashes")
        assert time.monotonic() - start < 2 * SCALE
        assert h.calls == []
        await h.survives()


# -- B16, B17: pickles -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["whole-frame", "auth-field"])
async def test_b16_pickle_before_auth_is_never_loaded(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, where: str
) -> None:
    marker = tmp_path / "pwned"
    bomb = msgpack.ExtType(3, pickle_bomb(marker))
    async with harness(caplog) as h:
        evil = await h.evil(handshake=False)
        hello = await evil.read_hello()
        if where == "whole-frame":
            body = msgpack.packb(bomb)
        else:
            auth = auth_fields(hello)
            auth["nonce"] = bomb
            body = msgpack.packb(auth)
        with traced() as mem:
            await evil.send_frame(body)
            await h.rejected(evil, ProtocolError, "extension type 3 is not allowed")
        assert not marker.exists()
        assert all(str(marker) not in r.getMessage() for r in caplog.records)
        assert mem.peak < MIB
        await h.survives()


@pytest.mark.parametrize(
    ("secret", "policy", "loads"),
    [(SECRET, "refuse", False), (None, "load", False), (SECRET, "load", True)],
    ids=["authenticated-refuse", "unauthenticated-load", "authenticated-load-control"],
)
async def test_b17_pickle_after_auth_goes_through_the_one_gate(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, secret: str | None, policy: str, loads: bool
) -> None:
    marker = tmp_path / "pwned"
    body = msgpack.packb([P.CALL, 3, "echo", [msgpack.ExtType(3, pickle_bomb(marker))]])
    async with harness(caplog, secret=secret, accept_pickle=policy) as h:
        evil = await h.evil()
        await evil.send_frame(body)
        if loads:  # control: where the policy says "load", this payload does run
            assert await evil.answer(3) == [P.REPLY, 3, None]
            assert marker.exists()
        else:
            await h.rejected(evil, ProtocolError, "pickled payload refused")
            assert not marker.exists()
        await h.survives()


# -- B18: remote errors ------------------------------------------------------------------------

REMOTE_TRACEBACK = 'Traceback (most recent call last):\n  File "evil.py", line 1, in <module>\nboom\n'


def error_server(type_name: str, args: list[Any], message: str) -> FakeServer:
    """A server that answers the first CALL with a remote-error ext built from the given fields."""

    async def script(peer: RawPeer) -> None:
        await peer.accept_handshake(SECRET_B)
        msg = await peer.recv_message()
        assert msg[0] == P.CALL
        fields = msgpack.packb([type_name, args, message, REMOTE_TRACEBACK])
        await peer.send_frame(msgpack.packb([P.ERROR, msg[1], msgpack.ExtType(1, fields)]))
        await peer.expect_closed()

    return FakeServer(script)


@pytest.mark.parametrize(
    ("type_name", "args"),
    [
        ("os.system", ["touch {marker}"]),
        ("subprocess.Popen", [["touch", "{marker}"]]),
        ("builtins.object", []),
        ("builtins.SystemExit", [3]),
        ("builtins.print", ["{marker}"]),
        ("asyncdist_no_such_module.Boom", ["{marker}"]),
    ],
)
async def test_b18_remote_error_types_are_never_imported(
    tmp_path: Path, type_name: str, args: list[Any]
) -> None:
    marker = tmp_path / "pwned"

    def fill(a: Any) -> Any:
        if isinstance(a, str):
            return a.format(marker=marker)
        if isinstance(a, list):
            return [fill(x) for x in a]
        return a

    args = fill(args)
    modules = set(sys.modules)
    async with (
        error_server(type_name, args, "boom message") as fake,
        connect(port=fake.port, secret=SECRET) as conn,
    ):
        with pytest.raises(RemoteError) as caught:
            await conn.call("anything", timeout=5 * SCALE)
        assert not conn.closed, "a remote error closed the connection"
    err = caught.value
    assert type(err) is RemoteError
    assert err.type_name == type_name
    assert err.message == "boom message"
    assert err.remote_traceback == REMOTE_TRACEBACK
    assert list(err.remote_args) == args
    assert not marker.exists()
    assert set(sys.modules) - modules == set(), "decoding a remote error imported a module"
    assert fake.errors == []


async def test_b18_allowed_builtin_is_rebuilt_as_its_own_type() -> None:
    async with (
        error_server("builtins.KeyError", ["k"], "'k'") as fake,
        connect(port=fake.port, secret=SECRET) as conn,
    ):
        with pytest.raises(KeyError) as caught:
            await conn.call("anything", timeout=5 * SCALE)
    assert type(caught.value) is KeyError
    assert caught.value.args == ("k",)
    assert caught.value.remote_traceback == REMOTE_TRACEBACK  # type: ignore[attr-defined]
    assert fake.errors == []


# -- B19, B20: schema and bookkeeping ----------------------------------------------------------


async def test_b19_bad_call_fields_get_an_error_reply_and_the_connection_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = [
        ([P.CALL, 7, "echo", "not a list"], "args must be an array"),
        ([P.CALL, 8, "echo", [1], ["not", "a", "map"]], "kwargs must be a map"),
        ([P.CALL, 9, 123, []], "name must be a string"),
        ([P.CALL, 10, "echo", [1], {}, -1], "credit must be"),
        ([P.CALL, 11, "echo", [1], {}, 0, "extra"], "too many fields"),
    ]
    async with harness(caplog) as h:
        evil = await h.evil()
        for msg, match in bad:
            await evil.send_message(msg)
            answer = await evil.answer(msg[1])
            assert answer[0] == P.ERROR
            assert isinstance(answer[2], ProtocolError)
            assert match in str(answer[2])
        assert await evil.call(12, "echo", 5) == [P.REPLY, 12, 5]
        conn = h.server_side(evil)
        assert conn is not None
        assert not conn.closed
        assert h.delta().get("protocol_errors", 0) == 0
        assert h.calls == []
        await h.survives()


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        pytest.param([], "non-empty array", id="empty"),
        pytest.param({"kind": P.CALL}, "non-empty array", id="map-not-array"),
        pytest.param("CALL", "non-empty array", id="str-not-array"),
        pytest.param([99, 1], "unknown message kind 99", id="unknown-kind"),
        pytest.param(["call", 1, "echo", []], "kind must be an integer", id="kind-str"),
        pytest.param([True, 1, "echo", []], "kind must be an integer", id="kind-bool"),
        pytest.param([9.0, b"ping"], "kind must be an integer", id="kind-float"),
        pytest.param([P.CALL, "1", "echo", []], "CALL needs an id", id="id-str"),
        pytest.param([P.CALL, 1.0, "echo", []], "CALL needs an id", id="id-float"),
        pytest.param([P.CALL, True, "echo", []], "CALL needs an id", id="id-bool"),
        pytest.param([P.CALL, -1, "echo", []], "CALL needs an id", id="id-negative"),
        pytest.param([P.CALL, 2**64 - 1, "echo", []], "CALL needs an id", id="id-2**64-1"),
        pytest.param([P.CALL, 1, "echo"], "CALL needs an id, a name and args", id="call-no-args"),
        pytest.param([P.NOTIFY, "record", "x"], "NOTIFY must be", id="notify-args-str"),
        pytest.param([P.CANCEL, "x"], "CANCEL must be", id="cancel-id-str"),
        pytest.param([P.CREDIT, 1, 0], "CREDIT must be", id="credit-zero"),
        pytest.param([P.ERROR, 1, "not an exception"], "ERROR must be", id="error-not-exception"),
        pytest.param([P.CLOSE, 5], "CLOSE must be", id="close-reason-int"),
    ],
)
async def test_b19_unreadable_message_is_a_protocol_error(
    caplog: pytest.LogCaptureFixture, msg: Any, match: str
) -> None:
    async with harness(caplog) as h:
        evil = await h.evil()
        await evil.send_message(msg)
        await h.rejected(evil, ProtocolError, match, timeout=2)
        assert h.calls == []
        await h.survives()


async def test_b20_duplicate_call_id_while_the_first_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    async with harness(caplog) as h:
        evil = await h.evil()
        await evil.send_message([P.CALL, 5, "block", ["first"]])
        await eventually(lambda: ("block", "first") in h.calls, "the first call never started")
        await evil.send_message([P.CALL, 5, "block", ["second"]])
        await h.rejected(evil, ProtocolError, "duplicate call id 5")
        assert ("block", "second") not in h.calls
        await eventually(lambda: ("cancelled", "first") in h.calls, "the first call was not cancelled")
        assert frames_answering(evil.last_frames, 5) == []
        await h.survives()


@pytest.mark.parametrize(
    "msg",
    [
        pytest.param([P.REPLY, 999, "x"], id="reply"),
        pytest.param([P.ERROR, 999, KeyError("x")], id="error"),
        pytest.param([P.ITEM, 999, "x"], id="item"),
        pytest.param([P.END, 999], id="end"),
    ],
)
async def test_b20_answer_to_a_call_never_made(caplog: pytest.LogCaptureFixture, msg: list[Any]) -> None:
    async with harness(caplog) as h:
        evil = await h.evil()
        await evil.send_message(msg)
        await h.rejected(evil, ProtocolError, "call id 999, which was never issued")
        await h.survives()


async def test_b20_client_side_unknown_misplaced_and_late_answers() -> None:
    """Against a hostile server: a REPLY never asked for, an ITEM for a plain call, a late REPLY."""
    state: dict[str, Any] = {}

    async def script(peer: RawPeer) -> None:
        await peer.accept_handshake(SECRET_B)
        scenario = state["scenario"]
        if scenario == "reply-never-issued":
            await peer.send_message([P.REPLY, 999, "x"])
        elif scenario == "item-for-plain-call":
            call = await peer.recv_message()
            await peer.send_message([P.ITEM, call[1], "x"])
        else:  # late reply: answer only after the client gave up and cancelled
            call = await peer.recv_message()
            cancel = await peer.recv_message()
            assert cancel == [P.CANCEL, call[1]]
            await peer.send_message([P.REPLY, call[1], "late"])
            second = await peer.recv_message()
            await peer.send_message([P.REPLY, second[1], "on time"])
        await peer.expect_closed()

    async with FakeServer(script) as fake:
        state["scenario"] = "reply-never-issued"
        async with connect(port=fake.port, secret=SECRET) as conn:
            await asyncio.wait_for(conn.wait_closed(), 5 * SCALE)
            exc = conn.close_exception
            assert isinstance(exc, ConnectionClosedError)
            assert isinstance(exc.__cause__, ProtocolError)
            assert "never issued" in str(exc.__cause__)

        state["scenario"] = "item-for-plain-call"
        async with connect(port=fake.port, secret=SECRET) as conn:
            with pytest.raises(ConnectionClosedError) as caught:
                await conn.call("anything", timeout=5 * SCALE)
            assert isinstance(caught.value.__cause__, ProtocolError)
            assert "not a stream" in str(caught.value.__cause__)

        state["scenario"] = "late-reply"
        async with connect(port=fake.port, secret=SECRET) as conn:
            with pytest.raises(TimeoutError):
                await conn.call("slow", timeout=0.1 * SCALE)
            assert await conn.call("again", timeout=5 * SCALE) == "on time"
            assert conn.stats.late_replies == 1
            assert not conn.closed
    assert fake.errors == []


# -- B21: request flood ----------------------------------------------------------------------


async def test_b21_pipelined_flood_pauses_reading_and_everything_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 100_000
    codec = Codec()
    flood = b"".join(encode_frame(codec.encode([P.CALL, i, "echo", [i]])) for i in range(1, n + 1))
    async with harness(caplog) as h:
        # Small kernel buffers (accepted sockets inherit the listener's), so that the
        # server, not the kernel, has to hold back the flood.
        for sock in h.server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KIB)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KIB)
        evil = await h.evil(bufsize=16 * KIB)
        conn = h.server_side(evil)
        assert conn is not None
        sender = asyncio.ensure_future(evil.send_raw(flood))
        try:
            seen = [-1, 0]  # last count, polls it stayed the same

            def stalled() -> bool:
                # The server stopped taking requests while the sender still has some.
                received = conn.stats.calls_received
                seen[1] = seen[1] + 1 if received == seen[0] else 0
                seen[0] = received
                return seen[1] >= 3 and not sender.done()

            with traced() as mem:
                await poll_for(stalled, 10 * SCALE, interval=0.1 * SCALE)
            taken = conn.stats.calls_received
            # What the server takes in is bounded by one read (its 256 KiB buffer, ~20 000 of
            # these calls, dispatched before a write can pause it) plus max_in_flight queued ones.
            assert taken < n // 2, f"the server took {taken} of {n} requests with no reply read"
            assert mem.peak < 2 * LIMIT, f"{mem.peak} bytes used while flooded"
            # Other connections get service while the flood is held back.
            assert await h.honest.call("echo", "served", timeout=5 * SCALE) == "served"
            async with connect(port=h.port, secret=SECRET) as fresh:
                assert await fresh.call("echo", 1, timeout=5 * SCALE) == 1
            assert conn.stats.calls_received == taken, "reading resumed with the replies unread"
            # Once the evil client reads, every request is answered, in order.
            expected = 1
            async with asyncio.timeout(30 * SCALE):
                while expected <= n:
                    msg = await evil.recv_message(answer_pings=False)  # the sender may be writing
                    assert msg == [P.REPLY, expected, expected]
                    expected += 1
        finally:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        assert not conn.closed
        assert h.delta().get("protocol_errors", 0) == 0
        await h.survives()


# -- B22: compression --------------------------------------------------------------------------


async def test_b22_nothing_compressed_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    assert [f.name for f in dataclasses.fields(Options) if "compress" in f.name] == []
    async with harness(caplog) as h:
        # Not offered in the handshake...
        evil = await h.evil(handshake=False)
        auth = auth_fields(await evil.read_hello())
        auth["compression"] = "zlib"
        await evil.send_frame(encode_plain(auth))
        await h.rejected(evil, ProtocolError, r"unexpected \['compression'\]")
        # ...and a compressed body after it is just a malformed message: nothing is inflated.
        bomb = zlib.compress(bytes(64 * LIMIT), 9)
        assert len(bomb) < 128 * KIB
        evil = await h.evil()
        with traced() as mem:
            await evil.send_frame(bomb)
            await h.rejected(evil, ProtocolError, "malformed message")
        assert mem.peak < MIB
        await h.survives()


# -- B23, B24: authentication ------------------------------------------------------------------


@pytest.mark.parametrize("client_secret", ["wrong-secret-0123456789abcdef", None])
async def test_b23_wrong_secret_fails_on_both_ends(
    caplog: pytest.LogCaptureFixture, client_secret: str | None
) -> None:
    async with harness(caplog) as h:
        with pytest.raises(AuthenticationError) as caught:
            await connect(port=h.port, secret=client_secret, handshake_timeout=5 * SCALE)
        assert type(caught.value) is AuthenticationError
        await eventually(lambda: h.delta().get("handshake_failures") == 1, "server did not count it")
        assert h.delta().get("opened", 0) == 0
        if client_secret is not None:
            # The server's side: one warning, without the secret or a MAC in it.
            records = [
                r
                for r in caplog.records
                if r.name == "asyncdist.security" and r.args and r.args[0][1] != h.port  # type: ignore[index]
            ]
            assert len(records) == 1
            assert records[0].levelno == logging.WARNING
            assert SECRET not in records[0].getMessage()
            assert client_secret not in records[0].getMessage()
        assert h.calls == []
        await h.survives()


async def test_b23_bad_proof_gets_fail_then_a_delayed_close_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    delay = 0.3 * SCALE
    async with harness(caplog, auth_failure_delay=delay) as h:
        evil = await h.evil(handshake=False)
        auth = P.InitiatorHandshake(b"wrong-secret-0123456789abcdef").receive_hello(await evil.read_hello())
        after = encode_frame(Codec().encode([P.CALL, 1, "record", ["sent right after AUTH"]]))
        start = now()
        await evil.send_raw(encode_frame(auth) + after)
        await h.rejected(evil, AuthenticationError, "wrong secret or bad proof")
        assert now() - start >= delay * 0.9, "closed without the fixed delay"
        assert [decode_plain(f) for f in evil.last_frames] == [
            {"type": "fail", "reason": "authentication failed"}
        ]
        assert h.calls == [], "a message after a failed handshake was handled"
        await h.survives()


async def test_b24_replayed_auth_fails(caplog: pytest.LogCaptureFixture) -> None:
    async with harness(caplog) as h:
        first = await h.evil()  # a genuine handshake, recorded
        replay = await h.evil(handshake=False)
        await replay.read_hello()
        assert replay.hello_body != first.hello_body, "the server reused its nonce"
        await replay.send_frame(first.auth_body)
        await h.rejected(replay, AuthenticationError, "wrong secret or bad proof")
        await h.survives()


async def test_b24_server_material_reflected_back_fails(caplog: pytest.LogCaptureFixture) -> None:
    async with harness(caplog) as h:
        # The server's own HELLO sent back as the AUTH.
        evil = await h.evil(handshake=False)
        await evil.send_frame(await evil.read_hello())
        await h.rejected(evil, ProtocolError, "bad handshake message")
        # The server's proof from a genuine session, offered back as a client's proof: the
        # direction labels differ, so it cannot verify (whatever the nonces).
        genuine = await h.evil()
        server_proof = decode_plain(genuine.ok_body)["mac"]
        evil = await h.evil(handshake=False)
        auth = auth_fields(await evil.read_hello())
        auth["mac"] = server_proof
        await evil.send_frame(encode_plain(auth))
        await h.rejected(evil, AuthenticationError, "wrong secret or bad proof")
        evil = await h.evil(handshake=False)
        auth = decode_plain(genuine.auth_body)
        auth["nonce"] = decode_plain(await evil.read_hello())["nonce"]  # the server's nonce back
        auth["mac"] = server_proof
        await evil.send_frame(encode_plain(auth))
        await h.rejected(evil, AuthenticationError, "wrong secret or bad proof")
        await h.survives()


async def test_b24_client_rejects_its_own_proof_reflected_as_the_servers() -> None:
    async def script(peer: RawPeer) -> None:
        # The attacker does not know the secret: it sends back the client's proof as its own.
        await peer.send_frame(P.AcceptorHandshake(b"attacker-guess-0123456789abcdef").hello())
        auth = decode_plain(await peer.recv_frame())
        await peer.send_frame(encode_plain({"type": "ok", "mac": auth["mac"]}))
        await peer.expect_closed()

    async with FakeServer(script) as fake:
        with pytest.raises(AuthenticationError, match="failed to prove"):
            await connect(port=fake.port, secret=SECRET, handshake_timeout=3 * SCALE)
    assert fake.errors == []


# -- B25: odd handshake fields -----------------------------------------------------------------


def _set(**changes: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda fields: fields.update(changes)


ODD_AUTH = [
    pytest.param(_set(nonce=bytes(31)), "nonce must be 32 bytes", id="nonce-31-bytes"),
    pytest.param(_set(nonce=bytes(33)), "nonce must be 32 bytes", id="nonce-33-bytes"),
    pytest.param(_set(evil=1), r"unexpected \['evil'\]", id="extra-key"),
    pytest.param(lambda f: f.pop("mac"), r"missing \['mac'\]", id="missing-key"),
    pytest.param(_set(nonce=msgpack.ExtType(4, msgpack.packb([1]))), "extension type 4", id="ext-tuple"),
    pytest.param(_set(nonce=msgpack.ExtType(3, b"\x80\x05N.")), "extension type 3", id="ext-pickle"),
    pytest.param(_set(version=True), "bad handshake field 'version'", id="version-bool"),
    pytest.param(_set(version="1"), "bad handshake field 'version'", id="version-str"),
    pytest.param(_set(max_frame=10), "max_frame out of range", id="max-frame-tiny"),
    pytest.param(_set(max_in_flight=0), "max_in_flight out of range", id="max-in-flight-0"),
    pytest.param(_set(pickle="please"), "unknown pickle policy", id="pickle-policy"),
    pytest.param(_set(type="hello"), "expected a 'auth' handshake message", id="type-hello"),
]


@pytest.mark.parametrize(("tamper", "match"), ODD_AUTH)
async def test_b25_odd_auth_fields(
    caplog: pytest.LogCaptureFixture, tamper: Callable[[dict[str, Any]], Any], match: str
) -> None:
    async with harness(caplog) as h:
        evil = await h.evil(handshake=False)
        auth = auth_fields(await evil.read_hello())
        tamper(auth)
        await evil.send_frame(msgpack.packb(auth))
        await h.rejected(evil, ProtocolError, match)
        await h.survives()


@pytest.mark.parametrize("shape", ["int-key", "array", "1MiB-nonce"])
async def test_b25_odd_auth_shapes(caplog: pytest.LogCaptureFixture, shape: str) -> None:
    async with harness(caplog) as h:
        evil = await h.evil(handshake=False)
        auth = auth_fields(await evil.read_hello())
        if shape == "int-key":
            body, match = msgpack.packb({**auth, 1: 2}), "malformed message"
        elif shape == "array":
            body, match = msgpack.packb(list(auth.items())), "must be a map"
        else:
            auth["nonce"] = bytes(MIB)
            body, match = (
                msgpack.packb(auth),
                r"frame too large: \d+ bytes announced, limit 1024",
            )
        with traced() as mem:
            await evil.send_frame(body, ignore_errors=True)
            await h.rejected(evil, ProtocolError, match)
        assert mem.peak < MIB
        await h.survives()


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        pytest.param(_set(evil=1), r"unexpected \['evil'\]", id="extra-key"),
        pytest.param(_set(nonce=bytes(31)), "nonce must be 32 bytes", id="nonce-31-bytes"),
        pytest.param(_set(nonce=bytes(MIB)), "frame too large", id="nonce-1MiB"),
        pytest.param(_set(nonce=msgpack.ExtType(3, b"\x80\x05N.")), "extension type 3", id="ext-pickle"),
    ],
)
async def test_b25_client_refuses_odd_hello(tamper: Callable[[dict[str, Any]], Any], match: str) -> None:
    async def script(peer: RawPeer) -> None:
        hello = dict(decode_plain(P.AcceptorHandshake(SECRET_B).hello()))
        tamper(hello)
        await peer.send_frame(msgpack.packb(hello), ignore_errors=True)
        await peer.expect_closed()

    async with FakeServer(script) as fake:
        with pytest.raises(ProtocolError, match=match):
            await connect(port=fake.port, secret=SECRET, handshake_timeout=3 * SCALE)
    assert fake.errors == []


# -- B26: TLS ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certs:
    good: CertificatePaths
    other: CertificatePaths
    expired: CertificatePaths
    #: The good CA and the expired CA, for a server that verifies both.
    both_cas: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("certs")
    good = write_certificates(base / "good")
    other = write_certificates(base / "other")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = write_certificates(base / "expired", not_before=long_ago, days=1)
    both = base / "both-cas.pem"
    both.write_bytes(good.ca_cert.read_bytes() + expired.ca_cert.read_bytes())
    return Certs(good, other, expired, both)


TLS_ERRORS = (TLSError, ConnectError, ProtocolError, ConnectionClosed)
BAD_TLS_CLIENTS = ["no-client-cert", "client-cert-other-ca", "client-cert-expired", "plaintext"]


def bad_tls_client(certs: Certs, case: str) -> ssl.SSLContext | None:
    good = certs.good
    if case == "no-client-cert":
        return client_context(good.ca_cert)
    if case == "client-cert-other-ca":
        return client_context(good.ca_cert, certs.other.client_cert, certs.other.client_key)
    if case == "client-cert-expired":
        return client_context(good.ca_cert, certs.expired.client_cert, certs.expired.client_key)
    assert case == "plaintext"
    return None


@contextlib.asynccontextmanager
async def mutual_tls_harness(
    caplog: pytest.LogCaptureFixture, certs: Certs, **kwargs: Any
) -> AsyncIterator[tuple[Harness, ssl.SSLContext]]:
    """A mutual-TLS server (trusting the good and the expired CA) and an honest TLS client."""
    good = certs.good
    server_ctx = server_context(good.server_cert, good.server_key, cafile=certs.both_cas)
    honest_ctx = client_context(good.ca_cert, good.client_cert, good.client_key)
    async with harness(caplog, secret=None, ssl_context=server_ctx, client_ssl=honest_ctx, **kwargs) as h:
        yield h, honest_ctx


async def attempt(port: int, ctx: ssl.SSLContext | None, deadline: float) -> BaseException:
    """Connect and call; return the (typed) error, which must come within the deadline."""
    start = now()
    with pytest.raises(TLS_ERRORS) as caught:
        async with connect(port=port, ssl=ctx, handshake_timeout=deadline) as bad:
            await bad.call("echo", 1, timeout=deadline)
    assert now() - start < deadline + 0.5 * SCALE
    return caught.value


@pytest.mark.parametrize("case", BAD_TLS_CLIENTS)
async def test_b26_bad_tls_client_gets_a_clear_typed_error(
    caplog: pytest.LogCaptureFixture, certs: Certs, case: str
) -> None:
    deadline = 1.0 * SCALE
    async with mutual_tls_harness(caplog, certs, handshake_timeout=deadline) as (h, _):
        error = await attempt(h.port, bad_tls_client(certs, case), deadline)
        if case == "plaintext":
            assert isinstance(error, ConnectError), repr(error)
            assert "TLS" in str(error)
        else:
            # A refused certificate is an authentication failure (not worth retrying),
            # not a network problem.
            assert isinstance(error, TLSError), repr(error)
        await h.survives()


@pytest.mark.parametrize("case", BAD_TLS_CLIENTS)
async def test_b26_failed_tls_handshakes_do_not_use_up_the_handshake_slots(
    caplog: pytest.LogCaptureFixture, certs: Certs, case: str
) -> None:
    deadline = 1.0 * SCALE
    # One handshake slot: a failed TLS handshake that kept its slot would lock everyone out.
    async with mutual_tls_harness(caplog, certs, max_unauthenticated=1, handshake_timeout=deadline) as (h, _):
        for _ in range(2):
            await attempt(h.port, bad_tls_client(certs, case), deadline)
        await h.survives()


async def test_b26_client_rejects_an_expired_server_certificate(certs: Certs) -> None:
    expired = certs.expired
    server_ctx = server_context(expired.server_cert, expired.server_key, cafile=expired.ca_cert)
    client_ctx = client_context(expired.ca_cert, expired.client_cert, expired.client_key)
    async with serve({}, port=0, ssl=server_ctx, handshake_timeout=1.0 * SCALE) as server:
        start = now()
        with pytest.raises(TLSError, match="certificate has expired"):
            await connect(port=server.port, ssl=client_ctx, handshake_timeout=1.0 * SCALE)
        assert now() - start < 1.0 * SCALE


async def test_b26_tls_client_to_a_plaintext_server(caplog: pytest.LogCaptureFixture, certs: Certs) -> None:
    good = certs.good
    tls = client_context(good.ca_cert, good.client_cert, good.client_key)
    async with harness(caplog, handshake_timeout=1.0 * SCALE) as h:
        start = now()
        with pytest.raises(TLS_ERRORS) as caught:
            await connect(port=h.port, secret=SECRET, ssl=tls, handshake_timeout=1.0 * SCALE)
        assert isinstance(caught.value, TLSError | ConnectError), repr(caught.value)
        assert now() - start < 1.0 * SCALE
        # The server saw a TLS record where a frame header should be.
        await eventually(lambda: h.delta().get("protocol_errors") == 1, "server did not count it")
        await h.survives()


# -- B31: connection flood ---------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_b31_flood_of_silent_connections(caplog: pytest.LogCaptureFixture) -> None:
    n, cap, batch = 5000, 64, 500
    deadline = 1.0 * SCALE
    loop = asyncio.get_running_loop()
    async with harness(caplog, max_unauthenticated=cap, handshake_timeout=deadline) as h:
        before = open_fds()
        socks: list[socket.socket] = []
        try:
            start = now()
            with traced() as mem:
                for _ in range(0, n, batch):
                    new = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(batch)]
                    socks.extend(new)
                    for s in new:
                        s.setblocking(False)
                    await asyncio.gather(*(loop.sock_connect(s, ("127.0.0.1", h.port)) for s in new))
                await eventually(lambda: h.delta().get("accepted", 0) == n, "not all accepted", 10)
                flood_time = now() - start
                # The server keeps at most `cap` of them (plus what it has not closed yet).
                await eventually(lambda: open_fds() <= before + n + cap + 8, "server holds too many fds")
                assert await h.honest.call("echo", "busy", timeout=5 * SCALE) == "busy"
            # Slots are given back at the deadline: at most cap per deadline got one.
            refused = h.delta().get("refused_unauthenticated", 0)
            slots = cap * (2 + int(flood_time / deadline))
            assert refused >= n - slots, f"only {refused} of {n} refused in {flood_time:.1f} s"
            # Memory follows the cap (handshake buffers of `cap` connections), not the flood.
            assert mem.peak < cap * 512 * KIB + 8 * MIB, f"{mem.peak / MIB:.0f} MiB for {n} connections"
            # Those that got a handshake slot are dropped at the deadline.
            await eventually(
                lambda: h.delta().get("handshake_failures", 0) + refused >= n, "slots not freed", deadline + 5
            )
        finally:
            for s in socks:
                s.close()
        await eventually(lambda: open_fds() <= before + 4, "file descriptors not released")
        await h.survives()


# -- B32: order violations ---------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before-hello", "after-hello"])
async def test_b32_call_before_the_handshake(caplog: pytest.LogCaptureFixture, when: str) -> None:
    async with harness(caplog) as h:
        evil = await h.evil(handshake=False)
        if when == "after-hello":
            await evil.read_hello()
        await evil.send_message([P.CALL, 1, "record", ["too early"]])
        await h.rejected(evil, ProtocolError, "handshake message must be a map")
        assert h.calls == []
        await h.survives()


async def test_b32_second_handshake_after_auth(caplog: pytest.LogCaptureFixture) -> None:
    async with harness(caplog) as h:
        evil = await h.evil()
        await evil.send_frame(P.InitiatorHandshake(SECRET_B).receive_hello(evil.hello_body))
        await h.rejected(evil, ProtocolError, "non-empty array")
        await h.survives()


async def test_b32_ping_payload_is_limited(caplog: pytest.LogCaptureFixture) -> None:
    big = 16 * MIB
    huge_ping = Codec().encode([P.PING, bytes(10 * MIB)])
    async with harness(caplog, max_frame_size=big) as h:
        evil = await h.evil()
        await evil.send_message([P.PING, b"p" * 64])
        assert await evil.recv_frame() == Codec().encode([P.PONG, b"p" * 64])
        await evil.send_message([P.PING, b"p" * 65])
        await h.rejected(evil, ProtocolError, "at most 64 bytes")
        evil = await h.evil()
        with traced() as mem:
            await evil.send_frame(huge_ping, ignore_errors=True)
            await h.rejected(evil, ProtocolError, "at most 64 bytes")
        assert mem.peak < 2 * big
        await h.survives()


# -- F25, F26 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("credit", [None, 100_000], ids=["default-credit", "credit-no-limit"])
async def test_f25_slow_consumer_keeps_memory_bounded_and_heartbeats_alive(
    caplog: pytest.LogCaptureFixture, credit: int | None
) -> None:
    rate = 10_000  # bytes per second, server to client
    # The defaults (2 s, 10 s, 4096 bytes) scaled down together: a frame in progress must
    # get 1 KiB per 0.3 s, which 10 KB/s gives.
    timers: dict[str, Any] = {
        "heartbeat_interval": 0.05 * SCALE,
        "heartbeat_timeout": 0.3 * SCALE,
        "min_frame_progress": 1024,
    }
    async with (
        harness(caplog, **timers) as h,
        ThrottleProxy(h.port, rate=rate) as proxy,
        connect(port=proxy.port, secret=SECRET, **timers) as slow,
    ):
        await eventually(lambda: len(h.server_conns()) == 2, "slow client not opened")
        server_side = next(c for c in h.server_conns() if c.remote_address != h.honest.local_address)
        received = 0
        start = now()
        with traced() as mem:
            # With credit=100_000 (100 MB may be in flight) only drain() holds the producer back.
            async with slow.stream("produce", 100_000, 1000, credit=credit) as items:
                async for index, payload in items:
                    assert index == received
                    assert len(payload) == 1000
                    received += 1
                    if proxy.delivered >= 1.5 * rate:  # 1.5 s at 10 KB/s
                        break
        elapsed = now() - start
        assert elapsed > 4 * timers["heartbeat_timeout"], "the throttle did not throttle"
        assert received >= 5
        assert mem.peak < 2 * MIB, f"{mem.peak / MIB:.1f} MiB buffered for a slow consumer"
        # Neither side took the slow link for a dead peer.
        assert slow.close_exception is None
        assert server_side.close_exception is None
        # (No call on `slow` here: its answer would queue behind the items on the slow link.)
        await h.survives()


def partial_frame(size: int, kind_and_id: bytes, sent: int) -> bytes:
    """Header of a ``size``-byte frame plus its first ``sent`` bytes: [kind, id, bin32 payload...]."""
    head = kind_and_id + b"\xc6" + (size - len(kind_and_id) - 5).to_bytes(4, "big")
    return frame_header(size) + head + bytes(sent - len(head))


async def test_f26_reset_inside_a_50mib_frame(caplog: pytest.LogCaptureFixture) -> None:
    size = 50 * MIB
    # CALL record([<bin32 of 50 MiB>]): only the first MiB is ever sent.
    data = partial_frame(size, b"\x94\x01\x01" + msgpack.packb("record") + b"\x91", MIB)
    async with harness(caplog, max_frame_size=64 * MIB) as h:
        evil = await h.evil(keep_server_side=False)
        server_side = h.server_side(evil)
        assert server_side is not None
        conn = weakref.ref(server_side)  # the test must not keep it (and its buffer) alive
        received_before = server_side.stats.bytes_received
        causes: list[BaseException | None] = []

        def record(c: Connection) -> None:
            assert isinstance(c.close_exception, ConnectionClosedError)
            causes.append(c.close_exception.__cause__)

        server_side.add_close_callback(record)
        del server_side

        def received() -> int:
            c = conn()
            return c.stats.bytes_received - received_before if c is not None else 0

        def closed() -> bool:
            c = conn()
            return c is None or (c.closed and c not in h.server.connections)

        with traced() as mem:
            await evil.send_raw(data)
            await eventually(lambda: received() >= len(data), "partial frame not received")
            await evil.reset()
            await eventually(closed, "the server side did not close")
            assert len(causes) == 1
            cause = causes.pop()
            assert isinstance(cause, ConnectionResetError) or (
                isinstance(cause, ProtocolError) and "inside a frame" in str(cause)
            ), repr(cause)
            del cause
            gc.collect()
        assert h.calls == [], "a partial frame reached the handler"
        assert mem.peak < 2 * 64 * MIB
        assert mem.current < MIB, f"{mem.current / MIB:.1f} MiB still held after the connection closed"
        await h.survives()


async def test_f26_the_close_error_does_not_pin_the_partial_frame() -> None:
    """A caller keeps the ConnectionClosedError of a reply cut by a reset; the 50 MiB must go."""
    size = 50 * MIB
    data_read = asyncio.Event()

    async def script(peer: RawPeer) -> None:
        await peer.accept_handshake(SECRET_B)
        call = await peer.recv_message()
        # REPLY id <bin32 of 50 MiB>, cut after one MiB by a reset.
        await peer.send_raw(partial_frame(size, bytes([0x93, P.REPLY, call[1]]), MIB))
        await data_read.wait()
        await peer.reset()

    async with FakeServer(script) as fake:
        conn = await connect(port=fake.port, secret=SECRET)
        conn_ref = weakref.ref(conn)
        stats = conn.stats
        try:
            with traced() as mem:
                call = asyncio.ensure_future(conn.call("big", timeout=10 * SCALE))
                await eventually(lambda: stats.bytes_received > MIB, "partial reply not received")
                data_read.set()
                with pytest.raises(ConnectionClosedError) as caught:
                    await call
                await conn.wait_closed()
                error = caught.value  # kept, as a caller would (to log it, to retry later)
                del caught, call, conn
                gc.collect()
        finally:
            c = conn_ref()
            if c is not None:
                await c.aclose()
            del c
    assert fake.errors == []
    assert error.__cause__ is not None
    assert mem.peak > size, "the partial frame was never buffered: the test proves nothing"
    assert mem.current < MIB, f"{mem.current / MIB:.1f} MiB still held by the close error"
