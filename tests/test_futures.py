"""The distributed futures API (SCOOP re-created) on real worker processes.

In-process pools (a broker on the test's loop plus local worker
processes), pools joined to a :func:`serve_broker`, workers started by
hand, and the per-loop default pool. Task functions that the workers
import by reference live in ``tests/_futures_tasks.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import operator
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import _futures_tasks as T
import _util
import pytest
from _util import SCALE, alive, cpu_count, eventually, worker_env

import asyncdist
from asyncdist import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    ConnectionClosedOK,
    Pool,
    SerializationError,
    TaskFuture,
)
from asyncdist.futures import close_default_pool, current_pool, default_pool, serve_broker
from asyncdist.futures._client import existing_pool
from asyncdist.testing import poll_for

TESTS = Path(__file__).resolve().parent


# -- helpers ------------------------------------------------------------------------------


def status_is(pool: Pool, **expected: Any) -> Callable[[], Awaitable[bool]]:
    """An async predicate: the pool's broker status has these top-level values."""

    async def check() -> bool:
        status = await pool.status()
        return all(status[key] == value for key, value in expected.items())

    return check


@contextlib.asynccontextmanager
async def hand_worker(address: str, log: Path, *options: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker process started by hand (``python -m asyncdist worker``); stopped and reaped on exit."""
    with open(log, "ab") as out:
        async with _util.hand_worker(address, *options, stdout=out) as proc:
            yield proc


def write_secret(path: Path, secret: bytes) -> Path:
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


async def collect_results(futures: AsyncIterator[asyncio.Future[Any]], into: list[Any]) -> None:
    async for fut in futures:
        into.append(fut.result())


async def worker_pids(pool: Pool) -> set[int]:
    return {w["pid"] for w in (await pool.status())["workers"]}


# -- pools: start, status, close ----------------------------------------------------------------


async def test_pool_starts_its_workers_and_reaps_them() -> None:
    assert Pool().workers == cpu_count()
    with pytest.raises(ValueError):
        Pool(workers=2, broker="127.0.0.1:1")
    with pytest.raises(ValueError):
        Pool(workers=-1)
    pool = Pool(workers=3)
    with pytest.raises(RuntimeError):
        pool.submit(T.api_identity, 1)
    async with pool as entered:
        assert entered is pool
        # __aenter__ returns once all of them have joined.
        status = await pool.status()
        assert len(status["workers"]) == 3
        assert status["stats"]["workers_joined"] == 3
        assert status["queued"] == 0
        assert status["running"] == 0
        assert status["clients"] == 1
        pids = {w["pid"] for w in status["workers"]}
        assert len(pids) == 3
        assert all(alive(pid) for pid in pids)
        assert pool.address is not None
        assert pool.address.startswith("127.0.0.1:")
        assert pool.secret  # a local pool always has one
        assert await pool.map(T.api_identity, [1]) == [1]
        pending = pool.submit(T.api_async_sleep, 30)
        await eventually(status_is(pool, running=1), "the task did not start")
    assert pool.closed
    assert pending.cancelled()  # closing the pool cancels what is pending
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(ConnectionClosedOK):
        await pool.map(T.api_identity, [1])
    with pytest.raises(ConnectionClosedOK):
        pool.submit(T.api_identity, 1)


# -- map --------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_map_keeps_order_and_zips_its_iterables() -> None:
    async with Pool(workers=2) as pool:
        n = 3000
        ys = await pool.map(T.api_add3, range(n), range(0, 2 * n, 2), itertools.repeat(5))
        assert ys == [3 * i + 5 for i in range(n)]
        # zip semantics: the shortest iterable wins (also a generator).
        assert await pool.map(T.api_add3, range(1000), [10, 20, 30], (x for x in range(100))) == [
            10,
            22,
            34,
        ]
        assert await pool.map(T.api_identity, []) == []
        assert await pool.map(T.api_identity, range(5), []) == []
        assert await pool.map(T.api_identity) == []
        values = [None, 1.5, "text", b"bytes", [1, [2]], {"k": (1, 2)}, (3, "x")]
        assert await pool.map(T.api_identity, values) == values
        status = await pool.status()
        assert status["stats"]["submitted"] == n + 3 + len(values)
        assert status["stats"]["completed"] == n + 3 + len(values)
        assert status["queued"] == 0
        assert status["running"] == 0
        # The first task error is raised, as its own type, with the remote traceback.
        with pytest.raises(ValueError, match="bad value 7") as info:
            await pool.map(T.api_fail_on, range(50), itertools.repeat(7))
        assert "api_fail_on" in info.value.remote_traceback  # type: ignore[attr-defined]
        # The pool is still usable afterwards.
        assert await pool.map(T.api_identity, range(3)) == [0, 1, 2]


async def test_current_pool_is_used_by_the_module_level_functions() -> None:
    assert current_pool() is None
    async with Pool(workers=1) as outer:
        assert current_pool() is outer
        assert await asyncdist.map(T.api_identity, range(3)) == [0, 1, 2]
        assert await asyncdist.submit(T.api_kwargs, 1, b=2, scale=3, tag="t") == {"sum": 9, "tag": "t"}
        assert await asyncdist.map_reduce(T.api_identity, operator.add, range(10)) == 45
        assert await asyncdist.map_scan(T.api_identity, operator.add, range(4)) == [0, 1, 3, 6]
        got = [x async for x in asyncdist.map_as_completed(T.api_identity, range(5))]
        assert sorted(got) == [0, 1, 2, 3, 4]
        assert (await outer.status())["stats"]["submitted"] == 3 + 1 + 10 + 4 + 5
        async with Pool(workers=1) as inner:
            assert current_pool() is inner
            assert await asyncdist.map(T.api_identity, range(2)) == [0, 1]
            assert (await inner.status())["stats"]["submitted"] == 2
        assert current_pool() is outer
        assert (await outer.status())["stats"]["submitted"] == 3 + 1 + 10 + 4 + 5

        async def pool_in_a_task() -> Pool | None:
            return current_pool()

        assert await asyncio.create_task(pool_in_a_task()) is outer
    assert current_pool() is None
    assert existing_pool() is None  # no default pool was started meanwhile


# -- submit and futures -------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_submit_returns_a_full_future(tmp_path: Path) -> None:
    async with Pool(workers=2) as pool:
        fut = pool.submit(T.api_kwargs, 2, b=3, scale=10, tag="x")
        assert isinstance(fut, TaskFuture)
        assert isinstance(fut, asyncio.Future)
        assert not fut.done()
        with pytest.raises(asyncio.InvalidStateError):
            fut.result()
        called = asyncio.Event()
        seen: list[Any] = []

        def on_done(f: asyncio.Future[Any]) -> None:
            seen.append(f.result())
            called.set()

        fut.add_done_callback(on_done)
        assert await fut == {"sum": 50, "tag": "x"}
        await asyncio.wait_for(called.wait(), 5 * SCALE)
        assert seen == [{"sum": 50, "tag": "x"}]
        assert fut.done()
        assert fut.exception() is None
        assert fut.result() == {"sum": 50, "tag": "x"}
        assert fut.cancel() is False  # already done
        assert await pool.submit(T.api_kwargs, 1) == {"sum": 1, "tag": ""}
        assert await pool.submit(T.api_kwargs, a=1, b=1, scale=2) == {"sum": 4, "tag": ""}

        bad = pool.submit(T.api_fail_on, 3, bad=3)
        with pytest.raises(ValueError, match="bad value 3"):
            await bad
        assert isinstance(bad.exception(), ValueError)

        # cancel() of a task running on a worker cancels it there.
        marker = tmp_path / "cancelled"
        slow = pool.submit(T.api_sleep_and_mark_cancel, 30, str(marker))
        await eventually(status_is(pool, running=1), "the slow task did not start")
        assert slow.cancel() is True
        assert slow.cancelled()
        with pytest.raises(asyncio.CancelledError):
            slow.result()
        await eventually(marker.exists, "the remote task was not cancelled")
        await eventually(status_is(pool, running=0, queued=0), "the broker still runs the task")
        assert (await pool.status())["stats"]["cancelled"] == 1

        # A timeout around the future cancels the remote task too.
        marker2 = tmp_path / "timed-out"
        slow2 = pool.submit(T.api_sleep_and_mark_cancel, 30, str(marker2))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow2, 0.3 * SCALE)
        assert slow2.cancelled()
        await eventually(marker2.exists, "the timed-out remote task was not cancelled")
        await eventually(status_is(pool, running=0, queued=0), "the broker still runs the task")


# -- functions by value -------------------------------------------------------------------------


async def test_lambdas_closures_and_main_functions_travel_by_value() -> None:
    offset = 100

    def closure(x: int) -> int:
        return x + offset

    async def async_closure(x: int) -> int:
        await asyncio.sleep(0)
        return x - offset

    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def triple(x):\n    return 3 * x\n", namespace)
    main_function = namespace["triple"]
    assert main_function.__module__ == "__main__"

    async with Pool(workers=1) as pool:
        assert await pool.map(lambda x: x * 2, range(5)) == [0, 2, 4, 6, 8]
        assert await pool.map(closure, range(3)) == [100, 101, 102]
        assert await pool.map(async_closure, [100, 101]) == [0, 1]
        assert await pool.submit(main_function, 4) == 12
        assert await pool.submit(lambda a, *, k: a + k, 1, k=2) == 3


async def test_by_value_is_refused_on_an_unauthenticated_cluster(tmp_path: Path) -> None:
    broker, server = await serve_broker()  # no secret: loopback only, no pickles
    address = f"127.0.0.1:{server.port}"
    try:
        async with hand_worker(address, tmp_path / "worker.log"), Pool(broker=address) as pool:
            assert pool.secret is None
            await eventually(lambda: broker.worker_count == 1, "the worker did not join", 20)
            # Importable functions travel by reference: fine without a secret.
            assert await pool.map(T.api_identity, range(3)) == [0, 1, 2]
            assert await pool.submit(T.api_kwargs, 1, b=1) == {"sum": 2, "tag": ""}
            offset = 1

            def closure(x: int) -> int:
                return x + offset

            with pytest.raises(SerializationError, match="authenticated") as info:
                await pool.map(lambda x: x, range(3))
            assert "secret" in str(info.value)
            with pytest.raises(SerializationError, match="authenticated"):
                pool.submit(closure, 1)
            with pytest.raises(SerializationError, match="authenticated"):
                await pool.map_reduce(closure, operator.add, range(3))
            # Nothing of them reached the broker.
            status = await pool.status()
            assert status["stats"]["submitted"] == 4
            assert status["queued"] == 0
    finally:
        await server.aclose()
        broker.close()


async def test_a_pool_joins_an_authenticated_broker_with_workers_started_by_hand(
    tmp_path: Path, secret: str
) -> None:
    secret_file = write_secret(tmp_path / "secret", secret.encode())
    broker, server = await serve_broker(secret=secret)
    address = f"127.0.0.1:{server.port}"
    try:
        async with Pool(broker=address, secret=secret) as pool:
            # Tasks submitted before any worker joined wait in the queue.
            early = pool.submit(T.api_pid)
            await eventually(status_is(pool, queued=1), "the task is not queued")
            async with hand_worker(address, tmp_path / "worker.log", "--secret-file", str(secret_file)):
                pid = await asyncio.wait_for(early, 30 * SCALE)
                status = await pool.status()
                assert [w["pid"] for w in status["workers"]] == [pid]
                assert status["clients"] == 1
                offset = 7
                assert await pool.map(lambda x: x + offset, range(3)) == [7, 8, 9]
                assert await pool.map_reduce(T.api_identity, operator.add, range(100)) == 4950
                # Cancellation and timeouts work over the network link too.
                marker = tmp_path / "remote-cancel"
                slow = pool.submit(T.api_sleep_and_mark_cancel, 30, str(marker))
                await eventually(status_is(pool, running=1), "the slow task did not start")
                assert slow.cancel()
                await eventually(marker.exists, "the remote task was not cancelled")
                with pytest.raises(TimeoutError):
                    await pool.map(T.api_async_sleep, [30] * 3, timeout=0.3 * SCALE)
                await eventually(status_is(pool, running=0, queued=0), "the tasks were not cancelled")
                assert (await pool.status())["stats"]["cancelled"] == 4
            await eventually(lambda: broker.worker_count == 0, "the worker did not leave")
    finally:
        await server.aclose()
        broker.close()


# -- the default pool ---------------------------------------------------------------------------


def test_default_pool_is_started_per_event_loop_and_closed_with_it() -> None:
    async def use() -> tuple[Pool, set[int], set[int]]:
        assert current_pool() is None
        pids = await asyncdist.map(T.api_pid_after, [0.02] * 20)
        pool = await default_pool()
        return pool, set(pids), await worker_pids(pool)

    with asyncio.Runner() as runner:
        pool1, used1, workers1 = runner.run(use())
        assert pool1.workers == cpu_count()
        assert len(workers1) == cpu_count()
        assert used1 <= workers1
        again, _, _ = runner.run(use())
        assert again is pool1  # the same loop keeps its default pool
        assert not pool1.closed
    assert pool1.closed  # closed with its loop
    assert not any(alive(pid) for pid in workers1)

    with asyncio.Runner() as runner:
        pool2, used2, workers2 = runner.run(use())
        assert pool2 is not pool1  # a new loop starts a new one
        assert used2 <= workers2
        assert not workers2 & workers1
        runner.run(close_default_pool())
        assert pool2.closed
    assert not any(alive(pid) for pid in workers2)


async def test_module_level_submit_and_shared_start_the_default_pool() -> None:
    await close_default_pool()  # none yet: a no-op
    assert existing_pool() is None
    fut = asyncdist.submit(T.api_kwargs, 2, b=2, tag="d")  # starts the default pool first
    assert await fut == {"sum": 4, "tag": "d"}
    pool = existing_pool()
    assert pool is not None
    assert pool is await default_pool()
    second = asyncdist.submit(T.api_identity, 5)
    assert isinstance(second, TaskFuture)  # the pool exists now: its future at once
    assert await second == 5
    await asyncdist.shared.set_const(answer=42)
    assert asyncdist.shared.get_const("answer") == 42
    results = await asyncdist.map(T.api_get_const, ["answer"] * 6)
    assert {value for _, value in results} == {42}
    assert {pid for pid, _ in results} <= await worker_pids(pool)
    await close_default_pool()
    assert pool.closed
    assert existing_pool() is None


async def test_default_pool_joins_the_broker_named_by_ASYNCDIST_BROKER(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = await Pool(workers=1).start()  # started, but not the current pool
    try:
        assert cluster.address is not None
        assert cluster.secret is not None
        monkeypatch.setenv("ASYNCDIST_BROKER", cluster.address)
        monkeypatch.setenv("ASYNCDIST_SECRET", cluster.secret.decode())
        assert current_pool() is None
        pids = await asyncdist.map(T.api_pid, range(4))
        pool = await default_pool()
        assert pool is not cluster
        assert pool.address == cluster.address
        assert set(pids) == await worker_pids(cluster)
        status = await cluster.status()
        assert status["clients"] == 2
        assert status["stats"]["submitted"] == 4
        await close_default_pool()
        assert pool.closed
        await eventually(status_is(cluster, clients=1), "the default pool did not disconnect")
    finally:
        await cluster.aclose()


def test_default_pool_in_a_script_with_main_functions_and_two_loops(tmp_path: Path) -> None:
    script = tmp_path / "two_loops.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, json, os
            import asyncdist
            from asyncdist.futures import default_pool

            def where(x):  # defined in __main__: travels by value
                return os.getpid(), x * 2

            async def main():
                out = await asyncdist.map(where, range(6))
                pool = await default_pool()
                workers = [w["pid"] for w in (await pool.status())["workers"]]
                return [r[1] for r in out], [r[0] for r in out], workers

            def alive(pid):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        return f.read().rpartition(")")[2].split()[0] != "Z"
                except OSError:
                    return False

            if __name__ == "__main__":
                first = asyncio.run(main())
                first_alive = [alive(p) for p in first[2]]
                second = asyncio.run(main())
                print(json.dumps({"first": first, "second": second, "first_alive": first_alive}))
            """
        )
    )
    env = worker_env()
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for run in ("first", "second"):
        values, used, workers = data[run]
        assert values == [0, 2, 4, 6, 8, 10]
        assert set(used) <= set(workers)
        assert len(workers) == cpu_count()
    assert not set(data["first"][2]) & set(data["second"][2])  # the second loop had a new pool
    assert data["first_alive"] == [False] * len(data["first"][2])  # closed with the first loop
    assert not any(alive(pid) for pid in data["second"][2])


