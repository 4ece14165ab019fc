"""The broker: a queue of tasks, workers that pull them, clients that submit them.

Messages (all one-way NOTIFYs unless marked CALL), on the core Connection:

===================  ===================  ================================================
from -> to           name                 arguments
===================  ===================  ================================================
worker -> broker     worker_hello (CALL)  ``{slots, pid, host, name}`` -> ``{wid, consts,
                                          forward_logs}``
worker -> broker     want                 ``n``: the worker takes n more tasks (credit)
broker -> worker     run                  ``[[key, attempt, fid, blob(, log_level)], ...],
                                          {fid: blob}``; log_level when the task's client
                                          asks for its logs
worker -> broker     started              ``[key, ...], {fid: seconds}``: tasks executing now
worker -> broker     done                 ``[[key, attempt, status, blob], ...], {fid: seconds}``
broker -> worker     cancel               ``[key, ...]``
broker -> worker     consts               ``{name: blob}``
worker -> broker     waiting              ``[key, ...]``: these tasks wait for other tasks
                                          (nested ``sync.map``): their cost no longer
                                          counts against the worker's load
worker -> broker     leaving              (graceful exit: its tasks go back to the queue)
client -> broker     client_hello (CALL)  ``[{logs: level}]`` -> ``{cid}``; a level > 0
                                          asks for the logs of its tasks
broker -> worker     forward_logs         ``level``: forward records at this level and
                                          prints (0: stop); also in worker_hello's reply
worker -> broker     log                  ``[[key, kind, data], ...]`` (see ``_logs``)
broker -> client     logs                 ``worker_name, host, [[key, kind, data], ...]``
client -> broker     submit               ``[[tid, fid, blob], ...], {fid: blob}``
client -> broker     cancel               ``[tid, ...]``
broker -> client     results              ``[[tid, status, blob], ...]``; status 0 value, 1 error
client -> broker     set_const (CALL)     ``name, blob``; a second, different value raises
client -> broker     get_consts (CALL)    -> ``{name: blob}``
client -> broker     status (CALL)        -> counters, workers and queue depth
===================  ===================  ================================================

Load balancing is pull-based: each worker asks for as many tasks as it can
start soon (few for long tasks, hundreds for tiny ones), and the broker
spreads the queue over the workers that asked, many tasks to a frame when
the queue is deep. The broker also caps what it hands a worker by time:
workers report each function's mean duration, and a worker gets one task
per slot and, beyond that, at most about ``slots * 30 ms`` of estimated
work at once (two tasks per slot of a function not measured yet), so a long
map stays balanced to its end even when a worker still holds credit from
earlier tiny tasks. A task that waits for other tasks (``waiting``) lends
its slot: it no longer counts, so a nested map can run on its worker. Results travel
back to each client in one frame per loop iteration. The broker never
decodes arguments or results (blobs).

Faults: a worker whose connection ends (crash, kill, heartbeat timeout) has
its tasks put back at the head of the queue. The death counts against the
tasks it had announced as started (those it had only prefetched are
innocent), or against all of them if it announced none; a task whose workers
died more than ``allowed_failures`` times fails with
:class:`~asyncdist.errors.WorkerLost`. A worker that says ``leaving`` first
gives its tasks back without counting a failure. Late results of an attempt
that was reassigned are dropped, so each result is delivered once. A client
that disconnects has its queued and running tasks cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._log import get_logger
from ..codec import Codec
from ..connection import Connection
from ..errors import ConnectionClosed, NoWorkersError, ProtocolError, WorkerLost

__all__ = ["Broker"]

log = get_logger("asyncdist.futures.broker")

STATUS_OK = 0
STATUS_ERROR = 1
# A worker holds at most about this much estimated work per slot; an unmeasured function
# costs half of it per task (two per slot).
_LOAD_PER_SLOT = 0.03
_MAX_CREDIT = 100_000
_MAX_NAME = 200

Deliver = Callable[[list[list[Any]]], None]
#: Receives forwarded logs: ``(worker_name, host, entries)``.
DeliverLogs = Callable[[str, str, list[list[Any]]], None]


class _Task:
    __slots__ = (
        "attempt",
        "blob",
        "cancelled",
        "client",
        "cost",
        "deaths",
        "fid",
        "key",
        "started",
        "tid",
        "waiting",
        "worker",
    )

    def __init__(self, key: int, client: _Client, tid: int, fid: str, blob: bytes) -> None:
        self.key = key
        self.client = client
        self.tid = tid
        self.fid = fid
        self.blob = blob
        self.attempt = 0
        self.deaths = 0
        self.worker: _Worker | None = None
        self.cancelled = False
        self.started = False  # announced as executing by its current worker
        self.cost = 0.0  # estimated seconds, counted in its worker's load
        self.waiting = False  # waiting for other tasks: its slot runs others meanwhile


class _Worker:
    def __init__(self, wid: int, conn: Connection, slots: int, pid: int, host: str, name: str) -> None:
        self.wid = wid
        self.conn = conn
        self.slots = slots
        self.pid = pid
        self.host = host
        self.name = name
        self.credit = 0
        self.load = 0.0  # estimated seconds of the tasks it holds
        self.lent = 0  # tasks of `running` that wait for other tasks (their slots are lent)
        self.running: dict[int, _Task] = {}
        self.fids: set[str] = set()
        self.leaving = False
        self.completed = 0
        self.joined = time.time()

    def info(self) -> dict[str, Any]:
        return {
            "wid": self.wid,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "slots": self.slots,
            "running": len(self.running),
            "credit": self.credit,
            "completed": self.completed,
            "joined": self.joined,
        }


class _Client:
    def __init__(self, cid: int, deliver: Deliver, logs: DeliverLogs | None = None, level: int = 0) -> None:
        self.cid = cid
        self.deliver = deliver
        self.logs = logs
        self.log_level = level if logs is not None else 0
        self.tasks: dict[int, _Task] = {}
        self.outbox: list[list[Any]] = []
        self.closed = False


class Broker:
    """The task queue and scheduler; serve it with :func:`asyncdist.futures.serve_broker`.

    ``allowed_failures``: how many worker deaths a task survives before it
    fails with :class:`~asyncdist.errors.WorkerLost` (default 3).
    ``no_workers_timeout``: seconds tasks may wait while no worker is
    connected before they fail with :class:`~asyncdist.errors.NoWorkersError`
    (default None: wait for a worker, or the caller's own timeout).
    """

    def __init__(self, *, allowed_failures: int = 3, no_workers_timeout: float | None = None) -> None:
        if allowed_failures < 0:
            raise ValueError("allowed_failures must be >= 0")
        self.allowed_failures = allowed_failures
        self.no_workers_timeout = no_workers_timeout
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Task] = deque()
        self._tasks: dict[int, _Task] = {}
        self._workers: dict[int, _Worker] = {}
        self._clients: dict[int, _Client] = {}
        self._functions: dict[str, bytes] = {}
        self._estimates: dict[str, float] = {}  # fid -> mean seconds per call
        self._consts: dict[str, bytes] = {}
        self._keys = itertools.count(1)
        self._wids = itertools.count(1)
        self._cids = itertools.count(1)
        self._dispatch_pending = False
        self._flush_pending = False
        self._log_level = 0  # the lowest level a client asks forwarded logs at (0: none)
        self._membership = asyncio.Event()
        self._no_workers_timer: asyncio.TimerHandle | None = None
        self._errors = Codec()
        self.started = time.time()
        #: Counters since the broker started.
        self.stats = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "requeued": 0,
            "stale_results": 0,
            "workers_joined": 0,
            "workers_lost": 0,
        }

    # -- introspection -----------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        """Workers connected now."""
        return len(self._workers)

    def status(self) -> dict[str, Any]:
        """A snapshot: counters, queue depth, running tasks, and each worker's load."""
        return {
            "stats": dict(self.stats),
            "queued": sum(1 for t in self._queue if not t.cancelled),
            "running": sum(len(w.running) for w in self._workers.values()),
            "clients": len(self._clients),
            "workers": [w.info() for w in self._workers.values()],
            "uptime": time.time() - self.started,
        }

    async def wait_for_workers(self, n: int) -> None:
        """Return once at least ``n`` workers are connected (bound it with asyncio.timeout)."""
        while len(self._workers) < n:
            self._membership.clear()
            await self._membership.wait()

    # -- clients -----------------------------------------------------------------------

    def attach_client(self, deliver: Deliver, logs: DeliverLogs | None = None, log_level: int = 0) -> _Client:
        """Register a client; ``deliver(batch)`` receives ``[[tid, status, blob], ...]``.

        With ``logs`` and a ``log_level`` > 0, the workers forward the logs
        and prints of this client's tasks to ``logs(worker, host, entries)``.
        """
        if type(log_level) is not int or log_level < 0:
            raise ValueError("log_level must be a logging level (an int >= 0)")
        client = _Client(next(self._cids), deliver, logs, log_level)
        self._clients[client.cid] = client
        if client.log_level:
            self._update_log_level()
        return client

    def detach_client(self, client: _Client) -> None:
        """Forget a client and cancel all of its queued and running tasks (F9)."""
        if client.closed:
            return
        client.closed = True
        self._clients.pop(client.cid, None)
        if client.log_level:
            self._update_log_level()
        self._cancel_tasks(list(client.tasks.values()))
        client.tasks.clear()
        client.outbox.clear()

    def submit(self, client: _Client, tasks: list[Any], functions: dict[str, bytes]) -> None:
        """Queue ``[[tid, fid, blob], ...]``; ``functions`` holds blobs of new fids."""
        if client.closed:
            return
        for fid, blob in functions.items():
            if type(fid) is not str or type(blob) is not bytes:
                raise ProtocolError("submit: functions must map str to bytes")
            self._functions.setdefault(fid, blob)
        for item in tasks:
            if not (
                type(item) is list
                and len(item) == 3
                and type(item[0]) is int
                and type(item[1]) is str
                and type(item[2]) is bytes
            ):
                raise ProtocolError("submit: a task must be [tid, fid, blob]")
            tid, fid, blob = item
            if fid not in self._functions:
                raise ProtocolError(f"submit: unknown function id {fid[:64]!r}")
            if tid in client.tasks:
                raise ProtocolError(f"submit: task id {tid} is already in use")
            task = _Task(next(self._keys), client, tid, fid, blob)
            client.tasks[tid] = task
            self._tasks[task.key] = task
            self._queue.append(task)
        self.stats["submitted"] += len(tasks)
        if not self._workers and self.no_workers_timeout is not None:
            self._arm_no_workers_timer()
        self._schedule_dispatch()

    def cancel(self, client: _Client, tids: list[Any]) -> None:
        """Cancel tasks of this client: dropped from the queue, cancelled on their workers."""
        found = [client.tasks.pop(tid) for tid in tids if tid in client.tasks]
        self._cancel_tasks(found)

    def set_const(self, name: str, blob: bytes) -> None:
        """Set a shared constant once and push it to every worker; a different value raises."""
        if type(name) is not str or not 0 < len(name) <= _MAX_NAME or type(blob) is not bytes:
            raise ValueError("a constant needs a name of 1 to 200 characters and a value")
        old = self._consts.get(name)
        if old is not None:
            if old == blob:
                return
            raise ValueError(f"shared constant {name!r} is already set; constants cannot be reassigned")
        self._consts[name] = blob
        for worker in self._workers.values():
            self._notify(worker.conn, "consts", {name: blob})

    def consts(self) -> dict[str, bytes]:
        """All shared constants, as blobs."""
        return dict(self._consts)

    # -- workers -----------------------------------------------------------------------

    def _worker_joined(self, conn: Connection, info: Any) -> _Worker:
        if not isinstance(info, dict):
            raise ProtocolError("worker_hello needs a map")
        slots, pid = info.get("slots", 1), info.get("pid", 0)
        host, name = info.get("host", ""), info.get("name", "")
        if not (type(slots) is int and 0 < slots <= 100_000 and type(pid) is int):
            raise ProtocolError("worker_hello: bad slots or pid")
        if not (type(host) is str and type(name) is str):
            raise ProtocolError("worker_hello: bad host or name")
        worker = _Worker(next(self._wids), conn, slots, pid, host[:_MAX_NAME], name[:_MAX_NAME])
        self._workers[worker.wid] = worker
        self.stats["workers_joined"] += 1
        self._membership.set()
        if self._no_workers_timer is not None:
            self._no_workers_timer.cancel()
            self._no_workers_timer = None
        log.info("worker %d joined: %s (pid %d, %d slots)", worker.wid, worker.name, pid, slots)
        return worker

    def _want(self, worker: _Worker, n: Any) -> None:
        if type(n) is not int or not 0 < n <= _MAX_CREDIT:
            raise ProtocolError("want: n must be a positive integer")
        worker.credit = min(worker.credit + n, _MAX_CREDIT)
        if self._queue:
            self._schedule_dispatch()

    def _started(self, worker: _Worker, keys: Any, estimates: Any = None) -> None:
        if type(keys) is not list:
            raise ProtocolError("started: keys must be a list")
        self._update_estimates(estimates)
        running = worker.running
        for key in keys:
            task = running.get(key)
            if task is not None:
                task.started = True

    def _done(self, worker: _Worker, results: Any, estimates: Any = None) -> None:
        if type(results) is not list:
            raise ProtocolError("done: results must be a list")
        self._update_estimates(estimates)
        for item in results:
            if not (type(item) is list and len(item) == 4 and type(item[3]) is bytes):
                raise ProtocolError("done: a result must be [key, attempt, status, blob]")
            key, attempt, status, blob = item
            task = self._tasks.get(key)
            if task is None or task.worker is not worker or task.attempt != attempt:
                self.stats["stale_results"] += 1
                continue
            del self._tasks[key]
            if worker.running.pop(key, None) is not None:
                worker.load = worker.load - task.cost if worker.running else 0.0
                if task.waiting:
                    task.waiting = False
                    worker.lent -= 1
            worker.completed += 1
            self.stats["completed" if status == STATUS_OK else "failed"] += 1
            self._deliver(task, STATUS_OK if status == STATUS_OK else STATUS_ERROR, blob)
        if self._queue:
            self._schedule_dispatch()  # room freed under the load cap

    def _waiting(self, worker: _Worker, keys: Any) -> None:
        if type(keys) is not list:
            raise ProtocolError("waiting: keys must be a list")
        for key in keys:
            task = worker.running.get(key)
            if task is not None and not task.waiting:
                task.waiting = True
                worker.lent += 1
                worker.load = max(0.0, worker.load - task.cost)
                task.cost = 0.0
        if self._queue:
            self._schedule_dispatch()

    # -- forwarded logs ----------------------------------------------------------------

    def _update_log_level(self) -> None:
        levels = [c.log_level for c in self._clients.values() if c.log_level]
        level = min(levels) if levels else 0
        if level != self._log_level:
            self._log_level = level
            for worker in self._workers.values():
                self._notify(worker.conn, "forward_logs", level)

    def _logs(self, worker: _Worker, entries: Any) -> None:
        """Pass each entry on to the client whose task made it (else to every client asking)."""
        if type(entries) is not list:
            raise ProtocolError("log: entries must be a list")
        asking = [c for c in self._clients.values() if c.log_level and c.logs is not None]
        if not asking:
            return
        out: dict[_Client, list[list[Any]]] = {}
        for entry in entries:
            if not (type(entry) is list and len(entry) == 3):
                raise ProtocolError("log: an entry must be [key, kind, data]")
            key, kind, data = entry
            task = self._tasks.get(key) if type(key) is int else None
            targets = [task.client] if task is not None and task.worker is worker else asking
            level = data.get("levelno", 0) if kind == 0 and isinstance(data, dict) else None
            for client in targets:
                if client.log_level and (type(level) is not int or level >= client.log_level):
                    out.setdefault(client, []).append(entry)
        for client, batch in out.items():
            if client.logs is not None and not client.closed:
                try:
                    client.logs(worker.name, worker.host, batch)
                except ConnectionClosed:
                    self.detach_client(client)

    def _update_estimates(self, estimates: Any) -> None:
        if not estimates:
            return
        if type(estimates) is not dict:
            raise ProtocolError("estimates must be a map of function id to seconds")
        cheaper = False
        for fid, seconds in estimates.items():
            if type(fid) is str and type(seconds) is float and seconds >= 0:
                old = self._estimates.get(fid, _LOAD_PER_SLOT / 2)
                self._estimates[fid] = seconds
                if seconds < old / 2:
                    cheaper = True
        if cheaper:
            # Tasks handed out at the old, higher cost (e.g. async tasks, which hold no
            # slot) would keep their workers looking full: re-cost them.
            for worker in self._workers.values():
                load = 0.0
                for task in worker.running.values():
                    task.cost = min(task.cost, self._estimates.get(task.fid, task.cost))
                    load += task.cost
                worker.load = load
            if self._queue:
                self._schedule_dispatch()

    def _worker_gone(self, worker: _Worker) -> None:
        if self._workers.pop(worker.wid, None) is None:
            return
        self.stats["workers_lost"] += 1
        graceful = worker.leaving
        log.log(
            logging.INFO if graceful else logging.WARNING,
            "worker %d (%s) %s with %d task(s) running",
            worker.wid,
            worker.name,
            "left" if graceful else "was lost",
            len(worker.running),
        )
        requeue: list[_Task] = []
        # Blame the tasks that were executing; with no announcement, all of them.
        blame_all = not any(task.started for task in worker.running.values())
        for task in worker.running.values():
            task.worker = None
            task.waiting = False
            blamed = task.started or blame_all
            task.started = False
            if task.cancelled:
                continue
            if not graceful and blamed:
                task.deaths += 1
            if task.deaths > self.allowed_failures:
                del self._tasks[task.key]
                task.client.tasks.pop(task.tid, None)
                self.stats["failed"] += 1
                error = WorkerLost(
                    f"task {task.tid} ({task.fid.removeprefix('ref:')}) was running on {task.deaths} "
                    f"workers that died; the last was {worker.name or worker.wid}",
                    task.deaths,
                )
                self._deliver(task, STATUS_ERROR, self._errors.encode(error))
            else:
                requeue.append(task)
        worker.running.clear()
        self.stats["requeued"] += len(requeue)
        self._queue.extendleft(reversed(requeue))
        if requeue:
            self._schedule_dispatch()
        if not self._workers and self._queue and self.no_workers_timeout is not None:
            self._arm_no_workers_timer()

    # -- scheduling --------------------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        queue = self._queue
        ready = [w for w in self._workers.values() if w.credit > 0 and not w.leaving]
        while queue and ready:
            share = -(-len(queue) // len(ready))  # spread a shallow queue evenly
            still_ready: list[_Worker] = []
            for worker in ready:
                take = min(worker.credit, share)
                worker_full = False
                batch: list[list[Any]] = []
                functions: dict[str, bytes] = {}
                cap = worker.slots * _LOAD_PER_SLOT
                estimates = self._estimates
                while take and queue:
                    task = queue[0]
                    if task.cancelled:
                        queue.popleft()
                        continue
                    cost = estimates.get(task.fid, _LOAD_PER_SLOT / 2)
                    # Every slot gets a task; beyond that, the estimated load is capped.
                    if len(worker.running) - worker.lent >= worker.slots and worker.load + cost > cap:
                        worker_full = True
                        break
                    queue.popleft()
                    task.cost = cost
                    worker.load += cost
                    task.attempt += 1
                    task.worker = worker
                    task.started = False
                    worker.running[task.key] = task
                    if task.client.log_level:
                        batch.append([task.key, task.attempt, task.fid, task.blob, task.client.log_level])
                    else:
                        batch.append([task.key, task.attempt, task.fid, task.blob])
                    if task.fid not in worker.fids:
                        worker.fids.add(task.fid)
                        functions[task.fid] = self._functions[task.fid]
                    take -= 1
                if batch:
                    worker.credit -= len(batch)
                    self._notify(worker.conn, "run", batch, functions)
                if worker.credit > 0 and not worker_full:
                    still_ready.append(worker)
                if not queue:
                    break
            ready = still_ready

    def _cancel_tasks(self, tasks: list[_Task]) -> None:
        by_worker: dict[_Worker, list[int]] = {}
        for task in tasks:
            if task.cancelled:
                continue
            task.cancelled = True
            self._tasks.pop(task.key, None)
            task.client.tasks.pop(task.tid, None)
            worker = task.worker
            if worker is not None:
                if worker.running.pop(task.key, None) is not None:
                    worker.load = worker.load - task.cost if worker.running else 0.0
                    if task.waiting:
                        task.waiting = False
                        worker.lent -= 1
                by_worker.setdefault(worker, []).append(task.key)
            self.stats["cancelled"] += 1
        for worker, keys in by_worker.items():
            self._notify(worker.conn, "cancel", keys)

    def _deliver(self, task: _Task, status: int, blob: bytes) -> None:
        client = task.client
        client.tasks.pop(task.tid, None)
        if client.closed:
            return
        client.outbox.append([task.tid, status, blob])
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        for client in list(self._clients.values()):
            if client.outbox:
                batch, client.outbox = client.outbox, []
                try:
                    client.deliver(batch)
                except ConnectionClosed:
                    self.detach_client(client)

    def _arm_no_workers_timer(self) -> None:
        if self._no_workers_timer is None and self.no_workers_timeout is not None:
            self._no_workers_timer = self._loop.call_later(self.no_workers_timeout, self._no_workers)

    def _no_workers(self) -> None:
        self._no_workers_timer = None
        if self._workers:
            return
        queued = [t for t in self._queue if not t.cancelled]
        self._queue.clear()
        error = self._errors.encode(NoWorkersError(f"no worker joined within {self.no_workers_timeout:g} s"))
        for task in queued:
            self._tasks.pop(task.key, None)
            self.stats["failed"] += 1
            self._deliver(task, STATUS_ERROR, error)

    @staticmethod
    def _notify(conn: Connection, name: str, *args: Any) -> None:
        try:
            conn.notify_nowait(name, *args)
            conn.flush()  # the broker batches per iteration itself
        except ConnectionClosed:
            pass  # its close callback cleans up

    # -- serving -----------------------------------------------------------------------

    def handlers(self, conn: Connection) -> dict[str, Callable[..., Any]]:
        """The handler table of one connection to the broker (a worker or a client)."""
        return _Session(self, conn).handlers()

    def close(self) -> None:
        """Fail nothing, forget everything: the server closing the connections does the rest."""
        if self._no_workers_timer is not None:
            self._no_workers_timer.cancel()
            self._no_workers_timer = None


class _Session:
    """One connection to the broker, which becomes a worker or a client by its hello."""

    def __init__(self, broker: Broker, conn: Connection) -> None:
        self.broker = broker
        self.conn = conn
        self.worker: _Worker | None = None
        self.client: _Client | None = None

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "worker_hello": self.worker_hello,
            "want": self.want,
            "started": self.started,
            "done": self.done,
            "leaving": self.leaving,
            "waiting": self.waiting,
            "log": self.log,
            "client_hello": self.client_hello,
            "submit": self.submit,
            "cancel": self.cancel,
            "set_const": self.set_const,
            "get_consts": self.broker.consts,
            "status": self.broker.status,
        }

    def _closed(self, conn: Connection) -> None:
        if self.worker is not None:
            self.broker._worker_gone(self.worker)
        if self.client is not None:
            self.broker.detach_client(self.client)

    def _role(self) -> None:
        if self.worker is not None or self.client is not None:
            raise ProtocolError("this connection already said hello")

    def worker_hello(self, info: Any) -> dict[str, Any]:
        self._role()
        self.worker = self.broker._worker_joined(self.conn, info)
        self.conn.add_close_callback(self._closed)
        return {
            "wid": self.worker.wid,
            "consts": self.broker.consts(),
            "forward_logs": self.broker._log_level,
        }

    def client_hello(self, options: Any = None) -> dict[str, Any]:
        self._role()
        conn = self.conn
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ProtocolError("client_hello: options must be a map")
        level = options.get("logs", 0)
        if type(level) is not int or not 0 <= level <= 1000:
            raise ProtocolError("client_hello: logs must be a logging level")

        def deliver(batch: list[list[Any]]) -> None:
            conn.notify_nowait("results", batch)
            conn.flush()

        def logs(worker: str, host: str, entries: list[list[Any]]) -> None:
            conn.notify_nowait("logs", worker, host, entries)

        self.client = self.broker.attach_client(deliver, logs, level)
        self.conn.add_close_callback(self._closed)
        return {"cid": self.client.cid}

    def _as_worker(self) -> _Worker:
        if self.worker is None:
            raise ProtocolError("only a worker may send this")
        return self.worker

    def _as_client(self) -> _Client:
        if self.client is None:
            raise ProtocolError("only a client may send this")
        return self.client

    def want(self, n: Any) -> None:
        self.broker._want(self._as_worker(), n)

    def started(self, keys: Any, estimates: Any = None) -> None:
        self.broker._started(self._as_worker(), keys, estimates)

    def done(self, results: Any, estimates: Any = None) -> None:
        self.broker._done(self._as_worker(), results, estimates)

    def leaving(self) -> None:
        self._as_worker().leaving = True

    def waiting(self, keys: Any) -> None:
        self.broker._waiting(self._as_worker(), keys)

    def log(self, entries: Any) -> None:
        self.broker._logs(self._as_worker(), entries)

    def submit(self, tasks: Any, functions: Any) -> None:
        if type(tasks) is not list or type(functions) is not dict:
            raise ProtocolError("submit needs a list of tasks and a map of functions")
        self.broker.submit(self._as_client(), tasks, functions)

    def cancel(self, tids: Any) -> None:
        if type(tids) is not list:
            raise ProtocolError("cancel needs a list of task ids")
        self.broker.cancel(self._as_client(), tids)

    def set_const(self, name: Any, blob: Any) -> None:
        self._as_client()
        self.broker.set_const(name, blob)
