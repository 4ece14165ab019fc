"""CSP channels benchmark: asyncdist.csp against asyncio.Queue, PyCSP 0.9 and multiprocessing.Pipe.

One run, one table; every figure is messages (hand-offs) per second of small
ints, 0, 1, 2, ... in order, each checked by the reader. Rows (``--only``
takes these names, or a prefix such as ``net``):

(a) in-process, on one event loop (asyncdist.run's: uvloop when installed),
    one writer task and one reader task, N values:

    csp             ``csp.Channel()`` (a rendezvous): ``await cout(i)`` / ``await cin()``
    queue1          ``asyncio.Queue(maxsize=1)``: ``await q.put(i)`` / ``await q.get()``
    csp64           ``csp.Channel(buffer=64)``
    queue64         ``asyncio.Queue(maxsize=64)``

(b) pycsp          PyCSP 0.9's ``pycsp.parallel.Channel()`` between two ``@process`` threads
                    (``Parallel``), in a subprocess with ``PYCSP_HOST=127.0.0.1``; shown as
                    "not installable (reason)" when PyCSP 0.9 cannot be imported or run here

(c) across OS processes on 127.0.0.1: the writer is a subprocess, the reader is this
    process; the reader times its reads after a warm-up of N/10 values:

    net-buffered    ``Channel(name, buffer=1024)``: this process (the reader) hosts it, a
                    ``csp.ChannelServer`` on its loop and the local channel of that name; the
                    writer joins with ``Channel(name, 1024, connect=(host, port))``
    net-rendezvous  the same with ``buffer=0``
    server-buffered a third-party server, ``python -m asyncdist csp-server`` in its own
                    process; writer and reader (this process) both join with ``connect=``
    server-rendezvous  the same with ``buffer=0``
    pipe            ``multiprocessing.Pipe(duplex=False)``: a child process (spawn) sends
                    the ints with ``conn.send``, this process ``conn.recv()``s them, both in
                    plain blocking loops

Ratios (asyncdist over the reference, higher is better) with the issue's
targets: (a) ``csp`` / ``queue1`` >= 0.5x; (c) ``net-buffered`` / ``pipe`` >= 1x;
the others are for information. Each figure is the best of ``--repeat`` runs
(default 3, ``--quick`` 1); the runs go round-robin over the rows of a part
(so slow phases of the machine hit every row), after one discarded warm-up
run of each in-process row. Every run and its median are in the JSON, the
last line of stdout. Every subprocess is stopped and reaped, also on errors
and Ctrl-C.

Run from the repository root::

    .venv/bin/python benchmarks/bench_csp.py             # about 80 s
    .venv/bin/python benchmarks/bench_csp.py --quick     # smoke test, about 5 s
    .venv/bin/python benchmarks/bench_csp.py --pin 0     # everything on CPU 0
    # cProfile the writer subprocesses, the csp-server and this process's reads:
    .venv/bin/python benchmarks/bench_csp.py --only net-buffered --repeat 1 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import itertools
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from _harness import (
    Rate,
    ServerProcess,
    emit_json,
    exit_on_sigterm,
    exit_when_parent_exits,
    fmt_met,
    fmt_number,
    format_table,
    format_versions,
    mode_line,
    pin_to_cpu,
    progress,
    select_names,
    versions,
)

from asyncdist import csp
from asyncdist.loop import run

#: Packages whose versions the report names.
VERSIONS_OF = ("asyncdist", "uvloop", "msgpack", "pycsp")
HOST = "127.0.0.1"
BUFFERED = 1024  # (c): the buffered channel's capacity
PYCSP_WANTED = "0.9"  # the PyCSP generation the issue compares with

clock = time.perf_counter


# -- rows, comparisons, settings --------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    key: str  # --only name
    part: str  # "a", "b" or "c"
    label: str  # in the table
    count: int  # values per run (full run; --quick: a tenth)
    how: str  # below the table


_TWO_TASKS = "one writer task, one reader task"
_RENDEZVOUS = "the same with buffer=0"

ROWS = {
    r.key: r
    for r in (
        RowSpec("csp", "a", "csp.Channel()", 200_000, _TWO_TASKS),
        RowSpec("queue1", "a", "asyncio.Queue(maxsize=1)", 200_000, f"put/get pairs, {_TWO_TASKS}"),
        RowSpec("csp64", "a", "csp.Channel(buffer=64)", 200_000, _TWO_TASKS),
        RowSpec("queue64", "a", "asyncio.Queue(maxsize=64)", 200_000, f"put/get pairs, {_TWO_TASKS}"),
        RowSpec("pycsp", "b", "PyCSP Channel()", 20_000, "pycsp.parallel, two @process threads"),
        RowSpec(
            "net-buffered",
            "c",
            f"Channel(buffer={BUFFERED}), reader hosts",
            200_000,
            "reader: ChannelServer + local channel; writer process: connect=",
        ),
        RowSpec("net-rendezvous", "c", "Channel(), reader hosts", 20_000, _RENDEZVOUS),
        RowSpec(
            "server-buffered",
            "c",
            f"Channel(buffer={BUFFERED}), csp-server",
            40_000,
            "`asyncdist csp-server` process; writer process and reader: connect=",
        ),
        RowSpec("server-rendezvous", "c", "Channel(), csp-server", 10_000, _RENDEZVOUS),
        RowSpec("pipe", "c", "multiprocessing.Pipe(duplex=False)", 500_000, "child send(), recv() here"),
    )
}


@dataclass(frozen=True)
class Comparison:
    measure: str
    num: str
    den: str
    target: float | None  # None: for information

    @property
    def key(self) -> str:
        return f"{self.num}/{self.den}"


COMPARISONS = (
    Comparison("(a) rendezvous, in-process", "csp", "queue1", 0.5),
    Comparison("(b) rendezvous, in-process", "csp", "pycsp", None),
    Comparison("(a) buffered, in-process", "csp64", "queue64", None),
    Comparison("(c) buffered, 2 processes", "net-buffered", "pipe", 1.0),
    Comparison("(c) rendezvous, 2 processes", "net-rendezvous", "pipe", None),
    Comparison("(c) buffered, 3 processes", "server-buffered", "pipe", None),
    Comparison("(c) rendezvous, 3 processes", "server-rendezvous", "pipe", None),
)


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeat: int
    scale: float
    profile: str | None

    def count(self, key: str) -> int:
        return max(100, round(ROWS[key].count * self.scale * (0.1 if self.quick else 1.0)))

    def warm(self, key: str) -> int:
        """Values sent (cross-process) or a run made (in-process) before the timed ones."""
        return max(50, self.count(key) // 10)

    def budget(self, key: str) -> float:
        """Seconds one run may take before it is called stuck."""
        return 30.0 + self.count(key) * 1e-3


@dataclass
class Result:
    runs: list[Rate] = field(default_factory=list)
    error: str | None = None

    @property
    def best(self) -> float | None:
        return max(r.per_second for r in self.runs) if self.runs else None

    @property
    def median(self) -> float | None:
        return statistics.median(r.per_second for r in self.runs) if self.runs else None


def _failed(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {exc}".strip()


def _wrong(got: Any, want: int) -> None:
    raise AssertionError(f"read {got!r}, expected {want}")


_T = TypeVar("_T")


def run_here(main: Coroutine[Any, Any, _T]) -> _T:
    """:func:`asyncdist.loop.run` where SIGINT and SIGTERM cancel ``main`` and raise KeyboardInterrupt.

    An exception raised by a Python signal handler lands in whatever code runs at that moment;
    inside an event loop's transport callback (uvloop) it is taken for a transport error, and
    the benchmark would go on. The loop's own signal handlers cancel the measurement instead, and
    its ``finally`` blocks stop the children.
    """
    interrupted = False
    sigint = signal.getsignal(signal.SIGINT)
    signals = [signal.SIGTERM] if sigint is signal.SIG_IGN else [signal.SIGINT, signal.SIGTERM]

    async def guarded() -> _T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        for sig in signals:
            loop.add_signal_handler(sig, stop)
        try:
            return await main
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    try:
        result = run(guarded())
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        # remove_signal_handler() put the defaults back: Ctrl-C and SIGTERM must unwind again.
        signal.signal(signal.SIGINT, sigint)
        exit_on_sigterm()
    if interrupted:
        raise KeyboardInterrupt
    return result


# -- (a) in-process ------------------------------------------------------------------------------


Put = Callable[[int], Awaitable[object]]
Get = Callable[[], Awaitable[Any]]


async def _two_tasks(put: Put, get: Get, n: int, budget: float) -> Rate:
    """One writer task putting 0..n-1, one reader task getting and checking them: n hand-offs."""

    async def writer() -> None:
        for i in range(n):
            await put(i)

    async def reader() -> None:
        for i in range(n):
            got = await get()
            if got != i:
                _wrong(got, i)

    async with asyncio.timeout(budget):
        start = clock()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer())
            tg.create_task(reader())
        return Rate(n, clock() - start)


def _in_process_op(key: str) -> Callable[[int, float], Awaitable[Rate]]:
    """A fresh channel or queue per run; ``op(n, budget)`` measures n hand-offs."""

    async def channel(buffer: int, n: int, budget: float) -> Rate:
        ch = csp.Channel(buffer=buffer)
        return await _two_tasks(ch.writer(), ch.reader(), n, budget)

    async def queue(maxsize: int, n: int, budget: float) -> Rate:
        q: asyncio.Queue[int] = asyncio.Queue(maxsize)
        return await _two_tasks(q.put, q.get, n, budget)

    table: dict[str, Callable[[int, float], Awaitable[Rate]]] = {
        "csp": lambda n, b: channel(0, n, b),
        "queue1": lambda n, b: queue(1, n, b),
        "csp64": lambda n, b: channel(64, n, b),
        "queue64": lambda n, b: queue(64, n, b),
    }
    return table[key]


async def measure_in_process(keys: Sequence[str], s: Settings, results: dict[str, Result]) -> str:
    """Part (a): round-robin over ``keys``; returns the event loop's module (uvloop or asyncio)."""
    loop_kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
    ops = {key: _in_process_op(key) for key in keys}
    for key in keys:  # one discarded warm-up run each
        try:
            await ops[key](s.warm(key), s.budget(key))
        except Exception as exc:
            results[key].error = _failed(exc)
    for i in range(s.repeat):
        for key in keys:
            if results[key].error:
                continue
            progress(f"(a) {key}: run {i + 1}/{s.repeat} ...")
            try:
                results[key].runs.append(await ops[key](s.count(key), s.budget(key)))
            except Exception as exc:
                results[key].error = _failed(exc)
    return loop_kind


