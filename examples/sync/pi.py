"""The seed's SCOOP example, blocking as in SCOOP: Monte Carlo pi with ``futures.map``.

Run:  python -m asyncdist -n 2 examples/sync/pi.py      (SCOOP's ``python -m scoop pi.py``)
 or:  python examples/sync/pi.py                          (a local pool on first use)

Only the import differs from the seed (``from scoop import futures``), and one
outright bug is fixed: the seed maps ``evaluate_points_in_circle``, a name it
never defines; the function it defines is mapped here. See README.md.
"""

# The seed's own style, kept: an unused loop variable, range(0, n), %-formatting, parentheses.
# ruff: noqa: B007, PIE808, UP031, UP034

import math
from random import random
from time import time

from asyncdist import sync as futures


def evaluate_number_of_points_in_unit_circle(attempts):
    points_fallen_in_unit_disk = 0
    for i in range(0, attempts):
        x = random()
        y = random()
        radius = math.sqrt(x * x + y * y)
        # the test passes if the point falls in the unit disk
        if radius < 1:
            # one more point in the disk
            points_fallen_in_unit_disk = points_fallen_in_unit_disk + 1
    return points_fallen_in_unit_disk


def pi_calculus_with_Montecarlo_Method(workers, attempts):
    print("number of workers %i - number of attempts %i" % (workers, attempts))
    bt = time()
    # futures.map runs the function on the workers, asynchronously and many times at once,
    # and returns the counts of points in the unit disk
    # (seed: futures.map(evaluate_points_in_circle, ...), a name it never defined)
    evaluate_task = futures.map(evaluate_number_of_points_in_unit_circle, [attempts] * workers)
    taskResult = sum(evaluate_task)
    print("%i points fallen in a unit disk after " % (taskResult / attempts))
    piValue = 4.0 * taskResult / float(workers * attempts)

    computationalTime = time() - bt
    print("value of pi = " + str(piValue))
    print("error percentage = " + str((((abs(piValue - math.pi)) * 100) / math.pi)))
    print("total time: " + str(computationalTime))


if __name__ == "__main__":
    for i in range(1, 4):
        # the number of workers is fixed to 2 here; it can be set higher
        pi_calculus_with_Montecarlo_Method(i * 1000, i * 1000)
        print(" ")
