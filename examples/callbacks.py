"""Futures with callbacks, as_completed and wait (SCOOP's callbacks example, asyncio-style).

Run:  python -m asyncdist -n 2 examples/callbacks.py
"""

import asyncio
import time

import asyncdist


def slow_square(x: int) -> int:
    time.sleep(0.05 * (x % 3))
    return x * x


async def main() -> None:
    def report(fut: asyncio.Future[int]) -> None:
        print(f"callback: a task finished with {fut.result()}")

    futures = []
    for x in range(6):
        fut = asyncdist.submit(slow_square, x)
        fut.add_done_callback(report)
        futures.append(fut)

    async for fut in asyncdist.as_completed(futures):
        print(f"as_completed: {fut.result()}")

    done, pending = await asyncdist.wait(
        [asyncdist.submit(slow_square, x) for x in range(3)], return_when=asyncdist.ALL_COMPLETED
    )
    print(f"wait: {sorted(f.result() for f in done)} done, {len(pending)} pending")

    doomed = asyncdist.submit(time.sleep, 30)
    doomed.cancel()  # also cancels the remote task
    print(f"cancelled: {doomed.cancelled()}")
    await asyncio.sleep(0.2)  # let the pool see the cancellation before it closes


if __name__ == "__main__":
    asyncdist.run(main())