# -- nested futures ----------------------------------------------------------------------------


async def test_nested_futures_scoop_recursion_on_two_workers() -> None:
    async with Pool(workers=2) as pool:
        async with asyncio.timeout(40 * SCALE):
            assert await pool.submit(T.api_recurse, 12) == 4096
        status = await pool.status()
        # Every level's tasks went to the task's own cluster: 1 + 2 + ... + 4096.
        assert status["stats"]["submitted"] == 2**13 - 1
        assert status["stats"]["completed"] == 2**13 - 1
        assert status["stats"]["failed"] == 0
        # A task that submits futures of its own and awaits them.
        assert await pool.map(T.api_nested_submit, [1, 2]) == [12, 18]


# -- timeouts -----------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_map_timeout_raises_promptly_and_cancels_the_remote_tasks(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with Pool(workers=2) as pool:
        markers = [str(tmp_path / f"m{i}") for i in range(10)]
        started = loop.time()
        job = asyncio.ensure_future(
            pool.map(T.api_sleep_and_mark_cancel, [30] * 10, markers, timeout=1.5 * SCALE)
        )
        await eventually(status_is(pool, running=10, queued=0), "the tasks did not all start")
        with pytest.raises(TimeoutError):
            await job
        assert loop.time() - started < 3.0 * SCALE
        # Every remote task was cancelled on its worker.
        await eventually(lambda: all(os.path.exists(m) for m in markers), "remote tasks not cancelled")
        await eventually(status_is(pool, running=0, queued=0), "the broker still has the tasks")
        assert (await pool.status())["stats"]["cancelled"] == 10

        # Plain functions (threads): the queue empties at once, late results are dropped.
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.map(T.api_plain_sleep, [0.3] * 40, timeout=0.2 * SCALE)
        assert loop.time() - started < 1.0 * SCALE
        await eventually(status_is(pool, running=0, queued=0), "the plain tasks were not cancelled")
        stats = (await pool.status())["stats"]
        assert stats["cancelled"] + stats["completed"] == 10 + 40
        assert stats["cancelled"] >= 10 + 36

        # map_as_completed, map_reduce and map_scan honour timeout too.
        with pytest.raises(TimeoutError):
            async for _ in pool.map_as_completed(T.api_async_sleep, [0.01, 30], timeout=0.3 * SCALE):
                pass
        with pytest.raises(TimeoutError):
            await pool.map_reduce(T.api_async_sleep, operator.add, [0.01, 30], timeout=0.3 * SCALE)
        with pytest.raises(TimeoutError):
            await pool.map_scan(T.api_async_sleep, operator.add, [0.01, 30], timeout=0.3 * SCALE)
        assert loop.time() - started < 3.0 * SCALE
        await eventually(status_is(pool, running=0, queued=0), "the async tasks were not cancelled")
        # And a map that finishes in time is unaffected by its timeout.
        assert await pool.map(T.api_identity, range(10), timeout=10) == list(range(10))


