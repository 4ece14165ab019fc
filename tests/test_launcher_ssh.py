"""The launcher on other hosts: ``python -m asyncdist --hosts ... script.py`` as a real subprocess.

The hosts are the test sshds (``SSH_TEST_*``, ``NETNS_HOSTS_*``), named by their ``Host``
aliases in the OpenSSH client config the scripts write (``--ssh-config``); the tests that
need them are skipped without. Every host is this machine, so the remote workers are found
in ``/proc``: by their command line (``asyncdist.spawn --child worker``) and by a mark a
``--prolog`` exports into their environment. The argument handling (``_expand_hosts``,
``_distribute``, ``_launch_hosts``) is tested without SSH.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _ssh import (
    SKIP_REASON,
    SSHSite,
    bound,
    gone,
    identity,
    is_guard,
    kill_if_alive,
    pids_with_env,
    read_proc,
    settle,
    sites_from_environment,
    ssh_server_ip,
)
from _util import SCALE, cpu_count, eventually
from _util import stop as stop_subprocess

from asyncdist import cli

pytestmark = pytest.mark.timeout(int(60 * SCALE))

ROOT = Path(__file__).resolve().parent.parent
PI = ROOT / "examples" / "pi.py"
SITES = sites_from_environment()
#: The variable the tests' prologs export on the hosts (its value is per test).
MARK = "ASYNCDIST_LAUNCHER_TEST_MARK"
NETNS_SKIP = "no network-namespace test hosts: run `bash .ci/netns-hosts.sh up 3` and eval its output"


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(params=[s.id for s in SITES] or ["no-hosts"])
def each_site(request: pytest.FixtureRequest) -> SSHSite:
    """The loopback sshd, then the namespace hosts."""
    site = next((s for s in SITES if s.id == request.param), None)
    if site is None:
        pytest.skip(SKIP_REASON)
    return site


@pytest.fixture
def netns() -> SSHSite:
    site = next((s for s in SITES if s.netns), None)
    if site is None or len(site.names) < 3:
        pytest.skip(NETNS_SKIP)
    return site


@pytest.fixture
def best_site() -> SSHSite:
    """The namespace hosts when there are any, else the loopback sshd."""
    if not SITES:
        pytest.skip(SKIP_REASON)
    return SITES[-1]


@pytest.fixture
def mark() -> Iterator[str]:
    """A value for :data:`MARK`: no process may carry it after the test (leftovers are killed)."""
    value = uuid.uuid4().hex
    yield value
    settle(MARK, value)
    killed = kill_if_alive([identity(p) for p in pids_with_env(MARK, value)])
    assert not killed, f"remote processes left running (now killed): {killed}"


def prolog(value: str) -> str:
    return f"export {MARK}={value}"


def worker_guards(value: str) -> list[int]:
    """The spawn guards of remote workers that carry the mark."""
    return [p for p in pids_with_env(MARK, value) if is_guard(p, "worker")]


def guards_of_script(script: Path) -> list[int]:
    """Remote worker guards started for ``script`` (their command line has ``--main SCRIPT``)."""
    needle = [b"--main", str(script).encode()]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_guard(int(entry), "worker"):
            words = read_proc(int(entry), "cmdline").split(b"\0")
            if any(words[i : i + 2] == needle for i in range(len(words))):
                found.append(int(entry))
    return found


PROBE = """
import argparse, json, os, socket, sys, time
from pathlib import Path

import asyncdist

MARK = %r


def where(delay):
    time.sleep(delay)
    return socket.gethostname(), os.getpid(), os.environ.get(MARK)


