"""MapReduce fault scenarios (RELIABILITY.md F20-F23) on a real cluster.

A master (in this process, or ``python -m asyncdist master`` where the test
kills it) and ``python -m asyncdist slave`` processes with their own data
directories under ``tmp_path``, killed by PID (SIGKILL, SIGSTOP/SIGCONT) at
the moment a map or reduce function reports, with a marker file, that it is
running on them (it blocks on a release file meanwhile; see ``hold`` in
``test_mapreduce.py``). The tests wait on markers and the master's status,
never on fixed sleeps, and compare every faulty run with a fault-free
(golden) run of the same job, byte for byte. Every process is reaped in a
``finally``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE, alive, eventually, free_port
from test_mapreduce import claimed, descendants, finish, hold, mark, marker_ppid, markers

from asyncdist.connection import connect
from asyncdist.errors import AsyncDistError, MasterLost
from asyncdist.mapreduce import Job, Master, Results, default_partition, kvgroup, result_iterator

SECRET = "mapreduce-faults-secret-0123456789abcdef"
#: Short heartbeats (scaled) for the slaves, the master and the clients.
HB = {"heartbeat_interval": 0.2 * SCALE, "heartbeat_timeout": 1.0 * SCALE}
HB_OPTIONS = [f"{name}={value}" for name, value in HB.items()]
#: When a frozen peer is declared dead at the latest (two ticks of slack).
HB_BOUND = HB["heartbeat_timeout"] + 2 * HB["heartbeat_interval"] + 0.5 * SCALE
#: A killed process closes its sockets at once: no timer is involved.
PROMPT = 3.0 * SCALE
#: How long a blocked function waits for its release file (the tests release it long before).
HOLD = 30 * SCALE

VOCABULARY = [f"w{i:03d}" for i in range(300)]


# -- functions the slaves run ---------------------------------------------------------------------


def fault_map(line: str, params: Any) -> Iterator[tuple[str, int]]:
    """Word count; the line ``#src NAME`` marks ``mapNAME`` (and blocks, if asked, the first time)."""
    if line.startswith("#src "):
        name = "map" + line.split()[1]
        mark(params["dir"], name)
        if name in params.get("block", ()):
            hold(params["dir"], name, HOLD)
        return
    for word in line.split():
        yield word, 1


def fault_reduce(pairs: Any, params: Any) -> Iterator[tuple[str, int]]:
    """Sum per word; the key ``params["block_key"]`` marks ``reduce`` and blocks the first time."""
    for word, counts in kvgroup(pairs):
        if word == params.get("block_key"):
            mark(params["dir"], "reduce")
            hold(params["dir"], "reduce", HOLD)
        yield word, sum(counts)


# -- the cluster ---------------------------------------------------------------------------------


def make_inputs(n: int, lines: int = 40) -> tuple[list[str], collections.Counter[str]]:
    """``n`` raw:// sources (``#src i`` first) of words, and their word count."""
    inputs, expected = [], collections.Counter[str]()
    for i in range(n):
        rows = [
            " ".join(VOCABULARY[(i * 7 + j * 13 + k * 31) % len(VOCABULARY)] for k in range(9))
            for j in range(lines)
        ]
        expected.update(" ".join(rows).split())
        inputs.append("raw://" + "\n".join([f"#src {i}", *rows]))
    return inputs, expected


