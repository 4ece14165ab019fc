"""Proxies, batches, and the objects side of one connection (:class:`Session`).

Wire protocol, on any :class:`~asyncdist.connection.Connection` (both ends
serve it, so a client can be called back over the connection it opened):

=============  ============================================  ===============================
handler        arguments                                      result
=============  ============================================  ===============================
``o.call``     ``oid, name, *args, **kwargs``                 the method's value
``o.note``     the same, sent as a notification              (none: one-way)
``o.iter``     the same, as a stream                          the generator's items
``o.get``      ``oid, name``                                  the property's value
``o.set``      ``oid, name, value``                           None
``o.meta``     ``oid``                                        the exposed members
``o.batch``    ``oid, [[name, args, kwargs]...], return_exc`` ``[results, error or None]``
``o.release``  ``oid, count`` (notification)                  (the peer dropped its proxies)
``o.ping``     \\-                                            None
=============  ============================================  ===============================

An exposed object sent as a value travels as an :class:`~asyncdist.codec.ObjectRef`
whose ``meta["k"]`` says what it is: ``"d"`` an object of the daemon at the
other end (also reachable by its URI), ``"c"`` an object the sender exported
on this connection only (a callback; freed when every proxy to it is gone or
the connection closes), ``"y"`` an object of the receiver coming home (it
gets its own object back), ``"u"`` a URI to dial.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import random
import secrets
import warnings
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Mapping
from dataclasses import replace
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, Final

from .._log import get_logger
from .._threads import ThreadPool
from ..codec import ObjectRef
from ..connection import Connection, Options, connect
from ..errors import (
    ConfigurationError,
    ConnectError,
    ConnectionClosedError,
    NamingError,
    UnknownObjectError,
)
from ..security import resolve_secret
from ._expose import ClassInfo, Member, check_member_name, class_info
from ._uri import URI

if TYPE_CHECKING:
    from ._daemon import Daemon

__all__ = [
    "DEFAULT_NS_PORT",
    "NS_OBJECT_ID",
    "Batch",
    "Proxy",
    "Session",
    "dial",
    "no_pickle",
    "ns_address",
]

log = get_logger("asyncdist.objects")

#: The object id of the name server in its daemon.
NS_OBJECT_ID: Final = "asyncdist.naming"
DEFAULT_NS_PORT: Final = 9090
MAX_BATCH: Final = 10_000
_DONE: Final = object()
_META_KEYS: Final = ("methods", "oneway", "streams", "properties", "writable")


def ns_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """The name server's address: the arguments, else ``ASYNCDIST_NS_HOST``/``_PORT``, else 127.0.0.1:9090."""
    host = host or os.environ.get("ASYNCDIST_NS_HOST") or "127.0.0.1"
    if port is None:
        env = os.environ.get("ASYNCDIST_NS_PORT")
        try:
            port = int(env) if env else DEFAULT_NS_PORT
        except ValueError:
            raise ValueError(f"ASYNCDIST_NS_PORT is not a port number: {env!r}") from None
    return host, port


def no_pickle(options: Options) -> Options:
    """``options`` for a remote-objects connection, which never accepts pickled payloads."""
    if options.accept_pickle != "refuse":
        raise ConfigurationError(
            "remote objects and the name server never accept pickled payloads: "
            f"accept_pickle={options.accept_pickle!r} is not allowed here"
        )
    return options


async def dial(target: URI, *, secret: bytes | None, ssl: SSLContext | None, options: Options) -> Connection:
    """Connect to the daemon of an ``adist:`` URI (TCP or Unix socket)."""
    return await connect(
        target.host or "127.0.0.1", target.port, path=target.path, secret=secret, ssl=ssl, options=options
    )


def _short(value: Any) -> str:
    return repr(value)[:80]


# -- the objects side of one connection ---------------------------------------------------------