# -- map_reduce, map_scan, map_as_completed -----------------------------------------------------


async def test_map_reduce_and_map_scan_keep_input_order_with_non_commutative_reductions() -> None:
    async with Pool(workers=2) as pool:
        n = 60
        expected = "".join(f"<{i}>" for i in range(n))
        # The premise: results arrive out of order.
        arrived = [x async for x in pool.map_as_completed(T.api_as_str_after, range(n))]
        assert sorted(arrived) == sorted(f"<{i}>" for i in range(n))
        assert "".join(arrived) != expected
        assert await pool.map_reduce(T.api_as_str_after, operator.add, range(n)) == expected
        calls = 0

        def concat(a: list[int], b: list[int]) -> list[int]:
            nonlocal calls
            calls += 1
            return a + b

        assert await pool.map_reduce(T.api_as_list_after, concat, range(300)) == list(range(300))
        assert calls == 299
        scan = await pool.map_scan(T.api_as_str_after, operator.add, range(30))
        assert scan == ["".join(f"<{j}>" for j in range(i + 1)) for i in range(30)]
        assert await pool.map_scan(T.api_identity, operator.add, range(6)) == [0, 1, 3, 6, 10, 15]
        assert await pool.map_scan(T.api_identity, operator.add, []) == []
        assert await pool.map_reduce(T.api_identity, operator.add, [7]) == 7
        with pytest.raises(TypeError):
            await pool.map_reduce(T.api_identity, operator.add, [])
        with pytest.raises(ValueError, match="bad value 5"):
            await pool.map_reduce(T.api_fail_on, operator.add, range(20), itertools.repeat(5))
        with pytest.raises(ValueError, match="bad value 5"):
            await pool.map_scan(T.api_fail_on, operator.add, range(20), itertools.repeat(5))

        # The reduction runs as results arrive, not after the last one.
        loop = asyncio.get_running_loop()
        times: list[float] = []

        def timed_concat(a: list[int], b: list[int]) -> list[int]:
            times.append(loop.time())
            return a + b

        m = 20
        delays = [0.0] * (m - 1) + [1.0 * SCALE]
        values = [[i] for i in range(m)]
        started = loop.time()
        assert await pool.map_reduce(T.api_async_sleep, timed_concat, delays, values) == list(range(m))
        assert len(times) == m - 1
        early = [t for t in times if t - started < 0.8 * SCALE]
        assert len(early) == m - 2


