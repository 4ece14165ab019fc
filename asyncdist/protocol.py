"""Messages, the handshake and call-id bookkeeping (sans-I/O).

Every frame body (see :mod:`asyncdist.frames`) is one msgpack object.

**Handshake** (before authentication; bodies of at most 1 KiB, plain msgpack
maps of string keys, no extension types, all under one deadline). The
acceptor speaks first::

    acceptor  -> HELLO {"type": "hello", "magic": "asyncdist", "version": 1, "nonce": 32 bytes,
                        "auth": "hmac-sha256" | "none", "pickle": policy,
                        "max_in_flight": int, "max_frame": int}
    initiator -> AUTH  {"type": "auth", "magic": "asyncdist", "version": 1, "nonce": 32 bytes,
                        "mac": 32 bytes | b"", "pickle": policy,
                        "max_in_flight": int, "max_frame": int}
    acceptor  -> OK    {"type": "ok", "mac": 32 bytes | b""}   or   FAIL {"type": "fail", "reason": str}

With a shared secret K, ``T = SHA256(hello body) || SHA256(msgpack of the
initiator's sorted parameters)`` and::

    AUTH.mac = HMAC-SHA256(K, "asyncdist/1 initiator" || hello.nonce || auth.nonce || T)
    OK.mac   = HMAC-SHA256(K, "asyncdist/1 acceptor"  || auth.nonce  || hello.nonce || T)

Fresh nonces on both sides defeat replay, the direction labels defeat
reflection, T binds every parameter either side announced, and proofs are
compared in constant time. Without a secret both sides must say ``"none"``
and the macs are empty; a side that has a secret refuses a peer that has
none. Nothing after the handshake is decoded until it succeeds.

**Messages** after the handshake are msgpack arrays whose first item is the
kind. ``id`` is an unsigned 63-bit call id chosen by the caller; REPLY,
ERROR, ITEM and END carry the id of a call the *receiver* made, CALL, CANCEL
and CREDIT the id of a call the *sender* made.

====  =======  ==============================================  =================================
kind  name     fields after the kind                           meaning
====  =======  ==============================================  =================================
1     CALL     id, name, args[, kwargs[, credit]]              call ``name``; with credit > 0 the
                                                               caller wants a stream of results
2     NOTIFY   name, args[, kwargs]                            one-way call, no answer
3     REPLY    id, value                                       the call returned ``value``
4     ERROR    id, error                                       the call raised (remote-error ext)
5     CANCEL   id                                              the caller gave up; cancel handler
6     ITEM     id, value                                       one stream item (uses one credit)
7     END      id                                              the stream is complete
8     CREDIT   id, n                                           the caller accepts n more items
9     PING     payload (bytes, at most 64)                     answer with PONG
10    PONG     payload                                         the answer to PING
11    CLOSE    reason (str)                                    the sender is closing cleanly
====  =======  ==============================================  =================================
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .codec import PicklePolicy, decode_plain, encode_plain
from .errors import AuthenticationError, ProtocolError

__all__ = [
    "CALL",
    "CANCEL",
    "CLOSE",
    "CREDIT",
    "END",
    "ERROR",
    "ITEM",
    "NOTIFY",
    "PING",
    "PONG",
    "REPLY",
    "AcceptorHandshake",
    "BadRequest",
    "CallIds",
    "InitiatorHandshake",
    "PeerInfo",
    "validate",
]

MAGIC: Final = "asyncdist"
VERSION: Final = 1
NONCE_SIZE: Final = 32
MAX_NAME: Final = 256
MAX_PING_PAYLOAD: Final = 64
MAX_REASON: Final = 1024
MAX_ID: Final = 2**63 - 1

CALL: Final = 1
NOTIFY: Final = 2
REPLY: Final = 3
ERROR: Final = 4
CANCEL: Final = 5
ITEM: Final = 6
END: Final = 7
CREDIT: Final = 8
PING: Final = 9
PONG: Final = 10
CLOSE: Final = 11

KIND_NAMES: Final = {
    CALL: "CALL",
    NOTIFY: "NOTIFY",
    REPLY: "REPLY",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    ITEM: "ITEM",
    END: "END",
    CREDIT: "CREDIT",
    PING: "PING",
    PONG: "PONG",
    CLOSE: "CLOSE",
}


class BadRequest(ProtocolError):
    """A CALL with a readable id but invalid fields: answer it with an error, keep the connection."""

    def __init__(self, call_id: int, reason: str) -> None:
        super().__init__(reason)
        self.call_id = call_id


def _is_id(x: Any) -> bool:
    return type(x) is int and 0 <= x <= MAX_ID


def _is_name(x: Any) -> bool:
    return type(x) is str and 0 < len(x) <= MAX_NAME


def validate(msg: Any) -> list[Any]:
    """Check one decoded message against the schema of its kind and return it.

    Raise :class:`BadRequest` for a CALL whose id is readable but whose
    other fields are wrong, and :class:`ProtocolError` for anything else.
    """
    if type(msg) is not list or not msg:
        raise ProtocolError("a message must be a non-empty array")
    kind = msg[0]
    if type(kind) is not int:
        raise ProtocolError("a message kind must be an integer")
    n = len(msg)
    if kind == CALL:
        if n < 4 or not _is_id(msg[1]):
            raise ProtocolError("CALL needs an id, a name and args")
        if n > 6:
            raise BadRequest(msg[1], "CALL has too many fields")
        if not _is_name(msg[2]):
            raise BadRequest(msg[1], "CALL name must be a string of 1 to 256 characters")
        if type(msg[3]) is not list:
            raise BadRequest(msg[1], "CALL args must be an array")
        if n >= 5 and (type(msg[4]) is not dict or not all(type(k) is str for k in msg[4])):
            raise BadRequest(msg[1], "CALL kwargs must be a map of string keys")
        if n == 6 and (type(msg[5]) is not int or not 0 <= msg[5] <= MAX_ID):
            raise BadRequest(msg[1], "CALL credit must be a non-negative integer")
        return msg
    if kind in (REPLY, ITEM):
        if n != 3 or not _is_id(msg[1]):
            raise ProtocolError(f"{KIND_NAMES[kind]} must be [kind, id, value]")
        return msg
    if kind == NOTIFY:
        if not 3 <= n <= 4 or not _is_name(msg[1]) or type(msg[2]) is not list:
            raise ProtocolError("NOTIFY must be [kind, name, args(, kwargs)]")
        if n == 4 and (type(msg[3]) is not dict or not all(type(k) is str for k in msg[3])):
            raise ProtocolError("NOTIFY kwargs must be a map of string keys")
        return msg
    if kind == ERROR:
        if n != 3 or not _is_id(msg[1]) or not isinstance(msg[2], BaseException):
            raise ProtocolError("ERROR must be [kind, id, remote-error]")
        return msg
    if kind in (CANCEL, END):
        if n != 2 or not _is_id(msg[1]):
            raise ProtocolError(f"{KIND_NAMES[kind]} must be [kind, id]")
        return msg
    if kind == CREDIT:
        if n != 3 or not _is_id(msg[1]) or type(msg[2]) is not int or not 0 < msg[2] <= MAX_ID:
            raise ProtocolError("CREDIT must be [kind, id, n > 0]")
        return msg
    if kind in (PING, PONG):
        if n != 2 or type(msg[1]) is not bytes or len(msg[1]) > MAX_PING_PAYLOAD:
            raise ProtocolError(f"{KIND_NAMES[kind]} must be [kind, payload of at most 64 bytes]")
        return msg
    if kind == CLOSE:
        if n != 2 or type(msg[1]) is not str or len(msg[1]) > MAX_REASON:
            raise ProtocolError("CLOSE must be [kind, reason]")
        return msg
    raise ProtocolError(f"unknown message kind {kind}")


class CallIds:
    """Allocates this side's call ids and tracks the peer's, refusing duplicates.

    The two id spaces never mix on the wire (see the module docstring), so
    both sides may use the same numbers.
    """

    __slots__ = ("_next", "incoming")

    def __init__(self) -> None:
        self._next = 1
        #: Ids of the peer's calls that this side is still handling.
        self.incoming: set[int] = set()

    def allocate(self) -> int:
        """Return a call id never returned before by this object."""
        i = self._next
        self._next = i + 1
        return i

    def issued(self, call_id: int) -> bool:
        """True if :meth:`allocate` has returned ``call_id``."""
        return 0 < call_id < self._next

    def begin_incoming(self, call_id: int) -> None:
        """Record a peer call; raise :class:`ProtocolError` if its id is already in use."""
        if call_id in self.incoming:
            raise ProtocolError(f"duplicate call id {call_id} while the first is pending")
        self.incoming.add(call_id)

    def end_incoming(self, call_id: int) -> None:
        """Forget a peer call once it was answered or cancelled."""
        self.incoming.discard(call_id)


# -- handshake ---------------------------------------------------------------------------

_LABEL_INITIATOR: Final = b"asyncdist/1 initiator"
_LABEL_ACCEPTOR: Final = b"asyncdist/1 acceptor"
_POLICIES: Final = ("refuse", "opaque", "load")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the handshake established about the peer."""

    #: The peer proved knowledge of the shared secret.
    authenticated: bool
    #: The peer's policy for pickled payloads it receives.
    pickle: PicklePolicy
    #: How many calls of ours the peer handles at once before it applies back-pressure.
    max_in_flight: int
    #: The largest frame body the peer accepts.
    max_frame: int


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, label + first + second + transcript, hashlib.sha256).digest()


