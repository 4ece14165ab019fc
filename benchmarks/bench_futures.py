"""Futures benchmark: asyncdist.Pool against multiprocessing, ProcessPoolExecutor and dask.distributed.

Every peer has 2 worker processes and is measured in the same run, each in
its own subprocess (a *family* below), after its pool has started and been
warmed up; pool start-up is reported but not counted. Four measurements:

(a) 10,000 no-op tasks through one map call: tasks/s and wall ms;
(b) 500 sequential submit-and-wait calls of the no-op: median and p90 latency in us;
(c) the seed's workload: 1,000 tasks, each ``time.sleep(0.01)`` then ``sum(input)``,
    inputs ``[[a] * a for a in range(1000)]``, results reduced with ``+``: wall time,
    and overhead over the ideal ``1000 * 10 ms / 2 workers = 5.0 s``;
(d) the seed's Monte Carlo pi: 2,000 tasks counting which of 1,000 random points
    fall in the unit disk each: wall time.

Families and the rows they fill (``--only`` takes family names or prefixes):

asyncdist        asyncdist.Pool(workers=2): broker in this process, 2 worker processes
                 "asyncdist": (a) pool.map, (b) await pool.submit, (c) pool.map_reduce(simulate,
                 operator.add, data), (d) sum(await pool.map); "asyncdist map": (c) sum(await pool.map)
multiprocessing  multiprocessing.Pool(2) (default start method)
                 "mp.Pool chunksize=1": (a) Pool.map(chunksize=1), (b) Pool.apply;
                 "mp.Pool default chunks": (a) (c) (d) Pool.map with its default chunksize
ppe              concurrent.futures.ProcessPoolExecutor(2)
                 "ProcessPoolExecutor": (a) (c) (d) executor.map (chunksize=1), (b) submit().result();
                 "PPE chunks like Pool": (a) (d) executor.map with Pool's default chunksize
dask             dask.distributed LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
                 "dask.distributed": (a) (d) client.gather(client.map(...)), (b) client.submit().result(),
                 (c) client.submit(sum, client.map(...)).result(); tasks with pure=False

Each figure is the best of up to ``--repeat`` runs (default 3) after one
unmeasured warm-up run: another run starts only while the measurement has
used less than ``--budget`` seconds (default 12), so a slow peer (dask's (a),
everyone's (c)) runs fewer times. Every run is in the JSON. Ratios of
asyncdist against the peers are printed next to their targets; the last line
of stdout is one JSON object with every figure.

Run from the repository root::

    .venv/bin/python benchmarks/bench_futures.py                # about 2 minutes
    .venv/bin/python benchmarks/bench_futures.py --pin 0        # everything, workers too, on CPU 0
    .venv/bin/python benchmarks/bench_futures.py --quick        # smoke test, (c) with 100 tasks
    .venv/bin/python benchmarks/bench_futures.py --only asyncdist,multi --measure a,b
    # one family in this process, e.g. to profile it (prints its JSON result):
    .venv/bin/python benchmarks/bench_futures.py --child asyncdist --measure a
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import logging
import math
import operator
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from random import random
from types import ModuleType
from typing import Any

from _harness import (
    by_name,
    emit_json,
    exit_on_sigterm,
    exit_when_parent_exits,
    fmt_met,
    fmt_number,
    format_table,
    format_versions,
    mode_line,
    parse_measures,
    pin_to_cpu,
    requires,
    select_names,
    versions,
)

#: Packages whose versions each report names.
VERSIONS_OF = ("asyncdist", "uvloop", "msgpack", "cloudpickle", "distributed")

WORKERS = 2
MEASURES = ("a", "b", "c", "d")
SLEEP = 0.01  # (c): seconds each task sleeps
POINTS = 1000  # (d): random points per task


# -- the tasks (imported by the workers from this module, by reference) ------------------------


def noop(x: Any = None) -> Any:
    return x


def simulate(input_data: list[int]) -> int:
    """The seed's ``simulateWorkload``: 10 ms of "work", then the sum of the input."""
    time.sleep(SLEEP)
    return sum(input_data)


def points_in_circle(attempts: int) -> int:
    """Count how many of ``attempts`` random points of the unit square fall in the unit disk.

    The same as ``evaluate_points_in_circle`` in examples/pi.py.
    """
    inside = 0
    for _ in range(attempts):
        x, y = random(), random()
        if math.sqrt(x * x + y * y) < 1:
            inside += 1
    return inside


def _tasks() -> ModuleType:
    """This file as the module ``bench_futures`` (not ``__main__``): its functions then travel by
    reference to every peer's workers (the folder is on sys.path, which workers inherit)."""
    return importlib.import_module("bench_futures")


def pool_chunksize(n: int, workers: int = WORKERS) -> int:
    """multiprocessing.Pool.map's default chunksize."""
    chunksize, extra = divmod(n, workers * 4)
    return chunksize + 1 if extra else chunksize


