"""Helpers shared by the tests: processes and waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from asyncdist import Connection, Proxy
from asyncdist.testing import poll_for

_T = TypeVar("_T")

#: Multiply every test delay and bound by this (slow machines: 2 or more).
SCALE = float(os.environ.get("ASYNCDIST_TEST_TIME_SCALE", "1"))


def cpu_count() -> int:
    """CPUs this process may run on (what asyncdist uses as its default worker count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def eventually(predicate: Callable[[], Any], message: str, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` (maybe async) holds; fail with ``message`` after ``timeout`` s (scaled)."""
    try:
        await poll_for(predicate, timeout * SCALE, interval=0.02)
    except TimeoutError:
        raise AssertionError(f"{message} (waited {timeout * SCALE:g} s)") from None


async def stop(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """Terminate ``proc`` if it still runs and reap it (SIGKILL after ``timeout`` s, scaled)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        async with asyncio.timeout(timeout * SCALE):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def worker_env() -> dict[str, str]:
    """The environment of a worker started by hand: no ``ASYNCDIST_*`` variable of the test
    run's (secrets, log level) but the time scale; ``tests/`` and this sys.path importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    if "ASYNCDIST_TEST_TIME_SCALE" in os.environ:
        env["ASYNCDIST_TEST_TIME_SCALE"] = os.environ["ASYNCDIST_TEST_TIME_SCALE"]
    paths = [str(Path(__file__).resolve().parent), *(p for p in sys.path if p and os.path.isdir(p))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@contextlib.asynccontextmanager
async def hand_worker(
    address: str,
    *options: str,
    stdout: IO[bytes],
    stderr: IO[bytes] | None = None,
    global_options: tuple[str, ...] = (),
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m asyncdist [global_options] worker --broker ADDRESS [options]``, started by
    hand; stopped (SIGTERM) and reaped on exit. ``stderr`` None: with ``stdout``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncdist",
        *global_options,
        "worker",
        "--broker",
        address,
        *options,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stdout if stderr is None else stderr,
        env=worker_env(),
    )
    try:
        yield proc
    finally:
        await stop(proc)


async def read_until(
    proc: asyncio.subprocess.Process,
    found: Callable[[str], _T | None],
    what: str,
    lines: list[str],
    timeout: float,
) -> _T:
    """Read ``proc``'s stdout line by line (each kept in ``lines``, without its newline) until
    ``found(line)`` is not None, and return that; fail naming ``what``, with the lines read and
    its stderr, if the process ends first (or after ``timeout`` s)."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                err = (await proc.stderr.read()).decode() if proc.stderr is not None else ""
                raise AssertionError(f"the process ended before {what}: {lines} {err}")
            lines.append(raw.decode().rstrip("\n"))
            result = found(lines[-1])
            if result is not None:
                return result


def conn_of(proxy: Proxy) -> Connection | None:
    """A proxy's connection (a function, so that type checkers do not narrow it)."""
    return proxy._conn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def finish(aw: Awaitable[_T], timeout: float, what: str) -> _T:
    """Await ``aw`` for at most ``timeout`` s (already scaled by the caller); fail naming ``what``."""
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        raise AssertionError(f"{what} did not finish within {timeout:g} s") from None


def start(aw: Awaitable[_T]) -> asyncio.Task[_T]:
    """Run an awaitable (e.g. a remote call) as a task."""

    async def run() -> _T:
        return await aw

    return asyncio.create_task(run())


def read_proc(pid: int, name: str) -> bytes:
    """``/proc/PID/NAME`` (``cmdline``, ``environ``), b"" if the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def all_pids() -> list[int]:
    """Every process id in /proc."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment holds ``NAME=VALUE`` (how tests mark what they start)."""
    needle = f"{name}={value}".encode()
    return [p for p in all_pids() if needle in read_proc(p, "environ").split(b"\0") and alive(p)]
