"""Processes for ``test_objects_faults.py``: a daemon or a name server the tests can kill.

Run as a script (the secret, if any, comes on stdin: ``--secret-stdin``):

* ``python tests/_objects_server.py daemon --port P --oid ID --log FILE
  [--publish NAME --ns-port NP --every S]``: a :class:`~asyncdist.Daemon`
  on 127.0.0.1:P serving a :class:`Recorder` as ``ID``; with ``--publish``
  it keeps ``NAME`` registered with the name server at 127.0.0.1:NP
  (:func:`asyncdist.naming.publish`);
* ``python tests/_objects_server.py ns --port P [--autoclean S]
  [--max-entries N]``: an in-memory :class:`~asyncdist.naming.NameServerDaemon`.

Each prints ``READY <port>`` on stdout once it listens; the daemon prints
``STARTED <tag>`` when a call of :meth:`Recorder.slow` begins. Every call of
``slow`` is appended to the ``--log`` file *before* it waits, so that a
daemon started again with the same log can tell how often it ran (the file
outlives a SIGKILL: the bytes are in the kernel once ``write`` returned).
They serve until SIGTERM, SIGINT or SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from asyncdist import expose
from asyncdist.naming import NameServerDaemon, publish
from asyncdist.objects import Daemon


@expose
class Recorder:
    """The object the fault tests call."""

    def __init__(self, log: str) -> None:
        self._log = log

    async def slow(self, tag: str) -> str:
        """Record the call, say so on stdout, then take (much) longer than any test."""
        fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{tag}\n".encode())
        finally:
            os.close(fd)
        print(f"STARTED {tag}", flush=True)
        await asyncio.sleep(3600)
        return tag

    def executions(self, tag: str) -> int:
        """How many times ``slow(tag)`` started, in this process or an earlier one."""
        try:
            lines = Path(self._log).read_text().splitlines()
        except FileNotFoundError:
            return 0
        return lines.count(tag)

    async def pid(self) -> int:
        return os.getpid()


async def _serve(args: argparse.Namespace, secret: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher: asyncio.Task[None] | None = None
    server: Daemon
    if args.role == "ns":
        server = NameServerDaemon(
            "127.0.0.1",
            args.port,
            secret=secret,
            max_entries=args.max_entries,
            autoclean=args.autoclean,
        )
    else:
        server = Daemon("127.0.0.1", args.port, secret=secret)
    async with server:
        if args.role == "daemon":
            uri = server.register(Recorder(args.log), args.oid)
            if args.publish:
                publisher = loop.create_task(
                    publish(args.publish, uri, ns_port=args.ns_port, secret=secret, every=args.every)
                )
        print(f"READY {server.port}", flush=True)
        try:
            await stop.wait()
        finally:
            if publisher is not None:
                publisher.cancel()
                with contextlib.suppress(BaseException):
                    await publisher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["daemon", "ns"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--oid", default="recorder")
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--publish", default="")
    parser.add_argument("--ns-port", type=int, default=0)
    parser.add_argument("--every", type=float, default=0.2)
    parser.add_argument("--autoclean", type=float, default=None)
    parser.add_argument("--max-entries", type=int, default=100_000)
    parser.add_argument("--secret-stdin", action="store_true")
    args = parser.parse_args()
    secret = sys.stdin.readline().strip() if args.secret_stdin else None
    asyncio.run(_serve(args, secret))


if __name__ == "__main__":
    main()
