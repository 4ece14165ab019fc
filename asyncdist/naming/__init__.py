"""The name server: names for object URIs, optionally kept in sqlite; :func:`locate_ns`.

Run one with ``asyncdist ns [--host 127.0.0.1] [--port 9090] [--storage FILE]``
(or ``python -m asyncdist.naming``), or in a program with
``async with NameServerDaemon(...)``. It is an ordinary exposed object (id
``asyncdist.naming``) in an ordinary :class:`~asyncdist.objects.Daemon`;
clients reach it with ``ns = await asyncdist.locate_ns()`` and call
``register``, ``lookup``, ``list``, ``remove``, ``ping``, ``count`` and
``clean``.

Limits: names are 1 to 1024 characters (no ``@``, whitespace or control
characters); URIs must be ``adist:`` URIs of at most 1024 characters; at
most 32 metadata tags of at most 128 characters each; at most
``max_entries`` registrations (100,000 by default; a registration beyond it
raises :class:`~asyncdist.errors.NamingError`). The memory the registry can
take is bounded by these. When the name server has a secret, every request,
and so every mutation, needs it (the handshake does); with ``--storage``
the registrations survive a restart, without it they are lost (a daemon
that keeps :func:`publish` running registers again by itself).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import sqlite3
import ssl as _ssl
import sys
import threading
from collections.abc import Coroutine, Generator, Iterable, Sequence
from typing import Any, Final, Self

from .._log import get_logger
from ..connection import Options
from ..errors import (
    AsyncDistError,
    AuthenticationError,
    CommunicationError,
    ConnectError,
    NamingError,
    UnknownObjectError,
)
from ..objects import NS_OBJECT_ID, URI, Daemon, Proxy, expose, ns_address
from ..objects._proxy import dial
from ..objects._uri import check_name

__all__ = [
    "MAX_META_LEN",
    "MAX_META_TAGS",
    "MAX_URI",
    "NameServer",
    "NameServerDaemon",
    "locate_ns",
    "main",
    "publish",
]

log = get_logger("asyncdist.naming")

MAX_URI: Final = 1024
MAX_META_TAGS: Final = 32
MAX_META_LEN: Final = 128


def _check_metadata(metadata: Any) -> frozenset[str]:
    if metadata is None:
        return frozenset()
    if isinstance(metadata, str) or not isinstance(metadata, list | tuple | set | frozenset):
        raise NamingError("metadata must be a collection of strings")
    if len(metadata) > MAX_META_TAGS:
        raise NamingError(f"at most {MAX_META_TAGS} metadata tags")
    for tag in metadata:
        if type(tag) is not str or not 0 < len(tag) <= MAX_META_LEN:
            raise NamingError(f"a metadata tag is a string of 1 to {MAX_META_LEN} characters")
    return frozenset(metadata)


def _check_uri(uri: Any) -> str:
    if isinstance(uri, Proxy):
        target = uri._target
        uri = str(target if target is not None else uri._uri)
    if type(uri) is not str or len(uri) > MAX_URI:
        raise NamingError(f"a URI is a string of at most {MAX_URI} characters")
    try:
        parsed = URI.parse(uri)
    except ValueError as exc:
        raise NamingError(str(exc)) from None
    if parsed.scheme != "adist":
        raise NamingError(f"only adist: URIs can be registered, not {uri[:80]!r}")
    return str(parsed)


def _check_name(name: Any) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise NamingError(str(exc)) from None


class _Storage:
    """Registrations in a sqlite file (write-through; read once at start)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, uri TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS metadata (name TEXT NOT NULL, tag TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS metadata_name ON metadata (name)")

    def load(self) -> dict[str, tuple[str, frozenset[str]]]:
        tags: dict[str, set[str]] = {}
        for name, tag in self._db.execute("SELECT name, tag FROM metadata"):
            tags.setdefault(name, set()).add(tag)
        return {
            name: (uri, frozenset(tags.get(name, ())))
            for name, uri in self._db.execute("SELECT * FROM names")
        }

    def put(self, name: str, uri: str, metadata: frozenset[str]) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO names VALUES (?, ?)", (name, uri))
            db.execute("DELETE FROM metadata WHERE name = ?", (name,))
            db.executemany("INSERT INTO metadata VALUES (?, ?)", [(name, t) for t in sorted(metadata)])

    def delete(self, names: Iterable[str]) -> None:
        rows = [(n,) for n in names]
        with self._transaction() as db:
            db.executemany("DELETE FROM names WHERE name = ?", rows)
            db.executemany("DELETE FROM metadata WHERE name = ?", rows)

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        self._db.execute("BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


@expose
class NameServer:
    """The registry of names: each maps to an ``adist:`` URI and a set of metadata tags.

    Methods are thread-safe (the daemon runs them in its thread pool).
    ``secret``/``ssl`` are what :meth:`clean` uses to reach daemons.
    """

    def __init__(
        self,
        storage: str | os.PathLike[str] | None = None,
        *,
        max_entries: int = 100_000,
        secret: bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._storage = _Storage(os.fspath(storage)) if storage is not None else None
        self._entries: dict[str, tuple[str, frozenset[str]]] = (
            self._storage.load() if self._storage is not None else {}
        )
        self._max_entries = max_entries
        self._secret = secret
        self._ssl = ssl

    def register(self, name: str, uri: Any, metadata: Any = (), safe: bool = False) -> None:
        """Register ``name`` for ``uri`` (replacing an earlier one unless ``safe``)."""
        name = _check_name(name)
        uri = _check_uri(uri)
        tags = _check_metadata(metadata)
        with self._lock:
            if name in self._entries:
                if safe:
                    raise NamingError(f"name {name!r} is already registered")
            elif len(self._entries) >= self._max_entries:
                raise NamingError(f"the name server is full ({self._max_entries} registrations)")
            self._entries[name] = (uri, tags)
            if self._storage is not None:
                self._storage.put(name, uri, tags)

    def lookup(self, name: str, return_metadata: bool = False) -> Any:
        """The URI registered for ``name`` (with ``return_metadata``: ``(uri, tags)``)."""
        entry = self._entries.get(name) if type(name) is str else None
        if entry is None:
            raise NamingError(f"unknown name: {str(name)[:200]!r}")
        return entry if return_metadata else entry[0]

    def list(
        self,
        prefix: str | None = None,
        metadata_all: Any = None,
        metadata_any: Any = None,
        return_metadata: bool = False,
    ) -> dict[str, Any]:
        """Registrations whose name starts with ``prefix`` and whose tags include all of
        ``metadata_all`` and any of ``metadata_any``: ``{name: uri}`` (or ``{name: (uri, tags)}``)."""
        if prefix is not None and type(prefix) is not str:
            raise NamingError("prefix must be a string")
        need_all = _check_metadata(metadata_all)
        need_any = _check_metadata(metadata_any) if metadata_any is not None else None
        with self._lock:
            items = list(self._entries.items())
        out: dict[str, Any] = {}
        for name, (uri, tags) in items:
            if prefix is not None and not name.startswith(prefix):
                continue
            if need_all and not need_all <= tags:
                continue
            if need_any is not None and not need_any & tags:
                continue
            out[name] = (uri, tags) if return_metadata else uri
        return out

    def remove(self, name: str | None = None, prefix: str | None = None) -> int:
        """Remove ``name``, or every name starting with ``prefix``; return how many went."""
        if name is None and prefix is None:
            raise NamingError("remove() needs a name or a prefix")
        with self._lock:
            if name is not None:
                gone = [name] if type(name) is str and name in self._entries else []
            else:
                if type(prefix) is not str:
                    raise NamingError("prefix must be a string")
                gone = [n for n in self._entries if n.startswith(prefix)]
            for n in gone:
                del self._entries[n]
            if gone and self._storage is not None:
                self._storage.delete(gone)
        return len(gone)

    def set_metadata(self, name: str, metadata: Any) -> None:
        """Replace the metadata tags of a registered name."""
        tags = _check_metadata(metadata)
        with self._lock:
            entry = self._entries.get(name) if type(name) is str else None
            if entry is None:
                raise NamingError(f"unknown name: {str(name)[:200]!r}")
            self._entries[name] = (entry[0], tags)
            if self._storage is not None:
                self._storage.put(name, entry[0], tags)

    def ping(self) -> None:
        """Do nothing: a liveness check."""

    def count(self) -> int:
        """How many names are registered."""
        return len(self._entries)

    async def clean(self, timeout: float = 2.0) -> builtins.list[str]:
        """Remove registrations whose daemon is gone; return their names.

        Each daemon is contacted once (``timeout`` seconds for connect and
        handshake): a refused connection, or a daemon that answers that the
        object id is unknown, removes the name. A daemon that is reachable
        but refuses this name server's credentials, or that does not answer
        in time, is kept (it may only be slow or differently configured).
        """
        with self._lock:
            items = dict(self._entries)
        by_location: dict[str, builtins.list[tuple[str, URI]]] = {}
        for name, (uri, _) in items.items():
            parsed = URI.parse(uri)
            by_location.setdefault(parsed.location or "", []).append((name, parsed))
        results = await asyncio.gather(*(self._probe(group, timeout) for group in by_location.values()))
        dead = sorted(name for group in results for name in group)
        if dead:
            with self._lock:
                # Only names that still point where they pointed when probed.
                still = [n for n in dead if n in self._entries and self._entries[n][0] == items[n][0]]
                for n in still:
                    del self._entries[n]
                if still and self._storage is not None:
                    self._storage.delete(still)
            dead = still
            log.info(
                "name server clean-up removed %d dead registration(s): %s", len(dead), ", ".join(dead[:20])
            )
        return dead

    async def _probe(self, group: builtins.list[tuple[str, URI]], timeout: float) -> builtins.list[str]:
        options = Options(
            handshake_timeout=timeout,
            heartbeat_interval=min(2.0, timeout),
            heartbeat_timeout=max(10.0, 2 * timeout),
        )
        try:
            conn = await dial(group[0][1], secret=self._secret, ssl=self._ssl, options=options)
        except ConnectError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and not isinstance(cause, AsyncDistError):  # refused, unreachable
                return [name for name, _ in group]
            return []  # no answer in time: maybe only slow or frozen, keep it
        except (AuthenticationError, CommunicationError):
            return []
        dead: builtins.list[str] = []
        try:
            for name, uri in group:
                try:
                    await conn.call("o.meta", uri.object, timeout=timeout)
                except UnknownObjectError:
                    dead.append(name)
                except (CommunicationError, TimeoutError):
                    break
        finally:
            await conn.close()
        return dead

    def close(self) -> None:
        """Close the storage file (the daemon does it when it stops)."""
        if self._storage is not None:
            self._storage.close()
            self._storage = None


class NameServerDaemon(Daemon):
    """A :class:`~asyncdist.objects.Daemon` serving a :class:`NameServer` at id ``asyncdist.naming``.

    ``async with NameServerDaemon(port=9090, storage="ns.db") as nsd:``;
    ``nsd.uri`` is the name server's URI, ``nsd.nameserver`` the object.
    ``autoclean`` (seconds) runs :meth:`NameServer.clean` that often.
    Other arguments are the daemon's.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        secret: str | bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        *,
        storage: str | os.PathLike[str] | None = None,
        max_entries: int = 100_000,
        autoclean: float | None = None,
        threads: int = 8,
        **daemon_options: Any,
    ) -> None:
        if autoclean is not None and autoclean <= 0:
            raise ValueError("autoclean must be a positive number of seconds")
        super().__init__(host, port, secret, ssl, threads=threads, **daemon_options)
        self.nameserver = NameServer(
            storage, max_entries=max_entries, secret=self._secret, ssl=self._client_ssl
        )
        self._register(self.nameserver, NS_OBJECT_ID, force=False)
        self._autoclean = autoclean
        self._cleaner: asyncio.Task[None] | None = None

    @property
    def uri(self) -> str:
        """The name server's URI, ``adist:asyncdist.naming@HOST:PORT``."""
        return self.uri_for(NS_OBJECT_ID)

    async def start(self) -> Self:
        try:
            await super().start()
        except BaseException:
            self.nameserver.close()  # the storage file, opened by the constructor
            raise
        if self._autoclean is not None:
            self._cleaner = asyncio.get_running_loop().create_task(self._clean_every(self._autoclean))
        return self

    async def _clean_every(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.nameserver.clean(timeout=min(period, 5.0))
            except Exception:
                log.exception("name server clean-up failed")

    async def _finish_close(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleaner
        try:
            await super()._finish_close()
        finally:
            self.nameserver.close()


async def _locate(
    host: str | None, port: int | None, secret: str | bytes | None, ssl: _ssl.SSLContext | None, options: Any
) -> Proxy:
    h, p = ns_address(host, port)
    ns = Proxy(URI("adist", NS_OBJECT_ID, h, p), secret=secret, ssl=ssl, connect_attempts=1, **options)
    try:
        await ns._connect()
    except (CommunicationError, UnknownObjectError) as exc:
        raise NamingError(f"cannot locate the name server at {h}:{p}: {exc}") from exc
    return ns


class _Located:
    """``await locate_ns()`` gives the proxy; ``async with locate_ns() as ns`` also releases it."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._proxy: Proxy | None = None

    def __await__(self) -> Generator[Any, None, Proxy]:
        coro: Coroutine[Any, Any, Proxy] = self._factory()
        return coro.__await__()

    async def __aenter__(self) -> Proxy:
        self._proxy = await self._factory()
        return self._proxy

    async def __aexit__(self, *exc_info: object) -> None:
        if self._proxy is not None:
            await self._proxy._release()


def locate_ns(
    host: str | None = None,
    port: int | None = None,
    secret: str | bytes | None = None,
    *,
    ssl: _ssl.SSLContext | None = None,
    **options: Any,
) -> _Located:
    """A connected proxy to the name server: ``ns = await locate_ns()`` or ``async with locate_ns() as ns``.

    ``host``/``port`` default to ``ASYNCDIST_NS_HOST``/``ASYNCDIST_NS_PORT``,
    then 127.0.0.1:9090; the secret to ``ASYNCDIST_SECRET``. Raises
    :class:`~asyncdist.errors.NamingError` (caused by the connection error)
    when no name server answers there. Close it with ``await ns._release()``
    (``async with`` does).
    """
    return _Located(lambda: _locate(host, port, secret, ssl, options))


async def publish(
    name: str,
    uri: str,
    metadata: Sequence[str] = (),
    *,
    ns_host: str | None = None,
    ns_port: int | None = None,
    secret: str | bytes | None = None,
    ssl: _ssl.SSLContext | None = None,
    every: float = 30.0,
) -> None:
    """Keep ``name`` registered: register now, then again every ``every`` seconds, forever.

    Run it as a task beside a daemon (cancel it to stop). A name server
    that restarted without storage, or was unreachable for a while, gets
    the registration back within ``every`` seconds. The first registration
    raises if it fails; later failures are logged and retried.
    """
    first = True
    while True:
        try:
            async with locate_ns(ns_host, ns_port, secret, ssl=ssl) as ns:
                await ns.register(name, uri, list(metadata))
        except (NamingError, CommunicationError, AuthenticationError) as exc:
            if first:
                raise
            log.warning("could not register %r with the name server (%s); retrying in %g s", name, exc, every)
        first = False
        await asyncio.sleep(every)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asyncdist.naming ...``: the same as ``asyncdist ns ...``."""
    from ..cli import main as cli_main

    return cli_main(["ns", *(sys.argv[1:] if argv is None else argv)])
