"""The blocking facade :mod:`asyncdist.sync`: every paradigm as plain calls, from any thread.

Plain (non-async) tests, as the facade's users write plain code; a few
``async def`` tests call it while an event loop runs in the calling thread
(the Jupyter case). Covered: pools (map and friends, futures, cancellation,
errors, timeouts, status, closing and reaping), calls from many threads,
nested blocking calls inside worker tasks (with a negative control showing
the same nesting deadlocks without the slot given back), a plain script's
exit and Ctrl-C (subprocesses), remote objects with a name server, RPC and
classic RPC, MapReduce jobs, CSP processes as plain functions, the loop
thread's life, and progress bars (captured, forced, and under a
pseudo-terminal).

Every test ends with ``sync.shutdown()`` (the loop thread is per process and
would otherwise outlive the test and trip the leak check).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import json
import operator
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _sync_tasks as tasks
import pytest
from _util import SCALE, alive, cpu_count

from asyncdist import rpc, sync
from asyncdist.errors import CommunicationError, UnknownObjectError
from asyncdist.naming import NameServerDaemon

#: Upper bound for anything a test waits for (a safety net: the tests wait for conditions).
BOUND = 30 * SCALE
TASKS_SCRIPT = Path(__file__).with_name("_sync_tasks.py")


@pytest.fixture(autouse=True)
def _stop_the_sync_loop(leak_check: None) -> Iterator[None]:
    """After each test (before the leak check): stop the loop thread and what it holds."""
    yield
    sync.shutdown()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = BOUND) -> None:
    """Poll ``predicate`` (every 10 ms) until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.01)


def my_children() -> set[int]:
    kids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            kids.update(int(p) for p in f.read().split())
    return kids


def worker_pids(pool: sync.Pool) -> list[int]:
    return [w["pid"] for w in pool.status()["workers"]]


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "asyncdist-sync" and t.is_alive()]


def files(directory: Path, prefix: str) -> set[str]:
    return {p.name.partition("-")[2] for p in directory.iterdir() if p.name.startswith(prefix + "-")}


# -- pools (SCOOP) ---------------------------------------------------------------------------------


def test_pool_map_family_submit_status_and_with_block() -> None:
    with sync.Pool(workers=2) as pool:
        pids = worker_pids(pool)
        assert len(pids) == 2
        assert set(pids) <= my_children()
        assert pool.map(tasks.square, range(10)) == [x * x for x in range(10)]
        assert pool.map(tasks.add, [1, 2, 3], [10, 20, 30]) == [11, 22, 33]  # several iterables
        assert pool.map_reduce(tasks.square, operator.add, range(10)) == 285
        assert pool.mapReduce(tasks.square, operator.add, range(4)) == 14  # SCOOP's name
        assert sync.Pool.mapReduce is sync.Pool.map_reduce
        assert pool.map_scan(tasks.square, operator.add, range(5)) == [0, 1, 5, 14, 30]
        assert sorted(pool.map_as_completed(tasks.square, range(6))) == [0, 1, 4, 9, 16, 25]
        fut = pool.submit(tasks.add, 2, b=40)
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(BOUND) == 42
        assert {pool.submit(tasks.pid).result(BOUND) for _ in range(4)} <= set(pids)
        status = pool.status()
        assert status["stats"]["completed"] >= 10 + 3 + 10 + 4 + 5 + 6 + 1 + 4
        assert status["queued"] == 0
        assert status["running"] == 0
        assert pool.address is not None
        assert pool.secret  # a local pool makes a secret for its workers
        assert not pool.closed
    assert pool.closed
    # Leaving the block stopped the workers and reaped them (no zombie, not our children).
    assert not [p for p in pids if alive(p)]
    assert not set(pids) & my_children()
    pool.close()  # idempotent
    pool.shutdown()


def test_close_reaps_the_workers() -> None:
    pool = sync.Pool(workers=3)
    pids = worker_pids(pool)
    assert len(set(pids)) == 3
    assert all(alive(p) for p in pids)
    assert pool.map(tasks.square, [3]) == [9]
    pool.close()
    assert pool.closed
    assert not [p for p in pids if alive(p)]
    assert not set(pids) & my_children()


def test_map_as_completed_closed_early_cancels_the_rest(tmp_path: Path) -> None:
    names = [f"n{i}" for i in range(6)]
    seconds = [0.0] + [30.0] * 5  # n0 finishes at once; the others would sleep for 30 s
    with sync.Pool(workers=2) as pool:
        results = pool.map_as_completed(tasks.touch_later, [str(tmp_path)] * 6, names, seconds)
        assert next(results) == "n0"
        # async tasks hold no slot: all six start
        wait_until(lambda: files(tmp_path, "started") == set(names), "every task started")
        results.close()  # the rest is cancelled, remotely
        wait_until(lambda: files(tmp_path, "cancelled") == set(names[1:]), "the other tasks cancelled")
        assert files(tmp_path, "late") == {"n0"}
        status = pool.status()
        assert (status["running"], status["queued"]) == (0, 0)


