"""The seed's examples in their blocking style (examples/sync/) run as real processes.

Each example runs with ``sys.executable``: the SCOOP ones plain and under the
launcher (``python -m asyncdist -n 2``), the Pyro ones against ``python -m
asyncdist ns`` on a free port (``ASYNCDIST_NS_PORT``) with their servers, the
RPyC one against ``python -m asyncdist rpc-classic --allow-classic``. Their
output is checked exactly where it is deterministic. The examples print
without flushing, as the seed's do, so they run with ``PYTHONUNBUFFERED=1``.
Every process carries a marker in its environment: after a test, none may be
left (servers are stopped and reaped by their PIDs; the pools' and clusters'
workers must have gone by themselves).
"""

from __future__ import annotations

import asyncio
import os
import re
import string
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _util import SCALE, pids_with_env, read_until, stop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "sync"
#: The bound of one example run, or of a server's start (scaled).
BOUND = 60 * SCALE
MARKER = "SYNC_EXAMPLE_TEST_RUN"

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the leftover check reads /proc")

ALL = {
    "pi.py",
    "map_reduce.py",
    "greeting/server.py",
    "greeting/client.py",
    "chain/chainTopology.py",
    "chain/server_1.py",
    "chain/server_2.py",
    "chain/server_3.py",
    "chain/client.py",
    "shop/shop.py",
    "shop/server.py",
    "shop/client.py",
    "counter_printer.py",
    "wordcount.py",
    "classic_client.py",
}


