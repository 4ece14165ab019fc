"""RPC benchmark: asyncdist.rpc against RPyC 6, service and classic modes, default and tuned.

For each implementation the server runs in its own subprocess (127.0.0.1,
port 0) and the client runs in this process. Four figures:

(a) sequential round trips per second: one caller, ``echo(1)``, one call at a time;
(b) ``echo(1)`` calls per second with 8 callers: asyncdist runs 8 tasks sharing ONE
    connection; RPyC runs 8 threads, measured both ways RPyC allows, and the faster
    is kept (the table names it, the JSON has both): all 8 threads on one shared
    connection (RPyC serializes sends with its ``_sendlock`` and lets one waiting
    thread at a time receive, under ``_recvlock``, and hand each reply to its caller;
    its ThreadedServer serves one connection in one thread), or one connection per
    thread (8 server threads);
(c) 1 MiB ``bytes`` echo, sequential: payload bytes per second ONE WAY,
    N * 1 MiB / elapsed, in MB/s (1 MB = 10**6 bytes); the first echo is checked to
    come back as equal ``bytes`` (random, so incompressible);
(d) classic mode only: ``conn.eval("1")`` round trips per second, sequential.

The echo is an exposed method of a service (``conn.root.echo(x)``), except in
the classic rows, where it is a function the client defines on the server
(``execute("def echo(x): return x")``) and calls through a reference to it.

Implementations (``--only`` takes these names, or a prefix such as ``rpyc``):

asyncdist-async          asyncdist.rpc.serve(Service) whose ``exposed_echo`` is ``async def`` (a
                         task on the server's loop); client ``await conn.root.echo(x)``
                         (rpc.connect); uvloop on both sides (asyncdist.run)
asyncdist-plain          the same with a plain ``def exposed_echo`` (runs inline on the loop)
asyncdist-classic        rpc.classic.serve(allow_classic=True), rpc.classic.connect; echo is a
                         netref to the function, ``await echo(x)``; (d) ``await conn.eval("1")``
                         (a classic server runs everything in its thread pool)
rpyc-default             RPyC ThreadedServer(Service with ``exposed_echo``), ``rpyc.connect``,
                         default config; ``echo = conn.root.echo`` taken once, then ``echo(x)``
                         (one round trip a call; ``conn.root.echo(x)`` would be two: a getattr
                         and the call)
rpyc-tuned               the same with, on BOTH sides, no compression and TCP_NODELAY (below)
rpyc-classic-default     RPyC ThreadedServer(SlaveService) as ``rpyc_classic.py`` starts it,
                         ``rpyc.classic.connect``; echo ``conn.namespace["echo"]``; (d)
                         ``conn.eval("1")``
rpyc-classic-tuned       the same, tuned

"Tuned" RPyC: RPyC 6's ``Channel`` compresses, with zlib level 1
(``Channel.COMPRESSION_LEVEL``), every frame longer than 3000 bytes
(``COMPRESSION_THRESHOLD``) whenever ``Channel(stream, compress=True)``, the
default on both sides; and its sockets keep Nagle's algorithm
(``SocketStream.connect(..., nodelay=False)`` by default, and the server
never sets TCP_NODELAY on the sockets it accepts), while a frame over 64,000
bytes is written in several ``send`` calls (header and first chunk, the rest,
then a 1-byte ``\\n``). Tuned, the client connects with
``rpyc.utils.factory.connect_channel(Channel(SocketStream.connect(host, port,
nodelay=True), compress=False), service)`` and the server's service (for classic,
a subclass of SlaveService) sets, in its ``on_connect`` (before the connection
serves anything),
``conn._channel.compress = False`` and TCP_NODELAY on ``conn._channel.stream.sock``
(RPyC has no public server-side switch for either). Before measuring, the
client reads both sides' settings back (compression flag and TCP_NODELAY via
``getsockopt``) and records them (``transport`` in the JSON): a tuned row
fails if a side is not tuned.

Ratios of asyncdist against RPyC are printed next to their targets; "rpyc
best" is, per figure, the better of rpyc-default and rpyc-tuned (named), and
"rpyc-classic best" the same for the classic rows. By default one run
measures everything pinned to CPU 0 (client and servers share it, like
``taskset -c 0``) and then unpinned, and prints both in one table
(``--pin CPU`` or ``--unpinned`` for one mode). Each figure is the best of
``--repeat`` runs (default 3) of ``--duration`` seconds (default 1), after
``--warmup`` seconds (default 0.25; 0.1 s before the later runs); every run
is in the JSON. Before the first figure of each mode one short pass of the
first implementation is run and discarded (``--no-process-warmup`` skips it),
as in bench_objects.py. Each row also reports its "other load": the CPUs that
other processes of the machine used on average while it ran (from /proc/stat,
minus this benchmark and its reaped servers), so that a disturbed figure shows.
The last line of stdout is one JSON object.

Run from the repository root::

    .venv/bin/python benchmarks/bench_rpc.py              # both modes, about 3.5 minutes
    .venv/bin/python benchmarks/bench_rpc.py --pin 0      # pinned only
    .venv/bin/python benchmarks/bench_rpc.py --quick      # smoke test (CI), about 30 s
    .venv/bin/python benchmarks/bench_rpc.py --only asyncdist-plain,rpyc-tuned --measure seq,bulk
    # cProfile each server (one .prof file per implementation):
    .venv/bin/python benchmarks/bench_rpc.py --pin 0 --only asyncdist-async --profile-server /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from _harness import (
    BULK_SIZE,
    BULK_UNIT,
    CONNECT_TIMEOUT,
    EchoFigures,
    EchoSettings,
    Impl,
    Rate,
    Ratio,
    RatioSpec,
    ServerProcess,
    ameasure_echo,
    announce_port,
    arun_for,
    best,
    by_name,
    check,
    echo_tasks,
    emit_json,
    exit_on_sigterm,
    exit_when_parent_exits,
    fmt_met,
    fmt_number,
    format_table,
    format_versions,
    measure_echo,
    parse_measures,
    pin_to_cpu,
    progress,
    requires,
    run_for,
    select_names,
    threaded_echo_rate,
    versions,
    wait_for_termination,
)

HOST = "127.0.0.1"
CONCURRENCY = 8  # callers for (b): tasks on one connection (asyncdist), threads (RPyC)
ECHO_SOURCE = "def echo(x):\n    return x\n"  # the classic rows' echo, defined on the server
RPYC_BEST = "rpyc best"
RPYC_CLASSIC_BEST = "rpyc-classic best"
BEST_OF = {
    RPYC_BEST: ("rpyc-default", "rpyc-tuned"),
    RPYC_CLASSIC_BEST: ("rpyc-classic-default", "rpyc-classic-tuned"),
}
VERSIONS = ("asyncdist", "uvloop", "msgpack", "rpyc")
DEFAULT_DURATION = 1.0
DEFAULT_WARMUP = 0.25
DEFAULT_REPEAT = 3


@dataclass
class Figures(EchoFigures, many="concurrent", measure="conc"):
    """The figures of one implementation; (b) is concurrent_calls_per_s, (d) eval_calls_per_s."""

    concurrent_calls_per_s: float | None = None
    concurrent_mode: str = ""
    eval_calls_per_s: float | None = None
    #: RPyC: each side's compression flag and TCP_NODELAY, read back before measuring.
    transport: dict[str, Any] = field(default_factory=dict)
    #: CPUs that other processes of the machine used on average meanwhile (see other_load).
    other_load: float | None = None


MEASURES = (*Figures.MEASURES, "eval")  # seq, conc, bulk, eval
METRICS = (*Figures.metrics(), "eval_calls_per_s")
PARTS = dict(zip("abcd", METRICS, strict=True))


# -- asyncdist ---------------------------------------------------------------------------------


def _serve_asyncdist(kind: str) -> None:
    import asyncdist
    from asyncdist import rpc

    class AsyncEcho(rpc.Service):
        async def exposed_echo(self, x: Any) -> Any:
            return x

    class PlainEcho(rpc.Service):
        def exposed_echo(self, x: Any) -> Any:
            return x

    async def main() -> None:
        if kind == "classic":
            server = await rpc.classic.serve(HOST, 0, allow_classic=True)
        else:
            server = await rpc.serve(AsyncEcho if kind == "async" else PlainEcho, HOST, 0)
        try:
            announce_port(server.port)
            await wait_for_termination()
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.aclose()

    asyncdist.run(main(), loop="uvloop")


async def _asyncdist_client(port: int, s: EchoSettings, classic: bool) -> Figures:
    from asyncdist import rpc

    fig = Figures(concurrent_mode=f"{CONCURRENCY} tasks, 1 connection")
    async with asyncio.timeout(CONNECT_TIMEOUT):
        if classic:
            cconn = await rpc.classic.connect(HOST, port)
            conn: rpc.Connection = cconn
        else:
            conn = await rpc.connect(HOST, port)
    try:
        if classic:
            await cconn.execute(ECHO_SOURCE)
            echo = await cconn.eval("echo")
            check(isinstance(echo, rpc.Netref), "classic echo is a netref to the function")
        else:
            root = conn.root

            def echo(x: Any) -> Any:
                return root.echo(x)

        if "bulk" in s.measures:
            payload = os.urandom(BULK_SIZE)
            echoed = await echo(payload)
            check(type(echoed) is bytes and echoed == payload, "1 MiB payload came back as equal bytes")
        await ameasure_echo(fig, s, echo, echo_tasks(echo, CONCURRENCY, s))
        if classic and "eval" in s.measures:

            async def one_eval() -> None:
                check(await cconn.eval("1") == 1, 'eval("1")')

            rates = await s.arepeated(lambda w: arun_for(one_eval, s.duration, w))
            fig.record("eval_calls_per_s", rates)
    finally:
        async with asyncio.timeout(15):
            await conn.close()
    return fig


def _run_asyncdist_client(classic: bool) -> Callable[[int, EchoSettings], Figures]:
    def client(port: int, s: EchoSettings) -> Figures:
        import asyncdist

        return asyncdist.run(_asyncdist_client(port, s, classic), loop="uvloop")

    return client


# -- RPyC --------------------------------------------------------------------------------------


def _tune_rpyc(conn: Any) -> None:
    """Server side, in on_connect: no compression and TCP_NODELAY on this connection."""
    conn._channel.compress = False
    conn._channel.stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rpyc_transport(channel: Any) -> dict[str, bool]:
    """What a channel (or a netref to one) does: compression on, TCP_NODELAY set."""
    nodelay = channel.stream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return {"compress": bool(channel.compress), "nodelay": bool(nodelay)}


def _serve_rpyc(tuned: bool, classic: bool) -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class EchoService(rpyc.Service):  # type: ignore[misc]
        def on_connect(self, conn: Any) -> None:
            self._conn = conn
            if tuned:
                _tune_rpyc(conn)

        def exposed_echo(self, x: Any) -> Any:
            return x

        def exposed_transport(self) -> tuple[bool, bool]:
            found = _rpyc_transport(self._conn._channel)  # a tuple travels by value, a dict would not
            return found["compress"], found["nodelay"]

    class TunedSlaveService(rpyc.SlaveService):  # type: ignore[misc]
        __slots__ = ()

        def on_connect(self, conn: Any) -> None:
            super().on_connect(conn)
            _tune_rpyc(conn)

    if classic:
        # As rpyc_classic.py starts it (threaded mode), on 127.0.0.1 and port 0.
        service: Any = TunedSlaveService if tuned else rpyc.SlaveService
        server = ThreadedServer(service, hostname=HOST, port=0, reuse_addr=True, auto_register=False)
    else:
        server = ThreadedServer(EchoService, hostname=HOST, port=0)
    exit_on_sigterm()
    try:
        server._listen()  # listen before the port is announced (start() would do it later)
        announce_port(server.port)
        server.start()
    finally:
        server.close()


def _rpyc_connect(port: int, tuned: bool, classic: bool) -> Any:
    import rpyc

    if not tuned:
        return rpyc.classic.connect(HOST, port) if classic else rpyc.connect(HOST, port)
    from rpyc.core.channel import Channel
    from rpyc.core.stream import SocketStream
    from rpyc.utils.factory import connect_channel

    stream = SocketStream.connect(HOST, port, nodelay=True)
    # rpyc.classic.connect uses ClassicService on the client side, rpyc.connect VoidService.
    service = rpyc.ClassicService if classic else rpyc.VoidService
    return connect_channel(Channel(stream, compress=False), service=service)


def _rpyc_echo(conn: Any, classic: bool) -> Callable[[Any], Any]:
    """A netref to the echo, taken once: calling it is one round trip."""
    if classic:
        conn.execute(ECHO_SOURCE)
        echo: Callable[[Any], Any] = conn.namespace["echo"]
    else:
        echo = conn.root.echo
    return echo


def _rpyc_threads(
    n: int, s: EchoSettings, warmup: float, open_echo: Callable[[], tuple[Callable[[Any], Any], Any]]
) -> Rate:
    """(b) for RPyC: ``n`` threads calling echo(1), each on what ``open_echo()`` gives it:
    ``(echo, connection to close or None)``."""

    def opened() -> tuple[Callable[[Any], Any], Callable[[], None] | None]:
        echo, conn = open_echo()
        return echo, (conn.close if conn is not None else None)

    return threaded_echo_rate(n, s, warmup, opened)


def _rpyc_client(tuned: bool, classic: bool) -> Callable[[int, EchoSettings], Figures]:
    def client(port: int, s: EchoSettings) -> Figures:
        fig = Figures()

        def connect() -> Any:
            return _rpyc_connect(port, tuned, classic)

        conn = connect()
        try:
            # Both sides' settings, read back.
            if classic:  # the server's own Connection object, reached through a netref
                server_side = _rpyc_transport(conn.root.getconn()._channel)
            else:
                compress, nodelay = conn.root.transport()
                server_side = {"compress": compress, "nodelay": nodelay}
            fig.transport = {"client": _rpyc_transport(conn._channel), "server": server_side}
            want = {"compress": not tuned, "nodelay": tuned}
            for side, setting in fig.transport.items():
                check(setting == want, f"rpyc {side} transport {setting}, expected {want}")

            echo = _rpyc_echo(conn, classic)
            # (a), (b), (c), (d) in this order, as ameasure_echo does for asyncdist.
            measure_echo(fig, dataclasses.replace(s, measures=s.measures & {"seq"}), echo, None)
            if "conc" in s.measures:

                def shared() -> tuple[Callable[[Any], Any], Any]:
                    return echo, None

                def own() -> tuple[Callable[[Any], Any], Any]:
                    own_conn = connect()
                    return _rpyc_echo(own_conn, classic), own_conn

                modes = {
                    "shared conn": lambda w: _rpyc_threads(CONCURRENCY, s, w, shared),
                    "own conns": lambda w: _rpyc_threads(CONCURRENCY, s, w, own),
                }
                found: dict[str, list[Rate]] = {mode: s.repeated(m) for mode, m in modes.items()}
                for mode, rates in found.items():
                    fig.runs[f"concurrent_calls_per_s, {mode.replace(' ', '_')}"] = [
                        round(r.per_second, 1) for r in rates
                    ]
                faster = max(found, key=lambda mode: best(found[mode]).per_second)
                fig.record("concurrent_calls_per_s", found[faster])
                other = next(mode for mode in found if mode != faster)
                fig.concurrent_mode = (
                    f"{CONCURRENCY} threads, {faster} ({other}: {fmt_number(best(found[other]).per_second)})"
                )
            if "bulk" in s.measures:
                payload = os.urandom(BULK_SIZE)
                echoed = echo(payload)
                check(type(echoed) is bytes and echoed == payload, "1 MiB payload came back as equal bytes")
                measure_echo(fig, dataclasses.replace(s, measures=frozenset({"bulk"})), echo, None)
            if classic and "eval" in s.measures:

                def one_eval() -> None:
                    check(conn.eval("1") == 1, 'eval("1")')

                fig.record("eval_calls_per_s", s.repeated(lambda w: run_for(one_eval, s.duration, w)))
        finally:
            conn.close()
        return fig

    return client


# -- the implementations -----------------------------------------------------------------------

_uvloop_missing = requires("uvloop", "uvloop is not installed")
_rpyc_missing = requires("rpyc", "rpyc is not installed (pip install 'rpyc>=6', the 'bench' extra)")


IMPLS = by_name(
    Impl(
        "asyncdist-async",
        lambda: _serve_asyncdist("async"),
        _run_asyncdist_client(classic=False),
        _uvloop_missing,
        "asyncdist.rpc, `async def exposed_echo` (a task on the server's loop); uvloop both sides",
    ),
    Impl(
        "asyncdist-plain",
        lambda: _serve_asyncdist("plain"),
        _run_asyncdist_client(classic=False),
        _uvloop_missing,
        "asyncdist.rpc, plain `def exposed_echo` (inline on the server's loop); uvloop",
    ),
    Impl(
        "asyncdist-classic",
        lambda: _serve_asyncdist("classic"),
        _run_asyncdist_client(classic=True),
        _uvloop_missing,
        "asyncdist.rpc.classic, echo defined by execute(), called by netref (server threads)",
    ),
    Impl(
        "rpyc-default",
        lambda: _serve_rpyc(tuned=False, classic=False),
        _rpyc_client(tuned=False, classic=False),
        _rpyc_missing,
        "RPyC ThreadedServer, Service.exposed_echo, rpyc.connect, default config",
    ),
    Impl(
        "rpyc-tuned",
        lambda: _serve_rpyc(tuned=True, classic=False),
        _rpyc_client(tuned=True, classic=False),
        _rpyc_missing,
        "the same, no compression and TCP_NODELAY on both sides",
    ),
    Impl(
        "rpyc-classic-default",
        lambda: _serve_rpyc(tuned=False, classic=True),
        _rpyc_client(tuned=False, classic=True),
        _rpyc_missing,
        "RPyC ThreadedServer(SlaveService), rpyc.classic.connect, default config",
    ),
    Impl(
        "rpyc-classic-tuned",
        lambda: _serve_rpyc(tuned=True, classic=True),
        _rpyc_client(tuned=True, classic=True),
        _rpyc_missing,
        "the same, no compression and TCP_NODELAY on both sides",
    ),
)

RATIOS = (
    RatioSpec("a", "asyncdist-async", RPYC_BEST, 1.8),
    RatioSpec("b", "asyncdist-async", RPYC_BEST, 3.0),
    RatioSpec("c", "asyncdist-async", "rpyc-default", 20.0),
    RatioSpec("c", "asyncdist-async", "rpyc-tuned", 2.0),
    RatioSpec("a", "asyncdist-plain", RPYC_BEST, 1.2),
    RatioSpec("b", "asyncdist-plain", RPYC_BEST, None),
    RatioSpec("c", "asyncdist-plain", "rpyc-default", 20.0),
    RatioSpec("c", "asyncdist-plain", "rpyc-tuned", 2.0),
    RatioSpec("a", "asyncdist-plain", "asyncdist-async", None),
    RatioSpec("a", "asyncdist-classic", RPYC_CLASSIC_BEST, None),
    RatioSpec("b", "asyncdist-classic", RPYC_CLASSIC_BEST, None),
    RatioSpec("c", "asyncdist-classic", RPYC_CLASSIC_BEST, None),
    RatioSpec("d", "asyncdist-classic", RPYC_CLASSIC_BEST, None),
)

HEADERS = (
    "implementation",
    "(a) seq calls/s",
    "(b) calls/s",
    "(b) concurrency",
    "(c) 1 MiB MB/s",
    "(d) classic eval/s",
    "other load",
)
LABELS = {"a": "(a) sequential", "b": f"(b) {CONCURRENCY} concurrent", "c": "(c) 1 MiB echo", "d": "(d) eval"}
UNITS = {
    "seq_calls_per_s": "sequential echo(1) round trips per second",
    "concurrent_calls_per_s": "echo(1) calls per second, callers per concurrent_mode",
    "bulk_mb_per_s": BULK_UNIT,
    "eval_calls_per_s": 'sequential classic eval("1") round trips per second',
    "other_load": "CPUs used by other processes of the machine on average while the row ran",
}


# -- running -------------------------------------------------------------------------------------


def server_argv(name: str, pin: int | None, profile_dir: str | None) -> list[str]:
    argv = [sys.executable]
    if profile_dir:
        argv += ["-m", "cProfile", "-o", os.path.join(profile_dir, f"{name}.prof")]
    argv += [os.path.abspath(__file__), "--serve", name]
    if pin is not None:
        argv += ["--pin", str(pin)]
    return argv


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and of its reaped children (the servers, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_one(name: str, s: EchoSettings, pin: int | None, profile_dir: str | None) -> Figures:
    """:func:`measure_one`, plus how busy the rest of the machine was meanwhile: the CPUs that
    other processes used on average (machine busy time minus ours, over the wall time)."""
    busy0, own0, wall0 = machine_busy(), own_cpu(), time.monotonic()
    fig = measure_one(name, s, pin, profile_dir)
    wall = time.monotonic() - wall0
    others = (machine_busy() - busy0) - (own_cpu() - own0)
    fig.other_load = round(max(0.0, others) / wall, 2) if wall > 0 and busy0 else None
    return fig


def measure_one(name: str, s: EchoSettings, pin: int | None, profile_dir: str | None) -> Figures:
    """Start ``name``'s server, run its client here, stop (and reap) the server: its figures."""
    impl = IMPLS[name]
    reason = impl.missing()
    if reason:
        return Figures(error=f"skipped: {reason}")
    server = ServerProcess(name, server_argv(name, pin, profile_dir))
    try:
        with server:
            fig = impl.client(server.port, s)
        if not server.exited_cleanly:
            tail = server.stderr_tail(1500).strip()
            progress(f"warning: {name} server exited with code {server.returncode}: {tail}")
        return fig
    except Exception as exc:
        tail = server.stderr_tail(1500).strip()
        detail = f"{type(exc).__name__}: {exc}"
        if tail:
            detail += f"\n    server stderr: {tail}"
        return Figures(error=f"failed: {detail}")