def test_submit_cancel_stops_the_remote_task(tmp_path: Path) -> None:
    with sync.Pool(workers=1) as pool:
        victim = pool.submit(tasks.touch_later, str(tmp_path), "victim", 1.0)
        wait_until(lambda: "victim" in files(tmp_path, "started"), "the task started")
        victim.cancel()
        # The remote task saw the cancellation (CancelledError in its sleep)...
        wait_until(lambda: "victim" in files(tmp_path, "cancelled"), "the remote task cancelled")
        # ...so its late file never comes: a twin submitted now, with the same delay, writes its
        # own, by which time the victim's would have been there long ago.
        twin = pool.submit(tasks.touch_later, str(tmp_path), "twin", 1.0)
        assert twin.result(BOUND) == "twin"
        assert files(tmp_path, "late") == {"twin"}


def test_a_cancelled_running_future_is_done(tmp_path: Path) -> None:
    with sync.Pool(workers=1) as pool:
        fut = pool.submit(tasks.touch_later, str(tmp_path), "victim", 30.0)
        wait_until(lambda: "victim" in files(tmp_path, "started"), "the task started")
        fut.cancel()
        wait_until(lambda: "victim" in files(tmp_path, "cancelled"), "the remote task cancelled")
        done, _ = sync.wait([fut], timeout=5 * SCALE)
        assert fut in done
        assert fut.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(0)


def test_wait_and_as_completed(tmp_path: Path) -> None:
    release = tmp_path / "release"
    with sync.Pool(workers=2) as pool:
        futures = [pool.submit(tasks.slow_square, i, 0.01 * (i % 3)) for i in range(8)]
        done, not_done = sync.wait(futures, timeout=BOUND)
        assert (len(done), not_done) == (8, set())
        assert sorted(f.result() for f in done) == [i * i for i in range(8)]

        blocked = pool.submit(tasks.async_wait_for_file, str(release), "blocked")  # holds no slot
        quick = pool.submit(tasks.square, 7)
        done, not_done = sync.wait([blocked, quick], timeout=BOUND, return_when=sync.FIRST_COMPLETED)
        assert (done, not_done) == ({quick}, {blocked})
        release.touch()
        futures = [pool.submit(tasks.square, i) for i in range(5)]
        completed = list(sync.as_completed([*futures, blocked], timeout=BOUND))
        assert set(completed) == {*futures, blocked}
        assert sorted(f.result() for f in futures) == [0, 1, 4, 9, 16]
        assert blocked.result(BOUND) == "blocked"


def test_errors_keep_their_type() -> None:
    with sync.Pool(workers=2) as pool:
        with pytest.raises(ValueError, match="bad value 3"):
            pool.map(tasks.fail_on, range(6), [3] * 6)
        with pytest.raises(ValueError, match="bad value 2"):
            pool.map_reduce(tasks.fail_on, operator.add, range(4), [2] * 4)
        fut = pool.submit(tasks.key_error, "missing")
        assert isinstance(fut.exception(BOUND), KeyError)
        with pytest.raises(KeyError, match="missing"):
            fut.result()
        with pytest.raises(ValueError, match="bad value 1"):
            list(pool.map_as_completed(tasks.fail_on, [1], [1]))
        assert pool.map(tasks.square, [5]) == [25]  # the pool goes on


def test_timeout_raises_timeout_error_and_cancels(tmp_path: Path) -> None:
    with sync.Pool(workers=1) as pool:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            pool.map(tasks.touch_later, [str(tmp_path)], ["slow"], [30.0], timeout=0.5 * SCALE)
        assert time.monotonic() - started < BOUND
        wait_until(lambda: "slow" in files(tmp_path, "cancelled"), "the remote task cancelled")
    with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
        sync.run(asyncio.sleep(30), timeout=0.2)


def test_a_tasks_own_timeout_error_keeps_its_message() -> None:
    with sync.Pool(workers=1) as pool, pytest.raises(TimeoutError, match="the database is slow"):
        pool.map(tasks.timeout_error, ["the database is slow"])


def test_module_level_functions_use_the_default_pool() -> None:
    assert sync.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]
    assert sync.submit(tasks.add, 1, 2).result(BOUND) == 3
    assert sync.map_reduce(tasks.square, operator.add, range(4)) == 14
    assert sync.mapReduce is sync.map_reduce
    assert sync.map_scan(tasks.square, operator.add, range(4)) == [0, 1, 5, 14]
    assert sorted(sync.map_as_completed(tasks.square, range(4))) == [0, 1, 4, 9]
    default = sync.Pool._default()
    pids = set(worker_pids(default))
    assert len(pids) == cpu_count()  # a local pool, one worker per CPU
    assert set(sync.map(tasks.pid, range(2 * len(pids)))) <= pids
    sync.shutdown()  # closes the default pool, reaps its workers
    assert default.closed
    assert not [p for p in pids if alive(p)]


