"""asyncdist: asyncio-native distributed computing on one authenticated transport.

The names below are the public API; see the README. ``asyncdist.map`` and
friends are the distributed futures of :mod:`asyncdist.futures` (they shadow
the builtin ``map`` only inside this namespace).
"""

from ._version import __version__
from .codec import ObjectRef, register_type
from .connection import Connection, Options, Stream, connect, current_connection, parse_address
from .errors import (
    AsyncDistError,
    AuthenticationError,
    BrokerLost,
    CommunicationError,
    ConfigurationError,
    ConnectError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    DeployError,
    MasterLost,
    NamingError,
    NoWorkersError,
    ProtocolError,
    RemoteError,
    SerializationError,
    TLSError,
    UnknownMethodError,
    UnknownObjectError,
    WorkerLost,
    register_error,
)
from .futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Pool,
    TaskFuture,
    as_completed,
    map,
    map_as_completed,
    map_reduce,
    map_scan,
    shared,
    submit,
    wait,
)
from .loop import run
from .naming import locate_ns
from .objects import Daemon, Proxy, behavior, expose, oneway
from .server import Server, serve

__all__ = [
    "ALL_COMPLETED",
    "AsyncDistError",
    "AuthenticationError",
    "BrokerLost",
    "CommunicationError",
    "ConfigurationError",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "Daemon",
    "DeployError",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "MasterLost",
    "NamingError",
    "NoWorkersError",
    "ObjectRef",
    "Options",
    "Pool",
    "ProtocolError",
    "Proxy",
    "RemoteError",
    "SSHCluster",
    "SerializationError",
    "Server",
    "Stream",
    "TLSError",
    "TaskFuture",
    "UnknownMethodError",
    "UnknownObjectError",
    "WorkerLost",
    "__version__",
    "as_completed",
    "behavior",
    "connect",
    "current_connection",
    "expose",
    "locate_ns",
    "map",
    "map_as_completed",
    "map_reduce",
    "map_scan",
    "oneway",
    "parse_address",
    "register_error",
    "register_type",
    "run",
    "serve",
    "shared",
    "submit",
    "wait",
]

#: Names imported on first use: SSHCluster pulls in asyncssh, which workers do not need.
_LAZY = {"SSHCluster": "cluster"}
#: Submodules imported on first use as attributes (``asyncdist.sync.map(...)``).
_LAZY_MODULES = frozenset({"sync"})


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"asyncdist.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"asyncdist.{module}"), name)
    globals()[name] = value
    return value
