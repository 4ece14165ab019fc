"""Records on disk: sorted runs, partition files, merging, and reading inputs (sans-I/O of the network).

A *record file* is a sequence of msgpack-encoded ``[key, value]`` pairs
(values that msgpack cannot carry are pickled by the writing task, on an
authenticated cluster only). Files are written under a temporary name and
renamed into place, so a reader never sees a partial file. Map output is
buffered up to a memory budget, then sorted, combined and spilled as one run
per partition; the runs are merged (external merge sort) into the task's
partition files, and a reduce merges the partition files of every map, so no
step holds more than the budget of pairs in memory.
"""

from __future__ import annotations

import glob
import heapq
import itertools
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import msgpack

__all__ = [
    "Budget",
    "RecordWriter",
    "chunk_files",
    "default_partition",
    "kvgroup",
    "merge_files",
    "read_lines",
    "read_records",
    "spill_and_merge",
]

#: Bytes read per chunk of a file read by records.
READ_SIZE = 1 << 20


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"a MapReduce key or value must be a msgpack type, not {type(obj).__qualname__}")


class RecordWriter:
    """Write ``(key, value)`` pairs to ``path`` atomically: visible only once :meth:`close` renamed it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmp = f"{path}.tmp-{os.getpid()}"
        self._file: IO[bytes] = open(self._tmp, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._packer = msgpack.Packer(default=_default, use_bin_type=True)
        self.count = 0

    def write(self, key: Any, value: Any) -> None:
        self._file.write(self._packer.pack((key, value)))
        self.count += 1

    def write_all(self, pairs: Iterable[tuple[Any, Any]]) -> None:
        pack, write = self._packer.pack, self._file.write
        n = 0
        for pair in pairs:
            write(pack(pair))
            n += 1
        self.count += n

    def close(self) -> int:
        """Flush, fsync-free rename into place; return the file's size."""
        self._file.close()
        os.replace(self._tmp, self.path)
        return os.path.getsize(self.path)

    def abort(self) -> None:
        self._file.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def read_records(path: str) -> Iterator[tuple[Any, Any]]:
    """The pairs of a record file, streamed (keys and values as msgpack decodes them; lists
    come back as lists)."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, use_list=True, read_size=READ_SIZE, max_buffer_size=0)
        for item in unpacker:
            yield _as_key(item[0]), item[1]


def _as_key(key: Any) -> Any:
    # Keys that were tuples come back as lists: make them hashable again (tuples) for grouping.
    return tuple(_as_key(k) for k in key) if type(key) is list else key


def default_partition(key: Any, partitions: int, params: Any = None) -> int:
    """Disco's default partition: a stable hash of the key (the same in every process)."""
    if partitions <= 1:
        return 0
    data = key.encode() if type(key) is str else msgpack.packb(key, default=_default, use_bin_type=True)
    return zlib.crc32(data) % partitions


def kvgroup(pairs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Iterator[Any]]]:
    """Group consecutive pairs with equal keys: ``for key, values in kvgroup(sorted_pairs)``."""
    for key, group in itertools.groupby(pairs, key=lambda kv: kv[0]):
        yield key, (v for _, v in group)


def merge_files(paths: list[str], sort: bool = True) -> Iterator[tuple[Any, Any]]:
    """The pairs of several record files: merged by key when each is sorted, else one after another."""
    streams = [read_records(p) for p in paths]
    if sort and len(streams) > 1:
        return heapq.merge(*streams, key=lambda kv: kv[0])
    return itertools.chain.from_iterable(streams)


class Budget:
    """How much memory buffered map output may take before it is spilled (an estimate)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1 << 16, limit)
        self.used = 0
        self._per_pair = 0
        self._sampled = 0

    def add(self, key: Any, value: Any) -> bool:
        """Count one pair; True when the buffer should be spilled now."""
        if self._sampled < 256:  # measure the first pairs; estimate the rest by their mean
            size = sys.getsizeof(key) + sys.getsizeof(value) + 72
            self._sampled += 1
            self._per_pair = max(self._per_pair, size)
            self.used += size
        else:
            self.used += self._per_pair
        return self.used >= self.limit

    def reset(self) -> None:
        self.used = 0


def _combined(
    pairs: list[tuple[Any, Any]], combiner: Callable[..., Iterable[tuple[Any, Any]]] | None, params: Any
) -> Iterable[tuple[Any, Any]]:
    pairs.sort(key=lambda kv: kv[0])
    if combiner is None:
        return pairs
    return combiner(iter(pairs), params)


def spill_and_merge(
    pairs: Iterable[tuple[Any, Any]],
    *,
    partitions: int,
    partition: Callable[[Any, int, Any], int],
    out_dir: str,
    budget: int,
    combiner: Callable[..., Iterable[tuple[Any, Any]]] | None,
    sort: bool,
    params: Any,
) -> list[int]:
    """Partition ``pairs`` into ``out_dir/part-P`` files (sorted by key when ``sort``), spilling
    sorted, combined runs whenever the buffered pairs reach ``budget`` bytes; return the sizes."""
    buffers: list[list[tuple[Any, Any]]] = [[] for _ in range(partitions)]
    runs: list[list[str]] = [[] for _ in range(partitions)]
    meter = Budget(budget)
    spills = itertools.count()

    def spill() -> None:
        n = next(spills)
        for p, buf in enumerate(buffers):
            if not buf:
                continue
            writer = RecordWriter(os.path.join(out_dir, f"run-{p}-{n}"))
            try:
                writer.write_all(_combined(buf, combiner, params) if sort else buf)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            runs[p].append(writer.path)
            buffers[p] = []
        meter.reset()

    one = partitions == 1
    for key, value in pairs:
        p = 0 if one else partition(key, partitions, params)
        if not 0 <= p < partitions:
            raise ValueError(f"partition() returned {p!r} for {partitions} partitions")
        buffers[p].append((key, value))
        if meter.add(key, value):
            spill()
    sizes = []
    for p in range(partitions):
        final = RecordWriter(os.path.join(out_dir, f"part-{p}"))
        try:
            if not runs[p]:  # everything fit in memory: one sorted, combined write
                final.write_all(_combined(buffers[p], combiner, params) if sort else buffers[p])
            else:
                if buffers[p]:
                    spill_one = RecordWriter(os.path.join(out_dir, f"run-{p}-last"))
                    spill_one.write_all(_combined(buffers[p], combiner, params) if sort else buffers[p])
                    spill_one.close()
                    runs[p].append(spill_one.path)
                merged = merge_files(runs[p], sort)
                final.write_all(combiner(merged, params) if (combiner is not None and sort) else merged)
        except BaseException:
            final.abort()
            raise
        buffers[p] = []
        sizes.append(final.close())
        for run in runs[p]:
            os.unlink(run)
    return sizes


def chunk_files(pattern: str, chunk_size: int) -> list[tuple[str, int, int]]:
    """The files a path or glob names, cut into ``(path, start, end)`` chunks of about
    ``chunk_size`` bytes (a chunk's reader starts at the first line that begins in it)."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths:
        raise FileNotFoundError(f"no input file matches {pattern!r}")
    chunks = []
    for path in paths:
        size = os.path.getsize(path)
        start = 0
        while True:
            end = min(size, start + chunk_size)
            chunks.append((os.path.abspath(path), start, end))
            if end >= size:
                break
            start = end
    return chunks


def read_lines(path: str, start: int, end: int) -> Iterator[str]:
    """The lines of ``path`` that begin in ``[start, end)`` (without their newline)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line under way belongs to the previous chunk
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            yield line.rstrip(b"\r\n").decode("utf-8", errors="replace")
