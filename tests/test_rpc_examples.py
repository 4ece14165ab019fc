"""The RPC examples (examples/rpc/) run as real processes and print exactly what they promise.

The classic client runs against ``python -m asyncdist rpc-classic
--allow-classic`` (the seed's ``rpyc_classic.py``), and once against a
server that is not a classic one; the callbacks example runs alone and
against ``python -m asyncdist rpc --service callbacks:ComputeService``.
Every process is started with ``sys.executable``, bounded by a timeout, and
stopped and reaped by its PID whatever happens. The last test runs the
callbacks example's services in this process: a call that arrives in the
same read as the answer that ends an async ``on_connect`` waits for it.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import re
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _util import SCALE, free_port, read_until, stop

from asyncdist import rpc

ROOT = Path(__file__).resolve().parent.parent
RPC_EXAMPLES = ROOT / "examples" / "rpc"
#: The bound of one example run, or of a server's start (scaled).
BOUND = 30 * SCALE

CLASSIC_OUTPUT = re.compile(
    r"hi python cookbook\n"
    r"the server runs Python 3\.\d+\.\d+\S*\n"
    r"eval on the server: 6 \* 7 = 42\n"
    r"remote NameError: name 'prit' is not defined\n"
)


def callbacks_output(connection_number: int = 1) -> str:
    return textwrap.dedent(f"""\
        hello, callbacks-client: you are connection #{connection_number} of this service
        progress: 25% (250000 of 1000000)
        progress: 50% (500000 of 1000000)
        progress: 75% (750000 of 1000000)
        progress: 100% (1000000 of 1000000)
        sum of squares below 1000000 = 333332833333500000
        ping-pong: server 5 > client 4 > server 3 > client 2 > server 1 > client 0
        the server called back here 8 times: {{'name': 1, 'progress': 4, 'pong': 3}}
        """)


def pubsub_output(subscribers: int, events: int) -> str:
    """What ``pubsub.py --subscribers S --events E`` prints (the whole of it)."""
    first = [f"event {n}" for n in range(1, events + 1)]
    lines = [f"server: sub-{i} subscribed (subscribers: {i})" for i in range(1, subscribers + 1)]
    lines += [f"publisher: {e!r} sent to {subscribers} subscribers" for e in first]
    lines += [f"sub-{i} received {first}" for i in range(1, subscribers + 1)]
    lines += [
        "sub-1 disconnects",
        f"server: sub-1 unsubscribed on disconnect (subscribers: {subscribers - 1})",
    ]
    last = f"event {events + 1}"
    lines.append(f"publisher: {last!r} sent to {subscribers - 1} subscribers")
    lines += [f"sub-{i} received {[*first, last]}" for i in range(2, subscribers + 1)]
    lines += [
        f"server: sub-{i} unsubscribed on disconnect (subscribers: {subscribers - i})"
        for i in range(2, subscribers + 1)
    ]
    return "".join(line + "\n" for line in lines)


def printed_in_docstring(name: str) -> list[str]:
    """The lines an example's docstring says it prints (the indented block after "It prints")."""
    doc = ast.get_docstring(ast.parse((RPC_EXAMPLES / name).read_text()))
    assert doc is not None, name
    block = doc.partition("It prints")[2].partition("\n\n")[2]
    return [line.strip() for line in block.partition("\n\n\n")[0].splitlines() if line.strip()]


