"""MapReduce benchmark: an asyncdist.mapreduce word count beside Counter, multiprocessing, dask.bag and mrjob.

The input is a seeded generated text (``--size`` MB, default 200; ``--quick`` 5) of words drawn
from a 10,000-word vocabulary with Zipf frequencies (1/rank), 12 words a line. Every
implementation counts its words (split on whitespace) and is checked against the counts made
while generating it. Each runs in its own subprocess (a *family*), whose process tree is
watched: the wall time of the count (start-up of pools and clusters measured apart, not
counted), the peak RSS (``VmHWM``) of every process and the CPU time of each, and how busy the
rest of the machine was meanwhile ("other load": CPUs used by other processes on average, from
/proc/stat; above 0.15 the report warns that the figures are unreliable).

Families (``--only`` takes names or prefixes):

counter        collections.Counter in one process: ``counts.update(block.split())`` over the file
               read in blocks of whole lines (the input chunk size)
mp             multiprocessing.Pool(2) (default start method): one task per input chunk, each a
               Counter of its chunk, summed in the parent
dask           dask.bag: ``read_text(path, blocksize=chunk).str.split().flatten().frequencies()``
               on the processes scheduler with a warm pool of 2 worker processes
asyncdist-1    asyncdist.mapreduce: a Master in the family's process and 1 ``python -m asyncdist
               slave --workers 1 --secret-stdin`` subprocess; ``Job.run(input=path, map=wc_map,
               combiner=wc_sum, reduce=wc_sum, partitions=2, chunk_size=chunk)``, where ``wc_map``
               yields ``(word, 1)`` per word and ``wc_sum`` sums each ``kvgroup``; then every
               result read with ``result_iterator``
asyncdist-2    the same with 2 slaves
mrjob          mrjob's local runner: ``python benchmarks/_mrjob_wordcount.py -r local --num-cores 2``
               (the same mapper, summing combiner and reducer), as a subprocess; not in --quick

The input chunk (map task / partition / Pool task) is 16 MiB, asyncdist's default, or an
eighth of the input when that is smaller (--quick: 8 chunks of about 630 kB); ``--chunk-mb`` sets it.
Ratios with the issue's targets: mrjob / asyncdist (2 slaves) >= 10x; asyncdist (2 slaves) /
dask.bag <= 1.5x (time); asyncdist 1 slave / 2 slaves >= 1.7x; every asyncdist process's peak
RSS <= 400 MB (MB = 10^6 bytes here). Counter and multiprocessing are for information.

Run from the repository root::

    .venv/bin/python benchmarks/bench_mapreduce.py              # 200 MB, mrjob too: about 2 min
    .venv/bin/python benchmarks/bench_mapreduce.py --quick      # smoke test (CI), 5 MB: about 6 s
    .venv/bin/python benchmarks/bench_mapreduce.py --size 50 --only asyncdist,dask
    # keep the generated input between runs, and profile after the measured runs: a cProfile
    # of one map task, and one more (uncounted) asyncdist-2 run with py-spy sampling its slaves
    # and their workers, when py-spy is installed:
    .venv/bin/python benchmarks/bench_mapreduce.py --data /tmp/wc-200.txt --profile /tmp/prof

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import glob
import io
import itertools
import json
import multiprocessing
import os
import pstats
import random
import resource
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from _harness import (
    ServerProcess,
    emit_json,
    exit_on_sigterm,
    exit_when_parent_exits,
    fmt_met,
    fmt_number,
    format_table,
    format_versions,
    progress,
    select_names,
    versions,
)

#: Packages whose versions the report names.
VERSIONS_OF = ("asyncdist", "uvloop", "msgpack", "cloudpickle", "dask", "mrjob")
HERE = os.path.dirname(os.path.abspath(__file__))
MRJOB_SCRIPT = os.path.join(HERE, "_mrjob_wordcount.py")
VOCABULARY = 10_000
WORDS_PER_LINE = 12
WORKERS = 2  # processes of mp, dask, mrjob; slaves x 1 worker for asyncdist
PARTITIONS = 2  # asyncdist reduce tasks, the same job for 1 and 2 slaves
MB = 1_000_000
MIB = 1 << 20
DEFAULT_CHUNK = 16 * MIB  # asyncdist.mapreduce's default (ASYNCDIST_MR_CHUNK)
RSS_TARGET_MB = 400.0

clock = time.perf_counter


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    how: str
    processes: str


FAMILIES = {
    f.name: f
    for f in (
        Family("counter", "Counter, one process", "counts.update(block.split())", "1"),
        Family("mp", "multiprocessing.Pool(2)", "a Counter per chunk, summed", "1 + 2 workers"),
        Family("dask", "dask.bag", "str.split().flatten().frequencies(), processes", "1 + 2 workers"),
        Family("asyncdist-1", "asyncdist, 1 slave", "map (word, 1), summing combiner", "1 + 1 slave x 1"),
        Family("asyncdist-2", "asyncdist, 2 slaves", "the same", "1 + 2 slaves x 1"),
        Family("mrjob", "mrjob local runner", "-r local --num-cores 2, same job", "runner + 2 + tasks"),
    )
}


# -- the input ------------------------------------------------------------------------------------


def vocabulary(seed: int) -> list[str]:
    """10,000 distinct lower-case words of 2 to 12 letters, in a seeded random rank order."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < VOCABULARY:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 12))))
    ranked = sorted(words)
    rng.shuffle(ranked)
    return ranked


