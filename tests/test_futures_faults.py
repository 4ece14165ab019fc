"""Fault scenarios of the distributed futures (RELIABILITY.md C1: F1-F14, F29-F31).

Real worker processes, real signals sent by PID (SIGKILL, SIGSTOP/SIGCONT,
SIGTERM, SIGINT), a loopback fault proxy for half-open links, brokers and
clients in their own processes where the scenario kills them. Tests wait on
events, broker state and marker files written by the tasks (see
``_futures_tasks.py``), never on fixed sleeps (the sleeps of the chaos tests
are their fault schedule); every process they start is reaped in a
``finally``. Bugs the tests expose are left failing on purpose.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import operator
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import _futures_tasks as T
import pytest
from _util import SCALE, eventually

from asyncdist import Pool
from asyncdist.connection import Options
from asyncdist.errors import (
    BrokerLost,
    ConnectionClosed,
    NoWorkersError,
    RemoteError,
    SerializationError,
    WorkerLost,
)
from asyncdist.futures import serve_broker
from asyncdist.futures._broker import Broker
from asyncdist.testing import FaultProxy

TASKS = Path(T.__file__).resolve()

#: Short heartbeats (scaled) for the tests about detection; the bound allows two ticks of slack.
HB = {"heartbeat_interval": 0.1 * SCALE, "heartbeat_timeout": 1.0 * SCALE}
HB_OPTIONS = tuple(f"{name}={value}" for name, value in HB.items())
HB_BOUND = HB["heartbeat_timeout"] + 2 * HB["heartbeat_interval"] + 0.5 * SCALE
#: A killed process closes its sockets at once: no timer is involved.
PROMPT = 3.0 * SCALE


# -- helpers ------------------------------------------------------------------------------


async def finish(aw: Awaitable[Any], timeout: float, what: str) -> Any:
    """Await ``aw`` for at most ``timeout`` s (already scaled by the caller)."""
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        raise AssertionError(f"{what} did not finish within {timeout:g} s") from None


def count_deliveries(pool: Pool) -> collections.Counter[int]:
    """Count every result the in-process broker delivers to ``pool``, by task id."""
    counts: collections.Counter[int] = collections.Counter()
    client = pool._link.client  # type: ignore[union-attr]
    inner = client.deliver

    def deliver(batch: list[list[Any]]) -> None:
        counts.update(item[0] for item in batch)
        inner(batch)

    client.deliver = deliver
    return counts


def broker_of(pool: Pool) -> Broker:
    assert pool._broker is not None
    return pool._broker


def worker_by_pid(broker: Broker, pid: int) -> Any:
    """The broker's record of the worker process ``pid`` (None if it is not registered)."""
    return next((w for w in broker._workers.values() if w.pid == pid), None)


def pool_proc(pool: Pool, pid: int) -> asyncio.subprocess.Process:
    return next(p for p in pool._procs.procs if p.pid == pid)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def python_env() -> dict[str, str]:
    """The environment of processes started here: our sys.path, so ``_futures_tasks`` imports."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class Processes:
    """Processes a test starts by hand (workers, brokers, clients); all reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        #: Processes that stop on SIGTERM rather than on stdin EOF (brokers).
        self.terminate: set[asyncio.subprocess.Process] = set()

    async def start(
        self, *args: str, stdin_line: bytes | None = None, stdout: bool = False, new_session: bool = False
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE if stdout else None,
            stderr=asyncio.subprocess.PIPE if stdout else None,
            env=python_env(),
            start_new_session=new_session,
        )
        self.procs.append(proc)
        if stdin_line is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin_line + b"\n")
            await proc.stdin.drain()
        return proc

    async def worker(self, address: str, secret: bytes, *options: str) -> asyncio.subprocess.Process:
        """``asyncdist worker`` joined to ``address``; it stops when its stdin closes."""
        cmd = [sys.executable, "-m", "asyncdist", "worker", "--broker", address]
        cmd += ["--secret-stdin", "--watch-stdin"]
        for option in options:
            cmd += ["--option", option]
        return await self.start(*cmd, stdin_line=secret)

    async def broker(self, secret_file: Path, port: int = 0) -> tuple[asyncio.subprocess.Process, int]:
        """``asyncdist broker`` in its own process; return it and its port."""
        proc = await self.start(
            sys.executable, "-m", "asyncdist", "broker", "--port", str(port), "--secret-file",
            str(secret_file), stdout=True,
        )  # fmt: skip
        self.terminate.add(proc)
        assert proc.stdout is not None
        line = await finish(proc.stdout.readline(), 20 * SCALE, "the broker's start")
        assert b"listening on" in line, f"the broker did not start: {line!r}"
        return proc, int(line.rsplit(b":", 1)[1])

    async def aclose(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            if proc in self.terminate and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5 * SCALE)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.read()
            if proc.stderr is not None:
                await proc.stderr.read()
        await asyncio.sleep(0)  # let the pipe transports close


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        await procs.aclose()


