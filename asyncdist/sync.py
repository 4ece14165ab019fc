"""The blocking facade: every paradigm as plain function calls, for scripts, threads and notebooks.

::

    from asyncdist import sync

    ys = sync.map(f, xs)                          # the default pool (as asyncdist.map)
    with sync.Pool(workers=4) as pool:
        total = pool.map_reduce(f, operator.add, xs)
        fut = pool.submit(f, 1)                   # a concurrent.futures.Future
    shop = sync.Proxy("adistname:example.shop")   # PYRONAME: works too
    shop.deposit("Meeta", 50)
    conn = sync.rpc_connect("127.0.0.1", 18861); conn.root.echo(1)
    c = sync.classic_connect("127.0.0.1"); c.execute("print('hi')")
    job = sync.Job().run(input=[...], map=fmap, reduce=freduce)
    for k, v in sync.result_iterator(job.wait(show=True)): ...
    sync.Parallel(counter(A.writer(), limit=5), printer(A.reader()))   # plain-function processes
    guard, msg = sync.AltSelect(sync.InputGuard(cin), sync.TimeoutGuard(seconds=1))  # blocks too

Contract:

* One event loop runs in one daemon thread per process (started on first
  use, stopped by :func:`shutdown` or at interpreter exit, which closes the
  pools, proxies and connections made through it and reaps their worker
  processes). Every call runs its coroutine there and blocks the calling
  thread until it ends; any number of threads may call at once.
* It works where a loop is already running in the calling thread
  (Jupyter): the call blocks that thread while this module's own loop does
  the work. It refuses to run on its own loop thread, where it would wait
  for itself; the plain callbacks the peer of an RPC connection made here
  calls, and the plain methods of a Daemon made here, run in threads and
  may call it (``async def`` ones run on the loop: they use the async API).
* Inside a worker task (a plain function running on an asyncdist worker),
  a blocking call gives the task's slot back to the worker while it waits,
  so the tasks it waits for can run on that same worker: nested
  ``sync.map`` never deadlocks, even on a one-slot cluster. Calling it from
  an ``async def`` task is refused (``await asyncdist.map(...)`` there).
* Ctrl-C (or any exception) in the calling thread while it waits cancels
  the operation on the loop, end to end, like cancelling the awaiting task.
* Objects made here (pools, proxies, connections, channels) belong to this
  loop; use them through this module only.

The classic libraries' own spellings are aliases here, so their blocking
examples run with only their imports changed: ``mapReduce`` and
``shared.setConst``/``getConst`` (SCOOP); ``locateNS``, ``Daemon.requestLoop``,
``Daemon.serveSimple``, ``PYRONAME:`` and ``PYRO:`` URIs, ``core.Proxy``,
``core.Daemon`` and ``naming.locateNS`` (Pyro4, ``Pyro4.core``,
``Pyro4.naming``); ``classic.connect``, ``connect`` and
``conn.modules.sys.stdout = sys.stdout`` on a classic connection, which sends
the server's output for this connection here (RPyC); ``TraceInit``,
``AltSelect`` and the guards (PyCSP).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import pickle
import threading
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from . import csp as _csp
from . import futures as _futures
from . import naming as _naming
from . import objects as _objects
from . import rpc as _rpc
from ._progress import Progress
from .futures._worker import current_worker
from .loop import new_event_loop
from .mapreduce import Job as _Job
from .mapreduce import kvgroup
from .mapreduce import result_iterator as _result_iterator
from .objects import behavior, expose, oneway
from .rpc import Netref as _Netref
from .rpc import classic as _classic

__all__ = [
    "ALL_COMPLETED",
    "CALLBACK_THREADS",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AltSelect",
    "Channel",
    "ChannelPoisoned",
    "ChannelRetired",
    "ClassicConnection",
    "Daemon",
    "FairSelect",
    "Future",
    "InputGuard",
    "Job",
    "OutputGuard",
    "Parallel",
    "Pool",
    "PriSelect",
    "Proxy",
    "RPCConnection",
    "RemoteRef",
    "Sequence",
    "SkipGuard",
    "Spawn",
    "TimeoutGuard",
    "TraceInit",
    "TraceQuit",
    "as_completed",
    "behavior",
    "call",
    "classic",
    "classic_connect",
    "connect",
    "core",
    "expose",
    "kvgroup",
    "locateNS",
    "locate_ns",
    "map",
    "mapReduce",
    "naming",
    "map_as_completed",
    "map_reduce",
    "map_scan",
    "oneway",
    "poison",
    "process",
    "result_iterator",
    "retire",
    "rpc_connect",
    "run",
    "serve",
    "shared",
    "shutdown",
    "submit",
    "wait",
]

_T = TypeVar("_T")

ALL_COMPLETED = concurrent.futures.ALL_COMPLETED
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION

process = _csp.process
poison = _csp.poison
retire = _csp.retire
# Alternation: a plain process (or any thread) calls these and blocks, as with cin() and cout(x).
AltSelect = _csp.AltSelect
PriSelect = _csp.PriSelect
FairSelect = _csp.FairSelect
InputGuard = _csp.InputGuard
OutputGuard = _csp.OutputGuard
SkipGuard = _csp.SkipGuard
TimeoutGuard = _csp.TimeoutGuard
ChannelPoisoned = _csp.ChannelPoisoned
ChannelRetired = _csp.ChannelRetired
TraceInit = _csp.TraceInit
TraceQuit = _csp.TraceQuit


# -- the loop thread ---------------------------------------------------------------------------


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        #: id(owner) -> (owner, its "close it" coroutine function), for what was opened here
        #: and not closed yet (the owner is held, so that its id is not reused meanwhile).
        self.closers: dict[int, tuple[object, Callable[[], Awaitable[Any]]]] = {}
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="asyncdist-sync", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _finish(self) -> None:
        # First what was opened through this module (pools, daemons, connections), then,
        # like asyncio.run's end, cancel what is left (the default pool's keeper closes the
        # pool, the MapReduce cluster's guard stops its processes), then async generators.
        for _, close in list(self.closers.values()):
            with contextlib.suppress(Exception):
                await close()
        self.closers.clear()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()
        await self.loop.shutdown_default_executor()

    def stop(self, timeout: float) -> None:
        if not self.thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._finish(), self.loop)
        with contextlib.suppress(BaseException):
            fut.result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


_lock = threading.Lock()
_runner: _LoopThread | None = None


def _loop_thread() -> _LoopThread:
    global _runner
    runner = _runner
    if runner is not None:
        return runner
    with _lock:
        if _runner is None:
            _runner = _LoopThread()
        return _runner


def shutdown(timeout: float = 30.0) -> None:
    """Stop the loop thread: close what was opened through this module, reap its processes.

    Called at interpreter exit; call it earlier to free everything now. The
    next call of this module starts a new loop thread. ``timeout`` bounds
    each step.
    """
    global _runner
    with _lock:
        runner = _runner
        if runner is not None and threading.current_thread() is runner.thread:
            raise RuntimeError("sync.shutdown() cannot run on the sync loop's own thread")
        _runner = None
    if runner is not None:
        runner.stop(timeout)


atexit.register(shutdown)


def _forget_after_fork() -> None:
    global _runner, _lock
    _runner = None  # the thread did not come along; a new one starts on first use
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _track(owner: object, close: Callable[[], Awaitable[Any]]) -> None:
    """Await ``close()`` at :func:`shutdown` unless ``owner`` was closed first (:func:`_untrack`).

    Held strongly: a pool dropped without closing is still closed, its workers reaped.
    """
    _loop_thread().closers[id(owner)] = (owner, close)


def _untrack(owner: object) -> None:
    runner = _runner
    if runner is not None:
        runner.closers.pop(id(owner), None)


def _check_caller(runner: _LoopThread) -> None:
    if threading.current_thread() is runner.thread:
        raise RuntimeError(
            "a blocking asyncdist.sync call on the sync loop's own thread would wait for itself: "
            "make this callback `async def` and await the async API"
        )
    worker = current_worker()
    if worker is not None and worker.loop_thread is threading.current_thread():
        raise RuntimeError(
            "a blocking asyncdist.sync call in an async worker task would stall the worker: "
            "await the async API there (e.g. `await asyncdist.map(...)`)"
        )


@contextlib.contextmanager
def _waiting() -> Iterator[None]:
    """Around a blocking wait: inside a worker task, give the task's slot back meanwhile."""
    worker = current_worker()
    if worker is None:
        yield
        return
    with worker.slot_released():
        yield


