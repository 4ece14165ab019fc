"""Callbacks both ways: the client calls the server, and the server calls back into the client.

Run:  python examples/rpc/callbacks.py
      (starts the server in this process, on a free port, then runs the client against it)
 or, with the server in a process of its own:
      cd examples/rpc && python -m asyncdist rpc --service callbacks:ComputeService --port 18861
      python examples/rpc/callbacks.py --connect 127.0.0.1:18861

RPC is symmetric: the client offers a service too (``connect(..., service=)``)
and the server reaches it as ``conn.root`` (the ``conn`` of its
``on_connect`` hook). Three kinds of call-back are shown:

1. the server calls the client's own service: ``hello`` asks the client its
   name (``await self.client.name()``) before it answers;
2. a function passed as an argument arrives as a netref, and the server
   calls it (``await progress(done, n)``) to report progress during a long
   computation (its chunks run in a thread, off the event loop);
3. calls nest to any depth: the server's ``ping`` calls the client's
   ``pong``, which calls the server's ``ping`` again, and so on down to 0.

It prints (the same on every run):

    hello, callbacks-client: you are connection #1 of this service
    progress: 25% (250000 of 1000000)
    progress: 50% (500000 of 1000000)
    progress: 75% (750000 of 1000000)
    progress: 100% (1000000 of 1000000)
    sum of squares below 1000000 = 333332833333500000
    ping-pong: server 5 > client 4 > server 3 > client 2 > server 1 > client 0
    the server called back here 8 times: {'name': 1, 'progress': 4, 'pong': 3}
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
from typing import Any

import asyncdist
from asyncdist import rpc

# Numbers the server's connections (one ComputeService instance each).
_connection_numbers = itertools.count(1)


def _sum_of_squares(start: int, stop: int) -> int:
    return sum(i * i for i in range(start, stop))


class ComputeService(rpc.Service):
    """The server's service: one instance per connection."""

    def __init__(self) -> None:
        self.number = next(_connection_numbers)
        self.client: rpc.Netref | None = None  # the client's service (its conn.root)

    def on_connect(self, conn: rpc.Connection) -> None:
        self.client = conn.root

    async def exposed_hello(self) -> str:
        """A greeting, with the name the server asks the client's own service for."""
        assert self.client is not None
        try:
            name = await self.client.name()  # the server calling the client's service
        except AttributeError:  # a client without a service of its own (or without name)
            name = "anonymous client"
        return f"hello, {name}: you are connection #{self.number} of this service"

    async def exposed_sum_of_squares(self, n: int, progress: rpc.Netref, chunks: int = 4) -> int:
        """Sum i*i for i < n in ``chunks`` chunks, calling ``progress(done, n)`` after each one.

        ``progress`` is the client's function (a netref): each call runs
        there, and is awaited, so the reports arrive in order and before
        the result.
        """
        total = 0
        bounds = [n * k // chunks for k in range(chunks + 1)]
        for start, stop in itertools.pairwise(bounds):
            total += await asyncio.to_thread(_sum_of_squares, start, stop)  # off the event loop
            await progress(stop, n)
        return total

    async def exposed_ping(self, n: int) -> list[str]:
        """``server n``, then (while n > 0) what the client's ``pong(n - 1)`` answers."""
        trace = [f"server {n}"]
        if n > 0:
            assert self.client is not None
            trace += await self.client.pong(n - 1)
        return trace


class ClientService(rpc.Service):
    """The client's service: what the server may call back here."""

    def __init__(self) -> None:
        self.server: rpc.Netref | None = None  # the server's service (this side's conn.root)
        self.calls: collections.Counter[str] = collections.Counter()  # the server's calls, by name

    def on_connect(self, conn: rpc.Connection) -> None:
        self.server = conn.root

    def exposed_name(self) -> str:
        self.calls["name"] += 1
        return "callbacks-client"

    async def exposed_pong(self, n: int) -> list[str]:
        """``client n``, then (while n > 0) what the server's ``ping(n - 1)`` answers."""
        self.calls["pong"] += 1
        trace = [f"client {n}"]
        if n > 0:
            assert self.server is not None
            trace += await self.server.ping(n - 1)
        return trace


async def client(host: str, port: int) -> None:
    async with rpc.connect(host, port, service=ClientService) as conn:
        print(await conn.root.hello())

        def progress(done: int, n: int) -> None:  # called by the server, runs here
            conn.service.calls["progress"] += 1
            print(f"progress: {100 * done // n}% ({done} of {n})")

        n = 1_000_000
        total = await conn.root.sum_of_squares(n, progress)
        assert total == (n - 1) * n * (2 * n - 1) // 6
        print(f"sum of squares below {n} = {total}")

        trace = await conn.root.ping(5)
        print("ping-pong: " + " > ".join(trace))
        calls = conn.service.calls
        print(f"the server called back here {calls.total()} times: {dict(calls)}")


async def main(connect: str | None) -> None:
    if connect is not None:
        host, _, port = connect.rpartition(":")
        await client(host, int(port))
        return
    # The server in this process, on a free port (port 0), closed at the end of the block.
    async with rpc.serve(ComputeService, "127.0.0.1", 0) as server:
        await client("127.0.0.1", server.port)


def parse_args(argv: Any = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connect", metavar="HOST:PORT", help="use this server instead of starting one")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncdist.run(main(parse_args().connect))
