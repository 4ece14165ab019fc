"""RPC connections: this side's service and objects, the peer's root, and the wire handlers.

Each side of a connection keeps a table of the objects it sent by reference
(its service is object 0) and counts how many times it sent each one; the
holder sends the count back when its last netref goes, and the object is
dropped when the counts meet. The whole table goes when the connection
closes. Messages (all on the core :class:`~asyncdist.connection.Connection`):

=================  ===========================================  ================================
name               arguments                                    answer
=================  ===========================================  ================================
``rpc.call``       object id, member path or None, then the     the result; as a one-way
                   call's own arguments (and keyword arguments) message, nothing
``rpc.oneway``     as ``rpc.call`` (a one-way message only;     --
                   calls that run in threads run in order)
``rpc.getattr``    object id, member path                       the attribute's value
``rpc.setattr``    object id, member path or None, name, value  None
``rpc.op``         object id, member path or None, ``"len"`` |  the value
                   ``"str"`` | ``"repr"``
``rpc.iter``       object id, member path or None               a stream of the items
``rpc.del``        ``[[object id, count], ...]`` (one-way)      --
``rpc.classic``    --                                           True on a classic server; else
                                                                PermissionError (B28)
=================  ===========================================  ================================

A path is a name or a list of names, each checked by the owner's
:class:`~asyncdist.rpc._service.Policy`. References travel as codec object
references: ``ObjectRef("r", {"i": id, "t": type name})`` for an object of
the sender, ``ObjectRef("b", {"i": id})`` for one of the receiver's own
objects coming back (it arrives as the object itself).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import os
import ssl as _ssl
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from types import AsyncGeneratorType
from typing import Any, Final

from .. import connection as _core
from .._log import get_logger
from .._threads import ThreadPool
from ..codec import ObjectRef
from ..errors import ConfigurationError, ConnectionClosed, ProtocolError, UnknownObjectError
from ..server import Server as _CoreServer
from ..server import serve as _core_serve
from . import _netref
from ._netref import Netref, _Member
from ._service import Policy, Service

__all__ = ["Connection", "Server", "connect", "serve"]

log = get_logger("asyncdist.rpc")

DEFAULT_PORT: Final = 18861
_BY_VALUE: Final = (int, float, str, bytes, bytearray, memoryview, list, tuple, dict)
_OPS: Final[dict[str, Callable[[Any], Any]]] = {"len": len, "str": str, "repr": repr}
_FORWARDED_OPS: Final[dict[str, Callable[[Netref], Any]]] = {
    "len": _netref.len,
    "str": _netref.str,
    "repr": _netref.repr,
}
_CLASSIC_OFF: Final = (
    "classic mode is off on this server: only a server started with "
    "rpc.classic.serve(..., allow_classic=True) (or `asyncdist rpc-classic --allow-classic`) "
    "runs code sent by its clients"
)


async def _value(value: Any) -> Any:
    return value


class _Threads:
    """A thread pool made on first use, shared by the connections of one server."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool: ThreadPool | None = None

    def run(self, func: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``func()`` in a thread, in a copy of the caller's context (so that
        :func:`~asyncdist.connection.current_connection` works there)."""
        if self.pool is None:
            self.pool = ThreadPool(self.threads, "asyncdist-rpc")
        in_context = functools.partial(contextvars.copy_context().run, func)
        return self.pool.run(asyncio.get_running_loop(), in_context)

    async def close(self, timeout: float) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown()
            await pool.wait_joined(timeout)


def _instantiate(service: Any) -> Any:
    """A service class (or zero-argument factory) gives one instance per connection."""
    if isinstance(service, type) or (callable(service) and not isinstance(service, Service)):
        return service()
    return service  # an instance: shared by every connection


class Connection:
    """One RPC connection, seen from one side.

    ``root`` is the peer's service (a :class:`~asyncdist.rpc.Netref`),
    ``service`` this side's. Close it with :meth:`close` or ``async with``;
    every pending call on either side then fails with
    :class:`~asyncdist.errors.ConnectionClosed`, and the objects this side
    held for the peer are dropped.
    """

    def __init__(
        self,
        service: Any,
        policy: Policy,
        threads: _Threads,
        *,
        classic: bool = False,
        threaded: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.service = service
        self.policy = policy
        self._threads = threads
        #: In classic mode (and on a client connected with ``threads=``) every plain call runs
        #: in a thread.
        self._threaded = classic or threaded
        self._classic = classic
        self._objects: dict[int, list[Any]] = {0: [service, 1]}
        self._oid_of: dict[int, int] = {id(service): 0}
        self._next_oid = 1
        self._proxies: dict[int, weakref.ref[Netref]] = {}
        self._drops: collections.deque[tuple[int, int]] = collections.deque()
        self._drop_scheduled = False
        self._gate: asyncio.Future[None] | None = None
        self._oneway_tail: asyncio.Future[Any] | None = None  # the last one-way call run in a thread
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self.conn: _core.Connection = None  # type: ignore[assignment]  # set by _attach
        self.root = Netref(self, 0, "root")

    # -- public ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed."""
        return self.conn is None or self.conn.closed

    async def close(self) -> None:
        """Close gracefully (calls in progress get ``close_timeout`` to finish). Idempotent."""
        await self.conn.close()
        await self.wait_closed()

    aclose = close

    async def wait_closed(self) -> None:
        """Until the connection is closed and ``on_disconnect`` has run."""
        await self.conn.wait_closed()
        while self._hook_tasks:
            await asyncio.gather(*self._hook_tasks, return_exceptions=True)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        conn = self.conn
        where = conn.remote_address if conn is not None else None
        return f"<rpc.Connection {'closed' if self.closed else 'open'} peer={where!r}>"

    # -- set-up --------------------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "rpc.call": self._h_call,
            "rpc.oneway": self._h_oneway,
            "rpc.getattr": self._h_getattr,
            "rpc.setattr": self._h_setattr,
            "rpc.op": self._h_op,
            "rpc.iter": self._h_iter,
            "rpc.del": self._h_del,
            "rpc.classic": self._h_classic,
        }

    def attach(self, conn: _core.Connection) -> None:
        """Bind to the authenticated core connection, before any of its messages is handled."""
        self.conn = conn
        conn.set_ref_hooks(self._encode_ref, self._decode_ref)
        conn.add_close_callback(self._on_closed)
        try:
            hook = self.service.on_connect(self) if isinstance(self.service, Service) else None
        except Exception as exc:
            log.exception("on_connect failed; closing the connection")
            conn.abort(exc)
            return
        if inspect.isawaitable(hook):
            self._gate = self._loop.create_future()
            self._track(self._open_gate(hook))

    async def _open_gate(self, hook: Awaitable[Any]) -> None:
        gate = self._gate
        try:
            await hook
        except Exception as exc:
            log.exception("on_connect failed; closing the connection")
            self.conn.abort(exc)  # the calls that wait at the gate are cancelled with it
            return
        finally:
            self._gate = None
            if gate is not None and not gate.done():
                if self.conn.closed:
                    gate.cancel()
                else:
                    gate.set_result(None)

    def _track(self, aw: Coroutine[Any, Any, Any]) -> None:
        task = self._loop.create_task(aw)
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    def _on_closed(self, conn: _core.Connection) -> None:
        self._objects.clear()  # the objects held for the peer go (F24)
        self._oid_of.clear()
        self._proxies.clear()
        self._drops.clear()
        gate = self._gate
        if gate is not None and not gate.done():
            gate.cancel()
        if isinstance(self.service, Service):
            try:
                hook = self.service.on_disconnect(self)
            except Exception:
                log.exception("on_disconnect failed")
                return
            if inspect.isawaitable(hook):
                self._track(self._await_hook(hook))

    @staticmethod
    async def _await_hook(hook: Awaitable[Any]) -> None:
        try:
            await hook
        except Exception:
            log.exception("on_disconnect failed")

    # -- references ----------------------------------------------------------------------

    def _encode_ref(self, obj: Any) -> ObjectRef | None:
        t = type(obj)
        if (t is Netref or t is _Member) and obj._rpc is self and not obj._path:
            return ObjectRef("b", {"i": obj._oid})
        if isinstance(obj, _BY_VALUE):
            return None  # subclasses of msgpack's types travel as their base type
        key = id(obj)
        oid = self._oid_of.get(key)
        if oid is None:
            oid = self._next_oid
            self._next_oid += 1
            self._objects[oid] = [obj, 1]
            self._oid_of[key] = oid
        else:
            self._objects[oid][1] += 1
        return ObjectRef("r", {"i": oid, "t": t.__qualname__[:100]})

    def _decode_ref(self, ref: ObjectRef) -> Any:
        oid = ref.meta.get("i")
        if type(oid) is not int:
            raise ProtocolError("bad object reference")
        if ref.uri == "r":
            wr = self._proxies.get(oid)
            netref = wr() if wr is not None else None
            if netref is None:
                type_name = ref.meta.get("t")
                netref = Netref(self, oid, type_name if type(type_name) is str else "?")
                self._proxies[oid] = weakref.ref(netref)
            netref._count += 1
            return netref
        if ref.uri == "b":
            entry = self._objects.get(oid)
            if entry is None:
                raise ProtocolError(f"the peer sent back object #{oid}, which this side never lent it")
            return entry[0]
        raise ProtocolError("bad object reference")

    def release(self, oid: int, count: int) -> None:
        """A netref to the peer's object ``oid`` is gone (from any thread, even a finalizer)."""
        self._drops.append((oid, count))
        if not self._drop_scheduled:
            self._drop_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._send_drops)
            except RuntimeError:  # the loop is closed, and the connection with it
                pass

    def _send_drops(self) -> None:
        self._drop_scheduled = False
        pairs: dict[int, int] = {}
        while self._drops:
            oid, count = self._drops.popleft()
            pairs[oid] = pairs.get(oid, 0) + count
            wr = self._proxies.get(oid)
            if wr is not None and wr() is None:
                del self._proxies[oid]
        if pairs and not self.closed:
            self.conn.notify_nowait("rpc.del", [[oid, n] for oid, n in pairs.items()])

    def send_oneway(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.closed:
            raise self.conn.close_exception or ConnectionClosed("the connection is closed")
        if threading.get_ident() == self._loop_thread:
            self.conn.notify_nowait("rpc.oneway", *args, **kwargs)
        else:
            self._loop.call_soon_threadsafe(self._oneway_later, args, kwargs)

    def _oneway_later(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.closed:
            self.conn.notify_nowait("rpc.oneway", *args, **kwargs)

    # -- handlers --------------------------------------------------------------------------

    def _local(self, oid: Any) -> Any:
        entry = self._objects.get(oid) if type(oid) is int else None
        if entry is None:
            raise UnknownObjectError(f"no object #{oid!r} here: released, or never sent")
        return entry[0]

    async def _after_gate(
        self,
        gate: asyncio.Future[None],
        handler: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        await gate  # opened before self._gate is cleared, so the handler runs ungated
        result = handler(*args, **kwargs) if kwargs else handler(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _callee(self, oid: Any, path: Any) -> tuple[Callable[..., Any], bool]:
        """The callable ``rpc.call`` reaches, and whether it runs in a thread."""
        entry = self._objects.get(oid) if type(oid) is int else None
        if entry is None:
            raise UnknownObjectError(f"no object #{oid!r} here: released, or never sent")
        if path is None:
            func, blocking = entry[0], False
        else:
            func, blocking = self.policy.lookup(entry[0], path)
        return func, blocking or (self._threaded and not inspect.iscoroutinefunction(func))

    def _h_oneway(self, oid: Any, path: Any, /, *args: Any, **kwargs: Any) -> Any:
        """A one-way call: as ``rpc.call``, but those that run in threads run one after the
        other, in the order sent (so a classic server's redirected prints stay in order)."""
        if (gate := self._gate) is not None:
            return self._after_gate(gate, self._h_oneway, (oid, path, *args), kwargs)
        func, in_thread = self._callee(oid, path)
        if not in_thread:
            return self._h_call(oid, path, *args, **kwargs)
        before = self._oneway_tail
        job = functools.partial(func, *args, **kwargs)

        async def in_order() -> Any:
            if before is not None and not before.done():
                await asyncio.wait([before])  # its outcome is its own (the core logs a failure)
            return await self._threads.run(job)

        self._oneway_tail = tail = asyncio.ensure_future(in_order())
        return tail

    def _h_call(self, oid: Any, path: Any, /, *args: Any, **kwargs: Any) -> Any:
        if (gate := self._gate) is not None:
            return self._after_gate(gate, self._h_call, (oid, path, *args), kwargs)
        func, in_thread = self._callee(oid, path)
        if in_thread:
            return self._threads.run(functools.partial(func, *args, **kwargs))
        result = func(*args, **kwargs) if kwargs else func(*args)
        if type(result) is AsyncGeneratorType:
            return _value(result)  # travels by reference, as a netref to iterate
        return result

    def _in_thread(self, func: Callable[[], Any]) -> Any:
        return self._threads.run(func) if self._threaded else func()

    def _h_getattr(self, oid: Any, path: Any) -> Any:
        if (gate := self._gate) is not None:
            return self._after_gate(gate, self._h_getattr, (oid, path))
        obj = self._local(oid)
        return self._in_thread(lambda: self.policy.resolve(obj, path))

    def _h_setattr(self, oid: Any, path: Any, name: Any, value: Any) -> Any:
        if (gate := self._gate) is not None:
            return self._after_gate(gate, self._h_setattr, (oid, path, name, value))
        obj = self._local(oid)

        def write() -> None:
            self.policy.set(obj if path is None else self.policy.resolve(obj, path), name, value)

        if self._threaded:
            return self._threads.run(write)
        target = obj if path is None else self.policy.resolve(obj, path)
        if isinstance(target, Netref):  # an object of a third party: pass it on
            return _netref.setattr(target, name, value)
        return self.policy.set(target, name, value)

    def _h_op(self, oid: Any, path: Any, op: Any) -> Any:
        if (gate := self._gate) is not None:
            return self._after_gate(gate, self._h_op, (oid, path, op))
        func = _OPS.get(op) if type(op) is str else None
        if func is None:
            raise ValueError(f"unknown operation {op!r}")
        obj = self._local(oid)
        if self._threaded:
            return self._threads.run(lambda: func(obj if path is None else self.policy.resolve(obj, path)))
        target = obj if path is None else self.policy.resolve(obj, path)
        if isinstance(target, Netref):  # an object of a third party: pass it on
            return _FORWARDED_OPS[op](target)
        return func(target)

    def _h_iter(self, oid: Any, path: Any) -> Any:
        if (gate := self._gate) is not None:
            return self._iter_after_gate(gate, oid, path)
        obj = self._local(oid)
        target = obj if path is None else self.policy.resolve(obj, path)
        if hasattr(type(target), "__aiter__"):
            return target
        if self._threaded:  # classic: the client's generators may block, as any of its code
            return self._iter_in_threads(target)
        return iter(target)

    async def _iter_in_threads(self, iterable: Any) -> AsyncIterator[Any]:
        it = await self._threads.run(lambda: iter(iterable))
        done = object()
        while (item := await self._threads.run(lambda: next(it, done))) is not done:
            yield item

    async def _iter_after_gate(self, gate: asyncio.Future[None], oid: Any, path: Any) -> AsyncIterator[Any]:
        await gate
        items = self._h_iter(oid, path)
        if hasattr(items, "__aiter__"):
            async for item in items:
                yield item
        else:
            for item in items:
                yield item

    def _h_del(self, pairs: Any = None) -> None:
        if type(pairs) is not list or not all(
            type(pair) is list and len(pair) == 2 and type(pair[0]) is type(pair[1]) is int for pair in pairs
        ):
            # The peer broke the protocol: this connection ends (without a traceback in the log).
            self.conn.abort(ProtocolError("rpc.del takes a list of [id, count] pairs"))
            return
        objects = self._objects
        for oid, count in pairs:
            entry = objects.get(oid)
            if entry is None or oid == 0:
                continue
            entry[1] -= count
            if entry[1] <= 0:
                del objects[oid]
                self._oid_of.pop(id(entry[0]), None)

    def _h_classic(self) -> bool:
        if not self._classic:
            raise PermissionError(_CLASSIC_OFF)
        return True


class Server:
    """A listening RPC server (made by :func:`serve`): one service instance per connection."""

    def __init__(self, core: _CoreServer, sessions: weakref.WeakSet[Connection], threads: _Threads) -> None:
        self._core = core
        self._sessions = sessions
        self._threads = threads
        self._closed_all: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int] | str:
        """``(host, port)``, or the Unix socket path."""
        return self._core.address

    @property
    def port(self) -> int:
        """The TCP port (useful after binding port 0)."""
        return self._core.port

    @property
    def connections(self) -> list[Connection]:
        """The open connections."""
        return [s for s in self._sessions if not s.closed]

    def close(self) -> None:
        """Stop listening and close every connection gracefully. Idempotent."""
        self._core.close()
        if self._closed_all is None:
            self._closed_all = asyncio.get_running_loop().create_task(self._finish())

    async def _finish(self) -> None:
        await self._core.wait_closed()
        for session in list(self._sessions):
            await session.wait_closed()
        await self._threads.close(self._core.options.close_timeout)

    async def wait_closed(self) -> None:
        """Until :meth:`close` has finished: connections closed, hooks run, threads gone."""
        await self._core.wait_closed()
        if self._closed_all is not None:
            await asyncio.shield(self._closed_all)

    async def aclose(self) -> None:
        """:meth:`close` and :meth:`wait_closed`."""
        self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Until the server is closed; cancelling this closes it."""
        try:
            await self._core.wait_closed()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        await self.aclose()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<rpc.Server {self.address!r} connections={len(self.connections)}>"


def start_server(
    service: Any,
    host: str | None,
    port: int | None,
    *,
    classic: bool,
    allow_public_attrs: bool,
    threads: int,
    path: str | os.PathLike[str] | None,
    secret: str | bytes | None,
    ssl: _ssl.SSLContext | None,
    insecure: bool,
    options: Mapping[str, Any],
) -> _core._AwaitableContext[Server]:
    """The shared body of :func:`serve` and ``rpc.classic.serve``."""
    if options.get("accept_pickle", "refuse") != "refuse":
        raise ConfigurationError("RPC servers never accept pickles (B17)")
    policy = Policy(allow_public_attrs=allow_public_attrs, allow_all=classic)
    pool = _Threads(threads)
    sessions: weakref.WeakSet[Connection] = weakref.WeakSet()

    def handlers(conn: _core.Connection) -> dict[str, Callable[..., Any]]:
        session = Connection(_instantiate(service), policy, pool, classic=classic)
        sessions.add(session)
        session.attach(conn)
        return session.handlers()

    core = _core_serve(handlers, host, port, path=path, secret=secret, ssl=ssl, insecure=insecure, **options)

    async def start() -> Server:
        return Server(await core, sessions, pool)

    return _core._AwaitableContext(start)


def serve(
    service: Any,
    host: str | None = "127.0.0.1",
    port: int | None = DEFAULT_PORT,
    *,
    path: str | os.PathLike[str] | None = None,
    secret: str | bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
    insecure: bool = False,
    allow_public_attrs: bool = False,
    threads: int = 32,
    **options: Any,
) -> _core._AwaitableContext[Server]:
    """Serve ``service`` (a :class:`Service` class, made once per connection, or one shared instance).

    ``await rpc.serve(...)`` returns the :class:`Server`; ``async with``
    also closes it. Binds 127.0.0.1:18861 by default (port 0 picks a free
    port); a non-loopback ``host`` needs a ``secret`` or mutual TLS
    (``ssl``) unless ``insecure=True``. ``allow_public_attrs`` lets clients
    reach every public attribute of the objects they get (RPyC's option of
    that name). ``threads`` bounds the threads that run
    ``@exposed(blocking=True)`` methods. Other keyword arguments are
    :class:`~asyncdist.connection.Options` fields. Never accepts pickles.
    """
    return start_server(
        service,
        host,
        port,
        classic=False,
        allow_public_attrs=allow_public_attrs,
        threads=threads,
        path=path,
        secret=secret,
        ssl=ssl,
        insecure=insecure,
        options=options,
    )


async def open_connection(
    host: str,
    port: int | None,
    *,
    service: Any,
    classic: bool,
    allow_public_attrs: bool,
    path: str | os.PathLike[str] | None,
    secret: str | bytes | None,
    ssl: _ssl.SSLContext | None,
    options: Mapping[str, Any],
    session_class: type[Connection] = Connection,
    threads: int | None = None,
) -> Connection:
    """The shared body of :func:`connect` and ``rpc.classic.connect`` (``path`` wins over ``port``)."""
    if options.get("accept_pickle", "refuse") != "refuse":
        raise ConfigurationError("RPC connections never accept pickles (B17)")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise ValueError(f"threads must be a positive int or None, not {threads!r}")
    pool = _Threads(threads or 4)
    session = session_class(
        _instantiate(service),
        Policy(allow_public_attrs=allow_public_attrs),
        pool,
        classic=False,
        threaded=threads is not None,
    )
    await _core.connect(
        host,
        port if path is None else None,
        path=path,
        secret=secret,
        ssl=ssl,
        handlers=session.handlers(),
        on_open=session.attach,
        **options,
    )
    session.conn.add_close_callback(lambda _: session._track(pool.close(5.0)))
    if classic:
        try:
            await session.conn.call("rpc.classic")
        except BaseException:
            await session.close()
            raise
    return session


def connect(
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_PORT,
    *,
    service: Any = Service,
    path: str | os.PathLike[str] | None = None,
    secret: str | bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
    allow_public_attrs: bool = False,
    threads: int | None = None,
    **options: Any,
) -> _core._AwaitableContext[Connection]:
    """Connect to an RPC server; ``await`` it, or ``async with`` to close it too.

    ``service`` (a class, made once for this connection, or an instance) is
    what the server may call back here, as its ``conn.root``. ``threads``:
    run this side's plain methods and the plain callbacks the server calls
    in up to that many threads, so that they may block (call the server back
    through :mod:`asyncdist.sync`, as RPyC's callbacks do); None (the
    default) runs them on the loop, where they must not block. Raises what
    :func:`asyncdist.connect` raises. Other keyword arguments are
    :class:`~asyncdist.connection.Options` fields.
    """
    return _core._AwaitableContext(
        lambda: open_connection(
            host,
            port,
            service=service,
            classic=False,
            allow_public_attrs=allow_public_attrs,
            path=path,
            secret=secret,
            ssl=ssl,
            options=options,
            threads=threads,
        )
    )
