"""The seed's mapReduce against serial map + sum, on asyncdist futures.

Each task simulates a 10 ms workload. Run:  python -m asyncdist -n 2 examples/map_reduce.py
"""

import operator
import sys
import time

import asyncdist


def simulate_workload(input_data: list[int]) -> int:
    time.sleep(0.01)  # a real computation would be here
    return sum(input_data)


async def compare_map_reduce(n: int) -> None:
    data = [[a] * a for a in range(n)]
    started = time.time()
    # map simulate_workload over the inputs, then reduce the results with operator.add
    res = await asyncdist.map_reduce(simulate_workload, operator.add, data)
    elapsed = time.time() - started
    print(f"asyncdist.map_reduce executed in {elapsed:.3f}s with result: {res}")

    started = time.time()
    res = sum(map(simulate_workload, data))
    elapsed = time.time() - started
    print(f"map python executed in: {elapsed:.3f}s with result: {res}")


if __name__ == "__main__":
    # The seed uses 1000 inputs; pass a smaller count for a quick run.
    asyncdist.run(compare_map_reduce(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
