"""The CSP examples (examples/csp/) run as real processes, print what they promise, and leave no process.

Each example runs with ``sys.executable`` from the repository root and a
marker in its environment that every process it starts inherits; after it
exited, no process with that marker may be left (and the worker PIDs the
farm prints must be gone).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _util import SCALE, alive, eventually, pids_with_env, stop

ROOT = Path(__file__).resolve().parent.parent
CSP_EXAMPLES = ROOT / "examples" / "csp"
#: The bound of one example run (scaled).
BOUND = 60 * SCALE
#: The farm's expected result: the squares of 0..199.
FARM_SUM = sum(x * x for x in range(200))
MARKER = "CSP_EXAMPLE_TEST_RUN"


def leftovers(marker: str) -> list[int]:
    """The live processes whose environment carries ``MARKER=marker`` (the example's descendants)."""
    return pids_with_env(MARKER, marker)


class Run:
    """The processes of one example run, all marked; ``close()`` stops and reaps them."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, MARKER: self.marker}
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    async def run(self, *argv: str) -> tuple[int, str, str]:
        """Run ``python ARGV`` to its end; return (exit code, stdout, stderr)."""
        proc = await self.start(*argv)
        async with asyncio.timeout(BOUND):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await stop(proc)

    def assert_no_leftovers(self) -> None:
        assert leftovers(self.marker) == [], "the example left processes behind"


@pytest.fixture
async def run() -> AsyncIterator[Run]:
    runs = Run()
    try:
        yield runs
    finally:
        await runs.close()
    runs.assert_no_leftovers()


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the leftover check reads /proc")


def test_every_csp_example_is_run_and_described() -> None:
    examples = {p.name for p in CSP_EXAMPLES.glob("*.py")}
    assert examples == {"counter_printer.py", "farm.py", "dining_philosophers.py"}
    readme = (CSP_EXAMPLES / "README.md").read_text()
    for name in examples:
        assert f"python examples/csp/{name}" in readme, name


async def test_leftover_check_sees_a_stray_process(run: Run) -> None:
    """The check the other tests rely on finds a marked process that still runs (and only while it runs)."""
    # It reads a pipe whose write end it holds itself: it runs until it is stopped.
    sleeper = await run.start("-c", "import os; os.read(os.pipe()[0], 1)")
    # Until the child has exec'd, /proc shows the parent's environment, without the marker.
    await eventually(lambda: leftovers(run.marker) == [sleeper.pid], "the check did not see the sleeper")
    await stop(sleeper)
    assert leftovers(run.marker) == []


async def test_counter_printer(run: Run) -> None:
    code, out, err = await run.run("examples/csp/counter_printer.py")
    assert code == 0, err
    assert out == "0 1 2 3 4 \n"
    assert err == ""


def _farm_checks(out: str, main_pid: int) -> list[int]:
    """Check the farm's report; return the worker PIDs it printed."""
    assert f"farm: 200 results, sum={FARM_SUM}" in out, out
    pids = {int(p) for p in re.findall(r"worker-\d+: pid (\d+)", out)}
    assert len(pids) == 2, out
    assert main_pid not in pids  # three OS processes: the main one and two workers
    ready = re.search(r"farm: 2 workers ready, pids \[(\d+), (\d+)\]", out)
    assert ready is not None, out
    assert {int(ready.group(1)), int(ready.group(2))} == pids
    done = [int(n) for n in re.findall(r"worker-\d+: (\d+) jobs", out)]
    assert len(done) == 2, out
    assert sum(done) == 200  # every job done once, by one worker or the other
    return sorted(pids)


@pytest.mark.parametrize("mode", ["multiprocess", "connect"])
async def test_farm(run: Run, mode: str) -> None:
    """The workers run in two other OS processes (@csp.multiprocess children, or --role worker copies)."""
    code, out, err = await run.run("examples/csp/farm.py", "--mode", mode)
    assert code == 0, err
    assert "Traceback" not in err, err
    pids = _farm_checks(out, run.procs[0].pid)
    assert [p for p in pids if alive(p)] == []


async def test_farm_with_workers_started_by_hand(run: Run) -> None:
    """--mode external: the main process waits for two ``--role worker --connect HOST:PORT`` processes."""
    main = await run.start("examples/csp/farm.py", "--mode", "external", "--port", "0")
    assert main.stdout is not None
    said: list[str] = []
    async with asyncio.timeout(BOUND):
        while not said or "waiting for 2 workers" not in said[-1]:
            line = await main.stdout.readline()
            assert line, f"the farm exited early: {said}"
            said.append(line.decode())
    address = re.search(r"channel server on (127\.0\.0\.1:\d+)", "".join(said))
    assert address is not None, said
    workers = [
        await run.start("examples/csp/farm.py", "--role", "worker", "--connect", address.group(1))
        for _ in range(2)
    ]
    async with asyncio.timeout(BOUND):
        rest, err = await main.communicate()
        answers = [await w.communicate() for w in workers]
    assert main.returncode == 0, err.decode()
    for worker, (w_out, w_err) in zip(workers, answers, strict=True):
        assert worker.returncode == 0, w_err.decode()
        said.append(w_out.decode())
    pids = _farm_checks("".join(said) + rest.decode(), main.pid)
    assert pids == sorted(w.pid for w in workers)


async def test_dining_philosophers(run: Run) -> None:
    code, out, err = await run.run("examples/csp/dining_philosophers.py")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == "each philosopher ate 10 times"
    report = re.fullmatch(r"5 philosophers, at most (\d) eating at once; meals: \[(.*)\]", lines[-2])
    assert report is not None, out
    assert 1 <= int(report.group(1)) <= 2  # two of five at most: neighbours share a fork
    assert report.group(2) == "10, 10, 10, 10, 10"


async def test_dining_philosophers_more_of_them(run: Run) -> None:
    code, out, err = await run.run(
        "examples/csp/dining_philosophers.py", "--philosophers", "7", "--meals", "40"
    )
    assert code == 0, err
    assert out.splitlines()[-1] == "each philosopher ate 40 times"


async def test_dining_philosophers_watchdog_poisons_everything(run: Run) -> None:
    """With no patience, the host's TimeoutGuard fires first: its poison ends every process; exit 1."""
    code, out, err = await run.run("examples/csp/dining_philosophers.py", "--patience", "0")
    assert code == 1, err
    assert "deadlock? nobody ate for 0.0 s" in out
    assert "each philosopher ate" not in out
    assert "Traceback" not in err, err
