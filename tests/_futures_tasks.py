"""Task functions for ``test_futures_faults.py``, imported by reference on the workers.

Side channels: tasks that must be observed from the test write marker files
into a directory passed as an argument (``started-*``, ``cancelled-*``,
``ran-*``, ``died-*``), named so that the test can count executions, tell
which process ran them, and order them. Everything here is small and fast
unless a test asks for a long task.

Run as a script, it is a process for the tests that kill one (the secret
comes on stdin):

* ``python tests/_futures_tasks.py client HOST:PORT DIR N``: a client of a
  broker, mapping N long async tasks;
* ``python tests/_futures_tasks.py ctrlc DIR``: a local pool of two workers
  running long tasks; it prints the worker PIDs (JSON) on one line first.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _mark(directory: str, prefix: str, name: object) -> None:
    """Create ``DIR/PREFIX-NAME-PID-NS`` atomically (the name encodes who and when)."""
    path = Path(directory) / f"{prefix}-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp = path.with_name("." + path.name)
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)


def markers(directory: str | os.PathLike[str], prefix: str, name: object = None) -> list[Path]:
    """Marker files of ``prefix`` (and ``name``), oldest first."""
    head = f"{prefix}-" if name is None else f"{prefix}-{name}-"
    found = [p for p in Path(directory).iterdir() if p.name.startswith(head)]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def marker_pid(path: Path) -> int:
    return int(path.name.rsplit("-", 2)[1])


# -- plain functions (run in worker threads) --------------------------------------------------


def square(x: int) -> int:
    return x * x


def slow_square(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * x


def identity(x: Any) -> Any:
    return x


def spin(seconds: float) -> int:
    """Burn CPU in pure Python (holding the GIL between switch intervals) for ``seconds``."""
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        for _ in range(1000):
            n += 1
    return n


def die(directory: str) -> None:
    """Kill the worker process running this task, every time (a poison task)."""
    _mark(directory, "died", "poison")
    os._exit(1)


def long_first_time(directory: str, name: str, seconds: float, value: Any) -> Any:
    """Block ``seconds`` on the first execution of ``name``; return ``value`` at once after that."""
    first = not markers(directory, "started", name)
    _mark(directory, "started", name)
    if first:
        time.sleep(seconds)
    _mark(directory, "ran", name)
    return value


def block_until_released(directory: str, name: str, value: Any, limit: float = 30.0) -> Any:
    """Write ``started``, wait for the file ``DIR/release-NAME`` to appear, write ``ran``."""
    _mark(directory, "started", name)
    release = Path(directory) / f"release-{name}"
    deadline = time.monotonic() + limit
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    _mark(directory, "ran", name)
    return value


def blocking_sleep(directory: str, name: object, seconds: float) -> float:
    _mark(directory, "started", name)
    time.sleep(seconds)
    return seconds


class CustomError(Exception):
    """Not registered with asyncdist.errors.register_error: arrives as RemoteError."""


def fail(directory: str, name: str, kind: str) -> None:
    _mark(directory, "ran", name)
    if kind == "value":
        raise ValueError(f"bad value in {name}")
    raise CustomError(f"custom failure in {name}")


def return_lock(x: int) -> Any:
    if x == 0:
        return threading.Lock()
    return x


# -- async functions (run on the worker's event loop) -------------------------------------------


async def async_wait(directory: str, name: object, seconds: float = 30.0) -> str:
    """Write ``started``, sleep; write ``cancelled`` if cancelled (then re-raise)."""
    _mark(directory, "started", name)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(directory, "cancelled", name)
        raise
    return f"slept {name}"


async def async_fail_or_wait(directory: str, i: int, bad: int) -> int:
    """Task ``bad`` raises at once; the others wait (and record a cancellation)."""
    if i == bad:
        _mark(directory, "ran", f"bad{i}")
        raise ValueError(f"task {i} is bad")
    await async_wait(directory, i, 30.0)
    return i


async def async_long_first_time(directory: str, name: str, seconds: float, value: Any) -> Any:
    """The async twin of :func:`long_first_time`."""
    first = not markers(directory, "started", name)
    _mark(directory, "started", name)
    if first:
        await asyncio.sleep(seconds)
    _mark(directory, "ran", name)
    return value


# -- processes for the tests ----------------------------------------------------------------------


async def _client_main(address: str, directory: str, n: int) -> None:
    import asyncdist

    secret = sys.stdin.readline().strip()
    async with asyncdist.Pool(broker=address, secret=secret) as pool:
        await pool.map(tasks.async_wait, [directory] * n, [f"victim{i}" for i in range(n)])


async def _ctrlc_main(directory: str) -> None:
    import json

    import asyncdist

    async with asyncdist.Pool(workers=2, close_timeout=1.0) as pool:
        print(json.dumps([p.pid for p in pool._procs.procs]), flush=True)
        await asyncio.gather(
            pool.submit(tasks.blocking_sleep, directory, "thread", 30.0),
            pool.submit(tasks.async_wait, directory, "async", 30.0),
        )


if __name__ == "__main__":
    # Functions must come from the importable module, not from __main__, to travel by reference.
    import _futures_tasks as tasks

    import asyncdist

    if sys.argv[1:2] == ["client"]:
        asyncdist.run(_client_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    elif sys.argv[1:2] == ["ctrlc"]:
        asyncdist.run(_ctrlc_main(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} client HOST:PORT DIR N | ctrlc DIR")


# -- API-behaviour tasks (tests/test_futures.py, tests/test_futures_cli.py) -----------------
# Imported by reference by the workers (tests/ is on their PYTHONPATH). Appended to the
# shared file: leave the functions above alone.


def api_add3(a: int, b: int, c: int) -> int:
    return a + b + c


def api_identity(x: object) -> object:
    return x


def api_noop(x: object) -> None:
    return None


def api_pid(_: object = None) -> int:
    import os

    return os.getpid()


def api_pid_after(seconds: float) -> int:
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def api_kwargs(a: int, b: int = 0, *, scale: int = 1, tag: str = "") -> dict[str, object]:
    return {"sum": (a + b) * scale, "tag": tag}


def api_fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def api_plain_sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


async def api_async_sleep(seconds: float, value: object = None) -> object:
    import asyncio

    await asyncio.sleep(seconds)
    return seconds if value is None else value


async def api_async_fail_after(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
    raise KeyError("async failure")


async def api_sleep_and_mark_cancel(seconds: float, marker: str) -> None:
    """Sleep; if cancelled (remotely), create the file ``marker`` first."""
    import asyncio
    import pathlib

    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        pathlib.Path(marker).touch()
        raise


def api_as_list_after(i: int) -> list[int]:
    import time

    time.sleep(((i * 7) % 5) * 0.002)
    return [i]


async def api_as_str_after(i: int) -> str:
    import asyncio

    await asyncio.sleep(((i * 7) % 11) * 0.005)
    return f"<{i}>"


def api_thread_name(_: object = None) -> str:
    import threading

    return threading.current_thread().name


async def api_async_thread_name(_: object = None) -> tuple[str, bool]:
    import asyncio
    import threading

    return threading.current_thread().name, asyncio.get_running_loop().is_running()


def api_get_const(name: str) -> tuple[int, object]:
    import os

    import asyncdist

    return os.getpid(), asyncdist.shared.get_const(name)


def api_get_const_default(name: str) -> object:
    import asyncdist

    return asyncdist.shared.get_const(name, "missing")


async def api_recurse(level: int) -> int:
    """SCOOP's recursion example: each level maps two children."""
    import asyncdist

    if level == 0:
        return 1
    return sum(await asyncdist.map(api_recurse, [level - 1] * 2))


async def api_nested_submit(x: int) -> int:
    """A task that submits tasks of its own and awaits their futures."""
    import asyncdist

    futures = [asyncdist.submit(api_kwargs, x, b=i, scale=2) for i in range(3)]
    total = 0
    for fut in futures:
        total += (await fut)["sum"]
    return total