def test_default_pool_from_threads() -> None:
    barrier = threading.Barrier(8)
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        barrier.wait()
        results[i] = (sync.map(tasks.square, range(i, i + 5)), set(sync.map(tasks.pid, range(4))))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert len(results) == 8
    pids = set(worker_pids(sync.Pool._default()))  # one default pool for all the threads
    assert len(pids) == cpu_count()
    for i, (squares, used) in results.items():
        assert squares == [x * x for x in range(i, i + 5)]
        assert used <= pids


def test_sixteen_threads_share_one_pool() -> None:
    barrier = threading.Barrier(16)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = pool.map(tasks.add, range(20), [i] * 20)
        except BaseException as exc:
            errors.append(exc)

    with sync.Pool(workers=2) as pool:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND)
    assert errors == []
    assert results == {i: [x + i for x in range(20)] for i in range(16)}


# -- blocking calls inside worker tasks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "arg", "expected"),
    [
        (tasks.nested_map, 5, [0, 1, 4, 9, 16]),  # sync.map inside a task
        (tasks.nested_tree, 2, 4),  # 2 levels of nested sync.map
        (tasks.nested_tree, 3, 8),  # 3 levels
        (tasks.nested_submit, 4, 17),  # sync.submit(...).result()
        (tasks.nested_submit_tree, 2, 4),  # sync.submit + sync.wait, 2 levels
        (tasks.nested_submit_tree, 3, 8),  # 3 levels
        (tasks.nested_as_completed, 4, [0, 1, 4, 9]),  # sync.as_completed
        (tasks.nested_map_reduce, 5, 30),  # sync.map_reduce
    ],
    ids=lambda v: getattr(v, "__name__", repr(v)),
)
def test_nested_blocking_calls_on_a_one_slot_cluster(task: Any, arg: int, expected: Any) -> None:
    with sync.Pool(workers=1, slots=1) as pool:
        assert pool.map(task, [arg], timeout=BOUND) == [expected]


# The broker caps a worker's estimated load; a waiting task lends its slot, so a nested task
# whose function the broker measured as long still runs on the one-slot worker (before: the
# worker looked full while a waiting task was on it, and the nested map never ran).


def test_nested_map_of_tasks_the_broker_knows_are_slow() -> None:
    with sync.Pool(workers=1, slots=1, close_timeout=1.0) as pool:
        assert pool.map(tasks.slow_square, [1], [0.05]) == [1]  # the broker learns: ~50 ms each
        assert pool.map(tasks.nested_slow_map, [2], [0.05], timeout=5 * SCALE) == [[0, 1]]


def test_the_same_nested_map_twice() -> None:
    with sync.Pool(workers=1, slots=1, close_timeout=1.0) as pool:
        assert pool.map(tasks.nested_slow_map, [2], [0.05], timeout=BOUND) == [[0, 1]]  # works once
        assert pool.map(tasks.nested_slow_map, [2], [0.05], timeout=5 * SCALE) == [[0, 1]]


def test_negative_control_a_wait_that_keeps_its_slot_deadlocks() -> None:
    """The nesting above needs the slot given back: the same wait without it cannot finish.

    The task waits for a nested task through the async API on a loop of its
    own, which does not lend the task's slot (only the blocking facade does):
    on a one-slot worker the nested task never starts, and the task reports
    "stuck" after its 2 s wait. On a two-slot worker the same task finishes.
    """
    with sync.Pool(workers=1, slots=1) as pool:
        assert pool.submit(tasks.nested_without_release, 3, 2.0).result(BOUND) == "stuck"
    with sync.Pool(workers=1, slots=2) as pool:
        assert pool.submit(tasks.nested_without_release, 3, 2.0 * SCALE).result(BOUND) == "ran: 9"


def test_a_lent_slot_is_taken_back(tmp_path: Path) -> None:
    release = str(tmp_path / "release")
    with sync.Pool(workers=1, slots=1) as pool:
        assert pool.submit(tasks.sync_noop).result(BOUND) == 0
        futures = [pool.submit(tasks.mark_and_wait, str(tmp_path), f"n{i}", release) for i in range(2)]
        try:
            wait_until(lambda: files(tmp_path, "started"), "a task started")
            # One slot: the second task must not start while the first one holds it.
            deadline = time.monotonic() + 1.0 * SCALE
            while time.monotonic() < deadline:
                assert len(files(tmp_path, "started")) == 1, "two tasks run at once on one slot"
                time.sleep(0.01)
        finally:
            Path(release).touch()
            sync.wait(futures, timeout=BOUND)