class Run:
    """The processes of one test, all marked; ``close()`` stops and reaps each by its PID."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
        self.env.update({MARKER: self.marker, "PYTHONUNBUFFERED": "1"})
        self.procs: list[asyncio.subprocess.Process] = []
        self.said: dict[asyncio.subprocess.Process, list[str]] = {}

    async def _spawn(self, argv: tuple[str, ...], cwd: Path, stdin: int | None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            cwd=cwd,
            env=self.env,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    async def server(self, *argv: str, ready: str) -> asyncio.subprocess.Process:
        """Start ``python ARGV`` (from the repository root); wait for the line containing ``ready``."""
        proc = await self._spawn(argv, ROOT, asyncio.subprocess.DEVNULL)
        said = self.said.setdefault(proc, [])
        await read_until(proc, lambda line: ready in line or None, f"{argv}: {ready!r}", said, BOUND)
        return proc

    async def run(self, *argv: str, cwd: Path = ROOT, stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``python ARGV`` to its end: (exit code, stdout, stderr)."""
        proc = await self._spawn(argv, cwd, asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(BOUND):
            out, err = await proc.communicate(stdin)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def finish(self, proc: asyncio.subprocess.Process) -> tuple[list[str], str]:
        """Stop a server; return all it printed (lines) and its stderr."""
        await stop(proc)
        assert proc.stdout is not None
        assert proc.stderr is not None
        lines = self.said.setdefault(proc, [])
        lines += (await proc.stdout.read()).decode().splitlines()
        return lines, (await proc.stderr.read()).decode()

    def leftovers(self) -> list[int]:
        return pids_with_env(MARKER, self.marker)

    async def no_leftovers(self) -> None:
        """Every marked process is gone (workers leave by themselves once their parent exits)."""
        deadline = time.monotonic() + 10 * SCALE
        while (left := self.leftovers()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert left == [], f"processes left behind: {left}"

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await stop(proc)
        for pid in self.leftovers():  # a failed test's strays: started (indirectly) here
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@pytest.fixture
async def run() -> AsyncIterator[Run]:
    processes = Run()
    try:
        yield processes
    finally:
        await processes.close()


@pytest.fixture
async def name_server(run: Run) -> Run:
    """``python -m asyncdist ns`` on a free port, which every later process of the test finds."""
    await run.server("-m", "asyncdist", "ns", "--port", "0", ready="asyncdist name server at")
    banner = run.said[run.procs[-1]][-1]
    found = re.search(r"@127\.0\.0\.1:(\d+)", banner)
    assert found is not None, banner
    run.env["ASYNCDIST_NS_PORT"] = found.group(1)
    return run


def test_every_example_is_run_and_described() -> None:
    found = {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.py")}
    assert found == ALL
    readme = (EXAMPLES / "README.md").read_text()
    for name in ALL - {"chain/chainTopology.py", "shop/shop.py"}:
        assert f"examples/sync/{name}" in readme, name


def test_the_examples_are_blocking_code() -> None:
    """No example imports the async API: they are the blocking originals."""
    for name in ALL:
        text = (EXAMPLES / name).read_text()
        assert "async def" not in text, name
        assert "await " not in text, name
        assert "import asyncdist\n" not in text, name
        imports = re.findall(r"^\s*(?:from \S+ )?import .*$", text, re.M)
        assert any("asyncdist" in line for line in imports), name


# -- SCOOP -----------------------------------------------------------------------------------------

PI_BLOCK = re.compile(
    r"number of workers (\d+) - number of attempts (\d+)\n"
    r"(\d+) points fallen in a unit disk after \n"
    r"value of pi = (3\.1\d*)\n"
    r"error percentage = [\d.e-]+\n"
    r"total time: [\d.e-]+\n"
    r" \n"
)


@pytest.mark.parametrize("launcher", [False, True], ids=["plain", "launcher"])
async def test_pi(run: Run, launcher: bool) -> None:
    prefix = ("-m", "asyncdist", "-n", "2") if launcher else ()
    code, out, err = await run.run(*prefix, "examples/sync/pi.py")
    assert code == 0, err
    assert err == ""
    blocks = list(PI_BLOCK.finditer(out))
    assert "".join(m.group(0) for m in blocks) == out
    assert [(int(m.group(1)), int(m.group(2))) for m in blocks] == [(1000, 1000), (2000, 2000), (3000, 3000)]
    for m in blocks:
        attempts = int(m.group(2))
        assert int(m.group(3)) in range(int(attempts * 0.75), int(attempts * 0.82))  # about pi/4 of them
    await run.no_leftovers()


@pytest.mark.parametrize("launcher", [False, True], ids=["plain", "launcher"])
async def test_map_reduce(run: Run, launcher: bool) -> None:
    prefix = ("-m", "asyncdist", "-n", "2") if launcher else ()
    code, out, err = await run.run(*prefix, "examples/sync/map_reduce.py", "100")
    assert code == 0, err
    assert err == ""
    total = sum(a * a for a in range(100))  # 328350
    assert re.fullmatch(
        rf"futures\.map in SCOOP executed in [\d.]+s with result: {total}\n"
        rf"map python executed in: [\d.]+s with result: {total}\n",
        out,
    ), out
    await run.no_leftovers()


# -- Pyro4 -----------------------------------------------------------------------------------------


async def test_greeting(name_server: Run) -> None:
    run = name_server
    server = await run.server("examples/sync/greeting/server.py", ready="Ready. Object uri = ")
    assert re.fullmatch(r"Ready\. Object uri =  adist:[0-9a-f]{32}@127\.0\.0\.1:\d+", run.said[server][-1])
    code, out, err = await run.run("examples/sync/greeting/client.py", stdin=b"PYRONAME:server\nLiLei\n")
    assert code == 0, err
    assert err == ""
    assert out == "What is the Pyro uri of the greeting object?What is your name? Hi welcome LiLei\n"
    await run.close()
    await run.no_leftovers()


async def test_chain(name_server: Run) -> None:
    run = name_server
    servers = [
        await run.server(f"examples/sync/chain/server_{i}.py", ready=f"server_{i} started") for i in (1, 2, 3)
    ]
    code, out, err = await run.run("examples/sync/chain/client.py")
    assert code == 0, err
    assert err == ""
    assert out == "Result=['passed on from 1', 'passed on from 2', 'passed on from 3', 'complete at 1']\n"
    said = [await run.finish(p) for p in servers]
    assert said[0][0] == [
        "server_1 started ",
        "1 forwarding the message to the object 2",
        "Back at 1; the chain is closed!",
    ]
    assert said[1][0] == ["server_2 started ", "2 forwarding the message to the object 3"]
    assert said[2][0] == ["server_3 started ", "3 forwarding the message to the object 1"]
    for _, err in said:
        assert "Traceback" not in err, err
    await run.close()
    await run.no_leftovers()


SHOP_CLIENT = """\

*** Rashmi is doing shopping with BuyAnythingOnline:
Log on
Deposit money 100
balance=100.00
Rashmi is buying a book for 37
Log out

*** Meeta is doing shopping with BuyAnythingOnline:
Log on
Deposit money 50
balance=50.00
Deposit money 50
balance=100.00
Log out




The accounts in the BuyAnythingOnline:
 Rashmi: 63.00
 Meeta: 100.00
"""


async def test_shop(name_server: Run) -> None:
    run = name_server
    server = await run.server("examples/sync/shop/server.py", ready="['example.shop.Shop']")
    code, out, err = await run.run("examples/sync/shop/client.py")
    assert code == 0, err
    assert err == ""
    uri, _, rest = out.partition("\n")
    assert re.fullmatch(r"adist:[0-9a-f]{32}@127\.0\.0\.1:\d+", uri)
    assert rest == SHOP_CLIENT
    said, err = await run.finish(server)
    assert said == ["['example.shop.Shop']", "logout Rashmi", "logout Meeta"]
    assert "Traceback" not in err, err
    await run.close()
    await run.no_leftovers()


# -- PyCSP, Disco, RPyC ----------------------------------------------------------------------------


async def test_counter_printer(run: Run) -> None:
    code, out, err = await run.run("examples/sync/counter_printer.py")
    assert code == 0, err
    assert err == ""
    assert out == "0 1 2 3 4 "
    await run.no_leftovers()


#: The seed's text, as its string literal makes it (backslash-newline joins the lines).
SEED_TEXT = "There are known knows." + "".join(
    " " * 27 + line
    for line in (
        "These are things we know that we know.",
        "These are known unknown.",
        "That is to say,",
        "there are things that",
        "we know we do not know.",
        "But there are also unknown unknowns.",
        "There are things",
        "we do not know we do not know",
    )
)


async def test_wordcount(run: Run, tmp_path: Path) -> None:
    code, out, err = await run.run(str(EXAMPLES / "wordcount.py"), cwd=tmp_path)
    assert code == 0, err
    assert (out, err) == ("", "")  # show=True: no bars off a terminal
    # The seed's rule (no lower-casing), counted here independently.
    counts = Counter(w.translate(str.maketrans("", "", string.punctuation)) for w in SEED_TEXT.split())
    alphabetical = sorted(counts.items())
    numerical = sorted(alphabetical, key=lambda wc: wc[1], reverse=True)
    assert (tmp_path / "SortAlphabetical.txt").read_text() == "".join(
        f"{w} \t {c}\n" for w, c in alphabetical
    )
    assert (tmp_path / "SortNumberical.txt").read_text() == "".join(f"{w} \t {c}\n" for w, c in numerical)
    assert numerical[:4] == [("are", 6), ("know", 6), ("we", 6), ("do", 3)]
    assert ("There", 2) in alphabetical  # not lower-cased, as the seed's code
    await run.no_leftovers()


async def test_classic_client(run: Run) -> None:
    server = await run.server(
        "-m", "asyncdist", "rpc-classic", "--allow-classic", "--port", "0", ready="listening on 127.0.0.1:"
    )
    found = re.search(r"listening on 127\.0\.0\.1:(\d+)", run.said[server][-1])
    assert found is not None
    code, out, err = await run.run("examples/sync/classic_client.py", found.group(1))
    assert code == 0, err
    assert err == ""
    assert out == "hi here\n"  # printed by the server, after the redirect: here
    said, server_err = await run.finish(server)
    assert said[1:] == ["hi python cookbook"]  # before the redirect: on the server
    assert "Traceback" not in server_err, server_err
    await run.close()
    await run.no_leftovers()
