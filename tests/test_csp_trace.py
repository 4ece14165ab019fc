"""CSP tracing: ``csp.TraceInit`` / ``csp.TraceQuit`` write a run as JSON lines; ``asyncdist csp-trace``.

A traced counter/printer run (the seed's example) records each process's
start and end (with how it ended), every read and write with its channel
and value, poison, retirement and alternation; ``stdout=True`` prints the
records too; nothing is written once tracing stopped; a ``@csp.multiprocess``
child traces into the same file under its own pid; the ``csp-trace``
command prints the timeline and a summary, skipping lines that are not
records (a crash mid-line).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE

from asyncdist import csp

#: The bound of one traced run or command (scaled).
BOUND = 30 * SCALE


@pytest.fixture(autouse=True)
def _trace_off() -> Iterator[None]:
    """Tracing is process-wide: never leave it on after a test."""
    yield
    csp.TraceQuit()


@csp.process
async def counter(cout: csp.WriterEnd, limit: int, ending: str = "poison") -> None:
    for i in range(limit):
        await cout(i)
    if ending == "poison":
        await csp.poison(cout)
    else:
        await csp.retire(cout)


@csp.process
async def printer(cin: csp.ReaderEnd, seen: list[Any]) -> None:
    while True:
        seen.append(await cin())


@csp.multiprocess
async def child_counter(cout: csp.WriterEnd, limit: int) -> int:
    for i in range(limit):
        await cout(i)
    await csp.poison(cout)
    return os.getpid()


async def counter_printer(limit: int = 5, ending: str = "poison", name: str = "A") -> list[Any]:
    channel = csp.Channel(name)
    seen: list[Any] = []
    async with asyncio.timeout(BOUND):
        await csp.Parallel(counter(channel.writer(), limit, ending), printer(channel.reader(), seen))
    assert seen == list(range(limit))
    return seen


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of the trace, each of which must be a JSON object."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def of(trace: list[dict[str, Any]], process: str | None, event: str) -> list[dict[str, Any]]:
    return [r for r in trace if r["process"] == process and r["event"] == event]


async def csp_trace(path: Path) -> tuple[int, str, str]:
    """Run ``python -m asyncdist csp-trace PATH``; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncdist",
        "csp-trace",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BOUND):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_counter_printer_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    await counter_printer(5)
    csp.TraceQuit()
    trace = records(path)
    assert trace[0]["event"] == "trace-start"
    assert trace[-1]["event"] == "trace-quit"
    assert {r["pid"] for r in trace} == {os.getpid()}
    assert all(isinstance(r["t"], float) for r in trace)
    # Each process starts once and ends once, saying how.
    for name, how in (("counter", "done"), ("printer", "poisoned")):
        assert len(of(trace, name, "start")) == 1, name
        assert [r["how"] for r in of(trace, name, "end")] == [how]
        assert trace.index(of(trace, name, "start")[0]) < trace.index(of(trace, name, "end")[0])
    # The values, in order, on channel A, written by the counter and read by the printer.
    writes, reads = of(trace, "counter", "write"), of(trace, "printer", "read")
    assert [(r["channel"], r["value"]) for r in writes] == [("A", str(i)) for i in range(5)]
    assert [(r["channel"], r["value"]) for r in reads] == [("A", str(i)) for i in range(5)]
    # The counter's poison, then the printer's (its end by poison poisons its ends: PyCSP's propagation).
    assert [r["channel"] for r in of(trace, "counter", "poison")] == ["A"]
    poisons = [r for r in trace if r["event"] == "poison"]
    assert poisons[0]["process"] == "counter"
    assert trace.index(poisons[0]) > trace.index(writes[-1])


