"""``asyncdist status``: a broker's (and a MapReduce master's) state as a table, or as JSON, run as a real
subprocess against a real broker with worker processes; and :func:`asyncdist.dashboard.format_status`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import _futures_tasks as T
import pytest
from _util import SCALE, eventually, free_port

import asyncdist
from asyncdist.dashboard import format_status
from asyncdist.mapreduce import Master


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env.update(extra)
    return env


async def asyncdist_cli(*args: str, stdin: bytes | None = None, **env: str) -> tuple[int, str, str]:
    """Run ``python -m asyncdist ARGS`` without blocking this loop (the broker lives here)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncdist", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(**env),
    )  # fmt: skip
    try:
        async with asyncio.timeout(30 * SCALE):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def secret_file(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def busy_pool(directory: Path, secret: str) -> AsyncIterator[tuple[asyncdist.Pool, Any]]:
    """A pool (broker here, 2 worker processes) that completed 7 tasks, failed 2, and holds 4
    blocked ones; its broker's counters no longer move. Yields the pool and its broker."""
    async with asyncdist.Pool(workers=2, secret=secret) as pool:
        broker = pool._broker
        assert broker is not None
        blocked: list[Any] = []
        try:
            await pool.map(T.square, range(7))
            for i in range(2):
                with pytest.raises(ValueError, match="bad value"):
                    await pool.submit(T.fail, str(directory), f"f{i}", "value")
            blocked = [pool.submit(T.block_until_released, str(directory), "hold", i) for i in range(4)]
            await eventually(lambda: len(T.markers(directory, "started", "hold")) == 2, "both workers busy")
            await eventually(lambda: broker.status()["queued"] + broker.status()["running"] == 4, "4 held")
            yield pool, broker
        finally:
            (directory / "release-hold").write_text("go")
            if blocked:
                await asyncio.gather(*blocked)


def field(out: str, name: str) -> int:
    """The number after ``name`` at the start of a line of the table."""
    match = re.search(rf"^{re.escape(name)}\s+(\d+)", out, re.MULTILINE)
    assert match is not None, f"no {name!r} line in:\n{out}"
    return int(match.group(1))


def stable(status: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if k != "uptime"}
    out["workers"] = [{k: v for k, v in w.items() if k != "credit"} for w in status["workers"]]
    return out


async def test_status_table_matches_the_broker(tmp_path: Path, secret: str, secret_file: Path) -> None:
    async with busy_pool(tmp_path, secret) as (pool, broker):
        assert pool.address is not None
        code, out, err = await asyncdist_cli(
            "status", "--broker", pool.address, "--secret-file", str(secret_file)
        )
        status = broker.status()
        assert code == 0, err
        assert err == ""
        assert out.splitlines()[0].startswith(f"broker      {pool.address}   up ")
        assert field(out, "workers") == 2
        assert field(out, "queued") == status["queued"]
        assert field(out, "running") == status["running"]
        assert field(out, "completed") == status["stats"]["completed"] == 7
        assert field(out, "failed") == status["stats"]["failed"] == 2
        assert field(out, "clients") == status["clients"] == 1
        # The workers' table: one row per worker, found by its pid.
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["WID", "NAME"])
        assert lines[header].split() == [
            "WID",
            "NAME",
            "HOST",
            "PID",
            "SLOTS",
            "RUNNING",
            "LOAD",
            "COMPLETED",
        ]
        rows = [line.split() for line in lines[header + 1 : header + 3]]
        by_pid = {int(row[3]): row for row in rows}
        assert set(by_pid) == {w["pid"] for w in status["workers"]}
        for w in status["workers"]:
            row = by_pid[w["pid"]]
            assert row[0] == str(w["wid"])
            assert row[1] == w["name"]
            assert row[2] == w["host"]
            assert [int(row[4]), int(row[5]), int(row[7])] == [w["slots"], w["running"], w["completed"]]
            assert row[6] == f"{100 * w['running'] / w['slots']:.0f}%"
        assert "MapReduce" not in out

        # --json: the broker's status itself.
        code, out, err = await asyncdist_cli(
            "status", "--broker", pool.address, "--json", "--secret-file", str(secret_file)
        )
        assert code == 0, err
        data = json.loads(out)
        assert data["broker"] == pool.address
        assert data["mapreduce"] is None
        assert stable(data["status"]) == stable(broker.status())

        # The secret from the environment, or from stdin.
        code, out, err = await asyncdist_cli("status", "--broker", pool.address, ASYNCDIST_SECRET=secret)
        assert code == 0, err
        assert field(out, "completed") == 7
        code, out, err = await asyncdist_cli(
            "status", "--broker", pool.address, "--secret-stdin", stdin=secret.encode() + b"\n"
        )
        assert code == 0, err
        assert field(out, "failed") == 2

        # A wrong secret: exit 1, saying so (after the connection's own log line).
        code, out, err = await asyncdist_cli(
            "status",
            "--broker",
            pool.address,
            "--timeout",
            "2",
            ASYNCDIST_SECRET="wrong-secret-0123456789abcdef",
        )
        assert code == 1
        assert out == ""
        assert err.splitlines()[-1] == "asyncdist: error: peer refused the handshake: authentication failed"


