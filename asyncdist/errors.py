"""The one exception tree of asyncdist, split by who is to blame.

::

    AsyncDistError
    ├── CommunicationError            the transport failed (also a builtin ConnectionError)
    │   ├── ConnectError              no connection could be made: refused, unreachable, timed out
    │   └── ConnectionClosed          an established connection ended; its pending calls fail with it
    │       ├── ConnectionClosedOK    ... cleanly: close() here, or a CLOSE from the peer
    │       └── ConnectionClosedError ... abnormally: reset, EOF, heartbeat timeout, protocol error
    │           ├── BrokerLost        the futures broker went away; its pending tasks fail with it
    │           └── MasterLost        the MapReduce master went away while a job was awaited
    ├── ProtocolError                 the peer broke the wire protocol (malformed, oversized, out of order)
    ├── AuthenticationError           the handshake failed: wrong or missing secret, bad proof
    │   └── TLSError                  the TLS handshake or certificate verification failed
    ├── SerializationError            a value cannot be sent, or a payload kind is refused here
    │                                 (also a builtin TypeError)
    ├── RemoteError                   remote code raised an exception whose type is not rebuilt here
    ├── UnknownMethodError            the peer has no handler of that name (also AttributeError)
    ├── ConfigurationError            a setting is unsafe or invalid (also a builtin ValueError)
    ├── WorkerLost                    a task's worker died too many times (futures)
    ├── NoWorkersError                no worker joined within no_workers_timeout (futures)
    ├── NamingError                   a name is not registered, or the name server refused it
    │                                 (objects; also a builtin LookupError)
    ├── UnknownObjectError            no object with that id is registered in the daemon
    │                                 (objects; also a builtin LookupError)
    ├── ChannelEnded                  csp: the channel cannot be used any more
    │   ├── ChannelPoisoned           ... it was poisoned (csp.poison)
    │   └── ChannelRetired            ... every writer (or every reader) retired (csp.retire)
    └── DeployError                   a role could not be started on a host over SSH: unreachable,
                                      refused key, unknown host key, no Python (spawn)

Timeouts are the builtin :class:`TimeoutError`, as raised by :func:`asyncio.timeout`.

Remote exceptions travel as type name, arguments, message and traceback text.
They are rebuilt as their own class only when it is on the allow-list:
exception classes of :mod:`builtins` (subclasses of :class:`Exception`),
classes of this module, and classes passed to :func:`register_error`. Nothing
is imported or unpickled to rebuild one; any other type arrives as
:class:`RemoteError`. Either way the remote traceback text is in the
``remote_traceback`` attribute and in a note on the exception.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "AsyncDistError",
    "AuthenticationError",
    "ChannelEnded",
    "ChannelPoisoned",
    "ChannelRetired",
    "BrokerLost",
    "MasterLost",
    "CommunicationError",
    "ConfigurationError",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "DeployError",
    "NamingError",
    "NoWorkersError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "TLSError",
    "UnknownMethodError",
    "UnknownObjectError",
    "WorkerLost",
    "register_error",
    "rebuild_exception",
    "exception_type_name",
]


class AsyncDistError(Exception):
    """Base class of every exception that asyncdist raises."""


class CommunicationError(AsyncDistError, ConnectionError):
    """The transport failed: no connection could be made, or it ended."""


class ConnectError(CommunicationError):
    """A connection could not be established (refused, unreachable, connect timeout)."""


class ConnectionClosed(CommunicationError):
    """The connection is closed; calls pending on it, and calls made after, raise this."""


class ConnectionClosedOK(ConnectionClosed):
    """The connection was closed cleanly, by :meth:`close` here or by the peer's CLOSE."""


class ConnectionClosedError(ConnectionClosed):
    """The connection ended abnormally; ``__cause__`` holds the reason when there is one."""


class ProtocolError(AsyncDistError):
    """The peer broke the wire protocol; the connection to it is closed."""


class AuthenticationError(AsyncDistError):
    """The handshake failed: wrong or missing secret, or a proof that does not verify."""


class TLSError(AuthenticationError):
    """The TLS handshake failed or a certificate did not verify."""


class SerializationError(AsyncDistError, TypeError):
    """A value cannot be encoded for the wire, or a payload kind is refused on this connection."""


class UnknownMethodError(AsyncDistError, AttributeError):
    """The peer has no handler registered under the called name."""


class ConfigurationError(AsyncDistError, ValueError):
    """A setting is invalid or unsafe, e.g. a public bind address without a secret or TLS."""


class BrokerLost(ConnectionClosedError):
    """The connection to the futures broker was lost; tasks pending on it fail with this."""


