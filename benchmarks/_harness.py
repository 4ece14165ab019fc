"""Shared helpers for the benchmarks in this folder: timing, CPU pinning, server subprocesses, output.

Conventions every benchmark here follows:

* a human-readable report on stdout, progress on stderr, and as the very last
  line of stdout exactly one JSON object (:func:`emit_json`), so a script can
  collect results with ``... | tail -n 1``;
* each server runs in its own subprocess (:class:`ServerProcess`) that prints
  ``PORT <n>`` as its first line of stdout; the subprocess is always
  terminated and reaped, also on errors and Ctrl-C, and exits by itself when
  the benchmark process disappears (its stdin reaches EOF,
  :func:`exit_when_parent_exits`);
* ``--pin CPU`` pins the benchmark and its servers to one CPU
  (:func:`pin_to_cpu`), like ``taskset -c CPU``.

The end of this module holds what bench_connection.py and bench_objects.py
share: both measure an ``echo`` call three ways against a table of
implementations (:class:`EchoBenchmark`), and only the table, the figures
dataclass and a few words differ. bench_futures.py uses the generic helpers.

This module only uses the standard library (uvloop is imported on demand; Pyro5's
``api`` module is passed in by the benchmark that uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import FrameType, ModuleType, TracebackType
from typing import IO, Any, ClassVar, Generic, Protocol, TypeVar

__all__ = [
    "BULK_SCALE",
    "BULK_SIZE",
    "CONNECT_TIMEOUT",
    "BestOf",
    "EchoBenchmark",
    "EchoFigures",
    "EchoSettings",
    "Impl",
    "Rate",
    "Ratio",
    "RatioSpec",
    "ServerProcess",
    "acount_for",
    "ameasure_echo",
    "announce_port",
    "arun_for",
    "best",
    "by_name",
    "check",
    "count_for",
    "echo_tasks",
    "emit_json",
    "exit_on_sigterm",
    "exit_when_parent_exits",
    "fmt_met",
    "fmt_number",
    "format_table",
    "format_versions",
    "loop_factory",
    "measure_echo",
    "mode_line",
    "parse_measures",
    "pin_to_cpu",
    "progress",
    "pyro5_echo_client",
    "requires",
    "run_async",
    "run_for",
    "select_names",
    "serve_pyro5_echo",
    "stop_tasks",
    "versions",
    "wait_for_termination",
]

_T = TypeVar("_T")

clock = time.perf_counter


# -- timing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """``ops`` operations completed in ``seconds`` of measured time."""

    ops: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def best(rates: Sequence[Rate]) -> Rate:
    """The fastest of several runs (noise on a shared machine only ever slows a run down)."""
    return max(rates, key=lambda r: r.per_second)


def run_for(op: Callable[[], object], duration: float, warmup: float) -> Rate:
    """Call ``op()`` repeatedly: ``warmup`` seconds unmeasured, then ``duration`` seconds measured."""
    end = clock() + warmup
    while clock() < end:
        op()
    ops = 0
    start = clock()
    end = start + duration
    while True:
        op()
        ops += 1
        now = clock()
        if now >= end:
            return Rate(ops, now - start)


async def arun_for(op: Callable[[], Awaitable[object]], duration: float, warmup: float) -> Rate:
    """Async :func:`run_for`: ``await op()`` one at a time."""
    end = clock() + warmup
    while clock() < end:
        await op()
    ops = 0
    start = clock()
    end = start + duration
    while True:
        await op()
        ops += 1
        now = clock()
        if now >= end:
            return Rate(ops, now - start)


def count_for(counter: Callable[[], int], duration: float, warmup: float) -> Rate:
    """Sample a counter that workers increment: after ``warmup`` s and ``duration`` s later."""
    time.sleep(warmup)
    c0, t0 = counter(), clock()
    time.sleep(duration)
    c1, t1 = counter(), clock()
    return Rate(c1 - c0, t1 - t0)


async def acount_for(counter: Callable[[], int], duration: float, warmup: float) -> Rate:
    """Async :func:`count_for` (the workers are tasks on the running loop)."""
    await asyncio.sleep(warmup)
    c0, t0 = counter(), clock()
    await asyncio.sleep(duration)
    c1, t1 = counter(), clock()
    return Rate(c1 - c0, t1 - t0)


# -- event loops and CPUs --------------------------------------------------------------------


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``"uvloop"`` or ``"asyncio"`` (the default loop) -> a function making such loops."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    raise ValueError(f"unknown event loop {name!r}")


def run_async(main: Coroutine[Any, Any, _T], loop: str) -> _T:
    """Run ``main`` on a new loop of the named kind, like :func:`asyncio.run`."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


