"""SCOOP's recursion example: every task maps two children, down to 2**depth leaves.

Tasks await futures of their own; thousands wait at once on the workers'
event loops without blocking a slot. Run:  python -m asyncdist -n 2 examples/recurse.py [depth]
"""

import sys
import time

import asyncdist


async def recursive_func(level: int) -> int:
    if level == 0:
        return 1
    results = await asyncdist.map(recursive_func, [level - 1] * 2)
    return sum(results)


async def main(depth: int) -> None:
    started = time.time()
    leaves = await asyncdist.submit(recursive_func, depth)
    print(f"{leaves} leaves from depth {depth} in {time.time() - started:.2f}s")
    assert leaves == 2**depth


if __name__ == "__main__":
    asyncdist.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 12))