def test_a_blocking_call_in_an_async_task_is_refused() -> None:
    with sync.Pool(workers=1) as pool:
        with pytest.raises(RuntimeError, match=r"await the async API"):
            pool.map(tasks.async_calls_sync, [2])
        assert pool.map(tasks.square, [2]) == [4]


def test_plain_tasks_run_in_task_threads() -> None:
    with sync.Pool(workers=1) as pool:
        assert pool.map(tasks.thread_name, [0])[0].startswith("asyncdist-task-")


# -- plain scripts (subprocesses) -------------------------------------------------------------------


def run_script(command: str) -> subprocess.CompletedProcess[str]:
    """``python tests/_sync_tasks.py COMMAND`` to its end (at most BOUND s), output captured."""
    argv = [sys.executable, str(TASKS_SCRIPT), command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=BOUND, check=False)


def test_a_script_with_a_daemon_and_a_classic_connection_exits_quietly() -> None:
    done = run_script("servers")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hi", "remote hi"]
    assert done.stderr == ""


def test_run_takes_any_awaitable_and_refuses_what_is_not_one() -> None:
    server = sync.run(rpc.serve(StoreService, port=0))  # an awaitable context, not a coroutine
    try:
        with sync.rpc_connect("127.0.0.1", server.port) as conn:
            assert conn.root.double(2) == 4
    finally:
        sync.run(server.aclose())
    with pytest.raises(TypeError):
        sync.run(42, timeout=BOUND)  # type: ignore[arg-type]


def test_a_script_exits_without_closing_and_leaves_no_worker() -> None:
    started = time.monotonic()
    done = run_script("exit")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 15 * SCALE
    lines = done.stdout.splitlines()
    pids = json.loads(lines[0])
    assert len(pids) == 2
    assert lines[1:] == ["[0, 1, 4, 9, 16]"]
    assert done.stderr == ""
    wait_until(lambda: not [p for p in pids if alive(p)], "the script's workers gone", timeout=10 * SCALE)


def test_ctrl_c_interrupts_a_blocking_map(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(TASKS_SCRIPT), "ctrlc", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2
        # The map's four tasks (async, 30 s each) run: the map is under way.
        names = {f"t{i}" for i in range(4)}
        wait_until(lambda: files(tmp_path, "started") == names, "the tasks started")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=BOUND)
        assert proc.returncode == -signal.SIGINT, err  # died of the re-raised KeyboardInterrupt
        assert err.rstrip().endswith("KeyboardInterrupt"), err
        assert "pool.map(" in err
        # cancelled end to end before the script ended: each remote task saw CancelledError
        assert files(tmp_path, "cancelled") == names
        assert files(tmp_path, "late") == set()
        wait_until(lambda: not [p for p in pids if alive(p)], "the workers gone", timeout=10 * SCALE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_shutdown_closes_pools_made_here() -> None:
    done = run_script("shutdown")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"closed": True, "left": []}


# -- the loop thread ----------------------------------------------------------------------------


def test_shutdown_then_a_new_loop_thread() -> None:
    first = sync.call(threading.current_thread)
    assert first.name == "asyncdist-sync"
    assert first is not threading.current_thread()
    assert sync_threads() == [first]
    sync.shutdown()
    assert not first.is_alive()
    assert sync_threads() == []
    sync.shutdown()  # idempotent
    assert sync.map(tasks.square, [4]) == [16]  # a new loop thread, a new default pool
    second = sync.call(threading.current_thread)
    assert second is not first
    assert sync_threads() == [second]
    sync.shutdown()
    assert sync_threads() == []


def test_a_blocking_call_on_the_loop_thread_is_refused() -> None:
    with pytest.raises(RuntimeError, match="own thread"):
        sync.call(lambda: sync.map(tasks.square, [1]))
    with pytest.raises(RuntimeError, match="own thread"):
        sync.call(sync.call, int)
    assert sync.call(int) == 0  # the loop is fine


def test_shutdown_refused_on_the_loop_thread_keeps_the_loop() -> None:
    first = sync.call(threading.current_thread)
    loop = sync.call(asyncio.get_running_loop)
    try:
        with pytest.raises(RuntimeError, match="own thread"):
            sync.call(sync.shutdown)
        assert sync.call(threading.current_thread) is first
    finally:
        sync.shutdown()
        if first.is_alive():  # orphaned: stop it here, for the leak check
            loop.call_soon_threadsafe(loop.stop)
            first.join(BOUND)


