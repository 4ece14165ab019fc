"""What the web examples share: the tasks, the demo servers, and opening the asyncdist clients.

``fastapi_app.py`` and ``aiohttp_app.py`` open the same three clients (a Pool, a Proxy to a
remote Shop, an RPC connection to a PricingService) with :func:`open_clients`, each in its
framework's own startup hook. The tasks are module-level functions here, so that the
workers import them by name (they get the app's sys.path, where this directory is).

In production the cluster, the Shop and the RPC service are other processes, named by
environment variables; each one that is not set is replaced by a demo started with the
clients, so that the examples run as they are:

    ASYNCDIST_BROKER    host:port of a broker to join (``asyncdist broker``, with workers
                        started by ``asyncdist-worker``); else a local Pool of 2 worker processes
    ASYNCDIST_SECRET    the shared secret of the broker, the daemon and the RPC server
    ASYNCDIST_SHOP_URI  the Shop's URI (``adist:ID@HOST:PORT``, or ``adistname:NAME`` through
                        the name server); else an ``asyncdist.Daemon`` here serves one
    ASYNCDIST_RPC_ADDR  host:port of an RPC server of PricingService (``cd examples/web &&
                        asyncdist rpc --service services:PricingService``); else one here
"""

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import asyncdist
from asyncdist import rpc

log = logging.getLogger("web_services")


# -- tasks for the pool (module level, so that the workers can import them) ------------------


def square(x: int) -> int:
    return x * x


def spin(ms: int) -> None:
    """CPU-bound work: keep one CPU busy for ``ms`` milliseconds."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


# -- the demo servers (in production: other processes) ---------------------------------------


@asyncdist.expose
class Shop:
    """A remote object, served by a Daemon: prices in cents."""

    def __init__(self, prices: dict[str, int] | None = None) -> None:
        self._prices = prices or {"apple": 120, "pear": 150, "plum": 80}

    def price(self, item: str) -> int:
        return self._prices[item]  # a KeyError reaches the caller as a KeyError


class PricingService(rpc.Service):
    """An RPC service."""

    vat_percent = 20

    def exposed_with_vat(self, cents: int) -> int:
        return cents * (100 + self.vat_percent) // 100


# -- the clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clients:
    """The asyncdist clients, opened once and shared by every request."""

    pool: asyncdist.Pool
    shop: asyncdist.Proxy
    pricing: rpc.Connection


def make_pool() -> asyncdist.Pool:
    """Join the cluster at ASYNCDIST_BROKER, else start 2 local workers (at nice 10)."""
    if broker := os.environ.get("ASYNCDIST_BROKER"):
        return asyncdist.Pool(broker=broker, secret=os.environ.get("ASYNCDIST_SECRET"))
    return asyncdist.Pool(workers=2)


async def open_clients(stack: contextlib.AsyncExitStack) -> Clients:
    """Open the clients (and the demo servers that are needed); ``stack`` closes them."""
    shop_uri = os.environ.get("ASYNCDIST_SHOP_URI")
    if not shop_uri:
        daemon = await stack.enter_async_context(asyncdist.Daemon())
        shop_uri = daemon.register(Shop())
    rpc_addr = os.environ.get("ASYNCDIST_RPC_ADDR")
    if not rpc_addr:
        server = await stack.enter_async_context(rpc.serve(PricingService, port=0))
        rpc_addr = f"127.0.0.1:{server.port}"
    host, port = asyncdist.parse_address(rpc_addr)
    clients = Clients(
        pool=await stack.enter_async_context(make_pool()),
        shop=await stack.enter_async_context(asyncdist.Proxy(shop_uri, timeout=10)),
        pricing=await stack.enter_async_context(rpc.connect(host, port)),
    )
    log.info("asyncdist clients open: %r, shop %s, pricing at %s", clients.pool, shop_uri, rpc_addr)
    return clients
