"""The Daemon: serves registered objects to any number of clients."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl as _ssl
from collections.abc import Callable, Generator, Mapping
from dataclasses import replace
from typing import Any, Final, Self

from .._log import get_logger
from .._threads import ThreadPool
from ..connection import Connection, Options
from ..security import resolve_secret
from ..server import Server, serve
from ._expose import ClassInfo, InstanceMode, class_info, expose, get_behavior
from ._proxy import Session, no_pickle
from ._uri import URI, check_object_id

__all__ = ["DAEMON_OBJECT_ID", "Daemon"]

log = get_logger("asyncdist.objects")

#: The id of the daemon's own object (``ping``, ``registered``, ``info``), present in every daemon.
DAEMON_OBJECT_ID: Final = "asyncdist.daemon"
_WILDCARD: Final = ("", "0.0.0.0", "::")


class _Registration:
    __slots__ = ("cls", "creator", "info", "mode", "obj", "oid", "owner")

    def __init__(
        self,
        owner: Daemon,
        oid: str,
        cls: type,
        obj: Any,
        mode: InstanceMode,
        creator: Callable[[type], Any] | None,
    ) -> None:
        self.owner = owner
        self.oid = oid
        self.cls = cls
        self.obj = obj
        self.mode = mode
        self.creator = creator
        self.info: ClassInfo = class_info(cls)

    def _create(self) -> Any:
        obj = self.creator(self.cls) if self.creator is not None else self.cls()
        if self.mode == "single":
            self.owner._instance_ids[id(obj)] = self.oid
        return obj

    def instance(self, session: Session) -> Any:
        mode = self.mode
        if mode == "single":
            obj = self.obj
            if obj is None:
                obj = self.obj = self._create()
            return obj
        if mode == "session":
            obj = session.instances.get(self)
            if obj is None:
                obj = session.instances[self] = self._create()
            return obj
        return self._create()


@expose
class _DaemonObject:
    """The daemon's own object, at id ``asyncdist.daemon``."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def ping(self) -> None:
        return None

    async def registered(self) -> list[str]:
        return sorted(self._daemon._registry)

    async def info(self) -> str:
        return f"asyncdist daemon at {self._daemon.location} serving {len(self._daemon._registry)} objects"