async def test_retirement_is_traced(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    await counter_printer(3, ending="retire")
    csp.TraceQuit()
    trace = records(path)
    assert [r["how"] for r in of(trace, "counter", "end")] == ["done"]
    assert [r["how"] for r in of(trace, "printer", "end")] == ["retired"]
    retires = of(trace, "counter", "retire")
    assert [(r["channel"], r["kind"]) for r in retires] == [("A", "write")]
    assert [(r["channel"], r["kind"]) for r in of(trace, "printer", "retire")] == [("A", "read")]
    assert not [r for r in trace if r["event"] == "poison"]


async def test_alternation_and_failure_are_traced(tmp_path: Path) -> None:
    @csp.process
    async def chooser(cin: csp.ReaderEnd) -> None:
        guard, msg = await csp.AltSelect(csp.InputGuard(cin), csp.TimeoutGuard(BOUND))
        assert isinstance(guard, csp.InputGuard)
        raise ValueError(f"got {msg}")

    @csp.process
    async def sender(cout: csp.WriterEnd) -> None:
        await cout("hello")
        await cout("never read")  # the chooser failed: its ends were poisoned

    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    channel = csp.Channel("B")
    with pytest.raises(ExceptionGroup) as failed:
        async with asyncio.timeout(BOUND):
            await csp.Parallel(chooser(channel.reader()), sender(channel.writer()))
    csp.TraceQuit()
    assert [type(e) for e in failed.value.exceptions] == [ValueError]
    trace = records(path)
    [select] = [r for r in trace if r["event"] == "select"]
    assert (select["guard"], select["channel"], select["value"]) == ("InputGuard", "B", "'hello'")
    assert [r["error"] for r in trace if r["event"] == "failed"] == ["ValueError('got hello')"]
    ends = {r["process"].rpartition(".")[2]: r["how"] for r in trace if r["event"] == "end"}
    assert ends == {"chooser": "failed", "sender": "poisoned"}


@csp.process
def plain_counter(cout: csp.WriterEnd, limit: int) -> None:
    for i in range(limit):
        cout(i)
    csp.poison(cout)


@csp.process
def plain_printer(cin: csp.ReaderEnd, seen: list[Any]) -> None:
    while True:
        seen.append(cin())


async def test_plain_processes_are_traced_under_their_names(tmp_path: Path) -> None:
    """Plain functions run in threads; their operations still count as theirs."""
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    channel = csp.Channel("P")
    seen: list[Any] = []
    async with asyncio.timeout(BOUND):
        await csp.Parallel(plain_counter(channel.writer(), 3), plain_printer(channel.reader(), seen))
    csp.TraceQuit()
    assert seen == [0, 1, 2]
    trace = records(path)
    assert [r["value"] for r in of(trace, "plain_counter", "write")] == ["0", "1", "2"]
    assert [r["value"] for r in of(trace, "plain_printer", "read")] == ["0", "1", "2"]
    assert [r["how"] for r in of(trace, "plain_printer", "end")] == ["poisoned"]
    assert not [r for r in trace if r["process"] is None and r["event"] not in ("trace-start", "trace-quit")]


async def test_trace_init_again_switches_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    csp.TraceInit(first)
    await counter_printer(2, name="one")
    csp.TraceInit(second)
    await counter_printer(2, name="two")
    csp.TraceQuit()
    assert {r.get("channel") for r in records(first)} == {None, "one"}
    assert {r.get("channel") for r in records(second)} == {None, "two"}
    assert records(second)[0]["event"] == "trace-start"


async def test_stdout_prints_each_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path, stdout=True)
    await counter_printer(3)
    csp.TraceQuit()
    printed = capsys.readouterr().out.splitlines()
    trace = records(path)
    assert len(printed) == len(trace)
    for line, record in zip(printed, trace, strict=True):
        assert record["event"] in line
        assert str(record["pid"]) in line
        if record["process"] is not None:
            assert record["process"] in line
    writes = [line for line in printed if re.search(r"\bcounter\s+write\s+A [0-2]$", line)]
    assert len(writes) == 3, printed


async def test_stdout_times_count_from_trace_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path, stdout=True)
    await counter_printer(3)
    csp.TraceQuit()
    printed = capsys.readouterr().out.splitlines()
    trace = records(path)
    seconds = [float(line.split()[0]) for line in printed]
    assert seconds == sorted(seconds)
    # the last record comes measurably after the first (the run takes well over a microsecond)
    assert trace[-1]["t"] - trace[0]["t"] > 1e-6
    assert seconds[-1] > 0


async def test_nothing_is_written_when_tracing_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    await counter_printer(3)  # never traced: no file appears (not even the default csp_trace.jsonl)
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    await counter_printer(3, name="traced")
    csp.TraceQuit()
    written = path.read_bytes()
    assert b'"channel": "traced"' in written
    await counter_printer(3, name="after")
    csp.TraceQuit()  # a second quit does nothing
    assert path.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.jsonl"]


