"""The seed's PyCSP example, blocking as in PyCSP: a counter writes 0..4 to a printer over channel A.

Run:  python examples/sync/counter_printer.py          (prints "0 1 2 3 4 ")

Only the import differs from the seed (``from pycsp.parallel import *``), and its
Python 2 is made Python 3: ``xrange`` is ``range``, ``print cin(),`` is
``print(cin(), end=" ")``. The processes are plain functions, each run in a
thread of its own (as PyCSP's); the printer loops until the counter's poison
ends it.
"""

from asyncdist.sync import Channel, Parallel, poison, process, shutdown


# A decorated function is a process: calling it makes one, nothing runs yet.
@process
def processCounter(cout, limit):
    # cout is the writer end of the channel, limit the number of values to write
    for i in range(limit):  # the seed: xrange(limit)
        cout(i)
    # poison: every later read or write on this channel raises, which ends the processes using it
    poison(cout)


@process
def processPrinter(cin):
    # cin is the reader end: print each value as it arrives
    while True:
        print(cin(), end=" ")  # the seed: print cin(),


# Channel A, in this interpreter; it lets the two processes communicate
A = Channel("A")

# Start both processes; this returns when both ended (the printer by the poison).
Parallel(processCounter(A.writer(), limit=5), processPrinter(A.reader()))
# Stop what this module started (the seed calls PyCSP's shutdown() here too)
shutdown()
