"""Records on disk: sorted runs, partition files, merging, and reading inputs (sans-I/O of the network).

A *record file* is a sequence of msgpack-encoded ``[key, value]`` pairs:
keys and values are msgpack types (None, bool, int, float, str, bytes, and
lists, tuples and dicts of them); a task that emits anything else fails with
``TypeError``. Files are written under a temporary name and
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
    "Grouped",
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


class Grouped:
    """Pairs already grouped by key, in key order: iterates as ``(key, value)`` pairs, and
    :func:`kvgroup` takes its groups as they are (no work per pair)."""

    __slots__ = ("groups",)

    def __init__(self, groups: list[tuple[Any, list[Any]]]) -> None:
        self.groups = groups

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for key, values in self.groups:
            for value in values:
                yield key, value


def kvgroup(pairs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Iterator[Any]]]:
    """Group consecutive pairs with equal keys: ``for key, values in kvgroup(sorted_pairs)``."""
    if type(pairs) is Grouped:
        for key, values in pairs.groups:
            yield key, iter(values)
        return
    for key, group in itertools.groupby(pairs, key=_first):
        yield key, (v for _, v in group)


def _first(pair: tuple[Any, Any]) -> Any:
    return pair[0]


def merge_files(paths: list[str], sort: bool = True) -> Iterator[tuple[Any, Any]]:
    """The pairs of several record files: merged by key when each is sorted, else one after another."""
    streams = [read_records(p) for p in paths]
    if sort and len(streams) > 1:
        return heapq.merge(*streams, key=lambda kv: kv[0])
    return itertools.chain.from_iterable(streams)


def _sort_key(item: tuple[Any, Any]) -> Any:
    return item[0]


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
    sorted, combined runs whenever the buffered pairs reach about ``budget`` bytes; return the
    sizes. Buffered values are grouped by key, so a spill sorts keys, not pairs, and a key's
    partition is computed once per spill."""
    runs: list[list[str]] = [[] for _ in range(partitions)]
    limit = max(1 << 16, budget)
    spills = itertools.count()
    cache: dict[Any, int] = {}

    def part_of(key: Any) -> int:
        p = cache.get(key)
        if p is None:
            p = partition(key, partitions, params) if partitions > 1 else 0
            if type(p) is not int or not 0 <= p < partitions:
                raise ValueError(f"partition() returned {p!r} for {partitions} partitions")
            cache[key] = p  # the keys of the buffer only: cleared at each spill, counted in the budget
        return p

    def outputs(
        groups: dict[Any, list[Any]], plain: list[tuple[Any, Any]]
    ) -> list[Iterable[tuple[Any, Any]]]:
        if not sort:
            per: list[list[tuple[Any, Any]]] = [[] for _ in range(partitions)]
            for pair in plain:
                per[part_of(pair[0])].append(pair)
            return list(per)
        split: list[list[tuple[Any, list[Any]]]] = [[] for _ in range(partitions)]
        for item in groups.items():
            split[part_of(item[0])].append(item)
        result: list[Iterable[tuple[Any, Any]]] = []
        for items in split:
            items.sort(key=_sort_key)
            grouped = Grouped(items)
            result.append(combiner(grouped, params) if combiner is not None else grouped)
        return result

    def spill(tag: Any) -> None:
        for p, out in enumerate(outputs(groups, plain)):
            runs[p].append(_write(os.path.join(out_dir, f"run-{p}-{tag}"), out))

    groups: dict[Any, list[Any]] = {}
    plain: list[tuple[Any, Any]] = []
    used = value_cost = key_cost = sampled = 0
    for key, value in pairs:
        if sampled < 64:  # measure the first values and keys; estimate the rest by the largest
            sampled += 1
            value_cost = max(value_cost, sys.getsizeof(value) + 8)
            key_cost = max(key_cost, sys.getsizeof(key) + 220)  # + its dict entries and list
        if sort:
            values = groups.get(key)
            if values is None:
                groups[key] = [value]
                used += key_cost + value_cost
            else:
                values.append(value)
                used += value_cost
        else:
            plain.append((key, value))
            used += key_cost + value_cost
        if used >= limit:
            spill(next(spills))
            groups, plain, used = {}, [], 0
            cache.clear()
    sizes = []
    last = outputs(groups, plain)
    for p in range(partitions):
        path = os.path.join(out_dir, f"part-{p}")
        if not runs[p]:  # everything fit in memory: one sorted, combined write
            _write(path, last[p])
        else:
            runs[p].append(_write(os.path.join(out_dir, f"run-{p}-last"), last[p]))
            merged = merge_files(runs[p], sort)
            _write(path, combiner(merged, params) if (combiner is not None and sort) else merged)
            for run in runs[p]:
                os.unlink(run)
        sizes.append(os.path.getsize(path))
    return sizes


def _write(path: str, pairs: Iterable[tuple[Any, Any]]) -> str:
    writer = RecordWriter(path)
    try:
        writer.write_all(pairs)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return path


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