def generate(path: str, size_mb: float, seed: int) -> dict[str, Any]:
    """Write the seeded text (at least ``size_mb`` MB of whole lines) and return its description,
    with the counts of its words (also written beside it as ``PATH.counts.json``)."""
    words = vocabulary(seed)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(VOCABULARY)))
    rng = random.Random(seed + 1)
    target = int(size_mb * MB)
    counts: Counter[str] = Counter()
    written = 0
    batch = WORDS_PER_LINE * 10_000
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        while written < target:
            drawn = rng.choices(words, cum_weights=cum_weights, k=batch)
            counts.update(drawn)
            lines = map(" ".join, zip(*[iter(drawn)] * WORDS_PER_LINE, strict=True))
            text = "\n".join(lines) + "\n"
            f.write(text)
            written += len(text)
    os.replace(tmp, path)
    info = {
        "seed": seed,
        "size_mb": size_mb,
        "bytes": written,
        "words": sum(counts.values()),
        "distinct": len(counts),
        "counts": dict(counts),
    }
    with open(path + ".counts.json", "w", encoding="ascii") as f:
        json.dump(info, f)
    return info


def input_text(path: str, size_mb: float, seed: int) -> dict[str, Any]:
    """The input at ``path``: reused when it was generated with these settings, else generated."""
    with contextlib.suppress(OSError, ValueError):
        with open(path + ".counts.json", encoding="ascii") as f:
            info: dict[str, Any] = json.load(f)
        if (info["seed"], info["size_mb"], info["bytes"]) == (seed, size_mb, os.path.getsize(path)):
            progress(f"input: reusing {path}")
            return info
    progress(f"input: generating {size_mb:g} MB of text into {path} ...")
    started = clock()
    info = generate(path, size_mb, seed)
    progress(f"input: {info['bytes'] / MB:,.1f} MB, {info['words']:,} words in {clock() - started:.1f} s")
    return info


def line_ranges(path: str, chunk: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of about ``chunk`` bytes, cut after a newline."""
    size = os.path.getsize(path)
    ranges = []
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(size, start + chunk))
            f.readline()
            end = min(size, f.tell())
            ranges.append((start, end))
            start = end
    return ranges


def read_range(path: str, start: int, end: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8")


# -- watching a process tree (in the benchmark process) ---------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
    return kids


def tree_of(root: int) -> list[tuple[int, int]]:
    """``(pid, parent pid)`` of ``root`` and every live descendant."""
    out = [(root, 0)]
    i = 0
    while i < len(out):
        pid = out[i][0]
        out += [(kid, pid) for kid in children_of(pid)]
        i += 1
    return out


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in kB (``VmHWM``), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (its own, not its children's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class Proc:
    pid: int
    parent: int
    argv: list[str]
    hwm_kb: int = 0
    cpu_s: float = 0.0
    role: str = ""


class TreeWatch:
    """Samples the peak RSS and the CPU time of every process of a tree, every ``interval`` s,
    in a thread of the benchmark process (not of the measured one)."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self.procs: dict[int, Proc] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-watch", daemon=True)

    def __enter__(self) -> TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for pid, parent in tree_of(self.root):
            hwm, cpu = vm_hwm_kb(pid), cpu_seconds(pid)
            if hwm is None or cpu is None:
                continue
            proc = self.procs.get(pid)
            if proc is None:
                proc = self.procs[pid] = Proc(pid, parent, [])
            # Read again each time: a process seen between its fork and its exec changes it.
            proc.argv = cmdline(pid) or proc.argv
            proc.hwm_kb = max(proc.hwm_kb, hwm)
            proc.cpu_s = max(proc.cpu_s, cpu)

    def merge(self, reported: Sequence[dict[str, Any]]) -> None:
        """Add the family's own last look at its tree (taken just before it stopped its pool)."""
        for item in reported:
            pid = int(item["pid"])
            proc = self.procs.get(pid)
            if proc is None:
                proc = self.procs[pid] = Proc(pid, int(item["parent"]), list(item["argv"]))
            proc.hwm_kb = max(proc.hwm_kb, int(item["hwm_kb"]))
            proc.cpu_s = max(proc.cpu_s, float(item["cpu_s"]))


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