def summary(fig: Figures) -> str:
    a, b, c, d = (fmt_number(fig.value(m)) for m in METRICS)
    line = f"  (a) {a} calls/s, (b) {b} calls/s, (c) {c} MB/s, (d) {d} evals/s; other load {fig.other_load}"
    return line + (f"  [{fig.error}]" if fig.error else "")


def value_of(results: Mapping[str, Figures], name: str, metric: str) -> tuple[float | None, str | None]:
    """A figure of an implementation, or of a "best" group (with the member that gave it)."""
    if name in BEST_OF:
        found = [
            (v, member)
            for member in BEST_OF[name]
            if member in results and (v := results[member].value(metric)) is not None
        ]
        if not found:
            return None, None
        v, member = max(found)
        return v, member
    if name in results:
        return results[name].value(metric), None
    return None, None


def compute_ratios(results: Mapping[str, Figures]) -> list[Ratio]:
    out = []
    for spec in RATIOS:
        metric = PARTS[spec.part]
        num, _ = value_of(results, spec.num, metric)
        den, source = value_of(results, spec.den, metric)
        value = num / den if num is not None and den else None
        met = None if value is None or spec.target is None else value >= spec.target
        out.append(Ratio(spec.key, spec.part, metric, spec.num, spec.den, value, spec.target, met, source))
    return out


