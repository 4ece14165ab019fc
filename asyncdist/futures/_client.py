"""Pool, the futures API and the default pool.

A :class:`Pool` is either a local cluster (a broker in this process and
``workers`` worker processes) or a client of an existing broker
(``Pool(broker="host:port", secret=...)``). Inside ``async with pool:`` the
pool is the *current pool* (a context variable), which the module-level
functions use. Outside one they use the default pool: the worker's own
cluster inside a task, else the launcher's (``python -m asyncdist``), else
the broker named by ``ASYNCDIST_BROKER``, else a local pool started on first
use, owned by the running event loop and closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import sys
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from .._log import get_logger
from .._progress import Progress, progress_bar
from ..connection import Connection, connect, parse_address
from ..errors import BrokerLost, ConnectError, ConnectionClosed, ConnectionClosedOK, RemoteError
from ..security import generate_secret, resolve_secret
from ..server import Server, serve
from ._broker import STATUS_OK, Broker
from ._logs import reemit
from ._payload import FunctionTable, PayloadCodec
from ._worker import current_worker

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Pool",
    "TaskFuture",
    "as_completed",
    "close_default_pool",
    "current_pool",
    "default_pool",
    "existing_pool",
    "map",
    "map_as_completed",
    "map_reduce",
    "map_scan",
    "submit",
    "wait",
]

log = get_logger("asyncdist.futures")

FIRST_COMPLETED = asyncio.FIRST_COMPLETED
FIRST_EXCEPTION = asyncio.FIRST_EXCEPTION
ALL_COMPLETED = asyncio.ALL_COMPLETED

_T = TypeVar("_T")
_SUBMIT_CHUNK = 2000

_current: contextvars.ContextVar[Pool | None] = contextvars.ContextVar("asyncdist_pool", default=None)

# Set by the launcher (python -m asyncdist script.py): (address, secret, script path).
_launcher: tuple[str, bytes, str] | None = None


# -- futures and jobs -----------------------------------------------------------------------


class TaskFuture(asyncio.Future[_T]):
    """The future of one submitted task: awaitable, with ``done()``, ``result()``,
    ``exception()``, ``add_done_callback()``; :meth:`cancel` also cancels the
    remote task (queued: dropped; running async: CancelledError; running in a
    thread: its result is dropped)."""

    def __init__(self, pool: Pool, tid: int) -> None:
        super().__init__(loop=pool._loop)
        self._pool = pool
        self._tid = tid

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        self._pool._cancel([self._tid])
        return super().cancel(msg)

    # Called by the pool when the result arrives.
    def _accept(self, tid: int, ok: bool, value: Any) -> None:
        if self.done():
            return
        if ok:
            self.set_result(value)
        else:
            self.set_exception(value)


class _Job:
    """The tasks of one map call; results kept by position."""

    def __init__(self, pool: Pool, base: int, n: int, progress: Any = None, *, stream: bool = False) -> None:
        self.pool = pool
        self.stream = stream  # keep arrivals for arrivals(); map() only needs the results list
        self.base = base
        self.n = n
        self.results: list[Any] = [None] * n
        self.remaining = n
        self.error: BaseException | None = None
        self.finished = pool._loop.create_future()
        self.arrived: deque[tuple[int, Any]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.progress = progress
        if n == 0:
            self.finished.set_result(None)

    def _accept(self, tid: int, ok: bool, value: Any) -> None:
        if self.finished.done():
            return
        index = tid - self.base
        if self.progress is not None:
            self.progress.update(1)
        if not ok:
            self.error = value
            self.finished.set_result(None)
            self.pool._cancel(self.pending_tids())
            self._wake()
            return
        self.results[index] = value
        if self.stream:
            self.arrived.append((index, value))
        self.remaining -= 1
        if self.remaining == 0:
            self.finished.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def pending_tids(self) -> list[int]:
        waiting = self.pool._waiting
        return [tid for tid in range(self.base, self.base + self.n) if waiting.get(tid) is self]

    def close(self) -> None:
        """Cancel every task of the job that has not finished; close its progress bar."""
        tids = self.pending_tids()
        if tids:
            self.pool._cancel(tids)
        if self.progress is not None:
            self.progress.close()

    async def arrivals(self, deadline: float | None) -> AsyncGenerator[tuple[int, Any], None]:
        """Yield ``(index, value)`` as results arrive; raise the first task error.

        Past ``deadline`` (loop time), the next wait raises TimeoutError.
        """
        while True:
            while self.arrived:
                yield self.arrived.popleft()
            if self.error is not None:
                raise self.error
            if self.remaining == 0:
                return
            self.waiter = self.pool._loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self.waiter
            finally:
                self.waiter = None


# -- links to the broker ----------------------------------------------------------------


class _LocalLink:
    """A pool's link to a broker in the same process: plain calls, no sockets."""

    authenticated = True

    def __init__(
        self,
        broker: Broker,
        deliver: Callable[[list[list[Any]]], None],
        logs: Callable[[str, str, list[list[Any]]], None],
        log_level: int,
    ) -> None:
        self.broker = broker
        self.client = broker.attach_client(deliver, logs, log_level)
        self.fids: set[str] = set()

    @property
    def alive(self) -> bool:
        return not self.client.closed

    def submit(self, tasks: list[list[Any]], functions: dict[str, bytes]) -> None:
        self.broker.submit(self.client, tasks, functions)

    def cancel(self, tids: list[int]) -> None:
        self.broker.cancel(self.client, tids)

    async def set_const(self, name: str, blob: bytes) -> None:
        self.broker.set_const(name, blob)

    async def get_consts(self) -> dict[str, bytes]:
        return self.broker.consts()

    async def status(self) -> dict[str, Any]:
        return self.broker.status()

    async def close(self) -> None:
        self.broker.detach_client(self.client)