# -- settings and results ------------------------------------------------------------------------

clock = time.perf_counter


@dataclass(frozen=True)
class Settings:
    n_a: int
    n_b: int
    n_c: int
    n_d: int
    repeat: int
    budget: float
    measures: frozenset[str]
    quick: bool

    @property
    def ideal_c(self) -> float:
        return self.n_c * SLEEP / WORKERS

    def argv(self) -> list[str]:
        """Command-line options that recreate these settings in a child."""
        out = ["--repeat", str(self.repeat), "--budget", repr(self.budget)]
        out += ["--measure", ",".join(sorted(self.measures))]
        return out + (["--quick"] if self.quick else [])


def make_settings(
    quick: bool, repeat: int | None, budget: float | None, measures: frozenset[str]
) -> Settings:
    n_a, n_b, n_c, n_d = (1000, 100, 100, 200) if quick else (10_000, 500, 1000, 2000)
    return Settings(
        n_a,
        n_b,
        n_c,
        n_d,
        repeat=repeat if repeat is not None else (1 if quick else 3),
        budget=budget if budget is not None else (3.0 if quick else 12.0),
        measures=measures,
        quick=quick,
    )


@dataclass
class Row:
    """One line of the table: an implementation and how it was called (None: not measured)."""

    family: str
    how: str = ""
    a_tasks_per_s: float | None = None
    a_wall_ms: float | None = None
    b_median_us: float | None = None
    b_p90_us: float | None = None
    c_wall_s: float | None = None
    c_overhead_pct: float | None = None
    d_wall_s: float | None = None
    #: Every run of each figure (the figure is the best).
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class FamilyResult:
    family: str
    start_s: float | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, Row] = field(default_factory=dict)

    def row(self, name: str, how: str) -> Row:
        if name not in self.rows:
            self.rows[name] = Row(self.family, how)
        return self.rows[name]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def record_wall(row: Row, part: str, times: list[float], n: int, s: Settings) -> None:
    """Store the best of ``times`` (seconds of one run of ``n`` tasks) as part ``part``'s figures."""
    best = min(times)
    if part == "a":
        row.a_wall_ms = best * 1e3
        row.a_tasks_per_s = n / best
        row.runs["a_wall_ms"] = [round(t * 1e3, 2) for t in times]
    elif part == "c":
        row.c_wall_s = best
        row.c_overhead_pct = (best / s.ideal_c - 1) * 100
        row.runs["c_wall_s"] = [round(t, 4) for t in times]
    elif part == "d":
        row.d_wall_s = best
        row.runs["d_wall_s"] = [round(t, 4) for t in times]
    else:
        raise ValueError(part)
    _progress(f"  {part}: {', '.join(f'{t * 1e3:,.1f}' for t in times)} ms  ({n:,} tasks)")


def record_latency(row: Row, runs: list[list[float]]) -> None:
    """Store the run with the lowest median latency (each run: seconds per call)."""
    medians = [statistics.median(r) for r in runs]
    best = runs[medians.index(min(medians))]
    row.b_median_us = statistics.median(best) * 1e6
    row.b_p90_us = statistics.quantiles(best, n=10)[-1] * 1e6
    row.runs["b_median_us"] = [round(m * 1e6, 1) for m in medians]
    _progress(f"  b: medians {', '.join(f'{m * 1e6:,.0f}' for m in medians)} us  ({len(best)} calls)")


def repeat_runs(one: Callable[[], float], s: Settings) -> list[float]:
    """Run ``one()`` (returns its seconds) up to ``s.repeat`` times while within ``s.budget``."""
    times: list[float] = []
    started = clock()
    for _ in range(s.repeat):
        gc.collect()
        times.append(one())
        if clock() - started + times[-1] > s.budget:
            break
    return times


async def arepeat_runs(one: Callable[[], Awaitable[float]], s: Settings) -> list[float]:
    """Async :func:`repeat_runs`."""
    times: list[float] = []
    started = clock()
    for _ in range(s.repeat):
        gc.collect()
        times.append(await one())
        if clock() - started + times[-1] > s.budget:
            break
    return times


