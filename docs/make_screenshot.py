"""Regenerate ``docs/dashboard.png``: the dashboard of a busy local pool and one MapReduce job.

::

    python docs/make_screenshot.py [--seconds 70] [--out docs/dashboard.png]

It starts a local pool (5 workers) fed with waves of tasks (a few of which fail),
an embedded MapReduce cluster (a master here, 2 slave processes) running one word count whose
maps take a while, and a :class:`~asyncdist.dashboard.Dashboard` of both; after ``--seconds`` of
history it photographs the page with headless Chromium (Debian's ``chromium``) at 1280x900.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncdist
from asyncdist.dashboard import Dashboard
from asyncdist.mapreduce import Job, kvgroup, shutdown_local_cluster
from asyncdist.mapreduce._job import local_cluster

HERE = Path(__file__).resolve().parent


def work(seconds: float, fail: bool) -> float:
    """A task: sleep a while (I/O-bound work), fail now and then."""
    time.sleep(seconds)
    if fail:
        raise ValueError("bad record")
    return seconds


def slow_map(line: str, params: Any) -> Iterator[tuple[str, int]]:
    time.sleep(params)
    for word in line.split():
        yield word.lower().strip(".,;"), 1


def count_reduce(pairs: Any, params: Any) -> Iterator[tuple[str, int]]:
    for word, counts in kvgroup(pairs):
        yield word, sum(counts)


async def feed(pool: asyncdist.Pool, stop: asyncio.Event) -> None:
    """Waves of tasks, between about 25 and 65 a second (a period of 40 s), for 5 workers that
    finish about 55 a second: the queue grows at the crests and drains in the troughs; 2% fail."""
    rng = random.Random(7)
    started = time.monotonic()
    pending: set[Any] = set()
    while not stop.is_set():
        phase = (time.monotonic() - started + 20) / 40 * 2 * math.pi  # at a crest after 70 s
        per_second = 45 + 20 * math.sin(phase) + rng.uniform(-5, 5)
        for _ in range(max(0, round(per_second / 4))):
            fut = pool.submit(work, rng.uniform(0.03, 0.15), rng.random() < 0.02)
            pending.add(fut)
            fut.add_done_callback(lambda f: (pending.discard(f), f.cancelled() or f.exception()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    for fut in list(pending):
        fut.cancel()


async def photograph(url: str, out: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="asyncdist-shot-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
            "--window-size=1280,900", "--virtual-time-budget=2500", f"--screenshot={out}", url,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                await proc.wait()
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    if proc.returncode != 0 or not out.exists():  # noqa: ASYNC240 - one stat, at the end
        raise SystemExit(f"chromium failed (exit {proc.returncode})")


async def main(seconds: float, out: Path) -> None:
    lines = (HERE.parent / "README.md").read_text().splitlines() or ["no readme here"]
    try:
        cluster = await local_cluster(slaves=2)
        assert cluster.master is not None
        host, port = cluster.master.address
        stop = asyncio.Event()
        async with (
            asyncdist.Pool(workers=5, secret=cluster.secret) as pool,
            Dashboard(
                pool.address or "",
                secret=cluster.secret,
                master=f"{host}:{port}",
                port=0,
                interval=0.5,
                history=240,
            ) as dash,
        ):
            print(f"dashboard at {dash.url}; collecting {seconds:g} s of history", flush=True)
            feeder = asyncio.create_task(feed(pool, stop))
            await asyncio.sleep(max(0.0, seconds - 22))
            # 48 maps of about 1.2 s on 2 slaves: about two thirds done when the photograph is taken.
            inputs = [lines[i::48] for i in range(48)]
            per_line = 1.2 / max(1, len(inputs[0]))
            job = await Job(name="wordcount").run(
                input=inputs, map=slow_map, reduce=count_reduce, partitions=4, params=per_line
            )
            await asyncio.sleep(min(seconds, 22))
            await photograph(dash.url, out)
            print(f"wrote {out}", flush=True)
            stop.set()
            await feeder
            waiting = asyncio.ensure_future(job.wait())
            waiting.cancel()  # cancelling the wait kills the job
            with contextlib.suppress(BaseException):
                await waiting
    finally:
        await shutdown_local_cluster()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=70.0, help="history to collect first (default 70)")
    parser.add_argument("--out", type=Path, default=HERE / "dashboard.png", help="the PNG to write")
    args = parser.parse_args()
    sys.exit(asyncdist.run(main(args.seconds, args.out.resolve())))