def python_env(**extra: str) -> dict[str, str]:
    """Our environment and sys.path (the slaves' workers import this module by name)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env.update(extra)
    return env


@dataclass
class SlaveProc:
    proc: asyncio.subprocess.Process
    id: str
    address: tuple[str, int]
    data_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Cluster:
    """A master and slave processes; everything started is stopped and reaped by :meth:`aclose`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.master: Master | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.slaves: list[SlaveProc] = []
        self.procs: list[asyncio.subprocess.Process] = []
        self.jobs: list[Job] = []

    async def start_master(self) -> None:
        self.master = await Master.start("127.0.0.1", 0, secret=SECRET, **HB)
        self.address = self.master.address

    async def master_process(self, port: int) -> asyncio.subprocess.Process:
        """``python -m asyncdist master --port PORT`` (secret from ASYNCDIST_SECRET)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncdist", "master", "--port", str(port),
            *[arg for option in HB_OPTIONS for arg in ("--option", option)],
            stdout=asyncio.subprocess.PIPE, env=python_env(ASYNCDIST_SECRET=SECRET),
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await finish(proc.stdout.readline(), 30, "the master's start")
        assert line.decode().strip().endswith(f"listening on 127.0.0.1:{port}"), line
        self.address = ("127.0.0.1", port)
        return proc

    async def add_slaves(self, n: int, names: list[str] | None = None, workers: int = 1) -> list[SlaveProc]:
        names = names or [f"slave{len(self.slaves) + i}" for i in range(n)]
        return list(await asyncio.gather(*(self._slave(name, workers) for name in names)))

    async def _slave(self, name: str, workers: int) -> SlaveProc:
        data_dir = self.root / name
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncdist", "slave", "--master", f"{self.address[0]}:{self.address[1]}",
            "--data-dir", str(data_dir), "--workers", str(workers), "--secret-stdin",
            *[arg for option in HB_OPTIONS for arg in ("--option", option)],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=python_env(),
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(SECRET.encode() + b"\n")
        await proc.stdin.drain()
        line = (await finish(proc.stdout.readline(), 30, "a slave's start")).decode()
        found = re.match(r"asyncdist slave (\w+) serving (.+) at ([\d.]+):(\d+)$", line.strip())
        assert found, f"unexpected slave banner {line!r}"
        slave = SlaveProc(proc, found[1], (found[3], int(found[4])), data_dir)
        self.slaves.append(slave)
        return slave

    def by_pid(self, pid: int) -> SlaveProc:
        return next(s for s in self.slaves if s.pid == pid)

    def live_ids(self) -> set[str]:
        assert self.master is not None
        return {s["id"] for s in self.master.status()["slaves"]}

    def progress(self, job: Job) -> dict[str, list[int]]:
        assert self.master is not None
        assert job.id is not None
        progress: dict[str, list[int]] = self.master.status()["jobs"][job.id]
        return progress

    def job(self, name: str) -> Job:
        job = Job(name, master=f"{self.address[0]}:{self.address[1]}", secret=SECRET, **HB)
        self.jobs.append(job)
        return job

    async def run(self, name: str, params: dict[str, Any], **kwargs: Any) -> tuple[Job, Results]:
        job = await self.job(name).run(map=fault_map, reduce=fault_reduce, params=params, **kwargs)
        return job, await finish(job.wait(), 30, f"job {name}")

    async def aclose(self) -> None:
        (self.root / "release-all").touch()  # nothing stays blocked
        for job in self.jobs:
            with contextlib.suppress(Exception):
                await job.close()
        if self.master is not None:
            await self.master.aclose()  # its slaves leave when their connection closes
        for proc in self.procs:
            if proc.returncode is None:  # a master process, or a slave that did not leave yet
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGTERM)
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10 * SCALE)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.read()
        await asyncio.sleep(0)  # let the pipe transports close


@contextlib.asynccontextmanager
async def cluster(root: Path, slaves: int = 2, workers: int = 1) -> AsyncIterator[Cluster]:
    c = Cluster(root)
    try:
        await c.start_master()
        await c.add_slaves(slaves, workers=workers)
        assert c.master is not None
        await finish(c.master.wait_for_slaves(slaves), 30, "the slaves joining")
        yield c
    finally:
        await c.aclose()


async def result_bytes(results: Results) -> list[bytes]:
    """The raw bytes of every result partition, fetched from the slave that holds it."""
    out = []
    for (host, port), path in results:
        async with connect(host, port, secret=SECRET) as conn:
            out.append(b"".join([chunk async for chunk in conn.stream("mr.fetch", path)]))
    return out


async def pairs_of(results: Results) -> list[tuple[Any, Any]]:
    return [kv async for kv in result_iterator(results)]


def visible_partials(*dirs: Path) -> list[Path]:
    """Files under ``dirs`` that are temporary or partial (never to be visible as output)."""
    return [
        p for d in dirs if d.exists() for p in d.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")
    ]


def job_files(slave: SlaveProc, job: Job) -> list[Path]:
    assert job.id is not None
    return sorted((slave.data_dir / job.id).rglob("*"))


async def check_golden(
    c: Cluster, job: Job, results: Results, golden: list[bytes], expected: collections.Counter[str]
) -> None:
    got = await pairs_of(results)
    assert dict(got) == expected
    assert len(got) == len(expected), "a key came out twice"
    assert await result_bytes(results) == golden, "the output differs from the fault-free run"


# -- the slave's worker processes ---------------------------------------------------------------------


async def test_a_slave_with_workers_runs_that_many_tasks_at_once_in_processes_of_its_own(
    tmp_path: Path,
) -> None:
    inputs, expected = make_inputs(3)
    async with cluster(tmp_path, slaves=1, workers=2) as c:
        (slave,) = c.slaves
        assert c.master is not None
        assert c.master.status()["slaves"] == [
            {"id": slave.id, "address": list(slave.address), "workers": 2, "running": 0}
        ]
        job = await c.job("workers").run(
            input=inputs,
            map=fault_map,
            reduce=fault_reduce,
            params={"dir": str(tmp_path), "block": ["map0", "map1"]},
        )
        waiter = asyncio.ensure_future(job.wait())
        try:
            await eventually(
                lambda: claimed(tmp_path, "map0") and claimed(tmp_path, "map1"), "two maps at once", 20
            )
            (pid0, ppid0), (pid1, ppid1) = (
                claimed(tmp_path, "map0") or (0, 0),
                claimed(tmp_path, "map1") or (0, 0),
            )
            assert ppid0 == ppid1 == slave.pid
            assert pid0 != pid1
            assert c.master.status()["slaves"][0]["running"] == 2
            assert markers(tmp_path, "map2") == [], "a third task started with two workers busy"
            (tmp_path / "release-all").touch()
            results = await finish(waiter, 30, "the job")
        finally:
            waiter.cancel()
        assert dict(await pairs_of(results)) == expected


# -- F20: a slave SIGKILLed during map --------------------------------------------------------------


async def test_f20_slave_killed_during_map_reruns_its_map_elsewhere(tmp_path: Path) -> None:
    inputs, expected = make_inputs(6)
    async with cluster(tmp_path) as c:
        golden_job, golden_results = await c.run("golden", {"dir": str(tmp_path)}, input=inputs, partitions=2)
        golden = await result_bytes(golden_results)
        marks = tmp_path / "marks"
        marks.mkdir()
        job = await c.job("f20").run(
            input=inputs, map=fault_map, reduce=fault_reduce, partitions=2,
            params={"dir": str(marks), "block": ["map0"]},
        )  # fmt: skip
        waiter = asyncio.ensure_future(job.wait())
        try:
            await eventually(lambda: claimed(marks, "map0"), "the map did not start", 20)
            worker, victim_pid = claimed(marks, "map0") or (0, 0)
            victim = c.by_pid(victim_pid)
            survivor = next(s for s in c.slaves if s is not victim)
            os.kill(victim.pid, signal.SIGKILL)
            await eventually(lambda: victim.id not in c.live_ids(), "the master kept the dead slave", PROMPT)
            results = await finish(waiter, 30, "the job after the kill")
        finally:
            waiter.cancel()
        assert victim.proc.returncode == -signal.SIGKILL or await victim.proc.wait() == -signal.SIGKILL
        await eventually(lambda: not alive(worker), "the dead slave's worker process lives on", PROMPT)
        # The map ran again, on the other slave; the result is the fault-free one.
        runs = markers(marks, "map0")
        assert [marker_ppid(m) for m in runs] == [victim.pid, survivor.pid]
        assert all(tuple(location) == survivor.address for location, _ in results)
        await check_golden(c, job, results, golden, expected)
        # Nothing partial is visible: the killed attempt wrote no partition file; no temp files.
        assert job.id is not None
        assert not list((victim.data_dir / job.id).glob("map-0-*/part-*"))
        assert visible_partials(survivor.data_dir) == []
        await job.purge()
        await golden_job.purge()
        assert job_files(survivor, job) == []
        assert job_files(survivor, golden_job) == []


# -- F21: a slave killed after its maps, before the reducers fetched them ------------------------------


async def test_f21_slave_killed_after_its_maps_before_reducers_fetched_reruns_them(tmp_path: Path) -> None:
    inputs, expected = make_inputs(5)
    async with cluster(tmp_path) as c:
        _, golden_results = await c.run("golden", {"dir": str(tmp_path)}, input=inputs)
        golden = await result_bytes(golden_results)
        marks = tmp_path / "marks"
        marks.mkdir()
        # Map 0 blocks on one slave; the other slave runs maps 1-4, and no reduce can start.
        job = await c.job("f21").run(
            input=inputs, map=fault_map, reduce=fault_reduce, params={"dir": str(marks), "block": ["map0"]}
        )
        waiter = asyncio.ensure_future(job.wait())
        try:
            await eventually(
                lambda: claimed(marks, "map0") and c.progress(job)["map"] == [4, 5],
                "the other maps did not finish",
                20,
            )
            assert c.progress(job)["reduce"] == [0, 1]
            blocked = c.by_pid((claimed(marks, "map0") or (0, 0))[1])
            victim = next(s for s in c.slaves if s is not blocked)
            assert {marker_ppid(m) for i in range(1, 5) for m in markers(marks, f"map{i}")} == {victim.pid}
            os.kill(victim.pid, signal.SIGKILL)
            await eventually(lambda: victim.id not in c.live_ids(), "the master kept the dead slave", PROMPT)
            # Its finished map outputs are lost with it: those maps are to run again.
            await eventually(
                lambda: c.progress(job)["map"] == [0, 5], "the lost maps were not requeued", PROMPT
            )
            (marks / "release-map0").touch()
            results = await finish(waiter, 30, "the job after the kill")
        finally:
            waiter.cancel()
        await victim.proc.wait()
        for i in range(1, 5):
            assert [marker_ppid(m) for m in markers(marks, f"map{i}")] == [victim.pid, blocked.pid]
        assert all(tuple(location) == blocked.address for location, _ in results)
        await check_golden(c, job, results, golden, expected)
        assert visible_partials(blocked.data_dir) == []


# -- F22: a slave killed during reduce --------------------------------------------------------------


async def test_f22_slave_killed_during_reduce_reruns_the_reduce(tmp_path: Path) -> None:
    inputs, expected = make_inputs(4)
    block_key = VOCABULARY[5]
    partition = default_partition(block_key, 2)
    async with cluster(tmp_path) as c:
        _, golden_results = await c.run("golden", {"dir": str(tmp_path)}, input=inputs, partitions=2)
        golden = await result_bytes(golden_results)
        marks = tmp_path / "marks"
        marks.mkdir()
        job = await c.job("f22").run(
            input=inputs, map=fault_map, reduce=fault_reduce, partitions=2,
            params={"dir": str(marks), "block_key": block_key},
        )  # fmt: skip
        waiter = asyncio.ensure_future(job.wait())
        try:
            await eventually(lambda: claimed(marks, "reduce"), "the reduce did not start", 20)
            assert c.progress(job)["map"] == [4, 4]
            worker, victim_pid = claimed(marks, "reduce") or (0, 0)
            victim = c.by_pid(victim_pid)
            survivor = next(s for s in c.slaves if s is not victim)
            os.kill(victim.pid, signal.SIGKILL)
            await eventually(lambda: victim.id not in c.live_ids(), "the master kept the dead slave", PROMPT)
            results = await finish(waiter, 30, "the job after the kill")
        finally:
            waiter.cancel()
        await victim.proc.wait()
        await eventually(lambda: not alive(worker), "the dead slave's worker process lives on", PROMPT)
        assert [marker_ppid(m) for m in markers(marks, "reduce")] == [victim.pid, survivor.pid]
        assert all(tuple(location) == survivor.address for location, _ in results)
        await check_golden(c, job, results, golden, expected)
        # The killed attempt committed nothing: its partition's result is not visible on the dead slave.
        assert job.id is not None
        committed = [p.name for p in (victim.data_dir / job.id).glob(f"result-{partition}-*")]
        assert not [n for n in committed if re.fullmatch(rf"result-{partition}-\d+", n)], committed
        assert visible_partials(survivor.data_dir) == []


async def test_f22_late_commit_of_a_frozen_slaves_reduce_is_ignored(tmp_path: Path) -> None:
    inputs, expected = make_inputs(4)
    block_key = VOCABULARY[5]
    partition = default_partition(block_key, 2)
    async with cluster(tmp_path) as c:
        _, golden_results = await c.run("golden", {"dir": str(tmp_path)}, input=inputs, partitions=2)
        golden = await result_bytes(golden_results)
        marks = tmp_path / "marks"
        marks.mkdir()
        job = await c.job("late").run(
            input=inputs, map=fault_map, reduce=fault_reduce, partitions=2,
            params={"dir": str(marks), "block_key": block_key},
        )  # fmt: skip
        waiter = asyncio.ensure_future(job.wait())
        loop = asyncio.get_running_loop()
        try:
            await eventually(lambda: claimed(marks, "reduce"), "the reduce did not start", 20)
            _, victim_pid = claimed(marks, "reduce") or (0, 0)
            victim = c.by_pid(victim_pid)
            survivor = next(s for s in c.slaves if s is not victim)
            os.kill(victim.pid, signal.SIGSTOP)  # the slave freezes; its worker goes on
            t0 = loop.time()
            await eventually(
                lambda: victim.id not in c.live_ids(), "the frozen slave was not declared dead", HB_BOUND + 2
            )
            assert loop.time() - t0 <= HB_BOUND
            results = await finish(waiter, 30, "the job without the frozen slave")
            assert all(tuple(location) == survivor.address for location, _ in results)
            await check_golden(c, job, results, golden, expected)
            # The zombie attempt now finishes and commits its result file on the frozen slave ...
            assert job.id is not None
            late = victim.data_dir / job.id

            def zombie_committed() -> bool:
                return any(re.fullmatch(rf"result-{partition}-\d+", p.name) for p in late.glob("result-*"))

            (marks / "release-reduce").touch()
            await eventually(zombie_committed, "the zombie reduce did not finish", 10)
        finally:
            waiter.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGCONT)
        # ... and wakes up: its commit is not taken, it leaves, and removes the job's files.
        code = await finish(victim.proc.wait(), 10, "the zombie slave's exit")
        assert code == 0
        assert not late.exists()
        assert await job.wait() is results
        assert all(tuple(location) == survivor.address for location, _ in results)
        assert c.progress(job) == {"name": "late", "state": "done", "map": [4, 4], "reduce": [2, 2]}
        await check_golden(c, job, results, golden, expected)
        assert [marker_ppid(m) for m in markers(marks, "reduce")] == [victim.pid, survivor.pid]


# -- results lost with their slave ------------------------------------------------------------------


async def test_results_lost_with_their_slave_fail_readers_and_chained_jobs_instead_of_hanging(
    tmp_path: Path,
) -> None:
    inputs, expected = make_inputs(4)
    async with cluster(tmp_path) as c:
        _, results = await c.run("first", {"dir": str(tmp_path)}, input=inputs, partitions=4)
        assert dict(await pairs_of(results)) == expected
        holder = next(s for s in c.slaves if any(tuple(loc) == s.address for loc, _ in results))
        lost = Results([loc for loc in results if tuple(loc[0]) == holder.address], results.options)
        os.kill(holder.pid, signal.SIGKILL)
        await eventually(lambda: holder.id not in c.live_ids(), "the master kept the dead slave", PROMPT)
        with pytest.raises((AsyncDistError, OSError)):
            await finish(pairs_of(lost), PROMPT, "reading results of a dead slave")
        chained = await c.job("chained").run(
            input=lost, map=fault_map, reduce=fault_reduce, params={"dir": str(tmp_path)}, max_attempts=1
        )
        with pytest.raises((AsyncDistError, OSError)) as info:
            await finish(chained.wait(), 20, "a job on results of a dead slave")
        assert "fetch" in str(info.value)
        await chained.purge()


# -- F23: the master killed --------------------------------------------------------------------------


async def test_f23_master_lost_fails_wait_within_the_heartbeat_bound_and_a_rerun_gives_golden(
    tmp_path: Path,
) -> None:
    inputs, expected = make_inputs(4)
    c = Cluster(tmp_path)
    try:
        master = await c.master_process(free_port())
        slaves = await c.add_slaves(2)
        golden_job = c.job("golden")
        await golden_job.run(input=inputs, map=fault_map, reduce=fault_reduce, params={"dir": str(tmp_path)})
        golden = await result_bytes(await finish(golden_job.wait(), 30, "the golden job"))
        await golden_job.purge()
        marks = tmp_path / "marks"
        marks.mkdir()
        job = c.job("f23")
        await job.run(
            input=inputs, map=fault_map, reduce=fault_reduce, params={"dir": str(marks), "block": ["map0"]}
        )
        waiter = asyncio.ensure_future(job.wait())
        loop = asyncio.get_running_loop()
        try:
            await eventually(lambda: claimed(marks, "map0"), "the map did not start", 20)
            under = [d for s in slaves for d in descendants(s.pid)]
            os.kill(master.pid, signal.SIGSTOP)  # frozen: only the heartbeat can tell
            t0 = loop.time()
            with pytest.raises(MasterLost):
                await finish(waiter, HB_BOUND + 5, "wait() with a frozen master")
            assert loop.time() - t0 <= HB_BOUND
        finally:
            waiter.cancel()
            os.kill(master.pid, signal.SIGKILL)
        await master.wait()
        # The slaves notice, finish (the blocked map is let go) and exit cleanly, leaving no files.
        (marks / "release-map0").touch()
        for slave in slaves:
            assert await finish(slave.proc.wait(), 10, "a slave's exit after its master died") == 0
            assert list(slave.data_dir.rglob("*")) == [], "the slave left files behind"
        await eventually(
            lambda: not [p for p in under if alive(p)], "the slaves' workers outlived them", PROMPT
        )
        # A new master and new slaves on the same directories: the job gives the golden output.
        await c.master_process(free_port())
        await c.add_slaves(2, names=[s.data_dir.name for s in slaves])
        rerun = c.job("rerun")
        await rerun.run(input=inputs, map=fault_map, reduce=fault_reduce, params={"dir": str(marks)})
        results = await finish(rerun.wait(), 30, "the job on the new master")
        assert dict(await pairs_of(results)) == expected
        assert await result_bytes(results) == golden
    finally:
        await c.aclose()


async def test_f23_a_slave_in_the_middle_of_a_long_task_exits_when_its_master_dies(tmp_path: Path) -> None:
    inputs, _ = make_inputs(2)
    c = Cluster(tmp_path)
    try:
        master = await c.master_process(free_port())
        slaves = await c.add_slaves(2)
        job = c.job("stuck")
        await job.run(
            input=inputs, map=fault_map, reduce=fault_reduce, params={"dir": str(tmp_path), "block": ["map0"]}
        )
        waiter = asyncio.ensure_future(job.wait())
        try:
            await eventually(lambda: claimed(tmp_path, "map0"), "the map did not start", 20)
            worker, ppid = claimed(tmp_path, "map0") or (0, 0)
            stuck = c.by_pid(ppid)
            os.kill(master.pid, signal.SIGKILL)
            with pytest.raises(MasterLost):
                await finish(waiter, PROMPT, "wait() after the master died")
        finally:
            waiter.cancel()
        await master.wait()
        idle = next(s for s in slaves if s is not stuck)
        assert await finish(idle.proc.wait(), 10, "the idle slave's exit") == 0
        # The slave running the (30 s) map stops it and exits too, in a bounded time.
        assert await finish(stuck.proc.wait(), 10, "the busy slave's exit") == 0
        assert not alive(worker)
    finally:
        await c.aclose()