def busy(directory, seconds):
    Path(directory, f"started-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds)


async def main(args):
    if args.busy:
        tasks = [asyncdist.submit(busy, args.busy, 120.0) for _ in range(args.tasks)]
        print("BUSY", flush=True)
        await asyncdist.wait(tasks)
        return
    got = await asyncdist.map(where, [0.05] * args.tasks)
    print("RESULT " + json.dumps(sorted(set(got))), flush=True)
    if args.hold:
        print("HOLD", flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("tasks", type=int)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--busy")
    asyncdist.run(main(parser.parse_args()))
"""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    """A script for the launcher: it maps a task that says where it ran (hostname, pid, the mark)."""
    path = tmp_path / "probe.py"
    path.write_text(PROBE % MARK)
    return path


class Launcher:
    """``python -m asyncdist ARGS`` in a subprocess; its output (stdout and stderr) line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def readline(self) -> str | None:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            return None
        line = raw.decode(errors="replace").rstrip("\n")
        self.lines.append(line)
        return line

    async def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        """The first (next) line that starts with ``prefix``."""
        async with asyncio.timeout(bound(timeout)):
            while (line := await self.readline()) is not None:
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"the launcher ended without printing {prefix!r}:\n" + self.output)

    async def finish(self, timeout: float = 30.0) -> int:
        """Close its stdin, read the rest of its output, and reap it: its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        async with asyncio.timeout(bound(timeout)):
            while await self.readline() is not None:
                pass
            return await self.proc.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@contextlib.asynccontextmanager
async def launcher(*args: object) -> AsyncIterator[Launcher]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncdist",
        *map(str, args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        yield Launcher(proc)
    finally:
        await stop_subprocess(proc)  # by its pid: SIGTERM, SIGKILL if it lingers; reaped
        assert proc.stdout is not None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await proc.stdout.read()


def result(line: str) -> list[tuple[str, int, str | None]]:
    return [(str(name), int(pid), mark) for name, pid, mark in json.loads(line.removeprefix("RESULT "))]


# -- the seed's pi example ------------------------------------------------------------------------


async def test_pi_example_on_the_hosts(each_site: SSHSite) -> None:
    site = each_site
    n = max(2, len(site.names))
    t0 = time.monotonic()
    async with launcher("--hosts", *site.names, "--ssh-config", site.config, "-n", n, PI) as run:
        code = await run.finish(timeout=45)
    elapsed = time.monotonic() - t0
    assert code == 0, run.output
    values = [float(m[1]) for m in re.finditer(r"^value of pi = (\S+)$", run.output, re.M)]
    assert len(values) == 3, run.output
    assert all(abs(v - 3.14159) < 0.1 for v in values), values
    assert "number of workers 3000 - number of attempts 3000" in run.output
    print(f"pi on {site.id} ({n} workers): {elapsed:.1f} s")
    assert guards_of_script(PI) == []  # the launcher stopped its remote workers


# -- hostfile, prolog, tunnel -----------------------------------------------------------------------


async def test_hostfile_counts_and_prolog(netns: SSHSite, probe: Path, tmp_path: Path, mark: str) -> None:
    """SCOOP's hostfile: a count per host (none: its core count); the prolog runs before each worker."""
    n1, n2, n3 = netns.names[:3]
    hostfile = tmp_path / "hosts"
    # A host without a count gets its core count: only where that is small (it is this machine's).
    bare = cpu_count() <= 4
    counts = {n1: 2, n2: cpu_count() if bare else 2, n3: 1}
    hostfile.write_text(f"# test hosts\n{n1} 2   # two workers\n\n{n2}{'' if bare else ' 2'}\n   {n3}\t1\n")
    runs = tmp_path / "prolog-runs"
    ran = f'{prolog(mark)} && echo "$(hostname)" >> {runs}'
    args = ("--hostfile", hostfile, "--ssh-config", netns.config, "--prolog", ran, probe, "12", "--hold")
    async with launcher(*args) as run:
        got = result(await run.wait_for("RESULT "))
        await run.wait_for("HOLD")
        per_host = collections.Counter(netns.name_of_ip(ssh_server_ip(p) or "") for p in worker_guards(mark))
        assert per_host == counts, per_host
        assert await run.finish() == 0, run.output
    # The tasks ran on the hosts, and see what the prolog exported.
    assert {name for name, _, _ in got} <= {n1, n2, n3}
    assert {m for _, _, m in got} == {mark}
    # The prolog ran once before each worker, on its host.
    assert collections.Counter(runs.read_text().split()) == per_host
    await eventually(lambda: pids_with_env(MARK, mark) == [], "remote processes after the launcher ended")


async def test_tunnel(netns: SSHSite, probe: Path, mark: str) -> None:
    names = netns.names
    args = ("--hosts", *names, "--ssh-config", netns.config, "--tunnel", "--prolog", prolog(mark))
    async with launcher(*args, "-n", len(names), probe, "12", "--hold") as run:
        got = result(await run.wait_for("RESULT "))
        await run.wait_for("HOLD")
        guards = worker_guards(mark)
        assert len(guards) == len(names)
        for pid in guards:
            words = read_proc(pid, "cmdline").split(b"\0")
            # The broker listens on the launcher's loopback: the workers reach it through their sshd.
            assert words[words.index(b"--broker") + 1].startswith(b"127.0.0.1:")
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert await run.finish() == 0, run.output
    assert {name for name, _, _ in got} == set(names)
    await eventually(lambda: pids_with_env(MARK, mark) == [], "remote processes after the launcher ended")


# -- a launcher killed mid-run leaves nothing on the hosts --------------------------------------------


async def test_launcher_killed_mid_run_leaves_no_remote_worker(
    best_site: SSHSite, probe: Path, tmp_path: Path, mark: str
) -> None:
    site = best_site
    n = max(3, len(site.names))
    args = ("--hosts", *site.names, "--ssh-config", site.config, "--prolog", prolog(mark), "-n", n)
    # More tasks than workers: a worker that joins the broker late still finds one queued.
    async with launcher(*args, probe, str(3 * n), "--busy", tmp_path) as run:
        await run.wait_for("BUSY")

        def busy_workers() -> set[int]:
            return {int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")}

        await eventually(lambda: len(busy_workers()) == n, "the workers did not all start a task", 15.0)
        guards = worker_guards(mark)
        assert len(guards) == n
        assert {ssh_server_ip(p) for p in guards} == set(site.ips)
        everything = pids_with_env(MARK, mark)  # the guards and the workers
        assert len(everything) == 2 * n
        assert busy_workers() <= set(everything) - set(guards)
        os.kill(run.proc.pid, signal.SIGKILL)  # no cleanup code runs in the launcher
        assert await run.proc.wait() == -signal.SIGKILL
        t0 = time.monotonic()
        # Each guard sees its stdin close, SIGTERMs its worker (busy in a task), SIGKILLs it later.
        await gone(everything, "remote workers after their launcher was SIGKILLed", timeout=15.0)
        print(f"remote workers gone {time.monotonic() - t0:.2f} s after the launcher was killed")
    assert pids_with_env(MARK, mark) == []


# -- errors -------------------------------------------------------------------------------------------


async def test_unreachable_host_is_an_error_naming_it(best_site: SSHSite, probe: Path) -> None:
    site = best_site
    args = ("--hosts", site.names[0], "no-such-host.invalid", "--ssh-config", site.config)
    async with launcher(*args, "--connect-timeout", "3", probe, "1") as run:
        assert await run.finish() == 1
    assert "could not start the cluster" in run.output
    assert "no-such-host.invalid" in run.output
    assert "Traceback" not in run.output


def test_bad_hostfile_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 2\nnode2 two\n")
    script = tmp_path / "script.py"
    script.write_text("print('never')\n")
    assert cli.main(["--hostfile", str(hostfile), str(script)]) != 0
    assert "asyncdist: error: hostfile line 2" in capsys.readouterr().err


def test_missing_hostfile_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "script.py"
    script.write_text("print('never')\n")
    assert cli.main(["--hostfile", str(tmp_path / "nope"), str(script)]) == 1
    assert "asyncdist: error:" in capsys.readouterr().err


# -- the argument handling (no SSH) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expanded"),
    [
        (["--hosts", "h1", "h2", "script.py"], ["--hosts", "h1", "--hosts", "h2", "script.py"]),
        (["--hosts", "h1", "script.py", "a"], ["--hosts", "h1", "script.py", "a"]),
        (
            ["--hosts", "h1", "u@h2:2222", "-n", "4", "--tunnel", "script.py", "x.py", "-n", "1"],
            ["--hosts", "h1", "--hosts", "u@h2:2222", "-n", "4", "--tunnel", "script.py", "x.py", "-n", "1"],
        ),
        (
            ["-n", "2", "--hosts", "a", "b", "c", "--ssh-config", "cfg", "run.py"],
            ["-n", "2", "--hosts", "a", "--hosts", "b", "--hosts", "c", "--ssh-config", "cfg", "run.py"],
        ),
        (["--hosts=h1", "script.py"], ["--hosts=h1", "script.py"]),
        (["--hostfile", "hosts", "script.py"], ["--hostfile", "hosts", "script.py"]),
        (["-n", "2", "script.py"], ["-n", "2", "script.py"]),
    ],
)
def test_expand_hosts(argv: list[str], expanded: list[str]) -> None:
    assert cli._expand_hosts(argv) == expanded
    expanded = cli._expand_hosts(["--hosts", "h1", "h2", "s.py", "--hosts", "x", "y"])
    args = cli.launcher_parser().parse_args(expanded)
    assert args.hosts == ["h1", "h2"]
    assert args.args == ["--hosts", "x", "y"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--hosts", "master", "node1", "script.py"],
        ["--hosts", "node1", "worker", "script.py"],
        ["-n", "2", "--host", "broker", "script.py"],
        ["--python", "/usr/bin/python3", "--hosts", "ns", "--prolog", "slave", "script.py"],
    ],
)
def test_a_host_named_like_a_command_is_still_a_launch(argv: list[str]) -> None:
    """Option values (a host named 'master', 'worker'...) are not taken for commands."""
    expanded = cli._expand_hosts(argv)
    parser = cli.build_parser()
    assert cli._is_launch(expanded, parser)
    assert cli.launcher_parser().parse_args(expanded).script == "script.py"
    assert not cli._is_launch(["master", "--port", "0"], parser)  # the commands still work
    assert not cli._is_launch(["--version"], parser)