class MasterLost(ConnectionClosedError):
    """The connection to the MapReduce master was lost while waiting for a job."""


class WorkerLost(AsyncDistError):
    """A task was running on workers that died, more times than ``allowed_failures`` allows.

    The message names the task and the last worker; ``attempts`` is how many
    workers it was started on.
    """

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message, attempts)
        self.attempts = attempts

    def __str__(self) -> str:
        return str(self.args[0])


class NoWorkersError(AsyncDistError):
    """Tasks were queued and no worker was connected for ``no_workers_timeout`` seconds."""


class NamingError(AsyncDistError, LookupError):
    """A name is not registered with the name server, or the name server refused a request."""


class UnknownObjectError(AsyncDistError, LookupError):
    """The daemon has no object registered under the requested id (never registered, or gone)."""


class DeployError(AsyncDistError):
    """A role could not be started on a host: ``host`` names it and ``reason`` says why."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(host, reason)
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.host}: {self.reason}"


class ChannelEnded(AsyncDistError):
    """A CSP channel end can no longer be used: the channel was poisoned or retired."""


class ChannelPoisoned(ChannelEnded):
    """The channel was poisoned: every pending and later read or write on it raises this."""


class ChannelRetired(ChannelEnded):
    """Every writer (for a reader) or every reader (for a writer) of the channel has retired."""


class RemoteError(AsyncDistError):
    """Remote code raised an exception whose type is not on the local allow-list.

    Attributes: ``type_name`` (the remote class as ``module.QualName``),
    ``message`` (``str()`` of the remote exception), ``remote_args`` (its
    arguments as far as they could be sent) and ``remote_traceback``.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str = "",
        remote_args: Sequence[Any] = (),
    ) -> None:
        super().__init__(type_name, message, remote_traceback, tuple(remote_args))
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.remote_args = tuple(remote_args)

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


_E = TypeVar("_E", bound=type[BaseException])

# "module.QualName" -> class; only these (and builtins) are ever rebuilt.
_registered: dict[str, type[BaseException]] = {}


def exception_type_name(cls: type[BaseException]) -> str:
    """Return the wire name of an exception class: ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_error(cls: _E) -> _E:
    """Allow remote exceptions of class ``cls`` to be rebuilt as ``cls`` here.

    Usable as a class decorator. The class must accept its own ``args`` back
    (``cls(*exc.args)``), as builtin exceptions do; when rebuilding fails the
    exception arrives as :class:`RemoteError` instead.
    """
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        raise TypeError(f"register_error() needs an Exception subclass, not {cls!r}")
    _registered[exception_type_name(cls)] = cls
    return cls


def _allowed(type_name: str) -> type[BaseException] | None:
    cls = _registered.get(type_name)
    if cls is not None:
        return cls
    module, _, name = type_name.rpartition(".")
    if module == "builtins" and name.isidentifier():
        obj = getattr(builtins, name, None)
        if isinstance(obj, type) and issubclass(obj, Exception):
            return obj
    return None


def rebuild_exception(
    type_name: str, args: Sequence[Any], message: str, remote_traceback: str
) -> BaseException:
    """Rebuild a remote exception from its wire fields, without importing anything.

    Returns an instance of the original class when it is on the allow-list
    and accepts its arguments back, otherwise a :class:`RemoteError`. The
    remote traceback text is attached as ``remote_traceback`` and as a note.
    """
    cls = _allowed(type_name)
    exc: BaseException | None = None
    if cls is not None:
        try:
            exc = cls(*args)
        except Exception:
            exc = None
        if exc is not None and str(exc) != message:
            # The class does not round-trip through its args: do not pretend it does.
            exc = None
    if exc is None:
        exc = RemoteError(type_name, message, remote_traceback, args)
    exc.remote_traceback = remote_traceback  # type: ignore[attr-defined]
    if remote_traceback:
        exc.add_note("Remote traceback:\n" + remote_traceback.rstrip("\n"))
    return exc


for _cls in (
    AsyncDistError,
    CommunicationError,
    ConnectError,
    ConnectionClosed,
    ConnectionClosedOK,
    ConnectionClosedError,
    ProtocolError,
    AuthenticationError,
    TLSError,
    SerializationError,
    UnknownMethodError,
    ConfigurationError,
    RemoteError,
    BrokerLost,
    MasterLost,
    WorkerLost,
    NoWorkersError,
    NamingError,
    UnknownObjectError,
    ChannelEnded,
    ChannelPoisoned,
    ChannelRetired,
    DeployError,
):
    register_error(_cls)
