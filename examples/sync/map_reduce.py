"""The seed's SCOOP mapReduce against a serial map + sum, blocking as in SCOOP.

Run:  python -m asyncdist -n 2 examples/sync/map_reduce.py [N]     (SCOOP's ``python -m scoop``)
 or:  python examples/sync/map_reduce.py [N]

Each task sleeps 10 ms. The seed maps 1000 inputs (10 s for the serial part alone); ``N``
(an argument added here) maps fewer. Only the import differs from the seed, with two
outright bugs fixed: ``sum(inputdata)`` used an undefined name (the parameter is
``inputData``), and the ``if __name__ == "__main__":`` block was indented inside
``compareMapReduce``, so the script did nothing. See README.md.
"""

# The seed's own style, kept: list(generator), str.format with numbered fields.
# ruff: noqa: C400, UP030, UP032

import operator
import sys
import time

from asyncdist import sync as futures

N = 1000  # inputs (the seed's count); an argument gives another


def simulateWorkload(inputData):
    # simulate a real computational workload
    time.sleep(0.01)
    return sum(inputData)  # the seed: sum(inputdata), an undefined name


def compareMapReduce():
    # SCOOP's MapReduce
    mapScoopTime = time.time()
    # argument 1: the callable run as futures; it must return a value
    # argument 2: the reduction of the futures' results: two arguments, one value
    # argument 3: the iterable whose items go to the callable, each as a future of its own
    res = futures.mapReduce(
        simulateWorkload,
        operator.add,
        list([a] * a for a in range(N)),
    )
    mapScoopTime = time.time() - mapScoopTime
    print("futures.map in SCOOP executed in {0:3f}s with result: {1}".format(mapScoopTime, res))
    # the serial MapReduce
    mapPythonTime = time.time()
    # map(): argument 1 the function, argument 2 the iterable; sum() reduces the results
    res = sum(map(simulateWorkload, list([a] * a for a in range(N))))
    mapPythonTime = time.time() - mapPythonTime
    print("map python executed in: {0:.3f}s with result: {1}".format(mapPythonTime, res))


if __name__ == "__main__":  # the seed indented this block inside compareMapReduce
    if len(sys.argv) > 1:
        N = int(sys.argv[1])
    compareMapReduce()