class _RemoteLink:
    """A pool's link to a broker over a Connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.authenticated = conn.authenticated
        self.fids: set[str] = set()

    @property
    def alive(self) -> bool:
        return not self.conn.closed

    def submit(self, tasks: list[list[Any]], functions: dict[str, bytes]) -> None:
        self.conn.notify_nowait("submit", tasks, functions)

    def cancel(self, tids: list[int]) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.conn.notify_nowait("cancel", tids)

    async def set_const(self, name: str, blob: bytes) -> None:
        await self.conn.call("set_const", name, blob)

    async def get_consts(self) -> dict[str, bytes]:
        consts: dict[str, bytes] = await self.conn.call("get_consts")
        return consts

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.conn.call("status")
        return status

    async def close(self) -> None:
        await self.conn.close()


# -- local worker processes ---------------------------------------------------------------


class _LocalWorkers:
    """Worker processes started by a pool; each exits when its stdin closes."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def spawn(
        self,
        n: int,
        address: str,
        secret: bytes,
        *,
        slots: int,
        main: str | None,
        nice: int,
        options: dict[str, Any],
    ) -> None:
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]  # noqa: ASYNC240 - fast, local
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("ASYNCDIST_SECRET", None)  # the secret comes on stdin
        cmd = [
            sys.executable,
            "-m",
            "asyncdist",
            "worker",
            "--broker",
            address,
            "--slots",
            str(slots),
            "--secret-stdin",
            "--watch-stdin",
        ]
        if main is not None:
            cmd += ["--main", main]
        for key, value in options.items():
            cmd += ["--option", f"{key}={value}"]
        preexec = (lambda: os.nice(nice)) if nice else None
        for _ in range(n):
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, env=env, preexec_fn=preexec
            )
            self.procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(secret + b"\n")
            await proc.stdin.drain()

    def exited(self) -> list[asyncio.subprocess.Process]:
        """Processes that have already exited."""
        return [p for p in self.procs if p.returncode is not None]

    async def stop(self, timeout: float) -> None:
        """Close every stdin (graceful), then SIGTERM, then SIGKILL; reap them all."""
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        waits = [asyncio.ensure_future(p.wait()) for p in self.procs]
        try:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    for proc in self.procs:
                        if proc.returncode is None:
                            with contextlib.suppress(ProcessLookupError):
                                proc.send_signal(sig)
                pending = [w for w in waits if not w.done()]
                if not pending:
                    break
                await asyncio.wait(pending, timeout=timeout if sig != signal.SIGKILL else None)
        finally:
            for w in waits:
                if not w.done():
                    w.cancel()
            for proc in self.procs:
                if proc.stdin is not None:
                    proc.stdin.close()
            # Let the pipe transports finish closing.
            await asyncio.sleep(0)


