"""Classic mode (RPyC's): a server whose clients run any Python code on it. Off by default.

A classic server executes whatever its clients send, so it starts only
when asked twice: with :func:`serve` and ``allow_classic=True`` (or
``asyncdist rpc-classic --allow-classic``). On an address other than
loopback it also needs a shared secret or mutual TLS, whatever else is
passed, and it logs a warning. A plain :func:`asyncdist.rpc.serve` server
refuses every classic request (:class:`PermissionError`), and no RPC server
or client, classic or not, accepts pickled payloads on its connection: a
teleported function travels as bytes, loaded only by a classic server.

Client side, :func:`connect` gives a :class:`ClassicConnection`::

    conn = await rpc.classic.connect("127.0.0.1")       # port 18812
    await conn.execute("x = 1")                         # in the connection's namespace
    await conn.eval("x + 1")                            # -> 2
    await conn.modules.sys.getrecursionlimit()          # modules, imported on use
    path = conn.modules["os.path"]                      # a dotted module name
    await conn.builtins.len([1, 2])
    async with conn.redirected_stdio():                 # the server's prints appear here
        await conn.execute("print('hi python cookbook')")
    square = await conn.teleport(lambda x: x * x)       # a function shipped to the server
    await square(7)

Everything the server runs for a classic client (code, calls of its
objects, attribute reads) runs in a thread of the server's pool, so a slow
statement holds up only its caller.
"""

from __future__ import annotations

import builtins as _builtins
import contextlib
import importlib
import io
import os
import ssl as _ssl
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any, Final

from .. import connection as _core
from .._log import get_logger
from ..connection import current_connection
from ..errors import ConfigurationError
from ..security import check_bind, is_loopback, resolve_secret
from ._netref import Netref, _Member
from ._service import Service
from ._session import Connection, Server, open_connection, start_server

__all__ = ["DEFAULT_PORT", "ClassicConnection", "ClassicService", "connect", "serve"]

log = get_logger("asyncdist.rpc")

DEFAULT_PORT: Final = 18812


class _Modules:
    """``modules.NAME`` / ``modules["a.b"]``: the module, imported on first use."""

    def __getattr__(self, name: str) -> ModuleType:
        if name.startswith("__"):
            raise AttributeError(name)
        return importlib.import_module(name)

    def __getitem__(self, name: str) -> ModuleType:
        return importlib.import_module(name)


# -- standard output and error of classic clients -----------------------------------------------

# core connection -> the client's write function, while the client redirects its output here
_redirects: weakref.WeakKeyDictionary[Any, Netref] = weakref.WeakKeyDictionary()
_router_lock = threading.Lock()


class _Router(io.TextIOBase):
    """Installed as ``sys.stdout``/``sys.stderr`` while a client redirects: what code run for
    that client writes goes to the client; everything else goes where it went before."""

    def __init__(self, stream: str, original: Any) -> None:
        self._stream = stream
        self.original = original

    def _target(self) -> Netref | None:
        try:
            conn = current_connection()
        except LookupError:
            return None
        return _redirects.get(conn)

    def write(self, text: str) -> int:
        target = self._target()
        if target is None:
            return int(self.original.write(text))
        if text:
            try:
                target.oneway(self._stream, str(text))
            except Exception:  # the client is gone: its output goes nowhere
                pass
        return len(text)

    def flush(self) -> None:
        if self._target() is None:
            self.original.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def _install_routers() -> None:
    with _router_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router("stdout", sys.stdout)
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router("stderr", sys.stderr)


def _remove_routers() -> None:
    with _router_lock:
        if _redirects:
            return
        if isinstance(sys.stdout, _Router):
            sys.stdout = sys.stdout.original
        if isinstance(sys.stderr, _Router):
            sys.stderr = sys.stderr.original


class ClassicService(Service):
    """The root of a classic server's connection: one namespace per connection.

    Its members are reached by name (classic mode lifts the exposure rules):
    ``execute``, ``eval``, ``modules``, ``builtins``, ``teleport``, and the
    output redirection behind :meth:`ClassicConnection.redirected_stdio`.
    """

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__classic__", "__builtins__": _builtins}
        self.modules = _Modules()
        self.builtins = _builtins
        self._conn: Any = None

    def on_connect(self, conn: Connection) -> None:
        self._conn = conn.conn

    def on_disconnect(self, conn: Connection) -> None:
        self._stop_redirect()

    def execute(self, code: str) -> None:
        """Run ``code`` (statements) in this connection's namespace."""
        exec(code, self.namespace)

    def eval(self, expr: str) -> Any:
        """The value of ``expr`` in this connection's namespace."""
        return eval(expr, self.namespace)

    def teleport(self, blob: bytes) -> Any:
        """A function the client pickled (with cloudpickle), made here."""
        if not isinstance(blob, bytes):
            raise TypeError("teleport takes the pickled function as bytes")
        import cloudpickle  # only a classic server loads pickles, and only here

        func = cloudpickle.loads(blob)
        if not callable(func):
            raise TypeError("teleport ships functions")
        return func

    def redirect_stdio(self, write: Netref) -> None:
        """Send what code run for this client prints to ``write(stream, text)``, one way."""
        if not isinstance(write, Netref):
            raise TypeError("redirect_stdio takes the client's write function")
        with _router_lock:
            _redirects[self._conn] = write
        _install_routers()

    def restore_stdio(self) -> None:
        """Stop sending this client's output back."""
        self._stop_redirect()

    def _stop_redirect(self) -> None:
        with _router_lock:
            _redirects.pop(self._conn, None)
        _remove_routers()