def ratio_rows(ratios: Sequence[Ratio], label: str) -> list[list[str]]:
    rows = []
    for r in ratios:
        if r.value is None:
            continue
        den = f"{r.den} ({r.den_source})" if r.den_source else r.den
        target = f">= {r.target:g}x" if r.target is not None else "info"
        near = r.target is not None and round(r.value, 2) >= r.target > r.value
        value = fmt_number(r.value, 3 if near else 2) + "x"
        rows.append([f"{LABELS[r.part]}, {label}", f"{r.num} / {den}", value, target, fmt_met(r.met)])
    return rows


def figure_rows(results: Mapping[str, Figures], label: str) -> list[list[str]]:
    rows = []
    for name, fig in results.items():
        cells = [fmt_number(fig.value(m)) for m in METRICS]
        if "classic" not in name and not fig.error:
            cells[3] = "—"  # eval is classic mode's
        mode = fig.concurrent_mode if fig.concurrent_calls_per_s is not None else ""
        other = fmt_number(fig.other_load, 2)
        rows.append([f"{name}, {label}", cells[0], cells[1], mode, cells[2], cells[3], other])
    return rows


@dataclass
class ModeResult:
    pin: int | None
    results: dict[str, Figures]
    ratios: list[Ratio]
    elapsed: float
    warm: str | None

    @property
    def label(self) -> str:
        return "pinned" if self.pin is not None else "unpinned"

    def json(self, s: EchoSettings) -> dict[str, Any]:
        return {
            "benchmark": "bench_rpc",
            "mode": self.label,
            "pin_cpu": self.pin,
            "duration_s": s.duration,
            "warmup_s": s.warmup,
            "repeat": s.repeat,
            "measures": sorted(s.measures),
            "process_warmup": self.warm,
            "units": UNITS,
            "versions": versions(*VERSIONS),
            "elapsed_s": round(self.elapsed, 1),
            "results": {name: fig.as_dict() for name, fig in self.results.items()},
            "ratios": {r.key: r.as_dict(sourced=True) for r in self.ratios},
        }