def own_tree() -> list[dict[str, Any]]:
    """Family side: this process's tree as :meth:`TreeWatch.merge` takes it."""
    out = []
    for pid, parent in tree_of(os.getpid()):
        hwm, cpu = vm_hwm_kb(pid), cpu_seconds(pid)
        if hwm is not None and cpu is not None:
            out.append({"pid": pid, "parent": parent, "argv": cmdline(pid), "hwm_kb": hwm, "cpu_s": cpu})
    return out


def label_roles(procs: dict[int, Proc], root: int) -> None:
    """Name each process by what it is: main, slave, worker, resource tracker, mrjob task, ...
    (py-spy processes that --profile started are dropped)."""
    for pid in [p.pid for p in procs.values() if p.argv and os.path.basename(p.argv[0]) == "py-spy"]:
        del procs[pid]
    root_argv = procs[root].argv if root in procs else []
    for proc in procs.values():
        text = " ".join(proc.argv)
        parent = procs.get(proc.parent)
        if proc.pid == root:
            proc.role = "main"
        elif "asyncdist slave" in text or "asyncdist', 'slave" in text:
            proc.role = "slave"
        elif "resource_tracker" in text:
            proc.role = "resource tracker"
        elif "spawn_main" in text or "--multiprocessing-fork" in text or "forkserver" in text:
            proc.role = "worker"
        elif proc.argv and os.path.basename(proc.argv[0]) in ("sh", "bash", "dash"):
            proc.role = "shell"
        elif "_mrjob_wordcount.py" in text and "--step-num" in text:
            proc.role = "mrjob task"
        elif "_mrjob_wordcount.py" in text:
            proc.role = "mrjob runner"
        elif proc.argv == root_argv or (parent is not None and proc.argv == parent.argv):
            proc.role = "forked worker"
        elif proc.argv:
            proc.role = os.path.basename(proc.argv[0])
        else:
            proc.role = "?"


# -- the families (each in its own subprocess) ---------------------------------------------------------


@dataclass
class Outcome:
    """What a family reports (JSON on its last stdout line)."""

    wall_s: float
    start_s: float | None = None
    counts_file: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    tree: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def count_chunk(args: tuple[str, int, int]) -> Counter[str]:
    path, start, end = args
    return Counter(read_range(path, start, end).split())


def run_counter(path: str, chunk: int) -> Outcome:
    started = clock()
    counts: Counter[str] = Counter()
    for start, end in line_ranges(path, chunk):
        counts.update(read_range(path, start, end).split())
    wall = clock() - started
    return Outcome(wall, counts_file=save_counts(counts), tree=own_tree())


def _noop(x: Any) -> Any:
    time.sleep(0.05)  # long enough that both workers take one
    return x