def pin_to_cpu(cpu: int) -> None:
    """Pin this process (and the threads and processes it starts later) to one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("--pin needs os.sched_setaffinity (Linux)")
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise SystemExit(f"--pin {cpu}: CPU {cpu} is not available here (allowed: {sorted(allowed)})")
    os.sched_setaffinity(0, {cpu})


# -- server subprocesses ---------------------------------------------------------------------


class ServerProcess:
    """A server subprocess whose first stdout line is ``PORT <n>``; a context manager.

    The child gets its own session (Ctrl-C in the terminal reaches only the
    benchmark, which then stops the child), a pipe as stdin (EOF tells it the
    benchmark is gone) and a temporary file as stderr (shown if it fails).
    """

    def __init__(self, name: str, argv: Sequence[str], *, start_timeout: float = 30.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._stderr_text = ""

    def start(self) -> ServerProcess:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        try:
            line = self._read_line()
            word, _, value = line.partition(" ")
            if word != "PORT" or not value.strip().isdigit():
                raise RuntimeError(f"{self.name} server printed {line!r} instead of 'PORT <n>'")
            self.port = int(value)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_line(self) -> str:
        proc = self.proc
        assert proc is not None
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self.start_timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name} server did not report its port within {self.start_timeout:g} s"
                )
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    proc.wait(timeout=5)
                    raise RuntimeError(
                        f"{self.name} server exited with code {proc.returncode} before reporting its port:\n"
                        + self.stderr_tail()
                    )
                data += chunk
        return data.split(b"\n", 1)[0].decode(errors="replace").strip()

    @property
    def returncode(self) -> int | None:
        """The exit code once stopped (negative: killed by that signal)."""
        return self.proc.returncode if self.proc is not None else None

    @property
    def exited_cleanly(self) -> bool:
        """Stopped by our SIGTERM or exited normally (not crashed, not SIGKILLed)."""
        return self.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM)

    def stderr_tail(self, limit: int = 3000) -> str:
        """The last ``limit`` characters the server wrote to stderr (also after stop())."""
        if self._stderr is not None and not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read().decode(errors="replace")
        return self._stderr_text[-limit:]

    def wait_ok(self, timeout: float, *, tail_lines: int = 3) -> None:
        """Wait for a clean exit within ``timeout`` s (raises TimeoutError, or RuntimeError with
        the last lines of stderr when the exit code is not 0). Does not close stdin."""
        proc = self.proc
        assert proc is not None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            tail = self.stderr_tail(500 * tail_lines).strip().splitlines()
            raise RuntimeError(
                f"{self.name} exited with code {proc.returncode}: {' | '.join(tail[-tail_lines:])}"
            )

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; always reaps. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            if self._stderr is not None:
                self.stderr_tail()  # keep the text for later
                self._stderr.close()
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def announce_port(port: int) -> None:
    """Server side: report the listening port to the :class:`ServerProcess` that started us."""
    print(f"PORT {port}", flush=True)


def exit_when_parent_exits() -> None:
    """Server side: send ourselves SIGTERM when stdin reaches EOF (the benchmark is gone)."""

    def watch() -> None:
        # os.read on the raw descriptor: a daemon thread blocked inside sys.stdin's buffered
        # reader would hold its lock and make interpreter shutdown abort.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit in the main thread (``finally`` blocks and cProfile still run)."""
    signal.signal(signal.SIGTERM, _raise_system_exit)


async def wait_for_termination() -> None:
    """Server side, on an event loop: return once SIGTERM or SIGINT arrives."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop


# -- output -----------------------------------------------------------------------------------


def versions(*packages: str) -> dict[str, str | None]:
    """Python's version and each installed package's (None when it is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def format_versions(found: dict[str, str | None]) -> str:
    """The ``versions: ...`` line of a report."""
    return "versions: " + ", ".join(f"{k} {val}" for k, val in found.items() if val)


def fmt_number(value: float | None, digits: int = 0, missing: str = "n/a") -> str:
    """``12,345`` / ``1.23`` style, ``missing`` for None."""
    if value is None or not math.isfinite(value):
        return missing
    return f"{value:,.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A plain-text table; ``align`` holds one ``l`` or ``r`` per column (default: first l, rest r)."""
    ncols = len(headers)
    align = align or "l" + "r" * (ncols - 1)
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(ncols)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if a == "l" else str(c).rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def emit_json(obj: dict[str, Any]) -> None:
    """Print ``obj`` as one line of strict JSON (NaN/inf become null); call it last."""
    sys.stdout.flush()
    print(json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False), flush=True)


