"""Networked channels: a :class:`ChannelServer` serves named channels to other processes.

The server keeps each channel's :class:`~._home.Home`, the same object the
channels made on its event loop use, so local ends and remote ends meet on
one home. A remote end is a thin client that asks the server to read,
write, alternate, poison or retire over one
:class:`~asyncdist.connection.Connection` per (event loop, server): a
:class:`RemoteLink`.

Wire protocol (handler names on the server; values travel as opaque bytes
that only the reading side decodes, so the server never decodes, let alone
unpickles, user data):

* ``csp.join(name, kind, buffer)`` (notify): an end joins; the channel is
  made with this ``buffer`` on first use.
* ``csp.op(op_id, name, kind, payload) -> [0, result]``: one read or write,
  answered when the home matched it; ``result`` is the value read, or for
  a write the number of buffer slots the server now promises this client
  (credits: the next that many writes are sent as ``csp.put`` without
  waiting, which is what makes a buffered channel stream).
* ``csp.alt(op_id, offers, skip) -> [index, payload]``: an alternation whose
  channel guards are all on this server, committed atomically there;
  ``index`` is -1 when ``skip`` and nothing was ready.
* ``csp.withdraw(op_id)`` (notify): the caller was cancelled or timed out;
  a waiting op answers ``[-2, None]``; one already committed keeps its
  answer, and the client gives a value it will not use back
  (``csp.giveback``), first in line.
* ``csp.put``, ``csp.uncredit``, ``csp.poison``, ``csp.retire``,
  ``csp.leave``, ``csp.transfer``/``csp.adopt`` (an end sent to another
  process changes hands without the channel seeing its side retire).
* The server notifies ``csp.ended(name)`` to clients holding credits when
  the channel is poisoned or its readers retired.

When a connection is lost, the ends it had joined leave their channels as if
they retired: a dead writer makes the blocked readers raise
:class:`~asyncdist.errors.ChannelRetired` once no writer is left (after the
buffered values), a dead reader does the same to blocked writers; the
heartbeat bounds how long a dead peer goes unnoticed (F18, F19).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import logging
import os
import socket
import ssl as _ssl
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

from .._log import get_logger
from ..codec import Codec
from ..connection import Connection, connect
from ..errors import ConnectionClosedError, ConnectionClosedOK, SerializationError
from ..security import resolve_secret
from ..server import Server, serve
from ._home import NOT_NOW, Choice, Home, Kind, Offer, Packed, local_homes, watch

__all__ = [
    "ChannelServer",
    "NeedsHost",
    "RemoteLink",
    "effect",
    "encode_value",
    "host_here",
    "link_for",
    "local_server",
    "servers_of",
    "shutdown",
]

log = get_logger("asyncdist.csp")

#: At most this many buffer slots are promised to one client per channel at a time.
MAX_CREDIT = 256
#: Reads answered to a client and not yet acknowledged (kept or given back) that a channel waits for.
MAX_UNACKED = 4096
#: At most this many guards in one alternation sent to a server.
MAX_GUARDS = 256
WITHDRAWN = -2
SKIPPED = -1


def payload_codec(authenticated: bool) -> Codec:
    """The codec of channel values: pickles (cloudpickle) only between authenticated peers."""
    return Codec(accept_pickle="load" if authenticated else "refuse", send_pickle=authenticated)


class NeedsHost(SerializationError):
    """An end of a local channel is being sent, and no channel server on this loop serves it yet."""


#: Side effects of encoding ends (joins on behalf of ends in transit), run once encoding succeeded.
_effects = threading.local()


@contextlib.contextmanager
def deferred_effects() -> Iterator[list[Callable[[], None]]]:
    """Collect the side effects of encoding ends; the caller runs them if the encoding succeeded."""
    outer = getattr(_effects, "pending", None)
    pending: list[Callable[[], None]] = []
    _effects.pending = pending
    try:
        yield pending
    finally:
        _effects.pending = outer


def effect(action: Callable[[], None]) -> None:
    """Run ``action`` now, or once the encoding in progress succeeded (see :func:`deferred_effects`)."""
    pending = getattr(_effects, "pending", None)
    if pending is None:
        action()
    else:
        pending.append(action)


_SCALARS: frozenset[type] = frozenset({int, float, str, bytes, bool, type(None)})


async def encode_value(codec: Codec, value: Any) -> bytes:
    """Encode a channel value; an end of a local channel in it makes this loop serve that channel."""
    if type(value) in _SCALARS:
        return codec.encode(value)
    for _ in range(2):
        with deferred_effects() as effects:
            try:
                data = codec.encode(value)
            except NeedsHost:
                await host_here()
                continue
        for action in effects:
            action()
        return data
    raise SerializationError("could not serve the channels of the ends in this value")  # pragma: no cover


class _Withdrawn(Exception):
    """The client withdrew an operation that had not happened."""


_WITHDRAWN_EXC = _Withdrawn()


def _kind(kind: Any) -> Kind:
    if kind == "read":
        return "read"
    if kind == "write":
        return "write"
    raise ValueError("kind must be 'read' or 'write'")


def _payload(value: Any) -> Packed:
    if type(value) is not bytes:
        raise TypeError("a channel value travels as the bytes its writer encoded")
    return Packed(value)


@dataclasses.dataclass
class _Transit:
    """An end on its way from one process to another (see :meth:`ChannelServer.handover`)."""

    sent: bool
    home: Home
    kind: Kind
    sender: _Session | None


class _Session:
    """One client connection of a channel server: its joined ends, waiting operations and credits."""

    def __init__(self, server: ChannelServer, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.joined: collections.Counter[tuple[str, Kind]] = collections.Counter()
        self.ops: dict[int, Choice] = {}
        self.credit: collections.Counter[str] = collections.Counter()
        #: Per channel, how many times promised slots were revoked: a grant made before the client
        #: heard of a revocation is recognized as stale by its epoch.
        self.epoch: collections.Counter[str] = collections.Counter()
        #: Per channel, reclaimed slots the client may still have used (see ``_reclaim``).
        self.grace: collections.Counter[str] = collections.Counter()
        #: Recent reads answered to this client, by op id: what it may give back.
        self.reads: collections.OrderedDict[int, tuple[Home, bytes]] = collections.OrderedDict()
        #: Watches (csp.watch) waiting for this client.
        self.watches: set[asyncio.Future[None]] = set()
        #: Channels where this client waits for free slots to be promised.
        self.awaiting_room: set[str] = set()
        self._refused = 0
        quiet = self._quiet
        self.handlers: dict[str, Callable[..., Any]] = {
            # Called (answered): errors go back to the caller.
            "csp.op": self.op,
            "csp.alt": self.alt,
            "csp.watch": self.watch,
            "csp.poison": self.poison,
            "csp.retire": self.retire,
            # Sent one-way: a malformed one is refused quietly (a client cannot flood the log).
            "csp.join": quiet(self.join),
            "csp.withdraw": quiet(self.withdraw),
            "csp.put": quiet(self.put),
            "csp.puts": quiet(self.puts),
            "csp.uncredit": quiet(self.uncredit),
            "csp.giveback": quiet(self.giveback),
            "csp.took": quiet(self.took),
            "csp.leave": quiet(self.leave),
            "csp.transfer": quiet(self.transfer),
            "csp.adopt": quiet(self.adopt),
        }
        conn.add_close_callback(self.lost)

    def _quiet(self, handler: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(handler)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                handler(*args, **kwargs)
            except (ValueError, TypeError, LookupError) as exc:
                self._refused += 1
                level = logging.WARNING if self._refused == 1 else logging.DEBUG
                log.log(level, "refused a malformed %s from %s: %s", handler.__name__, self.conn, exc)

        return run

    def _home(self, name: Any) -> Home:
        home = self.server.homes.get(name) if type(name) is str else None
        if home is None:
            raise LookupError(f"no channel named {str(name)[:80]!r} on this server (join it first)")
        return home

    # -- membership ------------------------------------------------------------------------

    def join(self, name: Any, kind: Any, buffer: Any = 0) -> None:
        if type(name) is not str or not 0 < len(name) <= 1024:
            raise ValueError("a channel name is a string of 1 to 1024 characters")
        if type(buffer) is not int or not 0 <= buffer <= 1_000_000:
            raise ValueError("buffer must be an int from 0 to 1,000,000")
        kind = _kind(kind)
        self.server.home(name, buffer).join(kind)
        self.joined[(name, kind)] += 1

    def retire(self, name: Any, kind: Any) -> None:
        self._part(name, kind, retire=True)

    def leave(self, name: Any, kind: Any) -> None:
        self._part(name, kind, retire=False)

    def _part(self, name: Any, kind: Any, *, retire: bool) -> None:
        """One end of this connection leaves: retiring its side, or not (disconnect)."""
        kind = _kind(kind)
        home = self._home(name)
        if self.joined[(name, kind)] > 0:
            self.joined[(name, kind)] -= 1
            if kind == "write" and not self.joined[(name, kind)]:
                self._drop_credit(home)
            if retire:
                home.leave(kind)
                self.server.forget_if_over(home)
            else:
                home.disconnect(kind)

    def transfer(self, name: Any, kind: Any, token: Any) -> None:
        """An end of this channel is on its way to another process: it stays joined meanwhile."""
        kind = _kind(kind)
        self.server.handover(self._home(name), kind, token, sent=True, sender=self)

    def adopt(self, name: Any, kind: Any, token: Any) -> None:
        """An end sent by another process arrived here: this connection now holds its place."""
        kind = _kind(kind)
        self.server.handover(self._home(name), kind, token, sent=False)
        self.joined[(name, kind)] += 1

    def poison(self, name: Any) -> None:
        self._home(name).poison()

    def stop(self) -> None:
        """The server closes: what waits for this client fails now (the client sees the close)."""
        closing = ConnectionClosedOK("the channel server is closing")
        for choice in list(self.ops.values()):
            if choice.open:
                choice.fail(closing)
        for fut in list(self.watches):
            if not fut.done():
                fut.set_result(None)

    def lost(self, conn: Connection) -> None:
        self.server.sender_lost(self)
        # Values handed to this client that it never acknowledged: if it died (not a clean close),
        # they go back to their channels, first in line, so that a live reader gets them.
        died = isinstance(conn.close_exception, ConnectionClosedError)
        for held, data in reversed(self.reads.values()):
            if died and not held.poisoned:
                held.unclaimed -= 1
                held.give_back_value(Packed(data))
            else:
                held.claimed()
        self.reads.clear()
        for choice in self.ops.values():
            if choice.open:
                choice.close()
        self.ops.clear()
        for name, n in self.credit.items():
            home = self.server.homes.get(name)
            if home is not None:
                if self._void in home.listeners:
                    home.listeners.remove(self._void)
                home.release(n)
        self.credit.clear()
        for (name, kind), count in self.joined.items():
            home = self.server.homes.get(name)
            if home is not None:
                for _ in range(count):
                    home.leave(kind)
                self.server.forget_if_over(home)
        self.joined.clear()

    # -- operations ------------------------------------------------------------------------

    def op(self, op_id: Any, name: Any, kind: Any, payload: Any = None) -> Any:
        home = self._home(name)
        kind = _kind(kind)
        value = _payload(payload) if kind == "write" else None
        if kind == "write" and self.credit.get(home.name):
            self._reclaim(home)
        result = home.now(kind, value)
        if result is not NOT_NOW:  # done at once: no choice to make
            if kind == "read":
                home.unclaimed += 1
                return self._read_answer(op_id, home, result, 0, None)
            return [0, self._granted(home) if home.capacity else None]
        choice = Choice(home.loop)
        offer = Offer(choice, home, kind, value, tag=0)
        choice.offers.append(offer)
        if home.offer(offer):
            return self._answer(op_id, choice, True)
        return self._wait(op_id, choice, True)

    def alt(self, op_id: Any, offers: Any, skip: Any) -> Any:
        if type(offers) is not list or not 0 < len(offers) <= MAX_GUARDS:
            raise ValueError(f"an alternation has 1 to {MAX_GUARDS} channel guards")
        guards = []
        for item in offers:  # check every guard before offering any
            if type(item) is not list or len(item) != 3:
                raise ValueError("a guard is [name, kind, payload]")
            kind = _kind(item[1])
            guards.append((self._home(item[0]), kind, _payload(item[2]) if kind == "write" else None))
        for home, kind, _ in guards:
            if kind == "write" and self.credit.get(home.name):
                self._reclaim(home)
        choice = Choice(guards[0][0].loop)
        for index, (home, kind, value) in enumerate(guards):
            offer = Offer(choice, home, kind, value, tag=index)
            choice.offers.append(offer)
            home.offer(offer)
            if not choice.open:
                return self._answer(op_id, choice, False)
        if skip:
            choice.close()
            return [SKIPPED, None]
        return self._wait(op_id, choice, False)

    def _wait(self, op_id: Any, choice: Choice, grant: bool) -> asyncio.Future[Any]:
        if type(op_id) is not int or op_id in self.ops:
            choice.close()
            raise ValueError("an operation id is an int not in use")
        self.ops[op_id] = choice
        answer: asyncio.Future[Any] = choice.future.get_loop().create_future()

        def committed(_: Any) -> None:
            self.ops.pop(op_id, None)
            if not answer.done():
                try:
                    answer.set_result(self._answer(op_id, choice, grant))
                except _Withdrawn:
                    answer.set_result([WITHDRAWN, None])
                except BaseException as exc:
                    answer.set_exception(exc)
            elif answer.cancelled():
                self._give_back(choice)

        def abandoned(_: Any) -> None:  # the connection cancelled the call (it closed)
            if answer.cancelled():
                self.ops.pop(op_id, None)
                if choice.open:
                    choice.close()  # (a commit in the same instant is given back by committed())

        choice.future.add_done_callback(committed)
        answer.add_done_callback(abandoned)
        return answer

    @staticmethod
    def _give_back(choice: Choice) -> None:
        fut = choice.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            offer, _ = fut.result()
            offer.home.give_back(choice)

    def _answer(self, op_id: Any, choice: Choice, grant: bool) -> list[Any]:
        """``[index, value read]``, or for a write ``[index, credits granted]`` (raises its failure)."""
        offer, value = choice.future.result()  # raises the channel's end, or _Withdrawn
        if offer.kind == "read":
            return self._read_answer(op_id, offer.home, value, offer.tag, choice)
        if grant and offer.home.capacity:
            return [offer.tag, self._granted(offer.home)]
        return [offer.tag, None]

    def _read_answer(self, op_id: Any, home: Home, value: Any, tag: Any, choice: Choice | None) -> list[Any]:
        """The answer to a read of ``value`` (handed over, unclaimed): ``[tag, encoded value]``."""
        if type(value) is Packed:
            data = value.data
        else:
            try:
                data = self.server.codec.encode(value)
            except BaseException:  # a local writer's value this client cannot receive: it stays
                if choice is not None:
                    home.give_back(choice)
                else:
                    home.unclaimed -= 1
                    home.give_back_value(value)
                raise
        # In the client's hands until it says it took it (csp.took) or gives it back (csp.giveback):
        # until then no reader is told that the channel is drained.
        if op_id in self.reads:
            home.claimed()
            raise ValueError("an operation id is an int not in use")
        self.reads[op_id] = (home, data)
        if len(self.reads) > MAX_UNACKED:
            self.reads.popitem(last=False)[1][0].claimed()
        return [tag, data]

    def _grant(self, home: Home) -> int:
        """Promise this client free buffer slots of ``home``: its next writes need no answer."""
        held = self.credit[home.name]
        n = min(home.free(), MAX_CREDIT - held)
        if n <= 0 or home.poisoned or home.retired["read"]:
            return 0
        home.reserved += n
        if not held:
            home.listeners.append(self._void)
        self.credit[home.name] = held + n
        return n

    def _granted(self, home: Home) -> list[int] | None:
        """Credits for the answer to a write: ``[n, epoch]``, or None."""
        n = self._grant(home)
        return [n, self.epoch[home.name]] if n else None

    def _void(self, home: Home) -> None:
        """The channel ended: promised slots are void; tell the client to stop using them."""
        if self.credit.pop(home.name, 0):
            self.epoch[home.name] += 1
            if not self.conn.closed:
                self.conn.notify_nowait("csp.ended", home.name, self.epoch[home.name])

    def watch(self, guards: Any) -> Any:
        """Answer once one of ``[[name, kind], ...]`` could complete now (for alternations that span
        several servers, which try each in turn)."""
        if type(guards) is not list or not 0 < len(guards) <= MAX_GUARDS:
            raise ValueError(f"a watch has 1 to {MAX_GUARDS} guards")
        pairs = []
        for item in guards:
            if type(item) is not list or len(item) != 2:
                raise ValueError("a watched guard is [name, kind]")
            pairs.append((self._home(item[0]), _kind(item[1])))
        fut = watch(pairs)
        if fut is not None:
            self.watches.add(fut)
            fut.add_done_callback(self.watches.discard)
        return fut

    def withdraw(self, op_id: Any) -> None:
        if type(op_id) is not int:
            return
        choice = self.ops.pop(op_id, None)
        if choice is not None and choice.open:
            choice.fail(_WITHDRAWN_EXC)
            return

    def put(self, name: Any, payload: Any) -> None:
        self.puts(name, [payload])

    def puts(self, name: Any, payloads: Any) -> None:
        """Values written with promised slots (credits), in order; tops the client's credits up."""
        home = self._home(name)
        if type(payloads) is not list or not 0 < len(payloads) <= MAX_CREDIT:
            raise ValueError(f"csp.puts takes a list of 1 to {MAX_CREDIT} values")
        values = [_payload(p) for p in payloads]
        if home.poisoned or home.retired["read"]:
            self.credit.pop(name, None)
            return  # credits voided while these values travelled
        held = self.credit[name]
        over = max(0, len(values) - held)
        if over > self.grace[name]:
            raise ValueError(f"writes to {name!r} without promised slots")
        if over:  # slots taken back (reclaimed) while the client was already using them
            self.grace[name] -= over
        held = max(0, held - len(values))
        if held:
            self.credit[name] = held
        else:
            self.credit.pop(name, None)
            if self._void in home.listeners:
                home.listeners.remove(self._void)
        for i, value in enumerate(values):
            home.put(value, promised=i < len(values) - over)
        self._top_up(home)

    def _top_up(self, home: Home) -> None:
        """Promise more slots before the client runs out, so that a streaming writer never stops."""
        if home.poisoned or home.retired["read"] or self.conn.closed:
            return
        window = min(home.capacity, MAX_CREDIT)
        if self.credit[home.name] > window // 2:
            return
        if home.free() >= max(1, window // 4):
            n = self._grant(home)
            if n:
                self.conn.notify_nowait("csp.credit", home.name, n, self.epoch[home.name])
        elif home.name not in self.awaiting_room:
            self.awaiting_room.add(home.name)
            home.room_waiters.append(functools.partial(self._room, home))

    def _room(self, home: Home) -> None:
        self.awaiting_room.discard(home.name)
        self._top_up(home)

    def _reclaim(self, home: Home) -> None:
        """The client writes without credits while it holds some it has not heard of yet (a top-up
        crossed its write): take them back, so that they cannot keep its own write waiting. Values
        it may already have sent with them are still taken (``grace``), beyond the buffer's size
        if need be: none is lost."""
        self.grace[home.name] += self.credit.get(home.name, 0)
        self._drop_credit(home)
        if not self.conn.closed:
            self.conn.notify_nowait("csp.ended", home.name, self.epoch[home.name])

    def _drop_credit(self, home: Home) -> None:
        """No write end of this connection is left on ``home`` (or the slots are reclaimed): the
        promised slots go back, and a new epoch of credits starts (the client counts the same)."""
        self.epoch[home.name] += 1
        held = self.credit.pop(home.name, 0)
        if held:
            if self._void in home.listeners:
                home.listeners.remove(self._void)
            home.release(held)

    def uncredit(self, name: Any, n: Any) -> None:
        """The client gives promised slots back (before an alternation that writes there)."""
        home = self._home(name)
        if type(n) is not int or n <= 0:
            return
        n = min(n, self.credit[name])
        if n:
            self.credit[name] -= n
            if not self.credit[name]:
                del self.credit[name]
                if self._void in home.listeners:
                    home.listeners.remove(self._void)
            home.release(n)

    def giveback(self, op_id: Any, payload: Any) -> None:
        """The caller of read ``op_id`` was cancelled as its value arrived: the value goes back."""
        read = self.reads.pop(op_id, None) if type(op_id) is int else None
        if read is None:
            raise ValueError("no read of this connection to give back under that id")
        home, data = read  # the value as it was read (whatever ``payload`` says)
        home.unclaimed -= 1
        home.give_back_value(Packed(data))

    def took(self, op_id: Any) -> None:
        """The client kept the value of read ``op_id``."""
        read = self.reads.pop(op_id, None) if type(op_id) is int else None
        if read is not None:
            read[0].claimed()


#: The channel servers running on each loop (a channel made there is reachable through them).
_servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[ChannelServer]] = (
    weakref.WeakKeyDictionary()
)