def run_mode(
    names: Sequence[str], s: EchoSettings, pin: int | None, warm: str | None, profile_dir: str | None
) -> ModeResult:
    started = time.monotonic()
    if warm is not None:
        # As in bench_objects.py: the first implementation measured in a process is handicapped
        # (1 MiB payloads), so one short pass of it is run and discarded first.
        progress(f"process warm-up: {warm}, discarded ...")
        short = EchoSettings(min(s.duration, 0.5), min(s.warmup, 0.1), 1, s.measures)
        discarded = run_one(warm, short, pin, None)
        if discarded.error:
            progress(f"  [{discarded.error}]")
    results: dict[str, Figures] = {}
    for name in names:
        progress(f"{name}{' (pinned)' if pin is not None else ''}: measuring ...")
        fig = results[name] = run_one(name, s, pin, profile_dir)
        progress(summary(fig))
    return ModeResult(pin, results, compute_ratios(results), time.monotonic() - started, warm)


def report(modes: Sequence[ModeResult], s: EchoSettings) -> None:
    print()
    print("asyncdist.rpc benchmark, beside RPyC")
    parts = []
    for m in modes:
        if m.pin is not None:
            parts.append(
                f"pinned (the benchmark and every server share CPU {m.pin}, like taskset -c {m.pin})"
            )
        else:
            parts.append(f"unpinned (free to use the {len(os.sched_getaffinity(0))} CPUs)")
    print(f"mode{'s' if len(parts) > 1 else ''}: {', then '.join(parts)}")
    print(
        f"each figure: best of {s.repeat} run(s) of {s.duration:g} s, {s.warmup:g} s warm-up first; "
        f"whole run {sum(m.elapsed for m in modes):.0f} s"
    )
    print(format_versions(versions(*VERSIONS)))
    print()
    rows = [row for m in modes for row in figure_rows(m.results, m.label)]
    print(format_table(HEADERS, rows, "lrrlrrr"))
    print()
    width = max(map(len, IMPLS)) + 1
    for name in modes[0].results:
        print(f"  {name:<{width}} {IMPLS[name].description}")
    print(
        "  (b) RPyC: the faster of 8 threads on one shared connection (shared conn) and 8 threads with a\n"
        "  connection each (own conns), the other in brackets; (d): classic mode only (—)\n"
        "  other load: CPUs that other processes of the machine used on average while the row ran\n"
        "  (from /proc/stat, minus this benchmark and its servers); above 0.1 its figures are disturbed"
    )
    for m in modes:
        for name, fig in m.results.items():
            if fig.error:
                print(f"note: {name}, {m.label}: {fig.error}")
    print()
    rrows = [row for m in modes for row in ratio_rows(m.ratios, m.label)]
    if rrows:
        print(format_table(["measure", "ratio", "value", "target", "met"], rrows, "llrll"))
        print()


def settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EchoSettings:
    measures = parse_measures(parser, args.measure, MEASURES)
    duration = args.duration if args.duration is not None else (0.3 if args.quick else DEFAULT_DURATION)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else DEFAULT_WARMUP)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else DEFAULT_REPEAT)
    if duration <= 0 or warmup < 0 or repeat < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    return EchoSettings(duration, warmup, repeat, measures)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, help=f"seconds per measurement (default {DEFAULT_DURATION:g}, --quick 0.3)"
    )
    parser.add_argument(
        "--warmup", type=float, help=f"unmeasured seconds before each (default {DEFAULT_WARMUP:g}, quick 0.1)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"runs per measurement, the best is kept (default {DEFAULT_REPEAT}, quick 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke-test run")
    parser.add_argument(
        "--pin", type=int, metavar="CPU", help="pinned only: the benchmark and every server on CPU"
    )
    parser.add_argument(
        "--both", action="store_true", help="pinned (to --pin CPU, default 0), then unpinned (the default)"
    )
    parser.add_argument("--unpinned", action="store_true", help="measure unpinned only")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(IMPLS)}")
    measures = ",".join(MEASURES)
    parser.add_argument(
        "--measure", default=measures, help=f"comma-separated subset of {measures} (default all)"
    )
    parser.add_argument(
        "--profile-server", metavar="DIR", help="run each server under cProfile, DIR/NAME.prof"
    )
    parser.add_argument(
        "--no-process-warmup",
        action="store_true",
        help="skip the discarded pass of the first implementation before the measured ones",
    )
    parser.add_argument("--serve", choices=list(IMPLS), help=argparse.SUPPRESS)  # internal
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.serve:  # be a server, in a subprocess run_one started
        if args.pin is not None:
            pin_to_cpu(args.pin)
        exit_when_parent_exits()
        IMPLS[args.serve].serve()
        return 0

    s = settings(parser, args)
    names = select_names(args.only, list(IMPLS))
    if args.unpinned and (args.pin is not None or args.both):
        parser.error("--unpinned excludes --pin and --both")
    if args.profile_server:
        os.makedirs(args.profile_server, exist_ok=True)
    both = args.both or (args.pin is None and not args.unpinned)
    exit_on_sigterm()  # SIGTERM unwinds through the finally blocks that stop the servers
    warm = names[0] if not args.no_process_warmup else None
    allowed = os.sched_getaffinity(0)
    pins: list[int | None] = [args.pin if args.pin is not None else 0, None] if both else [args.pin]
    modes = []
    try:
        for pin in pins:
            if pin is not None:
                pin_to_cpu(pin)
            else:
                os.sched_setaffinity(0, allowed)
            modes.append(run_mode(names, s, pin, warm, args.profile_server))
    except KeyboardInterrupt:
        print("interrupted: every server was stopped", file=sys.stderr)
        return 130
    report(modes, s)
    if len(modes) == 1:
        emit_json(modes[0].json(s))
    else:
        emit_json({"benchmark": "bench_rpc", "mode": "both", "modes": {m.label: m.json(s) for m in modes}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
