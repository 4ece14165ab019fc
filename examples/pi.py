"""Monte Carlo estimate of pi (the seed's SCOOP example), on asyncdist futures.

Run:  python -m asyncdist -n 2 examples/pi.py      (a broker and 2 workers)
 or:  python examples/pi.py                          (a local pool on first use)
"""

import math
import time
from random import random

import asyncdist


def evaluate_points_in_circle(attempts: int) -> int:
    """Count how many of `attempts` random points of the unit square fall in the unit disk."""
    points_fallen_in_unit_disk = 0
    for _ in range(attempts):
        x, y = random(), random()
        if math.sqrt(x * x + y * y) < 1:
            points_fallen_in_unit_disk += 1
    return points_fallen_in_unit_disk


async def pi_with_monte_carlo(workers: int, attempts: int) -> float:
    print(f"number of workers {workers} - number of attempts {attempts}")
    started = time.time()
    # One task per "worker" slot of the original example, each counting `attempts` points.
    counts = await asyncdist.map(evaluate_points_in_circle, [attempts] * workers)
    inside = sum(counts)
    print(f"{inside // attempts} points fallen in a unit disk after")
    pi_value = 4.0 * inside / float(workers * attempts)
    print(f"value of pi = {pi_value}")
    print(f"error percentage = {abs(pi_value - math.pi) * 100 / math.pi}")
    print(f"total time: {time.time() - started}")
    return pi_value


async def main() -> None:
    for i in range(1, 4):
        await pi_with_monte_carlo(i * 1000, i * 1000)
        print(" ")


if __name__ == "__main__":
    asyncdist.run(main())