def test_distribute_keeps_the_hostfile_counts() -> None:
    assert cli._distribute([("a", 2), ("b", None), ("c", 0)], None) == {"a": 2, "b": None, "c": 0}
    # A host named twice: its counts add up (a host without a count adds none).
    hosts = [("a", 1), ("b", None), ("a", 2), ("b", None), ("c", None), ("c", 3)]
    assert cli._distribute(hosts, None) == {"a": 3, "b": None, "c": 3}
    assert list(cli._distribute([("z", 1), ("a", 1)], None)) == ["z", "a"]  # in order


def test_distribute_spreads_n_workers() -> None:
    # No counts: round robin, in the hosts' order.
    assert cli._distribute([("a", None), ("b", None), ("c", None)], 7) == {"a": 3, "b": 2, "c": 2}
    assert cli._distribute([("a", None), ("b", None)], 1) == {"a": 1, "b": 0}
    # Counts: each host filled up to its count first, in order...
    assert cli._distribute([("a", 2), ("b", 2)], 3) == {"a": 2, "b": 1}
    assert cli._distribute([("a", 2), ("b", None), ("c", 1)], 3) == {"a": 2, "b": 0, "c": 1}
    # ... and what is left goes round robin over every host.
    assert cli._distribute([("a", 2), ("b", 1)], 5) == {"a": 3, "b": 2}
    assert cli._distribute([("a", 1), ("b", None)], 4) == {"a": 3, "b": 1}
    assert sum(c or 0 for c in cli._distribute([("a", 3), ("b", None), ("a", 1)], 11).values()) == 11
    assert cli._distribute([("a", 2)], 0) == {"a": 0}


SCHEDULER_VARIABLES = (
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_TASKS_PER_NODE",
    "PBS_NODEFILE",
    "PE_HOSTFILE",
)


def _run_args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"hosts": None, "hostfile": None, "local": False, **kw})


def test_launch_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cli._launch_hosts(_run_args()) is None  # a local cluster
    hostfile = tmp_path / "hosts"
    hostfile.write_text("c 2\nd\n")
    assert cli._launch_hosts(_run_args(hosts=["a", "b"], hostfile=str(hostfile))) == [
        ("a", None),
        ("b", None),
        ("c", 2),
        ("d", None),
    ]
    # In a batch job, its hosts; --hosts, --hostfile or --local win.
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    assert cli._launch_hosts(_run_args()) == [("n1", 4), ("n2", 4)]
    assert cli._launch_hosts(_run_args(hosts=["a"])) == [("a", None)]
    assert cli._launch_hosts(_run_args(local=True)) is None
