"""Sans-I/O tests of asyncdist.protocol: the handshake pushed through in memory, and the schema.

Like h11's ConnectionPair: no sockets, no event loop; bytes go from one state
machine to the other by hand.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgpack
import pytest

from asyncdist import protocol as P
from asyncdist.codec import encode_plain
from asyncdist.errors import AuthenticationError, ProtocolError

SECRET = b"0123456789abcdef0123456789abcdef"


def _pair(
    server_secret: bytes | None, client_secret: bytes | None, **kw: Any
) -> tuple[P.AcceptorHandshake, P.InitiatorHandshake]:
    return P.AcceptorHandshake(server_secret, **kw), P.InitiatorHandshake(client_secret, **kw)


def _run(server: P.AcceptorHandshake, client: P.InitiatorHandshake) -> tuple[P.PeerInfo, P.PeerInfo]:
    auth = client.receive_hello(server.hello())
    ok, client_info = server.receive_auth(auth)
    server_info = client.receive_ok(ok)
    return client_info, server_info


def test_handshake_with_secret_authenticates_both_sides() -> None:
    server, client = _pair(SECRET, SECRET, pickle="load", max_in_flight=7, max_frame=4096)
    seen_by_server, seen_by_client = _run(server, client)
    assert seen_by_server.authenticated
    assert seen_by_client.authenticated
    assert seen_by_server == P.PeerInfo(True, "load", 7, 4096)


def test_handshake_without_secret_is_unauthenticated() -> None:
    seen_by_server, seen_by_client = _run(*_pair(None, None))
    assert not seen_by_server.authenticated
    assert not seen_by_client.authenticated


def test_handshake_frames_fit_the_preauth_cap() -> None:
    server, client = _pair(SECRET, SECRET)
    hello = server.hello()
    auth = client.receive_hello(hello)
    ok, _ = server.receive_auth(auth)
    for body in (hello, auth, ok, P.AcceptorHandshake.failure()):
        assert len(body) <= 1024


def test_wrong_secret_is_refused_by_the_acceptor() -> None:
    server, client = _pair(SECRET, b"another secret that is long enough")
    auth = client.receive_hello(server.hello())
    with pytest.raises(AuthenticationError, match="authentication failed"):
        server.receive_auth(auth)


def test_client_refuses_a_server_that_cannot_prove_the_secret() -> None:
    good, client = _pair(SECRET, SECRET)
    impostor = P.AcceptorHandshake(b"impostor secret impostor secret!")
    # The impostor relays the client's AUTH to nobody and answers with its own proof.
    auth = client.receive_hello(good.hello())
    ok, _ = good.receive_auth(auth)
    forged = msgpack.unpackb(ok)
    forged["mac"] = hmac.new(b"impostor secret impostor secret!", b"x", hashlib.sha256).digest()
    with pytest.raises(AuthenticationError, match="failed to prove"):
        client.receive_ok(encode_plain(forged))
    del impostor


def test_secret_mismatch_in_either_direction() -> None:
    with pytest.raises(AuthenticationError, match="requires a shared secret"):
        P.InitiatorHandshake(None).receive_hello(P.AcceptorHandshake(SECRET).hello())
    with pytest.raises(AuthenticationError, match="does not authenticate"):
        P.InitiatorHandshake(SECRET).receive_hello(P.AcceptorHandshake(None).hello())


def test_replayed_proof_fails_on_a_new_session() -> None:
    first, client = _pair(SECRET, SECRET)
    recorded = client.receive_hello(first.hello())
    first.receive_auth(recorded)
    second = P.AcceptorHandshake(SECRET)
    second.hello()
    with pytest.raises(AuthenticationError):
        second.receive_auth(recorded)


def test_reflected_proof_fails() -> None:
    # An attacker who is asked (as acceptor) to prove, echoes the victim's own proof back.
    server, client = _pair(SECRET, SECRET)
    auth = client.receive_hello(server.hello())
    reflected = msgpack.unpackb(auth)
    with pytest.raises(AuthenticationError):
        client.receive_ok(encode_plain({"type": "ok", "mac": reflected["mac"]}))


def test_parameters_are_bound_by_the_mac() -> None:
    server, client = _pair(SECRET, SECRET, pickle="refuse")
    auth = msgpack.unpackb(client.receive_hello(server.hello()))
    auth["pickle"] = "load"  # an on-path tamper
    with pytest.raises(AuthenticationError):
        server.receive_auth(encode_plain(auth))


def test_failure_message_reaches_the_initiator_as_authentication_error() -> None:
    server, client = _pair(SECRET, SECRET)
    client.receive_hello(server.hello())
    with pytest.raises(AuthenticationError, match="refused"):
        client.receive_ok(P.AcceptorHandshake.failure())


def _hello(**changes: Any) -> bytes:
    msg = msgpack.unpackb(P.AcceptorHandshake(None).hello())
    msg.update(changes)
    return encode_plain({k: v for k, v in msg.items() if v is not None})


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(ProtocolError, match="expected version 1, got 2"):
        P.InitiatorHandshake(None).receive_hello(_hello(version=2))


@pytest.mark.parametrize(
    "changes",
    [
        {"magic": "pyro"},
        {"nonce": b"x" * 31},
        {"auth": "rot13"},
        {"pickle": "yes"},
        {"max_in_flight": 0},
        {"max_frame": 10},
        {"extra": 1},
        {"nonce": None},
        {"version": True},
    ],
)
def test_odd_handshake_fields_are_protocol_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        P.InitiatorHandshake(None).receive_hello(_hello(**changes))


def test_handshake_refuses_extension_types_and_non_maps() -> None:
    with pytest.raises(ProtocolError):
        P.InitiatorHandshake(None).receive_hello(msgpack.packb(msgpack.ExtType(3, b"pickle")))
    with pytest.raises(ProtocolError, match="must be a map"):
        P.AcceptorHandshake(None).receive_auth(msgpack.packb([1, 0, "echo", []]))


# -- message schema -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        [P.CALL, 1, "echo", []],
        [P.CALL, 1, "echo", [1], {"a": 1}],
        [P.CALL, 1, "gen", [], {}, 8],
        [P.NOTIFY, "log", ["x"]],
        [P.REPLY, 2**63 - 1, None],
        [P.ERROR, 3, KeyError("x")],
        [P.CANCEL, 1],
        [P.ITEM, 1, b"x"],
        [P.END, 1],
        [P.CREDIT, 1, 5],
        [P.PING, b"12345678"],
        [P.PONG, b""],
        [P.CLOSE, "bye"],
    ],
)
def test_valid_messages(msg: list[Any]) -> None:
    assert P.validate(msg) is msg


@pytest.mark.parametrize(
    "msg",
    [
        [],
        {"kind": 1},
        [99],
        ["1", 1],
        [P.CALL, "id", "echo", []],
        [P.CALL, -1, "echo", []],
        [P.CALL, 1],
        [P.REPLY, 1],
        [P.ERROR, 1, "not an exception"],
        [P.CREDIT, 1, 0],
        [P.PING, b"x" * 65],
        [P.PING, "text"],
        [P.CLOSE, "x" * 2000],
        [P.NOTIFY, "", []],
        [True, 1, "echo", []],
    ],
)
def test_invalid_messages_are_protocol_errors(msg: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        P.validate(msg)
    assert not isinstance(info.value, P.BadRequest)


@pytest.mark.parametrize(
    "msg",
    [
        [P.CALL, 7, "echo", "not a list"],
        [P.CALL, 7, "", []],
        [P.CALL, 7, "echo", [], {1: 2}],
        [P.CALL, 7, "echo", [], {}, -1],
        [P.CALL, 7, "echo", [], {}, 1, "extra"],
    ],
)
def test_bad_calls_with_a_readable_id_are_bad_requests(msg: list[Any]) -> None:
    with pytest.raises(P.BadRequest) as info:
        P.validate(msg)
    assert info.value.call_id == 7


def test_call_ids() -> None:
    ids = P.CallIds()
    assert [ids.allocate() for _ in range(3)] == [1, 2, 3]
    assert ids.issued(3)
    assert not ids.issued(4)
    assert not ids.issued(0)
    ids.begin_incoming(5)
    with pytest.raises(ProtocolError, match="duplicate"):
        ids.begin_incoming(5)
    ids.end_incoming(5)
    ids.begin_incoming(5)
