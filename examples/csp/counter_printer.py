"""The seed's PyCSP example, ported: a counter process writes 0..4 to a printer over channel A.

Run:  python examples/csp/counter_printer.py          (prints "0 1 2 3 4 ")

As in PyCSP, the counter poisons its end of the channel when it is done; the
printer's next read raises ChannelPoisoned, which ends the printer (a process
that ends by poison is a normal end), and Parallel returns.
"""

import asyncdist
from asyncdist import csp


# A process is a decorated function; calling it makes a process, nothing runs yet.
@csp.process
async def counter(cout, limit):
    # cout is the writer end of the channel, limit the number of values to write
    for i in range(limit):
        await cout(i)
    # Poison: every later read or write on this channel raises ChannelPoisoned,
    # which ends the processes using it (and they poison their other channels in turn).
    await csp.poison(cout)


@csp.process
async def printer(cin):
    # cin is the reader end: print each value as it arrives (the seed's `print cin(),`)
    while True:
        print(await cin(), end=" ", flush=True)


async def main():
    # Channel A lives in this process; Channel("B", connect=(host, port)) would join a networked one.
    A = csp.Channel("A")
    # Run both processes; this returns when both ended (here: the printer by poison).
    await csp.Parallel(
        counter(A.writer(), limit=5),
        printer(A.reader()),
    )
    print()
    # Close this process's channel servers and links (none here; the seed calls shutdown() too).
    await csp.shutdown()


if __name__ == "__main__":
    asyncdist.run(main())
