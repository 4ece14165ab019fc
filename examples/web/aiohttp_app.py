"""An aiohttp service that awaits a worker pool, a remote object and an RPC service.

The pattern: open the asyncdist clients once, in a cleanup context (``app.cleanup_ctx``:
the code before its ``yield`` runs at startup, the code after it at cleanup), keep them in
``app[CLIENTS]``, and let every request share them. Each is asyncio-native, so a handler
awaits ``pool.map(...)`` (the work runs in worker processes), a method of a remote object
(``asyncdist.Proxy``) or of an RPC service (``rpc.connect``) without blocking the event
loop, and one connection of each carries any number of concurrent requests.

Run it::

    python examples/web/aiohttp_app.py [--port 8080]
    curl 'http://127.0.0.1:8080/combined?item=pear&n=5'
    # {"item": "pear", "cents": 150, "with_vat": 180, "squares": [0, 1, 4, 9, 16]}

Endpoints (GET, JSON):

    /health                   {"status": "ok"}, answered by the event loop alone
    /square?n=5               await pool.map(square, range(n))
    /spin?tasks=4&ms=100      CPU-bound tasks: the local workers run at nice 10, so the
                              service stays responsive while they compute
    /shop/apple               a call on the remote Shop object (404 for an unknown item)
    /rpc/vat?cents=120        a call to the RPC pricing service
    /combined?item=apple&n=5  all three: the Shop's price, then its VAT and the squares at once

In production the cluster, the Shop and the RPC service are other processes, named by the
environment variables ASYNCDIST_BROKER (+ ASYNCDIST_SECRET), ASYNCDIST_SHOP_URI and
ASYNCDIST_RPC_ADDR; each one that is not set is replaced by a demo started with the clients,
so that this file runs as it is (see ``services.py``).

The tasks, the demo servers and the opening of the clients are in ``services.py`` beside this
file (shared with the other web example); the workers import the tasks from it by name (they
get this process's sys.path).
"""

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from services import Clients, open_clients, spin, square

log = logging.getLogger("aiohttp_app")

MAX_N = 1000


# -- the clients, opened in a cleanup context ------------------------------------------------


CLIENTS = web.AppKey("clients", Clients)


async def asyncdist_clients(app: web.Application) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        app[CLIENTS] = await open_clients(stack)
        yield
    log.info("asyncdist clients closed")


# -- the endpoints ------------------------------------------------------------------------------

routes = web.RouteTableDef()


def int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int:
    """The query parameter ``name``, an integer from ``low`` to ``high`` (else 400 Bad Request)."""
    raw = request.query.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(raw or "")
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be an integer from {low} to {high}")
    return value


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/square")
async def squares(request: web.Request) -> web.Response:
    n = int_param(request, "n", 10, 0, MAX_N)
    squares = await request.app[CLIENTS].pool.map(square, range(n))
    return web.json_response({"n": n, "squares": squares})


@routes.get("/spin")
async def spin_workers(request: web.Request) -> web.Response:
    tasks = int_param(request, "tasks", 4, 1, MAX_N)
    ms = int_param(request, "ms", 100, 1, 10_000)
    await request.app[CLIENTS].pool.map(spin, [ms] * tasks)
    return web.json_response({"tasks": tasks, "ms": ms})


async def shop_price(clients: Clients, item: str) -> int:
    try:
        cents: int = await clients.shop.price(item)
    except KeyError:
        raise web.HTTPNotFound(text=f"no such item: {item}") from None
    return cents


@routes.get("/shop/{item}")
async def price(request: web.Request) -> web.Response:
    item = request.match_info["item"]
    return web.json_response({"item": item, "cents": await shop_price(request.app[CLIENTS], item)})


@routes.get("/rpc/vat")
async def vat(request: web.Request) -> web.Response:
    cents = int_param(request, "cents", None, 0, 10**12)
    with_vat = await request.app[CLIENTS].pricing.root.with_vat(cents)
    return web.json_response({"cents": cents, "with_vat": with_vat})


@routes.get("/combined")
async def combined(request: web.Request) -> web.Response:
    clients = request.app[CLIENTS]
    item = request.query.get("item", "apple")
    n = int_param(request, "n", 10, 0, MAX_N)
    cents = await shop_price(clients, item)
    async with asyncio.TaskGroup() as tg:  # the RPC call and the map run at the same time
        with_vat = tg.create_task(clients.pricing.root.with_vat(cents))
        squares = tg.create_task(clients.pool.map(square, range(n)))
    body = {"item": item, "cents": cents, "with_vat": with_vat.result(), "squares": squares.result()}
    return web.json_response(body)


def create_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(asyncdist_clients)
    app.add_routes(routes)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="asyncdist in an aiohttp service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s: %(message)s")
    web.run_app(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
