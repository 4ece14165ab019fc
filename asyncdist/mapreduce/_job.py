"""The client side: :class:`Job`, :func:`result_iterator`, and the embedded local cluster.

``await Job(name=...).run(input=..., map=..., reduce=...)`` submits a job to
a master (``master="host:port"``), or, with no master, to a cluster this
event loop starts for itself: a master in this process and one slave process
per core, with a random secret, stopped when the loop closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any

import cloudpickle
import msgpack

from .._progress import Progress, progress_bar
from ..connection import Connection, connect, parse_address
from ..errors import ConfigurationError, ConnectionClosed, MasterLost
from ..security import resolve_secret
from ._io import _as_key, chunk_files
from ._master import Master

__all__ = ["Job", "Results", "result_iterator"]

#: Bytes of input per map task (a big file is cut into chunks of this size).
CHUNK_SIZE = int(os.environ.get("ASYNCDIST_MR_CHUNK", str(16 << 20)))
#: Records of an in-memory input per map task.
RECORDS_PER_TASK = 10_000


def _budget() -> int:
    return int(os.environ.get("ASYNCDIST_MR_MEMORY", str(256 << 20)))


class Results(list[list[Any]]):
    """Where a job's results are: one ``[[host, port], path]`` per partition (on the slaves).

    Give it to :func:`result_iterator`, or as ``input=`` of another job.
    """

    def __init__(self, locations: Iterable[list[Any]], options: dict[str, Any]) -> None:
        super().__init__(locations)
        self.options = options


class _Cluster:
    """A master in this process and local slave processes, owned by one event loop."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(24)
        self.master: Master | None = None
        self.procs: list[asyncio.subprocess.Process] = []
        self.data_dir = tempfile.mkdtemp(prefix="asyncdist-mr-")

    async def start(self, slaves: int) -> None:
        self.master = await Master.start("127.0.0.1", 0, secret=self.secret)
        host, port = self.master.address
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]  # noqa: ASYNC240 - fast, local
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("ASYNCDIST_SECRET", None)
        for i in range(slaves):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "asyncdist", "slave", "--master", f"{host}:{port}",
                "--data-dir", os.path.join(self.data_dir, f"slave-{i}"),
                "--secret-stdin", "--watch-stdin", "--quiet",
                stdin=asyncio.subprocess.PIPE, env=env,
            )  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(self.secret.encode() + b"\n")
            await proc.stdin.drain()
            self.procs.append(proc)
        async with asyncio.timeout(60):
            await self.master.wait_for_slaves(slaves)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
        if self.master is not None:
            await self.master.aclose()
        shutil.rmtree(self.data_dir, ignore_errors=True)


_clusters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[_Cluster, Any]] = (
    weakref.WeakKeyDictionary()
)


async def _stop_with_loop(cluster: _Cluster) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await cluster.stop()


async def local_cluster(slaves: int | None = None) -> _Cluster:
    """This loop's embedded cluster (started at first use: one slave per core)."""
    loop = asyncio.get_running_loop()
    held = _clusters.get(loop)
    if held is not None:
        return held[0]
    cluster = _Cluster()
    guard = _stop_with_loop(cluster)
    await guard.__anext__()
    _clusters[loop] = (cluster, guard)
    try:
        await cluster.start(slaves or os.cpu_count() or 1)
    except BaseException:
        del _clusters[loop]
        await guard.aclose()
        raise
    return cluster


async def shutdown_local_cluster() -> None:
    """Stop this loop's embedded cluster now (it also stops when the loop closes)."""
    held = _clusters.pop(asyncio.get_running_loop(), None)
    if held is not None:
        await held[1].aclose()


def _sources(input: Any, chunk_size: int) -> list[list[Any]]:
    items = (
        [input] if isinstance(input, str | Results) or not isinstance(input, list | tuple) else list(input)
    )
    sources: list[list[Any]] = []
    for item in items:
        if isinstance(item, Results):
            sources += [["fetch", loc[0], loc[1]] for loc in item]
        elif isinstance(item, str) and item.startswith("raw://"):
            sources.append(["raw", item[len("raw://") :]])
        elif isinstance(item, str | os.PathLike):
            sources += [["file", p, s, e] for p, s, e in chunk_files(os.fspath(item), chunk_size)]
        elif isinstance(item, Iterable):
            it = iter(item)
            while batch := list(_take(it, RECORDS_PER_TASK)):
                sources.append(["records", cloudpickle.dumps(batch)])
        else:
            raise TypeError(f"not an input source: {item!r}")
    return sources


def _take(it: Any, n: int) -> Iterable[Any]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


