"""The futures command line: ``asyncdist broker``, ``asyncdist worker`` / ``asyncdist-worker``,
and the launcher ``python -m asyncdist [-n N] script.py args...`` (real subprocesses)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import _futures_tasks as T
import pytest
from _util import SCALE, alive, cpu_count, stop
from _util import eventually as _eventually

from asyncdist import AuthenticationError, Pool

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry)):
            found.append(int(entry))
    return found


def env_with_tests_on_path() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("ASYNCDIST_SECRET", "ASYNCDIST_SECRET_FILE", "ASYNCDIST_BROKER"):
        env.pop(name, None)
    paths = [str(TESTS), *(p for p in sys.path if p and os.path.isdir(p))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


eventually = functools.partial(_eventually, timeout=10.0)


@contextlib.asynccontextmanager
async def process(
    *cmd: str, log: Path, stdin: int = subprocess.DEVNULL
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A subprocess with output to ``log``; SIGTERM, then SIGKILL, and reaped on exit."""
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=stdin, stdout=out, stderr=out, env=env_with_tests_on_path()
        )
    try:
        yield proc
    finally:
        await stop(proc)


async def exit_code(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> int:
    async with asyncio.timeout(timeout * SCALE):
        return await proc.wait()


# -- broker and worker commands -----------------------------------------------------------------


async def test_broker_and_worker_commands_form_a_cluster(tmp_path: Path, secret: str) -> None:
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    broker_log = tmp_path / "broker.log"
    broker_cmd = [sys.executable, "-m", "asyncdist", "broker", "--port", "0"]
    async with process(*broker_cmd, "--secret-file", str(secret_file), log=broker_log) as broker:
        await eventually(lambda: "listening on" in broker_log.read_text(), "the broker did not start")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", broker_log.read_text())
        assert match is not None, broker_log.read_text()
        address = f"127.0.0.1:{match.group(1)}"
        entry_point = BIN / "asyncdist-worker"
        assert entry_point.exists()
        by_file = ["--secret-file", str(secret_file)]
        entry_cmd = [str(entry_point), "--broker", address, *by_file, "--slots", "2"]
        module_cmd = [sys.executable, "-m", "asyncdist", "worker", "--broker", address]
        async with (
            process(*entry_cmd, "--name", "by-entry-point", log=tmp_path / "w1.log") as w1,
            process(*module_cmd, *by_file, "--name", "by-command", log=tmp_path / "w2.log") as w2,
            Pool(broker=address, secret_file=secret_file) as pool,
        ):

            async def both_joined() -> bool:
                return len((await pool.status())["workers"]) == 2

            await eventually(both_joined, "the workers did not join")
            status = await pool.status()
            by_name = {w["name"]: w for w in status["workers"]}
            assert set(by_name) == {"by-entry-point", "by-command"}
            assert by_name["by-entry-point"]["slots"] == 2
            assert by_name["by-command"]["slots"] == 1
            assert {w["pid"] for w in status["workers"]} == {w1.pid, w2.pid}
            pids = await pool.map(T.api_pid_after, [0.01] * 100)
            assert set(pids) == {w1.pid, w2.pid}
            offset = 3
            assert await pool.map(lambda x: x + offset, range(3)) == [3, 4, 5]  # by value: authenticated
            assert await pool.submit(T.api_kwargs, 1, b=2, tag="cli") == {"sum": 3, "tag": "cli"}

            # --secret-stdin --watch-stdin (how pools start their workers): EOF makes it leave.
            stdin_cmd = [*module_cmd, "--secret-stdin", "--watch-stdin", "--name", "by-stdin"]
            async with process(*stdin_cmd, log=tmp_path / "w3.log", stdin=subprocess.PIPE) as w3:
                assert w3.stdin is not None
                w3.stdin.write(secret.encode() + b"\n")
                await w3.stdin.drain()

                async def three_joined() -> bool:
                    return len((await pool.status())["workers"]) == 3

                await eventually(three_joined, "the stdin worker did not join")
                w3.stdin.close()
                assert await exit_code(w3) == 0
            await eventually(both_joined, "the stdin worker did not leave")
            assert (await pool.status())["stats"]["workers_lost"] == 1

            # Stopping the broker (SIGTERM) ends it cleanly, and its workers with it.
            await pool.aclose()
            broker.send_signal(signal.SIGTERM)
            assert await exit_code(broker) == 0, broker_log.read_text()
            assert await exit_code(w1) == 0, (tmp_path / "w1.log").read_text()
            assert await exit_code(w2) == 0, (tmp_path / "w2.log").read_text()


async def test_worker_with_a_wrong_secret_fails_with_a_clear_error(tmp_path: Path, secret: str) -> None:
    right = tmp_path / "right.secret"
    right.write_text(secret)
    right.chmod(0o600)
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("another-secret-0123456789abcdef-xyz")
    wrong.chmod(0o600)
    broker_log = tmp_path / "broker.log"
    broker_cmd = [sys.executable, "-m", "asyncdist", "broker", "--port", "0", "--secret-file", str(right)]
    async with process(*broker_cmd, log=broker_log):
        await eventually(lambda: "listening on" in broker_log.read_text(), "the broker did not start")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", broker_log.read_text())
        assert match is not None
        address = f"127.0.0.1:{match.group(1)}"
        worker_log = tmp_path / "worker.log"
        worker_cmd = [str(BIN / "asyncdist-worker"), "--broker", address, "--secret-file", str(wrong)]
        async with process(*worker_cmd, log=worker_log) as worker:
            assert await exit_code(worker) == 1
        assert "asyncdist: error:" in worker_log.read_text()
        with pytest.raises(AuthenticationError):
            async with Pool(broker=address, secret="another-secret-0123456789abcdef-xyz"):
                pass


def test_worker_entry_point_help() -> None:
    for cmd in (
        [str(BIN / "asyncdist-worker"), "--help"],
        [sys.executable, "-m", "asyncdist", "worker", "-h"],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "--broker" in result.stdout
        assert "--slots" in result.stdout
        assert "--secret-file" in result.stdout
    result = subprocess.run(
        [str(BIN / "asyncdist-worker")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "--broker" in result.stderr


# -- the launcher ---------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import json
    import os
    import sys

    import asyncdist
    from asyncdist.futures import default_pool

    FACTOR = 7           # a script global, used by a task
    CALLS = []           # module-level state of the script, kept by each worker process
    LOADED_AS = __name__


    def scaled(x):
        CALLS.append(x)
        return os.getpid(), x * FACTOR


    def where(_):
        return {
            "pid": os.getpid(),
            "module": __name__,
            "loaded_as": LOADED_AS,
            "calls": len(CALLS),
            "ran_main_block": globals().get("RAN_MAIN_BLOCK", False),
        }


    def shout(tag):
        print(f"worker-says-{tag}-{os.getpid()}", flush=True)
        print(f"worker-warns-{tag}", file=sys.stderr, flush=True)
        return os.getpid()


    def fail(x):
        raise ValueError(f"task failed on {x}")


    async def main(mode):
        scaled_results = await asyncdist.map(scaled, range(10))
        infos = await asyncdist.map(where, range(6))
        shouted = await asyncdist.map(shout, ["hello"] * 4)
        pool = await default_pool()
        workers = sorted(w["pid"] for w in (await pool.status())["workers"])
        print("RESULT " + json.dumps({
            "argv": sys.argv[1:],
            "scaled": scaled_results,
            "infos": infos,
            "shouted": shouted,
            "workers": workers,
        }), flush=True)
        if mode == "raise":
            await asyncdist.map(fail, range(3))


    if __name__ == "__main__":
        RAN_MAIN_BLOCK = True
        mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
        asyncio.run(main(mode))
        if mode == "exit3":
            sys.exit(3)
    """
)


def run_script(
    tmp_path: Path, launcher_args: list[str], script_args: list[str], *, command: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    script = tmp_path / "root_program.py"
    script.write_text(SCRIPT)
    prefix = command if command is not None else [sys.executable, "-m", "asyncdist"]
    result = subprocess.run(
        [*prefix, *launcher_args, str(script), *script_args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, (result.stdout, result.stderr)
    data = json.loads(lines[0].removeprefix("RESULT "))
    # No worker outlives the launcher.
    assert not [pid for pid in data["workers"] if alive(pid)], "worker processes left behind"
    assert processes_mentioning(str(script)) == [], "processes of the script left behind"
    return result, data


def test_launcher_runs_the_script_as_root_program_with_workers_importing_it(tmp_path: Path) -> None:
    result, data = run_script(tmp_path, ["-n", "2"], ["ok", "--flag", "value", "-n", "5"])
    assert result.returncode == 0, result.stderr
    # Script arguments pass through untouched (also ones that look like launcher options).
    assert data["argv"] == ["ok", "--flag", "value", "-n", "5"]
    workers = set(data["workers"])
    assert len(workers) == 2
    assert os.getpid() not in workers
    # A function using a script global.
    assert [value for _, value in data["scaled"]] == [7 * x for x in range(10)]
    # Functions of the script's top level run on the workers by reference: the workers
    # imported the script as a module (not as __main__, without running its main block),
    # and its module-level state is shared by all of its functions in a worker.
    per_worker_calls = Counter(pid for pid, _ in data["scaled"])
    for info in data["infos"]:
        assert info["pid"] in workers
        assert info["module"] != "__main__"
        assert info["module"] == info["loaded_as"]
        assert info["ran_main_block"] is False
        assert info["calls"] == per_worker_calls[info["pid"]], (info, per_worker_calls)
    # Worker output is streamed to the launcher's stdout and stderr.
    for pid in data["shouted"]:
        assert f"worker-says-hello-{pid}" in result.stdout
    assert result.stderr.count("worker-warns-hello") == 4


def test_launcher_exit_status_is_the_scripts(tmp_path: Path) -> None:
    result, _ = run_script(tmp_path, ["-n", "1"], ["exit3"])
    assert result.returncode == 3, result.stderr
    result, data = run_script(tmp_path, ["-n", "1"], ["raise"])
    assert result.returncode == 1
    assert "ValueError: task failed on" in result.stderr
    assert "Traceback" in result.stderr
    assert len(data["workers"]) == 1


def test_launcher_starts_one_worker_per_cpu_by_default(tmp_path: Path) -> None:
    result, data = run_script(tmp_path, [], ["ok"])
    assert result.returncode == 0, result.stderr
    assert len(data["workers"]) == cpu_count()
    # `asyncdist run` is the same launcher.
    result, data = run_script(tmp_path, ["-n", "2"], ["ok"], command=[str(BIN / "asyncdist"), "run"])
    assert result.returncode == 0, result.stderr
    assert len(data["workers"]) == 2
    assert data["argv"] == ["ok"]


def test_launcher_reports_a_missing_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncdist", "-n", "1", str(tmp_path / "nope.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no such script" in result.stderr