# -- the pool -------------------------------------------------------------------------------


class Pool:
    """A cluster to run tasks on: local processes, or an existing broker.

    ``Pool(workers=N)`` starts a broker in this process and N worker
    processes (default: the CPU count) on 127.0.0.1; ``__aenter__`` returns
    once all have joined, and exit reaps them all, also on errors and
    Ctrl-C. ``Pool(broker="host:port", secret=...)`` joins an existing
    cluster instead. Options: ``slots`` (threads per local worker for plain
    functions), ``allowed_failures`` (worker deaths a task survives),
    ``no_workers_timeout``, ``join_timeout`` (seconds to wait for local
    workers), ``nice`` (priority increment of local workers: 10 by default, so
    that the process embedding the pool, a web service say, stays responsive
    while they compute; 0 keeps them at this process's priority), ``ssl``. Other
    keyword arguments are connection :class:`~asyncdist.connection.Options`
    (e.g. ``heartbeat_interval``, ``heartbeat_timeout``): for a local pool
    they apply to its broker and to every local worker's connection, for a
    joined pool to its connection to the broker.

    ``forward_logs=True`` (or a logging level; True is INFO) brings the log
    records and prints of this pool's tasks here, SCOOP's logger: records
    are re-emitted through this process's ``logging`` with ``worker`` and
    ``host`` attributes, prints are written to its stdout and stderr.
    ``dashboard=True`` (or a port; True is 8787, or a free port when 8787
    is taken) serves a live web page of the cluster on 127.0.0.1:
    ``pool.dashboard.url``.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        broker: str | None = None,
        secret: str | bytes | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        ssl: Any = None,
        slots: int = 1,
        allowed_failures: int = 3,
        no_workers_timeout: float | None = None,
        join_timeout: float = 60.0,
        close_timeout: float = 5.0,
        nice: int = 10,
        main: str | None = None,
        forward_logs: bool | int = False,
        dashboard: bool | int = False,
        **connect_options: Any,
    ) -> None:
        if broker is not None and workers is not None:
            raise ValueError("give workers= for a local pool or broker= to join one, not both")
        self.workers = workers if workers is not None else (None if broker else _cpu_count())
        if self.workers is not None and self.workers < 0:
            raise ValueError("workers must be >= 0")
        self.broker_address = broker
        self._secret = secret
        self._secret_file = secret_file
        self._ssl = ssl
        self.slots = slots
        self.allowed_failures = allowed_failures
        self.no_workers_timeout = no_workers_timeout
        self.join_timeout = join_timeout
        self.close_timeout = close_timeout
        self.nice = nice
        self._main = main
        if type(forward_logs) is not bool and (type(forward_logs) is not int or forward_logs < 0):
            raise ValueError("forward_logs must be True, False or a logging level")
        #: The level of the worker records sent here (0: none; True asks for INFO).
        self.forward_logs = logging.INFO if forward_logs is True else int(forward_logs)
        self._dashboard_port: int | None = None
        if dashboard is not False:
            if type(dashboard) is not bool and (type(dashboard) is not int or not 0 <= dashboard < 65536):
                raise ValueError("dashboard must be True, False or a port")
            self._dashboard_port = 8787 if dashboard is True else int(dashboard)
        #: The live dashboard (``dashboard=True``), once started: ``pool.dashboard.url``.
        self.dashboard: Any = None
        self._connect_options = connect_options
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._link: _LocalLink | _RemoteLink | None = None
        self._broker: Broker | None = None
        self._server: Server | None = None
        self._procs = _LocalWorkers()
        self._payloads = PayloadCodec(authenticated=False)
        self._functions = FunctionTable(self._payloads)
        self._waiting: dict[int, Any] = {}
        self._next_tid = 1
        self._consts: dict[str, Any] = {}
        self._started = False
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        #: The cluster's shared secret (a local pool makes one), for workers started by hand.
        self.secret: bytes | None = None
        self._tokens: list[contextvars.Token[Pool | None]] = []
        self._reconnect_lock: asyncio.Lock | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def address(self) -> str | None:
        """``host:port`` of the broker (local or joined)."""
        if self._server is not None:
            return f"127.0.0.1:{self._server.port}"
        return self.broker_address

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> Pool:
        """Start the local cluster, or connect to the broker. Idempotent."""
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        self._started = True
        try:
            if self.broker_address is None:
                await self._start_local()
            else:
                await self._connect()
            assert self._link is not None
            self._consts = {
                name: self._payloads.decode(blob) for name, blob in (await self._link.get_consts()).items()
            }
            if self._dashboard_port is not None:
                await self._start_dashboard(self._dashboard_port)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start_local(self) -> None:
        secret = resolve_secret(self._secret, secret_file=self._secret_file) or generate_secret().encode()
        self.secret = secret
        self._broker = Broker(
            allowed_failures=self.allowed_failures, no_workers_timeout=self.no_workers_timeout
        )
        self._server = await serve(
            self._broker.handlers, host="127.0.0.1", port=0, secret=secret, **self._connect_options
        )
        self._link = _LocalLink(self._broker, self._on_results, reemit, self.forward_logs)
        self._payloads = PayloadCodec(authenticated=True)
        self._functions = FunctionTable(self._payloads, main_importable=self._main is not None)
        n = self.workers or 0
        if n:
            await self._procs.spawn(
                n,
                self.address or "",
                secret,
                slots=self.slots,
                main=self._main,
                nice=self.nice,
                options=self._connect_options,
            )
            await self._wait_joined(n)

    async def _wait_joined(self, n: int) -> None:
        assert self._broker is not None
        joined = asyncio.ensure_future(self._broker.wait_for_workers(n))
        try:
            async with asyncio.timeout(self.join_timeout):
                while not joined.done():
                    await asyncio.wait([joined], timeout=0.05)
                    dead = self._procs.exited()
                    if dead:
                        codes = ", ".join(str(p.returncode) for p in dead)
                        raise ConnectError(
                            f"{len(dead)} local worker(s) exited before joining (codes {codes})"
                        )
        except TimeoutError:
            raise ConnectError(
                f"only {self._broker.worker_count} of {n} workers joined within {self.join_timeout:g} s"
            ) from None
        finally:
            joined.cancel()

    async def _connect(self) -> None:
        assert self.broker_address is not None
        host, port = parse_address(self.broker_address)
        conn = await connect(
            host,
            port,
            secret=self._secret,
            secret_file=self._secret_file,
            ssl=self._ssl,
            handlers={"results": self._on_results, "logs": reemit},
            accept_pickle="refuse",
            **self._connect_options,
        )
        try:
            if self.forward_logs:
                await conn.call("client_hello", {"logs": self.forward_logs})
            else:
                await conn.call("client_hello")
        except BaseException:
            await conn.close()
            raise
        link = _RemoteLink(conn)
        self._link = link
        self._payloads = PayloadCodec(authenticated=conn.authenticated)
        self._functions = FunctionTable(self._payloads, main_importable=self._main is not None)
        conn.add_close_callback(lambda c: self._link_lost(link))

    def _link_lost(self, link: _RemoteLink) -> None:
        if self._link is not link:
            return
        waiting, self._waiting = self._waiting, {}
        if waiting and not self._closed:
            log.warning("lost the broker at %s; %d task(s) fail", self.broker_address, len(waiting))
        exc = link.conn.close_exception
        for sink in set(waiting.values()):
            error = BrokerLost(f"lost the broker at {self.broker_address}")
            error.__cause__ = exc
            sink._accept(-1 if isinstance(sink, TaskFuture) else sink.base, False, error)

    async def _ensure_link(self) -> _LocalLink | _RemoteLink:
        """The live link; a pool joined to a broker reconnects after losing it (F8)."""
        link = self._link
        if link is not None and link.alive:
            return link
        if self._closed or not self._started:
            raise ConnectionClosedOK("the pool is closed" if self._closed else "the pool is not started")
        if isinstance(link, _LocalLink) or self.broker_address is None:
            raise BrokerLost("the pool's broker is gone")
        if self._reconnect_lock is None:
            self._reconnect_lock = asyncio.Lock()
        async with self._reconnect_lock:
            if self._link is None or not self._link.alive:
                await self._connect()
        assert self._link is not None
        return self._link

    async def aclose(self) -> None:
        """Cancel what is pending, disconnect, and stop and reap local workers.

        Idempotent: a second call waits until the first has finished.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            await self._close()
        finally:
            self._closing.set_result(None)

    async def _start_dashboard(self, port: int) -> None:
        from ..dashboard import Dashboard  # aiohttp, only for pools that show one

        try:
            dashboard = Dashboard(self.status, port=port)
            await dashboard.start()
        except OSError as exc:
            if port == 8787:
                # The default port is taken (another pool's dashboard): any free port will do.
                log.warning("dashboard port %d is taken (%s); using a free port", port, exc)
                dashboard = Dashboard(self.status, port=0)
                await dashboard.start()
            else:
                raise
        self.dashboard = dashboard
        log.info("dashboard at %s", dashboard.url)

    async def _close(self) -> None:
        self._closed = True
        dashboard, self.dashboard = self.dashboard, None
        if dashboard is not None:
            await dashboard.aclose()
        waiting, self._waiting = self._waiting, {}
        for sink in set(waiting.values()):
            if isinstance(sink, TaskFuture):
                asyncio.Future.cancel(sink)
            else:
                sink._accept(sink.base, False, ConnectionClosedOK("the pool was closed"))
        try:
            if self._link is not None:
                await self._link.close()
        finally:
            try:
                await self._procs.stop(self.close_timeout)
            finally:
                if self._server is not None:
                    await self._server.aclose()
                if self._broker is not None:
                    self._broker.close()

    async def __aenter__(self) -> Pool:
        await self.start()
        self._tokens.append(_current.set(self))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._tokens:
            _current.reset(self._tokens.pop())
        await self.aclose()

    def __repr__(self) -> str:
        where = self.address or "not started"
        return f"<Pool {where} workers={self.workers} closed={self._closed}>"

    async def status(self) -> dict[str, Any]:
        """The broker's counters, queue depth and workers."""
        return await (await self._ensure_link()).status()

    # -- submitting --------------------------------------------------------------------

    def _submit_tasks(self, fn: Callable[..., Any], calls: list[list[Any]], sink: Any) -> int:
        """Encode and send ``calls`` (``[args]`` or ``[args, kwargs]``); return the first tid."""
        link = self._link
        if link is None or not link.alive:
            raise BrokerLost("the pool has no broker (closed, or lost: await a call to reconnect)")
        fid, fblob = self._functions.lookup(fn)
        functions = {} if fid in link.fids else {fid: fblob}
        encode = self._payloads.encode
        base = self._next_tid
        tasks: list[list[Any]] = [[base + i, fid, encode(call)] for i, call in enumerate(calls)]
        self._next_tid = base + len(calls)
        waiting = self._waiting
        for task in tasks:
            waiting[task[0]] = sink
        try:
            for start in range(0, len(tasks), _SUBMIT_CHUNK):
                link.submit(tasks[start : start + _SUBMIT_CHUNK], functions)
                functions = {}
        except BaseException:
            for task in tasks:
                waiting.pop(task[0], None)
            raise
        link.fids.add(fid)
        return base

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; return its :class:`TaskFuture` at once.

        A joined pool that lost its broker returns a task that reconnects
        first (F8); cancelling it cancels the submission.
        """
        self._check_open()
        link = self._link
        assert link is not None
        if not link.alive:
            if isinstance(link, _LocalLink):
                raise BrokerLost("the pool's broker is gone")

            async def reconnect_then_submit() -> Any:
                await self._ensure_link()
                return await self.submit(fn, *args, **kwargs)

            return asyncio.ensure_future(reconnect_then_submit())
        tid = self._next_tid
        self._next_tid = tid + 1
        fut: TaskFuture[Any] = TaskFuture(self, tid)
        fid, fblob = self._functions.lookup(fn)
        call = [list(args), kwargs] if kwargs else [list(args)]
        self._waiting[tid] = fut
        try:
            link.submit([[tid, fid, self._payloads.encode(call)]], {} if fid in link.fids else {fid: fblob})
        except BaseException:
            del self._waiting[tid]
            raise
        link.fids.add(fid)
        return fut

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosedOK("the pool is closed")
        if not self._started:
            raise RuntimeError("the pool is not started: use `async with Pool(...)` or `await pool.start()`")

    def _cancel(self, tids: list[int]) -> None:
        for tid in tids:
            self._waiting.pop(tid, None)
        link = self._link
        if tids and link is not None and link.alive:
            link.cancel(tids)

    def _on_results(self, batch: list[list[Any]]) -> None:
        waiting = self._waiting
        decode = self._payloads.decode
        for tid, status, blob in batch:
            sink = waiting.pop(tid, None)
            if sink is None:
                continue  # cancelled meanwhile
            try:
                value = decode(blob)
            except Exception as exc:
                sink._accept(tid, False, exc)
                continue
            if status == STATUS_OK:
                sink._accept(tid, True, value)
            else:
                if not isinstance(value, BaseException):
                    value = RemoteError("unknown", repr(value))
                sink._accept(tid, False, value)

    def _start_job(
        self,
        fn: Callable[..., Any],
        iterables: Sequence[Iterable[Any]],
        progress: Progress,
        stream: bool = True,
    ) -> _Job:
        self._check_open()
        calls = [[list(args)] for args in zip(*iterables, strict=False)] if iterables else []
        bar = progress_bar(len(calls), getattr(fn, "__name__", "tasks"), show=progress)
        job = _Job(self, self._next_tid, len(calls), bar, stream=stream)
        if calls:
            self._submit_tasks(fn, calls, job)
        return job

    # -- the API -----------------------------------------------------------------------

    async def map(
        self,
        fn: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> list[Any]:
        """``[fn(*args) for args in zip(*iterables)]``, computed on the workers, in order.

        The first task error is raised (with its remote traceback) and the
        other tasks are cancelled; so are they when ``timeout`` expires
        (TimeoutError) or the caller is cancelled.
        """
        await self._ensure_link()
        job = self._start_job(fn, iterables, progress, stream=False)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(job.finished)
        finally:
            job.close()
        if job.error is not None:
            raise job.error
        return job.results

    async def _arrivals(
        self,
        fn: Callable[..., Any],
        iterables: Sequence[Iterable[Any]],
        timeout: float | None,
        progress: Progress,
    ) -> AsyncGenerator[tuple[_Job, int, Any], None]:
        """Start a job and yield ``(job, index, value)`` as results arrive; clean up at the end."""
        await self._ensure_link()
        job = self._start_job(fn, iterables, progress)
        deadline = None if timeout is None else self._loop.time() + timeout
        try:
            async with contextlib.aclosing(job.arrivals(deadline)) as arrivals:
                async for index, value in arrivals:
                    yield job, index, value
        finally:
            job.close()

    async def map_as_completed(
        self,
        fn: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> AsyncIterator[Any]:
        """Yield ``fn(*args)`` results in the order they complete."""
        async with contextlib.aclosing(self._arrivals(fn, iterables, timeout, progress)) as arrivals:
            async for _, _, value in arrivals:
                yield value

    async def map_reduce(
        self,
        fn: Callable[..., Any],
        reduction: Callable[[Any, Any], Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> Any:
        """Map, then reduce the results with ``reduction`` (associative) as they arrive.

        Neighbouring results are merged as soon as both are known, a tree of
        reductions in input order, so ``reduction`` need not be commutative.
        """
        merger = _Merger(reduction)
        n = 0
        async with contextlib.aclosing(self._arrivals(fn, iterables, timeout, progress)) as arrivals:
            async for job, index, value in arrivals:
                n = job.n
                merger.add(index, value)
        if not n:
            raise TypeError("map_reduce() of an empty sequence has no value")
        return merger.result(n)

    async def map_scan(
        self,
        fn: Callable[..., Any],
        reduction: Callable[[Any, Any], Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> list[Any]:
        """Map, then the running reductions: ``[r0, red(r0, r1), red(red(r0, r1), r2), ...]``."""
        scanned: list[Any] = []
        arrived: set[int] = set()
        async with contextlib.aclosing(self._arrivals(fn, iterables, timeout, progress)) as arrivals:
            async for job, index, _ in arrivals:
                arrived.add(index)
                while len(scanned) in arrived:  # extend the prefix known so far
                    value = job.results[len(scanned)]
                    scanned.append(value if not scanned else reduction(scanned[-1], value))
        return scanned

    async def shared_set(self, name: str, value: Any) -> None:
        """Set one shared constant in this pool (see :mod:`asyncdist.shared`)."""
        link = await self._ensure_link()
        await link.set_const(name, self._payloads.encode(value))
        self._consts[name] = value


class _Merger:
    """In-order tree reduction of results that arrive in any order."""

    def __init__(self, reduction: Callable[[Any, Any], Any]) -> None:
        self.reduction = reduction
        self.by_start: dict[int, tuple[int, Any]] = {}
        self.by_end: dict[int, int] = {}

    def add(self, index: int, value: Any) -> None:
        start, end = index, index + 1
        left = self.by_end.pop(start, None)
        if left is not None:
            _, left_value = self.by_start.pop(left)
            value = self.reduction(left_value, value)
            start = left
        right = self.by_start.pop(end, None)
        if right is not None:
            right_end, right_value = right
            del self.by_end[right_end]
            value = self.reduction(value, right_value)
            end = right_end
        self.by_start[start] = (end, value)
        self.by_end[end] = start

    def result(self, n: int) -> Any:
        end, value = self.by_start[0]
        assert end == n
        return value


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -- the default pool -----------------------------------------------------------------------

_loop_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[Pool]] = (
    weakref.WeakKeyDictionary()
)
_keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def current_pool() -> Pool | None:
    """The pool of the innermost ``async with Pool(...)`` around this code, if any."""
    return _current.get()


def existing_pool() -> Pool | None:
    """The current pool, else this loop's default pool if it was started; never starts one."""
    pool = _current.get()
    if pool is not None:
        return pool
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    fut = _loop_pools.get(loop)
    if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    pool = fut.result()
    return None if pool.closed else pool