async def test_works_while_a_loop_runs_in_the_calling_thread() -> None:
    """The Jupyter case: blocking calls from a coroutine block its loop but complete."""
    here = asyncio.get_running_loop()
    with sync.Pool(workers=1) as pool:
        assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]
        assert pool.submit(tasks.add, 1, 1).result(BOUND) == 2
    assert sync.map(tasks.square, [6]) == [36]
    daemon = sync.Daemon()
    try:
        proxy = sync.Proxy(daemon.register(Shop()))
        proxy.deposit("x", 3)
        assert proxy.balance("x") == 3
        proxy._release()
    finally:
        daemon.shutdown()
    assert sync.call(asyncio.get_running_loop) is not here
    await asyncio.sleep(0)  # this loop still runs


async def test_shutdown_from_a_coroutine() -> None:
    assert sync.call(int) == 0
    sync.shutdown()
    assert sync_threads() == []


# -- remote objects and the name server (Pyro) ------------------------------------------------------


@sync.expose
class Shop:
    def __init__(self) -> None:
        self.accounts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._label = "shop"
        self.notes: list[str] = []
        self.noted = threading.Event()

    def deposit(self, name: str, amount: int) -> int:  # plain: in the daemon's threads
        with self._lock:
            self.accounts[name] = self.accounts.get(name, 0) + amount
            return self.accounts[name]

    async def balance(self, name: str) -> int:  # async: on the daemon's loop
        return self.accounts[name]  # KeyError for an unknown name

    def check(self, amount: int) -> None:
        if amount < 0:
            raise ValueError(f"negative amount {amount}")

    @property
    def label(self) -> str:
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        self._label = value

    def countdown(self, n: int) -> Iterator[int]:
        yield from range(n, 0, -1)

    async def acount(self, n: int) -> Any:
        for i in range(n):
            yield i * 10

    @sync.oneway
    def note(self, text: str) -> None:
        self.notes.append(text)
        self.noted.set()

    def forward(self, uri: str, name: str) -> int:
        """A plain method calling another object through a blocking proxy (as the chain does)."""
        with sync.Proxy(uri) as other:
            return other.deposit(name, 1)


class Served:
    def __init__(self, daemon: sync.Daemon, shop: Shop, uri: str, ns: sync.Proxy, thread: threading.Thread):
        self.daemon = daemon
        self.shop = shop
        self.uri = uri
        self.ns = ns
        self.thread = thread


@pytest.fixture
def served(sync_name_server: NameServerDaemon) -> Iterator[Served]:
    """A Shop in a sync.Daemon serving in a thread (request_loop), registered as test.shop."""
    daemon = sync.Daemon()
    shop = Shop()
    uri = daemon.register(shop)
    ns = sync.locate_ns()
    ns.register("test.shop", uri)
    thread = threading.Thread(target=daemon.request_loop, name="request-loop")
    thread.start()
    try:
        yield Served(daemon, shop, uri, ns, thread)
    finally:
        ns._release()
        daemon.shutdown()
        thread.join(BOUND)
        assert not thread.is_alive()


def test_proxy_by_name_and_by_uri(served: Served) -> None:
    assert re.fullmatch(r"adist:[0-9a-f]{32}@127\.0\.0\.1:\d+", served.uri)
    assert served.ns.lookup("test.shop") == served.uri
    assert served.ns.list(prefix="test.") == {"test.shop": served.uri}
    for address in (
        "PYRONAME:test.shop",
        "adistname:test.shop",
        served.uri,
        "PYRO:" + served.uri.removeprefix("adist:"),
    ):
        with sync.Proxy(address) as shop:
            assert shop.deposit(address, 5) == 5
            assert shop.balance(address) == 5
    assert len(served.shop.accounts) == 4


def test_proxy_calls_properties_generators_oneway_and_errors(served: Served) -> None:
    with sync.Proxy("PYRONAME:test.shop") as shop:
        assert shop.deposit("Meeta", 50) == 50
        assert shop.deposit("Meeta", 25) == 75
        assert shop.balance("Meeta") == 75
        assert shop.label == "shop"  # a remote property, read
        shop.label = "BuyAnythingOnline"  # and written
        assert shop.label == "BuyAnythingOnline"
        assert served.shop._label == "BuyAnythingOnline"
        countdown = shop.countdown(3)
        assert not isinstance(countdown, list)
        assert list(countdown) == [3, 2, 1]  # a remote generator, as an iterator
        assert list(shop.acount(3)) == [0, 10, 20]  # an async one
        assert shop.note("hello") is None  # one way: returns at once
        assert served.shop.noted.wait(BOUND)
        assert served.shop.notes == ["hello"]
        with pytest.raises(KeyError, match="nobody"):
            shop.balance("nobody")
        with pytest.raises(ValueError, match="negative amount -1"):
            shop.check(-1)
        assert shop._call("balance", "Meeta") == 75
        assert {"deposit", "balance", "label"} <= set(dir(shop))
        # A plain method of the daemon runs in its threads: it may make blocking calls.
        assert shop.forward(served.uri, "via-forward") == 1