async def test_map_as_completed_yields_in_completion_order() -> None:
    async with Pool(workers=1) as pool:
        delays = [0.6, 0.05, 0.35, 0.2]
        assert [x async for x in pool.map_as_completed(T.api_async_sleep, delays)] == sorted(delays)
        assert [x async for x in pool.map_as_completed(T.api_identity, [])] == []
        # Leaving the loop early cancels the tasks not yet done.
        async with contextlib.aclosing(pool.map_as_completed(T.api_async_sleep, [0.05, 30, 30])) as it:
            async for x in it:
                assert x == 0.05
                break
        await eventually(status_is(pool, running=0, queued=0), "the remaining tasks were not cancelled")
        assert (await pool.status())["stats"]["cancelled"] == 2
        # A task error ends the iteration.
        with pytest.raises(ValueError, match="bad value 2"):
            async for _ in pool.map_as_completed(T.api_fail_on, range(5), itertools.repeat(2)):
                pass


# -- as_completed and wait ----------------------------------------------------------------------


@pytest.mark.both_loops
async def test_as_completed_and_wait() -> None:
    loop = asyncio.get_running_loop()
    async with Pool(workers=2) as pool:
        futures = [pool.submit(T.api_async_sleep, d) for d in (0.4, 0.05, 0.2)]
        assert [f.result() async for f in asyncdist.as_completed(futures)] == [0.05, 0.2, 0.4]

        slow = pool.submit(T.api_async_sleep, 30)
        quick = pool.submit(T.api_async_sleep, 0.01)
        seen = []
        started = loop.time()
        with pytest.raises(TimeoutError):
            await collect_results(asyncdist.as_completed([slow, quick], timeout=0.5 * SCALE), seen)
        assert loop.time() - started < 2 * SCALE
        assert seen == [0.01]
        assert not slow.done()

        fast = pool.submit(T.api_async_sleep, 0.05)
        done, pending = await asyncdist.wait([slow, fast], return_when=FIRST_COMPLETED)
        assert done == {fast}
        assert pending == {slow}

        failing = pool.submit(T.api_async_fail_after, 0.05)
        ok = pool.submit(T.api_async_sleep, 0.01)
        done, pending = await asyncdist.wait([slow, failing, ok], return_when=FIRST_EXCEPTION)
        assert failing in done
        assert slow in pending
        assert isinstance(failing.exception(), KeyError)

        everything = [pool.submit(T.api_identity, i) for i in range(5)]
        done, pending = await asyncdist.wait(everything, return_when=ALL_COMPLETED)
        assert pending == set()
        assert sorted(f.result() for f in done) == [0, 1, 2, 3, 4]
        done, pending = await asyncdist.wait([pool.submit(T.api_identity, 9)])  # default: ALL_COMPLETED
        assert [f.result() for f in done] == [9]
        assert pending == set()

        started = loop.time()
        done, pending = await asyncdist.wait([slow], timeout=0.2 * SCALE)
        assert loop.time() - started < 1.5 * SCALE
        assert done == set()
        assert pending == {slow}
        assert await asyncdist.wait([]) == (set(), set())

        assert slow.cancel()
        await eventually(status_is(pool, running=0, queued=0), "the slow task was not cancelled")


