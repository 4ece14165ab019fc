"""The worker: runs tasks pulled from a broker (``asyncdist worker`` / ``asyncdist-worker``).

* ``async def`` functions run as tasks on the worker's event loop, many
  suspended at once (up to ``max_async``);
* plain functions run in ``slots`` task threads, off the loop, so heartbeats
  never stall; small tasks go to a thread in batches (one hop for many
  tasks), sized from each function's measured duration; a function measured
  to take under 20 µs per call runs on the loop instead (the thread hop
  would cost more than the call), and goes back to the threads for good if
  one call takes over 1 ms;
* the worker asks the broker for as many tasks as it can start soon: about
  ``prefetch`` seconds of work per slot, one or two for long tasks and
  hundreds for tiny ones;
* results go back in one frame per loop iteration.

A cancelled async task gets CancelledError; a thread cannot be interrupted,
so the late result of a cancelled plain task is dropped. The worker exits
when its broker connection ends (F7), and, when started by a pool or over
SSH, when its stdin reaches EOF: no worker outlives its launcher. SIGTERM
makes it leave gracefully: its tasks go back to the queue without counting
as failures (F3).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .._log import get_logger, set_worker, tag_all_records
from ..connection import Connection, connect, parse_address
from ..errors import ConnectionClosed, SerializationError
from ..security import resolve_secret
from ._broker import STATUS_ERROR, STATUS_OK
from ._logs import LogForwarder, async_task_key
from ._payload import MAIN_ALIAS, FunctionCache, PayloadCodec

__all__ = ["Worker", "current_worker"]

log = get_logger("asyncdist.futures.worker")

_PREFETCH_SECONDS = 0.02
_BATCH_SECONDS = 0.005
_MAX_PER_SLOT = 1024
# A plain function whose calls took under _INLINE_BELOW seconds on average, over at least
# _INLINE_AFTER calls, runs on the loop (no thread hop), at most _INLINE_BUDGET seconds per
# loop iteration; one call over _INLINE_LIMIT sends it back to the threads for good.
_INLINE_AFTER = 16
_INLINE_BELOW = 20e-6
_INLINE_LIMIT = 1e-3
_INLINE_BUDGET = 2e-3
_PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})

# A queued task: key, attempt, fid, function, args, kwargs.
_Item = tuple[int, int, str, Callable[..., Any], list[Any], dict[str, Any]]
# A finished task: key, attempt, fid, status, value, seconds.
_Result = tuple[int, int, str, int, Any, float]

_current: Worker | None = None


def current_worker() -> Worker | None:
    """The worker running in this process, if this process is a worker."""
    return _current


class Worker:
    """A worker process's engine: connect to ``broker`` and run tasks until told to stop."""

    def __init__(
        self,
        broker: str | tuple[str, int],
        *,
        slots: int = 1,
        secret: str | bytes | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        ssl: Any = None,
        name: str | None = None,
        max_async: int = 10_000,
        prefetch: float = _PREFETCH_SECONDS,
        **connect_options: Any,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.address = parse_address(broker) if isinstance(broker, str) else broker
        self.slots = slots
        #: The shared secret (resolved), also used by nested futures inside tasks.
        self.secret = resolve_secret(secret, secret_file=secret_file)
        #: The TLS context for the broker, also used by nested futures.
        self.ssl = ssl
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.max_async = max_async
        self.prefetch = prefetch
        self._connect_options = connect_options
        self.conn: Connection | None = None
        self._payloads = PayloadCodec(authenticated=False)
        self._functions = FunctionCache(self._payloads)
        self._is_async: dict[str, bool] = {}
        self._queue: deque[_Item] = deque()
        self._async: dict[int, asyncio.Task[None]] = {}
        self._cancelled: set[int] = set()
        self._requested = 0
        # Each task thread gets its next batch while it runs the current one, so it never
        # waits for the loop between tasks: two batches in hand per thread.
        self._free_threads = 2 * slots
        self._inbox: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self._outq: deque[list[_Result]] = deque()
        self._wake_pending = False
        self._pump_pending = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        # fid -> [completed count, mean seconds (EWMA)]; async functions report 0
        self._stats: dict[str, list[Any]] = {}
        self._estimates_changed: set[str] = set()
        self._demoted: set[str] = set()
        self._outbox: list[list[Any]] = []
        self._flush_pending = False
        self._ewma: float | None = None
        self._stopping = False
        self._consts: dict[str, bytes] = {}
        self._const_values: dict[str, Any] = {}
        self._stopped: asyncio.Future[None] | None = None
        # Task threads: the current task's key per thread, how many threads run, and how many
        # slots tasks waiting for other tasks have lent (see slot_released).
        self._task_thread = threading.local()
        self._threads_lock = threading.Lock()
        self._threads = 0
        self._released = 0
        self._logs: LogForwarder | None = None
        self._forward_told = False
        # key -> log level, for the tasks whose clients ask for their logs
        self._log_levels: dict[int, int] = {}
        #: The thread running this worker's event loop (None until :meth:`run`).
        self.loop_thread: threading.Thread | None = None
        #: Tasks finished by this worker.
        self.completed = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, run tasks until the broker connection ends or :meth:`stop` is called."""
        global _current
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._loop = loop
        self.loop_thread = threading.current_thread()
        self._init_task_thread()  # tiny tasks run inline, on this thread
        for _ in range(self.slots):
            self._start_runner()
        try:
            host, port = self.address
            self.conn = await connect(
                host,
                port,
                secret=self.secret,
                ssl=self.ssl,
                handlers={
                    "run": self._on_run,
                    "cancel": self._on_cancel,
                    "consts": self._on_consts,
                    "forward_logs": self._on_forward_logs_told,
                },
                accept_pickle="load",
                **self._connect_options,
            )
            self._payloads = PayloadCodec(authenticated=self.conn.authenticated)
            self._functions = FunctionCache(self._payloads)
            info = {"slots": self.slots, "pid": os.getpid(), "host": socket.gethostname(), "name": self.name}
            self._logs = LogForwarder(
                loop, self._send_logs, lambda: getattr(self._task_thread, "key", None), self._log_levels.get
            )
            reply = await self.conn.call("worker_hello", info)
            self._consts.update(reply.get("consts", {}))
            if not self._forward_told:  # a later forward_logs may have come in the same read
                self._on_forward_logs(reply.get("forward_logs", 0))
            _current = self
            self._request_more()
            closed = asyncio.ensure_future(self.conn.wait_closed())
            try:
                await asyncio.wait([closed, self._stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
        finally:
            if _current is self:
                _current = None
            await self._shutdown()

    def stop(self, *, graceful: bool = True) -> None:
        """Stop: gracefully, the broker requeues our tasks without counting a failure."""
        if self._stopping:
            return
        self._stopping = True
        conn = self.conn
        if graceful and conn is not None and not conn.closed:
            with contextlib.suppress(ConnectionClosed):
                conn.notify_nowait("leaving")
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._logs is not None:
            self._logs.stop()
        for task in list(self._async.values()):
            task.cancel()
        if self._async:
            await asyncio.gather(*self._async.values(), return_exceptions=True)
        if self.conn is not None:
            await self.conn.close("worker stopping")
        # Running plain tasks cannot be interrupted: the runners stop after their batch.
        with self._threads_lock:
            threads = self._threads
        for _ in range(threads):
            self._inbox.put(None)

    @property
    def busy_threads(self) -> int:
        """Batches of plain tasks handed to the task threads (at most two per thread)."""
        return 2 * (self.slots + self._released) - self._free_threads

    # -- task threads and their slots --------------------------------------------------

    def _start_runner(self) -> None:
        with self._threads_lock:
            self._threads += 1
            n = self._threads
        # Daemon threads: a task that never returns must not keep the process alive.
        threading.Thread(target=self._runner, name=f"asyncdist-task-{n}", daemon=True).start()

    @contextlib.contextmanager
    def slot_released(self) -> Iterator[None]:
        """Around a blocking wait in a task thread: the slot serves other tasks meanwhile.

        A plain task that waits for other tasks (``sync.map`` inside a task)
        would hold its slot while they need one: on entry another task
        thread starts, the broker stops counting the waiting task's cost
        against this worker, and more tasks are asked for; on exit a task
        thread ends once it is idle, so the worker is back to ``slots``
        threads. Anywhere but in this worker's task threads it does nothing.
        """
        key = getattr(self._task_thread, "key", None)
        if key is None or self._stopping:
            yield
            return
        self._loop.call_soon_threadsafe(self._give_slot, key)
        start = time.perf_counter()
        try:
            yield
        finally:
            # The wait is not the function's own work: keep it out of its measured duration.
            self._task_thread.waited += time.perf_counter() - start
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone
                self._loop.call_soon_threadsafe(self._take_slot)

    def _give_slot(self, key: int) -> None:
        self._released += 1
        self._free_threads += 2
        self._start_runner()
        conn = self.conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(ConnectionClosed):
                conn.notify_nowait("waiting", [key])
                conn.flush()
        if not self._stopping:
            self._pump()
            self._request_more()

    def _take_slot(self) -> None:
        self._released -= 1
        self._free_threads -= 2
        self._inbox.put(None)  # one task thread too many now: the next one idle ends

    # -- shared constants --------------------------------------------------------------

    def get_const(self, name: str) -> Any:
        """The value of a shared constant (KeyError if it was never set)."""
        if name not in self._const_values:
            self._const_values[name] = self._payloads.decode(self._consts[name])
        return self._const_values[name]

    def _on_consts(self, consts: dict[str, bytes]) -> None:
        self._consts.update(consts)

    # -- forwarded logs and prints (see _logs) -----------------------------------------

    def _on_forward_logs_told(self, level: Any) -> None:
        self._forward_told = True
        self._on_forward_logs(level)

    def _on_forward_logs(self, level: Any) -> None:
        """The broker says which records clients want (0: none, stop forwarding)."""
        logs = self._logs
        if logs is None or type(level) is not int:
            return
        if level > 0 and not self._stopping:
            logs.start(level)
        else:
            logs.stop()

    def _send_logs(self, entries: list[list[Any]]) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(ConnectionClosed):
                conn.notify_nowait("log", entries)

    # -- receiving tasks ---------------------------------------------------------------

    def _on_run(self, batch: list[list[Any]], functions: dict[str, bytes]) -> None:
        for fid, blob in functions.items():
            self._functions.add(fid, blob)
        self._requested = max(0, self._requested - len(batch))
        loop = asyncio.get_running_loop()
        started: list[int] = []
        for item in batch:
            key, attempt, fid, blob = item[0], item[1], item[2], item[3]
            if len(item) > 4 and type(item[4]) is int:  # its client asks for its logs
                self._log_levels[key] = item[4]
            try:
                fn = self._functions.get(fid)
                call = self._payloads.decode(blob)
                args, kwargs = (call[0], call[1]) if len(call) == 2 else (call[0], {})
            except Exception as exc:
                self._result(key, attempt, STATUS_ERROR, exc)
                continue
            is_async = self._is_async.get(fid)
            if is_async is None:
                is_async = self._is_async[fid] = _is_async_callable(fn)
            if is_async:
                task = loop.create_task(self._run_async(key, attempt, fn, args, kwargs))
                self._async[key] = task
                started.append(key)
                if fid not in self._stats:
                    self._stats[fid] = [0, 0.0]  # async tasks hold no slot: no cost for the broker
                    self._estimates_changed.add(fid)
            else:
                self._queue.append((key, attempt, fid, fn, args, kwargs))
        self._announce(started)
        self._pump()
        self._request_more()

    def _on_cancel(self, keys: list[int]) -> None:
        for key in keys:
            if self._log_levels:
                self._log_levels.pop(key, None)
            task = self._async.get(key)
            if task is not None:
                self._cancelled.add(key)
                task.cancel()
                continue
            for i, queued in enumerate(self._queue):
                if queued[0] == key:
                    del self._queue[i]
                    break
            else:
                self._cancelled.add(key)  # running in a thread: drop its result
        self._request_more()

    # -- running -----------------------------------------------------------------------

    async def _run_async(
        self, key: int, attempt: int, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        async_task_key.set(key)  # this task's own context: its logs name the task
        try:
            value = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            if key not in self._cancelled and not self._stopping:
                self._result(key, attempt, STATUS_ERROR, asyncio.CancelledError("task cancelled"))
        except Exception as exc:
            self._result(key, attempt, STATUS_ERROR, exc)
        else:
            self._result(key, attempt, STATUS_OK, value)
        finally:
            self._async.pop(key, None)
            self._cancelled.discard(key)
            self._request_more()

    def _inline_ok(self, fid: str) -> bool:
        stats = self._stats.get(fid)
        return (
            stats is not None
            and stats[0] >= _INLINE_AFTER
            and stats[1] < _INLINE_BELOW
            and fid not in self._demoted
        )

    def _pump(self) -> None:
        """Start queued plain tasks: inline if measured tiny, else in batches on the runners."""
        self._pump_pending = False
        queue = self._queue
        deadline = time.perf_counter() + _INLINE_BUDGET
        while queue:
            fid = queue[0][2]
            if self._inline_ok(fid):
                if time.perf_counter() > deadline:
                    # Keep the loop responsive: go on in the next iteration.
                    if not self._pump_pending:
                        self._pump_pending = True
                        asyncio.get_running_loop().call_soon(self._pump)
                    return
                batch = self._take(fid, 256)
                self._announce([item[0] for item in batch])
                self._handle(self._run_batch(batch, inline=True))
                continue
            if self._free_threads <= 0:
                return
            est = self._stats.get(fid)
            n = 1 if est is None else max(1, int(_BATCH_SECONDS / max(est[1], 1e-7)))
            batch = self._take(fid, n)
            # Tell the broker before a thread takes them: if one of them kills this process,
            # the tasks only queued here are not blamed for it.
            self._announce([item[0] for item in batch])
            self._free_threads -= 1
            self._inbox.put(batch)

    def _take(self, fid: str, limit: int) -> list[_Item]:
        """Pop up to ``limit`` queued tasks of function ``fid`` from the head of the queue."""
        queue = self._queue
        batch: list[_Item] = []
        while queue and len(batch) < limit and queue[0][2] == fid:
            batch.append(queue.popleft())
        return batch

    def _init_task_thread(self) -> None:
        self._task_thread.key = None
        self._task_thread.waited = 0.0

    def _runner(self) -> None:
        """A task thread: run batches from the inbox, hand results back to the loop."""
        self._init_task_thread()
        while True:
            batch = self._inbox.get()
            if batch is None:
                with self._threads_lock:
                    self._threads -= 1
                return
            results = self._run_batch(batch)
            self._outq.append(results)
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    self._loop.call_soon_threadsafe(self._collect)
                except RuntimeError:  # the loop is closed: the worker is gone
                    return

    def _run_batch(self, batch: list[_Item], inline: bool = False) -> list[_Result]:
        out: list[_Result] = []
        tls = self._task_thread  # this thread's: the running task's key, time lent while waiting
        cancelled = self._cancelled
        # Forwarding on: a task's unfinished line goes out when it ends (checked once per batch).
        end_lines = self._logs.end_task if self._logs is not None and self._logs.active else None
        for key, attempt, fid, fn, args, kwargs in batch:
            if key in cancelled:
                continue
            start = time.perf_counter()
            tls.key = key
            try:
                value = fn(*args, **kwargs)
                status = STATUS_OK
            except Exception as exc:
                value, status = exc, STATUS_ERROR
            finally:
                if end_lines is not None:
                    end_lines()
                tls.key = None
            elapsed = time.perf_counter() - start
            if waited := tls.waited:
                tls.waited = 0.0
                elapsed = max(0.0, elapsed - waited)
            out.append((key, attempt, fid, status, value, elapsed))
            if inline and elapsed > _INLINE_LIMIT:
                # Too slow to run on the loop after all: threads from now on.
                self._demoted.add(fid)
        return out

    def _collect(self) -> None:
        self._wake_pending = False
        outq = self._outq
        while outq:
            results = outq.popleft()
            self._free_threads += 1
            self._handle(results)
        if not self._stopping:
            self._pump()
            self._request_more()

    def _handle(self, results: list[_Result]) -> None:
        stats = self._stats
        total = 0.0
        for key, attempt, fid, status, value, elapsed in results:
            total += elapsed
            entry = stats.get(fid)
            if entry is None:
                stats[fid] = [1, elapsed]
            else:
                entry[0] += 1
                entry[1] = 0.8 * entry[1] + 0.2 * elapsed
            self._estimates_changed.add(fid)
            if key in self._cancelled:
                self._cancelled.discard(key)
                continue
            if status == STATUS_OK and type(value) not in _PLAIN_TYPES and inspect.isawaitable(value):
                # A plain function that returned an awaitable: finish it on the loop.
                loop = asyncio.get_running_loop()
                self._async[key] = loop.create_task(self._await_value(key, attempt, value))
                continue
            self._result(key, attempt, status, value)
        if results:
            mean = total / len(results)
            self._ewma = mean if self._ewma is None else 0.7 * self._ewma + 0.3 * mean

    async def _await_value(self, key: int, attempt: int, aw: Any) -> None:
        async def inner() -> Any:
            return await aw

        await self._run_async(key, attempt, inner, [], {})

    # -- results and credit ------------------------------------------------------------

    def _announce(self, keys: list[int]) -> None:
        conn = self.conn
        if keys and conn is not None and not conn.closed:
            with contextlib.suppress(ConnectionClosed):
                conn.notify_nowait("started", keys, self._take_estimates())
                conn.flush()

    def _take_estimates(self) -> dict[str, float]:
        """Mean durations that changed since last sent (0 for async functions: no slot held)."""
        estimates = {fid: float(self._stats[fid][1]) for fid in self._estimates_changed}
        self._estimates_changed.clear()
        return estimates

    def _result(self, key: int, attempt: int, status: int, value: Any) -> None:
        if self._log_levels:
            self._log_levels.pop(key, None)
        try:
            blob = self._payloads.encode(value)
        except SerializationError as exc:
            status, blob = STATUS_ERROR, self._payloads.encode(exc)
        self.completed += 1
        self._outbox.append([key, attempt, status, blob])
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        conn = self.conn
        if conn is None or conn.closed:
            return
        if self._logs is not None and self._logs.active:
            self._logs.flush()  # a task's output reaches the broker before its result
        with contextlib.suppress(ConnectionClosed):
            conn.notify_nowait("done", batch, self._take_estimates())
            conn.flush()

    def _target(self) -> int:
        ewma = self._ewma
        if ewma is None:
            per_slot = 2
        else:
            per_slot = max(1, min(_MAX_PER_SLOT, math.ceil(self.prefetch / max(ewma, 1e-7))))
        return (self.slots + self._released) * per_slot

    def _request_more(self) -> None:
        conn = self.conn
        if self._stopping or conn is None or conn.closed or len(self._async) >= self.max_async:
            return
        target = self._target()
        deficit = target - len(self._queue) - self._requested
        if deficit >= max(1, target // 4):
            self._requested += deficit
            with contextlib.suppress(ConnectionClosed):
                conn.notify_nowait("want", deficit)


def _is_async_callable(fn: Any) -> bool:
    while True:
        if inspect.iscoroutinefunction(fn):
            return True
        inner = getattr(fn, "func", None)  # functools.partial
        if inner is None or inner is fn:
            break
        fn = inner
    # An instance whose __call__ is a coroutine function.
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def import_main(path: str) -> None:
    """Import the launcher's script under another name, so its functions resolve by reference."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(MAIN_ALIAS, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MAIN_ALIAS] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)


async def run_worker(
    broker: str,
    *,
    slots: int = 1,
    secret: str | bytes | None = None,
    secret_file: str | None = None,
    ssl: Any = None,
    watch_stdin: bool = False,
    name: str | None = None,
    **connect_options: Any,
) -> int:
    """Run a worker until its broker goes away, SIGTERM/SIGINT, or stdin EOF; return an exit code.

    ``connect_options`` are :class:`~asyncdist.connection.Options` fields
    (e.g. ``heartbeat_timeout``) for the connection to the broker.
    """
    worker = Worker(
        broker, slots=slots, secret=secret, secret_file=secret_file, ssl=ssl, name=name, **connect_options
    )
    # This process is a worker: every record names it (the tasks' own records too).
    set_worker(worker.name)
    tag_all_records()
    loop = asyncio.get_running_loop()
    # Event-loop signal handlers exist on Unix only (and in the main thread).
    signals = (signal.SIGTERM, signal.SIGINT) if os.name == "posix" and _main_thread() else ()
    for sig in signals:
        loop.add_signal_handler(sig, worker.stop)
    watcher = asyncio.ensure_future(_watch_stdin(worker)) if watch_stdin else None
    try:
        await worker.run()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


async def _watch_stdin(worker: Worker) -> None:
    """Stop the worker when stdin closes: its launcher is gone or asked it to stop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    )
    try:
        while await reader.read(4096):
            pass
        worker.stop()
    finally:
        transport.close()