def progress(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def mode_line(pin: int | None, pinned: str, unpinned: str) -> str:
    """The ``mode: ...`` text of a report: who shares CPU ``pin``, or who may use every CPU."""
    if pin is not None:
        return f"pinned: {pinned} share CPU {pin} (like taskset -c {pin})"
    return f"unpinned: {unpinned} free to use the {len(os.sched_getaffinity(0))} CPUs"


def fmt_met(met: bool | None) -> str:
    """The ``met`` column of a table of targets: blank for information only."""
    if met is None:
        return ""
    return "yes" if met else "NO"


# -- the command line ------------------------------------------------------------------------


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


def by_name(*items: _N) -> dict[str, _N]:
    """A table of implementations (or families), keyed by their names, in this order."""
    return {item.name: item for item in items}


def requires(module: str, message: str) -> Callable[[], str | None]:
    """A ``missing`` check: ``message`` when ``module`` cannot be imported here, else None."""

    def missing() -> str | None:
        return message if importlib.util.find_spec(module) is None else None

    return missing


def select_names(
    only: str | None, names: Sequence[str], kind: str = "implementation", aliases: Mapping[str, str] = {}
) -> list[str]:
    """``--only`` names (comma-separated; a prefix selects every match), in the order of ``names``.

    ``kind`` names what is chosen in the error message; ``aliases`` maps short words to names.
    """
    if not only:
        return list(names)
    chosen: list[str] = []
    for word in (w.strip() for w in only.split(",")):
        if not word:
            continue
        word = aliases.get(word, word)
        matches = [n for n in names if n.startswith(word)]
        if not matches:
            raise SystemExit(f"--only: unknown {kind} {word!r}; choose from {', '.join(names)}")
        chosen.extend(m for m in matches if m not in chosen)
    return [n for n in names if n in chosen]


def parse_measures(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str]) -> frozenset[str]:
    """``--measure``: a comma-separated subset of ``allowed`` (an argparse error otherwise)."""
    measures = frozenset(m.strip() for m in text.split(",") if m.strip())
    if not measures or not measures <= set(allowed):
        parser.error(f"--measure takes a comma-separated subset of {','.join(allowed)}")
    return measures


# -- echo benchmarks: bench_connection.py and bench_objects.py ------------------------------
#
# Each implementation is a server (run in a subprocess, ``--serve NAME``) and a client (run in
# the benchmark) that makes three figures of an ``echo`` call: (a) sequential round trips per
# second, (b) calls per second with several at a time (how many and how: each benchmark's
# own), (c) 1 MiB ``bytes`` echoes, in MB/s of payload one way.

BULK_SIZE = 1 << 20  # (c) payload: 1 MiB
MB = 1e6
BULK_SCALE = BULK_SIZE / MB  # calls/s -> MB/s of payload one way
CONNECT_TIMEOUT = 15.0

#: ``echo(x)`` returns ``x`` from the server: a blocking call, or a coroutine function.
Echo = Callable[[Any], Any]
AsyncEcho = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class EchoSettings:
    duration: float
    warmup: float
    repeat: int
    measures: frozenset[str]

    @property
    def budget(self) -> float:
        """Timeout for one measurement, warm-up included."""
        return self.warmup + self.duration + 30.0

    def warmup_for(self, run: int) -> float:
        """The full warm-up before the first run of a measurement, a short one before the others."""
        return self.warmup if run == 0 else min(self.warmup, 0.1)

    def repeated(self, measure: Callable[[float], Rate]) -> list[Rate]:
        """Run ``measure(warmup)`` ``repeat`` times."""
        return [measure(self.warmup_for(i)) for i in range(self.repeat)]

    async def arepeated(self, measure: Callable[[float], Awaitable[Rate]]) -> list[Rate]:
        """Async :meth:`repeated`, each run bounded by :attr:`budget`."""
        rates = []
        for i in range(self.repeat):
            async with asyncio.timeout(self.budget):
                rates.append(await measure(self.warmup_for(i)))
        return rates


@dataclass
class EchoFigures:
    """The three results of one implementation (None: not measured or failed).

    A subclass names (b) and declares its two fields, ``<many>_calls_per_s`` and
    ``<many>_mode`` (how the calls were made)::

        @dataclass
        class Figures(EchoFigures, many="pipelined", measure="pipe"): ...

    ``measure`` is (b)'s word for ``--measure``, beside ``seq`` (a) and ``bulk`` (c).
    """

    #: The --measure words of (a), (b) and (c).
    MEASURES: ClassVar[tuple[str, str, str]]
    #: The first word of (b)'s two fields.
    MANY: ClassVar[str]

    seq_calls_per_s: float | None = None
    bulk_mb_per_s: float | None = None
    error: str | None = None
    #: Every run of each figure, in the figure's unit (the figure is the best).
    runs: dict[str, list[float]] = field(default_factory=dict)

    def __init_subclass__(cls, *, many: str, measure: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.MANY = many
        cls.MEASURES = ("seq", measure, "bulk")

    @classmethod
    def metrics(cls) -> tuple[str, str, str]:
        """The fields of (a), (b) and (c)."""
        return "seq_calls_per_s", f"{cls.MANY}_calls_per_s", "bulk_mb_per_s"

    def value(self, metric: str) -> float | None:
        found: float | None = getattr(self, metric)
        return found

    @property
    def many_mode(self) -> str:
        """How (b)'s calls were made."""
        mode: str = getattr(self, f"{self.MANY}_mode")
        return mode

    def record(self, metric: str, rates: Sequence[Rate], scale: float = 1.0) -> None:
        values = [r.per_second * scale for r in rates]
        self.runs[metric] = [round(v, 1) for v in values]
        setattr(self, metric, best(rates).per_second * scale)

    def as_dict(self) -> dict[str, Any]:
        """:func:`~dataclasses.asdict` in the table's order: (a), (b), (c), then error and runs."""
        out = asdict(self)
        for key in ("bulk_mb_per_s", "error", "runs"):
            out[key] = out.pop(key)
        return out


_F = TypeVar("_F", bound=EchoFigures)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"wrong echo: {what}")