def test_request_loop_ends_on_shutdown_from_another_thread(sync_name_server: NameServerDaemon) -> None:
    daemon = sync.Daemon()
    shop, other = Shop(), Shop()
    uri = daemon.register(shop)
    assert daemon.uri_for(shop) == uri
    assert uri.endswith("@" + daemon.location)
    gone = sync.Proxy(daemon.register(other))
    thread = threading.Thread(target=daemon.request_loop)
    thread.start()
    proxy = sync.Proxy(uri)
    assert proxy.deposit("a", 1) == 1
    assert gone.deposit("b", 1) == 1
    daemon.unregister(other)
    with pytest.raises(UnknownObjectError):
        gone.deposit("b", 1)
    gone._release()
    daemon.shutdown()
    thread.join(BOUND)
    assert not thread.is_alive()
    with pytest.raises(CommunicationError):  # the daemon is gone
        proxy.deposit("a", 1)
    proxy._release()


def test_pyro_spellings_and_loop_condition(sync_name_server: NameServerDaemon) -> None:
    assert sync.locateNS is sync.locate_ns
    assert sync.Daemon.requestLoop is sync.Daemon.request_loop
    assert sync.Proxy._pyroRelease is sync.Proxy._release
    stop = threading.Event()
    daemon = sync.Daemon()
    uri = daemon.register(Shop())
    ns = sync.locateNS()
    ns.register("test.alias", uri)
    thread = threading.Thread(target=daemon.requestLoop, kwargs={"loop_condition": lambda: not stop.is_set()})
    thread.start()
    try:
        with sync.Proxy("PYRONAME:test.alias") as shop:
            assert shop.deposit("x", 2) == 2
        stop.set()  # the loop condition turns false: requestLoop returns, the daemon is shut down
        thread.join(BOUND)
        assert not thread.is_alive()
    finally:
        stop.set()
        ns._release()
        daemon.shutdown()


def test_one_proxy_shared_by_eight_threads(served: Served) -> None:
    shop = sync.Proxy("PYRONAME:test.shop")  # not connected yet: the threads race to connect
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(25):
                shop.deposit(f"t{i}", 1)
                shop.deposit("all", 1)
            assert shop.balance(f"t{i}") == 25
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert errors == []
    assert shop.balance("all") == 200
    shop._release()


# -- symmetric RPC (RPyC) ---------------------------------------------------------------------------


class Store:
    def __init__(self) -> None:
        self.items = ["a", "b", "c"]
        self.exposed_size = 3

    def exposed_add(self, item: str) -> int:
        self.items.append(item)
        return len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __str__(self) -> str:
        return f"Store({', '.join(self.items)})"

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)


class StoreService(rpc.Service):
    exposed_version = "1.0"

    def exposed_double(self, x: int) -> int:
        return 2 * x

    def exposed_store(self) -> Store:
        return Store()

    async def exposed_twice(self, f: Any, x: int) -> Any:
        return await f(await f(x))

    async def exposed_bounce(self, f: Any, n: int) -> Any:
        return await f(n)

    def exposed_fail(self, kind: str) -> None:
        if kind == "key":
            raise KeyError("no such key")
        raise ValueError("no good")


async def _serve(opener: Any) -> Any:
    return await opener


@pytest.fixture
def rpc_server() -> Iterator[Any]:
    server = sync.run(_serve(rpc.serve(StoreService, port=0)))
    try:
        yield server
    finally:
        sync.run(server.aclose())


def test_rpc_connect_root_netrefs_and_callbacks(rpc_server: Any) -> None:
    with sync.rpc_connect("127.0.0.1", rpc_server.port) as conn:
        assert conn.root.double(21) == 42
        assert conn.root.version == "1.0"
        store = conn.root.store()  # a netref, used blocking
        assert isinstance(store, sync.RemoteRef)
        assert len(store) == 3
        assert str(store) == "Store(a, b, c)"
        assert list(store) == ["a", "b", "c"]
        assert store.add("d") == 4
        assert len(store) == 4
        assert store.size == 3
        store.size = 9
        assert store.size == 9
        called_on: list[str] = []

        def increment(x: int) -> int:  # a plain local function, called back by the server
            called_on.append(threading.current_thread().name)
            return x + 1

        assert conn.root.twice(increment, 1) == 3
        # Plain callbacks run in the connection's threads, not on the sync loop.
        assert len(called_on) == 2
        assert all(name.startswith("asyncdist-rpc") for name in called_on), called_on
        with pytest.raises(KeyError, match="no such key"):
            conn.root.fail("key")
        with pytest.raises(ValueError, match="no good"):
            conn.root.fail("value")

        def blocking_callback(x: int) -> int:
            return conn.root.double(x)  # a blocking call back to the server, from its callback

        assert conn.root.twice(blocking_callback, 1) == 4
        assert not conn.closed
    assert conn.closed
    conn.close()  # idempotent