def _default_pool_factory() -> Pool:
    worker = current_worker()
    if worker is not None:
        host, port = worker.address
        return Pool(broker=f"{host}:{port}", secret=worker.secret, ssl=worker.ssl)
    if _launcher is not None:
        address, secret, script = _launcher
        return Pool(broker=address, secret=secret, main=script)
    from_env = os.environ.get("ASYNCDIST_BROKER")
    if from_env:
        return Pool(broker=from_env)
    return Pool()


async def default_pool() -> Pool:
    """The pool module-level functions use here (see the module docstring)."""
    pool = _current.get()
    if pool is not None:
        return pool
    loop = asyncio.get_running_loop()
    fut = _loop_pools.get(loop)
    if fut is not None:
        if not fut.done():
            return await asyncio.shield(fut)
        if not fut.cancelled() and fut.exception() is None and not fut.result().closed:
            return fut.result()
    fut = loop.create_future()
    _loop_pools[loop] = fut
    try:
        pool = await _default_pool_factory().start()
    except BaseException as exc:
        _loop_pools.pop(loop, None)
        if not fut.done():
            fut.set_exception(exc)
            fut.exception()
        raise
    fut.set_result(pool)
    _keepers[loop] = loop.create_task(_keep(pool), name="asyncdist-default-pool")
    return pool


