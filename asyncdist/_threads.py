"""A small bounded thread pool that resolves asyncio futures directly.

The objects daemon runs every plain method call in a thread, and RPC servers
their blocking methods and classic-mode code. ``run_in_executor`` costs a
:class:`concurrent.futures.Future`, a work item and the chaining of two
futures across threads per call; this pool hands a callable to an idle thread
and sets the asyncio future from that thread with one
``call_soon_threadsafe``. Threads start on demand up to ``max_threads`` and
stay until :meth:`ThreadPool.shutdown`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadPool"]

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


def _deliver(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class ThreadPool:
    """At most ``max_threads`` threads running plain callables for one event loop."""

    def __init__(self, max_threads: int, name: str) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self._max = max_threads
        self._name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        #: Calls submitted and not finished (running or queued).
        self.busy = 0

    def run(self, loop: asyncio.AbstractEventLoop, func: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``func()`` in a thread; the returned future (of ``loop``) gets its result."""
        if self._closed:
            raise RuntimeError("the thread pool is shut down")
        fut = loop.create_future()
        with self._lock:
            self.busy += 1
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._queue.put((loop, fut, func))
        return fut

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            loop, fut, func = item
            try:
                result = func()
            except BaseException as exc:  # delivered to the caller
                ok, value = False, exc
            else:
                ok, value = True, result
            del item, func
            with self._lock:
                self.busy -= 1
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_deliver, fut, ok, value)
            except RuntimeError:  # the loop is closed: nobody waits for this any more
                pass
            del fut, value

    def shutdown(self) -> None:
        """Let idle threads exit; each busy one exits after its call. Does not wait."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s in all for the threads to exit (after :meth:`shutdown`)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    async def wait_joined(self, timeout: float) -> bool:
        """:meth:`join` without blocking the loop: in the default executor, or here at
        interpreter exit (a sync facade closing at exit), when that executor takes no work."""
        try:
            return await asyncio.to_thread(self.join, timeout)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            return self.join(timeout)
