"""Remote objects benchmark: asyncdist Daemon/Proxy against Pyro5's thread and multiplex servers.

For each implementation the daemon runs in its own subprocess (127.0.0.1,
port 0) and the client runs in this process. Three figures each, all calls
``proxy.echo(x)`` on a registered object whose ``echo`` returns its argument:

(a) sequential round trips per second: one caller, ``echo(1)``, one call at a time;
(b) calls per second with 8 callers: asyncdist runs 8 tasks sharing ONE proxy (so one
    connection), each ``await proxy.echo(1)`` in a loop; Pyro5 runs 8 client threads,
    each with its own proxy (so 8 connections), one call at a time each;
(c) 1 MiB ``bytes`` echo, sequential: payload bytes per second ONE WAY,
    N * 1 MiB / elapsed, in MB/s (1 MB = 10**6 bytes).

Implementations (``--only`` takes these names, or a prefix such as ``pyro5``):

asyncdist-async    asyncdist.Daemon serving an object whose echo is ``async def`` (runs on the
                   daemon's event loop); client: asyncdist.Proxy, ``await proxy.echo(x)``.
                   Daemon and client both on uvloop (asyncdist.run)
asyncdist-plain    the same with a plain ``def echo`` (runs in the daemon's thread pool)
pyro5-thread       Pyro5, SERVERTYPE "thread", SERIALIZER "msgpack" on both sides (1 MiB
                   ``bytes`` travel as msgpack bin, checked), an exposed object registered by
                   instance; Pyro5's other settings are left at their defaults
pyro5-multiplex    the same with SERVERTYPE "multiplex" (one thread, select-based)

"Pyro5 best" is, for each figure, the better of the two Pyro5 servers; the
ratios of asyncdist against it are printed next to their targets. The last
line of stdout is one JSON object with the mode, every figure and every
ratio. Each figure is the best of ``--repeat`` runs (default 3) of
``--duration`` seconds (default 2), after ``--warmup`` seconds (default 0.5;
0.1 s before the later runs); every run is in the JSON. Before the first
figure, one short pass of the first implementation is run and discarded
(``--no-process-warmup`` skips it): without it, whichever implementation is
measured first in this process moves 1 MiB payloads 10-20 % slower than the
same one measured later, which would handicap asyncdist (measured first).

Run from the repository root::

    .venv/bin/python benchmarks/bench_objects.py              # about 1.5 minutes
    .venv/bin/python benchmarks/bench_objects.py --pin 0      # everything shares CPU 0
    .venv/bin/python benchmarks/bench_objects.py --quick      # smoke test, a few seconds
    # cProfile each daemon (one .prof file per implementation):
    .venv/bin/python benchmarks/bench_objects.py --only asyncdist-plain --measure seq \\
        --profile-server /tmp/prof
    .venv/bin/python benchmarks/bench_objects.py --only asyncdist --measure seq,conc
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _harness import (
    CONNECT_TIMEOUT,
    BestOf,
    EchoBenchmark,
    EchoFigures,
    EchoSettings,
    Impl,
    RatioSpec,
    ameasure_echo,
    announce_port,
    by_name,
    echo_tasks,
    pyro5_echo_client,
    requires,
    serve_pyro5_echo,
    wait_for_termination,
)

CONCURRENCY = 8  # callers for (b): tasks on one proxy (asyncdist), threads with a proxy each (Pyro5)
OBJECT_ID = "echo"
PYRO5_BEST = "pyro5 best"


@dataclass
class Figures(EchoFigures, many="concurrent", measure="conc"):
    """The three results of one implementation; (b) is concurrent_calls_per_s."""

    concurrent_calls_per_s: float | None = None
    concurrent_mode: str = ""


# -- asyncdist ---------------------------------------------------------------------------------


def _serve_asyncdist(kind: str) -> None:
    import asyncdist

    if kind == "async":

        @asyncdist.expose
        class AsyncEcho:
            async def echo(self, x: Any) -> Any:
                return x

        obj: object = AsyncEcho()
    else:

        @asyncdist.expose
        class PlainEcho:
            def echo(self, x: Any) -> Any:
                return x

        obj = PlainEcho()

    async def main() -> None:
        daemon = await asyncdist.Daemon(host="127.0.0.1", port=0)
        try:
            daemon.register(obj, OBJECT_ID)
            announce_port(daemon.port)
            await wait_for_termination()
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await daemon.aclose()

    asyncdist.run(main(), loop="uvloop")


async def _asyncdist_client(port: int, s: EchoSettings) -> Figures:
    import asyncdist

    fig = Figures(concurrent_mode=f"{CONCURRENCY} tasks, 1 proxy")
    proxy = asyncdist.Proxy(f"adist:{OBJECT_ID}@127.0.0.1:{port}", connect_attempts=1)
    async with asyncio.timeout(CONNECT_TIMEOUT):
        await proxy._connect()
    try:
        await ameasure_echo(fig, s, proxy.echo, echo_tasks(proxy.echo, CONCURRENCY, s))
    finally:
        async with asyncio.timeout(15):
            await proxy._release()
    return fig


def _run_asyncdist_client(port: int, s: EchoSettings) -> Figures:
    import asyncdist

    return asyncdist.run(_asyncdist_client(port, s), loop="uvloop")


# -- Pyro5 -------------------------------------------------------------------------------------


def _pyro5_setup(servertype: str = "thread") -> Any:
    import Pyro5
    import Pyro5.api

    Pyro5.config.SERIALIZER = "msgpack"
    Pyro5.config.SERVERTYPE = servertype
    return Pyro5.api


def _serve_pyro5(servertype: str) -> None:
    serve_pyro5_echo(_pyro5_setup(servertype), OBJECT_ID, instance=True)


def _pyro5_client(port: int, s: EchoSettings) -> Figures:
    fig = Figures(concurrent_mode=f"{CONCURRENCY} threads, 1 proxy each")
    uri = f"PYRO:{OBJECT_ID}@127.0.0.1:{port}"
    return pyro5_echo_client(_pyro5_setup(), uri, s, fig, CONCURRENCY, exact_type=True)


# -- the implementations -----------------------------------------------------------------------

_uvloop_missing = requires("uvloop", "uvloop is not installed")
_pyro5_missing = requires("Pyro5", "Pyro5 is not installed (pip install 'Pyro5>=5.15', the 'bench' extra)")

IMPLS = by_name(
    Impl(
        "asyncdist-async",
        lambda: _serve_asyncdist("async"),
        _run_asyncdist_client,
        _uvloop_missing,
        "asyncdist Daemon/Proxy, `async def echo` (on the daemon's loop); uvloop both sides",
    ),
    Impl(
        "asyncdist-plain",
        lambda: _serve_asyncdist("plain"),
        _run_asyncdist_client,
        _uvloop_missing,
        "asyncdist Daemon/Proxy, plain `def echo` (in the daemon's thread pool); uvloop",
    ),
    Impl(
        "pyro5-thread",
        lambda: _serve_pyro5("thread"),
        _pyro5_client,
        _pyro5_missing,
        "Pyro5, thread server, msgpack serializer; (b) uses 8 client threads",
    ),
    Impl(
        "pyro5-multiplex",
        lambda: _serve_pyro5("multiplex"),
        _pyro5_client,
        _pyro5_missing,
        "Pyro5, multiplex server, msgpack serializer; (b) uses 8 client threads",
    ),
)

BENCHMARK = EchoBenchmark(
    sys.modules[__name__],
    Figures,
    IMPLS,
    title="asyncdist remote objects benchmark",
    both_by_default=True,
    server="daemon",
    many_label=f"(b) {CONCURRENCY} concurrent",
    best=BestOf(
        PYRO5_BEST,
        members=("pyro5-thread", "pyro5-multiplex"),
        prefix="pyro5-",
        mode=f"{CONCURRENCY} threads",
        description="per column, the better of the two Pyro5 servers (named)",
        json_key="pyro5_best",
    ),
    ratios=(
        RatioSpec("a", "asyncdist-async", PYRO5_BEST, 1.0),
        RatioSpec("b", "asyncdist-async", PYRO5_BEST, 2.0),
        RatioSpec("c", "asyncdist-async", PYRO5_BEST, 1.0),
        RatioSpec("a", "asyncdist-plain", PYRO5_BEST, 0.8),
        RatioSpec("b", "asyncdist-plain", PYRO5_BEST, None),
        RatioSpec("c", "asyncdist-plain", PYRO5_BEST, None),
        RatioSpec("a", "asyncdist-plain", "asyncdist-async", None),
        RatioSpec("b", "asyncdist-plain", "asyncdist-async", None),
    ),
    units={
        "seq_calls_per_s": "sequential proxy.echo(1) round trips per second",
        "concurrent_calls_per_s": "proxy.echo(1) calls per second, callers per concurrent_mode",
    },
    default_repeat=3,
    process_warmup=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return BENCHMARK.main(argv)


if __name__ == "__main__":
    sys.exit(main())
