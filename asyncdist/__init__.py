"""asyncdist: asyncio-native distributed computing on one authenticated transport.

The names below are the public API; see ``shared/DESIGN.md`` and the README.
"""

from ._version import __version__
from .codec import ObjectRef, register_type
from .connection import Connection, Options, Stream, connect, current_connection, parse_address
from .errors import (
    AsyncDistError,
    AuthenticationError,
    CommunicationError,
    ConfigurationError,
    ConnectError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ProtocolError,
    RemoteError,
    SerializationError,
    TLSError,
    UnknownMethodError,
    register_error,
)
from .loop import run
from .server import Server, serve

__all__ = [
    "AsyncDistError",
    "AuthenticationError",
    "CommunicationError",
    "ConfigurationError",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "ObjectRef",
    "Options",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "Server",
    "Stream",
    "TLSError",
    "UnknownMethodError",
    "__version__",
    "connect",
    "current_connection",
    "parse_address",
    "register_error",
    "register_type",
    "run",
    "serve",
]
