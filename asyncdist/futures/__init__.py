"""Distributed futures (SCOOP re-created): a broker, workers, and ``await map(...)``.

::

    async with asyncdist.Pool(workers=4) as pool:      # a broker here, 4 worker processes
        ys = await pool.map(f, xs)                       # ordered results
        async for y in pool.map_as_completed(f, xs): ...
        total = await pool.map_reduce(f, operator.add, xs)
        fut = pool.submit(f, 1, key=2)                   # an awaitable future
    ys = await asyncdist.map(f, xs)                      # the current or default pool

    $ asyncdist broker --port 5555                       # a standalone broker
    $ asyncdist-worker --broker host:5555 --secret-file cluster.secret
    $ python -m asyncdist -n 4 script.py                 # SCOOP's launcher

Functions travel by reference when the workers can import them and by
value (cloudpickle) otherwise, over authenticated connections only. See
``_broker`` for the messages and the fault semantics.
"""

from . import shared
from ._broker import Broker
from ._client import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Pool,
    TaskFuture,
    as_completed,
    close_default_pool,
    current_pool,
    default_pool,
    map,
    map_as_completed,
    map_reduce,
    map_scan,
    submit,
    wait,
)
from ._serve import serve_broker
from ._worker import Worker, current_worker, run_worker

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Broker",
    "Pool",
    "TaskFuture",
    "Worker",
    "as_completed",
    "close_default_pool",
    "current_pool",
    "current_worker",
    "default_pool",
    "map",
    "map_as_completed",
    "map_reduce",
    "map_scan",
    "run_worker",
    "serve_broker",
    "shared",
    "submit",
    "wait",
]