# -- (b) PyCSP 0.9, in a subprocess -----------------------------------------------------------


def pycsp_problem() -> str | None:
    """Why PyCSP 0.9 cannot be measured here (None: it is installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("pycsp")
    except PackageNotFoundError:
        return "not installable (not installed; pip install pycsp==0.9.2, the bench extra)"
    if not found.startswith(PYCSP_WANTED + "."):
        return f"not installable (pycsp {found} is installed, not {PYCSP_WANTED}.x)"
    return None


def pycsp_child(warm: int, count: int) -> int:
    """Child side of (b): print ``RATE <count> <seconds>`` for one run."""
    os.environ.setdefault("PYCSP_HOST", HOST)  # PyCSP binds its socket dispatcher here
    pc: Any = importlib.import_module("pycsp.parallel")
    timed: list[float] = []

    @pc.process  # type: ignore[untyped-decorator]
    def writer(cout: Any, total: int) -> None:
        for i in range(total):
            cout(i)

    @pc.process  # type: ignore[untyped-decorator]
    def reader(cin: Any) -> None:
        for i in range(warm):
            got = cin()
            if got != i:
                _wrong(got, i)
        start = clock()
        for i in range(warm, warm + count):
            got = cin()
            if got != i:
                _wrong(got, i)
        timed.append(clock() - start)

    ch = pc.Channel()
    try:
        pc.Parallel(writer(ch.writer(), warm + count), reader(ch.reader()))
    finally:
        pc.shutdown()
    if not timed:
        raise RuntimeError("the PyCSP reader did not finish")
    print(f"RATE {count} {timed[0]!r}", flush=True)
    return 0


class Child(ServerProcess):
    """A subprocess that is not a server: started without waiting for a port line.

    Stopped and reaped by :meth:`~ServerProcess.stop` (``with`` or ``finally``),
    its stderr kept for the report. ``stdout`` is a pipe only when asked for.
    """

    def __init__(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, stdout: bool = False
    ) -> None:
        super().__init__(name, argv)
        self.env = env
        self.want_stdout = stdout

    def start(self) -> Child:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,  # EOF: the benchmark is gone (exit_when_parent_exits)
            stdout=subprocess.PIPE if self.want_stdout else subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,  # Ctrl-C reaches the benchmark only, which stops us
            env=self.env,
        )
        return self

    def finish(self, timeout: float) -> str:
        """Wait for a clean exit within ``timeout`` s; its stdout (raises on failure or time-out)."""
        # Not communicate(): it would close stdin, which tells the child to stop.
        self.wait_ok(timeout, tail_lines=3)
        proc = self.proc
        assert proc is not None
        out = proc.stdout.read() if proc.stdout is not None else b""  # a line or two
        return out.decode(errors="replace")

    async def afinish(self, timeout: float) -> str:
        """:meth:`finish` without blocking the loop (the child may still need this process's server)."""
        return await asyncio.to_thread(self.finish, timeout)


def this_script(*args: str, profile: str | None = None) -> list[str]:
    argv = [sys.executable]
    if profile:
        argv += ["-m", "cProfile", "-o", profile]
    return [*argv, os.path.abspath(__file__), *args]


def measure_pycsp_once(s: Settings, pin: int | None) -> Rate:
    env = dict(os.environ, PYCSP_HOST=HOST)
    key = "pycsp"
    argv = this_script("--pycsp-child", "--count", str(s.count(key)), "--warm", str(s.warm(key)))
    if pin is not None:
        argv += ["--pin", str(pin)]
    child = Child("PyCSP child", argv, env=env, stdout=True)
    try:
        child.start()
        out = child.finish(s.budget(key))
    finally:
        child.stop()
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "RATE":
            ops, seconds = rest.split()
            return Rate(int(ops), float(seconds))
    raise RuntimeError(f"the PyCSP child printed no rate: {out[-300:]!r}")


def measure_pycsp(s: Settings, pin: int | None, result: Result) -> None:
    problem = pycsp_problem()
    if problem:
        result.error = problem
        return
    for i in range(s.repeat):
        progress(f"(b) pycsp: run {i + 1}/{s.repeat} ...")
        try:
            result.runs.append(measure_pycsp_once(s, pin))
        except Exception as exc:
            # It is installed but does not run: the same "not installable" the issue allows for.
            result.error = f"not installable ({_failed(exc)})"
            return


# -- (c) across processes ----------------------------------------------------------------------


def writer_child(port: int, name: str, buffer: int, total: int) -> int:
    """Writer side of (c): join ``name`` on the channel server at ``port`` and write 0..total-1."""

    async def write() -> None:
        cout = csp.Channel(name, buffer, connect=(HOST, port)).writer()
        for i in range(total):
            await cout(i)
        await cout.retire()
        await csp.shutdown()

    run_here(write())
    return 0


def _pipe_writer(conn: Connection, total: int) -> None:
    """The child of the ``pipe`` row (module level: a spawned child imports it by name)."""
    send = conn.send
    for i in range(total):
        send(i)
    conn.close()


def measure_pipe_once(s: Settings) -> Rate:
    key = "pipe"
    count, warm = s.count(key), s.warm(key)
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_pipe_writer, args=(writer, warm + count), name="pipe-writer", daemon=True)
    child.start()
    writer.close()  # ours: recv() raises EOFError if the child dies
    try:
        recv = reader.recv
        for i in range(warm):
            got = recv()
            if got != i:
                _wrong(got, i)
        start = clock()
        for i in range(warm, warm + count):
            got = recv()
            if got != i:
                _wrong(got, i)
        elapsed = clock() - start
        child.join(s.budget(key))
        if child.exitcode != 0:
            raise RuntimeError(f"the pipe writer exited with code {child.exitcode}")
        return Rate(count, elapsed)
    finally:
        reader.close()
        if child.is_alive():
            child.terminate()
            child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
        child.close()