async def _write_locally(stream: str, text: str) -> None:
    # async def: it runs on the loop even on a connection whose plain callbacks run in threads
    # (sync's), in the order the server wrote, before the reply of the call that printed.
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    if text.endswith("\n"):
        out.flush()


class _ModulesRef:
    """``conn.modules``: ``conn.modules.sys`` and ``conn.modules["os.path"]`` are netrefs."""

    __slots__ = ("_conn",)

    def __init__(self, conn: ClassicConnection) -> None:
        self._conn = conn

    def _member(self, name: str) -> _Member:
        root = self._conn.root
        member = _Member(self._conn, 0, root._type, ("modules", name))
        member._base = root
        return member

    def __getattr__(self, name: str) -> _Member:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._member(name)

    def __getitem__(self, name: str) -> _Member:
        return self._member(name)


class ClassicConnection(Connection):
    """A connection to a classic server (made by :func:`connect`)."""

    async def execute(self, code: str) -> None:
        """Run ``code`` on the server, in this connection's namespace."""
        await self.root.execute(code)

    async def eval(self, expr: str) -> Any:
        """Evaluate ``expr`` on the server (a value, or a netref to it)."""
        return await self.root.eval(expr)

    @property
    def modules(self) -> _ModulesRef:
        """The server's modules: ``await conn.modules.os.getcwd()``, ``conn.modules["os.path"]``."""
        return _ModulesRef(self)

    @property
    def builtins(self) -> _Member:
        """The server's builtins module: ``await conn.builtins.len(...)``."""
        return self.root.builtins

    async def teleport(self, func: Callable[..., Any]) -> Netref:
        """Ship ``func`` to the server (by value, with cloudpickle); returns the remote function.

        The result is awaitable-callable: ``await remote(*args)`` runs it
        there. Modules it uses by reference must be importable there.
        """
        import cloudpickle

        ref: Netref = await self.root.teleport(cloudpickle.dumps(func))
        return ref

    @contextlib.asynccontextmanager
    async def redirected_stdio(self) -> AsyncIterator[None]:
        """While inside, what the server's code prints for this connection appears here."""
        await self.root.redirect_stdio(_write_locally)
        try:
            yield
        finally:
            if not self.closed:
                await self.root.restore_stdio()


def serve(
    host: str | None = "127.0.0.1",
    port: int | None = DEFAULT_PORT,
    *,
    allow_classic: bool = False,
    path: str | os.PathLike[str] | None = None,
    secret: str | bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
    threads: int = 32,
    insecure: bool = False,
    **options: Any,
) -> _core._AwaitableContext[Server]:
    """Serve classic mode: every client may run any code here, as this process's user.

    Refuses to start without ``allow_classic=True`` and, on an address
    other than loopback, without a secret or mutual TLS (there is no
    ``insecure`` override). Binds 127.0.0.1:18812 by default. Other keyword
    arguments are :class:`~asyncdist.connection.Options` fields.
    """
    if allow_classic is not True:
        raise ConfigurationError(
            "classic mode lets every client run any code in this process: "
            "start it with allow_classic=True (`asyncdist rpc-classic --allow-classic`)"
        )
    if insecure:
        raise ConfigurationError("classic mode has no insecure override: use a secret or mutual TLS")
    if path is None and not is_loopback(host):
        check_bind(host, secret=resolve_secret(secret), ssl=ssl)
        log.warning(
            "classic mode on %s: every authenticated client may run any code here "
            "(RPyC calls classic mode intentionally insecure)",
            host,
        )
    return start_server(
        ClassicService,
        host,
        port,
        classic=True,
        allow_public_attrs=False,
        threads=threads,
        path=path,
        secret=secret,
        ssl=ssl,
        insecure=False,
        options=options,
    )


def connect(
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_PORT,
    *,
    path: str | os.PathLike[str] | None = None,
    secret: str | bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
    threads: int | None = None,
    **options: Any,
) -> _core._AwaitableContext[ClassicConnection]:
    """Connect to a classic server; raises PermissionError if the server is not one (B28).

    ``threads`` is as for :func:`asyncdist.rpc.connect`: the callbacks the
    server calls here run in threads and may block.
    """

    async def open_() -> ClassicConnection:
        conn = await open_connection(
            host,
            port,
            service=Service,
            classic=True,
            allow_public_attrs=False,
            path=path,
            secret=secret,
            ssl=ssl,
            options=options,
            session_class=ClassicConnection,
            threads=threads,
        )
        assert isinstance(conn, ClassicConnection)
        return conn

    return _core._AwaitableContext(open_)