async def test_status_with_a_mapreduce_master(tmp_path: Path, secret: str, secret_file: Path) -> None:
    master = await Master.start("127.0.0.1", 0, secret=secret)
    try:
        async with asyncdist.Pool(workers=1, secret=secret) as pool:
            assert pool.address is not None
            host, port = master.address
            args = ["status", "--broker", pool.address, "--master", f"{host}:{port}"]
            code, out, err = await asyncdist_cli(*args, "--secret-file", str(secret_file))
            assert code == 0, err
            assert field(out, "workers") == 1
            assert re.search(r"^MapReduce\s+0 slaves\s+0 job\(s\)$", out, re.MULTILINE), out
            code, out, err = await asyncdist_cli(*args, "--json", "--secret-file", str(secret_file))
            assert code == 0, err
            assert json.loads(out)["mapreduce"] == {"slaves": [], "jobs": {}}
            # The master unreachable: exit 1, naming it.
            lost = free_port()
            code, out, err = await asyncdist_cli(
                "status",
                "--broker",
                pool.address,
                "--master",
                f"127.0.0.1:{lost}",
                "--secret-file",
                str(secret_file),
            )
            assert code == 1
            assert err.startswith(
                f"asyncdist: error: cannot reach the MapReduce master at 127.0.0.1:{lost}: "
            )
    finally:
        await master.aclose()


async def test_status_of_an_unreachable_broker(secret_file: Path) -> None:
    port = free_port()
    code, out, err = await asyncdist_cli(
        "status", "--broker", f"127.0.0.1:{port}", "--secret-file", str(secret_file)
    )
    assert code == 1
    assert out == ""
    assert err.startswith(f"asyncdist: error: cannot reach the broker at 127.0.0.1:{port}: ")
    assert err.count("\n") == 1, err
    code, out, err = await asyncdist_cli("status", "--broker", "no-port-here")
    assert code == 1
    assert "needs a port" in err


def test_format_status_table() -> None:
    status = {
        "stats": {"submitted": 1300, "completed": 1234, "failed": 5, "cancelled": 1, "requeued": 2,
                  "stale_results": 0, "workers_joined": 3, "workers_lost": 1},
        "queued": 40,
        "running": 6,
        "clients": 2,
        "uptime": 3725.0,
        "workers": [
            {"wid": 3, "name": "node-b:77", "host": "node-b", "pid": 77, "slots": 4, "running": 4,
             "credit": 0, "completed": 1000, "joined": 0.0},
            {"wid": 1, "name": "node-a:12", "host": "node-a", "pid": 12, "slots": 2, "running": 2,
             "credit": 1, "completed": 239, "joined": 0.0},
        ],
    }  # fmt: skip
    mr = {
        "slaves": [{"id": "s1", "address": ["127.0.0.1", 1], "workers": 2, "running": 1}],
        "jobs": {
            "wc@1": {"name": "wordcount", "map": [3, 10], "reduce": [0, 4]},
            "sort@2": {"name": "sort", "state": "done", "map": [5, 5], "reduce": [2, 2]},
            "bad@3": {"name": "bad", "state": "failed", "error": "ValueError: no\n  good", "map": [1, 4],
                      "reduce": [0, 2]},
            "k@4": {"name": "stopped", "state": "killed", "map": [0, 1], "reduce": [0, 1]},
            "x@5": {"name": "odd", "state": "exploded", "error": "ignored", "map": [1, 1], "reduce": [1, 1]},
        },
    }  # fmt: skip
    text = format_status(status, mr, broker="h:5555", tasks_per_s=12.5)
    lines = text.splitlines()
    assert lines[0] == "broker      h:5555   up 1 h 02 min"
    assert "workers     2   (6 slots)" in lines
    assert "queued      40" in lines
    assert "running     6" in lines
    assert "completed   1234" in lines
    assert "failed      5" in lines
    assert "tasks/s     12.50" in lines
    assert "clients     2   cancelled 1   requeued 2   workers joined 3   lost 1" in lines
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["WID", "NAME", "HOST", "PID", "SLOTS", "RUNNING", "LOAD", "COMPLETED"]
    assert table[1].split() == ["1", "node-a:12", "node-a", "12", "2", "2", "100%", "239"]  # sorted by wid
    assert table[2].split() == ["3", "node-b:77", "node-b", "77", "4", "4", "100%", "1000"]
    assert len({len(line) for line in table[:3]}) == 1  # aligned columns
    assert "MapReduce   1 slave   5 job(s)" in lines
    jobs = lines[lines.index("MapReduce   1 slave   5 job(s)") + 1 :]
    assert jobs[0].split() == ["JOB", "NAME", "MAP", "REDUCE", "STATE"]
    assert jobs[1].split() == ["wc@1", "wordcount", "3/10", "0/4", "running"]  # a master that does not say
    assert jobs[2].split() == ["sort@2", "sort", "5/5", "2/2", "done"]
    assert jobs[3].split() == ["bad@3", "bad", "1/4", "0/2", "failed", "(ValueError:", "no", "good)"]
    assert jobs[4].split() == ["k@4", "stopped", "0/1", "0/1", "killed"]
    assert jobs[5].split() == ["x@5", "odd", "1/1", "1/1", "done"]  # an unknown state: by the phases

    empty = format_status({"stats": {}, "queued": 0, "running": 0, "clients": 0, "workers": [], "uptime": 5})
    assert empty.splitlines()[0] == "broker      (in process)   up 5 s"
    assert "no workers connected" in empty
    assert "tasks/s" not in empty