def _default_sigterm() -> None:
    """Pool initializer: the family's SIGTERM handler (SystemExit) is not for forked workers."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_mp(path: str, chunk: int) -> Outcome:
    started = clock()
    pool = multiprocessing.Pool(WORKERS, initializer=_default_sigterm)
    try:
        pool.map(_noop, range(WORKERS), chunksize=1)
        start_s = clock() - started
        t0 = clock()
        counts: Counter[str] = Counter()
        tasks = [(path, s, e) for s, e in line_ranges(path, chunk)]
        for part in pool.imap_unordered(count_chunk, tasks):
            counts.update(part)
        wall = clock() - t0
        tree = own_tree()
        pool.close()  # the workers finish and exit: no terminate()
        pool.join()
    finally:
        pool.terminate()
    return Outcome(wall, start_s, save_counts(counts), tree=tree)


def run_dask(path: str, chunk: int) -> Outcome:
    import concurrent.futures
    import importlib

    db: Any = importlib.import_module("dask.bag")
    started = clock()
    ctx = multiprocessing.get_context("spawn")  # dask's processes scheduler's own default
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx) as pool:
        list(pool.map(_noop, range(WORKERS)))
        start_s = clock() - started
        t0 = clock()
        bag = db.read_text(path, blocksize=chunk).str.split().flatten().frequencies()
        pairs = bag.compute(scheduler="processes", pool=pool)
        wall = clock() - t0
        tree = own_tree()
    return Outcome(wall, start_s, save_counts(dict(pairs)), tree=tree)


def run_mrjob(path: str, chunk: int) -> Outcome:
    import importlib.util

    if importlib.util.find_spec("mrjob") is None:
        raise RuntimeError("mrjob is not installed (pip install mrjob, the bench extra)")
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory(prefix="bench-mr-mrjob-") as scratch,  # what mrjob writes
    ):
        argv = [sys.executable, MRJOB_SCRIPT, "-r", "local", "--num-cores", str(WORKERS)]
        argv += ["--local-tmp-dir", scratch, path]
        # Its task wrappers lock /tmp/wrapper.lock.<job key> (a fixed path): remove ours after.
        locks = "/tmp/wrapper.lock._mrjob_wordcount.*"
        old_locks = set(glob.glob(locks))

        def remove_locks() -> None:
            for lock in set(glob.glob(locks)) - old_locks:
                os.unlink(lock)

        stack.callback(remove_locks)
        t0 = clock()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        tree: list[dict[str, Any]] = []
        try:
            while True:  # the runner's tree, sampled here too until it ends
                tree = merge_trees(tree, own_tree())
                try:
                    proc.wait(0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:  # stopped early: the benchmark's Child.stop ends the rest
                proc.kill()
                proc.wait()
        wall = clock() - t0
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"mrjob exited with code {proc.returncode}: {' | '.join(tail)}")
        out.seek(0)
        counts = {}
        for line in out.read().decode().splitlines():
            key, _, value = line.partition("\t")
            counts[json.loads(key)] = int(value)
    return Outcome(wall, counts_file=save_counts(counts), tree=tree)


def merge_trees(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_pid = {item["pid"]: item for item in old}
    for item in new:
        seen = by_pid.get(item["pid"])
        if seen is None:
            by_pid[item["pid"]] = item
        else:
            seen["hwm_kb"] = max(seen["hwm_kb"], item["hwm_kb"])
            seen["cpu_s"] = max(seen["cpu_s"], item["cpu_s"])
    return list(by_pid.values())


# The asyncdist job: the map yields (word, 1) per word; the combiner and the reduce sum.


def wc_map(line: str, params: Any) -> Iterator[tuple[str, int]]:
    for word in line.split():
        yield word, 1


def wc_sum(pairs: Any, params: Any) -> Iterator[tuple[str, int]]:
    from asyncdist.mapreduce import kvgroup

    for word, counts in kvgroup(pairs):
        yield word, sum(counts)


async def _asyncdist(path: str, chunk: int, slaves: int, profile: str | None) -> Outcome:
    from asyncdist.mapreduce import Job, Master, result_iterator

    started = clock()
    secret = secrets.token_hex(24)
    data_dir = tempfile.mkdtemp(prefix="bench-mr-")
    master = await Master.start("127.0.0.1", 0, secret=secret)
    address = "{}:{}".format(*master.address)
    procs: list[asyncio.subprocess.Process] = []
    spies: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(slaves):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "asyncdist", "slave", "--master", address, "--workers", "1",
                "--data-dir", os.path.join(data_dir, f"slave-{i}"), "--secret-stdin", "--watch-stdin",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(secret.encode() + b"\n")
            await proc.stdin.drain()
            procs.append(proc)
        async with asyncio.timeout(60):
            await master.wait_for_slaves(slaves)
        # A warm-up job with a map task per slave: every slave starts its worker process.
        warm = await Job("warm-up", master=address, secret=secret).run(
            input=[["warm up"] for _ in range(slaves)], map=wc_map, reduce=wc_sum, partitions=PARTITIONS
        )
        assert {k: v async for k, v in result_iterator(await warm.wait())} == {"warm": slaves, "up": slaves}
        await warm.purge()
        await warm.close()
        start_s = clock() - started
        if profile:
            spies = start_py_spy([p.pid for p in procs], profile, f"asyncdist-{slaves}")

        t0 = clock()
        job = await Job("wordcount", master=address, secret=secret).run(
            input=path, map=wc_map, combiner=wc_sum, reduce=wc_sum, partitions=PARTITIONS, chunk_size=chunk
        )
        marks: dict[str, float] = {}
        running: list[int] = []  # tasks running on the slaves, sampled during the map phase

        async def watch() -> None:  # when the map phase and the reduce phase ended
            while True:
                status = master.status()
                job_status = status["jobs"].get(job.id)
                if job_status is not None:
                    for phase in ("map", "reduce"):
                        done, total = job_status[phase]
                        if done == total and phase not in marks:
                            marks[phase] = clock() - t0
                    if "map" not in marks:
                        running.append(sum(slave["running"] for slave in status["slaves"]))
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        try:
            results = await job.wait()
            marks.setdefault("reduce", clock() - t0)
            marks.setdefault("map", marks["reduce"])
            waited = clock() - t0
            counts = {word: count async for word, count in result_iterator(results)}
        finally:
            watcher.cancel()
        wall = clock() - t0
        stop_py_spy(spies)
        spies = []
        tree = own_tree()
        await job.purge()
        await job.close()
        phases = {
            "submit_to_maps_done_s": marks["map"],
            "reduce_phase_s": marks["reduce"] - marks["map"],
            "results_known_s": waited,
            "read_results_s": wall - waited,
            "map_phase_mean_running_tasks": sum(running) / len(running) if running else 0.0,
        }
        return Outcome(wall, start_s, save_counts(counts), phases, tree)
    finally:
        stop_py_spy(spies)
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # --watch-stdin: the slave exits
        for proc in procs:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await master.aclose()
        shutil.rmtree(data_dir, ignore_errors=True)


def run_asyncdist(path: str, chunk: int, slaves: int, profile: str | None) -> Outcome:
    from asyncdist.loop import run

    outcome: Outcome = run(_asyncdist(path, chunk, slaves, profile))
    return outcome


def py_spy() -> str | None:
    found = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return found if os.access(found, os.X_OK) else None


def start_py_spy(pids: list[int], folder: str, tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy (when installed) on each slave and its worker processes, collapsed stacks into folder."""
    exe = py_spy()
    if exe is None:
        progress("profile: py-spy is not installed, the slaves are not sampled")
        return []
    spies = []
    for i, pid in enumerate(pids):
        out = os.path.join(folder, f"{tag}-slave{i}.txt")
        argv = [exe, "record", "--pid", str(pid), "--subprocesses", "--rate", "200", "--format", "raw"]
        argv += ["--output", out, "--nonblocking"]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)  # it attaches
    return spies


