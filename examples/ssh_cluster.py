"""One cluster on several machines over SSH, used by every paradigm.

Run:  python examples/ssh_cluster.py [--ssh-config FILE] [--python PATH] HOST [HOST ...]

Each HOST is a name from your ``~/.ssh/config`` (or ``--ssh-config FILE``), or
``[user@]host[:port]``; its host key must be known (``~/.ssh/known_hosts``).
The script must lie at the same path on every host (as SCOOP requires), and
asyncdist must be installed for the Python there (``--python``, default: the
path of this interpreter). The machine running it starts a broker, a
MapReduce master, a name server and a CSP channel server; each host runs two
futures workers and a MapReduce slave, which connect back.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator
from typing import Any

import asyncdist
from asyncdist import csp
from asyncdist.mapreduce import Job, kvgroup, result_iterator


def throw(points: int) -> int:
    """Monte Carlo: how many of ``points`` random points fall in the unit disk."""
    return sum(random.random() ** 2 + random.random() ** 2 < 1 for _ in range(points))


def fmap(line: str, params: Any) -> Iterator[tuple[str, int]]:
    for word in line.split():
        yield word, 1


def freduce(pairs: Iterator[tuple[str, int]], params: Any) -> Iterator[tuple[str, int]]:
    for word, counts in kvgroup(pairs):
        yield word, sum(counts)


@asyncdist.expose
class Greeter:
    def greet(self, name: str) -> str:
        return f"hello {name}"


async def main(hosts: list[str], ssh_config: list[str], python: str | None) -> None:
    options = {"config": ssh_config} if ssh_config else None
    async with asyncdist.SSHCluster(
        hosts, workers_per_host=2, connect_options=options, python=python
    ) as cluster:
        print(f"cluster up: {len(cluster.processes)} host(s), broker at {cluster.broker}")

        # Distributed futures (SCOOP): tasks run on the hosts' workers.
        async with cluster.pool() as pool:
            inside = sum(await pool.map(throw, [20_000] * 20))
        print(f"pi is about {4 * inside / 400_000:.2f} (math.pi = {math.pi:.2f})")

        # MapReduce (Disco): maps and reduces run on the hosts' slaves.
        text = "raw://the quick brown fox jumps over the lazy dog the end"
        job = await Job(name="words", master=cluster.master, secret=cluster.secret).run(
            input=[text], map=fmap, reduce=freduce
        )
        counts = dict([kv async for kv in result_iterator(await job.wait())])
        await job.purge()
        print(f"'the' appears {counts['the']} times")

        # Remote objects (Pyro): a daemon here, found through the cluster's name server.
        async with asyncdist.Daemon(cluster.listen_host, 0, cluster.secret) as daemon:
            ns_host, ns_port = cluster.ns_address
            async with asyncdist.locate_ns(ns_host, ns_port, cluster.secret) as ns:
                await ns.register("example.greeter", daemon.register(Greeter))
            uri = f"adistname:example.greeter@{ns_host}:{ns_port}"
            async with asyncdist.Proxy(uri, secret=cluster.secret) as greeter:
                print(await greeter.greet("cluster"))

        # CSP (PyCSP): a channel served by the cluster's channel server.
        channel = csp.Channel("example", 1, connect=cluster.csp_address, secret=cluster.secret)
        out, inp = channel.writer(), channel.reader()
        await out("through the channel server")
        print(await inp())
        await csp.poison(out)
    print("cluster down")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="+")
    parser.add_argument("--ssh-config", action="append", default=[])
    parser.add_argument("--python")
    args = parser.parse_args()
    asyncdist.run(main(args.hosts, args.ssh_config, args.python))
