"""A peer process for the tests: an asyncdist server on 127.0.0.1 in its own process.

``python tests/_peer.py`` prints the server's port on one line, then serves
until it is killed or its standard input reaches end of file (so a test
runner that dies does not leave it behind). Handlers: ``echo(x)``,
``sleep(seconds)`` (async) and ``pid()``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncdist


def echo(x: Any) -> Any:
    return x


async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_stdin() -> None:
        if not os.read(0, 4096) and not stop.done():
            stop.set_result(None)

    loop.add_reader(0, on_stdin)
    try:
        async with asyncdist.serve({"echo": echo, "sleep": sleep, "pid": os.getpid}) as server:
            print(server.port, flush=True)
            await stop
    finally:
        loop.remove_reader(0)


if __name__ == "__main__":
    asyncdist.run(main())