def stop_py_spy(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # writes its file and exits
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def profile_map_task(path: str, chunk: int, folder: str) -> Outcome:
    """cProfile of one map task of the asyncdist job (its first input chunk), run in this process."""
    import cloudpickle

    from asyncdist.mapreduce import _io, _job, _tasks  # internals: a diagnostic only

    first = _io.chunk_files(path, chunk)[0]
    out = tempfile.mkdtemp(prefix="bench-mr-profile-")
    fns = {"map": wc_map, "reduce": wc_sum, "combiner": wc_sum, "map_reader": None, "partition": None}
    task = {
        "fns": cloudpickle.dumps({**fns, "params": None}),
        "input": ["file", *first],
        "out": os.path.join(out, "map"),
        "partitions": PARTITIONS,
        "budget": _job._budget(),
        "sort": True,
    }
    prof = cProfile.Profile()
    try:
        t0 = clock()
        prof.enable()
        _tasks.run_map(task)
        prof.disable()
        wall = clock() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    prof.dump_stats(os.path.join(folder, "map-task.prof"))
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(14)
    mb = (first[2] - first[1]) / MB
    note = f"one map task, {mb:.1f} MB of input, {wall:.2f} s under cProfile\n" + _trim_pstats(
        text.getvalue()
    )
    return Outcome(wall, note=note, tree=own_tree())


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line.replace(os.getcwd() + os.sep, "") for line in lines[start:] if line.strip())


def summarize_py_spy(folder: str, tag: str, top: int = 12) -> str:
    """Self and inclusive sample shares per function of the collapsed stacks py-spy wrote."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(tag + "-slave") and name.endswith(".txt")):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                frames = [fr for fr in stack.split(";") if fr and not fr.startswith("process ")]
                if not frames:
                    continue
                total += n
                own[_frame(frames[-1])] += n
                for name_ in {_frame(fr) for fr in frames}:
                    inclusive[name_] += n
    if not total:
        return ""
    rows = [f"py-spy of {tag}'s slaves and workers: {total:,} samples; self / inclusive share"]
    for frame, n in own.most_common(top):
        rows.append(f"  {100 * n / total:5.1f}% {100 * inclusive[frame] / total:5.1f}%  {frame}")
    return "\n".join(rows)


def _frame(frame: str) -> str:
    """A py-spy raw frame, ``function (path/file.py:line)``, as ``function (dir/file.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def save_counts(counts: dict[str, int]) -> str:
    fd, path = tempfile.mkstemp(prefix="bench-mr-counts-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(counts, f)
    return path


def child_main(args: argparse.Namespace) -> int:
    exit_when_parent_exits()
    exit_on_sigterm()
    name, path, chunk = args.child, args.data, args.chunk
    if name == "counter":
        outcome = run_counter(path, chunk)
    elif name == "mp":
        outcome = run_mp(path, chunk)
    elif name == "dask":
        outcome = run_dask(path, chunk)
    elif name.startswith("asyncdist-"):
        outcome = run_asyncdist(path, chunk, int(name.split("-")[1]), args.profile)
    elif name == "mrjob":
        outcome = run_mrjob(path, chunk)
    elif name == "profile-map":
        outcome = profile_map_task(path, chunk, args.profile)
    else:
        raise SystemExit(f"unknown family {name!r}")
    print(json.dumps(outcome.__dict__), flush=True)
    return 0


# -- the benchmark process ------------------------------------------------------------------------------


class Child(ServerProcess):
    """A family's subprocess: its own session, stdin a pipe (EOF: we are gone), stdout read at the end."""

    def start(self) -> Child:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._stdout = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish())
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=self._stdout,
            stderr=self._stderr,
            start_new_session=True,
        )
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the family's process, then whatever it left in its session (its own process group)."""
        code = super().stop(timeout)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return code

    def finish(self, timeout: float) -> str:
        self.wait_ok(timeout, tail_lines=4)
        self._stdout.seek(0)
        out = self._stdout.read().decode(errors="replace")
        self._stdout.close()
        return out