@contextlib.asynccontextmanager
async def frozen_guard(pid: int) -> AsyncIterator[None]:
    """SIGCONT ``pid`` on the way out, whatever happens (a stopped process cannot be reaped)."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def exit_time(proc: asyncio.subprocess.Process) -> float:
    """Wait for ``proc`` to exit; return the loop time it was seen to."""
    await proc.wait()
    return asyncio.get_running_loop().time()


def write_secret(path: Path, secret: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


# -- F1: a worker SIGKILLed in the middle of a map ----------------------------------------------


@pytest.mark.both_loops
async def test_f1_sigkilled_worker_tasks_rerun_results_complete_ordered_once() -> None:
    xs = list(range(200))
    async with Pool(workers=3) as pool:  # default heartbeats: the closed socket tells
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        job = asyncio.ensure_future(pool.map(T.slow_square, xs, [0.01] * len(xs)))
        try:
            await eventually(
                lambda: broker.stats["completed"] >= 20 and any(w.running for w in broker._workers.values()),
                "the map did not get going",
            )
            victim = max(broker._workers.values(), key=lambda w: len(w.running))
            on_victim = list(victim.running.values())
            assert on_victim
            loop = asyncio.get_running_loop()
            os.kill(victim.pid, signal.SIGKILL)
            t0 = loop.time()
            await eventually(
                lambda: victim.wid not in broker._workers, "the dead worker is still registered", PROMPT
            )
            assert loop.time() - t0 <= PROMPT
            results = await finish(job, 30 * SCALE, "the map")
        finally:
            job.cancel()
        assert results == [x * x for x in xs]
        assert len(counts) == len(xs)
        assert set(counts.values()) == {1}, "a result was delivered more than once"
        stats = broker.stats
        assert stats["completed"] == len(xs)
        assert stats["failed"] == 0
        assert stats["workers_lost"] == 1
        # The tasks the dead worker held were re-run once, on another worker (attempt 2). The
        # death counts against those it was executing (one death), not against those it had
        # only prefetched (no death); a result it sent before dying was accepted (attempt 1).
        rerun = [t for t in on_victim if t.attempt == 2]
        assert rerun, "no task of the killed worker was re-run"
        assert any(t.deaths == 1 for t in rerun), "the death was charged to no task"
        for task in on_victim:
            assert (task.attempt, task.deaths) in {(1, 0), (2, 0), (2, 1)}, (task.attempt, task.deaths)
        # The broker may hand the victim more tasks between the snapshot and noticing its
        # death: those are requeued too, so requeued can exceed the snapshot's re-runs.
        assert stats["requeued"] >= len(rerun)
        assert worker_by_pid(broker, victim.pid) is None


# -- F2: a poison task kills every worker it lands on --------------------------------------------


async def test_f2_poison_task_raises_workerlost_after_allowed_failures_plus_one(tmp_path: Path) -> None:
    d = str(tmp_path)
    async with Pool(workers=5, allowed_failures=3) as pool:
        broker = broker_of(pool)
        pids = {p.pid for p in pool._procs.procs}
        others = [pool.submit(T.slow_square, i, 0.01) for i in range(30)]
        poison = pool.submit(T.die, d)
        with pytest.raises(WorkerLost) as info:
            await finish(poison, 30 * SCALE, "the poison task")
        deaths = T.markers(d, "died", "poison")
        assert len(deaths) == 4, "the poison task ran on the wrong number of workers"
        assert info.value.attempts == 4
        message = str(info.value)
        assert f"task {poison._tid} " in message, message
        assert "die" in message, message
        last_pid = T.marker_pid(deaths[-1])
        assert f":{last_pid}" in message, f"the error does not name the last worker ({last_pid}): {message}"
        # The other futures of the pool complete.
        assert await finish(asyncio.gather(*others), 30 * SCALE, "the other futures") == [
            i * i for i in range(30)
        ]
        # The pool stays usable, and no further worker is sacrificed to the poison task.
        assert await finish(pool.map(T.square, range(20)), 30 * SCALE, "a map after") == [
            i * i for i in range(20)
        ]
        assert len(T.markers(d, "died", "poison")) == 4
        assert broker.stats["workers_lost"] == 4
        assert len(broker._workers) == 1
        survivors = [p for p in pool._procs.procs if p.returncode is None]
        assert len(survivors) == 1
        assert {T.marker_pid(m) for m in deaths} == pids - {survivors[0].pid}


# -- F3: a worker shut down gracefully (SIGTERM) mid-task -----------------------------------------


@pytest.mark.parametrize("kind", ["thread", "async"])
async def test_f3_sigterm_requeues_without_counting_a_failure_and_exits_zero(
    tmp_path: Path, kind: str
) -> None:
    d = str(tmp_path)
    # Blocks the first time (a plain function: in a thread, uninterruptible); at once when re-run.
    fn = T.long_first_time if kind == "thread" else T.async_long_first_time
    async with Pool(workers=2, allowed_failures=0) as pool:
        broker = broker_of(pool)
        fut = pool.submit(fn, d, "t", 20.0, "value")
        await eventually(lambda: T.markers(d, "started", "t"), "the task did not start")
        pid = T.marker_pid(T.markers(d, "started", "t")[0])
        worker = worker_by_pid(broker, pid)
        (task,) = worker.running.values()
        proc = pool_proc(pool, pid)
        loop = asyncio.get_running_loop()
        os.kill(pid, signal.SIGTERM)
        t0 = loop.time()
        # allowed_failures=0: one counted death would fail the task with WorkerLost.
        assert await finish(fut, 10 * SCALE, "the requeued task") == "value"
        assert task.deaths == 0
        assert task.attempt == 2
        started = T.markers(d, "started", "t")
        assert len(started) == 2
        assert T.marker_pid(started[1]) != pid
        close_timeout = Options().close_timeout * SCALE
        code = await finish(proc.wait(), close_timeout + 1.0 * SCALE, "the SIGTERMed worker's exit")
        assert code == 0
        assert loop.time() - t0 <= close_timeout
        assert broker.stats["requeued"] == 1
        assert broker.stats["failed"] == 0
        assert worker_by_pid(broker, pid) is None
        assert await pool.map(T.square, range(5)) == [0, 1, 4, 9, 16]


# -- F4: a frozen worker (SIGSTOP) --------------------------------------------------------------


async def test_f4_frozen_worker_declared_dead_tasks_reassigned_stale_results_dropped() -> None:
    xs = list(range(60))
    async with Pool(workers=3, **HB) as pool:
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        job = asyncio.ensure_future(pool.map(T.slow_square, xs, [0.05] * len(xs)))
        try:
            await eventually(
                lambda: broker.stats["completed"] >= 6 and any(w.running for w in broker._workers.values()),
                "the map did not get going",
            )
            victim = max(broker._workers.values(), key=lambda w: len(w.running))
            on_victim = list(victim.running.values())
            loop = asyncio.get_running_loop()
            async with frozen_guard(victim.pid):
                os.kill(victim.pid, signal.SIGSTOP)
                t0 = loop.time()
                await eventually(
                    lambda: victim.wid not in broker._workers,
                    "the frozen worker was not declared dead",
                    HB_BOUND + 2.0 * SCALE,
                )
                assert loop.time() - t0 <= HB_BOUND
                assert on_victim
                assert all(t.worker is not victim for t in on_victim)
            # SIGCONT: the zombie may now finish its old attempt; that result must not count.
            results = await finish(job, 30 * SCALE, "the map")
        finally:
            job.cancel()
        assert results == [x * x for x in xs]
        assert len(counts) == len(xs)
        assert set(counts.values()) == {1}, "a result was delivered twice"
        assert broker.stats["completed"] == len(xs)
        # The zombie is told to close (its connection is gone): it exits, and does not come back.
        await finish(pool_proc(pool, victim.pid).wait(), PROMPT, "the zombie worker's exit")
        assert worker_by_pid(broker, victim.pid) is None
        assert await pool.map(T.square, range(5)) == [0, 1, 4, 9, 16]
        assert set(counts.values()) == {1}


# -- F5: a long CPU-bound plain task --------------------------------------------------------------


async def test_f5_cpu_bound_task_longer_than_three_heartbeat_timeouts_is_no_false_death() -> None:
    seconds = 3 * HB["heartbeat_timeout"] + 0.3 * SCALE
    async with Pool(workers=1, slots=2, **HB) as pool:
        broker = broker_of(pool)
        (worker,) = broker._workers.values()
        # The pool's options reach the broker's side of the worker connection.
        assert worker.conn.options.heartbeat_timeout == HB["heartbeat_timeout"]
        assert worker.conn.options.heartbeat_interval == HB["heartbeat_interval"]
        # Two threads burning CPU (GIL contention with the worker's loop) for 3+ heartbeat timeouts.
        spins = await finish(pool.map(T.spin, [seconds, seconds]), 30 * SCALE, "the CPU-bound tasks")
        assert all(n > 0 for n in spins)
        assert broker.stats["workers_lost"] == 0
        assert broker.stats["requeued"] == 0
        assert list(broker._workers.values()) == [worker]
        assert not worker.conn.closed


# -- F6: a half-open link between broker and worker --------------------------------------------------


async def test_f6_half_open_worker_link_detected_by_both_sides_and_tasks_rerouted(secret: str) -> None:
    xs = list(range(40))
    broker, server = await serve_broker(secret=secret, **HB)
    try:
        address = f"127.0.0.1:{server.port}"
        async with (
            FaultProxy(server.port) as proxy,
            processes() as procs,
            Pool(broker=address, secret=secret) as pool,
        ):
            proxied = await procs.worker(f"127.0.0.1:{proxy.port}", secret.encode(), *HB_OPTIONS)
            direct = await procs.worker(address, secret.encode(), *HB_OPTIONS)
            await eventually(lambda: len(broker._workers) == 2, "the workers did not join", 20)
            cut = worker_by_pid(broker, proxied.pid)
            job = asyncio.ensure_future(pool.map(T.slow_square, xs, [0.05] * len(xs)))
            try:
                await eventually(lambda: cut.completed >= 1 and cut.running, "the proxied worker got no work")
                loop = asyncio.get_running_loop()
                proxy.blackhole()
                t0 = loop.time()
                exited = asyncio.ensure_future(exit_time(proxied))
                await eventually(
                    lambda: cut.wid not in broker._workers,
                    "the broker did not detect the half-open link",
                    HB_BOUND + 2.0 * SCALE,
                )
                assert loop.time() - t0 <= HB_BOUND
                assert await finish(job, 30 * SCALE, "the rerouted map") == [x * x for x in xs]
            finally:
                job.cancel()
            # The worker's side detects it too (no FIN, no RST: only its heartbeat can), and exits.
            t1 = await finish(exited, HB_BOUND + 2.0 * SCALE, "the cut-off worker's exit")
            assert t1 - t0 <= HB_BOUND + 2 * HB["heartbeat_interval"]
            assert direct.returncode is None
            assert [w.pid for w in broker._workers.values()] == [direct.pid]
    finally:
        await server.aclose()
        broker.close()


# -- F7: the broker is killed while a client awaits a map ---------------------------------------------


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_f7_lost_broker_fails_the_clients_awaits_and_workers_exit(
    tmp_path: Path, secret: str, how: str
) -> None:
    # Killed: the sockets close at once. Frozen (SIGSTOP): only heartbeats can tell.
    d = str(tmp_path)
    secret_file = write_secret(tmp_path / "cluster.secret", secret)
    bound = PROMPT if how == "killed" else HB_BOUND
    async with processes() as procs:
        broker, port = await procs.broker(secret_file)
        address = f"127.0.0.1:{port}"
        workers = [await procs.worker(address, secret.encode(), *HB_OPTIONS) for _ in range(2)]
        async with frozen_guard(broker.pid), Pool(broker=address, secret=secret, **HB) as pool:
            await eventually(lambda: _count_workers(pool, 2), "the workers did not join", 20)
            job = asyncio.ensure_future(pool.map(T.async_wait, [d] * 4, range(4)))
            single = pool.submit(T.async_wait, d, "single")
            try:
                await eventually(lambda: len(T.markers(d, "started")) == 5, "the tasks did not start")
                loop = asyncio.get_running_loop()
                exits = [asyncio.ensure_future(exit_time(proc)) for proc in workers]
                os.kill(broker.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                t0 = loop.time()
                with pytest.raises(BrokerLost):
                    await finish(job, bound + 2.0 * SCALE, "the map on a lost broker")
                with pytest.raises(BrokerLost):
                    await finish(single, bound + 2.0 * SCALE, "a future on a lost broker")
                assert loop.time() - t0 <= bound
            finally:
                job.cancel()
                single.cancel()
            for proc, exited in zip(workers, exits, strict=True):
                t1 = await finish(exited, bound + 2.0 * SCALE, "a worker's exit after losing its broker")
                assert t1 - t0 <= bound
                assert proc.returncode == 0


def _count_workers(pool: Pool, n: int) -> Awaitable[bool]:
    async def check() -> bool:
        return len((await pool.status())["workers"]) >= n

    return check()


# -- F8: the broker is restarted on the same address ----------------------------------------------------


@pytest.mark.parametrize("first", ["map", "submit"])
async def test_f8_restarted_broker_old_futures_fail_new_submissions_succeed(
    tmp_path: Path, secret: str, first: str
) -> None:
    d = str(tmp_path)
    secret_file = write_secret(tmp_path / "cluster.secret", secret)
    async with processes() as procs:
        old_broker, port = await procs.broker(secret_file)
        address = f"127.0.0.1:{port}"
        old_worker = await procs.worker(address, secret.encode())
        async with Pool(broker=address, secret=secret) as pool:
            assert await finish(pool.map(T.square, range(5)), 20 * SCALE, "a map") == [0, 1, 4, 9, 16]
            old = pool.submit(T.async_wait, d, "old")
            await eventually(lambda: T.markers(d, "started", "old"), "the old task did not start")
            os.kill(old_broker.pid, signal.SIGKILL)
            with pytest.raises(BrokerLost):
                await finish(old, PROMPT, "a future of the killed broker")
            await finish(old_worker.wait(), PROMPT, "the old worker's exit")
            _, again = await procs.broker(secret_file, port)
            assert again == port
            await procs.worker(address, secret.encode())
            # New submissions from the same pool reconnect and succeed, whichever call comes first.
            if first == "submit":
                assert await finish(pool.submit(T.square, 7), 20 * SCALE, "a submit after the restart") == 49
            squares = await finish(pool.map(T.square, range(10)), 20 * SCALE, "a map after the restart")
            assert squares == [x * x for x in range(10)]
            if first == "map":
                assert await finish(pool.submit(T.square, 7), 20 * SCALE, "a submit after the restart") == 49
            # The old future was failed, not silently resubmitted (no persistence in v1).
            status = await pool.status()
            assert status["stats"]["submitted"] == 11
            assert len(T.markers(d, "started", "old")) == 1


# -- F9: a client process is killed in the middle of a map ------------------------------------------------


async def test_f9_killed_client_tasks_cancelled_workers_freed_other_client_unaffected(
    tmp_path: Path,
) -> None:
    d = str(tmp_path)
    n = 6
    async with Pool(workers=2) as pool, processes() as procs:
        broker = broker_of(pool)
        assert pool.secret is not None
        assert pool.address is not None
        client = await procs.start(
            sys.executable, str(TASKS), "client", pool.address, d, str(n), stdin_line=pool.secret
        )
        await eventually(
            lambda: len(T.markers(d, "started")) == n, "the other client's tasks did not start", 20
        )
        assert len(broker._clients) == 2
        mine = asyncio.ensure_future(pool.map(T.slow_square, range(40), [0.01] * 40))
        try:
            os.kill(client.pid, signal.SIGKILL)
            await finish(client.wait(), PROMPT, "the killed client")
            # The broker cancels the dead client's running tasks on the workers...
            await eventually(
                lambda: len(T.markers(d, "cancelled")) == n, "the dead client's tasks were not cancelled"
            )
            # ... and forgets the client, its tasks and their slots.
            own = pool._link.client  # type: ignore[union-attr]
            assert list(broker._clients.values()) == [own]
            assert all(t.client is own for t in broker._tasks.values())
            assert all(t.client is own for w in broker._workers.values() for t in w.running.values())
            assert broker.stats["cancelled"] == n
            # Another client's map is unaffected.
            assert await finish(mine, 30 * SCALE, "this client's map") == [x * x for x in range(40)]
        finally:
            mine.cancel()
        assert broker._tasks == {}
        assert not any(w.running for w in broker._workers.values())
        assert broker.stats["workers_lost"] == 0


# -- F10: all workers die and none replace them --------------------------------------------------------


async def test_f10_no_workers_pending_until_no_workers_timeout_then_noworkerserror(tmp_path: Path) -> None:
    d = str(tmp_path)
    timeout = 1.0 * SCALE
    async with Pool(workers=2, no_workers_timeout=timeout) as pool, processes() as procs:
        broker = broker_of(pool)
        futs = [pool.submit(T.async_wait, d, i) for i in range(4)]
        await eventually(lambda: len(T.markers(d, "started")) == 4, "the tasks did not start")
        loop = asyncio.get_running_loop()
        for proc in pool._procs.procs:
            os.kill(proc.pid, signal.SIGKILL)
        await eventually(lambda: not broker._workers, "the dead workers are still registered", PROMPT)
        t0 = loop.time()
        late = pool.submit(T.square, 3)  # submitted while no worker is connected
        # Still pending well into the timeout...
        done, _ = await asyncio.wait([*futs, late], timeout=timeout / 2)
        assert not done, "futures failed before no_workers_timeout"
        # ... then NoWorkersError.
        results = await finish(
            asyncio.gather(*futs, late, return_exceptions=True), timeout + PROMPT, "NoWorkersError"
        )
        assert all(isinstance(r, NoWorkersError) for r in results), results
        assert loop.time() - t0 <= timeout + 1.0 * SCALE
        # The broker stays healthy: a new worker gets new work.
        status = await pool.status()
        assert status["queued"] == 0
        assert status["running"] == 0
        assert broker.stats["failed"] == 5
        assert pool.secret is not None
        assert pool.address is not None
        await procs.worker(pool.address, pool.secret)
        assert await finish(pool.map(T.square, range(5)), 20 * SCALE, "a map on a new worker") == [
            0,
            1,
            4,
            9,
            16,
        ]


async def test_f10_default_no_workers_timeout_honours_the_callers_timeout() -> None:
    async with Pool(workers=1) as pool, processes() as procs:
        broker = broker_of(pool)
        (proc,) = pool._procs.procs
        os.kill(proc.pid, signal.SIGKILL)
        await eventually(lambda: not broker._workers, "the dead worker is still registered", PROMPT)
        with pytest.raises(TimeoutError):
            await pool.map(T.square, range(3), timeout=0.5 * SCALE)
        fut = pool.submit(T.square, 4)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5 * SCALE):
                await fut
        # The caller's timeout cancelled the tasks at the broker: nothing left queued.
        assert broker._tasks == {}
        assert broker.status()["queued"] == 0
        assert pool._waiting == {}
        assert pool.secret is not None
        assert pool.address is not None
        await procs.worker(pool.address, pool.secret)
        assert await finish(pool.map(T.square, range(3)), 20 * SCALE, "a map on a new worker") == [0, 1, 4]
        assert broker.stats["completed"] == 3


# -- F11: a worker joins in the middle of a map ----------------------------------------------------------


async def test_f11_worker_joining_mid_map_gets_work() -> None:
    xs = list(range(60))
    async with Pool(workers=1) as pool, processes() as procs:
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        job = asyncio.ensure_future(pool.map(T.slow_square, xs, [0.03] * len(xs)))
        try:
            await eventually(lambda: broker.stats["completed"] >= 5, "the map did not get going")
            assert pool.secret is not None
            assert pool.address is not None
            newcomer = await procs.worker(pool.address, pool.secret)
            await eventually(lambda: worker_by_pid(broker, newcomer.pid), "the new worker did not join", 20)
            joined = worker_by_pid(broker, newcomer.pid)
            results = await finish(job, 30 * SCALE, "the map")
        finally:
            job.cancel()
        assert results == [x * x for x in xs]
        assert joined.completed > 0, "the worker that joined mid-map got no work"
        assert len(counts) == len(xs)
        assert set(counts.values()) == {1}


# -- F12: cancellation while the remote function runs -----------------------------------------------------


async def test_f12_cancelling_the_caller_cancels_the_remote_async_task(tmp_path: Path) -> None:
    d = str(tmp_path)
    async with Pool(workers=1) as pool:
        broker = broker_of(pool)
        # TaskFuture.cancel()
        fut = pool.submit(T.async_wait, d, "fut")
        await eventually(lambda: T.markers(d, "started", "fut"), "the task did not start")
        assert fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        await eventually(lambda: T.markers(d, "cancelled", "fut"), "the remote task was not cancelled")
        # A caller task awaiting a map, cancelled.
        caller = asyncio.ensure_future(pool.map(T.async_wait, [d] * 3, ["m0", "m1", "m2"]))
        await eventually(
            lambda: sum(len(T.markers(d, "started", f"m{i}")) for i in range(3)) == 3, "the map did not start"
        )
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await eventually(
            lambda: sum(len(T.markers(d, "cancelled", f"m{i}")) for i in range(3)) == 3,
            "the map's tasks were not cancelled",
        )
        # A caller's timeout around a future.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.submit(T.async_wait, d, "timed"), 0.3 * SCALE)
        await eventually(lambda: T.markers(d, "cancelled", "timed"), "the timed-out task was not cancelled")
        # No leaked ids anywhere; the worker is free for more.
        assert pool._waiting == {}
        assert broker._tasks == {}
        assert pool._link.client.tasks == {}  # type: ignore[union-attr]
        assert broker.stats["cancelled"] == 5
        assert await pool.submit(T.square, 9) == 81


async def test_f12_cancelled_plain_task_late_result_is_dropped(tmp_path: Path) -> None:
    d = str(tmp_path)
    async with Pool(workers=1) as pool:
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        fut = pool.submit(T.block_until_released, d, "late", "late value")
        await eventually(lambda: T.markers(d, "started", "late"), "the task did not start")
        assert fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        (tmp_path / "release-late").touch()
        await eventually(lambda: T.markers(d, "ran", "late"), "the thread did not finish")
        # The next task runs after the late one on the same (single) thread: once its result is
        # here, the late one has been dropped or it would have been delivered before.
        assert await finish(pool.submit(T.identity, "next"), 10 * SCALE, "the next task") == "next"
        assert counts[fut._tid] == 0, "the late result of a cancelled task was delivered"
        assert broker.stats["completed"] == 1
        assert broker.stats["cancelled"] == 1
        assert pool._waiting == {}
        assert broker._tasks == {}


@pytest.mark.both_loops
async def test_f12_cancel_racing_completion_gives_result_or_cancelled_never_both() -> None:
    n = 300
    rng = random.Random(12)
    async with Pool(workers=2) as pool:
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        loop = asyncio.get_running_loop()
        futs = []
        timers = []
        for i in range(n):
            fut = pool.submit(T.identity, i)
            timers.append(loop.call_later(rng.uniform(0, 0.03) * SCALE, fut.cancel))
            futs.append(fut)
        try:
            _done, pending = await asyncio.wait(futs, timeout=20 * SCALE)
        finally:
            for timer in timers:
                timer.cancel()
        assert not pending, f"{len(pending)} futures neither completed nor cancelled"
        cancelled = sum(f.cancelled() for f in futs)
        for i, fut in enumerate(futs):
            if not fut.cancelled():
                assert fut.result() == i
        # Each task either completed or was cancelled at the broker, never both, never neither.
        stats = broker.stats
        assert stats["completed"] + stats["cancelled"] == n, stats
        assert n - cancelled <= stats["completed"]
        assert set(counts.values()) <= {1}
        # A completed future got its one delivery (a cancelled one may have crossed its cancel).
        assert all(counts[f._tid] == 1 for f in futs if not f.cancelled())
        assert pool._waiting == {}
        assert broker._tasks == {}
        assert pool._link.client.tasks == {}  # type: ignore[union-attr]
        # The same race with callers awaiting maps.
        callers = []
        for _ in range(40):
            caller = asyncio.ensure_future(pool.map(T.identity, range(10)))
            timers.append(loop.call_later(rng.uniform(0, 0.03) * SCALE, caller.cancel))
            callers.append(caller)
        try:
            _, pending = await asyncio.wait(callers, timeout=20 * SCALE)
        finally:
            for timer in timers:
                timer.cancel()
        assert not pending, f"{len(pending)} maps neither completed nor cancelled"
        for caller in callers:
            assert caller.cancelled() or caller.result() == list(range(10))
        assert pool._waiting == {}
        assert broker._tasks == {}
        assert pool._link.client.tasks == {}  # type: ignore[union-attr]
        assert broker.stats["completed"] + broker.stats["cancelled"] == broker.stats["submitted"]
        assert await pool.map(T.square, range(4)) == [0, 1, 4, 9]


# -- F13: a user function raises -----------------------------------------------------------------------


async def test_f13_user_exceptions_keep_their_type_and_traceback_and_are_not_retried(
    tmp_path: Path,
) -> None:
    d = str(tmp_path)
    async with Pool(workers=2) as pool:
        broker = broker_of(pool)
        wids = set(broker._workers)
        conns = [w.conn for w in broker._workers.values()]
        with pytest.raises(ValueError, match="bad value in v") as info:
            await finish(pool.submit(T.fail, d, "v", "value"), 10 * SCALE, "a failing task")
        assert type(info.value) is ValueError
        tb = info.value.remote_traceback  # type: ignore[attr-defined]
        assert "_futures_tasks.py" in tb, tb
        assert "in fail" in tb, tb
        assert "ValueError" in tb, tb
        # An exception class that is not registered arrives as RemoteError.
        with pytest.raises(RemoteError) as info2:
            await finish(pool.submit(T.fail, d, "c", "custom"), 10 * SCALE, "a failing task")
        assert info2.value.type_name == "_futures_tasks.CustomError"
        assert "custom failure in c" in str(info2.value)
        assert "CustomError" in info2.value.remote_traceback
        # The map raises the first error and cancels the rest of its tasks.
        with pytest.raises(ValueError, match="task 3 is bad"):
            await finish(
                pool.map(T.async_fail_or_wait, [d] * 6, range(6), [3] * 6), 10 * SCALE, "a failing map"
            )
        await eventually(
            lambda: len(T.markers(d, "cancelled")) == len(T.markers(d, "started")),
            "the map's other tasks were not cancelled",
        )
        assert broker._tasks == {}
        assert pool._waiting == {}
        # Not retried: one execution each (checked after a round trip through both workers).
        assert await pool.map(T.square, range(10)) == [x * x for x in range(10)]
        assert len(T.markers(d, "ran", "v")) == 1
        assert len(T.markers(d, "ran", "c")) == 1
        assert len(T.markers(d, "ran", "bad3")) == 1
        assert broker.stats["requeued"] == 0
        # The workers and their connections stay up.
        assert set(broker._workers) == wids
        assert broker.stats["workers_lost"] == 0
        assert not any(conn.closed for conn in conns)


# -- F14: a result that cannot be serialized ------------------------------------------------------------


async def test_f14_unserializable_result_fails_that_future_only() -> None:
    async with Pool(workers=1) as pool:
        broker = broker_of(pool)
        (worker,) = broker._workers.values()
        results = await finish(
            asyncio.gather(*(pool.submit(T.return_lock, i) for i in range(3)), return_exceptions=True),
            10 * SCALE,
            "the futures",
        )
        assert isinstance(results[0], SerializationError), results
        assert results[1:] == [1, 2]
        with pytest.raises(SerializationError):
            await pool.map(T.return_lock, [1, 0, 2])
        assert list(broker._workers.values()) == [worker]
        assert not worker.conn.closed
        assert broker.stats["workers_lost"] == 0
        assert await pool.map(T.square, range(4)) == [0, 1, 4, 9]


# -- F29: leaving a pool with tasks in flight; Ctrl-C --------------------------------------------------


@pytest.mark.both_loops
async def test_f29_exception_inside_pool_reaps_every_worker_within_the_close_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path)
    close_timeout = 1.0 * SCALE
    loop = asyncio.get_running_loop()
    pool = Pool(workers=3, close_timeout=close_timeout)
    inflight: dict[str, Any] = {}

    async def run() -> None:
        async with pool:
            inflight["pids"] = [p.pid for p in pool._procs.procs]
            inflight["thread"] = pool.submit(T.blocking_sleep, d, "thread", 20.0)  # uninterruptible
            inflight["asyncs"] = [pool.submit(T.async_wait, d, f"async{i}") for i in range(2)]
            inflight["job"] = asyncio.ensure_future(pool.map(T.slow_square, range(100), [0.05] * 100))
            await eventually(lambda: len(T.markers(d, "started")) == 3, "the tasks did not start")
            inflight["t0"] = loop.time()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await run()
    elapsed = loop.time() - inflight["t0"]
    pids, thread, asyncs, job = inflight["pids"], inflight["thread"], inflight["asyncs"], inflight["job"]
    assert all(p.returncode is not None for p in pool._procs.procs)
    assert not any(pid_alive(pid) for pid in pids)
    assert elapsed <= 2 * close_timeout + 0.5 * SCALE, f"closing took {elapsed:.2f} s"
    assert thread.cancelled()
    assert all(f.cancelled() for f in asyncs)
    with pytest.raises(ConnectionClosed):
        await job
    await pool.aclose()  # idempotent
    assert pool.closed
    assert "Task was destroyed" not in caplog.text
    assert "exception was never retrieved" not in caplog.text


async def test_f29_a_second_close_waits_until_the_workers_are_reaped() -> None:
    pool = Pool(workers=2, close_timeout=1.0 * SCALE)
    await pool.start()
    procs = list(pool._procs.procs)
    first = asyncio.ensure_future(pool.aclose())
    await asyncio.sleep(0)  # the first close is under way
    try:
        await finish(pool.aclose(), 10 * SCALE, "the second close")
        # Idempotent means the same outcome: a close that returns has closed the pool.
        assert all(p.returncode is not None for p in procs), "close() returned with workers still running"
    finally:
        await finish(first, 10 * SCALE, "the first close")
    assert all(p.returncode is not None for p in procs)


async def test_f29_cancelled_while_starting_reaps_the_workers_already_started() -> None:
    pool = Pool(workers=3, close_timeout=1.0 * SCALE)
    starting = asyncio.ensure_future(pool.start())
    await eventually(lambda: pool._procs.procs, "no worker process was started", 20)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finish(starting, 10 * SCALE, "the cancelled start")
    assert pool.closed
    assert pool._procs.procs
    assert all(p.returncode is not None for p in pool._procs.procs)
    assert not any(pid_alive(p.pid) for p in pool._procs.procs)


@pytest.mark.parametrize("target", ["process", "group"])
async def test_f29_ctrl_c_with_tasks_in_flight_leaves_no_worker_process(tmp_path: Path, target: str) -> None:
    d = str(tmp_path)
    async with processes() as procs:
        script = await procs.start(sys.executable, str(TASKS), "ctrlc", d, stdout=True, new_session=True)
        assert script.stdout is not None
        assert script.stderr is not None
        line = await finish(script.stdout.readline(), 30 * SCALE, "the script's start")
        pids = json.loads(line)
        assert len(pids) == 2
        await eventually(lambda: len(T.markers(d, "started")) == 2, "the tasks did not start", 20)
        if target == "process":
            os.kill(script.pid, signal.SIGINT)  # only the script: it must stop its workers
        else:
            os.killpg(script.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
        code = await finish(script.wait(), 10 * SCALE, "the interrupted script")
        stderr = (await script.stderr.read()).decode(errors="replace")
        assert code != 0
        await eventually(
            lambda: not any(pid_alive(pid) for pid in pids), "worker processes outlived the script", PROMPT
        )
        for needle in ("Task was destroyed", "Exception ignored", "never retrieved", "Task exception"):
            assert needle not in stderr, stderr


# -- F30 and F31: chaos ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_f30_chaos_killing_random_workers_during_a_reduction() -> None:
    xs = list(range(500))
    rng = random.Random(30)
    kills = 0
    async with Pool(workers=4, allowed_failures=1000) as pool, processes() as procs:
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        assert pool.secret is not None
        assert pool.address is not None
        address, key = pool.address, pool.secret

        async def chaos() -> None:
            nonlocal kills
            while True:
                await asyncio.sleep(rng.expovariate(1 / (0.5 * SCALE)))
                alive = list(broker._workers.values())
                if alive:
                    os.kill(rng.choice(alive).pid, signal.SIGKILL)
                    kills += 1
                await procs.worker(address, key)  # a replacement

        killer = asyncio.ensure_future(chaos())
        try:
            total = await finish(
                pool.map_reduce(T.slow_square, operator.add, xs, [0.02] * len(xs)),
                50 * SCALE,
                "the reduction",
            )
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
        assert total == sum(x * x for x in xs)
        assert kills >= 2, "the chaos did not strike"
        assert set(counts.values()) == {1}
        assert broker.stats["workers_lost"] >= kills - 1


async def test_f31_random_connection_aborts_during_a_map() -> None:
    xs = list(range(300))
    rng = random.Random(31)
    aborts = 0
    async with Pool(workers=3) as pool, processes() as procs:
        broker = broker_of(pool)
        counts = count_deliveries(pool)
        assert pool.secret is not None
        assert pool.address is not None
        address, key = pool.address, pool.secret

        async def chaos() -> None:
            nonlocal aborts
            while True:
                await asyncio.sleep(0.5 * SCALE)
                alive = list(broker._workers.values())
                if alive:
                    rng.choice(alive).conn.abort()
                    aborts += 1
                # A worker whose broker connection ends exits (F7): start a replacement.
                await procs.worker(address, key)

        killer = asyncio.ensure_future(chaos())
        try:
            results = await finish(pool.map(T.slow_square, xs, [0.02] * len(xs)), 40 * SCALE, "the map")
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
        assert results == [x * x for x in xs]
        assert aborts >= 2, "no connection was aborted"
        assert len(counts) == len(xs)
        assert set(counts.values()) == {1}