_ids = itertools.count(1)


async def _read_values(cin: Callable[[], Awaitable[Any]], warm: int, count: int) -> Rate:
    for i in range(warm):
        got = await cin()
        if got != i:
            _wrong(got, i)
    start = clock()
    for i in range(warm, warm + count):
        got = await cin()
        if got != i:
            _wrong(got, i)
    return Rate(count, clock() - start)


async def measure_net_once(
    key: str, s: Settings, pin: int | None, server_port: int | None, profiler: cProfile.Profile | None
) -> Rate:
    """One run of a networked row: ``server_port`` None, this process hosts the channel."""
    buffer = BUFFERED if key.endswith("buffered") else 0
    count, warm = s.count(key), s.warm(key)
    name = f"bench-{key}-{os.getpid()}-{next(_ids)}"
    try:
        if server_port is None:
            server = await csp.ChannelServer.start(HOST, 0)
            port = server.port
            channel = csp.Channel(name, buffer)  # the local channel of that name: the server hosts it
        else:
            port = server_port
            channel = csp.Channel(name, buffer, connect=(HOST, port))
        cin = channel.reader()
        prof = os.path.join(s.profile, f"{key}-writer.prof") if s.profile else None
        args = ["--port", str(port), "--channel", name, "--buffer", str(buffer), "--count", str(warm + count)]
        argv = this_script("--writer", *args, profile=prof)
        if pin is not None:
            argv += ["--pin", str(pin)]
        writer = Child(f"{key} writer", argv)
        try:
            writer.start()
            async with asyncio.timeout(s.budget(key)):
                if profiler is not None:
                    profiler.enable()
                try:
                    rate = await _read_values(cin, warm, count)
                finally:
                    if profiler is not None:
                        profiler.disable()
            await writer.afinish(30.0)  # it retires its end and closes its link first
        finally:
            writer.stop()
        await cin.retire()
        return rate
    finally:
        await csp.shutdown()  # this loop's links and channel servers