class Future(concurrent.futures.Future[_T]):
    """A :class:`concurrent.futures.Future` for an operation on the sync loop.

    ``cancel()`` cancels the operation on the loop (and the remote task);
    ``result()`` inside a worker task gives the task's slot back while it
    waits.
    """

    _task: asyncio.Task[_T] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> bool:
        task, loop = self._task, self._loop
        if task is not None and loop is not None and not self.done():
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(task.cancel)
        if not super().cancel():
            return False
        # Pending until done (never RUNNING), so it cancels; wake wait() and as_completed().
        self.set_running_or_notify_cancel()
        return True

    def result(self, timeout: float | None = None) -> _T:
        with _waiting():
            return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        with _waiting():
            return super().exception(timeout)


def _spawn(coro: Coroutine[Any, Any, _T]) -> Future[_T]:
    """Start ``coro`` on the sync loop now; return a Future of its result."""
    runner = _loop_thread()
    fut: Future[_T] = Future()
    fut._loop = runner.loop

    def start() -> None:
        if fut.cancelled():
            coro.close()
            return
        try:
            task = runner.loop.create_task(coro)
        except BaseException as exc:  # not a coroutine: say so rather than wait forever
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                fut.set_exception(exc)
            return
        fut._task = task

        def done(t: asyncio.Task[_T]) -> None:
            if fut.done():
                return
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                if t.cancelled():
                    fut.cancel()
                elif (exc := t.exception()) is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(t.result())

        task.add_done_callback(done)

    runner.loop.call_soon_threadsafe(start)
    return fut


