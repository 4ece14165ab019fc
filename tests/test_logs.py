"""Logging: records of ``asyncdist.*`` name their host and worker; ``Pool(forward_logs=...)``
brings the logs and prints of a client's tasks to that client (SCOOP's logger).

Real worker processes (local pools, pools joined to a pool's broker, workers
started by hand with ``python -m asyncdist worker``, the launcher). Task
functions live in ``tests/_logs_tasks.py``; every line they log or print
carries a tag unique to the test and to the client that submitted the task,
so that the test tells whose output reached which client (all clients of a
test run in this process: the records they re-emit all land in ``caplog``,
their prints in ``capfd``).

Local workers inherit this process's stdout and stderr: under ``capfd`` what
they write themselves (their own log handler on stderr, prints that are not
forwarded) is captured too. A worker's stdout is then a file, block-buffered
(unless PYTHONUNBUFFERED is set): its own prints may show up only when it exits
(the worker command flushes then), so they are checked after the pool is closed.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import _logs_tasks as T
import _util
import pytest
from _util import SCALE, alive, eventually, worker_env

import asyncdist
from asyncdist import Pool, ProtocolError
from asyncdist._log import FORMAT, get_logger
from asyncdist.futures import serve_broker
from asyncdist.futures._broker import Broker

TESTS = Path(__file__).resolve().parent
SOURCE = Path(asyncdist.__file__).resolve().parent
HOST = socket.gethostname()

#: One line as :data:`asyncdist._log.FORMAT` writes it.
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) +(?P<host>\S*) (?P<worker>\S*) "
    r"(?P<name>[\w.]+): (?P<msg>.*)$"
)

#: Seconds a test may take at most (scaled).
LIMIT = int(90 * SCALE)


# -- helpers ------------------------------------------------------------------------------


def new_tag(label: str) -> str:
    """A tag unique to this call: what one client's tasks write carries it."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


def origin(record: logging.LogRecord) -> tuple[Any, Any]:
    """``(record.worker, record.host)``: where a record says it comes from."""
    return getattr(record, "worker", None), getattr(record, "host", None)


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """Records captured here whose message contains ``text``."""
    return [r for r in caplog.records if text in r.getMessage()]


def format_lines(text: str) -> list[dict[str, str]]:
    """The lines of ``text`` written in :data:`FORMAT`, parsed."""
    return [m.groupdict() for m in map(LINE.match, text.splitlines()) if m]


class Output:
    """What this process and its local workers wrote to fds 1 and 2 (capfd), accumulated."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self._capfd = capfd
        self.out = ""
        self.err = ""

    def read(self) -> Output:
        captured = self._capfd.readouterr()
        self.out += captured.out
        self.err += captured.err
        return self

    def out_lines(self, line: str) -> int:
        """How many lines of stdout are exactly ``line``."""
        return self.read().out.splitlines().count(line)

    def err_lines(self, line: str) -> int:
        return self.read().err.splitlines().count(line)


async def names_by_pid(pool: Pool) -> dict[int, str]:
    """The broker's workers: pid -> name."""
    return {w["pid"]: w["name"] for w in (await pool.status())["workers"]}


async def workers_ready(pool: Pool) -> None:
    """Wait until every worker took up its ``worker_hello`` reply (it asks for tasks right after).

    A forwarding client joining before that may not get their logs (see
    test_a_forwarding_client_joining_while_a_worker_joins_gets_its_logs).
    """

    async def check() -> bool:
        workers = (await pool.status())["workers"]
        return bool(workers) and all(w["credit"] > 0 or w["completed"] > 0 for w in workers)

    await eventually(check, "the workers did not ask for tasks")


def clients_are(pool: Pool, n: int) -> Any:
    async def check() -> bool:
        return (await pool.status())["clients"] == n

    return check


