"""What a slave's worker processes run: one map task or one reduce task, plain synchronous Python.

A task reads its input, calls the user's functions (unpickled from the job's
function blob, which only an authenticated cluster sends) and writes record
files atomically into its attempt's directory; it returns what it wrote. The
slave moves the results into place and reports them; an attempt that the
master no longer wants is simply deleted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import cloudpickle

from ._io import RecordWriter, default_partition, merge_files, read_lines, read_records, spill_and_merge

__all__ = ["run_map", "run_reduce"]


class _Lines:
    """The file object a ``map_reader(fd, size, url, params)`` gets: the chunk's lines."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines

    def __iter__(self) -> Iterator[str]:
        return self._lines

    def read(self) -> str:
        return "\n".join(self._lines)


def _records(source: list[Any], reader: Any, params: Any) -> Iterable[Any]:
    kind = source[0]
    if kind == "file":
        _, path, start, end = source
        lines = read_lines(path, start, end)
        return reader(_Lines(lines), end - start, path, params) if reader is not None else lines
    if kind == "raw":
        text: str = source[1]
        lines = iter(text.splitlines())
        return reader(_Lines(lines), len(text), "raw://", params) if reader is not None else lines
    if kind == "records":
        records: list[Any] = cloudpickle.loads(source[1])
        return records
    if kind == "result":  # a previous job's results, fetched here: (key, value) records
        return read_records(source[1])
    raise ValueError(f"unknown input kind {kind!r}")


def run_map(task: dict[str, Any]) -> list[int]:
    """Map one input chunk into ``task["out"]/part-P`` files; return their sizes."""
    fns = cloudpickle.loads(task["fns"])
    params = fns.get("params")
    fmap = fns["map"]
    out = task["out"]
    os.makedirs(out, exist_ok=True)
    try:

        def pairs() -> Iterator[tuple[Any, Any]]:
            for record in _records(task["input"], fns.get("map_reader"), params):
                yield from fmap(record, params)

        return spill_and_merge(
            pairs(),
            partitions=task["partitions"],
            partition=fns.get("partition") or default_partition,
            out_dir=out,
            budget=task["budget"],
            combiner=fns.get("combiner"),
            sort=task["sort"],
            params=params,
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def run_reduce(task: dict[str, Any]) -> int:
    """Reduce one partition (the map outputs fetched into ``task["inputs"]``) into ``task["out"]``."""
    fns = cloudpickle.loads(task["fns"])
    params = fns.get("params")
    freduce = fns.get("reduce")
    merged = merge_files(task["inputs"], task["sort"])
    writer = RecordWriter(task["out"])
    try:
        writer.write_all(freduce(merged, params) if freduce is not None else merged)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