# -- shared constants ---------------------------------------------------------------------------


async def test_shared_constants_reach_every_worker_including_late_joiners(tmp_path: Path) -> None:
    async with Pool(workers=0) as pool:
        assert pool.secret is not None
        assert (await pool.status())["workers"] == []
        address = pool.address
        assert address is not None
        secret_file = write_secret(tmp_path / "secret", pool.secret)
        options = ("--secret-file", str(secret_file))
        table = {"a": [1, 2], "b": "x"}
        async with hand_worker(address, tmp_path / "a.log", *options):
            pid_a = await asyncio.wait_for(pool.submit(T.api_pid), 30 * SCALE)
            assert await pool.submit(T.api_get_const_default, "factor") == "missing"
            await asyncdist.shared.set_const(factor=3, table=table)
            assert asyncdist.shared.get_const("factor") == 3
            assert await pool.map(T.api_get_const, ["factor"] * 50) == [(pid_a, 3)] * 50
            # Setting the same value again is fine; another value raises.
            await asyncdist.shared.set_const(factor=3)
            with pytest.raises(ValueError, match="factor"):
                await asyncdist.shared.set_const(factor=4)
            assert asyncdist.shared.get_const("factor") == 3
            assert await pool.submit(T.api_get_const, "factor") == (pid_a, 3)
            with pytest.raises(KeyError):
                asyncdist.shared.get_const("nope")
            assert asyncdist.shared.get_const("nope", None) is None
            # A client joining the same broker sees them, and cannot reassign them either.
            async with Pool(broker=address, secret=pool.secret) as client:
                assert asyncdist.shared.get_const("table") == table
                with pytest.raises(ValueError, match="factor"):
                    await asyncdist.shared.set_const(factor=5)
                assert await client.map(T.api_get_const, ["factor"]) == [(pid_a, 3)]
                # Two clients at once (their task ids overlap): results go to their submitter.
                mine, theirs = await asyncio.gather(
                    pool.map(T.api_identity, range(300)),
                    client.map(T.api_add3, range(300), range(300), range(300)),
                )
                assert mine == list(range(300))
                assert theirs == [3 * i for i in range(300)]
        await eventually(status_is(pool, workers=[]), "worker A did not leave")
        # A worker that joins later gets the constants too.
        async with hand_worker(address, tmp_path / "b.log", *options):
            results = await asyncio.wait_for(pool.map(T.api_get_const, ["table"] * 20), 30 * SCALE)
            pid_b = results[0][0]
            assert pid_b != pid_a
            assert results == [(pid_b, table)] * 20
            assert await pool.map(T.api_get_const, ["factor"]) == [(pid_b, 3)]