class CspServer(ServerProcess):
    """``python -m asyncdist csp-server --port 0``: its port is read from its banner line."""

    def start(self) -> CspServer:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        try:
            line = self._read_line()
            found = re.search(r":(\d+)\s*$", line)
            if "listening" not in line or found is None:
                raise RuntimeError(f"csp-server printed {line!r}, not its address")
            self.port = int(found.group(1))
        except BaseException:
            self.stop()
            raise
        return self


def measure_cross(keys: Sequence[str], s: Settings, pin: int | None, results: dict[str, Result]) -> None:
    """Part (c): round-robin over ``keys``; one csp-server process for the rows that use it."""
    profilers = {k: cProfile.Profile() for k in keys if s.profile and k != "pipe"}
    server: CspServer | None = None
    try:
        if any(k.startswith("server-") for k in keys):
            argv = [sys.executable]
            if s.profile:
                argv += ["-m", "cProfile", "-o", os.path.join(s.profile, "csp-server.prof")]
            argv += ["-m", "asyncdist", "csp-server", "--host", HOST, "--port", "0"]  # our affinity too
            try:
                server = CspServer("csp-server", argv).start()
            except Exception as exc:
                for k in keys:
                    if k.startswith("server-"):
                        results[k].error = _failed(exc)
        for i in range(s.repeat):
            for key in keys:
                res = results[key]
                if res.error:
                    continue
                progress(f"(c) {key}: run {i + 1}/{s.repeat} ...")
                try:
                    if key == "pipe":
                        res.runs.append(measure_pipe_once(s))
                    else:
                        port = None
                        if key.startswith("server-"):
                            assert server is not None
                            port = server.port
                        res.runs.append(run_here(measure_net_once(key, s, pin, port, profilers.get(key))))
                except Exception as exc:
                    res.error = _failed(exc)
    finally:
        if server is not None:
            server.stop()
            if not server.exited_cleanly:
                progress(
                    f"warning: csp-server exited with code {server.returncode}: {server.stderr_tail(600)}"
                )
    if s.profile:
        for key, prof in profilers.items():
            prof.dump_stats(os.path.join(s.profile, f"{key}-reader.prof"))