@dataclass
class Result:
    family: str
    wall_s: float | None = None
    start_s: float | None = None
    correct: bool | None = None
    phases: dict[str, float] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""
    #: CPUs busy with other work (and stolen by the hypervisor) on average while the family ran.
    other_load: float | None = None
    steal: float | None = None

    @property
    def max_rss_mb(self) -> float | None:
        return max((p.hwm_kb * 1024 / MB for p in self.procs), default=None)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.procs)

    def rss_text(self) -> str:
        """``main 52; slave 60, 61; worker 301, 296`` (MB), roles in order of appearance."""
        by_role: dict[str, list[float]] = {}
        for p in sorted(self.procs, key=lambda p: p.pid):
            by_role.setdefault(p.role, []).append(p.hwm_kb * 1024 / MB)
        parts = []
        for role, values in by_role.items():
            if len(values) > 4:
                parts.append(f"{len(values)} x {role} <= {max(values):,.0f}")
            else:
                parts.append(f"{role} {', '.join(f'{v:,.0f}' for v in values)}")
        return "; ".join(parts)

    def cpu_text(self) -> str:
        by_role: dict[str, float] = {}
        for p in self.procs:
            by_role[p.role] = by_role.get(p.role, 0.0) + p.cpu_s
        return ", ".join(f"{role} {cpu:.1f}" for role, cpu in by_role.items() if cpu >= 0.05)


def this_script(*args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *args]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_family(name: str, s: Settings, expected: dict[str, int]) -> Result:
    result = Result(name)
    for i in range(s.repeat):
        progress(f"{name}: run {i + 1}/{s.repeat} ...")
        argv = this_script("--child", name, "--data", s.data, "--chunk", str(s.chunk))
        child = Child(name, argv)
        outcome: dict[str, Any] | None = None
        busy0, steal0 = machine_cpu()
        self0, kids0, t0 = time.process_time(), _children_cpu(), time.monotonic()
        try:
            child.start()
            assert child.proc is not None
            with TreeWatch(child.proc.pid) as watch:
                out = child.finish(s.budget(name))
            outcome = json.loads(out.strip().splitlines()[-1])
            assert outcome is not None
            watch.merge(outcome["tree"])
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            progress(f"  {name}: FAILED {result.error}")
            return result
        finally:
            child.stop()  # reaped: its CPU time, and its reaped descendants', is in our rusage now
        busy1, steal1 = machine_cpu()
        lifetime = time.monotonic() - t0
        family_cpu = max(_children_cpu() - kids0, sum(p.cpu_s for p in watch.procs.values()))
        # What else ran on the machine meanwhile: another program (or this process's watch).
        others = max(0.0, busy1 - busy0 - family_cpu - (time.process_time() - self0))
        counts_file = outcome["counts_file"]
        if counts_file:
            with open(counts_file, encoding="utf-8") as f:
                got = json.load(f)
            os.unlink(counts_file)
            ok = got == expected
            result.correct = ok if result.correct is None else (result.correct and ok)
        wall = float(outcome["wall_s"])
        result.runs.append(wall)
        progress(f"  {name}: {wall:.2f} s" + ("" if result.correct is not False else "  WRONG COUNTS"))
        if result.wall_s is None or wall < result.wall_s:  # the best run's figures
            result.wall_s = wall
            result.start_s = outcome["start_s"]
            result.phases = outcome["phases"]
            label_roles(watch.procs, child.proc.pid)
            result.procs = list(watch.procs.values())
            result.note = outcome["note"]
            result.other_load = others / lifetime
            result.steal = (steal1 - steal0) / lifetime
    return result


@dataclass(frozen=True)
class Settings:
    data: str
    chunk: int
    repeat: int
    quick: bool
    profile: str | None
    size_mb: float

    def budget(self, name: str) -> float:
        """Seconds one run of a family may take."""
        per_mb = 10.0 if name == "mrjob" else 3.0
        return 120.0 + per_mb * self.size_mb


@dataclass(frozen=True)
class Target:
    key: str
    what: str
    num: str
    den: str
    target: float | None  # None: information
    higher_is_better: bool = True


TARGETS = (
    Target("mrjob/asyncdist-2", "asyncdist (2 slaves) faster than mrjob", "mrjob", "asyncdist-2", 10.0),
    Target(
        "asyncdist-2/dask", "asyncdist (2 slaves) time over dask.bag's", "asyncdist-2", "dask", 1.5, False
    ),
    Target("asyncdist-1/asyncdist-2", "2 slaves faster than 1", "asyncdist-1", "asyncdist-2", 1.7),
    Target("asyncdist-2/counter", "asyncdist (2 slaves) time over Counter's", "asyncdist-2", "counter", None),
    Target("asyncdist-2/mp", "asyncdist (2 slaves) time over multiprocessing's", "asyncdist-2", "mp", None),
    Target("asyncdist-1/counter", "asyncdist (1 slave) time over Counter's", "asyncdist-1", "counter", None),
)


