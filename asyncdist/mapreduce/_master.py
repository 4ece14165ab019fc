"""The master: slaves join it, clients submit jobs to it, it schedules map and reduce tasks.

A job is a set of map tasks (one per input chunk) then one reduce task per
partition. A task runs on a slave (``mr.map`` / ``mr.reduce`` called on the
slave's connection); the first attempt to commit wins, later commits of other
attempts are ignored. Faults (RELIABILITY F20-F22): a slave that dies takes
its running tasks *and* the map outputs it held back to the queue while a
reduce may still need them; a reduce that cannot fetch a map output (its
slave died) is re-run once that map ran again. A task whose own code raises
is retried up to ``max_attempts`` times, then fails the job with that error.
Clients follow a job with the ``mr.watch`` stream (progress, then the
results' locations, or the job's error).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import ssl as _ssl
from collections.abc import AsyncIterator
from typing import Any

from .._log import get_logger
from ..connection import Connection
from ..errors import AsyncDistError, ConfigurationError, ConnectionClosed
from ..security import resolve_secret
from ..server import Server, serve

__all__ = ["Master"]

log = get_logger("asyncdist.mapreduce")

MAX_ATTEMPTS = 4
_MAX_ERROR = 500  # characters of a failed job's error in mr.status


@dataclasses.dataclass(eq=False)
class _SlaveInfo:
    id: str
    conn: Connection
    address: tuple[str, int]
    workers: int
    running: int = 0


@dataclasses.dataclass(eq=False)
class _Task:
    index: int
    kind: str  # "map" | "reduce"
    spec: Any
    attempts: int = 0  # failures of its own code
    fetch_failures: int = 0  # inputs that could not be fetched (their slave was gone)
    started: int = 0  # attempts started (numbering)
    running: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    done: bool = False
    slave: _SlaveInfo | None = None
    output: Any = None


class _Job:
    def __init__(self, master: Master, job_id: str, spec: dict[str, Any]) -> None:
        self.master = master
        self.id = job_id
        self.name = str(spec.get("name") or "job")
        self.spec = spec
        self.partitions = int(spec["partitions"])
        self.maps = [_Task(i, "map", source) for i, source in enumerate(spec["inputs"])]
        self.reduces = [_Task(p, "reduce", None) for p in range(self.partitions)]
        self.max_attempts = int(spec.get("max_attempts", MAX_ATTEMPTS))
        self.changed = asyncio.Event()
        self.outcome: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.killed = False
        self.runner = asyncio.ensure_future(self._run())

    # -- progress -------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        maps = sum(t.done for t in self.maps)
        reduces = sum(t.done for t in self.reduces)
        return {"map": [maps, len(self.maps)], "reduce": [reduces, len(self.reduces)]}

    def state(self) -> dict[str, str]:
        """``{"state": "running" | "done" | "failed" | "killed"}``, with ``"error"`` when failed."""
        outcome = self.outcome
        if not outcome.done():
            return {"state": "running"}
        exc = None if outcome.cancelled() else outcome.exception()
        if exc is None:
            return {"state": "done"}
        if self.killed:
            return {"state": "killed"}
        return {"state": "failed", "error": f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]}

    # -- scheduling -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if all(t.done for t in self.reduces):
                    results = [[list(t.slave.address), t.output["path"]] for t in self.reduces if t.slave]
                    self.outcome.set_result(results)
                    return
                maps_done = all(t.done for t in self.maps)
                for task in self.maps if not maps_done else self.reduces:
                    if not task.done and not task.running:
                        slave = self.master.free_slave()
                        if slave is None:
                            break
                        self._start(task, slave)
                self.changed.clear()
                await self.changed.wait()
        except asyncio.CancelledError:
            for task in itertools.chain(self.maps, self.reduces):
                for running in task.running:
                    running.cancel()
            if not self.outcome.done():
                self.killed = True
                self.outcome.set_exception(AsyncDistError(f"job {self.name} ({self.id}) was killed"))
            raise
        except BaseException as exc:
            if not self.outcome.done():
                self.outcome.set_exception(exc)
            for task in itertools.chain(self.maps, self.reduces):
                for running in task.running:
                    running.cancel()

    def _start(self, task: _Task, slave: _SlaveInfo) -> None:
        task.started += 1
        slave.running += 1
        runner = asyncio.ensure_future(self._attempt(task, slave, task.started))
        task.running.add(runner)
        runner.add_done_callback(task.running.discard)

    async def _attempt(self, task: _Task, slave: _SlaveInfo, attempt: int) -> None:
        base = {"job": self.id, "attempt": attempt, "fns": self.spec["fns"], "sort": self.spec["sort"]}
        try:
            if task.kind == "map":
                msg = {
                    **base,
                    "task": task.index,
                    "input": task.spec,
                    "partitions": self.partitions,
                    "budget": self.spec["budget"],
                }
                output = await slave.conn.call("mr.map", msg)
            else:
                sources = []
                for m in self.maps:
                    if not m.done or m.slave is None:
                        return  # a map output went away meanwhile: this reduce starts again later
                    sources.append([list(m.slave.address), f"{m.output['dir']}/part-{task.index}"])
                output = await slave.conn.call(
                    "mr.reduce", {**base, "partition": task.index, "sources": sources}
                )
        except asyncio.CancelledError:
            raise
        except ConnectionClosed:
            return  # the slave died: the task goes back to the queue (master.slave_lost requeues)
        except Exception as exc:
            kind = type(exc).__name__ + " " + str(getattr(exc, "type_name", ""))
            if "FetchError" in kind or "BrokenProcessPool" in kind:
                # An input's slave died (the master re-runs its map once it notices), or the
                # slave's workers were killed under it (another task was cancelled): wait a little
                # (the task stays busy meanwhile), and give up after many tries.
                task.fetch_failures += 1
                if task.fetch_failures > 4 * self.max_attempts and not self.outcome.done():
                    self.outcome.set_exception(exc)
                    self.runner.cancel()
                    return
                await asyncio.sleep(min(0.1 * 2**task.fetch_failures, 2.0))
                return
            task.attempts += 1
            log.warning(
                "%s task %d of job %s failed (%d/%d): %r",
                task.kind,
                task.index,
                self.name,
                task.attempts,
                self.max_attempts,
                exc,
            )
            if task.attempts >= self.max_attempts and not self.outcome.done():
                self.outcome.set_exception(exc)
                self.runner.cancel()
            return
        finally:
            slave.running -= 1
            current = asyncio.current_task()
            if current is not None:
                task.running.discard(current)  # now, not in a done callback: the scheduler looks next
            self.changed.set()
            self.master.changed()
        if not task.done and slave.id in self.master.slaves:
            task.done, task.slave, task.output = True, slave, output

    def slave_lost(self, slave: _SlaveInfo) -> None:
        """Outputs kept by a dead slave are lost: maps a reduce may still need run again."""
        reducing_left = not all(t.done for t in self.reduces)
        for task in self.maps:
            if task.done and task.slave is slave and reducing_left:
                task.done, task.slave, task.output = False, None, None
        for task in self.reduces:
            if task.done and task.slave is slave and not self.outcome.done():
                task.done, task.slave, task.output = False, None, None
        self.changed.set()


class Master:
    """A MapReduce master: ``master = await Master.start(host, port, secret=...)``.

    Slaves (``asyncdist slave --master H:P``) join it; clients submit jobs with
    :class:`~asyncdist.mapreduce.Job`. The cluster must be authenticated (a
    shared secret or mutual TLS): jobs carry pickled functions.
    """

    def __init__(self) -> None:
        self.slaves: dict[str, _SlaveInfo] = {}
        self.jobs: dict[str, _Job] = {}
        self._server: Server | None = None
        self._slave_joined = asyncio.Event()

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | bytes | None = None,
        secret_file: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        insecure: bool = False,
        **options: Any,
    ) -> Master:
        key = resolve_secret(secret, secret_file=secret_file)
        if key is None and ssl is None:
            raise ConfigurationError(
                "a MapReduce master needs a shared secret (or mutual TLS): jobs carry pickled functions"
            )
        self = cls()
        self._server = await serve(
            self._handlers, host, port, secret=key, ssl=ssl, insecure=insecure, **options
        )
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.tcp_address

    def _handlers(self, conn: Connection) -> dict[str, Any]:
        return {
            "mr.hello": lambda sid, address, workers: self._hello(conn, sid, address, workers),
            "mr.submit": self._submit,
            "mr.watch": self._watch,
            "mr.kill": self._kill,
            "mr.purge": self._purge,
            "mr.status": self.status,
        }

    # -- slaves ---------------------------------------------------------------------------

    def _hello(self, conn: Connection, sid: Any, address: Any, workers: Any) -> None:
        if type(sid) is not str or type(address) is not list or len(address) != 2 or type(workers) is not int:
            raise ValueError("mr.hello(slave id, [host, port], workers)")
        info = _SlaveInfo(sid, conn, (str(address[0]), int(address[1])), max(1, workers))
        self.slaves[sid] = info
        conn.add_close_callback(lambda _: self._lost(info))
        self._slave_joined.set()
        self.changed()

    def _lost(self, info: _SlaveInfo) -> None:
        if self.slaves.get(info.id) is info:
            del self.slaves[info.id]
            busy = any(not job.outcome.done() for job in self.jobs.values())
            level = logging.WARNING if busy else logging.INFO
            log.log(level, "slave %s at %s:%s left", info.id, *info.address)
            for job in self.jobs.values():
                job.slave_lost(info)
            self.changed()

    def free_slave(self) -> _SlaveInfo | None:
        free = [s for s in self.slaves.values() if s.running < s.workers]
        return min(free, key=lambda s: s.running / s.workers) if free else None

    def changed(self) -> None:
        for job in self.jobs.values():
            job.changed.set()

    async def wait_for_slaves(self, n: int = 1) -> None:
        while len(self.slaves) < n:
            self._slave_joined.clear()
            await self._slave_joined.wait()

    # -- clients --------------------------------------------------------------------------

    def _submit(self, spec: Any) -> str:
        if (
            type(spec) is not dict
            or type(spec.get("inputs")) is not list
            or type(spec.get("fns")) is not bytes
        ):
            raise ValueError("mr.submit takes a job spec")
        if not spec["inputs"]:
            raise ValueError("a job needs at least one input")
        if type(spec.get("partitions")) is not int or not 0 < spec["partitions"] <= 100_000:
            raise ValueError("partitions must be an int from 1 to 100,000")
        job_id = secrets.token_hex(8)
        self.jobs[job_id] = _Job(self, job_id, spec)
        return job_id

    def _job(self, job_id: Any) -> _Job:
        job = self.jobs.get(job_id) if type(job_id) is str else None
        if job is None:
            raise LookupError(f"no job {str(job_id)[:40]!r} on this master")
        return job

    async def _watch(self, job_id: Any) -> AsyncIterator[Any]:
        job = self._job(job_id)
        last = None
        while not job.outcome.done():
            now = job.progress()
            if now != last:
                yield {"progress": now}
                last = now
            job.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.outcome), 0.25)
        yield {"progress": job.progress()}
        yield {"results": job.outcome.result()}  # raises the job's error

    async def _kill(self, job_id: Any) -> None:
        job = self._job(job_id)
        job.runner.cancel()
        with contextlib.suppress(BaseException):
            await job.runner
        await self._purge(job_id)

    async def _purge(self, job_id: Any) -> None:
        job = self._job(job_id)
        if not job.runner.done():
            raise ValueError("the job is still running: kill it first")
        del self.jobs[job_id]
        for slave in list(self.slaves.values()):
            with contextlib.suppress(ConnectionClosed):
                await slave.conn.call("mr.purge", job_id)

    def status(self) -> dict[str, Any]:
        """``mr.status``: the slaves, and each job kept (until purged) with its ``name``, its
        ``state`` (``error`` too when failed) and ``[done, total]`` per phase (``map``, ``reduce``)."""
        return {
            "slaves": [
                {"id": s.id, "address": list(s.address), "workers": s.workers, "running": s.running}
                for s in self.slaves.values()
            ],
            "jobs": {jid: {"name": j.name, **j.state(), **j.progress()} for jid, j in self.jobs.items()},
        }

    async def aclose(self) -> None:
        for job in list(self.jobs.values()):
            job.runner.cancel()
            with contextlib.suppress(BaseException):
                await job.runner
        if self._server is not None:
            await self._server.aclose()

    def close(self) -> None:
        for job in list(self.jobs.values()):
            job.runner.cancel()
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