async def test_a_multiprocess_child_traces_into_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    channel = csp.Channel("M")
    seen: list[Any] = []
    try:
        async with asyncio.timeout(BOUND):
            child_pid, _ = await csp.Parallel(
                child_counter(channel.writer(), 4), printer(channel.reader(), seen)
            )
    finally:
        csp.TraceQuit()
        await csp.shutdown()
    assert seen == [0, 1, 2, 3]
    assert child_pid != os.getpid()
    trace = records(path)
    assert {r["pid"] for r in trace} == {os.getpid(), child_pid}
    child = [r for r in trace if r["pid"] == child_pid]
    assert [r["event"] for r in child if r["event"] in ("trace-start", "trace-quit")] == [
        "trace-start",
        "trace-quit",
    ]
    assert [r["how"] for r in of(child, "child_counter", "end")] == ["done"]
    assert [r["value"] for r in of(child, "child_counter", "write")] == ["0", "1", "2", "3"]
    assert [r["channel"] for r in of(child, "child_counter", "poison")] == ["M"]
    parent = [r for r in trace if r["pid"] == os.getpid()]
    assert [r["value"] for r in of(parent, "printer", "read")] == ["0", "1", "2", "3"]
    assert [r["how"] for r in of(parent, "printer", "end")] == ["poisoned"]
    # The command shows both processes of the two OS processes.
    code, out, err = await csp_trace(path)
    assert code == 0, err
    assert re.search(rf"\b{child_pid}\s+child_counter\s+write\s+M 3\b", out), out
    assert re.search(rf"\b{os.getpid()}\s+printer\s+read\s+M 3\b", out), out
    assert f"{len(trace)} records, 2 processes" in out


async def test_csp_trace_command_prints_a_timeline(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    await counter_printer(5)
    csp.TraceQuit()
    trace = records(path)
    code, out, err = await csp_trace(path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["seconds", "pid", "process", "event", "details"]
    timeline = lines[1 : 1 + len(trace)]
    # seconds, pid, process ("-" outside a process), event, details: in time order
    assert [line.split()[3] for line in timeline] == [r["event"] for r in sorted(trace, key=lambda r: r["t"])]
    assert all(float(line.split()[0]) >= 0 for line in timeline)
    assert any(re.search(r"\bcounter\s+write\s+A 4$", line) for line in timeline), out
    assert any(re.search(r"\bprinter\s+read\s+A 4$", line) for line in timeline), out
    assert any(re.search(r"\bcounter\s+poison\s+A$", line) for line in timeline), out
    assert any(re.search(r"\bcounter\s+end\s+how=done$", line) for line in timeline), out
    assert any(re.search(r"\bprinter\s+end\s+how=poisoned$", line) for line in timeline), out
    summary = lines[1 + len(trace) :]
    assert summary[0] == ""
    assert re.fullmatch(rf"{len(trace)} records, 2 processes, \d+\.\d{{6}} s", summary[1]), summary
    assert summary[2:] == ["  channel A: 5 reads", "  channel A: 5 writes"]


async def test_csp_trace_skips_lines_that_are_not_records(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    await counter_printer(2)
    csp.TraceQuit()
    good = records(path)
    whole = path.read_text()
    last = json.dumps(
        {"t": good[-1]["t"] + 1, "pid": 1, "process": "crashed", "event": "write", "channel": "A"}
    )
    with path.open("a") as f:
        f.write("not json at all\n")
        f.write("[1, 2, 3]\n")  # JSON, but not a record
        f.write('{"event": "write"}\n')  # a record without its time
        f.write("\n")
        f.write(last[: len(last) // 2])  # a crash in the middle of the last line
    assert path.read_text().startswith(whole)
    code, out, err = await csp_trace(path)
    assert code == 0, err
    assert f"{len(good)} records, 2 processes" in out
    assert "crashed" not in out
    assert "not json" not in out
    assert "  channel A: 2 reads" in out

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("\x00\xff garbage\n{truncated")
    code, out, err = await csp_trace(garbage)
    assert code == 0, err
    assert out == f"{garbage}: no trace records\n"


@pytest.mark.parametrize(
    "bad",
    [
        '{"t": "abc", "event": "write"}',
        '{"t": null, "event": "write"}',
        '{"t": 1.5, "pid": 1, "process": 5, "event": "write"}',
        '{"t": 1.5, "pid": 1, "process": "x", "event": ["write"]}',
    ],
)
async def test_csp_trace_skips_records_with_bad_fields(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "trace.jsonl"
    csp.TraceInit(path)
    await counter_printer(2)
    csp.TraceQuit()
    good = records(path)
    with path.open("a") as f:
        f.write(bad + "\n")
    code, out, err = await csp_trace(path)
    assert code == 0, err
    assert f"{len(good)} records, 2 processes" in out