@dataclass
class Check:
    target: Target
    value: float | None
    met: bool | None


def compute_checks(results: dict[str, Result]) -> list[Check]:
    checks = []
    for t in TARGETS:
        num, den = results.get(t.num), results.get(t.den)
        if num is None or den is None:
            continue
        value = num.wall_s / den.wall_s if num.wall_s and den.wall_s else None
        met = None
        if value is not None and t.target is not None:
            met = value >= t.target if t.higher_is_better else value <= t.target
        checks.append(Check(t, value, met))
    ours = [r for k, r in results.items() if k.startswith("asyncdist-") and r.procs]
    if ours:
        peak = max(r.max_rss_mb or 0.0 for r in ours)
        target = Target(
            "asyncdist_max_rss_mb", "every asyncdist process's peak RSS (MB)", "", "", RSS_TARGET_MB
        )
        checks.append(Check(target, peak, peak <= RSS_TARGET_MB))
    return checks


def report(
    results: dict[str, Result],
    checks: list[Check],
    info: dict[str, Any],
    s: Settings,
    elapsed: float,
    profile_text: str,
) -> None:
    quick = " (--quick: targets indicative)" if s.quick else ""
    tasks = len(line_ranges(s.data, s.chunk))
    print()
    print(f"asyncdist MapReduce benchmark: word count{quick}")
    print(
        f"input: {info['bytes'] / MB:,.1f} MB, {info['words']:,} words, {info['distinct']:,} distinct "
        f"(vocabulary {VOCABULARY:,}, Zipf 1/rank, seed {info['seed']}); chunks of {s.chunk / MIB:.3g} MiB: "
        f"{tasks} map tasks / Pool tasks / dask partitions"
    )
    print(
        f"{os.cpu_count()} CPUs; each figure: the best of {s.repeat} run(s); start-up (pools, clusters) "
        f"not counted; whole run {elapsed:.0f} s"
    )
    print(format_versions(versions(*VERSIONS_OF)))
    print()
    rows = []
    for name, r in results.items():
        fam = FAMILIES[name]
        mbps = info["bytes"] / MB / r.wall_s if r.wall_s else None
        rows.append(
            [
                fam.label,
                fam.processes,
                fmt_number(r.wall_s, 2),
                fmt_number(mbps, 1),
                fmt_number(r.start_s, 2, "-"),
                fmt_number(r.cpu_s, 1) if r.procs else "n/a",
                fmt_number(r.max_rss_mb, 0),
                {True: "yes", False: "NO", None: "n/a"}[r.correct],
                fmt_number(r.other_load, 2),
            ]
        )
    headers = ["implementation", "processes", "wall s", "MB/s", "start-up s", "CPU s", "max RSS MB", "right"]
    print(format_table([*headers, "other load"], rows))
    busy = [FAMILIES[n].label for n, r in results.items() if (r.other_load or 0) > 0.15]
    if busy:
        print(
            f"warning: other processes kept the machine busy during: {', '.join(busy)} (figures unreliable)"
        )
    print(
        "other load: CPUs used by other processes on average while a family ran (hypervisor steal: "
        + ", ".join(f"{n} {r.steal:.2f}" for n, r in results.items() if r.steal is not None)
        + ")"
    )
    print()
    print("peak RSS of each process (MB) and CPU seconds by role:")
    width = max(len(FAMILIES[n].label) for n in results)
    for name, r in results.items():
        if r.error:
            print(f"  {FAMILIES[name].label:<{width}}  {r.error}")
        elif r.procs:
            print(f"  {FAMILIES[name].label:<{width}}  {r.rss_text()}  |  CPU s: {r.cpu_text()}")
    print()
    rows = []
    for c in checks:
        t = c.target
        if t.key == "asyncdist_max_rss_mb":
            value, target = fmt_number(c.value, 0), f"<= {t.target:g}"
        else:
            value = fmt_number(c.value, 2) + "x" if c.value is not None else "n/a"
            target = "info" if t.target is None else f"{'>=' if t.higher_is_better else '<='} {t.target:g}x"
        rows.append([t.what, t.key, value, target, fmt_met(c.met)])
    print(format_table(["measure", "ratio", "value", "target", "met"], rows, "llrll"))
    for name in ("asyncdist-1", "asyncdist-2"):
        ours = results.get(name)
        if ours is not None and ours.phases:
            p = ours.phases
            print(
                f"\n{FAMILIES[name].label}: submit to last map done {p['submit_to_maps_done_s']:.2f} s, "
                f"reduce phase {p['reduce_phase_s']:.2f} s, "
                f"results known after {p['results_known_s']:.2f} s, "
                f"reading them {p['read_results_s']:.3f} s; map tasks running at once: "
                f"{p['map_phase_mean_running_tasks']:.2f} on average"
            )
    if profile_text:
        print()
        print(profile_text)
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: 5 MB, no mrjob, one run")
    parser.add_argument("--size", type=float, metavar="MB", help="input size in MB (default 200, --quick 5)")
    parser.add_argument(
        "--chunk-mb", type=float, help="input chunk in MiB (default: 16, or size/8 if smaller)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per family, the best is kept (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="the input's seed (default 1)")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    parser.add_argument("--data", metavar="FILE", help="the input file: reused if generated alike, kept")
    parser.add_argument(
        "--profile", metavar="DIR", help="cProfile one map task; py-spy the slaves of asyncdist-2"
    )
    # Internal: a family's subprocess.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    size = args.size if args.size is not None else (5.0 if args.quick else 200.0)
    if size <= 0 or args.repeat < 1:
        parser.error("--size must be > 0 and --repeat >= 1")
    names = select_names(args.only, list(FAMILIES), "family")
    if args.quick and not args.only:
        names.remove("mrjob")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    exit_on_sigterm()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.data:
            data = os.path.abspath(args.data)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-mr-"))
            data = os.path.join(folder, "input.txt")
        info = input_text(data, size, args.seed)
        if args.chunk_mb:
            chunk = int(args.chunk_mb * MIB)
        else:  # asyncdist's default, or an eighth of the input (8 chunks) when that is smaller
            chunk = min(DEFAULT_CHUNK, max(64 << 10, -(-info["bytes"] // 8)))
        s = Settings(data, chunk, args.repeat, args.quick, args.profile, size)
        expected = info["counts"]
        results: dict[str, Result] = {}
        profile_text = ""
        try:
            for name in names:
                results[name] = run_family(name, s, expected)
            if args.profile:
                profile_text = run_family_profile(s)
        except KeyboardInterrupt:
            print("interrupted: every child process was stopped", file=sys.stderr)
            return 130
        elapsed = time.monotonic() - started
        checks = compute_checks(results)
        report(results, checks, info, s, elapsed, profile_text)
    emit_json(
        {
            "benchmark": "bench_mapreduce",
            "quick": s.quick,
            "repeat": s.repeat,
            "input": {k: v for k, v in info.items() if k != "counts"},
            "chunk_bytes": s.chunk,
            "versions": versions(*VERSIONS_OF),
            "elapsed_s": round(elapsed, 1),
            "results": {
                name: {
                    "label": FAMILIES[name].label,
                    "wall_s": r.wall_s,
                    "runs": [round(x, 3) for x in r.runs],
                    "start_s": r.start_s,
                    "correct": r.correct,
                    "cpu_s": round(r.cpu_s, 2),
                    "max_rss_mb": r.max_rss_mb,
                    "processes": [
                        {
                            "role": p.role,
                            "pid": p.pid,
                            "peak_rss_mb": round(p.hwm_kb * 1024 / MB, 1),
                            "cpu_s": round(p.cpu_s, 2),
                        }
                        for p in sorted(r.procs, key=lambda p: p.pid)
                    ],
                    "phases": r.phases,
                    "other_load_cpus": r.other_load,
                    "steal_cpus": r.steal,
                    "error": r.error,
                }
                for name, r in results.items()
            },
            "checks": {
                c.target.key: {"value": c.value, "target": c.target.target, "met": c.met} for c in checks
            },
        }
    )
    return 0


def run_family_profile(s: Settings) -> str:
    """The --profile extras, after the measured runs: a cProfile of one map task, and one more
    run of asyncdist-2 (not counted) with py-spy sampling its slaves and their workers."""
    assert s.profile is not None
    parts = []
    common = ["--data", s.data, "--chunk", str(s.chunk), "--profile", s.profile]
    for name in ("profile-map", "asyncdist-2"):
        if name == "asyncdist-2" and py_spy() is None:
            parts.append("py-spy is not installed: the slaves were not sampled (pip install py-spy)")
            continue
        progress(f"profile: {name} ...")
        child = Child(name, this_script("--child", name, *common))
        try:
            child.start()
            out = child.finish(s.budget(name))
            outcome = json.loads(out.strip().splitlines()[-1])
            if outcome["counts_file"]:
                os.unlink(outcome["counts_file"])
            parts.append(outcome["note"] or summarize_py_spy(s.profile, "asyncdist-2"))
        except Exception as exc:
            parts.append(f"profile {name} failed: {type(exc).__name__}: {exc}")
        finally:
            child.stop()
    return "\n".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