# -- report ------------------------------------------------------------------------------------


@dataclass
class Check:
    comparison: Comparison
    value: float | None
    met: bool | None


def compute_checks(results: dict[str, Result]) -> list[Check]:
    checks = []
    for c in COMPARISONS:
        if c.num not in results or c.den not in results:
            continue
        num, den = results[c.num].best, results[c.den].best
        value = num / den if num is not None and den else None
        met = None if value is None or c.target is None else value >= c.target
        checks.append(Check(c, value, met))
    return checks


def _label(key: str, pycsp_version: str | None) -> str:
    if key == "pycsp" and pycsp_version:
        return f"PyCSP {pycsp_version} Channel()"
    return ROWS[key].label


def _fmt_ratio(check: Check) -> str:
    if check.value is None:
        return "n/a"
    target = check.comparison.target
    # Three decimals where two would round a miss onto the target.
    near = target is not None and round(check.value, 2) >= target > check.value
    return fmt_number(check.value, 3 if near else 2) + "x"


def report(
    results: dict[str, Result],
    checks: list[Check],
    s: Settings,
    pin: int | None,
    loop_kind: str | None,
    elapsed: float,
) -> None:
    found = versions(*VERSIONS_OF)
    pycsp_version = found.get("pycsp")
    quick = " (--quick: a tenth of the values, targets indicative)" if s.quick else ""
    print()
    print(f"asyncdist CSP channels benchmark{quick}")
    print(f"mode: {mode_line(pin, 'the benchmark and every child process', 'every process')}")
    print(
        f"event loop: {loop_kind or 'asyncdist.run default'} (in-process rows, the reader and the "
        "asyncdist writers); all sockets on 127.0.0.1"
    )
    print(
        f"each figure: best of {s.repeat} run(s), round-robin within a part; whole run {elapsed:.0f} s; "
        "msgs/s = small ints handed over per second, checked in order by the reader"
    )
    print(format_versions(found))
    print()
    rows = []
    for ch in checks:
        c = ch.comparison
        target = "info" if c.target is None else f">= {c.target:g}x"
        rows.append(
            [
                c.measure,
                _label(c.num, pycsp_version),
                fmt_number(results[c.num].best),
                _label(c.den, pycsp_version),
                fmt_number(results[c.den].best),
                _fmt_ratio(ch),
                target,
                fmt_met(ch.met),
            ]
        )
    headers = ["measure", "asyncdist", "msgs/s", "reference", "msgs/s", "ratio", "target", "met"]
    print(format_table(headers, rows, "llrlrrll"))
    print()
    width = max(len(k) for k in results)
    for key, res in results.items():
        spec = ROWS[key]
        if res.runs:
            runs = ", ".join(fmt_number(r.per_second) for r in res.runs)
            figures = f"{s.count(key):,} values/run; runs: {runs}"
        else:
            figures = "not measured"
        print(f"  {key:<{width}}  {_label(key, pycsp_version)}: {spec.how}; {figures}")
    notes = [(k, r.error) for k, r in results.items() if r.error]
    if notes:
        print()
    for key, err in notes:
        if key == "pycsp":
            print(f"note: PyCSP {PYCSP_WANTED}: {err}")
        else:
            print(f"note: {key}: {err}")
    print()
    print("ratio: asyncdist msgs/s over the reference's, best runs of this run (higher is better)")
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: a tenth of the values, one run")
    parser.add_argument("--repeat", type=int, help="runs per figure, the best is kept (default 3, --quick 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every row's number of values")
    parser.add_argument("--pin", type=int, metavar="CPU", help="pin the benchmark and its children to CPU")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument(
        "--profile", metavar="DIR", help="cProfile (c)'s writers, csp-server and reads into DIR/*.prof"
    )
    # Internal: the children this benchmark starts.
    parser.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pycsp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--buffer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.pin is not None:
        pin_to_cpu(args.pin)  # before any child starts: they inherit it
    if args.writer or args.pycsp_child:
        exit_when_parent_exits()
        exit_on_sigterm()
        if args.writer:
            return writer_child(args.port, args.channel, args.buffer, args.count)
        return pycsp_child(args.warm, args.count)

    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1 or args.scale <= 0:
        parser.error("--repeat must be >= 1 and --scale > 0")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    s = Settings(args.quick, repeat, args.scale, args.profile)
    keys = select_names(args.only, list(ROWS), "row")
    results = {key: Result() for key in keys}
    exit_on_sigterm()  # SIGTERM unwinds through the finally blocks that stop the children
    started = time.monotonic()
    loop_kind = None
    try:
        part_a = [k for k in keys if ROWS[k].part == "a"]
        if part_a:
            loop_kind = run_here(measure_in_process(part_a, s, results))
        if "pycsp" in results:
            measure_pycsp(s, args.pin, results["pycsp"])
        part_c = [k for k in keys if ROWS[k].part == "c"]
        if part_c:
            measure_cross(part_c, s, args.pin, results)
    except KeyboardInterrupt:
        print("interrupted: every child process was stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    checks = compute_checks(results)
    report(results, checks, s, args.pin, loop_kind, elapsed)
    emit_json(
        {
            "benchmark": "bench_csp",
            "mode": "pinned" if args.pin is not None else "unpinned",
            "pin_cpu": args.pin,
            "quick": s.quick,
            "repeat": s.repeat,
            "event_loop": loop_kind,
            "units": {"msgs_per_s": "small ints handed from writer to reader per second (best run)"},
            "versions": versions(*VERSIONS_OF),
            "elapsed_s": round(elapsed, 1),
            "results": {
                key: {
                    "label": ROWS[key].label,
                    "part": ROWS[key].part,
                    "values_per_run": s.count(key),
                    "msgs_per_s": res.best,
                    "median_msgs_per_s": res.median,
                    "runs": [round(r.per_second, 1) for r in res.runs],
                    "error": res.error,
                }
                for key, res in results.items()
            },
            "checks": {
                ch.comparison.key: {
                    "measure": ch.comparison.measure,
                    "value": ch.value,
                    "target": ch.comparison.target,
                    "met": ch.met,
                }
                for ch in checks
            },
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