class Session:
    """Serves objects over one connection and maps references to proxies, both ways.

    Made for every connection a :class:`Daemon` accepts and every connection
    a :class:`Proxy` opens. ``daemon`` is None on the client side, where only
    objects exported over this connection (callbacks) are served. Plain
    methods run in ``pool`` (the daemon's), else in the loop's default executor.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        daemon: Daemon | None = None,
        pool: ThreadPool | None = None,
        secret: bytes | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.conn = conn
        self.daemon = daemon
        self.pool = pool
        self.secret = secret
        self.ssl = ssl
        #: The proxy that opened this connection (client side), kept alive by proxies derived from it.
        self.owner: weakref.ref[Proxy] | None = None
        self.loop = asyncio.get_running_loop()
        # Objects sent over this connection by reference: oid -> [object, references sent].
        self.exported: dict[str, list[Any]] = {}
        self._export_ids: dict[int, str] = {}
        #: Instances of "session" registrations, one per registration, for this connection.
        self.instances: dict[Any, Any] = {}
        # Proxies to the peer's exported objects, and how many references each stands for.
        self._proxies: weakref.WeakValueDictionary[str, Proxy] = weakref.WeakValueDictionary()
        self._received: dict[str, int] = {}
        self.handlers: dict[str, Callable[..., Any]] = {
            "o.call": self._h_call,
            "o.note": self._h_call,
            "o.iter": self._h_iter,
            "o.get": self._h_get,
            "o.set": self._h_set,
            "o.meta": self._h_meta,
            "o.batch": self._h_batch,
            "o.release": self._h_release,
            "o.ping": _ping,
        }
        conn.handlers = self.handlers
        conn.set_ref_hooks(self.encode_ref, self.decode_ref)
        conn.add_close_callback(self._closed)

    # -- finding the target ---------------------------------------------------------------

    def target(self, oid: Any) -> tuple[Any, ClassInfo | None]:
        """The object called by id, and its class info (None for a forwarded proxy)."""
        daemon = self.daemon
        if daemon is not None and type(oid) is str:
            reg = daemon._registry.get(oid)
            if reg is not None:
                return reg.instance(self), reg.info
        entry = self.exported.get(oid) if type(oid) is str else None
        if entry is None:
            raise UnknownObjectError(f"no object with id {_short(oid)} here")
        obj = entry[0]
        if type(obj) is Proxy:
            return obj, None
        return obj, class_info(type(obj))

    @staticmethod
    def member(info: ClassInfo, name: Any, kind: str) -> Member:
        """The exposed member ``name`` of kind ``"method"``/``"property"``, or AttributeError."""
        m = info.members.get(name) if type(name) is str else None
        if m is None:
            check_member_name(name)
            raise AttributeError(f"no exposed member {name!r}")
        if m.kind != kind:
            if kind == "method":
                raise AttributeError(f"{name!r} is a property: read it with `await proxy.{name}`")
            raise AttributeError(f"{name!r} is a method, not a property: call it")
        return m

    def run_plain(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run a plain callable in a thread, with this call's context (its connection)."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        pool = self.pool
        if pool is None:
            return self.loop.run_in_executor(None, call)
        return pool.run(self.loop, call)

    # -- handlers -------------------------------------------------------------------------

    def _h_call(self, oid: Any, name: Any, /, *args: Any, **kwargs: Any) -> Any:
        obj, info = self.target(oid)
        if info is None:
            return obj._invoke(check_member_name(name), args, kwargs)
        m = info.members.get(name) if type(name) is str else None
        if m is None or m.kind != "method" or m.stream:
            if m is not None and m.stream:
                raise TypeError(f"{name!r} is a generator: iterate it with `async for x in proxy.{name}()`")
            m = self.member(info, name, "method")
        if m.is_async:
            return getattr(obj, name)(*args, **kwargs)
        return self.run_plain(getattr(obj, name), *args, **kwargs)

    def _h_iter(self, oid: Any, name: Any, /, *args: Any, **kwargs: Any) -> Any:
        obj, info = self.target(oid)
        if info is None:
            return obj._stream(check_member_name(name), args, kwargs)
        m = self.member(info, name, "method")
        if not m.stream:
            raise TypeError(f"{name!r} is not a generator: call it with `await proxy.{name}()`")
        produced = getattr(obj, name)(*args, **kwargs)
        if m.stream == "agen":
            return produced
        return self._threaded_items(produced)

    async def _threaded_items(self, gen: Any) -> AsyncIterator[Any]:
        try:
            while True:
                item = await self.run_plain(next, gen, _DONE)
                if item is _DONE:
                    return
                yield item
        finally:
            try:
                await self.run_plain(gen.close)
            except (ValueError, RuntimeError):  # still running in its thread, or the pool is gone
                pass

    def _h_get(self, oid: Any, name: Any) -> Any:
        obj, info = self.target(oid)
        if info is None:
            return obj._get(check_member_name(name))
        m = self.member(info, name, "property")
        if m.is_async:
            return getattr(obj, name)
        return self.run_plain(getattr, obj, name)

    def _h_set(self, oid: Any, name: Any, value: Any) -> Any:
        obj, info = self.target(oid)
        if info is None:
            return obj._set(check_member_name(name), value)
        m = self.member(info, name, "property")
        if not m.writable:
            raise AttributeError(f"property {name!r} is read-only")
        return self.run_plain(setattr, obj, name, value)

    def _h_meta(self, oid: Any) -> dict[str, list[str]]:
        daemon = self.daemon
        reg = daemon._registry.get(oid) if daemon is not None and type(oid) is str else None
        if reg is not None:
            return reg.info.meta  # without making an instance (percall, session)
        obj, info = self.target(oid)
        if info is None:
            return obj._meta_dict()  # type: ignore[no-any-return]
        return info.meta

    async def _h_batch(self, oid: Any, calls: Any, return_exceptions: Any = False) -> list[Any]:
        if type(calls) is not list or len(calls) > MAX_BATCH:
            raise ValueError(f"a batch is a list of at most {MAX_BATCH} calls")
        results: list[Any] = []
        for call in calls:
            try:
                if not (
                    type(call) is list and len(call) == 3 and type(call[1]) is list and type(call[2]) is dict
                ):
                    raise ValueError("a batched call is [name, args, kwargs]")
                result = self._h_call(oid, call[0], *call[1], **call[2])
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                if not return_exceptions:
                    return [results, exc]
                result = exc
            results.append(result)
        return [results, None]

    def _h_release(self, oid: Any, count: Any) -> None:
        entry = self.exported.get(oid) if type(oid) is str else None
        if entry is None or type(count) is not int:
            return
        entry[1] -= count
        if entry[1] <= 0:
            del self.exported[oid]
            self._export_ids.pop(id(entry[0]), None)

    # -- references -----------------------------------------------------------------------

    def export(self, obj: Any) -> str:
        """Serve ``obj`` over this connection; return its id (the same id while it is exported)."""
        oid = self._export_ids.get(id(obj))
        if oid is None or self.exported.get(oid, (None,))[0] is not obj:
            oid = secrets.token_hex(16)
            self._export_ids[id(obj)] = oid
            self.exported[oid] = [obj, 0]
        self.exported[oid][1] += 1
        return oid

    def encode_ref(self, obj: Any) -> ObjectRef | None:
        """Codec hook: an exposed object or a proxy travels as a reference."""
        if type(obj) is Proxy:
            return obj._ref_for(self)
        if isinstance(obj, type):
            return None
        info = class_info(type(obj))
        if not info.members:
            return None
        daemon = self.daemon
        if daemon is not None:
            oid = daemon._instance_ids.get(id(obj))
            if oid is not None and oid in daemon._registry:
                return ObjectRef(daemon.uri_for(oid), {"k": "d", "m": info.meta})
        return ObjectRef(self.export(obj), {"k": "c", "m": info.meta})

    def decode_ref(self, ref: ObjectRef) -> Any:
        """Codec hook: a reference becomes a proxy (or the receiver's own object)."""
        try:
            kind = ref.meta.get("k")
            if kind == "c":
                return self._proxy_to_exported(ref.uri, ref.meta.get("m"))
            if kind == "d":
                uri = URI.parse(ref.uri)
                return Proxy._bound(self, uri.object, ref.meta.get("m"), uri=uri)
            if kind == "y":
                try:
                    obj, _ = self.target(ref.uri)
                except UnknownObjectError:
                    return ref
                return obj
            if kind == "u":
                return Proxy(ref.uri, secret=self.secret, ssl=self.ssl)
        except (ValueError, TypeError):
            pass
        return ref

    def _proxy_to_exported(self, oid: str, meta: Any) -> Proxy:
        proxy = self._proxies.get(oid)
        if proxy is None:
            proxy = Proxy._bound(self, oid, meta)
            self._proxies[oid] = proxy
            weakref.finalize(proxy, self._forget, oid)
        self._received[oid] = self._received.get(oid, 0) + 1
        return proxy

    def _forget(self, oid: str) -> None:
        # The last local proxy to an exported object of the peer is gone: let the peer free it.
        count = self._received.pop(oid, 0)
        if count and not self.conn.closed:
            try:
                self.loop.call_soon_threadsafe(self._send_release, oid, count)
            except RuntimeError:  # the loop is closed, and so is the connection
                pass

    def _send_release(self, oid: str, count: int) -> None:
        if not self.conn.closed:
            self.conn.notify_nowait("o.release", oid, count)

    def _closed(self, conn: Connection) -> None:
        self.exported.clear()
        self._export_ids.clear()
        self.instances.clear()
        self._received.clear()


def _ping() -> None:
    return None


# -- the proxy --------------------------------------------------------------------------------


class _Member:
    """``proxy.NAME``: call it, await it (a property read), or ``await proxy.NAME.set(v)``."""

    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Call:
        return _Call(self._proxy, self._name, args, kwargs)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._proxy._get(self._name).__await__()

    def get(self) -> Awaitable[Any]:
        """Read the remote property (the same as ``await proxy.NAME``)."""
        return self._proxy._get(self._name)

    def set(self, value: Any) -> Awaitable[None]:
        """Write the remote property: ``await proxy.NAME.set(value)``."""
        return self._proxy._set(self._name, value)

    def __repr__(self) -> str:
        return f"<remote member {self._name!r} of {self._proxy!r}>"


class _Call:
    """One call: ``await`` it for the result, or ``async for`` over a remote generator."""

    __slots__ = ("_args", "_kwargs", "_name", "_proxy", "_used")

    def __init__(self, proxy: Proxy, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._proxy = proxy
        self._name = name
        self._args = args
        self._kwargs = kwargs
        self._used = False

    def __await__(self) -> Generator[Any, None, Any]:
        self._used = True
        return self._proxy._invoke(self._name, self._args, self._kwargs).__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        self._used = True
        return self._proxy._stream(self._name, self._args, self._kwargs)

    def __del__(self) -> None:
        if not self._used:
            warnings.warn(
                f"remote call {self._name}() was never awaited", RuntimeWarning, stacklevel=2, source=self
            )


class Proxy:
    """A handle on a remote object: ``await proxy.method(...)``.

    ``uri_or_name`` is an ``adist:ID@HOST:PORT`` URI, an ``adistname:NAME``
    (resolved through the name server at ``ns_host``/``ns_port``, default
    ``ASYNCDIST_NS_HOST``/``ASYNCDIST_NS_PORT``, else 127.0.0.1:9090), an
    ``adistmeta:TAG,...`` URI, or a bare registered name.

    * Methods: ``await proxy.method(*args, **kwargs)``; one-way methods
      return at once; remote generators: ``async for x in proxy.gen(...)``.
    * Properties: ``await proxy.prop`` reads, ``await proxy.prop.set(v)`` writes.
    * Connection: made at the first call (or ``async with proxy``), one per
      proxy, shared by any number of concurrent tasks. When it is lost, the
      calls in flight fail with :class:`~asyncdist.errors.ConnectionClosed`
      and are never retried (they may have run); the next call reconnects,
      resolving a name again, up to ``connect_attempts`` times, then raises
      :class:`~asyncdist.errors.ConnectError`.
    * ``timeout`` bounds every call (seconds; :class:`TimeoutError`, and the
      remote call is cancelled); change it with ``proxy._timeout = s``.
    * Local names start with ``_`` (remote ones never do): ``_uri``,
      ``_timeout``, ``await proxy._connect()``, ``await proxy._release()``,
      ``await proxy._call(name, *args, **kwargs)``, and :meth:`batch`.

    A proxy belongs to the event loop it connected in.
    """

    _uri: URI
    _target: URI | None
    _ns: tuple[str | None, int | None]
    _secret: bytes | None
    _ssl: SSLContext | None
    _timeout: float | None
    _attempts: int
    _options: Options
    _conn: Connection | None
    _session: Session | None
    _own: bool
    _meta: dict[str, frozenset[str]] | None
    _oneways: frozenset[str]
    _lock: asyncio.Lock | None
    _finalizer: weakref.finalize[Any, Any] | None
    _parent: Proxy | None
    _guard: AsyncGenerator[None, None] | None

    def __init__(
        self,
        uri_or_name: str | URI,
        ns_host: str | None = None,
        ns_port: int | None = None,
        secret: str | bytes | None = None,
        timeout: float | None = None,
        *,
        ssl: SSLContext | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        connect_attempts: int = 3,
        options: Options | None = None,
        **option_overrides: Any,
    ) -> None:
        if isinstance(uri_or_name, str) and ":" not in uri_or_name:
            uri_or_name = "adistname:" + uri_or_name
        uri = URI.parse(uri_or_name)
        if connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1")
        s = object.__setattr__
        s(self, "_uri", uri)
        s(self, "_target", uri if uri.scheme == "adist" else None)
        s(self, "_ns", (ns_host, ns_port))
        s(self, "_secret", resolve_secret(secret, secret_file=secret_file))
        s(self, "_ssl", ssl)
        s(self, "_timeout", timeout)
        s(self, "_attempts", connect_attempts)
        s(self, "_options", no_pickle(replace(options or Options(), **option_overrides)))
        s(self, "_conn", None)
        s(self, "_session", None)
        s(self, "_own", True)
        s(self, "_meta", None)
        s(self, "_oneways", frozenset())
        s(self, "_lock", None)
        s(self, "_finalizer", None)
        s(self, "_parent", None)
        s(self, "_guard", None)

    @classmethod
    def _bound(cls, session: Session, oid: str, meta: Any, *, uri: URI | None = None) -> Proxy:
        """A proxy using ``session``'s connection (a callback, or a daemon object sent back)."""
        proxy = cls.__new__(cls)
        s = object.__setattr__
        s(proxy, "_uri", uri if uri is not None else URI("adist", oid))
        s(proxy, "_target", uri)
        s(proxy, "_ns", (None, None))
        s(proxy, "_secret", session.secret)
        s(proxy, "_ssl", session.ssl)
        s(proxy, "_timeout", None)
        s(proxy, "_attempts", 3)
        s(proxy, "_options", session.conn.options)
        s(proxy, "_conn", session.conn)
        s(proxy, "_session", session)
        s(proxy, "_own", False)
        s(proxy, "_lock", None)
        s(proxy, "_finalizer", None)
        s(proxy, "_guard", None)
        # A proxy that arrived over another proxy's connection keeps that proxy (and so the
        # connection) alive.
        s(proxy, "_parent", session.owner() if session.owner is not None else None)
        proxy._set_meta(meta)
        return proxy

    # -- attribute protocol ---------------------------------------------------------------

    def __getattr__(self, name: str) -> _Member:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Member(self, name)  # not cached: that would make a cycle and delay freeing the proxy

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):
            raise AttributeError(f"write a remote property with `await proxy.{name}.set(value)`")
        object.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        if self._meta is not None:
            names.update(self._meta["methods"], self._meta["properties"])
        return sorted(names)

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None and not self._conn.closed else "not connected"
        return f"<asyncdist.Proxy {self._uri} ({state})>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Proxy):
            return NotImplemented
        if self._own and other._own:
            return self._uri == other._uri
        return self._conn is other._conn and self._uri == other._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    # -- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Proxy:
        await self._connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._release()

    async def _connect(self) -> Proxy:
        """Connect now (a call connects by itself); raise what connecting raises."""
        await self._ensure()
        return self

    async def _release(self) -> None:
        """Close this proxy's connection (the next call opens a new one). Idempotent."""
        conn = self._conn
        object.__setattr__(self, "_conn", None)
        object.__setattr__(self, "_meta", None if self._own else self._meta)
        fin = self._finalizer
        if fin is not None:
            fin.detach()
            object.__setattr__(self, "_finalizer", None)
        guard = self._guard
        object.__setattr__(self, "_guard", None)
        if conn is not None and self._own:
            await conn.close()
        if guard is not None:
            await guard.aclose()

    # -- calls ----------------------------------------------------------------------------

    async def _invoke(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        conn = self._conn
        if conn is None or conn.closed or self._meta is None or conn._loop is not asyncio.get_running_loop():
            conn = await self._ensure()
        if name in self._oneways:
            await conn.notify("o.note", self._oid, name, *args, **kwargs)
            return None
        return await conn.request("o.call", (self._oid, name, *args), kwargs, timeout=self._timeout)

    async def _call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the remote method ``name`` (for methods named like a local one, e.g. ``batch``)."""
        return await self._invoke(check_member_name(name), args, kwargs)

    async def _stream(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        conn = await self._ready()
        async with conn.stream("o.iter", self._oid, name, *args, **kwargs) as items:
            timeout = self._timeout
            if timeout is None:
                async for item in items:
                    yield item
                return
            while True:  # the timeout bounds the wait for each item
                try:
                    async with asyncio.timeout(timeout):
                        item = await items.__anext__()
                except StopAsyncIteration:
                    return
                yield item

    async def _get(self, name: str) -> Any:
        conn = await self._ready()
        return await conn.request("o.get", (self._oid, name), timeout=self._timeout)

    async def _set(self, name: str, value: Any) -> None:
        conn = await self._ready()
        await conn.request("o.set", (self._oid, name, value), timeout=self._timeout)

    async def _ready(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed or self._meta is None or conn._loop is not asyncio.get_running_loop():
            conn = await self._ensure()
        return conn

    def batch(self) -> Batch:
        """Collect calls and send them in one round trip (Pyro's BatchProxy); see :class:`Batch`."""
        return Batch(self)

    async def _batch(self, calls: list[list[Any]], return_exceptions: bool, oneway: bool) -> list[Any] | None:
        conn = await self._ready()
        if oneway:
            await conn.notify("o.batch", self._oid, calls, False)
            return None
        results, error = await conn.request(
            "o.batch", (self._oid, calls, return_exceptions), timeout=self._timeout
        )
        if error is not None:
            error.batch_results = results
            raise error
        return results  # type: ignore[no-any-return]

    # -- connecting -----------------------------------------------------------------------

    @property
    def _oid(self) -> str:
        target = self._target
        return target.object if target is not None else self._uri.object

    def _set_meta(self, meta: Any) -> None:
        if not isinstance(meta, Mapping):
            meta = {}
        clean = {k: frozenset(x for x in meta.get(k, ()) if type(x) is str) for k in _META_KEYS}
        object.__setattr__(self, "_meta", clean)
        object.__setattr__(self, "_oneways", clean["oneway"])

    def _meta_dict(self) -> dict[str, list[str]]:
        meta = self._meta or {}
        return {k: sorted(meta.get(k, ())) for k in _META_KEYS}

    async def _ensure(self) -> Connection:
        conn = self._conn
        if conn is not None and conn._loop is not asyncio.get_running_loop():
            if not conn._loop.is_closed():
                raise RuntimeError(f"{self!r} is connected in another event loop; make a new Proxy here")
            # Its loop is gone (an earlier asyncio.run, which aborted it): start afresh here.
            fin = self._finalizer
            if fin is not None:
                fin.detach()
            object.__setattr__(self, "_finalizer", None)
            object.__setattr__(self, "_guard", None)
            object.__setattr__(self, "_conn", None)
            object.__setattr__(self, "_lock", None)
            if not self._own:
                object.__setattr__(self, "_meta", None)
        if self._lock is None:
            object.__setattr__(self, "_lock", asyncio.Lock())
        assert self._lock is not None
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed and self._meta is not None:
                return conn
            if not self._own:
                if self._target is None:
                    raise ConnectionClosedError(
                        f"{self._uri} was an object of a connection that is closed; it cannot be reached"
                    )
                object.__setattr__(self, "_own", True)  # reach the daemon by its URI from now on
            return await self._reconnect()

    async def _reconnect(self) -> Connection:
        last: BaseException | None = None
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            if self._uri.scheme != "adist":
                object.__setattr__(self, "_target", await self._resolve())
            target = self._target
            assert target is not None
            try:
                conn = await dial(target, secret=self._secret, ssl=self._ssl, options=self._options)
            except ConnectError as exc:
                last = exc
                continue
            try:
                session = Session(conn, secret=self._secret, ssl=self._ssl)
                meta = await conn.request("o.meta", (target.object,), timeout=self._options.handshake_timeout)
            except BaseException:
                conn.abort()
                await conn.wait_closed()
                raise
            session.owner = weakref.ref(self)
            guard = _close_with_loop(conn)
            await guard.__anext__()  # now the loop closes it when it shuts down (asyncio.run)
            object.__setattr__(self, "_guard", guard)
            object.__setattr__(self, "_conn", conn)
            object.__setattr__(self, "_session", session)
            self._set_meta(meta)
            object.__setattr__(self, "_finalizer", weakref.finalize(self, _abandon, conn))
            return conn
        raise ConnectError(f"cannot reach {self._uri} after {self._attempts} attempt(s): {last}") from last

    async def _resolve(self) -> URI:
        """Look the name (or metadata) up in the name server; an ``adist:`` URI."""
        uri = self._uri
        host, port = ns_address(uri.host or self._ns[0], uri.port or self._ns[1])
        ns = Proxy(
            URI("adist", NS_OBJECT_ID, host, port),
            secret=self._secret,
            ssl=self._ssl,
            timeout=self._timeout,
            connect_attempts=1,
            options=self._options,
        )
        try:
            if uri.scheme == "adistname":
                found = await ns.lookup(uri.object)
            else:
                matches = await ns.list(metadata_all=sorted(uri.tags))
                if not matches:
                    raise NamingError(f"no object registered with metadata {sorted(uri.tags)}")
                found = random.choice(list(matches.values()))
        except ConnectError as exc:
            raise NamingError(
                f"cannot reach the name server at {host}:{port} to resolve {uri}: {exc}"
            ) from exc
        finally:
            await ns._release()
        target = URI.parse(found)
        if target.scheme != "adist":
            raise NamingError(f"the name server returned {found!r} for {uri}, not an adist: URI")
        return target

    def _ref_for(self, session: Session) -> ObjectRef:
        """How this proxy travels over ``session``'s connection."""
        if self._conn is session.conn:
            return ObjectRef(self._oid, {"k": "y"})  # the peer's own object, going home
        target = self._target
        if target is not None:
            return ObjectRef(str(target), {"k": "u"})
        if self._own:
            # A name, with the name server this proxy would ask: the receiver resolves it.
            uri = self._uri
            if uri.host is None:
                uri = URI(uri.scheme, uri.object, *ns_address(*self._ns))
            return ObjectRef(str(uri), {"k": "u"})
        # A callback of another connection: forward calls to it through this side.
        return ObjectRef(session.export(self), {"k": "c", "m": self._meta_dict()})


async def _close_with_loop(conn: Connection) -> AsyncGenerator[None, None]:
    """Abort ``conn`` when the loop shuts its async generators down (``asyncio.run`` does, at its
    end), or when this generator is dropped: a proxy's connection never outlives its loop."""
    try:
        yield
    finally:
        conn.abort()


def _abandon(conn: Connection) -> None:
    """A proxy was dropped without _release(): abort its connection from the loop's thread."""
    if conn.closed:
        return
    try:
        conn._loop.call_soon_threadsafe(conn.abort)
    except RuntimeError:  # the loop is closed
        pass


class Batch:
    """Calls collected to be sent in one round trip: ``b = proxy.batch(); b.f(1); b.g(2); await b()``.

    Every attribute is a remote method whose calls are recorded (nothing is
    sent). ``await batch()`` sends them; the daemon runs them in order and
    the result is the list of their values. The first call that raises stops
    the batch and its exception is raised here, with the values of the calls
    before it in ``exc.batch_results``; with ``return_exceptions=True`` every
    call runs and exceptions take their place in the list. ``oneway=True``
    sends the batch without waiting (returns None). The batch is emptied
    once sent.
    """

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._calls: list[list[Any]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self._add, name)

    def _add(self, name: str, /, *args: Any, **kwargs: Any) -> None:
        self._calls.append([name, list(args), kwargs])

    def __len__(self) -> int:
        return len(self._calls)

    async def __call__(self, *, return_exceptions: bool = False, oneway: bool = False) -> list[Any] | None:
        calls, self._calls = self._calls, []
        if len(calls) > MAX_BATCH:
            raise ValueError(f"a batch holds at most {MAX_BATCH} calls")
        return await self._proxy._batch(calls, return_exceptions, oneway)