def load_example(name: str) -> ModuleType:
    """Import examples/rpc/NAME.py (under another module name), for its services."""
    spec = importlib.util.spec_from_file_location(f"rpc_example_{name}", RPC_EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Processes:
    """The processes of one test; ``close()`` stops and reaps each one by its PID."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *argv: str, cwd: Path = ROOT) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    async def server(self, *argv: str, cwd: Path = ROOT) -> tuple[asyncio.subprocess.Process, int]:
        """Start a server; return it and the port of its banner ``... listening on HOST:PORT``."""
        proc = await self.start(*argv, cwd=cwd)
        banner = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
        found = await read_until(proc, banner.search, f"{argv}: its banner", [], BOUND)
        return proc, int(found.group(1))

    async def run(self, *argv: str) -> tuple[int, str, str]:
        """Run ``python ARGV`` (from the repository root) to its end: (exit code, stdout, stderr)."""
        proc = await self.start(*argv)
        async with asyncio.timeout(BOUND):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def finish(self, proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
        """Stop a server (SIGTERM, then SIGKILL) and return (exit code, rest of stdout, stderr)."""
        await stop(proc)
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.returncode is not None
        return proc.returncode, (await proc.stdout.read()).decode(), (await proc.stderr.read()).decode()

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await stop(proc)


@pytest.fixture
async def procs() -> AsyncIterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        await processes.close()


def test_every_rpc_example_is_run_and_described() -> None:
    examples = {p.name for p in RPC_EXAMPLES.glob("*.py")}
    assert examples == {"classic_client.py", "callbacks.py", "pubsub.py"}
    readme = (RPC_EXAMPLES / "README.md").read_text()
    for name in examples:
        assert f"python examples/rpc/{name}" in readme, name


def test_the_docstrings_show_what_the_examples_print() -> None:
    assert printed_in_docstring("callbacks.py") == callbacks_output().splitlines()
    promised = [line for line in printed_in_docstring("pubsub.py") if line != "..."]
    printed = pubsub_output(3, 5).splitlines()
    assert promised == [line for line in printed if line in promised]  # in order, "..." elided
    assert len(promised) == len(printed) - 3  # events 2 to 4


async def test_classic_client(procs: Processes) -> None:
    """The seed's example: the server runs the print, and the line appears in the CLIENT's stdout."""
    server, port = await procs.server("-m", "asyncdist", "rpc-classic", "--allow-classic", "--port", "0")
    code, out, err = await procs.run("examples/rpc/classic_client.py", "127.0.0.1", str(port))
    assert code == 0, err
    assert CLASSIC_OUTPUT.fullmatch(out), out
    assert err == ""
    # The redirected print went to the client only: nothing of it in the server's output.
    server_code, server_out, server_err = await procs.finish(server)
    assert server_code == 0, server_err
    assert "hi python cookbook" not in server_out
    assert "Traceback" not in server_err, server_err


async def test_classic_client_against_a_plain_rpc_server(procs: Processes, tmp_path: Path) -> None:
    """A server that is not a classic one refuses: a clear PermissionError, exit 1, no traceback."""
    (tmp_path / "trivial_service.py").write_text(
        textwrap.dedent("""\
            from asyncdist import rpc


            class Echo(rpc.Service):
                def exposed_echo(self, x):
                    return x
            """)
    )
    server, port = await procs.server(
        "-m", "asyncdist", "rpc", "--service", "trivial_service:Echo", "--port", "0", cwd=tmp_path
    )
    code, out, err = await procs.run("examples/rpc/classic_client.py", "127.0.0.1", str(port))
    assert code == 1, (out, err)
    assert err.startswith("classic_client: PermissionError: classic mode is off on this server"), err
    assert "--allow-classic" in err  # it says how to get a classic server
    assert "Traceback" not in err, err
    assert "hi python cookbook" not in out
    # The refusal closed only that client's connection: the server still serves its own service.
    code, out, err = await procs.run(
        "-c",
        "import asyncdist; from asyncdist import rpc\n"
        "async def main():\n"
        f"    async with rpc.connect('127.0.0.1', {port}) as conn:\n"
        "        print(await conn.root.echo('still serving'))\n"
        "asyncdist.run(main())\n",
    )
    assert (code, out) == (0, "still serving\n"), err
    server_code, server_out, server_err = await procs.finish(server)
    assert server_code == 0, server_err
    assert server_out == ""
    assert "Traceback" not in server_err, server_err


async def test_classic_client_without_a_server(procs: Processes) -> None:
    """Nothing listening: exit 1 and how to start the server, no traceback."""
    port = free_port()
    code, out, err = await procs.run("examples/rpc/classic_client.py", "127.0.0.1", str(port))
    assert code == 1, (out, err)
    assert f"cannot connect to 127.0.0.1:{port}" in err, err
    assert "python -m asyncdist rpc-classic --allow-classic" in err
    assert "Traceback" not in err, err


async def test_callbacks(procs: Processes) -> None:
    code, out, err = await procs.run("examples/rpc/callbacks.py")
    assert code == 0, err
    assert out == callbacks_output()
    assert err == ""


async def test_callbacks_against_the_cli_server(procs: Processes) -> None:
    """The same service served by ``asyncdist rpc`` in another process: call-backs across processes."""
    server, port = await procs.server(
        "-m", "asyncdist", "rpc", "--service", "callbacks:ComputeService", "--port", "0", cwd=RPC_EXAMPLES
    )
    for number in (1, 2):  # one service instance per connection
        code, out, err = await procs.run("examples/rpc/callbacks.py", "--connect", f"127.0.0.1:{port}")
        assert code == 0, err
        assert out == callbacks_output(number)
        assert err == ""
    server_code, server_out, server_err = await procs.finish(server)
    assert server_code == 0, server_err
    assert server_out == ""  # the server prints nothing after its banner
    assert "Traceback" not in server_err, server_err


async def test_pubsub(procs: Processes) -> None:
    code, out, err = await procs.run("examples/rpc/pubsub.py")
    assert code == 0, err
    assert out == pubsub_output(3, 5)
    assert err == ""


async def test_pubsub_every_subscriber_gets_every_event_in_order(procs: Processes) -> None:
    """Many one-way events to many subscribers: none lost, none reordered, none duplicated."""
    subscribers, events = 6, 300
    code, out, err = await procs.run(
        "examples/rpc/pubsub.py", "--subscribers", str(subscribers), "--events", str(events)
    )
    assert code == 0, err
    assert "Traceback" not in err, err
    received = {
        m.group(1): ast.literal_eval(m.group(2))
        for m in re.finditer(r"^(sub-\d+) received (\[.*\])$", out, re.M)
    }  # the last report of each subscriber
    expected = [f"event {n}" for n in range(1, events + 2)]
    assert received == {
        f"sub-{i}": expected[:events] if i == 1 else expected for i in range(1, subscribers + 1)
    }
    assert out == pubsub_output(subscribers, events)


@pytest.mark.both_loops
async def test_a_call_right_after_the_answer_that_ends_an_async_on_connect() -> None:
    """The callbacks example's service with an async on_connect that asks the client's name, as it
    first did: a client call arriving together with its answer must wait for on_connect, then run.

    """
    callbacks = load_example("callbacks")

    class NameOnConnect(callbacks.ComputeService):  # type: ignore[name-defined,misc]
        async def on_connect(self, conn: rpc.Connection) -> None:
            self.client = conn.root
            self.client_name = await conn.root.name()  # calls from the client wait for this

    class EagerClient(callbacks.ClientService):  # type: ignore[name-defined,misc]
        """Calls the server right after answering ``name``: the answer and the call arrive together."""

        def __init__(self) -> None:
            super().__init__()
            self.first_call: asyncio.Future[Any] | None = None
            self.called = asyncio.Event()

        def exposed_name(self) -> str:
            if self.first_call is None:
                self.first_call = asyncio.ensure_future(self.server.ping(0))  # sent after this answer
                self.called.set()
            name: str = super().exposed_name()
            return name

    async with (
        rpc.serve(NameOnConnect, "127.0.0.1", 0) as server,
        rpc.connect("127.0.0.1", server.port, service=EagerClient) as conn,
        asyncio.timeout(10 * SCALE),
    ):
        await conn.service.called.wait()
        assert await conn.service.first_call == ["server 0"]
