"""A FastAPI service that awaits a worker pool, a remote object and an RPC service.

The pattern: open the asyncdist clients once, in the app's lifespan, keep them on
``app.state``, and let every request share them. Each is asyncio-native, so a handler
awaits ``pool.map(...)`` (the work runs in worker processes), a method of a remote object
(``asyncdist.Proxy``) or of an RPC service (``rpc.connect``) without blocking the event
loop, and one connection of each carries any number of concurrent requests.

Run it::

    python examples/web/fastapi_app.py [--port 8000]
    curl 'http://127.0.0.1:8000/combined?item=pear&n=5'
    # {"item":"pear","cents":150,"with_vat":180,"squares":[0,1,4,9,16]}

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
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel
from services import Clients, open_clients, spin, square

log = logging.getLogger("fastapi_app")

MAX_N = 1000


# -- the clients, opened in the lifespan ------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        app.state.clients = await open_clients(stack)
        yield
    log.info("asyncdist clients closed")


async def get_clients(request: Request) -> Clients:  # async: no thread hop per request
    clients: Clients = request.app.state.clients
    return clients


ClientsDep = Annotated[Clients, Depends(get_clients)]
N = Annotated[int, Query(ge=0, le=MAX_N)]

app = FastAPI(title="asyncdist in FastAPI", lifespan=lifespan)


# -- the endpoints ------------------------------------------------------------------------------


class Squares(BaseModel):
    n: int
    squares: list[int]


class Spun(BaseModel):
    tasks: int
    ms: int


class Price(BaseModel):
    item: str
    cents: int


class Vat(BaseModel):
    cents: int
    with_vat: int


class Combined(BaseModel):
    item: str
    cents: int
    with_vat: int
    squares: list[int]


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/square")
async def squares(clients: ClientsDep, n: N = 10) -> Squares:
    return Squares(n=n, squares=await clients.pool.map(square, range(n)))


@app.get("/spin")
async def spin_workers(
    clients: ClientsDep,
    tasks: Annotated[int, Query(ge=1, le=MAX_N)] = 4,
    ms: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Spun:
    await clients.pool.map(spin, [ms] * tasks)
    return Spun(tasks=tasks, ms=ms)


async def shop_price(clients: Clients, item: str) -> int:
    try:
        cents: int = await clients.shop.price(item)
    except KeyError:
        raise HTTPException(404, f"no such item: {item}") from None
    return cents


@app.get("/shop/{item}")
async def price(clients: ClientsDep, item: str) -> Price:
    return Price(item=item, cents=await shop_price(clients, item))


@app.get("/rpc/vat")
async def vat(clients: ClientsDep, cents: Annotated[int, Query(ge=0)]) -> Vat:
    return Vat(cents=cents, with_vat=await clients.pricing.root.with_vat(cents))


@app.get("/combined")
async def combined(clients: ClientsDep, item: str = "apple", n: N = 10) -> Combined:
    cents = await shop_price(clients, item)
    async with asyncio.TaskGroup() as tg:  # the RPC call and the map run at the same time
        with_vat = tg.create_task(clients.pricing.root.with_vat(cents))
        squares = tg.create_task(clients.pool.map(square, range(n)))
    return Combined(item=item, cents=cents, with_vat=with_vat.result(), squares=squares.result())


def main() -> None:
    parser = argparse.ArgumentParser(description="asyncdist in a FastAPI service (uvicorn)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
