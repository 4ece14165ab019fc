"""A farm over 3 OS processes: producer -> 2 workers -> consumer, on networked CSP channels.

Run:  python examples/csp/farm.py                 (the workers are @csp.multiprocess children)
 or:  python examples/csp/farm.py --mode connect  (this script starts 2 copies of itself as
                                                   workers that join the channels by address)
 or, by hand, in three terminals:
      python examples/csp/farm.py --mode external --port 7700
      python examples/csp/farm.py --role worker --connect 127.0.0.1:7700
      python examples/csp/farm.py --role worker --connect 127.0.0.1:7700

The main process serves the channels (a csp.ChannelServer) and runs the
producer and the consumer; each worker runs in an OS process of its own.

    producer --jobs--> worker 1 --results--> consumer
                  \\--> worker 2 --/

The producer writes 0..N-1 to "jobs" and retires; each worker reads jobs
until the channel retired (every writer retired and the jobs are drained),
writes [x, x*x, worker] to "results", then retires its end of "results";
when both workers have, the consumer's reads end, it checks that every x
came back exactly once with its square, and prints
"farm: 200 results, sum=2646700". Nothing is poisoned: retirement alone
shuts the pipeline down, in order.
"""

import argparse
import asyncio
import os
import sys

import asyncdist
from asyncdist import csp

THIS_SCRIPT = os.path.abspath(__file__)


async def work(cin, cout, hello, name):
    """A worker's body (the same in every mode): square each job until the jobs retire."""
    print(f"{name}: pid {os.getpid()}", flush=True)
    await hello(os.getpid())  # ready: its ends of "jobs" and "results" have joined
    hello.disconnect()  # leave "hello" without retiring it (PyCSP's Disconnect())
    done = 0
    async for x in cin:  # ends when the producer retired and no job is left
        await cout([x, x * x, name])
        done += 1
    await csp.retire(cout)  # the last worker to retire its end ends the consumer's reads
    print(f"{name}: {done} jobs", flush=True)
    return done


# @csp.multiprocess: the process runs in a new OS process; its channel ends move there.
multiprocess_worker = csp.multiprocess(work)
# --role worker: a process of this script's own (the channels are joined by address).
worker = csp.process(work)


@csp.process
async def producer(cout, n):
    for x in range(n):
        await cout(x)
    await csp.retire(cout)


@csp.process
async def consumer(cin, n):
    squares = {}
    by_worker = {}
    async for x, y, name in cin:  # ends when every worker retired its end
        assert x not in squares, f"job {x} came back twice"
        assert y == x * x, f"worker {name} squared {x} into {y}"
        squares[x] = y
        by_worker[name] = by_worker.get(name, 0) + 1
    assert sorted(squares) == list(range(n)), f"{n - len(squares)} jobs missing"
    print(f"farm: {len(squares)} results, sum={sum(squares.values())}", flush=True)
    return by_worker


async def wait_for_workers(hello, workers):
    """Each worker says hello (its pid) once its ends have joined "jobs" and "results"."""
    pids = [await hello() for _ in range(workers)]
    await csp.retire(hello)
    print(f"farm: {workers} workers ready, pids {sorted(pids)}", flush=True)


async def start_workers(address, workers):
    """--mode connect: start the workers as copies of this script (--role worker --connect)."""
    host, port = address
    return [
        await asyncio.create_subprocess_exec(
            sys.executable,
            THIS_SCRIPT,
            "--role",
            "worker",
            "--connect",
            f"{host}:{port}",
            "--name",
            f"worker-{i}",
            stdin=asyncio.subprocess.DEVNULL,
        )
        for i in range(1, workers + 1)
    ]


async def reap(procs):
    for proc in procs:
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def main(args):
    server = await csp.ChannelServer.start("127.0.0.1", args.port)
    address = server.address
    print(f"farm: channel server on {address[0]}:{address[1]}", flush=True)
    # Channels named on the server's own loop: local here, networked for the workers.
    jobs = csp.Channel("jobs", connect=address)
    results = csp.Channel("results", connect=address)
    hello = csp.Channel("hello", connect=address)
    procs = []
    spawned = None
    try:
        if args.mode == "multiprocess":
            spawned = csp.Spawn(
                *(
                    multiprocess_worker(jobs.reader(), results.writer(), hello.writer(), f"worker-{i}")
                    for i in range(1, args.workers + 1)
                )
            )
        elif args.mode == "connect":
            procs = await start_workers(address, args.workers)
        else:
            print(f"farm: waiting for {args.workers} workers", flush=True)
        # Every worker's ends must have joined before the producer may retire "jobs".
        await wait_for_workers(hello.reader(), args.workers)
        outcome = await csp.Parallel(
            producer(jobs.writer(), args.jobs), consumer(results.reader(), args.jobs)
        )
        print(f"farm: jobs per worker {dict(sorted(outcome[1].items()))}", flush=True)
        if spawned is not None:
            await spawned
    finally:
        if spawned is not None and not spawned.done():
            spawned.cancel()  # cancelling a multiprocess process kills and reaps its child
            await asyncio.gather(spawned, return_exceptions=True)
        await reap(procs)
        await csp.shutdown()


async def join_farm(host, port, name):
    """--role worker: join the farm's channels on the server at host:port and work."""
    jobs = csp.Channel("jobs", connect=(host, port))
    results = csp.Channel("results", connect=(host, port))
    hello = csp.Channel("hello", connect=(host, port))
    try:
        await csp.Parallel(worker(jobs.reader(), results.writer(), hello.writer(), name))
    finally:
        await csp.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["main", "worker"], default="main")
    parser.add_argument(
        "--mode",
        choices=["multiprocess", "connect", "external"],
        default="multiprocess",
        help="how the workers are started (main role)",
    )
    parser.add_argument("--port", type=int, default=0, help="the channel server's port (main role)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--connect", metavar="HOST:PORT", help="the farm's channel server (worker role)")
    parser.add_argument("--name", default=f"worker-{os.getpid()}", help="the worker's name (worker role)")
    args = parser.parse_args()
    if args.role == "worker":
        if not args.connect:
            parser.error("--role worker needs --connect HOST:PORT")
        host, _, port = args.connect.rpartition(":")
        asyncdist.run(join_farm(host, int(port), args.name))
    else:
        asyncdist.run(main(args))
