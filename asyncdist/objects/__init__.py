"""Remote objects (Pyro): ``@expose``, :class:`Daemon`, :class:`Proxy`, URIs.

A :class:`Daemon` serves registered objects; a :class:`Proxy` calls them
with ``await proxy.method(...)``. Exposed objects passed as arguments or
returned travel by reference and arrive as proxies that call back over the
same connection. The name server is in :mod:`asyncdist.naming`.
"""

from ._daemon import DAEMON_OBJECT_ID, Daemon
from ._expose import InstanceMode, behavior, expose, oneway
from ._proxy import DEFAULT_NS_PORT, NS_OBJECT_ID, Batch, Proxy, ns_address
from ._serve import serve
from ._uri import URI

__all__ = [
    "DAEMON_OBJECT_ID",
    "DEFAULT_NS_PORT",
    "NS_OBJECT_ID",
    "URI",
    "Batch",
    "Daemon",
    "InstanceMode",
    "Proxy",
    "behavior",
    "expose",
    "ns_address",
    "oneway",
    "serve",
]
