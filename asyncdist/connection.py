"""The one Connection every paradigm uses, and :func:`connect`.

A :class:`Connection` is symmetric: both ends hold a table of named handlers
and either end may call the other. Many calls share the connection at once.

Handlers. A plain function is called on the event loop, inline, and must not
block: paradigms run user code in threads or processes themselves. A
coroutine function (or any handler returning an awaitable) runs as its own
task, which the caller can cancel from its side (a coroutine is started at
once, in its task, as Python 3.12's eager tasks are: one that returns
without waiting is answered with no loop turn); a handler that returns an
:class:`asyncio.Future` (e.g. from ``run_in_executor``) is answered when the
future is done, without a task, and a cancel from the caller cancels it. A handler called through
:meth:`Connection.stream` returns an async iterable (or a plain iterable)
whose items are sent one by one under credit-based flow control.
:func:`current_connection` tells a handler which connection called it.

Guarantees:

* every call ends: with the handler's value, its exception (rebuilt as its
  own type when allowed, else :class:`~asyncdist.errors.RemoteError`, with
  the remote traceback), :class:`TimeoutError` (``timeout=``), or
  :class:`~asyncdist.errors.ConnectionClosed` when the connection ends;
* cancelling an awaiting caller sends CANCEL and cancels the remote task;
  the caller sees either the result or :class:`asyncio.CancelledError`;
* a dead, frozen or half-open peer is detected: if no byte arrives for
  ``heartbeat_timeout`` seconds (PINGs every ``heartbeat_interval`` make the
  peer answer), the connection is closed with ``ConnectionClosedError``;
* back-pressure: callers wait while the transport's write buffer is full;
  this side stops reading when the peer has more than ``max_in_flight``
  requests queued here, so a peer that floods without reading cannot grow
  memory; outgoing calls beyond the peer's ``max_in_flight`` wait for a slot,
  so two well-behaved peers never make each other stop reading.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import socket
import ssl as _ssl
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, replace
from types import CoroutineType
from typing import Any, Final, Generic, TypeVar, cast

from . import protocol as P
from ._log import get_logger
from .codec import Codec, ObjectRef, PicklePolicy
from .errors import (
    AsyncDistError,
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ProtocolError,
    SerializationError,
    TLSError,
    UnknownMethodError,
)
from .frames import DEFAULT_MAX_FRAME_SIZE, PREAUTH_MAX_FRAME_SIZE, FrameDecoder, frame_header
from .security import resolve_secret

__all__ = [
    "Connection",
    "Handler",
    "Options",
    "Stream",
    "connect",
    "current_connection",
    "parse_address",
]

log = get_logger("asyncdist.connection")

Handler = Callable[..., Any]
_T = TypeVar("_T")

# A weak reference, so that a connection and its context do not form a cycle.
_current: contextvars.ContextVar[weakref.ref[Connection]] = contextvars.ContextVar("asyncdist_connection")

_PLAIN_TYPES: Final = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})
_Future: Final = asyncio.Future
_SMALL_FRAME: Final = 64 * 1024
_PREAUTH_SCRATCH: Final = 4096
_SCRATCH: Final = 256 * 1024
# A producer flushes once this much is buffered, so that the transport can push back.
_FLUSH_AT: Final = 256 * 1024
# Pre-auth connections never encode; they share this codec until they open.
_PREAUTH_CODEC: Final = Codec()
_pack_header = frame_header


_current_task: Final = asyncio.current_task


class _Unscheduled:
    """Stands for the loop while an eager task is made: its first step is run by the maker."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def get_debug(self) -> bool:
        return self._loop.get_debug()

    def call_soon(self, *args: Any, **kwargs: Any) -> None:
        return None


if sys.version_info >= (3, 12):

    def _eager_task(
        coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, context: contextvars.Context
    ) -> asyncio.Future[Any]:
        """A task of ``coro`` whose first step has run (asyncio's eager start)."""
        return asyncio.Task(coro, loop=loop, context=context, eager_start=True)

else:
    _PyTask: Any = asyncio.tasks._PyTask  # type: ignore[attr-defined]

    class _EagerTask(_PyTask):  # type: ignore[misc]
        """asyncio's Python task, started at once, as Python 3.12's ``eager_start=True`` does."""

        def __init__(
            self,
            coro: Coroutine[Any, Any, Any],
            loop: asyncio.AbstractEventLoop,
            context: contextvars.Context,
        ) -> None:
            super().__init__(coro, loop=_Unscheduled(loop), context=context)  # first step not scheduled
            self._loop = loop
            # The first step, now, in the task's context: current_task() is this task meanwhile.
            context.run(self._Task__step)

    def _eager_task(
        coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, context: contextvars.Context
    ) -> asyncio.Future[Any]:
        """A task of ``coro`` whose first step has run (asyncio's eager start)."""
        task: asyncio.Future[Any] = _EagerTask(coro, loop, context)
        return task


def current_connection() -> Connection:
    """Return the connection whose handler is running; raise LookupError outside one."""
    conn = _current.get()()
    if conn is None:
        raise LookupError("the connection of this handler is gone")
    return conn