def _params_digest(params: dict[str, Any]) -> bytes:
    return hashlib.sha256(encode_plain(sorted(params.items()))).digest()


def _check_common(msg: dict[str, Any], expected_type: str) -> None:
    if msg.get("magic") != MAGIC:
        raise ProtocolError(f"not an asyncdist peer (magic {str(msg.get('magic'))[:32]!r})")
    version = msg.get("version")
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: expected version {VERSION}, got {version!r}")
    if msg.get("type") != expected_type:
        raise ProtocolError(f"expected a {expected_type!r} handshake message")


def _decode_handshake(
    body: bytes | bytearray | memoryview, keys: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
    msg = decode_plain(body)
    if type(msg) is not dict:
        raise ProtocolError("a handshake message must be a map")
    if set(msg) != set(keys):
        if msg.get("type") == "fail" and "reason" in msg:
            raise AuthenticationError(f"peer refused the handshake: {str(msg['reason'])[:200]}")
        missing = sorted(set(keys) - set(msg))
        extra = sorted(set(msg) - set(keys))
        raise ProtocolError(f"bad handshake message: missing {missing[:8]}, unexpected {extra[:8]}")
    for key, typ in keys.items():
        if not isinstance(msg[key], typ) or (isinstance(msg[key], bool) and typ is int):
            raise ProtocolError(f"bad handshake field {key!r}")
    return msg


_PARAM_KEYS: Final[dict[str, type | tuple[type, ...]]] = {
    "magic": str,
    "version": int,
    "nonce": bytes,
    "pickle": str,
    "max_in_flight": int,
    "max_frame": int,
}
_HELLO_KEYS: Final = {"type": str, **_PARAM_KEYS, "auth": str}
_AUTH_KEYS: Final = {"type": str, **_PARAM_KEYS, "mac": bytes}
_OK_KEYS: Final = {"type": str, "mac": bytes}


def _peer_params(msg: dict[str, Any]) -> tuple[PicklePolicy, int, int]:
    if len(msg["nonce"]) != NONCE_SIZE:
        raise ProtocolError(f"handshake nonce must be {NONCE_SIZE} bytes")
    policy = msg["pickle"]
    if policy not in _POLICIES:
        raise ProtocolError(f"unknown pickle policy {policy[:32]!r}")
    max_in_flight = msg["max_in_flight"]
    if not 1 <= max_in_flight <= 1_000_000:
        raise ProtocolError("max_in_flight out of range")
    max_frame = msg["max_frame"]
    if not 1024 <= max_frame <= 2**32 - 1:
        raise ProtocolError("max_frame out of range")
    return policy, max_in_flight, max_frame


class AcceptorHandshake:
    """The accepting side of the handshake: :meth:`hello`, then :meth:`receive_auth`."""

    def __init__(
        self,
        secret: bytes | None,
        *,
        pickle: PicklePolicy = "refuse",
        max_in_flight: int = 1024,
        max_frame: int = 64 * 1024 * 1024,
    ) -> None:
        self._secret = secret
        self._nonce = secrets.token_bytes(NONCE_SIZE)
        self._hello = encode_plain(
            {
                "type": "hello",
                "magic": MAGIC,
                "version": VERSION,
                "nonce": self._nonce,
                "auth": "none" if secret is None else "hmac-sha256",
                "pickle": pickle,
                "max_in_flight": max_in_flight,
                "max_frame": max_frame,
            }
        )

    def hello(self) -> bytes:
        """The HELLO body to send first."""
        return self._hello

    @staticmethod
    def failure(reason: str = "authentication failed") -> bytes:
        """A FAIL body to send before closing (the reason must not reveal secrets)."""
        return encode_plain({"type": "fail", "reason": reason})

    def receive_auth(self, body: bytes | bytearray | memoryview) -> tuple[bytes, PeerInfo]:
        """Check the initiator's AUTH; return the OK body to send and what was learned.

        Raise :class:`AuthenticationError` for a proof that does not verify or
        a secret mismatch, :class:`ProtocolError` for anything malformed.
        """
        msg = _decode_handshake(body, _AUTH_KEYS)
        _check_common(msg, "auth")
        peer = _peer_params(msg)
        client_nonce: bytes = msg["nonce"]
        mac: bytes = msg["mac"]
        params = {k: msg[k] for k in _PARAM_KEYS}
        transcript = hashlib.sha256(self._hello).digest() + _params_digest(params)
        if self._secret is None:
            if mac:
                raise AuthenticationError("the peer sent a proof but no secret is configured here")
            return encode_plain({"type": "ok", "mac": b""}), PeerInfo(False, *peer)
        expected = _mac(self._secret, _LABEL_INITIATOR, self._nonce, client_nonce, transcript)
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationError("authentication failed: wrong secret or bad proof")
        proof = _mac(self._secret, _LABEL_ACCEPTOR, client_nonce, self._nonce, transcript)
        return encode_plain({"type": "ok", "mac": proof}), PeerInfo(True, *peer)


class InitiatorHandshake:
    """The connecting side: :meth:`receive_hello` returns AUTH, then :meth:`receive_ok`."""

    def __init__(
        self,
        secret: bytes | None,
        *,
        pickle: PicklePolicy = "refuse",
        max_in_flight: int = 1024,
        max_frame: int = 64 * 1024 * 1024,
    ) -> None:
        self._secret = secret
        self._pickle: PicklePolicy = pickle
        self._max_in_flight = max_in_flight
        self._max_frame = max_frame
        self._nonce = secrets.token_bytes(NONCE_SIZE)
        self._server_nonce = b""
        self._transcript = b""
        self._peer: PeerInfo | None = None

    @property
    def hello_seen(self) -> bool:
        """True once :meth:`receive_hello` accepted a HELLO."""
        return self._peer is not None

    def receive_hello(self, body: bytes | bytearray | memoryview) -> bytes:
        """Check HELLO and return the AUTH body to send."""
        msg = _decode_handshake(body, _HELLO_KEYS)
        _check_common(msg, "hello")
        peer = _peer_params(msg)
        auth = msg["auth"]
        if auth not in ("none", "hmac-sha256"):
            raise ProtocolError(f"unsupported authentication {auth[:32]!r}")
        if self._secret is not None and auth == "none":
            raise AuthenticationError(
                "the server does not authenticate (no secret) but a secret is configured here"
            )
        if self._secret is None and auth != "none":
            raise AuthenticationError(
                "the server requires a shared secret: pass secret=, set ASYNCDIST_SECRET "
                "or ASYNCDIST_SECRET_FILE"
            )
        self._server_nonce = msg["nonce"]
        params = {
            "magic": MAGIC,
            "version": VERSION,
            "nonce": self._nonce,
            "pickle": self._pickle,
            "max_in_flight": self._max_in_flight,
            "max_frame": self._max_frame,
        }
        self._transcript = hashlib.sha256(bytes(body)).digest() + _params_digest(params)
        mac = b""
        if self._secret is not None:
            mac = _mac(self._secret, _LABEL_INITIATOR, self._server_nonce, self._nonce, self._transcript)
        self._peer = PeerInfo(self._secret is not None, *peer)
        return encode_plain({"type": "auth", **params, "mac": mac})

    def receive_ok(self, body: bytes | bytearray | memoryview) -> PeerInfo:
        """Check OK (the acceptor's proof) and return what was learned about the peer."""
        if self._peer is None:
            raise ProtocolError("OK received before HELLO")
        msg = _decode_handshake(body, _OK_KEYS)
        if msg["type"] != "ok":
            raise ProtocolError("expected an 'ok' handshake message")
        mac: bytes = msg["mac"]
        if self._secret is None:
            if mac:
                raise AuthenticationError("the server sent a proof but no secret is configured here")
            return self._peer
        expected = _mac(self._secret, _LABEL_ACCEPTOR, self._nonce, self._server_nonce, self._transcript)
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationError("the server failed to prove it knows the secret")
        return self._peer