# -- how workers run tasks ----------------------------------------------------------------------


async def test_plain_functions_run_in_threads_and_async_functions_on_the_loop() -> None:
    async with Pool(workers=1) as pool:
        names = await pool.map(T.api_thread_name, range(20))
        assert all(name.startswith("asyncdist-task") for name in names), names
        assert await pool.submit(T.api_async_thread_name) == ("MainThread", True)


async def test_many_async_tasks_are_suspended_at_once_on_one_worker() -> None:
    loop = asyncio.get_running_loop()
    async with Pool(workers=1) as pool:
        started = loop.time()
        assert await pool.map(T.api_async_sleep, [0.2] * 200, range(200)) == list(range(200))
        elapsed = loop.time() - started
    assert elapsed < 4.0 * SCALE, f"200 x 0.2 s async tasks took {elapsed:.2f} s on one worker"


async def test_small_tasks_travel_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Pool(workers=2) as pool:
        broker = pool._broker
        assert broker is not None
        frames: collections.Counter[str] = collections.Counter()
        notify = broker._notify

        def counting_notify(conn: Any, name: str, *args: Any) -> None:
            frames[name] += 1
            notify(conn, name, *args)

        monkeypatch.setattr(broker, "_notify", counting_notify)
        link = pool._link
        assert link is not None
        client = link.client  # type: ignore[union-attr]
        deliver = client.deliver
        deliveries: list[int] = []

        def counting_deliver(batch: list[list[Any]]) -> None:
            deliveries.append(len(batch))
            deliver(batch)

        monkeypatch.setattr(client, "deliver", counting_deliver)
        from_workers = sum(w.conn.stats.notifies_received for w in broker._workers.values())
        n = 5000
        assert await pool.map(T.api_noop, range(n)) == [None] * n
        from_workers = sum(w.conn.stats.notifies_received for w in broker._workers.values()) - from_workers
    assert frames["run"] < n / 10, frames
    assert from_workers < n / 10, from_workers  # 'done' (results) and 'want' frames of the workers
    assert sum(deliveries) == n
    assert len(deliveries) < n / 10, len(deliveries)