def test_callbacks_on_the_loop_thread_are_refused_a_blocking_call(rpc_server: Any) -> None:
    """With ``threads=None`` callbacks run on the sync loop: a blocking call there is refused."""
    with sync.rpc_connect("127.0.0.1", rpc_server.port, threads=None) as conn:
        called_on: list[str] = []

        def blocking_callback(x: int) -> int:
            called_on.append(threading.current_thread().name)
            return sync.call(int)  # on the loop thread: refused, not a deadlock

        with pytest.raises(RuntimeError, match="own thread"):
            conn.root.twice(blocking_callback, 1)
        assert called_on == ["asyncdist-sync"]
        assert not conn.closed


def test_blocking_callbacks_nest_to_depth_40_alternating_sides(rpc_server: Any) -> None:
    """RPyC's nesting: the server calls the client's plain callback, which calls the server..."""
    with sync.rpc_connect("127.0.0.1", rpc_server.port) as conn:
        depth: list[int] = []

        def down(n: int) -> int:
            depth.append(n)
            return 0 if n == 0 else 1 + conn.root.bounce(down, n - 1)

        assert conn.root.bounce(down, 40) == 40
        assert depth == list(range(40, -1, -1))


async def _serve_classic() -> Any:
    return await rpc.classic.serve(allow_classic=True, port=0)


def test_classic_connect_execute_eval_modules_builtins_teleport() -> None:
    server = sync.run(_serve_classic())
    try:
        with sync.classic_connect("127.0.0.1", server.port) as conn:
            conn.execute("x = 41")
            assert conn.eval("x + 1") == 42
            assert conn.modules.os.getcwd() == os.getcwd()
            assert conn.modules["os.path"].join("a", "b") == os.path.join("a", "b")
            assert conn.builtins.len([1, 2, 3]) == 3
            assert conn.modules.sys.getrecursionlimit() == sys.getrecursionlimit()
            square = conn.teleport(lambda v: v * v)
            assert square(7) == 49
            with pytest.raises(NameError, match="prit"):
                conn.execute("prit('hi here')")
        assert conn.closed
    finally:
        sync.run(server.aclose())


def _start_classic_server() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncdist", "rpc-classic", "--allow-classic", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    found = re.search(r"listening on 127\.0\.0\.1:(\d+)", banner)
    if found is None:
        proc.kill()
        proc.communicate()
        pytest.fail(f"no banner from the classic server: {banner!r}")
    return proc, int(found.group(1))


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Terminate ``proc`` (SIGKILL if it lingers), reap it, return the rest of its stdout and stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_classic_stdout_redirect_brings_the_servers_prints_here(capfd: pytest.CaptureFixture[str]) -> None:
    """``conn.modules.sys.stdout = sys.stdout``: the server (another process) prints here."""
    server, port = _start_classic_server()
    try:
        with sync.classic_connect("127.0.0.1", port) as conn:
            conn.execute("print('before the redirect')")
            conn.modules.sys.stdout = sys.stdout
            conn.execute("print('hi here')")
            # (the server's stderr comes along: _SysRef redirects both streams)
            conn.execute("import sys; print('oops', file=sys.stderr)")
            seen_out = seen_err = ""

            def arrived() -> bool:
                nonlocal seen_out, seen_err
                captured = capfd.readouterr()
                seen_out += captured.out
                seen_err += captured.err
                return "hi here\n" in seen_out and "oops\n" in seen_err

            wait_until(arrived, "the redirected prints")
        out, err = _stop(server)
    finally:
        if server.returncode is None:
            _stop(server)
    assert seen_out == "hi here\n"
    assert seen_err == "oops\n"
    assert "before the redirect" in out
    assert "hi here" not in out
    assert "oops" not in err


# -- MapReduce (Disco) ------------------------------------------------------------------------------

TEXT = [
    "There are known knowns.",
    "These are things we know that we know.",
    "There are known unknowns, that is to say,",
    "there are things that we know we do not know.",
]


def test_job_word_count_on_the_embedded_cluster() -> None:
    job = sync.Job(name="wc").run(input=[TEXT], map=tasks.fmap, reduce=tasks.freduce)
    try:
        assert job.name == "wc"
        assert job.id is not None
        counts = dict(sync.result_iterator(job.wait(timeout=BOUND)))
        expected = Counter(w.strip(".,").lower() for line in TEXT for w in line.split())
        assert counts == dict(expected)
        assert counts["know"] == 4
        job.purge()
    finally:
        job.close()


def test_job_error_is_raised() -> None:
    def broken_map(line: str, params: Any) -> Any:
        raise ZeroDivisionError("broken map")
        yield line, 1

    job = sync.Job(name="broken").run(input=[["a"]], map=broken_map, max_attempts=1)
    try:
        with pytest.raises(ZeroDivisionError, match="broken map"):  # its own type
            job.wait(timeout=BOUND)
    finally:
        job.close()


