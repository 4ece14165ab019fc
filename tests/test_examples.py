"""Every script in examples/ runs as-is and prints what it promises."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _util import SCALE, read_until, stop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "echo.py": ["5", "HELLO, Meeta!", "[5, 4, 3, 2, 1]", "remote TypeError:"],
    "pi.py": ["number of workers 3000 - number of attempts 3000", "value of pi = 3.1"],
    "map_reduce.py": ["with result: 2646700", "map python executed in"],
    "recurse.py": ["4096 leaves from depth 12"],
    "callbacks.py": ["as_completed: 25", "wait: [0, 1, 4] done, 0 pending", "cancelled: True"],
    "ssh_cluster.py": [
        "cluster up: 1 host(s)",
        "pi is about 3.1",
        "'the' appears 3 times",
        "hello cluster",
        "through the channel server",
        "cluster down",
    ],
}
# How each example is run: the launcher with 2 workers (the README's main command) or plain.
LAUNCH = {"pi.py", "map_reduce.py", "recurse.py"}
ARGS = {"map_reduce.py": ["200"]}
#: Examples that need a real SSH host (the loopback sshd of .ci/ssh-test-host.sh: SSH_TEST_CONFIG).
SSH = {"ssh_cluster.py"}
if "SSH_TEST_CONFIG" in os.environ:
    ARGS["ssh_cluster.py"] = ["--ssh-config", os.environ["SSH_TEST_CONFIG"], "ssh-test-host"]


def test_every_example_has_expectations() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    if name in SSH and name not in ARGS:
        pytest.skip("needs the loopback sshd: bash .ci/ssh-test-host.sh start, then eval what it prints")
    prefix = ["-m", "asyncdist", "-n", "2"] if name in LAUNCH else []
    result = subprocess.run(
        [sys.executable, *prefix, str(EXAMPLES / name), *ARGS.get(name, [])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for line in EXPECTED[name]:
        assert line in result.stdout, (line, result.stdout)


# -- the remote-objects examples: a name server, servers, then the clients -----------------------

OBJECTS = EXAMPLES / "objects"


class _Processes:
    """Processes of one example run, each started with the name server's port in its environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[asyncio.subprocess.Process] = []
        self.output: dict[str, list[str]] = {}

    async def _spawn(self, argv: tuple[str, ...], stderr: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            cwd=OBJECTS,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        self.procs.append(proc)
        return proc

    async def start(self, *argv: str, ready: str) -> asyncio.subprocess.Process:
        """Start ``python ARGV`` in examples/objects and wait for the line containing ``ready``."""
        proc = await self._spawn(argv, stderr=asyncio.subprocess.STDOUT)
        lines = self.output.setdefault(argv[-1], [])
        await read_until(proc, lambda line: ready in line or None, f"{argv}: {ready!r}", lines, 30 * SCALE)
        return proc

    async def run(self, *argv: str) -> str:
        """Run a client to completion; return its output."""
        proc = await self._spawn(argv, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30 * SCALE):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def rest_of_output(self, proc: asyncio.subprocess.Process, name: str) -> list[str]:
        """Stop a server and return everything it printed."""
        await stop(proc)
        assert proc.stdout is not None
        rest = await proc.stdout.read()
        self.output[name] += rest.decode().splitlines()
        return self.output[name]

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await stop(proc)


@pytest.fixture
async def example_env() -> AsyncIterator[_Processes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    processes = _Processes(env)
    try:
        ns = await processes.start("-m", "asyncdist", "ns", "--port", "0", ready="asyncdist name server at")
        line = processes.output["0"][-1]
        env["ASYNCDIST_NS_PORT"] = re.search(r"@127\.0\.0\.1:(\d+)", line).group(1)  # type: ignore[union-attr]
        assert ns.returncode is None
        yield processes
    finally:
        await processes.close()


def test_every_objects_example_is_run() -> None:
    run_here = {
        "greeting_server.py",
        "greeting_client.py",
        "chain_topology.py",
        "chain_server_1.py",
        "chain_server_2.py",
        "chain_server_3.py",
        "chain_client.py",
        "shop.py",
        "shop_server.py",
        "shop_client.py",
    }
    assert {p.name for p in OBJECTS.glob("*.py")} == run_here


async def test_greeting_example(example_env: _Processes) -> None:
    await example_env.start("greeting_server.py", ready="Ready. Object uri = adist:")
    out = await example_env.run("greeting_client.py", "LiLei")
    assert out == "Hi welcome LiLei\n"


async def test_chain_example(example_env: _Processes) -> None:
    servers = [
        await example_env.start(f"chain_server_{i}.py", ready=f"server_{i} started") for i in (1, 2, 3)
    ]
    out = await example_env.run("chain_client.py")
    assert out == "Result=['passed on from 1', 'passed on from 2', 'passed on from 3', 'complete at 1']\n"
    said = [
        await example_env.rest_of_output(p, f"chain_server_{i}.py")
        for i, p in zip((1, 2, 3), servers, strict=True)
    ]
    assert said[0][1:] == ["1 forwarding the message to the object 2", "Back at 1; the chain is closed!"]
    assert said[1][1:] == ["2 forwarding the message to the object 3"]
    assert said[2][1:] == ["3 forwarding the message to the object 1"]


async def test_shop_example(example_env: _Processes) -> None:
    server = await example_env.start("shop_server.py", ready="['example.shop.Shop']")
    out = await example_env.run("shop_client.py")
    lines = out.splitlines()
    assert re.fullmatch(r"adist:[0-9a-f]{32}@127\.0\.0\.1:\d+", lines[0])
    assert "Rashmi is buying a book for 37" in lines
    assert lines.count("balance=100.00") == 2  # Rashmi after her deposit, Meeta after her second one
    assert "refused: KeyError('unknown account')" in lines
    assert lines[-3:] == ["The accounts in the BuyAnythingOnline:", " Rashmi: 63.00", " Meeta: 100.00"]
    said = await example_env.rest_of_output(server, "shop_server.py")
    assert said[1:] == ["logout Rashmi", "logout Meeta"]
