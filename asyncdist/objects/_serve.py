"""``serve()``: Pyro's one-call server, a daemon whose objects are named in the name server."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from ssl import SSLContext
from typing import Any

from .._log import get_logger
from ..errors import CommunicationError, NamingError
from ._daemon import Daemon

__all__ = ["serve"]

log = get_logger("asyncdist.objects")


async def serve(
    objects: Mapping[Any, str | None],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    use_ns: bool = True,
    ns_host: str | None = None,
    ns_port: int | None = None,
    secret: str | bytes | None = None,
    ssl: SSLContext | None = None,
    verbose: bool = True,
    ready: Callable[[Daemon, dict[str, str]], None] | None = None,
    daemon: Daemon | None = None,
    **daemon_options: Any,
) -> None:
    """Serve ``{object_or_class: name}`` until cancelled (Pyro's ``serve``).

    Starts a :class:`Daemon` on ``host``:``port`` (or uses ``daemon``, started
    or not, whose own address and options then apply), registers each object
    or class, and, with ``use_ns``, registers each name (``None``: no name)
    in the name server at ``ns_host``/``ns_port``, which must be running.
    With ``verbose`` it prints each URI; ``ready(daemon, {name_or_uri: uri})``
    is called once everything is registered. When the task is cancelled (or
    the daemon closed), the names it registered are removed from the name
    server, best effort, and the daemon closes.
    """
    if daemon is None:
        daemon = Daemon(host, port, secret, ssl, **daemon_options)
    elif daemon_options:
        raise TypeError(f"options for a new daemon, with a daemon given: {sorted(daemon_options)}")
    async with contextlib.AsyncExitStack() as stack:
        if daemon._server is None:  # not started yet
            await daemon.start()
        stack.push_async_callback(daemon.aclose)
        uris: dict[str, str] = {}
        for obj, name in objects.items():
            uri = daemon.register(obj)
            uris[name or uri] = uri
        named = {name: uris[name] for obj, name in objects.items() if name}
        if use_ns and named:
            from ..naming import locate_ns  # naming imports this package: import when used

            async with locate_ns(ns_host, ns_port, secret, ssl=ssl) as ns:
                for name, uri in named.items():
                    await ns.register(name, uri)
        if verbose:
            for name, uri in uris.items():
                print(f"{name}: {uri}" if name != uri else uri, flush=True)
        if ready is not None:
            ready(daemon, uris)
        try:
            await daemon.serve_forever()
        finally:
            if use_ns and named:
                await _unname(named, ns_host, ns_port, secret, ssl)


async def _unname(
    named: dict[str, str], host: str | None, port: int | None, secret: Any, ssl: SSLContext | None
) -> None:
    from ..naming import locate_ns

    with contextlib.suppress(NamingError, CommunicationError, TimeoutError):
        async with locate_ns(host, port, secret, ssl=ssl, handshake_timeout=2.0) as ns:
            for name, uri in named.items():
                with contextlib.suppress(NamingError):
                    # Only a name that still points here: another server may have taken it over.
                    if await ns.lookup(name) == uri:
                        await ns.remove(name)