def run(aw: Awaitable[_T], timeout: float | None = None) -> _T:
    """Run a coroutine (or another awaitable: ``sync.run(rpc.serve(...))``) on the sync loop
    and return its result, blocking this thread.

    ``timeout`` (seconds) cancels it and raises :class:`TimeoutError`.
    Ctrl-C while waiting cancels it and raises KeyboardInterrupt.
    """
    coro = aw if asyncio.iscoroutine(aw) else _await(aw)
    runner = _loop_thread()
    try:
        _check_caller(runner)
    except BaseException:
        coro.close()
        raise
    fut = _spawn(coro)
    try:
        with _waiting():
            concurrent.futures.wait([fut], timeout)
    except BaseException:
        # KeyboardInterrupt in the main thread, or this thread is being torn down: cancel
        # the operation on the loop (the cancellation reaches remote tasks as it goes).
        fut.cancel()
        raise
    if not fut.done():
        fut.cancel()
        raise TimeoutError(f"the operation did not finish within {timeout} s")
    return concurrent.futures.Future.result(fut)


def call(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Call a plain function on the sync loop's thread (for APIs that need its running loop)."""

    async def on_loop() -> _T:
        return func(*args, **kwargs)

    return run(on_loop())


def _iterate(agen: AsyncIterator[_T]) -> Iterator[_T]:
    """A blocking iterator over an async iterator living on the sync loop."""
    try:
        while True:
            try:
                item: _T = run(agen.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None and _runner is not None:
            with contextlib.suppress(Exception):
                run(aclose())


# -- futures (SCOOP) ---------------------------------------------------------------------------


class Pool:
    """A blocking :class:`asyncdist.Pool`: the same arguments, started at once.

    ``with sync.Pool(workers=4) as pool: pool.map(f, xs)``; :meth:`close`
    (or leaving the ``with``) stops its workers.
    """

    def __init__(self, workers: int | None = None, **options: Any) -> None:
        self._pool = _futures.Pool(workers, **options)
        run(self._pool.start())
        _track(self, self._pool.aclose)

    @classmethod
    def _default(cls) -> Pool:
        pool = cls.__new__(cls)
        pool._pool = run(_futures.default_pool())
        return pool

    @property
    def address(self) -> str | None:
        """``host:port`` of the broker."""
        return self._pool.address

    @property
    def secret(self) -> bytes | None:
        """The cluster's secret (a local pool makes one)."""
        return self._pool.secret

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def map(
        self,
        fn: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> list[Any]:
        """Results of ``fn`` over the iterables, in order (see :meth:`asyncdist.Pool.map`)."""
        return run(self._pool.map(fn, *iterables, timeout=timeout, progress=progress))

    def map_as_completed(
        self,
        fn: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> Iterator[Any]:
        """Results as they come; closing the iterator early cancels the rest."""
        return _iterate(self._pool.map_as_completed(fn, *iterables, timeout=timeout, progress=progress))

    def map_reduce(
        self,
        fn: Callable[..., Any],
        reduction: Callable[[Any, Any], Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> Any:
        """``reduction`` over the results of ``fn``, folded as they come."""
        return run(self._pool.map_reduce(fn, reduction, *iterables, timeout=timeout, progress=progress))

    mapReduce = map_reduce  # SCOOP's name

    def map_scan(
        self,
        fn: Callable[..., Any],
        reduction: Callable[[Any, Any], Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        progress: Progress = False,
    ) -> list[Any]:
        """The running reductions of the results, in order."""
        return run(self._pool.map_scan(fn, reduction, *iterables, timeout=timeout, progress=progress))

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Start ``fn(*args, **kwargs)`` on a worker; returns at once with a Future."""
        pool = self._pool

        async def one() -> _T:
            result: _T = await pool.submit(fn, *args, **kwargs)
            return result

        _check_caller(_loop_thread())
        return _spawn(one())

    def status(self) -> dict[str, Any]:
        """The broker's counters, queue depth and workers."""
        return run(self._pool.status())

    def close(self) -> None:
        """Stop the pool (and its local workers). Idempotent."""
        _untrack(self)
        if not self._pool.closed and _runner is not None:
            run(self._pool.aclose())

    shutdown = close

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sync {self._pool!r}>"


def map(
    fn: Callable[..., Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> list[Any]:
    """:meth:`Pool.map` on the default pool (the launcher's, the worker's, or a local one)."""
    return run(_futures.map(fn, *iterables, timeout=timeout, progress=progress))


def map_as_completed(
    fn: Callable[..., Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> Iterator[Any]:
    """:meth:`Pool.map_as_completed` on the default pool."""
    return _iterate(_futures.map_as_completed(fn, *iterables, timeout=timeout, progress=progress))


def map_reduce(
    fn: Callable[..., Any],
    reduction: Callable[[Any, Any], Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> Any:
    """:meth:`Pool.map_reduce` on the default pool."""
    return run(_futures.map_reduce(fn, reduction, *iterables, timeout=timeout, progress=progress))


mapReduce = map_reduce  # SCOOP's name


def map_scan(
    fn: Callable[..., Any],
    reduction: Callable[[Any, Any], Any],
    /,
    *iterables: Iterable[Any],
    timeout: float | None = None,
    progress: Progress = False,
) -> list[Any]:
    """:meth:`Pool.map_scan` on the default pool."""
    return run(_futures.map_scan(fn, reduction, *iterables, timeout=timeout, progress=progress))


def submit(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
    """:meth:`Pool.submit` on the default pool."""
    return Pool._default().submit(fn, *args, **kwargs)


def wait(
    fs: Iterable[concurrent.futures.Future[Any]],
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """:func:`concurrent.futures.wait`, giving a worker task's slot back while it waits."""
    with _waiting():
        return concurrent.futures.wait(fs, timeout, return_when)


def as_completed(
    fs: Iterable[concurrent.futures.Future[_T]], timeout: float | None = None
) -> Iterator[concurrent.futures.Future[_T]]:
    """:func:`concurrent.futures.as_completed`, giving a worker task's slot back while it waits."""
    with _waiting():
        yield from concurrent.futures.as_completed(fs, timeout)


# -- remote objects (Pyro) ---------------------------------------------------------------------

_URI_ALIASES = (("PYRONAME:", "adistname:"), ("PYROMETA:", "adistmeta:"), ("PYRO:", "adist:"))


def _uri(uri_or_name: Any) -> Any:
    if isinstance(uri_or_name, str):
        for old, new in _URI_ALIASES:
            if uri_or_name.startswith(old):
                return new + uri_or_name[len(old) :]
    return uri_or_name


def _wrap(value: Any) -> Any:
    """Values from the loop as the blocking side sees them (remote handles made blocking)."""
    if isinstance(value, _objects.Proxy):
        return Proxy._of(value)
    if isinstance(value, _Netref):
        return RemoteRef._of(value)
    return value


def _unwrap(value: Any, depth: int = 0) -> Any:
    """Values going to the loop: blocking handles become the async ones they wrap (so that a
    remote reference sent back arrives as the object itself), also inside lists, tuples, sets
    and dicts."""
    cls = type(value)
    if cls is RemoteRef or cls is _SysRef:
        return value._ref
    if cls is Proxy:
        return value._p
    if depth < 4:
        if cls is list or cls is tuple or cls is set or cls is frozenset:
            items = [_unwrap(v, depth + 1) for v in value]
            return items if cls is list else cls(items)
        if cls is dict:
            return {k: _unwrap(v, depth + 1) for k, v in value.items()}
    return value


def _unwrap_all(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return tuple(_unwrap(a) for a in args), {k: _unwrap(v) for k, v in kwargs.items()}


class Proxy:
    """A blocking :class:`asyncdist.Proxy`: ``proxy.method(*args)`` returns the result.

    Remote properties read and write as attributes (``proxy.prop``,
    ``proxy.prop = v``), remote generators come back as iterators, proxies
    in results are blocking proxies. The connection is made on first use
    and is shared by every thread using this proxy; :meth:`_release` (or
    leaving the ``with``) closes it. Names starting with ``_`` are local.
    """

    __slots__ = ("__weakref__", "_p")

    def __init__(self, uri_or_name: Any, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_p", _objects.Proxy(_uri(uri_or_name), *args, **kwargs))

    @classmethod
    def _of(cls, proxy: _objects.Proxy) -> Proxy:
        self = cls.__new__(cls)
        object.__setattr__(self, "_p", proxy)
        return self

    def _meta(self) -> dict[str, frozenset[str]]:
        meta = self._p._meta
        if meta is None:
            run(self._p._connect())
            meta = self._p._meta
        return meta or {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        meta = self._meta()
        if name in meta.get("properties", ()):
            return _wrap(run(self._p._get(name)))
        if name in meta.get("streams", ()):
            return _Stream(self._p, name)
        return _Method(self._p, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"{name}: local attributes of a sync proxy are fixed")
        run(self._p._set(name, _unwrap(value)))

    def _connect(self) -> Proxy:
        """Connect now (a call connects by itself)."""
        run(self._p._connect())
        return self

    def _release(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if _runner is not None:
            run(self._p._release())

    _pyroRelease = _release  # Pyro's name

    def _call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the remote method ``name`` (for names that clash with a local one)."""
        args, kwargs = _unwrap_all(args, kwargs)
        return _wrap(run(self._p._call(name, *args, **kwargs)))

    @property
    def _uri(self) -> Any:
        return self._p._uri

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release()

    def __dir__(self) -> list[str]:
        meta = self._p._meta or {}
        return sorted(set().union(*meta.values())) if meta else []

    def __repr__(self) -> str:
        return f"<sync {self._p!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proxy) and self._p == other._p

    def __hash__(self) -> int:
        return hash(self._p)


class _Method:
    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: _objects.Proxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unwrap_all(args, kwargs)
        return _wrap(run(self._proxy._invoke(self._name, args, kwargs)))

    def __repr__(self) -> str:
        return f"<remote method {self._name} of {self._proxy!r}>"


class _Stream(_Method):
    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        args, kwargs = _unwrap_all(args, kwargs)
        return (_wrap(x) for x in _iterate(self._proxy._stream(self._name, args, kwargs)))


class Daemon:
    """A blocking :class:`asyncdist.Daemon`, listening from construction (as Pyro's).

    ``uri = daemon.register(obj)``, then :meth:`request_loop` serves until
    :meth:`shutdown` (from another thread, or a remote method) or Ctrl-C.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *args: Any, **kwargs: Any) -> None:
        self._daemon = _objects.Daemon(host, port, *args, **kwargs)
        run(self._daemon.start())
        _track(self, self._daemon.aclose)
        self._serving: Future[None] | None = None

    @property
    def location(self) -> str:
        return self._daemon.location

    def register(self, obj_or_class: Any, object_id: str | None = None, *, force: bool = False) -> str:
        """Serve an object; return its URI (see :meth:`asyncdist.Daemon.register`)."""
        return call(self._daemon.register, obj_or_class, object_id, force=force)

    def unregister(self, obj_or_id: Any) -> None:
        """Stop serving an object."""
        call(self._daemon.unregister, obj_or_id)

    def uri_for(self, obj_or_id: Any) -> str:
        """The URI of a registered object."""
        return call(self._daemon.uri_for, obj_or_id)

    def request_loop(self, loop_condition: Callable[[], bool] | None = None) -> None:
        """Serve until :meth:`shutdown`, Ctrl-C, or ``loop_condition()`` turns false.

        ``loop_condition`` is checked every 0.1 s, in this thread.
        """
        serving = _spawn(self._daemon.serve_forever())
        self._serving = serving
        try:
            if loop_condition is None:
                concurrent.futures.Future.result(serving)
            else:
                while loop_condition():
                    done, _ = concurrent.futures.wait([serving], timeout=0.1)
                    if done:
                        serving.result()
                        break
        except concurrent.futures.CancelledError:
            return  # sync.shutdown() (or interpreter exit) stopped the loop: the daemon is closed
        finally:
            self.shutdown()

    requestLoop = request_loop  # Pyro's name

    def shutdown(self) -> None:
        """Stop serving and close every connection (calls in progress finish first)."""
        _untrack(self)
        if _runner is not None:
            run(self._daemon.aclose())

    close = shutdown

    @staticmethod
    def serve_simple(
        objects: Mapping[Any, str | None],
        host: str | None = None,
        port: int = 0,
        daemon: Daemon | None = None,
        ns: bool = True,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        """Pyro4's ``Daemon.serveSimple``: :func:`serve` with Pyro's argument names (``ns`` for
        ``use_ns``); blocks until the daemon shuts down or Ctrl-C."""
        serve(objects, host or "127.0.0.1", port, daemon=daemon, use_ns=ns, verbose=verbose, **kwargs)

    serveSimple = serve_simple  # Pyro's name

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<sync {self._daemon!r}>"


def serve(
    objects: Mapping[Any, str | None],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    daemon: Daemon | None = None,
    **kwargs: Any,
) -> None:
    """Serve ``{object_or_class: name}`` until the daemon shuts down (:meth:`Daemon.shutdown`
    from another thread, or a remote method), Ctrl-C or :func:`shutdown`; then the names are
    removed from the name server and the daemon closes. The blocking
    :func:`asyncdist.objects.serve` (same options: ``use_ns``, ``ns_host``, ``ns_port``,
    ``secret``, ``ssl``, ``verbose``, ``ready``); ``daemon`` is a :class:`Daemon` of this module.
    """
    if daemon is not None:
        kwargs["daemon"] = daemon._daemon
    run(_objects.serve(objects, host, port, **kwargs))


def locate_ns(
    host: str | None = None, port: int | None = None, secret: str | bytes | None = None, **kwargs: Any
) -> Proxy:
    """A blocking proxy to the name server (see :func:`asyncdist.locate_ns`)."""
    return Proxy._of(run(_ns(host, port, secret, kwargs)))


async def _ns(host: str | None, port: int | None, secret: Any, kwargs: dict[str, Any]) -> _objects.Proxy:
    proxy: _objects.Proxy = await _naming.locate_ns(host, port, secret, **kwargs)
    return proxy


locateNS = locate_ns  # Pyro's name


# -- symmetric RPC (RPyC) ----------------------------------------------------------------------


class RemoteRef:
    """A blocking netref: attribute reads, calls, ``len``, ``str``, iteration go to the peer.

    As in RPyC, ``ref.name`` fetches the attribute (a value, or another
    remote reference), ``ref(*args)`` calls it, ``ref.name = v`` sets it.
    """

    __slots__ = ("__weakref__", "_members", "_ref")

    def __init__(self) -> None:
        raise TypeError("remote references come from an RPC connection")

    @classmethod
    def _of(cls, ref: _Netref) -> RemoteRef:
        self = object.__new__(cls)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_members", None)
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        members: dict[str, Any] | None = self._members
        if members is not None and name in members:
            return members[name]
        value = _wrap(run(_rpc.getattr(self._ref, name)))
        if members is not None and isinstance(value, RemoteRef) and len(members) < 256:
            members[name] = value  # the root's methods live as long as the connection
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"{name}: local attributes of a remote reference are fixed")
        run(_rpc.setattr(self._ref, name, _unwrap(value)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unwrap_all(args, kwargs)
        return _wrap(run(self._ref(*args, **kwargs)))

    def __len__(self) -> int:
        return run(_rpc.len(self._ref))

    def __str__(self) -> str:
        return run(_rpc.str(self._ref))

    def __repr__(self) -> str:
        return f"<sync {self._ref!r}>"

    def __iter__(self) -> Iterator[Any]:
        return (_wrap(x) for x in _iterate(self._ref.__aiter__()))


class RPCConnection:
    """A blocking :func:`asyncdist.rpc.connect` connection: ``conn.root.method(...)``."""

    def __init__(self, conn: _rpc.Connection) -> None:
        self._conn = conn
        root = RemoteRef._of(conn.root)
        object.__setattr__(root, "_members", {})
        self.root = root
        _track(self, conn.close)

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def close(self) -> None:
        """Close the connection. Idempotent."""
        _untrack(self)
        if _runner is not None and not self._conn.closed:
            run(self._conn.close())

    def __enter__(self) -> RPCConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sync {self._conn!r}>"


#: Threads of a sync RPC connection for the plain callbacks and service methods the peer calls
#: here: they may block (call the peer back through this module), nested this deep at most.
CALLBACK_THREADS = 64


def rpc_connect(host: str = "127.0.0.1", port: int | None = 18861, **kwargs: Any) -> RPCConnection:
    """A blocking :func:`asyncdist.rpc.connect` (same arguments).

    Plain callbacks the server calls (and this side's plain service methods)
    run in threads, ``threads=CALLBACK_THREADS`` unless given, so they may
    call the server back, as RPyC's do (``threads=None``: on the loop).
    """
    kwargs.setdefault("threads", CALLBACK_THREADS)
    return RPCConnection(run(_await(_rpc.connect(host, port, **kwargs))))


async def _await(aw: Awaitable[_T]) -> _T:
    return await aw


class _Modules:
    def __init__(self, conn: ClassicConnection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> RemoteRef:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> RemoteRef:
        ref = RemoteRef._of(self._conn._conn.modules[name])
        if name == "sys":
            return _SysRef._with(ref, self._conn)
        return ref


class _SysRef(RemoteRef):
    """The server's ``sys``: assigning a local stream to its stdout/stderr redirects them here."""

    __slots__ = ("_classic",)

    @classmethod
    def _with(cls, ref: RemoteRef, conn: ClassicConnection) -> _SysRef:
        self = cls._of(ref._ref)
        object.__setattr__(self, "_classic", conn)
        return self  # type: ignore[return-value]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("stdout", "stderr") and callable(getattr(value, "write", None)):
            self._classic._redirect()
            return
        super().__setattr__(name, value)


class ClassicConnection(RPCConnection):
    """A blocking classic connection: ``execute``, ``eval``, ``modules``, ``builtins``, ``teleport``."""

    _conn: _classic.ClassicConnection

    def __init__(self, conn: _classic.ClassicConnection) -> None:
        super().__init__(conn)
        self._redirected = False

    def execute(self, code: str) -> None:
        """Run statements on the server, in this connection's namespace."""
        run(self._conn.execute(code))

    def eval(self, expr: str) -> Any:
        """The value of ``expr`` on the server (a value, or a remote reference)."""
        return _wrap(run(self._conn.eval(expr)))

    @property
    def modules(self) -> _Modules:
        """The server's modules: ``conn.modules.os.getcwd()``, ``conn.modules["os.path"]``."""
        return _Modules(self)

    @property
    def builtins(self) -> RemoteRef:
        """The server's builtins module."""
        return self.modules["builtins"]

    def teleport(self, func: Callable[..., Any]) -> RemoteRef:
        """Ship ``func`` to the server by value; returns the remote function."""
        return RemoteRef._of(run(self._conn.teleport(func)))

    def _redirect(self) -> None:
        if not self._redirected:
            run(self._conn.root.redirect_stdio(_classic._write_locally))
            self._redirected = True

    @contextlib.contextmanager
    def redirected_stdio(self) -> Iterator[None]:
        """While inside, what the server's code prints for this connection appears here."""
        run(self._conn.root.redirect_stdio(_classic._write_locally))
        try:
            yield
        finally:
            if not self._conn.closed:
                run(self._conn.root.restore_stdio())


def classic_connect(host: str = "127.0.0.1", port: int | None = 18812, **kwargs: Any) -> ClassicConnection:
    """A blocking :func:`asyncdist.rpc.classic.connect` (the server must allow classic mode);
    callbacks run in threads as with :func:`rpc_connect`."""
    kwargs.setdefault("threads", CALLBACK_THREADS)
    return ClassicConnection(run(_await(_classic.connect(host, port, **kwargs))))


# -- MapReduce (Disco) -------------------------------------------------------------------------


class Job:
    """A blocking :class:`asyncdist.mapreduce.Job`: ``Job().run(...)``, then ``job.wait(show=True)``."""

    def __init__(self, name: str = "job", master: str | None = None, **connect_options: Any) -> None:
        self._job = _Job(name, master, **connect_options)

    @property
    def name(self) -> str:
        return self._job.name

    @property
    def id(self) -> str | None:
        return self._job.id

    def run(self, **kwargs: Any) -> Job:
        """Submit the job (arguments of :meth:`asyncdist.mapreduce.Job.run`); returns at once."""
        run(self._job.run(**kwargs))
        return self

    def wait(self, show: Progress = False, timeout: float | None = None) -> Any:
        """Wait for the results (give them to :func:`result_iterator`); raise the job's error."""
        return run(self._job.wait(show=show, timeout=timeout))

    def kill(self) -> None:
        """Stop the job and free its disk."""
        run(self._job.kill())

    def purge(self) -> None:
        """Free the job's results on the slaves."""
        run(self._job.purge())

    def close(self) -> None:
        """Close the connection to the master."""
        if _runner is not None:
            run(self._job.close())


def result_iterator(results: Any) -> Iterator[tuple[Any, Any]]:
    """The job's ``(key, value)`` results, streamed from the slaves."""
    return _iterate(_result_iterator(results))


# -- CSP (PyCSP) -------------------------------------------------------------------------------


def Channel(*args: Any, **kwargs: Any) -> _csp.Channel:
    """A :class:`asyncdist.csp.Channel` on the sync loop (ends work from plain processes)."""
    return call(_csp.Channel, *args, **kwargs)


def Parallel(*processes: _csp.Process) -> list[Any]:
    """Run CSP processes (plain functions run in threads of their own) to the end; their results."""
    return run(_csp.Parallel(*processes))


def Sequence(*processes: _csp.Process) -> list[Any]:
    """Run CSP processes one after the other; their results."""
    return run(_csp.Sequence(*processes))


def Spawn(*processes: _csp.Process) -> Future[list[Any]]:
    """Start CSP processes without waiting; a Future of their results."""
    _check_caller(_loop_thread())
    return _spawn(_csp.Parallel(*processes))


# -- shared constants (SCOOP's shared) ----------------------------------------------------------------

_MISSING: Any = object()


def _set_const(**constants: Any) -> None:
    run(_futures.shared.set_const(**constants))


def _get_const(name: str, default: Any = _MISSING) -> Any:
    args = (name,) if default is _MISSING else (name, default)
    if current_worker() is not None:  # in a task: the worker's copy, no loop needed
        return _futures.shared.get_const(*args)
    return call(_futures.shared.get_const, *args)  # the default pool lives on the sync loop


def _getConst(name: str, timeout: float | None = None) -> Any:
    # SCOOP's waits up to ``timeout`` for the constant to arrive, then gives None. Here it is
    # on every worker before any task submitted after set_const returned: nothing to wait for.
    return _get_const(name, None)


#: SCOOP's ``shared``: ``shared.set_const(name=value)`` (``setConst``) on the default pool, which
#: ``map`` and ``submit`` here use; ``shared.get_const(name[, default])`` in a task or here
#: (KeyError when not set); ``getConst(name)`` gives None then, as SCOOP's.
shared = types.SimpleNamespace(
    set_const=_set_const, get_const=_get_const, setConst=_set_const, getConst=_getConst
)


# -- the classic libraries' module paths ---------------------------------------------------------

#: Pyro4's ``Pyro4.core``: ``Pyro4.core.Proxy``, ``Pyro4.core.Daemon`` (with
#: ``from asyncdist import sync as Pyro4``, the seed's spellings run unchanged).
core = types.SimpleNamespace(Proxy=Proxy, Daemon=Daemon, expose=expose, oneway=oneway, behavior=behavior)
#: Pyro4's ``Pyro4.naming``: ``Pyro4.naming.locateNS``.
naming = types.SimpleNamespace(locateNS=locateNS, locate_ns=locate_ns)


def _redirected_stdio(conn: ClassicConnection) -> contextlib.AbstractContextManager[None]:
    return conn.redirected_stdio()


def _teleport_function(conn: ClassicConnection, func: Callable[..., Any]) -> RemoteRef:
    return conn.teleport(func)


def _obtain(ref: Any) -> Any:
    """RPyC's ``classic.obtain``: a local copy of a remote object of a classic server (pickled
    there, unpickled here, as RPyC does: classic mode trusts the server). A value that is not a
    remote reference is returned as it is."""
    if not isinstance(ref, RemoteRef):
        return ref
    session = ref._ref._rpc
    if not isinstance(session, _classic.ClassicConnection):
        raise TypeError("obtain() copies objects of a classic connection (rpyc.classic.connect)")
    data = RemoteRef._of(session.modules["pickle"]).dumps(ref)  # ``ref`` arrives there as itself
    return pickle.loads(data)


def _deliver(conn: ClassicConnection, obj: Any) -> Any:
    """RPyC's ``classic.deliver``: a copy of ``obj`` on the server (pickled here, unpickled
    there); a remote reference to it, or the value when it travels by value."""
    return conn.modules.pickle.loads(pickle.dumps(obj))


def _upload(conn: ClassicConnection, localpath: str | os.PathLike[str], remotepath: str) -> None:
    """RPyC's ``classic.upload``: copy a local file, or a directory tree, to the server."""
    if os.path.isdir(localpath):
        conn.modules.os.makedirs(remotepath, exist_ok=True)
        for name in os.listdir(localpath):
            _upload(conn, os.path.join(localpath, name), conn.modules["os.path"].join(remotepath, name))
        return
    remote = conn.builtins.open(remotepath, "wb")
    try:
        with open(localpath, "rb") as local:
            while chunk := local.read(_COPY_CHUNK):
                remote.write(chunk)
    finally:
        remote.close()


def _download(conn: ClassicConnection, remotepath: str, localpath: str | os.PathLike[str]) -> None:
    """RPyC's ``classic.download``: copy a file, or a directory tree, of the server here."""
    if conn.modules["os.path"].isdir(remotepath):
        os.makedirs(localpath, exist_ok=True)
        for name in conn.modules.os.listdir(remotepath):
            _download(conn, conn.modules["os.path"].join(remotepath, name), os.path.join(localpath, name))
        return
    remote = conn.builtins.open(remotepath, "rb")
    try:
        with open(localpath, "wb") as local:
            while chunk := remote.read(_COPY_CHUNK):
                local.write(chunk)
    finally:
        remote.close()


_COPY_CHUNK = 256 * 1024

#: RPyC's ``rpyc.classic`` (with ``from asyncdist import sync as rpyc``): ``connect`` (port 18812
#: by default), ``redirected_stdio(conn)``, ``teleport_function(conn, func)``, ``obtain(ref)``,
#: ``deliver(conn, obj)``, ``upload(conn, local, remote)``, ``download(conn, remote, local)``.
classic = types.SimpleNamespace(
    connect=classic_connect,
    redirected_stdio=_redirected_stdio,
    teleport_function=_teleport_function,
    obtain=_obtain,
    deliver=_deliver,
    upload=_upload,
    download=_download,
    DEFAULT_SERVER_PORT=_classic.DEFAULT_PORT,
)
#: RPyC's ``rpyc.connect(host, port)``: :func:`rpc_connect`.
connect = rpc_connect
