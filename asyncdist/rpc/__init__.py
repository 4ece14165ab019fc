"""Symmetric RPC (RPyC): services, netrefs, callbacks to any depth, and classic mode.

::

    from asyncdist import rpc

    class Echo(rpc.Service):
        def exposed_echo(self, x):            # plain: runs on the loop, must not block
            return x

        async def exposed_twice(self, f, x):  # async: may call back into the client
            return await f(await f(x))

    async with rpc.serve(Echo, port=18861):
        async with rpc.connect("127.0.0.1", 18861) as conn:
            await conn.root.echo(1)                            # 1
            await conn.root.twice(lambda x: x + 1, 1)          # 3: the server calls back twice

Either side may call the other: a client passes its own ``service=`` to
:func:`connect`, and the server reaches it as ``conn.root`` in the
:meth:`Service.on_connect` hook's ``conn``. Values of msgpack's types
(None, bool, int, float, str, bytes, list, dict, and tuple, set, frozenset)
and types registered with :func:`asyncdist.codec.register_type` travel by
value; every other object travels by reference and arrives as a
:class:`Netref` (see :mod:`asyncdist.rpc._netref` for what one does). A
netref sent back to its owner arrives as the object itself.

Only exposed members are reachable (``exposed_NAME`` or :func:`exposed`;
never names starting with ``_``, never dotted names), unless
``allow_public_attrs=True``. Nothing is ever pickled on an RPC connection.
Classic mode (:mod:`asyncdist.rpc.classic`) is off unless a server is
started with ``allow_classic=True``.
"""

from . import classic
from ._netref import Netref, getattr, len, repr, setattr, str
from ._service import Service, exposed
from ._session import Connection, Server, connect, serve

__all__ = [
    "Connection",
    "Netref",
    "Server",
    "Service",
    "classic",
    "connect",
    "exposed",
    "getattr",
    "len",
    "repr",
    "serve",
    "setattr",
    "str",
]