def servers_of(loop: asyncio.AbstractEventLoop) -> list[ChannelServer]:
    """The channel servers running on ``loop``."""
    return list(_servers.get(loop, ()))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_server(loop: asyncio.AbstractEventLoop, address: tuple[str, int]) -> ChannelServer | None:
    """The channel server running on ``loop`` at ``address``, if there is one."""
    host, port = address[0], int(address[1])
    for server in _servers.get(loop, ()):
        s_host, s_port = server.address
        if s_port == port and (host == s_host or host == server.advertised[0] or _is_loopback(host)):
            return server
    return None


class ChannelServer:
    """Serves named channels to other processes: ``server = await ChannelServer.start(host, port)``.

    A channel is made when the first client names it (with that client's
    buffer size); channels made by name on the server's own event loop
    (``Channel("A")``) are served too, so a process can host its channels
    the way a PyCSP interpreter does. Serve until :meth:`close`, or until
    :meth:`serve_forever` is cancelled. ``secret``/``ssl`` authenticate
    clients (required to bind other than loopback, unless ``insecure``);
    values are pickled only between authenticated peers. ``advertise``
    (host) is the address put in ends sent to other processes, when it is
    not the bound one. An end sent by a client that then disconnects keeps
    its place in its channel for ``transit_timeout`` seconds, unless it
    arrives first (its message may have been dropped by poison).
    """

    def __init__(self) -> None:
        self.homes: dict[str, Home] = {}
        self.codec = payload_codec(False)
        self.advertised: tuple[str, int] = ("127.0.0.1", 0)
        self._server: Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokens: dict[str, _Transit] = {}
        self._sessions: weakref.WeakSet[_Session] = weakref.WeakSet()
        #: Seconds an end in transit keeps its place after its sender disconnected.
        self.transit_timeout = 60.0

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | bytes | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        insecure: bool = False,
        advertise: str | None = None,
        transit_timeout: float = 60.0,
        **options: Any,
    ) -> ChannelServer:
        self = cls()
        self.transit_timeout = transit_timeout
        key = resolve_secret(secret, secret_file=secret_file)
        self.codec = payload_codec(key is not None or ssl is not None)
        self._server = await serve(
            self._session,
            host,
            port,
            secret=key,
            ssl=ssl,
            insecure=insecure,
            **options,
        )
        bound_host, bound_port = self.address
        if advertise is None:
            advertise = socket.gethostname() if bound_host in ("0.0.0.0", "::", "") else bound_host
        self.advertised = (advertise, bound_port)
        self._loop = asyncio.get_running_loop()
        _servers.setdefault(self._loop, []).append(self)
        return self

    def _session(self, conn: Connection) -> dict[str, Callable[..., Any]]:
        session = _Session(self, conn)
        self._sessions.add(session)
        return session.handlers

    def home(self, name: str, buffer: int = 0) -> Home:
        """The home of the channel ``name`` served here (made, with ``buffer``, if new)."""
        home = self.homes.get(name)
        if home is None:
            loop = asyncio.get_running_loop()
            home = local_homes(loop).get(name)
            if home is None:
                home = Home(name, buffer, loop)
                local_homes(loop)[name] = home
            self.homes[name] = home
            if home.codec is None:
                home.serve(self.codec)
        return home

    def forget_if_over(self, home: Home) -> None:
        """A channel that ended (poisoned, or both sides retired) and that no end holds any more
        is forgotten: the next client to name it starts a new channel."""
        if home.joined["read"] > 0 or home.joined["write"] > 0:
            return
        if home.poisoned or (home.retired["read"] and home.retired["write"]):
            for name, hosted in list(self.homes.items()):
                if hosted is home:
                    del self.homes[name]
            local = local_homes(home.loop)
            if local.get(home.name) is home:
                del local[home.name]

    def host(self, home: Home) -> str:
        """Serve a channel of this loop (its end is being sent elsewhere); return its name here."""
        name = home.name
        if self.homes.get(name, home) is not home:
            name = f"{home.name}#{id(home):x}"
        self.homes[name] = home
        if home.codec is None:
            home.serve(self.codec)
        return name

    def handover(
        self, home: Home, kind: Kind, token: Any, *, sent: bool, sender: _Session | None = None
    ) -> None:
        """Count an end that changes hands once: whichever of send and arrival comes first joins.

        An end in transit holds its place in the channel while its sender is
        connected, and for ``transit_timeout`` seconds after the sender left
        (the message carrying it may have been dropped: poison empties
        buffers); then its side may retire.
        """
        if type(token) is not str or not 0 < len(token) <= 64:
            raise ValueError("a transfer token is a short string")
        first = self._tokens.get(token)
        if first is not None:
            if first.sent == sent:
                raise ValueError("a transfer token is used once")
            del self._tokens[token]
            return
        if len(self._tokens) >= 100_000:
            raise ValueError("too many ends in transit")
        self._tokens[token] = _Transit(sent, home, kind, sender)
        home.join(kind)

    def sent(self, home: Home, kind: Kind, token: str) -> None:
        """An end of a channel of this loop is being sent (see :meth:`handover`)."""
        self.handover(home, kind, token, sent=True)

    def sender_lost(self, session: _Session) -> None:
        """Ends this client sent and nobody adopted yet give up their places after a while."""
        tokens = [t for t, transit in self._tokens.items() if transit.sender is session]
        if tokens and self._loop is not None:
            self._loop.call_later(self.transit_timeout, self._expire, tokens)

    def _expire(self, tokens: list[str]) -> None:
        for token in tokens:
            transit = self._tokens.pop(token, None)
            if transit is not None:
                transit.home.leave(transit.kind)
                self.forget_if_over(transit.home)

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (host, port)."""
        assert self._server is not None
        return self._server.tcp_address

    @property
    def port(self) -> int:
        return self.address[1]

    async def serve_forever(self) -> None:
        """Serve until :meth:`close`; cancelling this closes the server."""
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            self._forget()

    def close(self) -> None:
        """Stop serving: close the listener and every client connection.

        Operations waiting on behalf of clients fail at once with
        ``ConnectionClosedOK`` (so closing does not wait for them).
        """
        self._forget()
        for session in list(self._sessions):
            session.stop()
        if self._server is not None:
            self._server.close()

    def _forget(self) -> None:
        if self._loop is not None:
            servers = _servers.get(self._loop, [])
            if self in servers:
                servers.remove(self)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> ChannelServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self._server is not None else "?"
        return f"<ChannelServer {where} channels={len(self.homes)}>"


#: The channel server this loop started itself to host channels whose ends went elsewhere.
_hosts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[ChannelServer, Any]] = (
    weakref.WeakKeyDictionary()
)


async def host_here() -> ChannelServer:
    """This loop's channel server (started if there is none): it serves local channels to others.

    It binds ``ASYNCDIST_CSP_HOST`` (default 127.0.0.1) on ``ASYNCDIST_CSP_PORT``
    (default: any free port), authenticated with ``ASYNCDIST_SECRET`` when
    set, and closes with the loop or :func:`shutdown`.
    """
    loop = asyncio.get_running_loop()
    while True:
        running = _servers.get(loop)
        if running:
            return running[0]
        starting = _starting.get(loop)
        if starting is None:
            break
        await asyncio.shield(starting)
    _starting[loop] = starting = loop.create_future()
    try:
        server = await ChannelServer.start(
            os.environ.get("ASYNCDIST_CSP_HOST", "127.0.0.1"), int(os.environ.get("ASYNCDIST_CSP_PORT", "0"))
        )
        guard = _close_with_loop(server)
        await guard.__anext__()
        _hosts[loop] = (server, guard)
        return server
    finally:
        del _starting[loop]
        starting.set_result(None)


_starting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[None]] = (
    weakref.WeakKeyDictionary()
)


async def _close_with_loop(
    closing: ChannelServer | Connection, before: Callable[[], None] | None = None
) -> AsyncGenerator[None, None]:
    """Close a server, or a link's connection, when the loop shuts down (``asyncio.run`` does).

    A connection closes gracefully: writes already sent as promised slots (credits) still arrive.
    """
    try:
        yield
    finally:
        if before is not None:
            before()
        if isinstance(closing, ChannelServer):
            closing.close()
        elif not closing.closed:
            try:
                await asyncio.wait_for(closing.close(), closing.options.close_timeout)
            except BaseException:
                closing.abort()
                raise


class RemoteLink:
    """This loop's connection to one channel server, opened at first use, shared by its ends."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: tuple[str, int], options: dict[str, Any]
    ) -> None:
        self.loop = loop
        self.address = address
        self.options = options
        authenticated = (
            resolve_secret(options.get("secret"), secret_file=options.get("secret_file")) is not None
        )
        self.codec = payload_codec(authenticated or options.get("ssl") is not None)
        self.credits: collections.Counter[str] = collections.Counter()
        self._conn: Connection | None = None
        self._opening: asyncio.Task[Connection] | None = None
        self._early: list[tuple[str, tuple[Any, ...]]] = []
        self._ids = itertools.count(1)
        self._guard: AsyncGenerator[None, None] | None = None
        #: Values written with credits, per channel, sent together at the end of this loop iteration.
        self._puts: dict[str, list[bytes]] = {}
        #: Operations waiting at the server, by id (withdrawn when the link closes).
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._writers: collections.Counter[str] = collections.Counter()
        self._epochs: collections.Counter[str] = collections.Counter()
        self._closing = False

    @property
    def broken(self) -> bool:
        """The connection was opened and is closed now (ends of this link fail)."""
        return self._conn is not None and self._conn.closed

    def _flush_puts(self) -> None:
        """Send the values written with credits so far (before anything else goes out)."""
        puts, conn = self._puts, self._conn
        if puts and conn is not None:
            self._puts = {}
            if not conn.closed:
                for name, payloads in puts.items():
                    conn.notify_nowait("csp.puts", name, payloads)

    def _put(self, conn: Connection, name: str, payload: bytes) -> None:
        batch = self._puts.get(name)
        if batch is None:
            if not self._puts:
                self.loop.call_soon(self._flush_puts)
            self._puts[name] = [payload]
        else:
            batch.append(payload)
            if len(batch) >= MAX_CREDIT:
                self._flush_puts()

    def _count(self, method: str, args: tuple[Any, ...]) -> None:
        """Count this link's writer ends per channel; with the last one gone, its credits lapse
        (the server drops them at the same point of the message order)."""
        if len(args) >= 2 and args[1] == "write":
            name = args[0]
            if method in ("csp.join", "csp.adopt"):
                self._writers[name] += 1
            elif method in ("csp.leave", "csp.retire") and self._writers[name] > 0:
                self._writers[name] -= 1
                if not self._writers[name]:
                    del self._writers[name]
                    self.credits.pop(name, None)
                    self._epochs[name] += 1  # the server starts a new epoch at this message

    def send(self, method: str, *args: Any) -> None:
        """Send a one-way message now if connected, else as soon as the connection opens."""
        self._count(method, args)
        conn = self._conn
        if conn is not None:
            if not conn.closed:
                self._flush_puts()
                conn.notify_nowait(method, *args)
            return
        self._early.append((method, args))
        self._start()

    def _start(self) -> None:
        if self._opening is None:
            self._opening = self.loop.create_task(self._open())
            self._opening.add_done_callback(_retrieve)

    async def _open(self) -> Connection:
        host, port = self.address
        handlers: dict[str, Callable[..., Any]] = {"csp.ended": self._ended, "csp.credit": self._credit}
        conn = await connect(host, port, handlers=handlers, **self.options)
        guard = _close_with_loop(conn, self._flush_puts)
        await guard.__anext__()
        self._guard = guard
        for method, args in self._early:
            conn.notify_nowait(method, *args)
        self._early.clear()
        self._conn = conn
        return conn

    def _ended(self, name: Any, epoch: Any = 0) -> None:
        if type(name) is str and type(epoch) is int:
            self.credits.pop(name, None)
            self._epochs[name] = max(self._epochs[name], epoch)

    def _credit(self, name: Any, n: Any, epoch: Any = 0) -> None:
        """Promised slots, unless a revocation the server made since has reached this side."""
        valid = type(name) is str and type(n) is int and 0 < n <= MAX_CREDIT and type(epoch) is int
        if valid and epoch >= self._epochs[name]:
            self._epochs[name] = epoch
            self.credits[name] += n

    async def connection(self) -> Connection:
        conn = self._conn
        if conn is not None:
            return conn
        self._start()
        assert self._opening is not None
        return await asyncio.shield(self._opening)

    async def call(self, method: str, *args: Any) -> Any:
        conn = await self.connection()
        self._flush_puts()
        self._count(method, args)
        return await conn.call(method, *args)

    async def op(self, name: str, kind: Kind, value: Any) -> Any:
        """Read (``value`` unused) or write ``value``; return the value read or None."""
        conn = self._conn or await self.connection()
        if kind == "write":
            payload = await encode_value(self.codec, value)
            if self.credits.get(name, 0) > 0:  # a promised slot: no need to wait for an answer
                self.credits[name] -= 1
                if conn.closed:
                    raise conn.close_exception or ConnectionClosedError(
                        "the channel server connection closed"
                    )
                self._put(conn, name, payload)
                return None
        else:
            payload = None
        self._flush_puts()
        op_id = next(self._ids)
        call = self._waiting[op_id] = asyncio.ensure_future(conn.call("csp.op", op_id, name, kind, payload))
        try:
            await asyncio.wait((call,))
        except asyncio.CancelledError:
            await self._withdraw(conn, op_id, call)
            self._settle(op_id, name, kind, call)
            raise
        finally:
            self._waiting.pop(op_id, None)
        status, result = call.result()
        if status == WITHDRAWN:
            raise ConnectionClosedOK("the link to the channel server was closed (csp.shutdown)")
        if kind == "write":
            if result:
                self._credit(name, *result)
            return None
        if not conn.closed:
            conn.notify_nowait("csp.took", op_id)
        return self.codec.decode(result)

    async def alt(
        self,
        guards: list[tuple[str, Kind, Any]],
        skip: bool,
        timeout: float | None,
        stop: asyncio.Future[Any] | None = None,
    ) -> tuple[int, Any]:
        """Commit one of ``guards`` (name, kind, value) atomically on the server.

        Returns (index, value read or None); index -1: nothing was ready and
        ``skip``; -2: ``timeout`` passed, or ``stop`` was set, before anything
        committed.
        """
        conn = self._conn or await self.connection()
        self._flush_puts()
        offers: list[list[Any]] = []
        for name, kind, value in guards:
            if kind == "write":
                held = self.credits.pop(name, 0)
                if held:  # the server must see those promised slots as free
                    conn.notify_nowait("csp.uncredit", name, held)
                offers.append([name, kind, await encode_value(self.codec, value)])
            else:
                offers.append([name, kind, None])
        op_id = next(self._ids)
        call = self._waiting[op_id] = asyncio.ensure_future(conn.call("csp.alt", op_id, offers, skip))
        try:
            waiting: set[asyncio.Future[Any]] = {call} if stop is None else {call, stop}
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                await self._withdraw(conn, op_id, call)
        except asyncio.CancelledError:
            await self._withdraw(conn, op_id, call)
            if not call.cancelled() and call.exception() is None:
                index, payload = call.result()
                if index >= 0 and guards[index][1] == "read":
                    self._give(conn, op_id, payload)
            raise
        finally:
            self._waiting.pop(op_id, None)
        index, payload = call.result()
        if index == WITHDRAWN and self._closing:
            raise ConnectionClosedOK("the link to the channel server was closed (csp.shutdown)")
        if index >= 0 and guards[index][1] == "read":
            if not conn.closed:
                conn.notify_nowait("csp.took", op_id)
            return index, self.codec.decode(payload)
        return index, None

    async def watch(self, guards: list[tuple[str, Kind]]) -> None:
        """Return once one of these (channel, kind) operations could complete (or would fail) now."""
        conn = self._conn or await self.connection()
        self._flush_puts()
        await conn.call("csp.watch", [[name, kind] for name, kind in guards])

    async def _withdraw(self, conn: Connection, op_id: int, call: asyncio.Future[Any]) -> None:
        """Take back a waiting operation; wait for its answer (it may have happened meanwhile)."""
        if not call.done() and not conn.closed:
            self._flush_puts()
            conn.notify_nowait("csp.withdraw", op_id)
            conn.flush()
        try:
            await asyncio.wait((call,))
        except asyncio.CancelledError:
            call.cancel()  # cancelled again: give up on the answer
            raise

    def _settle(self, op_id: int, name: str, kind: Kind, call: asyncio.Future[Any]) -> None:
        """A cancelled caller's operation happened anyway: keep credits, give a value back."""
        if call.cancelled() or call.exception() is not None:
            return
        status, result = call.result()
        if status != 0:
            return
        if kind == "write":
            if result:
                self._credit(name, *result)
        elif self._conn is not None:
            self._give(self._conn, op_id, result)

    @staticmethod
    def _give(conn: Connection, op_id: int, payload: bytes) -> None:
        if not conn.closed:
            conn.notify_nowait("csp.giveback", op_id, payload)

    async def aclose(self) -> None:
        """Close: operations still waiting at the server fail with ConnectionClosedOK."""
        self._closing = True
        self._flush_puts()
        conn = self._conn
        if conn is not None and not conn.closed:
            for op_id, call in list(self._waiting.items()):
                if not call.done():
                    conn.notify_nowait("csp.withdraw", op_id)
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
            await asyncio.wait((self._opening,))
        if self._conn is not None:
            await self._conn.close()
        if self._guard is not None:
            await self._guard.aclose()
            self._guard = None


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a failed connect is reported by the operations that wait for it


_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], RemoteLink]] = (
    weakref.WeakKeyDictionary()
)


def link_for(address: tuple[str, int], **options: Any) -> RemoteLink:
    """The running loop's link to the channel server at ``address`` (made on first use)."""
    loop = asyncio.get_running_loop()
    key = (str(address[0]), int(address[1]))
    links = _links.setdefault(loop, {})
    link = links.get(key)
    if link is None or link.broken or (options and options != link.options):
        link = links[key] = RemoteLink(loop, key, options)
    return link


async def shutdown() -> None:
    """Close this loop's links to channel servers and the channel servers running on it.

    PyCSP's ``shutdown()``: call it when the program's channel work is done.
    Ends of networked channels fail afterwards; a new ``Channel(name,
    connect=...)`` connects again.
    """
    loop = asyncio.get_running_loop()
    for link in _links.pop(loop, {}).values():
        await link.aclose()
    for server in list(_servers.get(loop, ())):
        await server.aclose()
    hosted = _hosts.pop(loop, None)
    if hosted is not None:
        await hosted[1].aclose()
