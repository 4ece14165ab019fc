"""serve_broker(): a Broker behind an asyncdist server."""

from __future__ import annotations

import os
import ssl as _ssl
from typing import Any

from ..server import Server, serve
from ._broker import Broker

__all__ = ["serve_broker"]


async def serve_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    secret: str | bytes | None = None,
    secret_file: str | os.PathLike[str] | None = None,
    ssl: _ssl.SSLContext | None = None,
    insecure: bool = False,
    allowed_failures: int = 3,
    no_workers_timeout: float | None = None,
    **options: Any,
) -> tuple[Broker, Server]:
    """Start a broker listening on ``host:port``; return it and its server.

    Close with ``await server.aclose()``. Without a secret (or mutual TLS)
    pickled functions cannot travel: only functions the workers can import.
    """
    broker = Broker(allowed_failures=allowed_failures, no_workers_timeout=no_workers_timeout)
    server = await serve(
        broker.handlers,
        host,
        port,
        secret=secret,
        secret_file=secret_file,
        ssl=ssl,
        insecure=insecure,
        **options,
    )
    return broker, server
