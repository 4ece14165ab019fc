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

This module only uses the standard library (uvloop is imported on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import IO, Any, TypeVar

__all__ = [
    "Rate",
    "ServerProcess",
    "acount_for",
    "announce_port",
    "arun_for",
    "best",
    "count_for",
    "emit_json",
    "exit_on_sigterm",
    "exit_when_parent_exits",
    "fmt_number",
    "format_table",
    "loop_factory",
    "pin_to_cpu",
    "run_async",
    "run_for",
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