async def test_load_is_balanced_over_two_workers() -> None:
    async with Pool(workers=2) as pool:
        pids = await pool.map(T.api_pid_after, [0.01] * 200)
        counts = collections.Counter(pids)
        assert len(counts) == 2
        assert min(counts.values()) > 40, counts
        status = await pool.status()
        assert sorted(w["completed"] for w in status["workers"]) == sorted(counts.values())


# -- progress -----------------------------------------------------------------------------------


async def test_progress_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    threads = set(threading.enumerate())
    async with Pool(workers=1) as pool:
        assert await pool.map(T.api_identity, range(50), progress="force") == list(range(50))
        assert await pool.map_reduce(T.api_identity, operator.add, range(10), progress="force") == 45
        got = [x async for x in pool.map_as_completed(T.api_identity, range(5), progress="force")]
        assert sorted(got) == list(range(5))
        assert await pool.map_scan(T.api_identity, operator.add, range(3), progress="force") == [0, 1, 3]
        assert await asyncdist.map(T.api_identity, range(7), progress="force") == list(range(7))
    captured = capsys.readouterr()
    assert "api_identity" in captured.err
    assert "/50" in captured.err
    assert "/10" in captured.err
    assert "/7" in captured.err
    assert "api_identity" not in captured.out

    # The bars are closed, and leave no thread behind (tqdm's monitor thread lives forever;
    # threads that reap the pool's worker processes end on their own, so allow them a moment).
    def left() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads and t.is_alive()]

    with contextlib.suppress(TimeoutError):
        await poll_for(lambda: not left(), 2 * SCALE)
    assert left() == [], f"progress=True left threads running: {left()}"