@contextlib.asynccontextmanager
async def hand_worker(
    address: str, secret_file: Path, name: str, out: Path, err: Path, *global_options: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m asyncdist [global options] worker --name NAME``; stopped (SIGTERM) and reaped on exit."""
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        options = ("--secret-file", str(secret_file), "--name", name)
        async with _util.hand_worker(
            address, *options, stdout=out_file, stderr=err_file, global_options=global_options
        ) as proc:
            yield proc


# -- 1. records of asyncdist's loggers name their host and worker ---------------------------


@pytest.mark.timeout(LIMIT)
async def test_asyncdist_records_carry_host_and_worker(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncdist")
    async with Pool(workers=1) as pool:
        [name] = (await names_by_pid(pool)).values()
        joined = [
            r for r in caplog.records if r.name == "asyncdist.futures.broker" and "joined" in r.getMessage()
        ]
        assert len(joined) == 1, caplog.text
        record = joined[0]
        assert record.levelno == logging.INFO
        assert record.getMessage().startswith(f"worker 1 joined: {name} (pid ")
        # This process is a client, not a worker: its records name the host and no worker.
        assert record.host == HOST
        assert record.worker == ""
    left = [
        r for r in caplog.records if r.name == "asyncdist.futures.broker" and " left with " in r.getMessage()
    ]
    assert len(left) == 1, caplog.text
    assert (left[0].host, left[0].worker) == (HOST, "")

    # The adapter keeps what the caller passes in ``extra``.
    get_logger("asyncdist.test_logs").warning("with extra", extra={"request": 7})
    [extra] = [r for r in caplog.records if r.name == "asyncdist.test_logs"]
    assert (extra.request, extra.host, extra.worker) == (7, HOST, "")
    assert caplog.text.count("with extra") == 1


def _logger_calls() -> list[tuple[str, int, str, ast.expr | None]]:
    """Every ``get_logger(...)`` / ``getLogger(...)`` call in asyncdist's source.

    Each as (file, line, the function called, its first argument or None).
    """
    calls = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if callee not in ("get_logger", "getLogger"):
                continue
            arg = node.args[0] if node.args else None
            calls.append((str(path.relative_to(SOURCE)), node.lineno, callee, arg))
    return calls


def _root_logging_calls() -> list[tuple[str, int]]:
    """``logging.info(...)`` and friends: records of the root logger, outside ``asyncdist.*``."""
    found = []
    methods = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in methods
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logging"
            ):
                found.append((str(path.relative_to(SOURCE)), node.lineno))
    return found


@pytest.mark.timeout(LIMIT)
def test_every_logger_of_the_source_is_under_asyncdist() -> None:
    calls = _logger_calls()
    named = {ast.literal_eval(arg) for _, _, _, arg in calls if isinstance(arg, ast.Constant)}
    # The components do log (the scan finds them) ...
    assert {"asyncdist.futures.broker", "asyncdist.futures.worker", "asyncdist.connection"} <= named
    # ... each under "asyncdist." ...
    outside = [(f, n, ast.unparse(a)) for f, n, _, a in calls if isinstance(a, ast.Constant) and not (
        a.value == "asyncdist" or str(a.value).startswith("asyncdist.")
    )]  # fmt: skip
    assert outside == []
    # ... through get_logger (whose records carry host and worker), never a bare getLogger("...").
    bare = [(f, n) for f, n, callee, a in calls if callee == "getLogger" and isinstance(a, ast.Constant)]
    assert bare == []
    # Names that are not literals: only get_logger itself and the client re-emitting a worker's
    # record under that record's own name; getLogger() (the root) only to install handlers.
    computed = sorted(
        {(f, ast.unparse(a)) for f, _, _, a in calls if a is not None and not isinstance(a, ast.Constant)}
    )
    assert computed == [("_log.py", "name"), ("futures/_logs.py", "name")]
    roots = sorted({f for f, _, _, a in calls if a is None})
    assert roots == ["_log.py", "futures/_logs.py"]
    assert _root_logging_calls() == []


# -- 2. a worker started by the command line logs in FORMAT, naming itself ----------------


@contextlib.asynccontextmanager
async def cli_cluster(
    tmp_path: Path, secret: str, name: str, *global_options: str
) -> AsyncIterator[tuple[Broker, str, asyncio.subprocess.Process]]:
    """An in-process broker and one ``python -m asyncdist [options] worker --name NAME`` joined to it
    (output in ``tmp_path/worker.out`` and ``worker.err``); yield the broker, its address, the worker."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    broker, server = await serve_broker(secret=secret)
    address = f"127.0.0.1:{server.port}"
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    try:
        async with hand_worker(address, secret_file, name, out, err, *global_options) as proc:
            async with asyncio.timeout(20 * SCALE):
                await broker.wait_for_workers(1)
            [worker] = broker._workers.values()
            assert (worker.name, worker.host, worker.pid) == (name, HOST, proc.pid)
            yield broker, address, proc
    finally:
        await server.aclose()


def line_of(path: Path, text: str) -> dict[str, str] | None:
    """The first line of the file ``path`` in FORMAT whose message contains ``text``."""
    return next((line for line in format_lines(path.read_text()) if text in line["msg"]), None)


@pytest.mark.timeout(LIMIT)
async def test_cli_worker_logs_name_its_host_and_worker(
    tmp_path: Path, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    name = new_tag("cli-worker")
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    async with (
        cli_cluster(tmp_path, secret, name, "--log-level", "INFO") as (broker, address, proc),
        Pool(broker=address, secret=secret) as plain,
    ):
        tag = new_tag("myapp")
        assert await plain.submit(T.myapp_warning, tag) == proc.pid
        assert await plain.submit(T.log_levels, tag) == proc.pid
        await eventually(lambda: line_of(err, f"levels {tag} ERROR"), "the task's records were not logged")
        mine = [line for line in format_lines(err.read_text()) if tag in line["msg"]]
        # The task code's own loggers (no asyncdist adapter) name host and worker too;
        # --log-level INFO: INFO and up, no DEBUG.
        expected = [
            ("WARNING", "myapp", f"myapp says {tag}"),
            ("INFO", T.LOGGER, f"levels {tag} INFO"),
            ("WARNING", T.LOGGER, f"levels {tag} WARNING"),
            ("ERROR", T.LOGGER, f"levels {tag} ERROR"),
        ]
        assert [(m["level"], m["name"], m["msg"]) for m in mine] == expected
        assert {(m["host"], m["worker"]) for m in mine} == {(HOST, name)}
        # A record made in a task has the attributes themselves, for any handler.
        seen = await plain.submit(T.record_attributes, tag)
        assert seen == {"host": HOST, "worker": name, "pid": proc.pid}

        # While a client forwards, the forwarded records are not written by the worker too;
        # once it has gone, they are again.
        async with Pool(broker=address, secret=secret, forward_logs=True) as forwarding:
            tag2 = new_tag("forwarded")
            await forwarding.submit(T.myapp_warning, tag2)
            await eventually(lambda: records(caplog, tag2), "the record was not forwarded")
            [record] = records(caplog, tag2)
            assert (record.name, origin(record)) == ("myapp", (name, HOST))
        await eventually(lambda: broker.status()["clients"] == 1, "the forwarding client stayed")
        tag3 = new_tag("back")
        await plain.submit(T.myapp_warning, tag3)
        await eventually(lambda: line_of(err, f"myapp says {tag3}"), "the worker stopped logging")
        assert line_of(err, f"myapp says {tag2}") is None, err.read_text()
        assert records(caplog, tag3) == []
        await plain.submit(T.shout, tag3)
    # The worker's own prints (its stdout, flushed on exit at the latest), once each.
    assert out.read_text().splitlines().count(f"out {tag3}") == 1
    assert err.read_text().splitlines().count(f"err {tag3}") == 1


@pytest.mark.timeout(LIMIT)
async def test_asyncdist_records_of_a_cli_worker_name_it(tmp_path: Path, secret: str) -> None:
    name = new_tag("cli-worker")
    err = tmp_path / "worker.err"
    async with cli_cluster(tmp_path, secret, name) as (broker, _, _):
        [worker] = broker._workers.values()
        # The worker's connection warns about a notification it has no handler for.
        worker.conn.notify_nowait("no_such_handler_in_the_worker")
        await eventually(
            lambda: line_of(err, "no_such_handler_in_the_worker") or broker.worker_count == 0,
            "the worker neither logged nor left",
        )
        line = line_of(err, "no_such_handler_in_the_worker")
        assert line is not None, err.read_text()
        assert (line["level"], line["host"], line["worker"], line["name"]) == (
            "WARNING",
            HOST,
            name,
            "asyncdist.connection",
        )
        assert broker.worker_count == 1, "the worker lost its broker"
        assert "KeyError" not in err.read_text()


# -- 3. Pool(forward_logs=True): records and prints of the tasks reach the client -----------


@pytest.mark.timeout(LIMIT)
async def test_forwarded_records_and_prints_reach_the_client(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    output = Output(capfd)
    tag = new_tag("fwd")
    async with Pool(workers=2, forward_logs=True) as pool:
        assert pool.forward_logs == logging.INFO
        names = await names_by_pid(pool)
        assert len(set(names.values())) == 2

        plain_pids = await pool.map(T.log_plain, [f"{tag}-p{i}" for i in range(6)])
        async_pids = await pool.map(T.log_async, [f"{tag}-a{i}" for i in range(6)], [logging.WARNING] * 6)
        error_pid = await pool.submit(T.log_exception, tag)
        levels_pid = await pool.submit(T.log_levels, tag)
        for kind, pids, level in (
            ("plain", plain_pids, logging.INFO),
            ("async", async_pids, logging.WARNING),
        ):
            for i, pid in enumerate(pids):
                msg = f"{kind} {tag}-{kind[0]}{i} {logging.getLevelName(level)}"
                await eventually(lambda m=msg: records(caplog, m), f"{msg!r} was not forwarded")
                [record] = records(caplog, msg)
                assert record.getMessage() == msg
                assert (record.name, record.levelno, record.levelname) == (
                    T.LOGGER,
                    level,
                    logging.getLevelName(level),
                )
                assert record.worker == names[pid]
                assert record.host == HOST
                assert record.process == pid
                assert record.funcName == f"log_{kind}"
                assert record.exc_text is None

        # log.exception: the traceback travels as text.
        await eventually(lambda: records(caplog, f"failed {tag}"), "the exception record was not forwarded")
        [failed] = records(caplog, f"failed {tag}")
        assert (failed.levelno, failed.worker, failed.exc_info) == (logging.ERROR, names[error_pid], None)
        assert failed.exc_text is not None
        assert failed.exc_text.startswith("Traceback (most recent call last):")
        assert failed.exc_text.rstrip().endswith(f"ValueError: boom {tag}")
        assert "in log_exception" in failed.exc_text
        assert f"ValueError: boom {tag}" in caplog.text  # a formatter shows it

        # Forwarded at INFO (True): DEBUG records stay behind.
        await eventually(
            lambda: records(caplog, f"levels {tag} ERROR"), "the level records were not forwarded"
        )
        levels = [(r.levelname, r.worker) for r in records(caplog, f"levels {tag} ")]
        assert levels == [(level, names[levels_pid]) for level in ("INFO", "WARNING", "ERROR")]

        # Prints, from plain and async tasks, to this process's stdout and stderr.
        shout_pids = await pool.map(T.shout, [f"{tag}-s{i}" for i in range(4)])
        async_shout_pids = await pool.map(T.async_shout, [f"{tag}-as{i}" for i in range(4)])
        assert set(shout_pids) | set(async_shout_pids) <= set(names)
        expected_out = [f"out {tag}-s{i}" for i in range(4)] + [f"out {tag}-as{i}" for i in range(4)]
        expected_out += [f"half {tag}-{kind}{i} joined" for kind in ("s", "as") for i in range(4)]
        expected_err = [f"err {tag}-s{i}" for i in range(4)] + [f"err {tag}-as{i}" for i in range(4)]

        def all_arrived() -> bool:
            output.read()
            return all(line in output.out.splitlines() for line in expected_out) and all(
                line in output.err.splitlines() for line in expected_err
            )

        await eventually(all_arrived, "the prints did not reach this process")
    output.read()  # what the workers wrote themselves, up to their exit
    for line in expected_out:
        assert output.out_lines(line) == 1, (line, output.out)
        assert output.err_lines(line) == 0
    for line in expected_err:
        assert output.err_lines(line) == 1, (line, output.err)
        assert output.out_lines(line) == 0
    # The worker's own handler did not write the forwarded records too (no double lines).
    assert [line for line in format_lines(output.err) if tag in line["msg"]] == []
    # And every record arrived once.
    for i in range(6):
        assert len(records(caplog, f"plain {tag}-p{i} ")) == 1
        assert len(records(caplog, f"async {tag}-a{i} ")) == 1


# -- 4. routing: each forwarding client gets the output of its own tasks only ---------------


@pytest.mark.timeout(LIMIT)
async def test_each_client_receives_only_the_output_of_its_own_tasks(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    output = Output(capfd)
    tags = {label: new_tag(label) for label in ("a", "b", "c")}
    async with Pool(workers=2, forward_logs=True) as a:
        assert a.address is not None
        async with (
            Pool(broker=a.address, secret=a.secret, forward_logs=True) as b,
            Pool(broker=a.address, secret=a.secret) as c,
        ):
            assert (await a.status())["clients"] == 3
            names = await names_by_pid(a)

            async def work(pool: Pool, tag: str) -> list[int]:
                pids = await pool.map(T.log_plain, [f"{tag}-p{i}" for i in range(8)])
                pids += await pool.map(T.log_async, [f"{tag}-a{i}" for i in range(8)])
                pids += [await pool.submit(T.log_exception, tag)]
                pids += await pool.map(T.shout, [f"{tag}-s{i}" for i in range(4)])
                return pids

            pids = await asyncio.gather(
                *(work(pool, tags[label]) for pool, label in ((a, "a"), (b, "b"), (c, "c")))
            )
            assert set().union(*pids) <= set(names)

            def forwarded(tag: str) -> list[str]:
                msgs = [f"plain {tag}-p{i} INFO" for i in range(8)] + [
                    f"async {tag}-a{i} INFO" for i in range(8)
                ]
                return [*msgs, f"failed {tag}"]

            for label in ("a", "b"):
                for msg in forwarded(tags[label]):
                    await eventually(lambda m=msg: records(caplog, m), f"{msg!r} was not forwarded")

                def printed(tag: str = tags[label]) -> bool:
                    output.read()
                    return all(output.out_lines(f"out {tag}-s{i}") for i in range(4))

                await eventually(printed, f"the prints of client {label} did not arrive")
            # The client without forward_logs ran the same tasks, and all of them finished: the
            # broker had their output by then (a worker sends it before the results).
            for label in ("a", "b"):
                for msg in forwarded(tags[label]):
                    # Once: had the other forwarding client received it too, it would be twice.
                    assert len(records(caplog, msg)) == 1, (msg, caplog.text)
                    [record] = records(caplog, msg)
                    assert record.worker in names.values()
            assert records(caplog, tags["c"]) == [], "the output of a client that did not ask was re-emitted"
    output.read()
    for label in ("a", "b"):
        for i in range(4):
            assert output.out_lines(f"out {tags[label]}-s{i}") == 1, output.out
            assert output.err_lines(f"err {tags[label]}-s{i}") == 1, output.err
    assert records(caplog, tags["c"]) == []


@pytest.mark.timeout(LIMIT)
async def test_output_of_a_non_forwarding_client_is_not_lost(capfd: pytest.CaptureFixture[str]) -> None:
    output = Output(capfd)
    tag = new_tag("quiet")
    async with Pool(workers=1) as quiet:
        assert quiet.address is not None
        await workers_ready(quiet)
        async with Pool(broker=quiet.address, secret=quiet.secret, forward_logs=True) as forwarding:
            await forwarding.submit(T.shout, new_tag("loud"))
            await quiet.submit(T.shout, tag)
            await quiet.submit(T.myapp_warning, tag)
    output.read()
    # Where it would go without the other client: the worker's own stdout and stderr.
    assert output.out_lines(f"out {tag}") == 1, output.out
    assert output.err_lines(f"err {tag}") == 1, output.err
    assert [line["msg"] for line in format_lines(output.err) if tag in line["msg"]] == [f"myapp says {tag}"]


@pytest.mark.timeout(LIMIT)
async def test_a_half_line_on_the_worker_is_not_cut_into_by_forwarded_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A task of a client that does not forward writes half a line; the worker keeps it until
    the line ends, so the lines a forwarding client prints meanwhile (on the same terminal,
    here the same captured fd) stay whole, and so does the worker's line."""
    output = Output(capfd)
    quiet_tag, loud_tag = new_tag("quiet"), new_tag("loud")
    async with Pool(workers=1, slots=2) as quiet:  # two task threads of one process
        assert quiet.address is not None
        await workers_ready(quiet)
        async with Pool(broker=quiet.address, secret=quiet.secret, forward_logs=True) as loud:
            pending = asyncio.ensure_future(quiet.submit(T.two_pieces_on_cue, quiet_tag, str(tmp_path)))
            try:
                await eventually(lambda: (tmp_path / "started").exists(), "the task did not start")
                await loud.submit(T.shout, loud_tag)  # on the other thread: the first is busy
                await eventually(lambda: output.out_lines(f"out {loud_tag}") > 0, "no forwarded line")
            finally:
                (tmp_path / "go").touch()
            await pending
    output.read()
    assert output.out_lines(f"out {loud_tag}") == 1, output.out
    assert output.out_lines(f"half {loud_tag} joined") == 1, output.out
    assert output.out_lines(f"half {quiet_tag} joined") == 1, output.out


@pytest.mark.timeout(LIMIT)
async def test_the_unfinished_last_line_of_a_task_goes_to_its_own_client(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A task that ends without a newline: its text reaches its client when it ends, and is
    not put in front of the next task's first line (another client's, on the same thread)."""
    output = Output(capfd)
    a_tag, b_tag = new_tag("a"), new_tag("b")
    async with Pool(workers=1, forward_logs=True) as a:
        assert a.address is not None
        async with Pool(broker=a.address, secret=a.secret, forward_logs=True) as b:
            await a.submit(T.unfinished_line, a_tag)
            await eventually(lambda: f"unfinished {a_tag}" in output.read().out, "the text did not arrive")
            await b.submit(T.line_of, b_tag)
            await eventually(lambda: f"line {b_tag}\n" in output.read().out, "the line did not arrive")
    output.read()
    # Both clients write to this process's stdout, so a's text and b's line are adjacent
    # there; what matters is that a's came when its task ended, from its own client, once.
    assert output.out.count(f"unfinished {a_tag}") == 1, output.out
    assert output.out.count(f"line {b_tag}\n") == 1, output.out


@pytest.mark.timeout(LIMIT)
async def test_output_of_tiny_inline_tasks_reaches_only_their_client(
    capfd: pytest.CaptureFixture[str],
) -> None:
    output = Output(capfd)
    tag = new_tag("tiny")
    lines = [f"{tag}-{i}" for i in range(2000)]
    async with Pool(workers=1, forward_logs=True) as a:
        assert a.address is not None
        async with Pool(broker=a.address, secret=a.secret, forward_logs=True) as b:
            threads = await b.map(T.quick_shout, lines)

            def all_printed() -> bool:
                output.read()
                return set(lines) <= set(output.out.splitlines())

            await eventually(all_printed, "the prints did not arrive")
    if "MainThread" not in threads:
        pytest.skip("no task ran inline on the worker's loop (the precondition of this bug)")
    output.read()
    inline = [line for line, thread in zip(lines, threads, strict=True) if thread == "MainThread"]
    counts = {line: output.out_lines(line) for line in lines}
    twice = [line for line in inline if counts[line] != 1]
    assert twice == [], f"{len(twice)} of {len(inline)} lines of inline tasks were not printed once"
    assert set(counts.values()) == {1}


# -- 5. levels; stopping --------------------------------------------------------------------


@pytest.mark.timeout(LIMIT)
async def test_forward_logs_level_filters_records(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError):
        Pool(workers=0, forward_logs=-1)
    with pytest.raises(ValueError):
        Pool(workers=0, forward_logs="INFO")
    assert Pool(workers=0).forward_logs == 0
    assert Pool(workers=0, forward_logs=True).forward_logs == logging.INFO
    caplog.set_level(logging.DEBUG)

    def levels(tag: str) -> list[str]:
        return [r.levelname for r in records(caplog, f"levels {tag} ")]

    async def run_levels(pool: Pool, label: str) -> str:
        tag = new_tag(label)
        await pool.submit(T.log_levels, tag)
        # ERROR is the last record the task makes: once it is here, the others would be too.
        await eventually(lambda: records(caplog, f"levels {tag} ERROR"), f"{label}: no ERROR record")
        return tag

    async with Pool(workers=1, forward_logs=logging.WARNING) as a:
        assert a.address is not None
        assert levels(await run_levels(a, "warning")) == ["WARNING", "ERROR"]
        # A second client asking for DEBUG: the worker forwards more, each client gets its level.
        async with Pool(broker=a.address, secret=a.secret, forward_logs=logging.DEBUG) as b:
            assert levels(await run_levels(b, "debug")) == ["DEBUG", "INFO", "WARNING", "ERROR"]
            assert levels(await run_levels(a, "warning-again")) == ["WARNING", "ERROR"]
        await eventually(clients_are(a, 1), "the DEBUG client stayed")
        assert levels(await run_levels(a, "warning-after")) == ["WARNING", "ERROR"]


@pytest.mark.timeout(LIMIT)
async def test_nothing_is_forwarded_by_default(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    output = Output(capfd)
    tag = new_tag("default")
    async with Pool(workers=1) as pool:
        [name] = (await names_by_pid(pool)).values()
        await pool.submit(T.log_levels, tag)
        await pool.submit(T.shout, tag)

        # The worker's own handler (WARNING, FORMAT) writes its records to its stderr, ours.
        def logged() -> list[dict[str, str]]:
            return [line for line in format_lines(output.read().err) if tag in line["msg"]]

        await eventually(lambda: len(logged()) == 2, "the worker did not log its records itself")
        assert [(m["level"], m["worker"], m["host"], m["name"]) for m in logged()] == [
            ("WARNING", name, HOST, T.LOGGER),
            ("ERROR", name, HOST, T.LOGGER),
        ]
        assert records(caplog, tag) == []
        await eventually(lambda: output.err_lines(f"err {tag}") == 1, "the worker's stderr print is missing")
    # Its stdout print: on its own stdout (flushed when it exited), once.
    assert output.out_lines(f"out {tag}") == 1, output.out
    assert records(caplog, tag) == []


@pytest.mark.timeout(LIMIT)
async def test_forwarding_stops_when_the_forwarding_client_leaves(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    output = Output(capfd)
    loud, quiet = new_tag("loud"), new_tag("quiet")
    async with Pool(workers=1) as a:
        assert a.address is not None
        [name] = (await names_by_pid(a)).values()
        await workers_ready(a)
        async with Pool(broker=a.address, secret=a.secret, forward_logs=True) as b:
            await b.submit(T.shout, loud)
            await b.submit(T.myapp_warning, loud)
            await eventually(lambda: records(caplog, f"myapp says {loud}"), "no forwarded record")
            await eventually(lambda: output.out_lines(f"out {loud}") == 1, "no forwarded print")
        await eventually(clients_are(a, 1), "the forwarding client stayed")
        # The worker heard that nobody asks any more before it got the next task (same connection).
        await a.submit(T.shout, quiet)
        await a.submit(T.myapp_warning, quiet)

        def logged() -> list[dict[str, str]]:
            return [line for line in format_lines(output.read().err) if quiet in line["msg"]]

        await eventually(logged, "the worker did not log the record itself")
        assert [(m["level"], m["worker"], m["host"], m["name"]) for m in logged()] == [
            ("WARNING", name, HOST, "myapp")
        ]
        assert records(caplog, quiet) == []
        await eventually(
            lambda: output.err_lines(f"err {quiet}") == 1, "the worker's stderr print is missing"
        )
    # The print went to the worker's own stdout (flushed when it exited); the forwarded one was
    # written here once, not by the worker too.
    assert output.out_lines(f"out {quiet}") == 1, output.out
    assert output.out_lines(f"out {loud}") == 1, output.out
    assert output.err_lines(f"err {loud}") == 1, output.err
    assert [line for line in format_lines(output.err) if loud in line["msg"]] == []
    assert len(records(caplog, f"myapp says {loud}")) == 1
    assert records(caplog, quiet) == []


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped), "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.timeout(LIMIT)
async def test_a_forwarding_client_joining_while_a_worker_joins_gets_its_logs(
    tmp_path: Path, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    broker, server = await serve_broker(secret=secret)
    address = f"127.0.0.1:{server.port}"
    # The broker registers the worker and stops its process before answering its hello: the
    # notification below is then queued behind the answer (what a busy or niced worker sees).
    register = broker._worker_joined
    stopped: list[int] = []

    def joined_then_stopped(conn: Any, info: Any) -> Any:
        worker = register(conn, info)
        os.kill(worker.pid, signal.SIGSTOP)
        stopped.append(worker.pid)
        return worker

    broker._worker_joined = joined_then_stopped  # type: ignore[method-assign]
    name = new_tag("slow-joiner")
    err = tmp_path / "worker.err"
    try:
        async with hand_worker(address, secret_file, name, tmp_path / "worker.out", err) as proc:
            try:
                async with asyncio.timeout(20 * SCALE):
                    await broker.wait_for_workers(1)
                assert stopped == [proc.pid]
                await eventually(lambda: process_state(proc.pid) == "T", "the worker did not stop")
                async with Pool(broker=address, secret=secret, forward_logs=True) as client:
                    assert broker._log_level == logging.INFO  # the worker was told to forward
                    os.kill(proc.pid, signal.SIGCONT)
                    tag = new_tag("joining")
                    await client.submit(T.myapp_warning, tag)
                    await eventually(
                        lambda: records(caplog, tag) or line_of(err, tag), "the record went nowhere"
                    )
                    assert line_of(err, tag) is None, "the worker logged it itself: not forwarded"
                    [record] = records(caplog, tag)
                    assert origin(record) == (name, HOST)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
    finally:
        await server.aclose()


# -- 6. bad input ---------------------------------------------------------------------------


@pytest.mark.timeout(LIMIT)
async def test_bad_log_messages_are_refused_and_the_broker_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with Pool(workers=1, forward_logs=True) as pool:
        assert pool.address is not None
        host, port = pool.address.rsplit(":", 1)
        [name] = (await names_by_pid(pool)).values()

        # A bad request is answered with ProtocolError (a CALL) or logged with it (a notification),
        # like every other broker message: the connection itself is not closed for it.
        # A client asking for logs at something that is not a level.
        async with asyncdist.connect(host, int(port), secret=pool.secret) as raw:
            for options, match in (
                ({"logs": "x"}, "logs must be a logging level"),
                ({"logs": -1}, "logs must be a logging level"),
                ({"logs": 10**6}, "logs must be a logging level"),
                ({"logs": True}, "logs must be a logging level"),
                ("x", "options must be a map"),
            ):
                with pytest.raises(ProtocolError, match=match):
                    await raw.call("client_hello", options)
            assert (await pool.status())["clients"] == 1  # none of them became a client
            # A client may not send what workers send.
            with pytest.raises(ProtocolError, match="only a worker may send this"):
                await raw.call("log", [])

        # A worker sending malformed log messages.
        async with asyncdist.connect(host, int(port), secret=pool.secret) as fake:
            hello = await fake.call(
                "worker_hello", {"slots": 1, "pid": 0, "host": "fake-host", "name": "fake"}
            )
            assert hello["forward_logs"] == logging.INFO  # a client asks: the worker should forward
            tag = new_tag("bad")
            for bad in ("garbage", [[1, 2]], [None]):
                before = len(caplog.records)
                await fake.notify("log", bad)

                def refused(before: int = before) -> list[logging.LogRecord]:
                    return [
                        r
                        for r in caplog.records[before:]
                        if r.name == "asyncdist.connection" and r.exc_info and r.exc_info[0] is ProtocolError
                    ]

                await eventually(refused, f"log {bad!r} was not refused")
                [failure] = refused()
                assert failure.getMessage() == "notification handler 'log' failed"
                assert failure.host == HOST
            # Well-formed messages with data a client cannot use: skipped by the client. The one
            # good record, made outside any task, reaches the client naming the worker that sent
            # it (what the record itself says about worker and host is not believed).
            spoof = {"worker": "spoof", "host": "spoof"}
            entries: list[Any] = [
                [None, 0, {"name": "", "levelno": 40, "msg": f"nameless {tag}"}],
                [None, 0, {"name": "fake.logger", "levelno": "40", "msg": f"levelless {tag}"}],
                [None, 0, f"not a map {tag}"],
                [None, 7, f"unknown kind {tag}"],
                [None, 1, 12345],
                ["not a key", 0, {"name": "fake.logger", "levelno": 30, "msg": f"good {tag}", **spoof}],
            ]
            await fake.notify("log", entries)
            await eventually(lambda: records(caplog, f"good {tag}"), "the good record did not arrive")
            assert [r.getMessage() for r in records(caplog, tag)] == [f"good {tag}"]
            [good] = records(caplog, f"good {tag}")
            assert (good.name, good.levelno, good.worker, good.host) == (
                "fake.logger",
                30,
                "fake",
                "fake-host",
            )

        # The broker went on serving the real worker, the client and its forwarded logs.
        tag = new_tag("after")
        assert await pool.map(T.log_plain, [tag] * 3) != []
        await eventually(lambda: len(records(caplog, f"plain {tag} ")) == 3, "forwarding stopped")
        assert {r.worker for r in records(caplog, f"plain {tag} ")} == {name}
        await eventually(
            lambda: len(pool._broker._workers) == 1 if pool._broker else False, "the fake worker stayed"
        )


# -- 7. the launcher and the blocking facade --------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import json
    import logging
    import os
    import sys

    from asyncdist import sync


    def task(x, tag):
        logging.getLogger("myapp").warning("task %d of %s", x, tag)
        return os.getpid()


    if __name__ == "__main__":
        pids = sync.map(task, range(3), [sys.argv[1]] * 3)
        logging.getLogger("rootprog").warning("root program done %s", sys.argv[1])
        print("RESULT " + json.dumps(sorted(set(pids))), flush=True)
    """
)


def run_launcher(
    tmp_path: Path, args: list[str], tag: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``python -m asyncdist ARGS script.py TAG``; return the worker pid and stderr."""
    script = tmp_path / "logging_program.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "asyncdist", *args, str(script), tag],
        capture_output=True,
        text=True,
        timeout=60 * SCALE,
        cwd=tmp_path,
        env={**worker_env(), **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    [pid] = json.loads(line.removeprefix("RESULT "))
    assert not alive(pid), "the worker outlived the launcher"
    return pid, result.stderr


@pytest.mark.timeout(LIMIT)
@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["-n", "1", "--log-level", "INFO"], {}),
        (["--log-level", "INFO", "-n", "1"], {}),
        (["-n", "1"], {"ASYNCDIST_LOG_LEVEL": "INFO"}),
    ],
    ids=["launcher-option", "global-option", "environment"],
)
def test_launcher_logs_in_format(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    tag = new_tag("launch")
    pid, stderr = run_launcher(tmp_path, args, tag, env)
    worker = f"{HOST}:{pid}"
    lines = [(m["level"], m["host"], m["worker"], m["name"], m["msg"]) for m in format_lines(stderr)]
    # The broker (in the launcher: no worker) at INFO ...
    assert (
        "INFO",
        HOST,
        "",
        "asyncdist.futures.broker",
        f"worker 1 joined: {worker} (pid {pid}, 1 slots)",
    ) in lines
    assert (
        "INFO",
        HOST,
        "",
        "asyncdist.futures.broker",
        f"worker 1 ({worker}) left with 0 task(s) running",
    ) in lines
    # ... the worker's task records, naming it ...
    mine = [line for line in lines if tag in line[4]]
    assert sorted(mine) == sorted(
        [("WARNING", HOST, worker, "myapp", f"task {x} of {tag}") for x in range(3)]
        + [("WARNING", HOST, "", "rootprog", f"root program done {tag}")]
    )
    # ... and nothing else: every line of stderr is in the format.
    assert len(lines) == len(stderr.splitlines()), stderr


@pytest.mark.timeout(LIMIT)
def test_log_level_is_checked_and_warning_is_the_default(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncdist", "--log-level", "LOUD", "worker", "--broker", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        env=worker_env(),
        check=False,
    )
    assert result.returncode == 2
    assert "unknown log level 'LOUD'" in result.stderr
    # Without a level: WARNING, the broker's INFO records are not shown, the task's warnings are.
    tag = new_tag("quiet")
    pid, stderr = run_launcher(tmp_path, ["-n", "1"], tag)
    lines = [(m["level"], m["worker"], m["name"]) for m in format_lines(stderr)]
    assert sorted(lines) == sorted(
        [("WARNING", f"{HOST}:{pid}", "myapp")] * 3 + [("WARNING", "", "rootprog")]
    )
    assert FORMAT.startswith("%(asctime)s %(levelname)-7s %(host)s %(worker)s %(name)s")