# -- CSP (PyCSP) ------------------------------------------------------------------------------------


@sync.process
def counter(cout: Any, limit: int) -> str:
    for i in range(limit):
        cout(i)
    sync.poison(cout)
    return threading.current_thread().name


@sync.process
def printer(cin: Any, out: list[Any]) -> None:
    while True:
        out.append(cin())


@sync.process
def double(x: int) -> int:
    return 2 * x


@sync.process
def boom() -> None:
    raise ValueError("boom")


def test_counter_and_printer_with_poison() -> None:
    channel = sync.Channel("A")
    printed: list[int] = []
    results = sync.Parallel(counter(channel.writer(), limit=5), printer(channel.reader(), printed))
    assert printed == [0, 1, 2, 3, 4]
    counter_thread, printer_result = results
    assert printer_result is None  # ended by the poison: a normal end
    # plain processes run in threads of their own, not here nor on the loop thread
    assert counter_thread not in (threading.current_thread().name, "asyncdist-sync")


def test_sequence_spawn_and_errors() -> None:
    assert sync.Sequence(double(1), double(2), double(3)) == [2, 4, 6]
    channel = sync.Channel()
    printed: list[int] = []
    fut = sync.Spawn(counter(channel.writer(), limit=3), printer(channel.reader(), printed))
    assert isinstance(fut, concurrent.futures.Future)
    fut.result(BOUND)
    assert printed == [0, 1, 2]
    with pytest.raises(ExceptionGroup) as caught:
        sync.Parallel(boom(), double(3))
    assert [type(e) for e in caught.value.exceptions] == [ValueError]
    assert str(caught.value.exceptions[0]) == "boom"


# -- progress bars ----------------------------------------------------------------------------------

BAR = re.compile(r"(\d+)/(\d+) \[\d\d:\d\d<(\d\d:\d\d|\?), +([\d.]+|\?)task/s\]")


def rates(text: str) -> list[str]:
    """The rates of the bars in ``text`` that have one (a number, not ``?``)."""
    return [m.group(4) for m in BAR.finditer(text) if m.group(4) != "?"]


def test_progress_true_is_quiet_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with sync.Pool(workers=2) as pool:
        assert pool.map(tasks.slow_square, range(6), [0.03] * 6, progress=True) == [x * x for x in range(6)]
        assert sorted(pool.map_as_completed(tasks.square, range(6), progress=True)) == [0, 1, 4, 9, 16, 25]
    job = sync.Job(name="quiet").run(input=[TEXT], map=tasks.fmap, reduce=tasks.freduce)
    try:
        assert dict(sync.result_iterator(job.wait(show=True, timeout=BOUND)))["are"] == 4
    finally:
        job.close()
    assert capsys.readouterr().err == ""


def test_progress_force_shows_a_bar_with_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with sync.Pool(workers=2) as pool:
        assert pool.map(tasks.slow_square, range(12), [0.05] * 12, progress="force") == [
            x * x for x in range(12)
        ]
        err = capsys.readouterr().err
        assert "slow_square:" in err
        assert rates(err), err
        assert sorted(pool.map_as_completed(tasks.slow_square, range(12), [0.05] * 12, progress="force")) == [
            x * x for x in range(12)
        ]
        err = capsys.readouterr().err
        assert "slow_square:" in err
        assert rates(err), err
    job = sync.Job(name="forced").run(input=[TEXT], map=tasks.fmap, reduce=tasks.freduce)
    try:
        job.wait(show="force", timeout=BOUND)
    finally:
        job.close()
    err = capsys.readouterr().err
    assert "forced map:" in err
    assert "forced reduce:" in err
    assert rates(err), err


def run_in_a_terminal(*args: str) -> tuple[int, str]:
    """Run ``python ARGS`` with a pseudo-terminal (100 columns) as its stdin, stdout and stderr."""
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        proc = subprocess.Popen([sys.executable, *args], stdin=slave, stdout=slave, stderr=slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    output = b""
    deadline = time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer is gone
                break
            if not data:
                break
            output += data
        code = proc.wait(BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, output.decode(errors="replace")


@pytest.mark.parametrize("kind", ["map", "as_completed", "job"])
def test_progress_true_shows_a_bar_in_a_terminal(kind: str) -> None:
    code, out = run_in_a_terminal(str(TASKS_SCRIPT), "progress", kind)
    assert code == 0, out
    if kind == "job":
        assert "[('a', 9), ('b', 6), ('c', 6)]" in out
        assert "progress map:" in out
        assert "progress reduce:" in out
    else:
        assert str([x * x for x in range(12)]) in out
        assert "slow_square:" in out
        # a bar on its way, with its rate and the time left (tqdm's "elapsed<left")
        assert re.search(r"\d+/12 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+task/s\]", out), out
    assert rates(out), out
