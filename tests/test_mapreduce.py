"""MapReduce (``asyncdist.mapreduce``): the Job API, inputs, results, the embedded cluster, bounded memory.

Most tests run on this event loop's embedded cluster (a master in this
process, one ``asyncdist slave`` process per core, started by the first
``Job.run`` and stopped with :func:`shutdown_local_cluster` at the end of the
test, or when the loop closes). The map and reduce functions live in this
module: the slaves' worker processes import it by name (the embedded cluster
passes our ``sys.path`` on). Functions that must be observed from the test
write marker files into a directory given in ``params``; functions that must
stay running block on a release file (never a fixed sleep in the test). The
fault scenarios (RELIABILITY F20-F23) are in ``test_mapreduce_faults.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import SCALE, alive, eventually

from asyncdist.connection import connect
from asyncdist.errors import ConfigurationError
from asyncdist.mapreduce import (
    Job,
    Master,
    Results,
    default_partition,
    kvgroup,
    result_iterator,
    shutdown_local_cluster,
)
from asyncdist.mapreduce import _job as job_module
from asyncdist.mapreduce._io import RecordWriter, chunk_files, read_lines, read_records

TEXT = """\
the quick brown fox jumps over the lazy dog
The dog barks; the fox runs.
a b c a b a
"""

# -- functions the slaves run (imported by name in their worker processes) -------------------------


def wc_map(line: str, params: Any) -> Iterator[tuple[str, int]]:
    for word in line.split():
        yield word, 1


def wc_reduce(pairs: Any, params: Any) -> Iterator[tuple[Any, int]]:
    for key, counts in kvgroup(pairs):
        yield key, sum(counts)


def mark(directory: str, name: str) -> None:
    """Create ``DIR/NAME-PPID-PID-NS`` atomically (who ran it: the slave is the worker's parent)."""
    path = os.path.join(directory, f"{name}-{os.getppid()}-{os.getpid()}-{time.monotonic_ns()}")
    with open(path + ".new", "w") as f:
        f.write("x")
    os.replace(path + ".new", path)


def markers(directory: str | Path, name: str) -> list[str]:
    """The markers of ``name``, oldest first."""
    found = [p for p in os.listdir(directory) if p.startswith(f"{name}-") and not p.endswith(".new")]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def marker_ppid(name: str) -> int:
    return int(name.rsplit("-", 3)[1])


def hold(directory: str, name: str, seconds: float) -> None:
    """The first caller of ``name`` marks ``claimed-NAME`` and waits for ``release-NAME`` or
    ``release-all`` (at most ``seconds``); later callers run through."""
    tmp = os.path.join(directory, f".claim-{name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}")
    try:
        os.link(tmp, os.path.join(directory, f"claimed-{name}"))  # atomic and exclusive
    except FileExistsError:
        return  # a later attempt: run through
    finally:
        os.unlink(tmp)
    deadline = time.monotonic() + seconds
    releases = [os.path.join(directory, f"release-{name}"), os.path.join(directory, "release-all")]
    while not any(map(os.path.exists, releases)) and time.monotonic() < deadline:
        time.sleep(0.02)


def claimed(directory: str | Path, name: str) -> tuple[int, int] | None:
    """(pid, slave pid) of the process that claimed ``name``, or None yet."""
    try:
        pid, ppid = Path(directory, f"claimed-{name}").read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return int(pid), int(ppid)


_marked: set[str] = set()


def wc_map_marking(line: str, params: Any) -> Iterator[tuple[str, int]]:
    """Word count that marks, once per worker process, that it mapped something."""
    if params not in _marked:
        _marked.add(params)
        mark(params, "mapped")
    yield from wc_map(line, params)


def blocking_map(line: str, params: Any) -> Iterator[tuple[str, int]]:
    """Blocks on the line ``#block NAME`` (first attempt only) until released; counts words."""
    if line.startswith("#block "):
        hold(params["dir"], line.split()[1], params["hold"])
        return
    yield from wc_map(line, params)


def failing_map(line: str, params: Any) -> Iterator[tuple[str, int]]:
    mark(params["dir"], "attempt")
    if params.get("once") and claimed(params["dir"], "failed") is None:
        Path(params["dir"], "claimed-failed").write_text(f"{os.getpid()} {os.getppid()}")
        raise ValueError(f"transient failure on {line!r}")
    if not params.get("once"):
        raise ValueError(f"cannot map {line!r}")
    yield from wc_map(line, params)


def failing_reduce(pairs: Any, params: Any) -> Iterator[tuple[Any, Any]]:
    mark(params["dir"], "reduce")
    for key, counts in kvgroup(pairs):
        yield key, sum(counts) // 0


def mod_partition(key: int, partitions: int, params: Any) -> int:
    return (key // params["div"]) % partitions


def int_map(record: int, params: Any) -> Iterator[tuple[int, int]]:
    yield record, record * record


def csv_reader(fd: Any, size: int, url: str, params: Any) -> Iterator[list[Any]]:
    yield ["__url__", url]
    yield ["__size__", size]
    for line in fd:
        if line.strip():
            name, value = line.split(",")
            yield [name, int(value)]


def row_map(row: list[Any], params: Any) -> Iterator[tuple[str, Any]]:
    yield row[0], row[1]


def collect_reduce(pairs: Any, params: Any) -> Iterator[tuple[Any, list[Any]]]:
    for key, values in kvgroup(pairs):
        yield key, sorted(values)


def order_reduce(pairs: Any, params: Any) -> Iterator[tuple[str, Any]]:
    keys = [key for key, _ in pairs]
    yield "n", len(keys)
    yield "sorted", keys == sorted(keys)


def summing_combiner(pairs: Any, params: Any) -> Iterator[tuple[Any, int]]:
    mark(params, "combine")
    for key, counts in kvgroup(pairs):
        yield key, sum(counts)


def invert_map(record: tuple[str, int], params: Any) -> Iterator[tuple[tuple[int, str], int]]:
    word, count = record
    yield (count, word[0]), 1


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in bytes (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children, and so on."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


# -- helpers --------------------------------------------------------------------------------------


async def finish(aw: Awaitable[Any], timeout: float, what: str) -> Any:
    """Await ``aw`` for at most ``timeout`` s (scaled here)."""
    bound = asyncio.timeout(timeout * SCALE)
    try:
        async with bound:
            return await aw
    except TimeoutError:
        if not bound.expired():
            raise  # raised by ``aw`` itself
        raise AssertionError(f"{what} did not finish within {timeout * SCALE:g} s") from None


@contextlib.asynccontextmanager
async def embedded() -> AsyncIterator[None]:
    """This test's embedded cluster, stopped at the end (before the task leak check)."""
    try:
        yield
    finally:
        await shutdown_local_cluster()


def cluster() -> Any:
    """This loop's embedded cluster (started by the first Job.run)."""
    return job_module._clusters[asyncio.get_running_loop()][0]


def slave_dirs() -> list[Path]:
    return sorted(Path(cluster().data_dir).iterdir())


def job_dirs(job_id: str) -> list[Path]:
    return [d / job_id for d in slave_dirs() if (d / job_id).exists()]


async def run_job(
    name: str = "job", timeout: float = 30, **kwargs: Any
) -> tuple[Job, Results, list[tuple[Any, Any]]]:
    job = await Job(name=name).run(**kwargs)
    results = await finish(job.wait(), timeout, f"job {name}")
    pairs = [kv async for kv in result_iterator(results)]
    return job, results, pairs


def counts(text: str) -> collections.Counter[str]:
    return collections.Counter(text.split())


# -- records on disk (no cluster) -----------------------------------------------------------------


def test_kvgroup_groups_runs_of_equal_keys() -> None:
    pairs = [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5), ("a", 6)]
    assert [(k, list(vs)) for k, vs in kvgroup(pairs)] == [
        ("a", [1, 2]),
        ("b", [3]),
        ("c", [4, 5]),
        ("a", [6]),
    ]
    assert list(kvgroup([])) == []
    assert [(k, list(vs)) for k, vs in kvgroup(iter([(1, "x")]))] == [(1, ["x"])]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_file_chunks_cover_every_line_exactly_once(tmp_path: Path, newline: str) -> None:
    rng = random.Random(7)
    lines = ["", "é" * 3, "x"] + [
        " ".join(rng.choice(["alpha", "\u03b2eta", "\u03b3", "delta"]) for _ in range(rng.randrange(0, 9)))
        for _ in range(300)
    ]
    path = tmp_path / "in.txt"
    path.write_bytes((newline.join(lines)).encode())  # no newline after the last line
    size = path.stat().st_size
    for chunk_size in [1, 2, 3, 7, 64, 1000, size - 1, size, size + 5]:
        chunks = chunk_files(str(path), chunk_size)
        assert len(chunks) == max(1, math.ceil(size / chunk_size))
        assert chunks[0][1] == 0
        assert chunks[-1][2] == size
        assert all(a[2] == b[1] for a, b in itertools.pairwise(chunks))
        got = [line for p, s, e in chunks for line in read_lines(p, s, e)]
        assert got == lines, f"chunk size {chunk_size}"


def test_chunk_files_globs_sorted_and_missing_input_is_an_error(tmp_path: Path) -> None:
    for name in ["b.txt", "a.txt", "c.log"]:
        (tmp_path / name).write_text("x\n")
    assert [Path(p).name for p, _, _ in chunk_files(str(tmp_path / "*.txt"), 100)] == ["a.txt", "b.txt"]
    with pytest.raises(FileNotFoundError):
        chunk_files(str(tmp_path / "*.nothing"), 100)


def test_record_writer_is_invisible_until_closed_and_abort_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "part-0"
    writer = RecordWriter(str(path))
    writer.write("k", 1)
    writer.write_all([(("t", 1), [1, 2]), ("z", None)])
    assert not path.exists(), "a record file is visible before it is complete"
    writer.close()
    assert list(read_records(str(path))) == [("k", 1), (("t", 1), [1, 2]), ("z", None)]
    assert os.listdir(tmp_path) == ["part-0"]
    writer = RecordWriter(str(tmp_path / "part-1"))
    writer.write("k", 1)
    writer.abort()
    assert os.listdir(tmp_path) == ["part-0"]


def test_default_partition_is_stable_and_in_range() -> None:
    keys = ["the", "fox", "", "é", 0, 17, -3, ("a", 1), 2.5, None, True]
    for n in [1, 2, 3, 16]:
        for key in keys:
            p = default_partition(key, n)
            assert 0 <= p < n
            assert p == default_partition(key, n)
    # A stable hash (not Python's salted hash()): these values are the same in every process.
    spread = collections.Counter(default_partition(f"w{i}", 4) for i in range(1000))
    assert len(spread) == 4
    assert min(spread.values()) > 150


async def test_a_master_and_a_job_need_a_secret() -> None:
    with pytest.raises(ConfigurationError):
        await Master.start("127.0.0.1", 0)
    with pytest.raises(ConfigurationError):
        await Job("nosecret", master="127.0.0.1:1").run(input="raw://a", map=wc_map)


async def test_mr_status_says_running_then_killed_when_the_master_closes() -> None:
    master = await Master.start("127.0.0.1", 0, secret="mr-status-test-secret-0123456789")
    host, port = master.address
    job = Job("waiting", master=f"{host}:{port}", secret="mr-status-test-secret-0123456789")
    try:
        await job.run(input=["raw://a", "raw://b"], map=wc_map, reduce=wc_reduce)
        assert job.id is not None
        # No slave: the job waits with nothing done.
        kept = master.status()["jobs"][job.id]
        assert kept == {"name": "waiting", "state": "running", "map": [0, 2], "reduce": [0, 1]}
        await master.aclose()
        assert master.status()["jobs"][job.id]["state"] == "killed"
        assert "error" not in master.status()["jobs"][job.id]
    finally:
        await master.aclose()
        await job.close()


# -- the Job API on the embedded cluster ------------------------------------------------------------


async def test_word_count_over_files_globs_raw_and_iterables(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text(TEXT)
    (tmp_path / "two.txt").write_text("fox fox\nlast line without newline")
    (tmp_path / "ignored.csv").write_text("never read\n")
    memory = ["in memory fox", "b b"]
    gen_lines = [f"gen {i % 3}" for i in range(25_000)]  # more than one in-memory task
    expected = counts(TEXT) + counts(TEXT) + counts("fox fox\nlast line without newline")
    expected += counts("raw string fox\nsecond line") + counts(" ".join(memory + gen_lines))
    async with embedded():
        job, results, pairs = await run_job(
            "wc",
            input=[
                str(tmp_path / "*.txt"),
                tmp_path / "one.txt",  # a path object
                "raw://raw string fox\nsecond line",
                memory,
                (line for line in gen_lines),
            ],
            map=wc_map,
            reduce=wc_reduce,
        )
        assert isinstance(results, Results)
        assert len(results) == 1
        assert dict(pairs) == expected
        assert len(pairs) == len(expected), "a key came out twice"
        assert [k for k, _ in pairs] == sorted(expected), "reduce output is not in key order"
        # A single source (not in a list) works too, and wait() again returns the same results.
        assert await job.wait() is results
        single, _, pairs1 = await run_job(
            "single", input=str(tmp_path / "one.txt"), map=wc_map, reduce=wc_reduce
        )
        assert dict(pairs1) == counts(TEXT)
        for j in (job, single):
            await j.purge()
            await j.close()


async def test_a_big_file_is_cut_into_chunks_mapped_in_parallel(tmp_path: Path) -> None:
    rng = random.Random(3)
    words = [f"w{i}" for i in range(50)]
    text = "".join(" ".join(rng.choices(words, k=rng.randrange(1, 30))) + "\n" for _ in range(6000))
    path = tmp_path / "big.txt"
    path.write_text(text)
    marks = tmp_path / "marks"
    marks.mkdir()
    chunk = 16 * 1024
    n_chunks = math.ceil(path.stat().st_size / chunk)
    async with embedded():
        job = await Job("chunks").run(
            input=str(path), map=wc_map_marking, reduce=wc_reduce, params=str(marks), chunk_size=chunk
        )
        results = await finish(job.wait(), 30, "the job")
        assert dict([kv async for kv in result_iterator(results)]) == counts(text)
        assert cluster().master.status()["jobs"][job.id]["map"] == [n_chunks, n_chunks]
        slaves = {p.pid for p in cluster().procs}
        mapped_on = {marker_ppid(m) for m in markers(marks, "mapped")}
        assert mapped_on <= slaves
        if len(slaves) > 1:
            assert len(mapped_on) > 1, "every map task of the big file ran on one slave"
        await job.purge()
        await job.close()


async def test_partitions_custom_partition_and_params() -> None:
    records = list(range(200))
    async with embedded():
        job, results, pairs = await run_job(
            "parts", input=[records], map=int_map, reduce=collect_reduce, partitions=3,
            partition=mod_partition, params={"div": 10},
        )  # fmt: skip
        assert len(results) == 3
        assert dict(pairs) == {x: [x * x] for x in records}
        for p, location in enumerate(results):
            one = Results([location], results.options)
            keys = [k async for k, _ in result_iterator(one)]
            assert keys == sorted(keys)
            assert keys, f"partition {p} is empty"
            assert all((k // 10) % 3 == p for k in keys), f"partition {p} holds {keys}"
        # The default partition: keys go where default_partition says.
        job2, results2, pairs2 = await run_job(
            "default-parts",
            input=[[f"k{i} k{i}" for i in range(100)]],
            map=wc_map,
            reduce=wc_reduce,
            partitions=4,
        )
        assert dict(pairs2) == {f"k{i}": 2 for i in range(100)}
        for p, location in enumerate(results2):
            keys = [k async for k, _ in result_iterator(Results([location], results2.options))]
            assert all(default_partition(k, 4) == p for k in keys)
        for j in (job, job2):
            await j.purge()
            await j.close()


async def test_map_reader_gets_disco_arguments(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,1\nb,2\na,3\n")
    async with embedded():
        job, _, pairs = await run_job(
            "reader", input=[str(path), "raw://b,10\nc,5"], map=row_map, reduce=collect_reduce,
            map_reader=csv_reader,
        )  # fmt: skip
        assert dict(pairs) == {
            "__size__": sorted([path.stat().st_size, len("b,10\nc,5")]),
            "__url__": sorted([str(path), "raw://"]),
            "a": [1, 3],
            "b": [2, 10],
            "c": [5],
        }
        await job.purge()
        await job.close()


async def test_reduce_gets_sorted_pairs_unless_sort_false_and_no_reduce_gives_map_output() -> None:
    lines = [" ".join(f"k{(i * 7919 + j) % 500}" for j in range(10)) for i in range(300)]
    async with embedded():
        job1, _, sorted_out = await run_job(
            "sorted", input=[lines[:150], lines[150:]], map=wc_map, reduce=order_reduce
        )
        assert dict(sorted_out) == {"n": 3000, "sorted": True}
        job2, _, unsorted_out = await run_job(
            "unsorted", input=[lines[:150], lines[150:]], map=wc_map, reduce=order_reduce, sort=False
        )
        assert dict(unsorted_out)["n"] == 3000
        job3, results3, mapped = await run_job("noreduce", input=["raw://b a\nc a"], map=wc_map)
        assert mapped == [("a", 1), ("a", 1), ("b", 1), ("c", 1)]
        assert len(results3) == 1
        # More partitions than keys: the empty partitions are results too, and read as nothing.
        job4, results4, spread = await run_job(
            "empty-parts", input="raw://b a\nc a", map=wc_map, partitions=7
        )
        assert len(results4) == 7
        assert sorted(spread) == mapped
        for j in (job1, job2, job3, job4):
            await j.purge()
            await j.close()


async def test_combiner_runs_on_each_spill_of_map_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCDIST_MR_MEMORY", str(64 * 1024))  # the smallest budget: many spills
    rng = random.Random(5)
    text = "".join(" ".join(f"x{rng.randrange(20000)}" for _ in range(20)) + "\n" for _ in range(3000))
    path = tmp_path / "in.txt"
    path.write_text(text)
    marks = tmp_path / "marks"
    marks.mkdir()
    async with embedded():
        job, _, pairs = await run_job(
            "combine",
            input=str(path),
            map=wc_map,
            reduce=wc_reduce,
            combiner=summing_combiner,
            params=str(marks),
        )
        assert dict(pairs) == counts(text)
        # One map task over 60,000 pairs with a 64 KiB budget: the combiner ran on several spills.
        assert len(markers(marks, "combine")) >= 3
        await job.purge()
        await job.close()


async def test_chaining_a_job_on_the_results_of_another_with_tuple_keys(tmp_path: Path) -> None:
    text = TEXT * 3 + "zebra zebra\n"
    async with embedded():
        first, results, pairs = await run_job(
            "first", input=["raw://" + text], map=wc_map, reduce=wc_reduce, partitions=2
        )
        assert dict(pairs) == counts(text)
        second, _, inverted = await run_job("second", input=results, map=invert_map, reduce=wc_reduce)
        expected = collections.Counter((n, w[0]) for w, n in counts(text).items())
        assert dict(inverted) == expected
        assert all(type(k) is tuple for k, _ in inverted)
        # A list of sources may mix result sets and other inputs.
        third, _, both = await run_job("third", input=[results, results], map=invert_map, reduce=wc_reduce)
        assert dict(both) == {k: 2 * v for k, v in expected.items()}
        for j in (first, second, third):
            await j.purge()
            await j.close()


async def test_show_prints_progress_per_phase_and_leaves_no_thread(
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads = set(threading.enumerate())
    async with embedded():
        job = await Job(name="shown").run(input=["raw://a b", "raw://b c", "raw://c"], map=wc_map,
                                          reduce=wc_reduce, partitions=2)  # fmt: skip
        results = await finish(job.wait(show="force"), 30, "the job")
        err = capsys.readouterr().err
        assert re.search(r"shown map.*3/3", err), err
        assert re.search(r"shown reduce.*2/2", err), err
        assert dict([kv async for kv in result_iterator(results)]) == {"a": 1, "b": 2, "c": 2}
        quiet = await Job(name="quiet").run(input="raw://a", map=wc_map, reduce=wc_reduce)
        await finish(quiet.wait(), 30, "the job")
        assert "quiet" not in capsys.readouterr().err
        for j in (job, quiet):
            await j.purge()
            await j.close()
    # No thread is left behind by the bars (tqdm's monitor thread would live forever).
    assert [t for t in threading.enumerate() if t not in threads and t.is_alive()] == []


async def test_purge_removes_the_jobs_files_from_every_slave() -> None:
    async with embedded():
        job, results, pairs = await run_job(
            "purged", input=[[f"w{i}" for i in range(100)] for _ in range(4)], map=wc_map, reduce=wc_reduce,
            partitions=3,
        )  # fmt: skip
        assert dict(pairs) == {f"w{i}": 4 for i in range(100)}
        assert job.id is not None
        assert job_dirs(job.id), "the job kept no files on the slaves"
        assert cluster().master.status()["jobs"][job.id]["state"] == "done"
        assert "error" not in cluster().master.status()["jobs"][job.id]
        await job.purge()
        assert job_dirs(job.id) == []
        assert job.id not in cluster().master.status()["jobs"]
        assert [p for d in slave_dirs() for p in d.rglob("*")] == []
        with pytest.raises(FileNotFoundError):
            [kv async for kv in result_iterator(results)]
        await job.close()


async def test_a_slave_serves_only_files_of_its_data_directory(tmp_path: Path) -> None:
    secret_file = tmp_path / "outside.txt"
    secret_file.write_text("not for the network")
    async with embedded():
        job, results, _ = await run_job("served", input="raw://a", map=wc_map)
        (host, port), path = results[0]
        inside = Path(path)
        async with connect(host, port, secret=cluster().secret) as conn:
            assert b"".join([c async for c in conn.stream("mr.fetch", path)]) == inside.read_bytes()
            escapes = [
                str(secret_file),
                str(inside.parent / ".." / ".." / ".." / "outside.txt"),
                "/etc/passwd",
            ]
            for bad in escapes:
                with pytest.raises(PermissionError):
                    [c async for c in conn.stream("mr.fetch", bad)]
        await job.purge()
        await job.close()


@pytest.mark.parametrize("how", ["kill", "cancel"])
async def test_kill_or_cancelling_wait_stops_the_job_and_frees_its_disk(tmp_path: Path, how: str) -> None:
    # One blocking map task per slave, after some map output of its own: every worker is busy.
    n = os.cpu_count() or 1
    params = {"dir": str(tmp_path), "hold": 30 * SCALE}
    inputs = [f"raw://w{i} x y\n#block b{i}\nnever mapped" for i in range(n)]
    async with embedded():
        job = await Job(name="killed").run(input=inputs, map=blocking_map, reduce=wc_reduce, params=params)
        waiter = asyncio.ensure_future(job.wait())
        await eventually(
            lambda: all(claimed(tmp_path, f"b{i}") for i in range(n)), "the maps did not start", 20
        )
        assert job.id is not None
        assert job_dirs(job.id)
        assert not waiter.done()
        if how == "kill":
            await finish(job.kill(), 10, "kill()")
            with pytest.raises(Exception):  # noqa: B017 - the job is gone: any error, no results
                await finish(waiter, 10, "wait() of a killed job")
        else:
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        await eventually(lambda: job.id not in cluster().master.status()["jobs"], "the master kept the job")
        await eventually(lambda: not job_dirs(job.id), "the killed job's files are still on the slaves")
        # The job stopped: its blocked map tasks no longer hold the slaves, a new job runs at once.
        try:
            _, _, pairs = await finish(
                run_job("after", input=[f"raw://a{i} b" for i in range(2 * n)], map=wc_map, reduce=wc_reduce),
                3,
                "a job after the kill (the killed job's tasks still occupy the workers)",
            )
        finally:
            (tmp_path / "release-all").touch()  # if they do, let them go (the cluster stops sooner)
        assert dict(pairs) == {**{f"a{i}": 1 for i in range(2 * n)}, "b": 2 * n}
        await job.close()


async def test_killing_a_job_logs_no_unretrieved_errors_on_the_slaves(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    params = {"dir": str(tmp_path), "hold": 30 * SCALE}
    async with embedded():  # the slaves write to our stderr (captured here)
        job = await Job(name="killed").run(input="raw://#block k", map=blocking_map, params=params)
        await eventually(lambda: claimed(tmp_path, "k"), "the map did not start", 20)
        await finish(job.kill(), 10, "kill()")
        _, _, pairs = await run_job("after", timeout=10, input="raw://a", map=wc_map)
        assert pairs == [("a", 1)]
        await job.close()
    err = capfd.readouterr().err
    assert "never retrieved" not in err, err
    assert "Traceback" not in err, err


async def test_wait_timeout_raises_timeouterror_and_the_job_can_still_be_killed(tmp_path: Path) -> None:
    params = {"dir": str(tmp_path), "hold": 20 * SCALE}
    async with embedded():
        job = await Job(name="slow").run(
            input="raw://#block t\na", map=blocking_map, reduce=wc_reduce, params=params
        )
        await eventually(lambda: claimed(tmp_path, "t"), "the map did not start", 20)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await finish(job.wait(timeout=0.3 * SCALE), 10, "wait(timeout=...)")
        assert time.monotonic() - t0 < 0.3 * SCALE + 2 * SCALE
        (tmp_path / "release-t").touch()
        results = await finish(job.wait(), 20, "wait() after the timeout")
        assert dict([kv async for kv in result_iterator(results)]) == {"a": 1}
        await job.purge()
        await job.close()


# -- errors of the user's functions -------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2, None])
async def test_a_raising_map_fails_the_job_with_its_type_and_traceback_after_max_attempts(
    tmp_path: Path, attempts: int | None
) -> None:
    options = {} if attempts is None else {"max_attempts": attempts}
    async with embedded():
        job = await Job(name="bad").run(
            input="raw://some line", map=failing_map, params={"dir": str(tmp_path)}, **options
        )
        with pytest.raises(ValueError, match="cannot map 'some line'") as info:
            await finish(job.wait(), 10, "the failing job")
        tb = getattr(info.value, "remote_traceback", "")
        assert "failing_map" in tb, tb
        assert len(markers(tmp_path, "attempt")) == (attempts or 4)
        # mr.status keeps the failed job, until purged, as failed with its error.
        kept = cluster().master.status()["jobs"][job.id]
        assert kept["state"] == "failed"
        assert kept["error"].startswith("ValueError: ")
        assert "cannot map 'some line'" in kept["error"]
        assert kept["map"] == [0, 1]
        await job.purge()
        assert job.id is not None
        assert not job_dirs(job.id)
        await job.close()


async def test_a_raising_reduce_fails_the_job_with_its_type_and_traceback(tmp_path: Path) -> None:
    async with embedded():
        job = await Job(name="badreduce").run(
            input="raw://a b a",
            map=wc_map,
            reduce=failing_reduce,
            params={"dir": str(tmp_path)},
            max_attempts=3,
        )
        with pytest.raises(ZeroDivisionError) as info:
            await finish(job.wait(), 10, "the failing job")
        assert "failing_reduce" in getattr(info.value, "remote_traceback", "")
        assert len(markers(tmp_path, "reduce")) == 3
        kept = cluster().master.status()["jobs"][job.id]
        assert (kept["state"], kept["map"], kept["reduce"]) == ("failed", [1, 1], [0, 1])
        assert kept["error"].startswith("ZeroDivisionError")
        await job.purge()
        await job.close()


async def test_a_map_that_fails_once_is_retried_and_the_job_succeeds(tmp_path: Path) -> None:
    async with embedded():
        job, _, pairs = await run_job(
            "flaky",
            timeout=10,
            input="raw://x y x",
            map=failing_map,
            reduce=wc_reduce,
            params={"dir": str(tmp_path), "once": True},
        )
        assert dict(pairs) == {"x": 2, "y": 1}
        assert len(markers(tmp_path, "attempt")) == 2
        await job.purge()
        await job.close()


def bad_partition(key: Any, partitions: int, params: Any) -> int:
    return partitions  # one past the last


async def test_bad_jobs_fail_clearly(tmp_path: Path) -> None:
    async with embedded():
        with pytest.raises(ValueError, match="input"):
            await Job(name="noinput").run(input=[], map=wc_map)
        with pytest.raises(FileNotFoundError):
            await Job(name="nofile").run(input=str(tmp_path / "*.nothing"), map=wc_map)
        job = await Job(name="badpart").run(
            input="raw://a b", map=wc_map, partitions=2, partition=bad_partition, max_attempts=1
        )
        with pytest.raises(ValueError, match="partition"):
            await finish(job.wait(), 10, "a job with a bad partition function")
        await job.purge()
        await job.close()


async def test_chaining_on_purged_results_fails_instead_of_hanging() -> None:
    async with embedded():
        first, results, _ = await run_job("first", input="raw://a b", map=wc_map, reduce=wc_reduce)
        await first.purge()
        second = await Job(name="second").run(input=results, map=invert_map, reduce=wc_reduce, max_attempts=2)
        try:
            with pytest.raises(FileNotFoundError):
                await finish(second.wait(), 15, "a job on purged results")
        finally:
            await second.purge()
            await first.close()
            await second.close()


# -- the embedded cluster ---------------------------------------------------------------------------


def test_embedded_cluster_one_slave_per_core_stops_with_its_loop_a_new_loop_starts_another() -> None:
    async def session(text: str) -> dict[str, Any]:
        job, _, pairs = await run_job("embedded", input="raw://" + text, map=wc_map, reduce=wc_reduce)
        loop = asyncio.get_running_loop()
        held = cluster()
        again = await Job(name="again").run(input="raw://x", map=wc_map)  # the same cluster
        await finish(again.wait(), 30, "a second job")
        assert job_module._clusters[loop][0] is held
        status = held.master.status()
        pids = [p.pid for p in held.procs]
        await job.close()
        await again.close()
        return {
            "pairs": pairs,
            "slaves": len(status["slaves"]),
            "pids": pids,
            "under": [d for p in pids for d in descendants(p)],
            "dir": held.data_dir,
        }

    def gone(run: dict[str, Any]) -> None:
        # The slaves are stopped and reaped by the time asyncio.run returns ...
        assert not [p for p in run["pids"] if alive(p)], "a slave outlived its event loop"
        assert not os.path.exists(run["dir"]), "the embedded cluster's data directory was left behind"
        # ... and their worker processes follow them at once (they die with their parent).
        deadline = time.monotonic() + 5 * SCALE
        while [p for p in run["under"] if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.02)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in run["under"] if alive(p)}
        assert not left, f"processes of the embedded cluster outlived it: {left}"

    first = asyncio.run(session("a b a"))
    assert dict(first["pairs"]) == {"a": 2, "b": 1}
    assert first["slaves"] == len(first["pids"]) == os.cpu_count()
    assert first["under"], "no worker processes under the slaves"
    gone(first)

    second = asyncio.run(session("c"))
    assert dict(second["pairs"]) == {"c": 1}
    assert second["slaves"] == os.cpu_count()
    assert not set(second["pids"]) & set(first["pids"])
    assert second["dir"] != first["dir"]
    gone(second)


# -- bounded memory ----------------------------------------------------------------------------------

BUDGET = 4 << 20
SLACK = 150 << 20


def peaks(pids: list[int]) -> dict[int, int]:
    """Peak RSS of every process of the cluster (slaves and everything under them)."""
    out = {}
    for pid in pids + [d for p in pids for d in descendants(p)]:
        hwm = vm_hwm(pid)
        if hwm is not None:
            out[pid] = hwm
    return out


async def word_count_memory(path: Path, expected: collections.Counter[str], **kwargs: Any) -> None:
    async with embedded():
        job = await Job(name="bounded").run(input=str(path), map=wc_map, reduce=wc_reduce, **kwargs)
        results = await finish(job.wait(), 90, "the word count")
        peak = peaks([p.pid for p in cluster().procs])
        over = {pid: f"{rss / 2**20:.0f} MiB" for pid, rss in peak.items() if rss >= BUDGET + SLACK}
        assert len(peak) > len(cluster().procs)
        assert not over, f"processes over the budget + 150 MB ({(BUDGET + SLACK) / 2**20:.0f} MiB): {over}"
        got: dict[str, int] = {}
        async for key, value in result_iterator(results):
            assert key not in got
            got[key] = value
        assert got == expected
        await job.purge()
        await job.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_word_count_over_ten_times_the_budget_stays_under_budget_plus_150mb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCDIST_MR_MEMORY", str(BUDGET))
    rng = random.Random(11)
    vocabulary = [f"w{i:06d}{rng.getrandbits(32):08x}" for i in range(20_000)]
    path = tmp_path / "words.txt"
    expected: collections.Counter[str] = collections.Counter()
    with path.open("w") as f:
        size = 0
        while size < 10 * BUDGET:
            words = rng.choices(vocabulary, k=16)
            expected.update(words)
            line = " ".join(words) + "\n"
            f.write(line)
            size += len(line)
    await word_count_memory(path, expected, partitions=2)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_word_count_of_distinct_words_in_one_map_task_stays_under_budget_plus_150mb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCDIST_MR_MEMORY", str(BUDGET))
    rng = random.Random(12)
    path = tmp_path / "distinct.txt"
    expected: collections.Counter[str] = collections.Counter()
    with path.open("w") as f:
        size = 0
        while size < 10 * BUDGET:
            words = [f"{rng.getrandbits(160):040x}" for _ in range(8)]
            expected.update(words)
            line = " ".join(words) + "\n"
            f.write(line)
            size += len(line)
    await word_count_memory(path, expected, chunk_size=2 * size)
