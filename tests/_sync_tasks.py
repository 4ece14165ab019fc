"""Task functions for ``tests/test_sync.py``, imported by reference on the workers.

Plain functions, as the blocking facade's users write them: some call
``asyncdist.sync`` themselves (nested maps on a worker). Tasks that the test
must observe write files into a directory given as an argument.

Run as a script, it is a process for the tests (it prints the PIDs of its
pool's workers as one JSON line first):

* ``python tests/_sync_tasks.py exit``: a local pool, a map, then the end
  of the script without closing anything (the interpreter's exit reaps);
* ``python tests/_sync_tasks.py ctrlc DIR``: a long ``sync.map`` that waits
  for Ctrl-C (its tasks write ``DIR/started-*``, and ``DIR/cancelled-*`` when
  cancelled);
* ``python tests/_sync_tasks.py shutdown``: a local pool, then ``sync.shutdown()``;
  it prints whether the pool is closed and which workers are left (then
  kills those);
* ``python tests/_sync_tasks.py progress [map|as_completed|job]``: a map
  (or a MapReduce job) with ``progress=True`` (``show=True``), for a run
  under a pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from asyncdist import sync


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def pid(_: object = None) -> int:
    return os.getpid()


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def key_error(name: str) -> None:
    raise KeyError(name)


def wait_for_file(path: str, value: Any, limit: float = 30.0) -> Any:
    """Block (in the task's thread) until ``path`` exists; return ``value``."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


async def async_wait_for_file(path: str, value: Any, limit: float = 30.0) -> Any:
    """Wait on the worker's loop (holding no slot) until ``path`` exists; return ``value``."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return value


def mark_and_wait(directory: str, name: str, release: str) -> str:
    """Write ``started-NAME``, block until ``release`` exists, return ``name``."""
    Path(directory, f"started-{name}").touch()
    wait_for_file(release, None)
    return name


def timeout_error(message: str) -> None:
    raise TimeoutError(message)


async def touch_later(directory: str, name: str, seconds: float) -> str:
    """Write ``started-NAME``, sleep, then write ``late-NAME``; ``cancelled-NAME`` if cancelled."""
    Path(directory, f"started-{name}").touch()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        Path(directory, f"cancelled-{name}").touch()
        raise
    Path(directory, f"late-{name}").touch()
    return name


# -- plain tasks that call the blocking facade (nested, on the worker) --------------------------

#: How long a nested leaf task takes: long enough that the worker never runs it inline on its
#: event loop (it measures tiny functions and stops giving them a thread), so it needs a slot.
LEAF = 0.005


def nested_map(n: int) -> list[int]:
    """A plain task mapping ``square`` over ``range(n)`` with ``sync.map``."""
    return sync.map(slow_square, range(n), [LEAF] * n)


def nested_tree(level: int) -> int:
    """A plain task with two children per level: 2**level leaves, each counted once."""
    if level == 0:
        time.sleep(LEAF)
        return 1
    return sum(sync.map(nested_tree, [level - 1] * 2))


def nested_submit(x: int) -> int:
    """``sync.submit(...).result()`` inside a task."""
    return sync.submit(slow_square, x, LEAF).result() + 1


def nested_submit_tree(level: int) -> int:
    """Submit the children, then ``sync.wait`` for all of them (a tree of ``level`` levels)."""
    if level == 0:
        time.sleep(LEAF)
        return 1
    futures = [sync.submit(nested_submit_tree, level - 1) for _ in range(2)]
    done, not_done = sync.wait(futures)
    assert not not_done
    return sum(f.result() for f in done)


def nested_as_completed(n: int) -> list[int]:
    futures = [sync.submit(slow_square, i, LEAF) for i in range(n)]
    return sorted(f.result() for f in sync.as_completed(futures))


def nested_map_reduce(n: int) -> int:
    return sync.map_reduce(slow_square, add, range(n), [LEAF] * n)


def nested_without_release(x: int, seconds: float) -> str:
    """The negative control: the same nested wait, but one that does *not* give the slot back.

    The async API on a private event loop in the task's thread waits for the
    nested task without telling the worker (only the blocking facade does),
    so on a one-slot worker the nested task cannot start: "stuck" after
    ``seconds``. With a free slot it runs: "ran: X*X".
    """
    import asyncdist

    async def nested() -> str:
        fut = asyncdist.submit(slow_square, x, LEAF)
        try:
            return f"ran: {await asyncio.wait_for(fut, seconds)}"
        except TimeoutError:
            return "stuck"

    return asyncio.run(nested())


def sync_noop(_: object = None) -> int:
    """A plain task making one blocking call that waits for nothing remote (its slot is lent)."""
    return sync.call(int)


async def async_calls_sync(x: int) -> list[int]:
    """An async task calling the blocking facade: refused (it would stall the worker's loop)."""
    return sync.map(square, [x])


def thread_name(_: object = None) -> str:
    import threading

    return threading.current_thread().name


# -- MapReduce (Disco) ------------------------------------------------------------------------


def fmap(line: str, params: Any) -> Any:
    for word in line.split():
        yield word.strip(".,").lower(), 1


def freduce(pairs: Any, params: Any) -> Any:
    for word, counts in sync.kvgroup(sorted(pairs)):
        yield word, sum(counts)


# -- processes for the tests -------------------------------------------------------------------


def _exit_main() -> None:
    pool = sync.Pool(workers=2)
    print(json.dumps([w["pid"] for w in pool.status()["workers"]]), flush=True)
    print(pool.map(tasks.square, range(5)), flush=True)
    # No close: the interpreter's exit (atexit: sync.shutdown) stops the pool and its workers.


def _ctrlc_main(directory: str) -> None:
    pool = sync.Pool(workers=2, close_timeout=1.0)
    print(json.dumps([w["pid"] for w in pool.status()["workers"]]), flush=True)
    # Async tasks that sleep 30 s (each writes DIR/started-tI, and DIR/cancelled-tI if cancelled):
    # only Ctrl-C ends this map.
    pool.map(tasks.touch_later, [directory] * 4, [f"t{i}" for i in range(4)], [30.0] * 4)


def _shutdown_main() -> None:
    """A pool made with ``sync.Pool``, then ``sync.shutdown()``: is the pool closed, its workers gone?"""
    from _util import alive

    pool = sync.Pool(workers=2)
    pids = [w["pid"] for w in pool.status()["workers"]]
    sync.shutdown()
    left = [p for p in pids if alive(p)]
    print(json.dumps({"closed": pool.closed, "left": left}), flush=True)
    for p in left:  # this script's own children
        os.kill(p, 9)
        os.waitpid(p, 0)


@sync.expose
class _Hello:
    def hi(self) -> str:
        return "hi"


def _servers_exit_main() -> None:
    """Pyro's callback pattern and an RPyC client, then a plain exit: nothing may be printed to
    stderr (the daemon's request loop in a daemon thread, the connection's callback threads)."""
    import threading

    from asyncdist import rpc

    daemon = sync.Daemon()
    uri = daemon.register(_Hello())
    threading.Thread(target=daemon.request_loop, daemon=True).start()
    with sync.Proxy(uri) as hello:
        print(hello.hi(), flush=True)
    server = sync.run(rpc.classic.serve(allow_classic=True, port=0))  # an awaitable, not a coroutine
    conn = sync.classic_connect("127.0.0.1", server.port)
    conn.modules.sys.stdout = sys.stdout  # the server's prints come here, through a callback thread
    conn.execute("print('remote hi')")
    # No close, no shutdown: the interpreter's exit does it.


def _progress_main(kind: str) -> None:
    if kind == "job":
        job = sync.Job(name="progress").run(
            input=[["a b a", "b c", "c a"] * 3], map=tasks.fmap, reduce=tasks.freduce
        )
        print(sorted(sync.result_iterator(job.wait(show=True))), flush=True)
        job.close()
        return
    with sync.Pool(workers=2) as pool:
        if kind == "map":
            results = pool.map(tasks.slow_square, range(12), [0.05] * 12, progress=True)
        else:
            results = sorted(pool.map_as_completed(tasks.slow_square, range(12), [0.05] * 12, progress=True))
        print(results, flush=True)


if __name__ == "__main__":
    # Functions must come from the importable module, not from __main__, to travel by reference.
    import _sync_tasks as tasks

    command = sys.argv[1:2]
    if command == ["exit"]:
        _exit_main()
    elif command == ["ctrlc"]:
        _ctrlc_main(sys.argv[2])
    elif command == ["shutdown"]:
        _shutdown_main()
    elif command == ["progress"]:
        _progress_main(sys.argv[2])
    elif command == ["servers"]:
        _servers_exit_main()
    else:
        usage = "exit | ctrlc DIR | shutdown | progress map|as_completed|job | servers"
        sys.exit(f"usage: {sys.argv[0]} {usage}")


def nested_slow_map(n: int, seconds: float) -> list[int]:
    """A plain task mapping ``slow_square`` (``seconds`` each) over ``range(n)`` with ``sync.map``."""
    return sync.map(slow_square, range(n), [seconds] * n)


def times_factor(x: int) -> int:
    """SCOOP's shared constants read in a task: ``x`` times the constant ``factor``."""
    from asyncdist import sync

    return sync.shared.getConst("factor") * x


def const_or(name: str, default: Any) -> Any:
    """A shared constant read in a task, ``default`` when it is not set."""
    from asyncdist import sync

    return sync.shared.get_const(name, default)