def _check_bulk(echoed: Any, payload: bytes, exact_type: bool) -> None:
    """The first 1 MiB echo, before the measured ones: the same bytes came back."""
    if exact_type:
        # msgpack carries bytes as bin: they must come back as the same bytes object type.
        check(type(echoed) is bytes and echoed == payload, "1 MiB payload (msgpack bytes)")
    else:
        check(echoed == payload, "1 MiB payload")


async def stop_tasks(tasks: Sequence[asyncio.Task[None]], timeout: float = 15.0) -> None:
    """Wait for worker tasks told to stop; cancel stragglers; re-raise the first failure."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for t in tasks:
        exc = t.exception() if t.done() and not t.cancelled() else None
        if exc is not None:
            raise exc
    if pending:
        raise TimeoutError(f"{len(pending)} worker tasks did not stop within {timeout:g} s")


def echo_tasks(echo: AsyncEcho, n: int, s: EchoSettings) -> Callable[[float], Awaitable[Rate]]:
    """(b) as ``n`` tasks on this loop, each awaiting ``echo(1)`` one call after the other."""

    async def measure(warmup: float) -> Rate:
        done = 0
        stop = False

        async def worker() -> None:
            nonlocal done
            while not stop:
                check(await echo(1) == 1, "echo(1)")
                done += 1

        tasks = [asyncio.create_task(worker()) for _ in range(n)]
        try:
            return await acount_for(lambda: done, s.duration, warmup)
        finally:
            stop = True
            await stop_tasks(tasks)

    return measure


async def ameasure_echo(
    fig: EchoFigures, s: EchoSettings, echo: AsyncEcho, many: Callable[[float], Awaitable[Rate]]
) -> None:
    """Record in ``fig`` each figure ``s.measures`` asks for: (a) and (c) with ``await echo(x)``,
    (b) with ``await many(warmup)``."""
    seq, many_metric, bulk = fig.metrics()
    if fig.MEASURES[0] in s.measures:

        async def one() -> None:
            check(await echo(1) == 1, "echo(1)")

        fig.record(seq, await s.arepeated(lambda w: arun_for(one, s.duration, w)))

    if fig.MEASURES[1] in s.measures:
        fig.record(many_metric, await s.arepeated(many))

    if fig.MEASURES[2] in s.measures:
        payload = os.urandom(BULK_SIZE)
        _check_bulk(await echo(payload), payload, False)

        async def big() -> None:
            check(len(await echo(payload)) == BULK_SIZE, "1 MiB payload")

        fig.record(bulk, await s.arepeated(lambda w: arun_for(big, s.duration, w)), BULK_SCALE)


def measure_echo(
    fig: EchoFigures,
    s: EchoSettings,
    echo: Echo | None,
    many: Callable[[float], Rate] | None = None,
    *,
    exact_type: bool = False,
) -> None:
    """Blocking :func:`ameasure_echo`: (a) and (c) only with an ``echo``, (b) only with ``many``;
    ``exact_type``: the 1 MiB payload must come back as ``bytes``."""
    seq, many_metric, bulk = fig.metrics()
    if echo is not None and fig.MEASURES[0] in s.measures:

        def one() -> None:
            check(echo(1) == 1, "echo(1)")

        fig.record(seq, s.repeated(lambda w: run_for(one, s.duration, w)))

    if many is not None and fig.MEASURES[1] in s.measures:
        fig.record(many_metric, s.repeated(many))

    if echo is not None and fig.MEASURES[2] in s.measures:
        payload = os.urandom(BULK_SIZE)
        _check_bulk(echo(payload), payload, exact_type)

        def big() -> None:
            check(len(echo(payload)) == BULK_SIZE, "1 MiB payload")

        fig.record(bulk, s.repeated(lambda w: run_for(big, s.duration, w)), BULK_SCALE)


# -- Pyro5, the peer of both echo benchmarks (``api`` is ``Pyro5.api``, configured) --


def serve_pyro5_echo(api: Any, object_id: str, *, instance: bool) -> None:
    """Serve an exposed ``echo`` until SIGTERM; ``instance``: register one object, not the class."""

    @api.expose
    class EchoService:
        def echo(self, x: Any) -> Any:
            return x

    exit_on_sigterm()
    daemon = api.Daemon(host="127.0.0.1", port=0)
    try:
        daemon.register(EchoService() if instance else EchoService, objectId=object_id)
        announce_port(daemon.sock.getsockname()[1])
        daemon.requestLoop()
    finally:
        daemon.close()


def threaded_echo_rate(
    n: int,
    s: EchoSettings,
    warmup: float,
    open_echo: Callable[[], tuple[Callable[[Any], Any], Callable[[], None] | None]],
) -> Rate:
    """(b) for a blocking client: ``n`` threads calling ``echo(1)`` one call at a time, each on
    what ``open_echo()`` gives it: ``(echo, close or None)``."""
    counts = [0] * n
    stop = threading.Event()
    ready = threading.Barrier(n + 1, timeout=CONNECT_TIMEOUT)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            echo, close = open_echo()
            try:
                ready.wait()
                while not stop.is_set():
                    check(echo(1) == 1, "echo(1)")
                    counts[i] += 1
            finally:
                if close is not None:
                    close()
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        ready.wait()
        return count_for(lambda: sum(counts), s.duration, warmup)
    finally:
        stop.set()
        for t in threads:
            t.join(CONNECT_TIMEOUT)
        if errors:
            raise errors[0]


def _pyro5_threads(api: Any, uri: str, n: int, s: EchoSettings, warmup: float) -> Rate:
    """(b) for Pyro5, which does not pipeline: ``n`` threads with a proxy each, one call at a time."""

    def open_echo() -> tuple[Callable[[Any], Any], Callable[[], None]]:
        proxy = api.Proxy(uri)
        proxy._pyroBind()
        return proxy.echo, proxy._pyroRelease

    return threaded_echo_rate(n, s, warmup, open_echo)


def pyro5_echo_client(
    api: Any,
    uri: str,
    s: EchoSettings,
    fig: _F,
    threads: int,
    *,
    exact_type: bool = False,
    many_apart: bool = False,
) -> _F:
    """The three figures against a Pyro5 echo object: (a) and (c) on one proxy, (b) with
    ``threads`` threads and a proxy each (``many_apart``: once that first proxy is closed)."""

    def many(warmup: float) -> Rate:
        return _pyro5_threads(api, uri, threads, s, warmup)

    with api.Proxy(uri) as proxy:
        proxy._pyroBind()
        measure_echo(fig, s, proxy.echo, None if many_apart else many, exact_type=exact_type)
    if many_apart:
        measure_echo(fig, s, None, many)
    return fig


# -- the table of implementations, ratios and the report -----------------------------------


def _nothing_missing() -> str | None:
    return None


@dataclass(frozen=True)
class Impl(Generic[_F]):
    name: str
    serve: Callable[[], None]
    client: Callable[[int, EchoSettings], _F]
    missing: Callable[[], str | None] = _nothing_missing
    description: str = ""


@dataclass(frozen=True)
class BestOf:
    """A row of the report that takes, for each figure, the best of a group of implementations."""

    name: str
    members: tuple[str, ...]
    prefix: str  # left out of a member's name where the row names it
    mode: str  # the row's (b) mode
    description: str
    json_key: str

    def short(self, member: str) -> str:
        return member.removeprefix(self.prefix)


@dataclass(frozen=True)
class RatioSpec:
    part: str  # "a", "b" or "c"
    num: str
    den: str  # an implementation or a BestOf's name
    target: float | None  # None: informational

    @property
    def key(self) -> str:
        return f"{self.part}:{self.num}/{self.den}"


@dataclass
class Ratio:
    key: str
    part: str
    metric: str
    num: str
    den: str
    value: float | None
    target: float | None
    met: bool | None = None
    #: For a BestOf denominator: the implementation that gave it.
    den_source: str | None = None

    def as_dict(self, sourced: bool) -> dict[str, Any]:
        """The ratio for the JSON; ``den_source`` only where a benchmark has a BestOf row."""
        out = asdict(self)
        if not sourced:
            del out["den_source"]
        return out


ECHO_HEADERS = (
    "implementation",
    "(a) seq calls/s",
    "(b) calls/s",
    "(b) concurrency",
    "(c) 1 MiB echo MB/s, payload one way",
)


#: Packages whose versions each report of an echo benchmark names.
ECHO_VERSIONS = ("asyncdist", "uvloop", "msgpack", "Pyro5")
#: The JSON's unit of (c), the same 1 MiB echo in every echo benchmark.
BULK_UNIT = "1 MiB bytes echo, payload bytes one way per second / 1e6"


@dataclass(frozen=True)
class EchoBenchmark(Generic[_F]):
    """One echo benchmark: its implementations, its figures, its words; :meth:`main` runs it."""

    #: The benchmark's script: servers run its file with --serve NAME, its docstring opens --help
    #: and its name is the JSON's "benchmark".
    module: ModuleType
    figures: type[_F]
    impls: Mapping[str, Impl[_F]]
    title: str
    many_label: str  # (b) in the table of ratios
    ratios: Sequence[RatioSpec]
    units: Mapping[str, str]  # for the JSON: a sentence for (a) and one for (b) (BULK_UNIT is (c)'s)
    server: str = "server"  # what the report calls a server
    default_repeat: int = 2
    best: BestOf | None = None
    #: Offer --no-process-warmup, and by default run a discarded pass of the first implementation.
    process_warmup: bool = False
    #: Without --pin or --unpinned, measure pinned to CPU 0 and then unpinned, in one table.
    both_by_default: bool = False

    @property
    def script(self) -> str:
        script = self.module.__file__
        assert script is not None
        return script

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.script))[0]

    def parser(self) -> argparse.ArgumentParser:
        server = self.server
        measures = ",".join(self.figures.MEASURES)
        parser = argparse.ArgumentParser(description=(self.module.__doc__ or "").split("\n\n")[0])
        parser.add_argument("--duration", type=float, help="seconds per measurement (default 2, --quick 0.3)")
        parser.add_argument(
            "--warmup", type=float, help="unmeasured seconds before each (default 0.5, quick 0.1)"
        )
        parser.add_argument(
            "--repeat",
            type=int,
            help=f"runs per measurement, the best is kept (default {self.default_repeat}, --quick 1)",
        )
        parser.add_argument("--quick", action="store_true", help="a short smoke-test run")
        parser.add_argument(
            "--pin", type=int, metavar="CPU", help=f"pin the benchmark and every {server} to CPU"
        )
        both = "the default" if self.both_by_default else "not the default"
        parser.add_argument(
            "--both",
            action="store_true",
            help=f"measure pinned (to --pin CPU, default 0) and then unpinned, in one table ({both})",
        )
        parser.add_argument("--unpinned", action="store_true", help="measure unpinned only")
        parser.add_argument(
            "--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(self.impls)}"
        )
        parser.add_argument(
            "--measure", default=measures, help=f"comma-separated subset of {measures} (default all)"
        )
        parser.add_argument(
            "--profile-server", metavar="DIR", help=f"run each {server} under cProfile, DIR/NAME.prof"
        )
        if self.process_warmup:
            parser.add_argument(
                "--no-process-warmup",
                action="store_true",
                help="skip the discarded pass of the first implementation before the measured ones",
            )
        parser.add_argument("--serve", choices=list(self.impls), help=argparse.SUPPRESS)  # internal
        return parser

    def settings(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> EchoSettings:
        measures = parse_measures(parser, args.measure, self.figures.MEASURES)
        duration = args.duration if args.duration is not None else (0.3 if args.quick else 2.0)
        warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else min(0.5, duration / 4))
        repeat = args.repeat if args.repeat is not None else (1 if args.quick else self.default_repeat)
        if duration <= 0 or warmup < 0 or repeat < 1:
            parser.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
        return EchoSettings(duration, warmup, repeat, measures)

    def main(self, argv: Sequence[str] | None = None) -> int:
        parser = self.parser()
        args = parser.parse_args(argv)
        if args.serve:  # be a server, in a subprocess run_one started
            if args.pin is not None:
                pin_to_cpu(args.pin)
            exit_when_parent_exits()
            self.impls[args.serve].serve()
            return 0

        s = self.settings(parser, args)
        names = select_names(args.only, list(self.impls))
        if args.profile_server:
            os.makedirs(args.profile_server, exist_ok=True)
        if args.unpinned and (args.pin is not None or args.both):
            parser.error("--unpinned excludes --pin and --both")
        both = args.both or (self.both_by_default and args.pin is None and not args.unpinned)
        exit_on_sigterm()  # SIGTERM unwinds through the finally blocks that stop the servers
        warm = names[0] if self.process_warmup and not args.no_process_warmup else None
        if not both:
            if args.pin is not None:
                pin_to_cpu(args.pin)
            return self.run_mode(names, s, args, args.pin, warm, report=True)[0]
        # Both modes in one run and one table: pinned first, then every CPU again.
        allowed = os.sched_getaffinity(0)
        pin = args.pin if args.pin is not None else 0
        pin_to_cpu(pin)
        status, pinned = self.run_mode(names, s, args, pin, warm, report=False)
        if status:
            return status
        os.sched_setaffinity(0, allowed)
        status, unpinned = self.run_mode(names, s, args, None, warm, report=False)
        if status:
            return status
        self.report_both(pinned, unpinned, s, pin)
        emit_json(
            {
                "benchmark": self.name,
                "mode": "both",
                "modes": {"pinned": pinned[3], "unpinned": unpinned[3]},
            }
        )
        return 0

    def run_mode(
        self,
        names: Sequence[str],
        s: EchoSettings,
        args: argparse.Namespace,
        pin: int | None,
        warm: str | None,
        *,
        report: bool,
    ) -> tuple[int, Any]:
        """Measure every implementation in one mode; report it alone, or return its parts."""
        started = time.monotonic()
        results: dict[str, _F] = {}
        try:
            if warm is not None:
                # The first implementation measured in a process moves 1 MiB payloads 10-20 % slower
                # than the ones after it (client-process state, whichever peer goes first), so one
                # short pass of the first implementation is run and discarded before any figure.
                progress(f"process warm-up: {warm}, discarded ...")
                short = EchoSettings(min(s.duration, 1.0), s.warmup, 1, s.measures)
                discarded = self.run_one(warm, short, pin, None)
                if discarded.error:
                    progress(f"  [{discarded.error}]")
            for name in names:
                progress(f"{name}{' (pinned)' if pin is not None else ''}: measuring ...")
                fig = results[name] = self.run_one(name, s, pin, args.profile_server)
                progress(self.summary(fig))
        except KeyboardInterrupt:
            print(f"interrupted: every {self.server} was stopped", file=sys.stderr)
            return 130, None
        elapsed = time.monotonic() - started

        ratios = self.compute_ratios(results)
        data = self.json(results, ratios, s, pin, warm, elapsed)
        if report:
            self.report(results, ratios, s, pin, elapsed)
            emit_json(data)
            return 0, None
        return 0, (results, ratios, elapsed, data)

    def report_both(self, pinned: Any, unpinned: Any, s: EchoSettings, pin: int) -> None:
        """One table for both modes: each implementation pinned, then unpinned; then the ratios."""
        print()
        print(self.title)
        print(
            f"modes: pinned (the benchmark and every {self.server} share CPU {pin}, like taskset -c "
            f"{pin}), then unpinned (free to use the {len(os.sched_getaffinity(0))} CPUs)"
        )
        print(
            f"each figure: best of {s.repeat} run(s) of {s.duration:g} s, {s.warmup:g} s warm-up first; "
            f"whole run {pinned[2] + unpinned[2]:.0f} s"
        )
        print(format_versions(versions(*ECHO_VERSIONS)))
        print()
        rows = []
        for label, (results, _, _, _) in (("pinned", pinned), ("unpinned", unpinned)):
            rows += [[f"{row[0]}, {label}", *row[1:]] for row in self.figure_rows(results)]
        print(format_table(ECHO_HEADERS, rows, "lrrlr"))
        print()
        width = max(map(len, self.impls)) + 1
        for name in pinned[0]:
            print(f"  {name:<{width}} {self.impls[name].description}")
        if self.best is not None:
            print(f"  {self.best.name:<{width}} {self.best.description}")
        for label, (results, _, _, _) in (("pinned", pinned), ("unpinned", unpinned)):
            for name, fig in results.items():
                if fig.error:
                    print(f"note: {name}, {label}: {fig.error}")
        print()
        rrows = []
        for label, (results, ratios, _, _) in (("pinned", pinned), ("unpinned", unpinned)):
            rrows += [[f"{row[0]}, {label}", *row[1:]] for row in self.ratio_rows(results, ratios)]
        if rrows:
            print(format_table(["measure", "ratio", "value", "target", "met"], rrows, "llrll"))
            print()

    def server_argv(self, name: str, pin: int | None, profile_dir: str | None) -> list[str]:
        argv = [sys.executable]
        if profile_dir:
            argv += ["-m", "cProfile", "-o", os.path.join(profile_dir, f"{name}.prof")]
        argv += [os.path.abspath(self.script), "--serve", name]
        if pin is not None:
            argv += ["--pin", str(pin)]
        return argv

    def run_one(self, name: str, s: EchoSettings, pin: int | None, profile_dir: str | None) -> _F:
        """Start ``name``'s server, run its client here, stop the server: its figures."""
        impl = self.impls[name]
        reason = impl.missing()
        if reason:
            return self.figures(error=f"skipped: {reason}")
        server = ServerProcess(name, self.server_argv(name, pin, profile_dir))
        try:
            with server:
                fig = impl.client(server.port, s)
            if not server.exited_cleanly:
                tail = server.stderr_tail(1500).strip()
                print(f"warning: {name} server exited with code {server.returncode}: {tail}", file=sys.stderr)
            return fig
        except Exception as exc:
            tail = server.stderr_tail(1500).strip()
            detail = f"{type(exc).__name__}: {exc}"
            if tail:
                detail += f"\n    server stderr: {tail}"
            return self.figures(error=f"failed: {detail}")

    def summary(self, fig: _F) -> str:
        """The progress line after an implementation."""
        seq, many, bulk = (fmt_number(fig.value(m)) for m in fig.metrics())
        line = f"  (a) {seq} calls/s, (b) {many} calls/s, (c) {bulk} MB/s"
        return line + (f"  [{fig.error}]" if fig.error else "")

    def best_values(self, results: Mapping[str, _F]) -> dict[str, tuple[float, str]]:
        """For each metric, the best figure of the BestOf group and whose it is."""
        out: dict[str, tuple[float, str]] = {}
        if self.best is None:
            return out
        for metric in self.figures.metrics():
            found = [
                (value, name)
                for name in self.best.members
                if name in results and (value := results[name].value(metric)) is not None
            ]
            if found:
                out[metric] = max(found)
        return out

    def compute_ratios(self, results: Mapping[str, _F]) -> list[Ratio]:
        best_values = self.best_values(results)
        metrics = dict(zip("abc", self.figures.metrics(), strict=True))
        out = []
        for spec in self.ratios:
            metric = metrics[spec.part]
            source = None
            num = results[spec.num].value(metric) if spec.num in results else None
            if self.best is not None and spec.den == self.best.name:
                den, source = best_values.get(metric, (None, None))
            else:
                den = results[spec.den].value(metric) if spec.den in results else None
            value = num / den if num is not None and den else None
            met = None if value is None or spec.target is None else value >= spec.target
            out.append(
                Ratio(spec.key, spec.part, metric, spec.num, spec.den, value, spec.target, met, source)
            )
        return out

    def figure_rows(self, results: Mapping[str, _F]) -> list[list[str]]:
        """The table's rows: one per implementation, then the BestOf row."""
        seq, many, bulk = self.figures.metrics()
        rows = [
            [
                name,
                fmt_number(fig.value(seq)),
                fmt_number(fig.value(many)),
                fig.many_mode if fig.value(many) is not None else "",
                fmt_number(fig.value(bulk)),
            ]
            for name, fig in results.items()
        ]
        best_values = self.best_values(results)
        if self.best is not None and best_values:
            best_of = self.best

            def cell(metric: str) -> str:
                if metric not in best_values:
                    return "n/a"
                value, source = best_values[metric]
                return f"{fmt_number(value)} ({best_of.short(source)})"

            mode = best_of.mode if many in best_values else ""
            rows.append([best_of.name, cell(seq), cell(many), mode, cell(bulk)])
        return rows

    def ratio_rows(self, results: Mapping[str, _F], ratios: Sequence[Ratio]) -> list[list[str]]:
        """The table of ratios: each one whose two sides were measured (or tried)."""
        labels = {"a": "(a) sequential", "b": self.many_label, "c": "(c) 1 MiB echo"}
        rows = []
        for r in ratios:
            den = r.den
            den_known = den in results
            if self.best is not None and r.den == self.best.name:
                den_known = r.den_source is not None
                if r.den_source is not None:
                    den = f"{r.den} ({self.best.short(r.den_source)})"
            if r.value is None and (r.num not in results or not den_known):
                continue
            target = f">= {r.target:g}x" if r.target is not None else "info"
            # Three decimals where two would round a miss up to the target (0.799 -> "0.80x ... NO").
            near = r.value is not None and r.target is not None and round(r.value, 2) >= r.target > r.value
            value = fmt_number(r.value, 3 if near else 2) + "x"
            rows.append([labels[r.part], f"{r.num} / {den}", value, target, fmt_met(r.met)])
        return rows

    def report(
        self,
        results: Mapping[str, _F],
        ratios: Sequence[Ratio],
        s: EchoSettings,
        pin: int | None,
        elapsed: float,
    ) -> None:
        server = self.server
        print()
        print(self.title)
        print(
            f"mode: {mode_line(pin, f'the benchmark and every {server}', f'client and {server} processes')}"
        )
        print(
            f"each figure: best of {s.repeat} run(s) of {s.duration:g} s, {s.warmup:g} s warm-up first; "
            f"whole run {elapsed:.0f} s"
        )
        print(format_versions(versions(*ECHO_VERSIONS)))
        print()
        rows = self.figure_rows(results)
        print(format_table(ECHO_HEADERS, rows, "lrrlr"))
        print()
        width = max(map(len, self.impls)) + 1
        for name in results:
            print(f"  {name:<{width}} {self.impls[name].description}")
        if self.best is not None and self.best_values(results):
            print(f"  {self.best.name:<{width}} {self.best.description}")
        errors = [(n, f.error) for n, f in results.items() if f.error]
        if errors:
            print()
            for name, err in errors:
                print(f"note: {name}: {err}")
        print()
        rrows = self.ratio_rows(results, ratios)
        if rrows:
            print(format_table(["measure", "ratio", "value", "target", "met"], rrows, "llrll"))
            print()

    def json(
        self,
        results: Mapping[str, _F],
        ratios: Sequence[Ratio],
        s: EchoSettings,
        pin: int | None,
        warm: str | None,
        elapsed: float,
    ) -> dict[str, Any]:
        """The last line of stdout."""
        out: dict[str, Any] = {
            "benchmark": self.name,
            "mode": "pinned" if pin is not None else "unpinned",
            "pin_cpu": pin,
            "duration_s": s.duration,
            "warmup_s": s.warmup,
            "repeat": s.repeat,
            "measures": sorted(s.measures),
        }
        if self.process_warmup:
            out["process_warmup"] = warm
        out["units"] = {**self.units, "bulk_mb_per_s": BULK_UNIT}
        out["versions"] = versions(*ECHO_VERSIONS)
        out["elapsed_s"] = round(elapsed, 1)
        out["results"] = {name: fig.as_dict() for name, fig in results.items()}
        if self.best is not None:
            best_values = self.best_values(results).items()
            out[self.best.json_key] = {m: {"value": v, "server": src} for m, (v, src) in best_values}
        out["ratios"] = {r.key: r.as_dict(sourced=self.best is not None) for r in ratios}
        return out