async def _keep(pool: Pool) -> None:
    """Owns the default pool: closes it when cancelled (asyncio.run cancels it at the end)."""
    try:
        await asyncio.Event().wait()
    finally:
        await pool.aclose()


async def close_default_pool() -> None:
    """Close this event loop's default pool now (it is also closed when the loop ends)."""
    loop = asyncio.get_running_loop()
    fut = _loop_pools.pop(loop, None)
    keeper = _keepers.pop(loop, None)
    if keeper is not None:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    elif fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
        await fut.result().aclose()


async def map(
    fn: Callable[..., Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> list[Any]:
    """:meth:`Pool.map` on the current or default pool."""
    return await (await default_pool()).map(fn, *iterables, timeout=timeout, progress=progress)


async def map_as_completed(
    fn: Callable[..., Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> AsyncIterator[Any]:
    """:meth:`Pool.map_as_completed` on the current or default pool."""
    pool = await default_pool()
    async for value in pool.map_as_completed(fn, *iterables, timeout=timeout, progress=progress):
        yield value


async def map_reduce(
    fn: Callable[..., Any],
    reduction: Callable[[Any, Any], Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> Any:
    """:meth:`Pool.map_reduce` on the current or default pool."""
    pool = await default_pool()
    return await pool.map_reduce(fn, reduction, *iterables, timeout=timeout, progress=progress)


async def map_scan(
    fn: Callable[..., Any],
    reduction: Callable[[Any, Any], Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> list[Any]:
    """:meth:`Pool.map_scan` on the current or default pool."""
    pool = await default_pool()
    return await pool.map_scan(fn, reduction, *iterables, timeout=timeout, progress=progress)


def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
    """:meth:`Pool.submit` on the current or default pool; returns a future at once.

    If the default pool must be started first, the returned future is a task
    that starts it and then waits for the result (cancelling it cancels the
    remote task too).
    """
    pool = existing_pool()
    if pool is not None:
        return pool.submit(fn, *args, **kwargs)

    async def later() -> Any:
        return await (await default_pool()).submit(fn, *args, **kwargs)

    return asyncio.ensure_future(later())


async def as_completed(
    futures: Iterable[Awaitable[_T]], timeout: float | None = None
) -> AsyncIterator[asyncio.Future[_T]]:
    """Yield each future as it completes (``timeout`` bounds the whole wait: TimeoutError)."""
    loop = asyncio.get_running_loop()
    pending = {asyncio.ensure_future(f) for f in futures}
    done: deque[asyncio.Future[_T]] = deque()
    wakeup: asyncio.Future[None] | None = None

    def on_done(fut: asyncio.Future[_T]) -> None:
        pending.discard(fut)
        done.append(fut)
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    for fut in list(pending):
        fut.add_done_callback(on_done)
    try:
        async with asyncio.timeout(timeout):
            while pending or done:
                while done:
                    yield done.popleft()
                if pending:
                    wakeup = loop.create_future()
                    await wakeup
    finally:
        for fut in pending:
            fut.remove_done_callback(on_done)


async def wait(
    futures: Iterable[Awaitable[_T]], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> tuple[set[asyncio.Future[_T]], set[asyncio.Future[_T]]]:
    """Wait for futures like :func:`asyncio.wait`; return ``(done, pending)``."""
    fs = {asyncio.ensure_future(f) for f in futures}
    if not fs:
        return set(), set()
    return await asyncio.wait(fs, timeout=timeout, return_when=return_when)