class Daemon:
    """Serves registered objects: ``async with Daemon() as daemon: uri = daemon.register(obj)``.

    Binds ``host``:``port`` (127.0.0.1 and a free port by default; ``path``
    for a Unix socket). A non-loopback host needs a ``secret`` or mutual TLS
    (``ssl``) unless ``insecure=True``. Every client connection is served
    concurrently: ``async def`` methods run on the event loop as their own
    tasks (cancelled when the caller cancels), plain methods and property
    accessors in a pool of ``threads`` threads, so a slow method never holds
    up others or the heartbeats. Objects travel as msgpack values; pickled
    payloads are refused. ``nat_host``/``nat_port`` put another address in
    the URIs (a daemon behind NAT or a port forward).

    Start it with ``async with`` or :meth:`start`; stop it with
    :meth:`close` / :meth:`aclose` (or leaving the ``async with``), which
    closes client connections after the calls in progress (bounded by
    ``close_timeout``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        threads: int = 32,
        nat_host: str | None = None,
        nat_port: int | None = None,
        client_ssl: _ssl.SSLContext | None = None,
        options: Options | None = None,
        **option_overrides: Any,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.host = host
        self._port = port
        self._path = os.fspath(path) if path is not None else None
        self._secret = resolve_secret(secret, secret_file=secret_file)
        self._ssl = ssl
        self._client_ssl = client_ssl
        self._insecure = insecure
        self._threads = threads
        self._nat = (nat_host, nat_port)
        self.options = no_pickle(replace(options or Options(), **option_overrides))
        self._registry: dict[str, _Registration] = {}
        self._instance_ids: dict[int, str] = {}
        self._class_ids: dict[type, str] = {}
        self._server: Server | None = None
        self._pool: ThreadPool | None = None
        self._closing: asyncio.Task[None] | None = None
        self._register(_DaemonObject(self), DAEMON_OBJECT_ID, force=False)

    # -- lifetime ---------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start listening (``async with`` does it); return the daemon."""
        if self._server is not None:
            raise RuntimeError("this daemon is already started")
        self._pool = ThreadPool(self._threads, "asyncdist-daemon")
        try:
            self._server = await serve(
                self._session_handlers,
                self.host,
                self._port,
                path=self._path,
                secret=self._secret,
                ssl=self._ssl,
                insecure=self._insecure,
                options=self.options,
            )
        except BaseException:
            self._pool.shutdown()
            self._pool = None
            raise
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` (from another task) or cancellation; then close."""
        server = self._require_server()
        try:
            await server.serve_forever()
        finally:
            await self.aclose()

    def close(self) -> None:
        """Stop accepting and start closing every connection. Idempotent."""
        if self._server is not None and self._closing is None:
            self._server.close()
            self._closing = asyncio.get_running_loop().create_task(self._finish_close())

    shutdown = close  # Pyro's name

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished, thread pool included."""
        if self._closing is not None:
            await asyncio.shield(self._closing)

    async def aclose(self) -> None:
        """:meth:`close` and :meth:`wait_closed`."""
        self.close()
        await self.wait_closed()

    async def _finish_close(self) -> None:
        assert self._server is not None
        await self._server.wait_closed()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Plain methods still running (their callers gone) get close_timeout to finish.
        pool.shutdown()
        if not await pool.wait_joined(self.options.close_timeout):
            log.warning(
                "daemon at %s closed with %d plain method call(s) still running in threads",
                self.location,
                pool.busy,
            )

    # -- addresses ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (the one chosen when ``port=0``)."""
        if self._server is None:
            if self._port:
                return self._port
            raise RuntimeError("the daemon is not started yet: its port is not chosen")
        return self._server.port

    @property
    def location(self) -> str:
        """Where clients reach this daemon, as in its URIs: ``HOST:PORT`` or ``./u:PATH``."""
        if self._path is not None:
            return f"./u:{self._path}"
        host = self._nat[0] or self.host
        if host in _WILDCARD:
            host = socket.gethostname()
        port = self._nat[1] or self.port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def server(self) -> Server:
        """The underlying :class:`~asyncdist.server.Server` (connections, stats)."""
        return self._require_server()

    def _require_server(self) -> Server:
        if self._server is None:
            raise RuntimeError(
                "the daemon is not started: use `async with Daemon(...)` or `await daemon.start()`"
            )
        return self._server

    # -- registry ------------------------------------------------------------------------------

    def register(self, obj_or_class: Any, object_id: str | None = None, *, force: bool = False) -> str:
        """Serve an object (or a class, instantiated as its :func:`behavior` says); return its URI.

        The URI is ``adist:OBJECTID@HOST:PORT``; the id is random (128
        bits) unless ``object_id`` is given. Registering the same object,
        class or id twice raises :class:`ValueError` unless ``force=True``
        (which replaces the earlier registration of that id).
        """
        oid = self._register(obj_or_class, object_id, force=force)
        return self.uri_for(oid)

    def _register(self, obj_or_class: Any, object_id: str | None, *, force: bool) -> str:
        oid = check_object_id(object_id) if object_id is not None else secrets.token_hex(16)
        if isinstance(obj_or_class, type):
            cls, obj = obj_or_class, None
            mode, creator = get_behavior(cls)
            known = self._class_ids.get(cls)
        else:
            cls, obj = type(obj_or_class), obj_or_class
            mode, creator = "single", None
            known = self._instance_ids.get(id(obj))
        if not class_info(cls).members:
            raise TypeError(
                f"{cls.__qualname__} has no exposed members: decorate the class or its methods "
                "with @asyncdist.expose"
            )
        if not force:
            if known is not None and known in self._registry:
                raise ValueError(f"{obj_or_class!r} is already registered as {known!r}")
            if oid in self._registry:
                raise ValueError(f"object id {oid!r} is already registered")
        elif oid in self._registry:
            self.unregister(oid)
        self._registry[oid] = _Registration(self, oid, cls, obj, mode, creator)
        if obj is None:
            self._class_ids[cls] = oid
        else:
            self._instance_ids[id(obj)] = oid
        return oid

    def unregister(self, obj_or_id: Any) -> None:
        """Stop serving an object, given by the object, class, id or URI; unknown ones are ignored."""
        oid = self._find(obj_or_id)
        if oid is None or oid == DAEMON_OBJECT_ID:
            return
        reg = self._registry.pop(oid, None)
        if reg is None:
            return
        if reg.obj is not None:
            self._instance_ids.pop(id(reg.obj), None)
        if self._class_ids.get(reg.cls) == oid:
            del self._class_ids[reg.cls]

    def _find(self, obj_or_id: Any) -> str | None:
        if isinstance(obj_or_id, str):
            if obj_or_id.lower().startswith("adist:"):
                return URI.parse(obj_or_id).object
            return obj_or_id
        if isinstance(obj_or_id, URI):
            return obj_or_id.object
        if isinstance(obj_or_id, type):
            return self._class_ids.get(obj_or_id)
        return self._instance_ids.get(id(obj_or_id))

    def uri_for(self, obj_or_id: Any) -> str:
        """The URI of a registered object (given by the object, class or id)."""
        oid = self._find(obj_or_id)
        if oid is None or oid not in self._registry:
            raise KeyError(f"{obj_or_id!r} is not registered with this daemon")
        return f"adist:{oid}@{self.location}"

    @property
    def objects(self) -> Mapping[str, Any]:
        """Registered ids and what each serves (the instance, or the class until it is made)."""
        return {oid: (reg.obj if reg.obj is not None else reg.cls) for oid, reg in self._registry.items()}

    # -- serving -------------------------------------------------------------------------------

    def _session_handlers(self, conn: Connection) -> Mapping[str, Callable[..., Any]]:
        session = Session(conn, daemon=self, pool=self._pool, secret=self._secret, ssl=self._client_ssl)
        return session.handlers

    def __repr__(self) -> str:
        where = self.location if self._server is not None or self._port or self._path else "not started"
        return f"<asyncdist.Daemon {where} objects={len(self._registry)}>"