@dataclass(frozen=True, slots=True)
class Options:
    """Limits and timers of a connection (defaults suit a LAN; tests shrink them)."""

    #: Largest frame body accepted after the handshake (bytes).
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Requests of the peer handled at once before reading pauses; also announced to the peer.
    max_in_flight: int = 1024
    #: Seconds for TCP/TLS connect plus the authentication handshake.
    handshake_timeout: float = 10.0
    #: Seconds between PINGs.
    heartbeat_interval: float = 2.0
    #: Seconds without any byte from the peer after which it is declared dead.
    heartbeat_timeout: float = 10.0
    #: Seconds a graceful close waits for calls in progress before it closes anyway.
    close_timeout: float = 5.0
    #: What to do with pickled payloads received (only ever on authenticated connections).
    accept_pickle: PicklePolicy = "refuse"
    #: Items a stream's producer may send ahead of the consumer.
    stream_credit: int = 64
    #: Delay before closing after a failed authentication (slows guessing).
    auth_failure_delay: float = 0.1
    #: Inside a frame, at least this many bytes must arrive per heartbeat_timeout.
    min_frame_progress: int = 4096

    def __post_init__(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        if self.max_in_flight < 1 or self.stream_credit < 1:
            raise ValueError("max_in_flight and stream_credit must be positive")
        if self.max_frame_size < PREAUTH_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {PREAUTH_MAX_FRAME_SIZE}")


def parse_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:port"`` for IPv6) into ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        if default_port is None:
            raise ValueError(f"address {address!r} needs a port: HOST:PORT")
        host, port = address, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in address {address!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in address {address!r}")
    return host, number


_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)


@dataclass
class _Stats:
    calls_sent: int = 0
    calls_received: int = 0
    notifies_received: int = 0
    late_replies: int = 0
    bytes_received: int = 0


class _Producer:
    __slots__ = ("credit", "waiter")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.waiter: asyncio.Future[None] | None = None


class Connection(asyncio.BufferedProtocol):
    """One authenticated, multiplexed, symmetric connection.

    Made by :func:`connect` or by a server; not instantiated directly. The
    asyncio protocol methods (``connection_made``, ``get_buffer``, ...) are
    internal.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        secret: bytes | None,
        handlers: Mapping[str, Handler] | None = None,
        options: Options | None = None,
        on_open: Callable[[Connection], None] | None = None,
        on_lost: Callable[[Connection], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.options = options or Options()
        self.is_initiator = initiator
        self._secret = secret
        #: Handlers by name; a mapping looked up with ``.get(name)`` on every call.
        self.handlers: Mapping[str, Handler] = handlers if handlers is not None else {}
        self._on_open = on_open
        self._on_lost = on_lost
        o = self.options
        hs_cls = P.InitiatorHandshake if initiator else P.AcceptorHandshake
        self._handshake: P.InitiatorHandshake | P.AcceptorHandshake | None = hs_cls(
            secret,
            pickle=o.accept_pickle,
            max_in_flight=o.max_in_flight,
            max_frame=o.max_frame_size,
        )
        # Small buffers until the peer is authenticated: a flood of silent connections is cheap.
        self._decoder = FrameDecoder(PREAUTH_MAX_FRAME_SIZE, scratch_size=_PREAUTH_SCRATCH)
        self._decoder.batch = 1
        self._codec = _PREAUTH_CODEC  # replaced by this connection's own codec once open
        self._transport: asyncio.Transport | None = None
        self._state = _HANDSHAKE
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._close_exc: ConnectionClosed | None = None
        self._close_cause: BaseException | None = None
        self._close_callbacks: list[Callable[[Connection], None]] = []
        self.peer: P.PeerInfo | None = None
        self.authenticated = False
        self.remote_address: Any = None
        self.local_address: Any = None
        self.stats = _Stats()

        self._context = contextvars.copy_context()
        self._context.run(_current.set, weakref.ref(self))

        self._ids = P.CallIds()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # Weak: a stream its consumer dropped (``break`` out of ``async for``) is cancelled.
        self._streams: weakref.WeakValueDictionary[int, Stream[Any]] = weakref.WeakValueDictionary()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._peer_limit = 1
        self._peer_max_frame = PREAUTH_MAX_FRAME_SIZE

        self._incoming = self._ids.incoming
        self._call_tasks: dict[int, asyncio.Future[Any]] = {}
        self._producers: dict[int, _Producer] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._peer_cancelled: set[int] = set()
        self._backlog: deque[list[Any]] = deque()

        self._wbuf: list[bytes | memoryview] = []
        self._wbuf_bytes = 0
        self._wbuf_large = False
        self._flush_pending = False
        self._in_receive = False
        self._write_paused = False
        self._drain_waiters: deque[asyncio.Future[None]] = deque()
        self._reading_paused = False
        # True while a graceful close waits for calls in progress (see close()).
        self._draining = False

        self._last_recv = self._loop.time()
        self._progress_mark: tuple[float, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        #: Round-trip time of the last PING, in seconds (None before the first PONG).
        self.rtt: float | None = None
        self._quickack: Callable[[], None] | None = None
        self._ref_hooks: tuple[
            Callable[[Any], ObjectRef | None] | None, Callable[[ObjectRef], Any] | None
        ] = (
            None,
            None,
        )

    # -- public API --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed."""
        return self._state >= _CLOSING

    @property
    def close_exception(self) -> ConnectionClosed | None:
        """Why the connection closed (None while open); its ``__cause__`` is the reason."""
        return self._close_exc

    def register(self, name: str, handler: Handler) -> None:
        """Add a handler (the handler table must be a mutable mapping)."""
        if not isinstance(self.handlers, dict):
            self.handlers = dict(self.handlers)
        self.handlers[name] = handler

    def add_close_callback(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback(connection)`` once when the connection is closed (at once if it is)."""
        if self._state == _CLOSED:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def set_ref_hooks(
        self,
        encode: Callable[[Any], ObjectRef | None] | None,
        decode: Callable[[ObjectRef], Any] | None,
    ) -> None:
        """Send some values by reference on this connection (see :class:`~asyncdist.codec.Codec`).

        ``encode`` gets each value the codec cannot carry and returns an
        :class:`ObjectRef` for it, or None; ``decode`` maps each received
        :class:`ObjectRef` to the value handlers and callers see. Set them
        before the peer may send references (in a server's handler factory,
        or right after :func:`connect`).
        """
        self._ref_hooks = (encode, decode)
        if self._codec is not _PREAUTH_CODEC:  # open: else _open() installs them
            self._codec.ref_encoder = encode
            self._codec.ref_decoder = decode

    async def call(self, name: str, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call the peer's handler ``name`` and return its result.

        ``timeout`` (seconds) bounds the whole call and raises
        :class:`TimeoutError`; the remote handler is then cancelled. To pass
        a remote keyword argument named ``timeout``, use :meth:`request`.
        """
        return await self.request(name, args, kwargs, timeout=timeout)

    async def request(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`call`, with the arguments given as a sequence and a mapping."""
        if self._state != _OPEN and not (self._draining and self._in_own_handler()):
            raise self._refusal()
        if len(self._pending) + len(self._streams) >= self._peer_limit:
            await self._wait_slot()
        if self._write_paused:
            await self._drain()
        call_id = self._ids.allocate()
        fut = self._loop.create_future()
        self._pending[call_id] = fut
        try:
            if kwargs:
                self._send([P.CALL, call_id, name, list(args), dict(kwargs)])
            else:
                self._send([P.CALL, call_id, name, list(args)])
        except BaseException:
            del self._pending[call_id]
            self._release_slot()
            raise
        self.stats.calls_sent += 1
        if len(self._pending) == 1 and not self._in_receive:
            self._flush()  # a lone call leaves now, not one loop iteration later
        try:
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except (asyncio.CancelledError, TimeoutError):
            # Cancelled here or timed out (a TimeoutError raised remotely finds nothing pending).
            if self._pending.pop(call_id, None) is not None:
                self._release_slot()
                if self._state == _OPEN or self._draining:
                    self._send([P.CANCEL, call_id])
            raise

    async def notify(self, name: str, /, *args: Any, **kwargs: Any) -> None:
        """Call the peer's handler ``name`` one-way: nothing is returned or waited for.

        Returns once the message is queued for sending (waiting if the
        transport's write buffer is full). Errors of the handler are logged
        by the peer, not reported.
        """
        if self._state != _OPEN:
            raise self._refusal()
        if self._write_paused:
            await self._drain()
        self.notify_nowait(name, *args, **kwargs)
        if self._wbuf_bytes >= _FLUSH_AT and not self._in_receive:
            self._flush()  # a loop of notifications meets the transport's back-pressure here
            if self._write_paused:
                await self._drain()

    def flush(self) -> None:
        """Write the frames queued so far now, instead of at the end of this loop iteration.

        For callers that batch their own messages per iteration (the futures
        broker and workers): it spares one loop iteration of latency.
        """
        if self._flush_pending and not self._in_receive:
            self._flush()

    def notify_nowait(self, name: str, /, *args: Any, **kwargs: Any) -> None:
        """Like :meth:`notify`, without waiting for room in the write buffer.

        For callers that bound what they send by other means (the message is
        queued even while the transport pushes back).
        """
        if self._state != _OPEN:
            raise self._refusal()
        if kwargs:
            self._send([P.NOTIFY, name, list(args), kwargs])
        else:
            self._send([P.NOTIFY, name, list(args)])

    def stream(self, name: str, /, *args: Any, credit: int | None = None, **kwargs: Any) -> Stream[Any]:
        """Call ``name`` on the peer and iterate over the items its handler produces.

        Use ``async for item in conn.stream(...)``, or ``async with`` to stop
        early cleanly. The producer sends at most ``credit`` (default
        ``options.stream_credit``) items ahead of this consumer. Leaving the
        loop early cancels the remote producer.
        """
        return Stream(self, name, args, kwargs, credit or self.options.stream_credit)

    async def close(self, reason: str = "") -> None:
        """Close gracefully: wait (up to ``close_timeout``) for calls in progress, then CLOSE.

        New calls are refused at once, except what calls in progress may
        need: while this side waits for its calls, the peer may still call
        it (a callback), and a handler still running may still call the peer.
        Idempotent; returns when the connection is closed and its tasks are done.
        """
        if self._state == _HANDSHAKE:
            self.abort()
        elif self._state == _OPEN:
            self._state = _CLOSING
            self._set_close(ConnectionClosedOK("connection closed" + (f": {reason}" if reason else "")))
            try:
                self._refuse_backlog()
                for st in list(self._streams.values()):
                    await st.aclose()
                    st._fail(self._refusal())
                waitables: list[asyncio.Future[Any]] = [
                    *self._pending.values(),
                    *self._call_tasks.values(),
                ]
                if waitables:
                    # Calls in progress may need the other direction to finish (a callback into
                    # this side, or one its handler makes): that much still flows meanwhile.
                    self._draining = True
                    await asyncio.wait(waitables, timeout=self.options.close_timeout)
            except BaseException:
                self.abort()
                raise
            finally:
                self._draining = False
            self._shutdown(reason)
        await self.wait_closed()

    def abort(self, cause: BaseException | None = None) -> None:
        """Close at once: pending calls fail with ConnectionClosedError, tasks are cancelled."""
        if self._state == _CLOSED:
            return
        self._set_close(ConnectionClosedError("connection aborted"), cause)
        self._state = max(self._state, _CLOSING)
        if self._transport is not None:
            self._transport.abort()
        else:
            self._finalize()

    async def aclose(self) -> None:
        """Same as :meth:`close` with no reason."""
        await self.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and every task it started is done."""
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = ("handshake", "open", "closing", "closed")[self._state]
        return f"<Connection {state} peer={self.remote_address!r}>"

    # -- sending -----------------------------------------------------------------------

    def _send(self, msg: list[Any]) -> None:
        parts = self._codec.encode_parts(msg)
        if parts is None:
            body = self._codec.encode(msg)
            n = len(body)
            self._check_size(n)
            if n < _SMALL_FRAME:
                self._wbuf.append(_pack_header(n) + body)
            else:
                self._wbuf.append(_pack_header(n))
                self._wbuf.append(body)
            self._wbuf_bytes += n
        else:
            # Large bytes values go out by reference: no copy of them is made here.
            n = sum(len(p) for p in parts)
            self._check_size(n)
            # The header, the msgpack around the payload and the payload's first 64 KiB go out
            # in one write, so that no tiny segment precedes the bulk of it.
            head = [_pack_header(n)]
            rest: list[bytes | memoryview] = []
            for part in parts:
                if rest or len(part) > _SMALL_FRAME:
                    if not rest:
                        head.append(bytes(part[:_SMALL_FRAME]))
                        part = part[_SMALL_FRAME:]
                    rest.append(part)
                else:
                    head.append(bytes(part))
            self._wbuf.append(b"".join(head))
            self._wbuf.extend(rest)
            self._wbuf_bytes += n
            self._wbuf_large = True
        if not self._flush_pending:
            self._flush_pending = True
            if not self._in_receive:
                self._loop.call_soon(self._flush)

    def _check_size(self, n: int) -> None:
        if n > self._peer_max_frame:
            raise SerializationError(
                f"message of {n} bytes is larger than the peer's frame limit ({self._peer_max_frame})"
            )

    def _send_raw(self, body: bytes) -> None:
        self._wbuf.append(_pack_header(len(body)) + body)
        self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        buf = self._wbuf
        if not buf:
            return
        self._wbuf = []
        self._wbuf_bytes = 0
        large, self._wbuf_large = self._wbuf_large, False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if len(buf) == 1:
            transport.write(buf[0])
        elif large:
            # Both loops' writelines() copy their buffers together (measured): write each
            # part, so a large payload goes to the socket straight from the caller's object.
            for part in buf:
                transport.write(part)
        else:
            transport.writelines(buf)

    async def _drain(self) -> None:
        while self._write_paused and self._state <= _CLOSING and self._transport is not None:
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut
        if self._state == _CLOSED:
            raise self._refusal()

    async def _wait_slot(self) -> None:
        while len(self._pending) + len(self._streams) >= self._peer_limit:
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release_slot()  # pass the wake-up on
                raise
            if self._state != _OPEN:
                raise self._refusal()

    def _abandon_stream(self, call_id: int) -> None:
        # The consumer dropped an unfinished stream without closing it.
        self._release_slot()
        if self._state == _OPEN:
            self._send([P.CANCEL, call_id])

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _in_own_handler(self) -> bool:
        ref = _current.get(None)
        return ref is not None and ref() is self

    def _refusal(self) -> ConnectionClosed:
        exc = self._close_exc
        if exc is None:
            if self._state == _HANDSHAKE:
                return ConnectionClosedError("connection is not open yet")
            return ConnectionClosedOK("connection is closing")
        new = type(exc)(*exc.args)
        new.__cause__ = exc.__cause__
        return new

    # -- asyncio protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self._transport = t
        sock = t.get_extra_info("socket")
        self._quickack = None
        if (
            sock is not None
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and hasattr(socket, "TCP_QUICKACK")
        ):
            self._quickack = functools.partial(sock.setsockopt, socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self.remote_address = transport.get_extra_info("peername")
        self.local_address = transport.get_extra_info("sockname")
        self._timer = self._loop.call_later(self.options.handshake_timeout, self._handshake_expired)
        if not self.is_initiator:
            assert isinstance(self._handshake, P.AcceptorHandshake)
            self._send_raw(self._handshake.hello())

    def tls_failed(self, error: AsyncDistError) -> None:
        """Internal: the server's TLS handshake for this connection failed (never made)."""
        _auth_log.warning("TLS handshake from %s failed: %s", self.remote_address, error)
        self._set_close(ConnectionClosedError("TLS handshake failed"), error)
        self._finalize()

    def get_buffer(self, sizehint: int) -> memoryview:
        decoder = self._decoder
        if self._quickack is not None and decoder._body is not None:
            self._quickack()
        return decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._last_recv = self._loop.time()
        self.stats.bytes_received += nbytes
        try:
            frames = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if not frames:
            return
        self._in_receive = True
        try:
            self._receive(frames)
            self._decoder.check()
        except ProtocolError as exc:
            self._protocol_error(exc)
        except AuthenticationError as exc:
            self._auth_failed(exc)
        finally:
            self._in_receive = False
            if self._flush_pending:
                self._flush()

    def _receive(self, frames: list[memoryview]) -> None:
        decode = self._codec.decode
        handle = self._on_message
        while frames:
            if self._state == _HANDSHAKE:
                self._on_handshake(frames[0])
                if self._state != _OPEN:
                    return
                frames = self._decoder.more()
                continue
            for body in frames:
                if self._state >= _CLOSED or self._transport is None:
                    return
                try:
                    msg = P.validate(decode(body))
                except P.BadRequest as exc:
                    self._send_error(exc.call_id, ProtocolError(f"bad request: {exc}"))
                    continue
                handle(msg)
            return

    def eof_received(self) -> bool | None:
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            self._set_close(ConnectionClosedError("connection ended inside a frame"), exc)
            return None
        if self._state == _HANDSHAKE:
            self._set_close(
                ConnectionClosedError("peer closed the connection during the handshake"),
            )
        else:
            self._set_close(ConnectionClosedError("peer closed the connection without CLOSE"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            # Its traceback would keep the I/O frames, and their buffers, alive.
            exc = exc.with_traceback(None)
            if isinstance(exc, _ssl.SSLError):
                exc = TLSError(f"TLS failure: {exc}")
            self._set_close(ConnectionClosedError(f"connection lost: {exc}"), exc)
        else:
            self._set_close(ConnectionClosedError("connection lost"))
        self._finalize()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters = self._drain_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        if self._backlog:
            self._run_backlog()

    # -- handshake ---------------------------------------------------------------------

    def _on_handshake(self, body: memoryview) -> None:
        hs = self._handshake
        if isinstance(hs, P.AcceptorHandshake):
            reply, peer = hs.receive_auth(body)
            self._send_raw(reply)
            self._open(peer)
        elif isinstance(hs, P.InitiatorHandshake):
            if not hs.hello_seen:
                self._send_raw(hs.receive_hello(body))
            else:
                self._open(hs.receive_ok(body))

    def _open(self, peer: P.PeerInfo) -> None:
        self._handshake = None
        self.peer = peer
        tls_verified = False
        transport = self._transport
        if transport is not None:
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is not None:
                tls_verified = bool(sslobj.getpeercert())
        self.authenticated = peer.authenticated or tls_verified
        self._peer_limit = peer.max_in_flight
        self._peer_max_frame = peer.max_frame
        self._codec = Codec(
            accept_pickle=self.options.accept_pickle if self.authenticated else "refuse",
            send_pickle=self.authenticated and peer.pickle != "refuse",
        )
        self._codec.ref_encoder, self._codec.ref_decoder = self._ref_hooks
        self._decoder.resize_scratch(_SCRATCH)
        self._decoder.max_frame_size = self.options.max_frame_size
        self._decoder.batch = 0
        self._state = _OPEN
        if self._timer is not None:
            self._timer.cancel()
        self._last_recv = self._loop.time()
        self._timer = self._loop.call_later(self.options.heartbeat_interval, self._tick)
        if self._on_open is not None:
            self._on_open(self)
        if not self._opened.done():
            self._opened.set_result(None)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            exc = ProtocolError(
                f"no complete handshake within {self.options.handshake_timeout:g} s "
                "(is one side using TLS and the other not?)"
            )
            self._set_close(ConnectionClosedError("handshake timed out"), exc)
            self._fail_open(exc)
            if self._transport is not None:
                self._transport.abort()

    def _auth_failed(self, exc: AuthenticationError) -> None:
        _auth_log.warning("authentication failed from %s: %s", self.remote_address, exc)
        self._set_close(ConnectionClosedError("authentication failed"), exc)
        self._fail_open(exc)
        transport = self._transport
        if transport is None:
            return
        if not self.is_initiator:
            # A generic refusal, a short fixed delay, then close.
            self._send_raw(P.AcceptorHandshake.failure())
            transport.pause_reading()
            self._reading_paused = True
            self._state = _CLOSING
            self._loop.call_later(self.options.auth_failure_delay, transport.close)
        else:
            transport.abort()

    def _fail_open(self, exc: BaseException) -> None:
        if not self._opened.done():
            self._opened.set_exception(exc)
            self._opened.exception()  # mark retrieved; connect() re-raises it

    # -- errors and closing ------------------------------------------------------------

    def _protocol_error(self, exc: ProtocolError) -> None:
        if self._state < _CLOSED:
            log.warning("protocol error from %s: %s", self.remote_address, exc)
        self._set_close(ConnectionClosedError(f"protocol error: {exc}"), exc)
        self._fail_open(exc)
        if self._transport is not None:
            self._transport.abort()

    def _set_close(self, exc: ConnectionClosed, cause: BaseException | None = None) -> None:
        if self._close_exc is None:
            exc.__cause__ = cause
            self._close_exc = exc
            self._close_cause = cause
        if self._state < _CLOSING:
            self._state = _CLOSING

    def _shutdown(self, reason: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            self._send([P.CLOSE, reason[: P.MAX_REASON]])
        except SerializationError:
            pass
        self._flush()
        transport.close()
        self._timer_cancel()
        self._timer = self._loop.call_later(self.options.close_timeout, transport.abort)

    def _refuse_backlog(self) -> None:
        backlog, self._backlog = self._backlog, deque()
        for msg in backlog:
            if msg[0] == P.CALL:
                self._incoming.discard(msg[1])
                self._send_error(msg[1], ConnectionClosedOK("connection is closing"))

    def _timer_cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finalize(self) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._timer_cancel()
        self._transport = None
        self._wbuf = []
        self._wbuf_bytes = 0
        self._decoder.release()  # a partial frame is discarded, never delivered
        self._fail_open(self._close_cause or self._refusal())
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._refusal())
        streams = list(self._streams.values())
        self._streams = weakref.WeakValueDictionary()
        for st in streams:
            st._fail(self._refusal())
        for fut in list(self._slot_waiters) + list(self._drain_waiters):
            if not fut.done():
                fut.set_result(None)
        self._slot_waiters.clear()
        self._drain_waiters.clear()
        self._backlog.clear()
        for task in list(self._tasks):
            task.cancel()
        for cb in self._close_callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("close callback %r failed", cb)
        self._close_callbacks.clear()
        if self._on_lost is not None:
            self._on_lost(self)
        if not self._tasks and not self._closed.done():
            self._closed.set_result(None)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if self._state == _CLOSED:
            if not self._tasks and not self._closed.done():
                self._closed.set_result(None)
        elif self._backlog:
            self._run_backlog()

    # -- heartbeat ---------------------------------------------------------------------

    def _tick(self) -> None:
        self._timer = None
        if self._state != _OPEN:
            return
        o = self.options
        now = self._loop.time()
        if self._reading_paused:
            self._last_recv = now
            self._progress_mark = None
        elif now - self._last_recv > o.heartbeat_timeout:
            self.abort(ConnectionClosedError(f"no data from the peer for {o.heartbeat_timeout:g} s"))
            return
        elif self._decoder.in_frame:
            mark = self._progress_mark
            received = self.stats.bytes_received
            if mark is None or received - mark[1] >= o.min_frame_progress:
                self._progress_mark = (now, received)
            elif now - mark[0] > o.heartbeat_timeout:
                self._protocol_error(ProtocolError("frame stalled: the peer sends too slowly"))
                return
        else:
            self._progress_mark = None
        self._ping_sent_at = now
        self._send([P.PING, os.urandom(8)])
        self._timer = self._loop.call_later(o.heartbeat_interval, self._tick)

    # -- receiving ---------------------------------------------------------------------

    def _on_message(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == P.REPLY:
            fut = self._pending.pop(msg[1], None)
            if fut is None:
                self._late(msg[1])
                return
            self._release_slot()
            if not fut.done():
                fut.set_result(msg[2])
        elif kind == P.CALL:
            self._on_call(msg)
        elif kind == P.ERROR:
            fut = self._pending.pop(msg[1], None)
            if fut is not None:
                self._release_slot()
                if not fut.done():
                    fut.set_exception(msg[2])
                return
            st = self._streams.pop(msg[1], None)
            if st is not None:
                self._release_slot()
                st._fail(msg[2])
                return
            self._late(msg[1])
        elif kind == P.ITEM:
            st = self._streams.get(msg[1])
            if st is None:
                self._late(msg[1])
                return
            st._push(msg[2])
        elif kind == P.END:
            st = self._streams.pop(msg[1], None)
            if st is None:
                self._late(msg[1])
                return
            self._release_slot()
            st._end()
        elif kind == P.CREDIT:
            prod = self._producers.get(msg[1])
            if prod is not None:
                prod.credit += msg[2]
                if prod.waiter is not None and not prod.waiter.done():
                    prod.waiter.set_result(None)
        elif kind == P.CANCEL:
            self._on_cancel(msg[1])
        elif kind == P.NOTIFY:
            self._on_notify(msg)
        elif kind == P.PING:
            self._send([P.PONG, msg[1]])
        elif kind == P.PONG:
            if self._ping_sent_at is not None:
                self.rtt = self._loop.time() - self._ping_sent_at
        elif kind == P.CLOSE:
            self._on_close_message(msg[1])

    def _late(self, call_id: int) -> None:
        if not self._ids.issued(call_id):
            raise ProtocolError(f"answer for call id {call_id}, which was never issued")
        if call_id in self._pending:
            raise ProtocolError(f"stream message for call {call_id}, which is not a stream")
        if call_id in self._streams:
            raise ProtocolError(f"plain reply for call {call_id}, which is a stream")
        # Legitimate after a cancel or timeout: the answer crossed our CANCEL.
        self.stats.late_replies += 1

    def _on_close_message(self, reason: str) -> None:
        self._set_close(ConnectionClosedOK("closed by peer" + (f": {reason}" if reason else "")))
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._flush()
            transport.close()
            self._timer_cancel()
            self._timer = self._loop.call_later(self.options.close_timeout, transport.abort)

    def _on_cancel(self, call_id: int) -> None:
        task = self._call_tasks.get(call_id)
        if task is not None:
            self._peer_cancelled.add(call_id)
            task.cancel()
            return
        if call_id in self._incoming:
            for i, queued in enumerate(self._backlog):
                if queued[0] == P.CALL and queued[1] == call_id:
                    del self._backlog[i]
                    self._incoming.discard(call_id)
                    break

    def _on_call(self, msg: list[Any]) -> None:
        call_id = msg[1]
        if call_id in self._incoming:
            self._ids.begin_incoming(call_id)  # raises: a duplicate of a call in progress
        self.stats.calls_received += 1
        if self._state != _OPEN and not (self._draining and self._pending):
            self._send([P.ERROR, call_id, ConnectionClosedOK("connection is closing")])
            return
        if self._backlog or self._write_paused or len(self._tasks) >= self.options.max_in_flight:
            self._queue(msg)
            return
        self._dispatch_call(msg)

    def _on_notify(self, msg: list[Any]) -> None:
        self.stats.notifies_received += 1
        if self._state != _OPEN:
            return
        if self._backlog or len(self._tasks) >= self.options.max_in_flight:
            self._queue(msg)
            return
        self._dispatch_notify(msg)

    def _queue(self, msg: list[Any]) -> None:
        if msg[0] == P.CALL:
            self._incoming.add(msg[1])
        self._backlog.append(msg)
        if len(self._backlog) > self.options.max_in_flight and not self._reading_paused:
            # More requests than a well-behaved peer may have outstanding: stop reading.
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def _run_backlog(self) -> None:
        limit = self.options.max_in_flight
        backlog = self._backlog
        while backlog and self._state == _OPEN:
            msg = backlog[0]
            if len(self._tasks) >= limit or (msg[0] == P.CALL and self._write_paused):
                break
            backlog.popleft()
            if msg[0] == P.CALL:
                self._incoming.discard(msg[1])
                self._dispatch_call(msg)
            else:
                self._dispatch_notify(msg)
        if self._reading_paused and len(backlog) <= limit // 2 and self._transport is not None:
            self._reading_paused = False
            self._last_recv = self._loop.time()
            self._transport.resume_reading()
        if self._flush_pending and not self._in_receive:
            self._flush()

    def _dispatch_call(self, msg: list[Any]) -> None:
        call_id = msg[1]
        name = msg[2]
        credit = msg[5] if len(msg) > 5 else 0
        handler = self.handlers.get(name)
        if handler is None:
            self._send_error(call_id, UnknownMethodError(f"no handler named {name!r}"))
            return
        try:
            if len(msg) > 4 and msg[4]:
                result = self._context.run(handler, *msg[3], **msg[4])
            else:
                result = self._context.run(handler, *msg[3])
        except Exception as exc:
            self._send_error(call_id, exc)
            return
        rt = type(result)
        if credit:
            if hasattr(result, "__aiter__") or (hasattr(result, "__iter__") and rt not in _PLAIN_TYPES):
                self._start_task(call_id, self._produce(call_id, result, credit), result)
            else:
                self._close_awaitable(result)
                self._send_error(call_id, TypeError(f"handler {name!r} did not return an iterable to stream"))
            return
        if rt is _Future:
            self._start_future(call_id, result)
        elif rt is CoroutineType and _current_task(self._loop) is None:
            # Run it here up to its first suspension, in a task of its own: a coroutine that
            # returns without waiting is answered now, with no task scheduled and no loop turn.
            task = _eager_task(result, self._loop, self._context.copy())
            if task.done():
                self._future_done(call_id, task)
            else:
                self._start_future(call_id, task)
        elif rt is CoroutineType or (rt not in _PLAIN_TYPES and inspect.isawaitable(result)):
            self._start_task(call_id, self._await_result(call_id, result), result)
        elif rt not in _PLAIN_TYPES and inspect.isasyncgen(result):
            self._send_error(call_id, TypeError(f"handler {name!r} returns a stream: call it with stream()"))
        else:
            self._reply(call_id, result)

    def _dispatch_notify(self, msg: list[Any]) -> None:
        name = msg[1]
        handler = self.handlers.get(name)
        if handler is None:
            log.warning("notification for unknown handler %r from %s", name, self.remote_address)
            return
        try:
            if len(msg) > 3 and msg[3]:
                result = self._context.run(handler, *msg[2], **msg[3])
            else:
                result = self._context.run(handler, *msg[2])
        except Exception:
            log.exception("notification handler %r failed", name)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._await_notify(name, result), context=self._context.copy())
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    @staticmethod
    def _close_awaitable(result: Any) -> None:
        if inspect.iscoroutine(result):
            result.close()

    def _start_task(self, call_id: int, coro: Coroutine[Any, Any, None], inner: Any) -> None:
        task = self._loop.create_task(coro, context=self._context.copy())
        self._incoming.add(call_id)
        self._call_tasks[call_id] = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._call_done, call_id, inner))

    def _start_future(self, call_id: int, fut: asyncio.Future[Any]) -> None:
        # A future (e.g. from run_in_executor) replies when it is done, without a task.
        self._incoming.add(call_id)
        self._call_tasks[call_id] = fut
        self._tasks.add(fut)
        fut.add_done_callback(functools.partial(self._future_done, call_id))

    def _future_done(self, call_id: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            if call_id not in self._peer_cancelled and self._state == _OPEN:
                self._send_error(call_id, asyncio.CancelledError("the handler was cancelled"))
        else:
            exc = fut.exception()
            if exc is not None:
                self._send_error(call_id, exc)
            else:
                self._reply(call_id, fut.result())
        self._flush_if_alone()
        self._end_call(call_id)
        self._task_done(fut)

    def _call_done(self, call_id: int, inner: Any, task: asyncio.Task[None]) -> None:
        # A task cancelled before it ever ran never entered its coroutine: close what it wraps.
        if task.cancelled():
            self._close_awaitable(inner)
        self._end_call(call_id)
        self._task_done(task)

    def _end_call(self, call_id: int) -> None:
        self._incoming.discard(call_id)
        self._call_tasks.pop(call_id, None)
        self._peer_cancelled.discard(call_id)

    async def _await_notify(self, name: str, aw: Awaitable[Any]) -> None:
        try:
            await aw
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notification handler %r failed", name)

    async def _await_result(self, call_id: int, aw: Awaitable[Any]) -> None:
        try:
            result = await aw
        except asyncio.CancelledError:
            if call_id not in self._peer_cancelled and self._state == _OPEN:
                self._send_error(call_id, asyncio.CancelledError("the handler was cancelled"))
            return
        except Exception as exc:
            self._send_error(call_id, exc)
        else:
            self._reply(call_id, result)
        self._flush_if_alone()

    def _flush_if_alone(self) -> None:
        # The only call in progress answered: send now rather than one loop iteration later
        # (with others in progress, their answers share the write at the end of the iteration).
        if len(self._call_tasks) == 1 and self._flush_pending and not self._in_receive:
            self._flush()

    def _reply(self, call_id: int, result: Any) -> None:
        if self._state >= _CLOSED:
            return
        try:
            self._send([P.REPLY, call_id, result])
        except SerializationError as exc:
            self._send_error(call_id, exc)

    def _send_error(self, call_id: int, exc: BaseException) -> None:
        if self._state >= _CLOSED:
            return
        try:
            self._send([P.ERROR, call_id, exc])
        except SerializationError as err:
            self._send([P.ERROR, call_id, err])

    async def _produce(self, call_id: int, source: Any, credit: int) -> None:
        producer = _Producer(credit)
        self._producers[call_id] = producer
        iterator: Any = None
        try:
            if hasattr(source, "__aiter__"):
                iterator = source.__aiter__()
                while True:
                    try:
                        item = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    await self._send_item(call_id, producer, item)
            else:
                iterator = iter(source)
                for count, item in enumerate(iterator, 1):
                    await self._send_item(call_id, producer, item)
                    if count % 64 == 0:
                        await asyncio.sleep(0)  # a plain iterator never yields on its own
            self._send([P.END, call_id])
        except asyncio.CancelledError:
            if call_id not in self._peer_cancelled and self._state == _OPEN:
                self._send_error(call_id, asyncio.CancelledError("the stream was cancelled"))
        except Exception as exc:
            self._send_error(call_id, exc)
        finally:
            self._producers.pop(call_id, None)
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:
                    log.exception("closing stream %d failed", call_id)
            elif hasattr(iterator, "close"):
                iterator.close()

    async def _send_item(self, call_id: int, producer: _Producer, item: Any) -> None:
        while producer.credit <= 0:
            producer.waiter = self._loop.create_future()
            await producer.waiter
            producer.waiter = None
        producer.credit -= 1
        self._send([P.ITEM, call_id, item])
        if self._wbuf_bytes >= _FLUSH_AT:
            self._flush()  # lets the transport call pause_writing() now
        if self._write_paused:
            await self._drain()


_auth_log = get_logger("asyncdist.security")


class Stream(Generic[_T]):
    """The items of a streaming call, as an async iterator (see :meth:`Connection.stream`)."""

    def __init__(
        self,
        conn: Connection,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        credit: int,
    ) -> None:
        self._conn = conn
        self._name = name
        self._args = args
        self._kwargs = kwargs
        self._window = credit
        self._outstanding = credit
        self._consumed = 0
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None
        self._id: int | None = None
        self._finished = False

    async def _start(self) -> None:
        conn = self._conn
        if conn._state != _OPEN:
            raise conn._refusal()
        if len(conn._pending) + len(conn._streams) >= conn._peer_limit:
            await conn._wait_slot()
        if conn._write_paused:
            await conn._drain()
        call_id = conn._ids.allocate()
        self._id = call_id
        conn._streams[call_id] = self
        try:
            conn._send([P.CALL, call_id, self._name, list(self._args), self._kwargs, self._window])
        except BaseException:
            del conn._streams[call_id]
            conn._release_slot()
            self._finished = True
            raise
        conn.stats.calls_sent += 1

    def _push(self, item: Any) -> None:
        self._outstanding -= 1
        if self._outstanding < 0:
            raise ProtocolError(f"stream {self._id}: more items than credit granted")
        self._items.append(item)
        self._wake()

    def _end(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._done = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> Stream[_T]:
        return self

    async def __anext__(self) -> _T:
        if self._id is None and not self._finished:
            await self._start()
        while True:
            if self._items:
                item = self._items.popleft()
                self._consumed += 1
                if self._consumed * 2 >= self._window and not self._done:
                    conn = self._conn
                    if conn._state == _OPEN:
                        conn._send([P.CREDIT, self._id, self._consumed])
                    self._outstanding += self._consumed
                    self._consumed = 0
                return item  # type: ignore[no-any-return]
            if self._done:
                self._finished = True
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                raise StopAsyncIteration
            self._waiter = self._conn._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                await self.aclose()
                raise
            finally:
                self._waiter = None

    def __del__(self) -> None:
        if self._id is not None and not self._finished:
            try:
                self._conn._loop.call_soon_threadsafe(self._conn._abandon_stream, self._id)
            except RuntimeError:  # the loop is closed: so is the connection
                pass

    async def aclose(self) -> None:
        """Stop the stream early: the remote producer is cancelled. Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._done = True
        call_id = self._id
        conn = self._conn
        if call_id is not None and conn._streams.pop(call_id, None) is not None:
            conn._release_slot()
            if conn._state == _OPEN:
                conn._send([P.CANCEL, call_id])

    async def __aenter__(self) -> Stream[_T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- connecting ----------------------------------------------------------------------------


class _AwaitableContext(Generic[_T]):
    """Makes ``await f(...)`` and ``async with f(...) as x`` both work (websockets' shape)."""

    def __init__(self, factory: Callable[[], Coroutine[Any, Any, _T]]) -> None:
        self._factory = factory
        self._value: _T | None = None

    def __await__(self) -> Generator[Any, None, _T]:
        return self._factory().__await__()

    async def __aenter__(self) -> _T:
        self._value = await self._factory()
        return self._value

    async def __aexit__(self, *exc_info: object) -> None:
        value = self._value
        if value is not None:
            await value.aclose()  # type: ignore[attr-defined]


async def _open_connection(
    host: str | None,
    port: int | None,
    path: str | None,
    secret: bytes | None,
    ssl: _ssl.SSLContext | None,
    server_hostname: str | None,
    handlers: Mapping[str, Handler] | None,
    options: Options,
    on_open: Callable[[Connection], None] | None = None,
) -> Connection:
    loop = asyncio.get_running_loop()
    conn: Connection | None = None

    def factory() -> Connection:
        nonlocal conn
        conn = Connection(initiator=True, secret=secret, handlers=handlers, options=options, on_open=on_open)
        return conn

    where = path if path is not None else f"{host}:{port}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(options.handshake_timeout):
            try:
                if path is not None:
                    await loop.create_unix_connection(
                        factory,
                        path,
                        ssl=ssl,
                        server_hostname=server_hostname if ssl else None,
                        ssl_handshake_timeout=options.handshake_timeout if ssl else None,
                    )
                else:
                    assert host is not None
                    assert port is not None
                    await loop.create_connection(
                        factory,
                        host,
                        port,
                        ssl=ssl,
                        server_hostname=(server_hostname or host) if ssl else None,
                        ssl_handshake_timeout=options.handshake_timeout if ssl else None,
                    )
            except _ssl.SSLError as exc:
                raise TLSError(f"TLS handshake with {where} failed: {exc}") from exc
            except OSError as exc:
                raise ConnectError(f"cannot connect to {where}: {exc}") from exc
            assert conn is not None
            try:
                await asyncio.shield(conn._opened)
            except (ConnectionClosed, OSError) as exc:
                hs = conn._handshake
                if ssl is not None and isinstance(hs, P.InitiatorHandshake) and not hs.hello_seen:
                    # With TLS 1.3 the server checks our certificate after our side of the TLS
                    # handshake is done, and asyncio closes without sending the alert.
                    raise TLSError(
                        f"{where} closed the connection right after the TLS handshake: it probably "
                        "rejected this client's certificate (or requires one)"
                    ) from exc
                raise ConnectError(f"connection to {where} lost during the handshake: {exc}") from exc
    except TimeoutError:
        if conn is not None:
            conn.abort()
            await conn.wait_closed()
        elapsed = time.monotonic() - started
        raise ConnectError(
            f"no connection to {where} within {elapsed:.1f} s (handshake_timeout"
            f"={options.handshake_timeout:g}); is one side using TLS and the other not?"
        ) from None
    except BaseException:
        if conn is not None:
            conn.abort()
            await conn.wait_closed()
        raise
    return conn


def connect(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    secret: str | bytes | None = None,
    secret_file: str | os.PathLike[str] | None = None,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    handlers: Mapping[str, Handler] | None = None,
    options: Options | None = None,
    on_open: Callable[[Connection], None] | None = None,
    **option_overrides: Any,
) -> _AwaitableContext[Connection]:
    """Connect to an asyncdist server over TCP (``host``, ``port``) or a Unix socket (``path``).

    ``await connect(...)`` returns an open :class:`Connection`;
    ``async with connect(...) as conn`` also closes it. The secret comes
    from ``secret``, ``secret_file``, ``ASYNCDIST_SECRET`` or
    ``ASYNCDIST_SECRET_FILE`` (see :func:`asyncdist.security.resolve_secret`).
    ``handlers`` are what the server may call here. ``on_open(connection)``
    runs once the peer is authenticated, before any of its messages is
    handled (the place to call :meth:`Connection.set_ref_hooks`). Keyword arguments named
    like :class:`Options` fields override ``options``. Raises
    :class:`~asyncdist.errors.ConnectError`,
    :class:`~asyncdist.errors.AuthenticationError` (or its
    :class:`~asyncdist.errors.TLSError`), or :class:`ProtocolError`; the
    connect and handshake together are bounded by ``handshake_timeout``.
    """
    if (path is None) == (port is None):
        raise ValueError("connect() needs either port (TCP) or path (Unix socket)")
    opts = replace(options or Options(), **option_overrides)
    key = resolve_secret(secret, secret_file=secret_file)
    return _AwaitableContext(
        lambda: _open_connection(
            host,
            port,
            os.fspath(path) if path is not None else None,
            key,
            ssl,
            server_hostname,
            handlers,
            opts,
            on_open,
        )
    )