class Job:
    """A MapReduce job (Disco's): ``job = await Job(name="wc").run(input=..., map=fmap, reduce=freduce)``.

    ``master``: ``"host:port"`` of a master (``asyncdist master``), with
    ``secret``/``ssl`` as everywhere; None runs on this loop's embedded cluster.
    """

    def __init__(self, name: str = "job", master: str | None = None, **connect_options: Any) -> None:
        self.name = name
        self.master = master
        self.id: str | None = None
        self._options = connect_options
        self._conn: Connection | None = None
        self._results: Results | None = None

    async def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            if self.master is None:
                cluster = await local_cluster()
                assert cluster.master is not None
                host, port = cluster.master.address
                self._options = {**self._options, "secret": cluster.secret}
            else:
                host, port = parse_address(self.master, 7878)
                key = resolve_secret(
                    self._options.get("secret"), secret_file=self._options.get("secret_file")
                )
                if key is None and self._options.get("ssl") is None:
                    raise ConfigurationError(
                        "a MapReduce job needs the cluster's secret (or TLS): it sends pickled functions"
                    )
            self._conn = await connect(host, port, **self._options)
        return self._conn

    async def run(
        self,
        input: Any,
        map: Callable[..., Iterable[tuple[Any, Any]]],
        reduce: Callable[..., Iterable[tuple[Any, Any]]] | None = None,
        *,
        partitions: int = 1,
        combiner: Callable[..., Iterable[tuple[Any, Any]]] | None = None,
        map_reader: Callable[..., Iterable[Any]] | None = None,
        partition: Callable[[Any, int, Any], int] | None = None,
        sort: bool = True,
        params: Any = None,
        max_attempts: int = 4,
        chunk_size: int | None = None,
    ) -> Job:
        """Submit the job; return it at once (``await job.wait()`` for its results).

        ``map(record, params)`` and ``reduce(pairs, params)`` are generators of
        ``(key, value)``; ``reduce`` gets its partition's pairs sorted by key
        (when ``sort``): group them with :func:`kvgroup`. ``combiner(pairs,
        params)`` (like reduce) runs on each spill of map output.
        """
        if self.id is not None:
            raise RuntimeError("this Job object already ran a job: make a new one")
        fns = cloudpickle.dumps(
            {"map": map, "reduce": reduce, "combiner": combiner, "map_reader": map_reader,
             "partition": partition, "params": params}
        )  # fmt: skip
        spec = {
            "name": self.name,
            "inputs": _sources(input, chunk_size or CHUNK_SIZE),
            "fns": fns,
            "partitions": int(partitions),
            "sort": bool(sort),
            "budget": _budget(),
            "max_attempts": int(max_attempts),
        }
        conn = await self._connection()
        self.id = await conn.call("mr.submit", spec)
        return self

    async def wait(self, show: Progress = False, timeout: float | None = None) -> Results:
        """Wait for the results; raise the job's error (its own type, remote traceback attached).

        ``show=True`` shows a progress bar per phase (on a terminal or in a
        notebook; ``"force"`` anywhere). Cancelling the waiting
        task kills the job (and frees its disk).
        """
        if self._results is not None:
            return self._results
        if self.id is None:
            raise RuntimeError("run() the job first")
        conn = await self._connection()
        bars: dict[str, Any] = {}
        try:
            async with asyncio.timeout(timeout):
                async for event in conn.stream("mr.watch", self.id):
                    if "progress" in event and show:
                        for phase, (done, total) in event["progress"].items():
                            if phase not in bars:
                                bars[phase] = progress_bar(
                                    total, f"{self.name} {phase}", show=show, leave=True
                                )
                            bar = bars[phase]
                            if bar is not None:
                                bar.update(done - bar.n)
                    if "results" in event:
                        self._results = Results(event["results"], {**self._options})
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self.kill())
            raise
        except ConnectionClosed as exc:
            raise MasterLost(f"the MapReduce master was lost while job {self.name} ran: {exc}") from exc
        finally:
            for bar in bars.values():
                if bar is not None:
                    bar.close()
        assert self._results is not None
        return self._results

    async def kill(self) -> None:
        """Stop the job and free its disk on the slaves."""
        if self.id is not None:
            conn = await self._connection()
            await conn.call("mr.kill", self.id)

    async def purge(self) -> None:
        """Free the job's results on the slaves (after reading them)."""
        if self.id is not None:
            conn = await self._connection()
            await conn.call("mr.purge", self.id)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def result_iterator(results: Results) -> AsyncIterator[tuple[Any, Any]]:
    """Stream a job's ``(key, value)`` results from the slaves that hold them, partition by partition."""
    for address, path in results:
        async with connect(address[0], address[1], **results.options) as conn:
            unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=64 << 20)
            async for chunk in conn.stream("mr.fetch", path):
                unpacker.feed(chunk)
                for key, value in unpacker:
                    yield _as_key(key), value