def latency_runs(call: Callable[[], object], n: int, s: Settings) -> list[list[float]]:
    """``s.repeat`` runs (within the budget) of ``n`` timed calls, after 10% unmeasured."""
    for _ in range(max(10, n // 10)):
        call()
    runs: list[list[float]] = []
    started = clock()
    for _ in range(s.repeat):
        gc.collect()
        lat = []
        for _ in range(n):
            t0 = clock()
            call()
            lat.append(clock() - t0)
        runs.append(lat)
        if (clock() - started) * (len(runs) + 1) / len(runs) > s.budget:
            break
    return runs


async def alatency_runs(call: Callable[[], Awaitable[object]], n: int, s: Settings) -> list[list[float]]:
    """Async :func:`latency_runs`."""
    for _ in range(max(10, n // 10)):
        await call()
    runs: list[list[float]] = []
    started = clock()
    for _ in range(s.repeat):
        gc.collect()
        lat = []
        for _ in range(n):
            t0 = clock()
            await call()
            lat.append(clock() - t0)
        runs.append(lat)
        if (clock() - started) * (len(runs) + 1) / len(runs) > s.budget:
            break
    return runs


def c_data(n: int) -> list[list[int]]:
    return [[a] * a for a in range(n)]


def c_expected(n: int) -> int:
    return sum(a * a for a in range(n))


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"wrong result: {what}")


def check_pi(total: int, n: int) -> None:
    pi = 4.0 * total / (n * POINTS)
    check(abs(pi - math.pi) < 0.05, f"pi estimate {pi}")


def _guard(row: Row, part: str, fn: Callable[[], None]) -> None:
    """Run one measurement; a failure is noted in the row, the others still run."""
    try:
        fn()
    except Exception as exc:
        row.errors[part] = f"{type(exc).__name__}: {exc}"
        _progress(f"  {part}: FAILED {row.errors[part]}")


async def _aguard(row: Row, part: str, fn: Callable[[], Awaitable[None]]) -> None:
    try:
        await fn()
    except Exception as exc:
        row.errors[part] = f"{type(exc).__name__}: {exc}"
        _progress(f"  {part}: FAILED {row.errors[part]}")


# -- asyncdist -----------------------------------------------------------------------------------


async def _asyncdist_family(s: Settings, out: FamilyResult) -> None:
    import asyncdist

    t = _tasks()
    loop = asyncio.get_running_loop()
    out.info["loop"] = type(loop).__module__.split(".")[0]
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)  # unwind through `async with pool`
    started = clock()
    # nice=0: the peers' workers run at this process's priority, so asyncdist's do too here
    # (a Pool's default, nice 10, is for services embedding one: see bench_web.py).
    async with asyncdist.Pool(workers=WORKERS, nice=0) as pool:
        check(await pool.map(t.noop, range(100)) == list(range(100)), "warm-up")
        out.start_s = clock() - started
        row = out.row("asyncdist", "a: pool.map; b: await pool.submit; c: pool.map_reduce; d: pool.map + sum")

        if "a" in s.measures:

            async def map_noop(n: int) -> float:
                t0 = clock()
                ys = await pool.map(t.noop, range(n))
                elapsed = clock() - t0
                check(ys == list(range(n)), "map(noop)")
                return elapsed

            async def measure_a() -> None:
                await map_noop(min(s.n_a, 2000))
                record_wall(row, "a", await arepeat_runs(lambda: map_noop(s.n_a), s), s.n_a, s)

            await _aguard(row, "a", measure_a)

        if "b" in s.measures:

            async def submit_one() -> None:
                check(await pool.submit(t.noop) is None, "submit(noop)")

            async def measure_b() -> None:
                record_latency(row, await alatency_runs(submit_one, s.n_b, s))

            await _aguard(row, "b", measure_b)

        if "c" in s.measures:
            data = c_data(s.n_c)
            expected = c_expected(s.n_c)
            map_row = out.row("asyncdist map", "c: sum(await pool.map)")

            async def map_reduce() -> float:
                t0 = clock()
                total = await pool.map_reduce(t.simulate, operator.add, data)
                elapsed = clock() - t0
                check(total == expected, "map_reduce")
                return elapsed

            async def map_sum() -> float:
                t0 = clock()
                total = sum(await pool.map(t.simulate, data))
                elapsed = clock() - t0
                check(total == expected, "map + sum")
                return elapsed

            async def measure_c() -> None:
                await pool.map(t.simulate, data[:20])
                record_wall(row, "c", await arepeat_runs(map_reduce, s), s.n_c, s)

            async def measure_c_map() -> None:
                record_wall(map_row, "c", await arepeat_runs(map_sum, s), s.n_c, s)

            await _aguard(row, "c", measure_c)
            await _aguard(map_row, "c", measure_c_map)

        if "d" in s.measures:

            async def pi(n: int) -> float:
                t0 = clock()
                total = sum(await pool.map(t.points_in_circle, [POINTS] * n))
                elapsed = clock() - t0
                check_pi(total, n)
                return elapsed

            async def measure_d() -> None:
                await pi(min(s.n_d, 200))
                record_wall(row, "d", await arepeat_runs(lambda: pi(s.n_d), s), s.n_d, s)

            await _aguard(row, "d", measure_d)
    loop.remove_signal_handler(signal.SIGTERM)


def run_asyncdist(s: Settings, out: FamilyResult) -> None:
    import asyncdist

    try:
        asyncdist.run(_asyncdist_family(s, out))
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None  # stopped by SIGTERM, the pool is closed


# -- multiprocessing.Pool ------------------------------------------------------------------------


def run_multiprocessing(s: Settings, out: FamilyResult) -> None:
    import multiprocessing

    t = _tasks()
    out.info["start_method"] = multiprocessing.get_start_method()
    started = clock()
    pool = multiprocessing.Pool(WORKERS)
    try:
        check(pool.map(t.noop, range(100), chunksize=1) == list(range(100)), "warm-up")
        out.start_s = clock() - started
        one = out.row("mp.Pool chunksize=1", "a: Pool.map(chunksize=1); b: Pool.apply")
        default = out.row("mp.Pool default chunks", "a, c, d: Pool.map, default chunksize (n / 8)")

        if "a" in s.measures:
            for row, chunksize in ((one, 1), (default, None)):

                def map_noop(n: int, chunksize: int | None = chunksize) -> float:
                    t0 = clock()
                    ys = pool.map(t.noop, range(n), chunksize=chunksize)
                    elapsed = clock() - t0
                    check(ys == list(range(n)), "map(noop)")
                    return elapsed

                def measure_a(row: Row = row, map_noop: Callable[[int], float] = map_noop) -> None:
                    map_noop(min(s.n_a, 2000))
                    record_wall(row, "a", repeat_runs(lambda: map_noop(s.n_a), s), s.n_a, s)

                _guard(row, "a", measure_a)

        if "b" in s.measures:

            def apply_one() -> None:
                check(pool.apply(t.noop) is None, "apply(noop)")

            _guard(one, "b", lambda: record_latency(one, latency_runs(apply_one, s.n_b, s)))

        if "c" in s.measures:
            data = c_data(s.n_c)
            expected = c_expected(s.n_c)

            def map_sum() -> float:
                t0 = clock()
                total = sum(pool.map(t.simulate, data))
                elapsed = clock() - t0
                check(total == expected, "map + sum")
                return elapsed

            def measure_c() -> None:
                pool.map(t.simulate, data[:20])
                record_wall(default, "c", repeat_runs(map_sum, s), s.n_c, s)

            _guard(default, "c", measure_c)

        if "d" in s.measures:

            def pi(n: int) -> float:
                t0 = clock()
                total = sum(pool.map(t.points_in_circle, [POINTS] * n))
                elapsed = clock() - t0
                check_pi(total, n)
                return elapsed

            def measure_d() -> None:
                pi(min(s.n_d, 200))
                record_wall(default, "d", repeat_runs(lambda: pi(s.n_d), s), s.n_d, s)

            _guard(default, "d", measure_d)
    except BaseException:
        pool.terminate()  # an error or a signal: stop the workers now
        pool.join()
        raise
    # Done: close and join. terminate() can hang in Pool's handler threads (CPython issues
    # 78178, 73945, open); in CI this family measured everything, then gave no result within
    # 60 s, twice, with terminate() here.
    pool.close()
    pool.join()


# -- concurrent.futures.ProcessPoolExecutor ------------------------------------------------------


def run_ppe(s: Settings, out: FamilyResult) -> None:
    import concurrent.futures

    t = _tasks()
    started = clock()
    executor = concurrent.futures.ProcessPoolExecutor(WORKERS)
    try:
        # Processes start on the first submit: warm them up before timing anything.
        check(list(executor.map(t.noop, range(100))) == list(range(100)), "warm-up")
        out.start_s = clock() - started
        row = out.row("ProcessPoolExecutor", "a, c, d: executor.map (chunksize=1); b: submit().result()")
        chunked = out.row("PPE chunks like Pool", "a, d: executor.map(chunksize=n / 8, like Pool's)")

        def map_noop(n: int, chunksize: int) -> float:
            t0 = clock()
            ys = list(executor.map(t.noop, range(n), chunksize=chunksize))
            elapsed = clock() - t0
            check(ys == list(range(n)), "map(noop)")
            return elapsed

        def pi(n: int, chunksize: int) -> float:
            t0 = clock()
            total = sum(executor.map(t.points_in_circle, [POINTS] * n, chunksize=chunksize))
            elapsed = clock() - t0
            check_pi(total, n)
            return elapsed

        if "a" in s.measures:
            for r, chunksize in ((row, 1), (chunked, pool_chunksize(s.n_a))):

                def measure_a(r: Row = r, chunksize: int = chunksize) -> None:
                    map_noop(min(s.n_a, 2000), chunksize)
                    record_wall(r, "a", repeat_runs(lambda: map_noop(s.n_a, chunksize), s), s.n_a, s)

                _guard(r, "a", measure_a)

        if "b" in s.measures:

            def submit_one() -> None:
                check(executor.submit(t.noop).result() is None, "submit(noop)")

            _guard(row, "b", lambda: record_latency(row, latency_runs(submit_one, s.n_b, s)))

        if "c" in s.measures:
            data = c_data(s.n_c)
            expected = c_expected(s.n_c)

            def map_sum() -> float:
                t0 = clock()
                total = sum(executor.map(t.simulate, data))
                elapsed = clock() - t0
                check(total == expected, "map + sum")
                return elapsed

            def measure_c() -> None:
                list(executor.map(t.simulate, data[:20]))
                record_wall(row, "c", repeat_runs(map_sum, s), s.n_c, s)

            _guard(row, "c", measure_c)

        if "d" in s.measures:
            for r, chunksize in ((row, 1), (chunked, pool_chunksize(s.n_d))):

                def measure_d(r: Row = r, chunksize: int = chunksize) -> None:
                    pi(min(s.n_d, 200), chunksize)
                    record_wall(r, "d", repeat_runs(lambda: pi(s.n_d, chunksize), s), s.n_d, s)

                _guard(r, "d", measure_d)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# -- dask.distributed ----------------------------------------------------------------------------


def run_dask(s: Settings, out: FamilyResult) -> None:
    from dask.distributed import Client, LocalCluster

    t = _tasks()
    started = clock()
    cluster = LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    try:
        client = Client(cluster)
        try:
            check(client.gather(client.map(t.noop, range(100), pure=False)) == list(range(100)), "warm-up")
            out.start_s = clock() - started
            row = out.row(
                "dask.distributed",
                "a, d: gather(client.map); b: client.submit().result(); c: submit(sum, client.map)",
            )

            if "a" in s.measures:

                def map_noop(n: int) -> float:
                    t0 = clock()
                    ys = client.gather(client.map(t.noop, range(n), pure=False))
                    elapsed = clock() - t0
                    check(ys == list(range(n)), "map(noop)")
                    return elapsed

                def measure_a() -> None:
                    map_noop(min(s.n_a, 1000))
                    record_wall(row, "a", repeat_runs(lambda: map_noop(s.n_a), s), s.n_a, s)

                _guard(row, "a", measure_a)

            if "b" in s.measures:

                def submit_one() -> None:
                    check(client.submit(t.noop, pure=False).result() is None, "submit(noop)")

                _guard(row, "b", lambda: record_latency(row, latency_runs(submit_one, s.n_b, s)))

            if "c" in s.measures:
                data = c_data(s.n_c)
                expected = c_expected(s.n_c)

                def map_sum() -> float:
                    t0 = clock()
                    futures = client.map(t.simulate, data, pure=False)
                    total = client.submit(sum, futures, pure=False).result()
                    elapsed = clock() - t0
                    check(total == expected, "map + submit(sum)")
                    return elapsed

                def measure_c() -> None:
                    client.gather(client.map(t.simulate, data[:20], pure=False))
                    record_wall(row, "c", repeat_runs(map_sum, s), s.n_c, s)

                _guard(row, "c", measure_c)

            if "d" in s.measures:

                def pi(n: int) -> float:
                    t0 = clock()
                    total = sum(client.gather(client.map(t.points_in_circle, [POINTS] * n, pure=False)))
                    elapsed = clock() - t0
                    check_pi(total, n)
                    return elapsed

                def measure_d() -> None:
                    pi(min(s.n_d, 200))
                    record_wall(row, "d", repeat_runs(lambda: pi(s.n_d), s), s.n_d, s)

                _guard(row, "d", measure_d)
        finally:
            client.close()
    finally:
        cluster.close()


# -- the families --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    run: Callable[[Settings, FamilyResult], None]
    missing: Callable[[], str | None] = lambda: None
    description: str = ""


FAMILIES = by_name(
    Family("asyncdist", run_asyncdist, description="asyncdist.Pool(workers=2), broker in-process"),
    Family("multiprocessing", run_multiprocessing, description="multiprocessing.Pool(2)"),
    Family("ppe", run_ppe, description="concurrent.futures.ProcessPoolExecutor(2)"),
    Family(
        "dask",
        run_dask,
        requires("distributed", "dask.distributed is not installed (pip install -e '.[bench]')"),
        "dask.distributed LocalCluster(n_workers=2, threads_per_worker=1, processes=True)",
    ),
)

#: Table rows in display order, with the family that fills each and what its columns mean.
ROWS: dict[str, str] = {
    "asyncdist": "a: pool.map; b: await pool.submit; c: pool.map_reduce(simulate, operator.add); "
    "d: pool.map + sum",
    "asyncdist map": "c: sum(await pool.map(simulate, data))",
    "mp.Pool chunksize=1": "a: Pool.map(chunksize=1); b: Pool.apply",
    "mp.Pool default chunks": "a, c, d: Pool.map with its default chunksize, ceil(n / 8) for 2 workers",
    "ProcessPoolExecutor": "a, c, d: executor.map (chunksize=1); b: executor.submit().result()",
    "PPE chunks like Pool": "a, d: executor.map(chunksize=ceil(n / 8)), Pool's default",
    "dask.distributed": "a, d: client.gather(client.map); b: client.submit().result(); "
    "c: client.submit(sum, client.map(...)).result(); pure=False",
}


def child_main(name: str, s: Settings, result_file: str | None) -> int:
    """Be one family's subprocess: run its pool and measurements, write the FamilyResult as JSON."""
    exit_on_sigterm()
    out = FamilyResult(name)
    try:
        FAMILIES[name].run(s, out)
    except Exception as exc:
        out.error = f"failed: {type(exc).__name__}: {exc}"
        _progress(f"{name}: {out.error}")
    text = json.dumps(asdict(out))
    if result_file:
        with open(result_file, "w") as f:
            f.write(text)
    else:
        print(text, flush=True)
    return 0


# -- the parent: family subprocesses -------------------------------------------------------------


def become_subreaper() -> None:
    """Linux: orphans of our children (pool workers of a killed family) are reparented to us,
    so :func:`run_family` can reap them."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap_exited(pgid: int) -> None:
    """Reap the exited members of group ``pgid`` that are our children (as subreaper)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass


def _group_alive(pgid: int) -> bool:
    _reap_exited(pgid)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _reap_group(pgid: int, grace: float = 3.0) -> bool:
    """Wait up to ``grace`` s for what is left of process group ``pgid`` (say multiprocessing's
    resource tracker, which exits just after its parent) to exit and reap it; SIGKILL and reap
    anything still there. True if something had to be killed."""
    deadline = time.monotonic() + grace
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    else:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def run_family(name: str, s: Settings, pin: int | None, timeout: float) -> FamilyResult:
    """Run one family in its own subprocess and session; it and all its processes are stopped and
    reaped, also on errors, timeouts and Ctrl-C."""
    family = FAMILIES[name]
    reason = family.missing()
    if reason:
        return FamilyResult(name, error=f"skipped: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench_futures_") as tmp:
        result_file = os.path.join(tmp, f"{name}.json")
        argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--result-file", result_file]
        argv += s.argv() + (["--pin", str(pin)] if pin is not None else [])
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,  # EOF: we are gone (exit_when_parent_exits)
            stdout=sys.stderr,  # the family's chatter (and its workers') stays off our stdout
            start_new_session=True,  # Ctrl-C reaches us only; the session is one process group
        )
        try:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return FamilyResult(name, error=f"failed: no result within {timeout:g} s")
            if proc.returncode != 0:
                return FamilyResult(name, error=f"failed: exit code {proc.returncode}")
            try:
                with open(result_file) as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                return FamilyResult(name, error=f"failed: no result ({exc})")
        finally:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: the family closes its pool
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            if _reap_group(proc.pid):
                print(f"warning: {name}: killed processes it left behind", file=sys.stderr)
    rows = {k: Row(**v) for k, v in data.pop("rows").items()}
    return FamilyResult(**data, rows=rows)


def calibrate_sleep(samples: int) -> float:
    """Mean seconds ``time.sleep(SLEEP)`` really takes here (timer slack, wake-up latency)."""
    took = []
    for _ in range(samples):
        t0 = clock()
        time.sleep(SLEEP)
        took.append(clock() - t0)
    return statistics.mean(took)


# -- ratios and report ---------------------------------------------------------------------------


@dataclass
class Check:
    key: str
    part: str
    label: str
    value: float | None
    unit: str  # "x", "ms" or "%"
    target: float | None  # None: informational
    higher_is_better: bool
    met: bool | None = None


def _metric(results: dict[str, Row], row: str, metric: str) -> float | None:
    r = results.get(row)
    return None if r is None else getattr(r, metric)


def compute_checks(results: dict[str, Row], s: Settings) -> list[Check]:
    checks: list[Check] = []

    def ratio(part: str, metric: str, num: str, den: str, target: float | None, higher: bool) -> None:
        a, b = _metric(results, num, metric), _metric(results, den, metric)
        if num not in results or den not in results:
            return
        value = a / b if a is not None and b else None
        label = f"{num} / {den}"
        checks.append(Check(f"{part}:{num}/{den}", part, label, value, "x", target, higher))

    def absolute(part: str, key: str, label: str, value: float | None, unit: str, target: float) -> None:
        checks.append(Check(key, part, label, value, unit, target, False))

    hi, lo = True, False
    ad = "asyncdist"
    ratio("a", "a_tasks_per_s", ad, "mp.Pool chunksize=1", 1.0, hi)
    ratio("a", "a_tasks_per_s", ad, "dask.distributed", 50.0, hi)
    if ad in results:
        target = 50.0 * s.n_a / 10_000  # 50 ms for 10,000 tasks
        absolute(
            "a",
            "a:asyncdist wall",
            f"asyncdist map of {s.n_a:,} no-ops, wall",
            _metric(results, ad, "a_wall_ms"),
            "ms",
            target,
        )
    ratio("a", "a_tasks_per_s", ad, "mp.Pool default chunks", None, hi)
    ratio("a", "a_tasks_per_s", ad, "ProcessPoolExecutor", None, hi)
    ratio("a", "a_tasks_per_s", ad, "PPE chunks like Pool", None, hi)
    ratio("b", "b_median_us", ad, "mp.Pool chunksize=1", 2.5, lo)
    ratio("b", "b_median_us", ad, "ProcessPoolExecutor", None, lo)
    ratio("b", "b_median_us", ad, "dask.distributed", None, lo)
    if ad in results:
        absolute(
            "c",
            "c:asyncdist overhead",
            "asyncdist map_reduce over the ideal",
            _metric(results, ad, "c_overhead_pct"),
            "%",
            3.0,
        )
    ratio("c", "c_wall_s", ad, "mp.Pool default chunks", None, lo)
    ratio("c", "c_wall_s", ad, "dask.distributed", None, lo)
    ratio("d", "d_wall_s", ad, "mp.Pool default chunks", 1.5, lo)
    ratio("d", "d_wall_s", ad, "ProcessPoolExecutor", None, lo)
    ratio("d", "d_wall_s", ad, "PPE chunks like Pool", None, lo)
    ratio("d", "d_wall_s", ad, "dask.distributed", None, lo)
    for c in checks:
        if c.value is not None and c.target is not None:
            c.met = c.value >= c.target if c.higher_is_better else c.value <= c.target
    return checks


def _fmt_value(c: Check) -> str:
    if c.value is None:
        return "n/a"
    digits = 2
    # Three decimals where two would round a miss onto the target.
    if c.target is not None and not c.met and round(c.value, 2) == c.target:
        digits = 3
    if c.unit == "x":
        return fmt_number(c.value, digits) + "x"
    if c.unit == "%":
        return f"{c.value:+.{digits}f}%"
    return fmt_number(c.value, 1) + " " + c.unit


def _fmt_target(c: Check) -> str:
    if c.target is None:
        return "info"
    op = ">=" if c.higher_is_better else "<="
    if c.unit == "x":
        return f"{op} {c.target:g}x"
    if c.unit == "%":
        return f"{op} +{c.target:g}%"
    return f"{op} {c.target:g} {c.unit}"


def report(
    families: dict[str, FamilyResult],
    results: dict[str, Row],
    checks: list[Check],
    s: Settings,
    pin: int | None,
    sleep_s: float | None,
    elapsed: float,
) -> None:
    mode = mode_line(pin, "the benchmark, every pool and every worker", "every process")
    v = versions(*VERSIONS_OF)
    print()
    quick = " (--quick: sizes scaled down, targets indicative)" if s.quick else ""
    print(f"asyncdist futures benchmark{quick}")
    print(f"mode: {mode}; {WORKERS} workers each")
    print(
        f"sizes: (a) {s.n_a:,} no-ops, (b) {s.n_b:,} sequential submits, (c) {s.n_c:,} x 10 ms "
        f"(ideal {s.ideal_c:g} s), (d) {s.n_d:,} x {POINTS:,} points"
    )
    print(
        f"each figure: best of up to {s.repeat} run(s) within {s.budget:g} s, after a warm-up run; "
        f"whole run {elapsed:.0f} s"
    )
    print(format_versions(v))
    print()
    headers = [
        "implementation",
        "(a) tasks/s",
        "(a) ms",
        "(b) median us",
        "(b) p90 us",
        "(c) s",
        "(c) over ideal",
        "(d) s",
    ]
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                fmt_number(r.a_tasks_per_s, missing=""),
                fmt_number(r.a_wall_ms, 1, missing=""),
                fmt_number(r.b_median_us, missing=""),
                fmt_number(r.b_p90_us, missing=""),
                fmt_number(r.c_wall_s, 3, missing=""),
                "" if r.c_overhead_pct is None else f"{r.c_overhead_pct:+.2f}%",
                fmt_number(r.d_wall_s, 3, missing=""),
            ]
        )
    print(format_table(headers, rows))
    print()
    width = max((len(n) for n in results), default=0)
    for name in results:
        print(f"  {name:<{width}}  {ROWS.get(name, results[name].how)}")
    print()
    starts = [f"{n} {fmt_number(f.start_s, 2)} s" for n, f in families.items() if f.start_s is not None]
    if starts:
        print("pool start-up and a first map of 100 no-ops (not counted above): " + ", ".join(starts))
    if sleep_s is not None:
        floor = s.n_c * sleep_s / WORKERS
        print(
            f"(c) time.sleep({SLEEP:g}) takes {sleep_s * 1e3:.3f} ms here: the floor is {floor:.3f} s, "
            f"{(floor / s.ideal_c - 1) * 100:+.2f}% over the ideal before any scheduling"
        )
    notes = [(n, f.error) for n, f in families.items() if f.error]
    notes += [(n, f"({part}) {err}") for n, r in results.items() for part, err in r.errors.items()]
    for name, err in notes:
        print(f"note: {name}: {err}")
    print()
    labels = {"a": "(a) map no-ops", "b": "(b) submit latency", "c": "(c) sleep tasks", "d": "(d) pi"}
    crows = []
    for c in checks:
        crows.append([labels[c.part], c.label, _fmt_value(c), _fmt_target(c), fmt_met(c.met)])
    if crows:
        print(format_table(["measure", "figure", "value", "target", "met"], crows, "llrll"))
        print()
        print("ratios: (a) tasks/s over tasks/s (higher is better); (b) (c) (d) latency or wall time over")
        print("        the peer's (lower is better)")
        print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: smaller sizes, one run each")
    parser.add_argument("--repeat", type=int, help="runs per figure, the best is kept (default 3, --quick 1)")
    parser.add_argument(
        "--budget", type=float, help="start another run only within this many seconds (default 12)"
    )
    parser.add_argument("--pin", type=int, metavar="CPU", help="pin everything, workers too, to CPU")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    parser.add_argument("--measure", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--timeout", type=float, help="seconds one family may take (default 600, --quick 60)")
    parser.add_argument("--child", choices=list(FAMILIES), help="run one family in this process")
    parser.add_argument("--result-file", help=argparse.SUPPRESS)  # internal: where a child writes
    args = parser.parse_args(argv)

    measures = parse_measures(parser, args.measure, MEASURES)
    if (args.repeat is not None and args.repeat < 1) or (args.budget is not None and args.budget <= 0):
        parser.error("--repeat must be >= 1 and --budget > 0")
    s = make_settings(args.quick, args.repeat, args.budget, measures)
    if args.pin is not None:
        pin_to_cpu(args.pin)  # before any pool starts: every worker inherits the affinity

    if args.child:
        if args.result_file:
            exit_when_parent_exits()
        return child_main(args.child, s, args.result_file)

    # --only: comma-separated names; prefixes select every match; "mp" is multiprocessing.
    names = select_names(args.only, list(FAMILIES), "family", {"mp": "multiprocessing"})
    timeout = args.timeout if args.timeout is not None else (60.0 if args.quick else 600.0)
    become_subreaper()
    exit_on_sigterm()  # SIGTERM unwinds through run_family's finally, which stops the family
    started = time.monotonic()
    sleep_s = calibrate_sleep(20 if s.quick else 100) if "c" in measures else None
    families: dict[str, FamilyResult] = {}
    try:
        for name in names:
            _progress(f"{name}: measuring {','.join(sorted(measures))} ...")
            fam = families[name] = run_family(name, s, args.pin, timeout)
            if fam.error:
                _progress(f"  [{fam.error}]")
    except KeyboardInterrupt:
        print("interrupted: every pool and worker was stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    results: dict[str, Row] = {}
    for name in ROWS:  # display order
        for fam in families.values():
            if name in fam.rows:
                results[name] = fam.rows[name]
    checks = compute_checks(results, s)
    report(families, results, checks, s, args.pin, sleep_s, elapsed)
    emit_json(
        {
            "benchmark": "bench_futures",
            "mode": "pinned" if args.pin is not None else "unpinned",
            "pin_cpu": args.pin,
            "quick": s.quick,
            "workers": WORKERS,
            "sizes": {"a": s.n_a, "b": s.n_b, "c": s.n_c, "d": s.n_d, "d_points": POINTS},
            "ideal_c_s": s.ideal_c,
            "sleep_s": sleep_s,
            "repeat": s.repeat,
            "budget_s": s.budget,
            "measures": sorted(measures),
            "units": {
                "a_tasks_per_s": "no-op tasks per second through one map call",
                "a_wall_ms": "wall ms of that map call",
                "b_median_us": "median us of one submit-and-wait of a no-op, sequential",
                "b_p90_us": "90th percentile of the same",
                "c_wall_s": "wall s of the sleep workload, map and reduce",
                "c_overhead_pct": "c_wall_s over the ideal (n * 10 ms / workers), in %",
                "d_wall_s": "wall s of the Monte Carlo pi map and sum",
            },
            "versions": versions(*VERSIONS_OF),
            "elapsed_s": round(elapsed, 1),
            "families": {
                n: {"start_s": f.start_s, "error": f.error, "info": f.info} for n, f in families.items()
            },
            "results": {n: asdict(r) for n, r in results.items()},
            "checks": {c.key: asdict(c) for c in checks},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
