"""Processes: ``@process``, ``Parallel``, ``Sequence``, ``Spawn``, and ``poison`` / ``retire``.

A process that ends by :class:`ChannelPoisoned` poisons every channel end
it was given (directly, or inside a list, tuple, set or dict argument), and
one that ends by :class:`ChannelRetired` retires them: one poison shuts a
whole network down (PyCSP's propagation). A process that fails with any
other exception poisons its ends too, so that its neighbours stop, and the
failure is raised by :func:`Parallel`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec

from ..errors import ChannelPoisoned, ChannelRetired
from . import _trace
from ._channel import Channel, ChannelEnd, ThreadScope, now_or_awaitable, thread_scope

__all__ = ["Parallel", "Process", "Sequence", "Spawn", "multiprocess", "poison", "process", "retire"]

_P = ParamSpec("_P")


def _ends(value: Any, depth: int = 0) -> Iterator[ChannelEnd | Channel]:
    if isinstance(value, ChannelEnd | Channel):
        yield value
    elif depth < 4 and isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _ends(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _ends(item, depth + 1)


async def _poison(ends: tuple[ChannelEnd | Channel, ...]) -> None:
    for end in ends:
        await end.poison()


async def _retire(ends: tuple[ChannelEnd, ...]) -> None:
    for end in ends:
        await end.retire()


def _loops(ends: tuple[Any, ...]) -> set[asyncio.AbstractEventLoop]:
    return {e._loop if isinstance(e, ChannelEnd) else e._home.loop for e in ends}


def poison(*ends: ChannelEnd | Channel) -> Any:
    """Poison the channels of these ends: every pending and later read or write raises ChannelPoisoned.

    ``await csp.poison(end)`` in a coroutine; a plain process (in a thread) calls ``csp.poison(end)``.
    """
    return now_or_awaitable(_poison(ends), _loops(ends), "poison")


def retire(*ends: ChannelEnd) -> Any:
    """Retire these ends; a channel retires on a side when every end of that side has retired.

    ``await csp.retire(end)`` in a coroutine; a plain process calls ``csp.retire(end)``.
    """
    return now_or_awaitable(_retire(ends), _loops(ends), "retire")


class Process:
    """One process: a function with its arguments, not started yet (``@process`` makes these)."""

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        separate: bool = False,
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.name = getattr(func, "__qualname__", repr(func))
        #: Run in another OS process (``@multiprocess``).
        self.separate = separate

    def channel_ends(self) -> list[ChannelEnd | Channel]:
        """The channel ends (and channels) this process was given."""
        return [*_ends(self.args), *_ends(self.kwargs)]

    async def run(self) -> Any:
        """Run to the end; propagate poison or retirement to the process's channel ends.

        Returns the function's result, or None when it ended by poison or
        retirement; raises what it raised otherwise (after poisoning its ends).
        """
        if self.separate:
            from ._multi import run_separately

            return await run_separately(self)
        token = _trace.current_process.set(self.name)
        how = "failed"
        try:
            if _trace.tracer is not None:
                _trace.event("start")
            if inspect.iscoroutinefunction(self.func):
                result = await self.func(*self.args, **self.kwargs)
            else:
                result = await self._in_thread()
            how = "done"
            return result
        except ChannelPoisoned:
            how = "poisoned"
            await _poison(tuple(self.channel_ends()))
            return None
        except ChannelRetired:
            how = "retired"
            for end in self.channel_ends():
                if isinstance(end, ChannelEnd):
                    await end.retire()
            return None
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        except BaseException as exc:
            if _trace.tracer is not None:
                _trace.event("failed", error=exc)
            await _poison(tuple(self.channel_ends()))
            raise
        finally:
            if _trace.tracer is not None:
                _trace.event("end", how=how)
            _trace.current_process.reset(token)

    async def _in_thread(self) -> Any:
        """Run a plain function in a thread of its own (PyCSP gives each process a thread)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        scope = ThreadScope()
        ctx = contextvars.copy_context()

        def deliver(ok: bool, value: Any) -> None:
            if not done.done():
                (done.set_result if ok else done.set_exception)(value)

        def target() -> None:
            thread_scope.scope = scope
            try:
                result = ctx.run(self.func, *self.args, **self.kwargs)
            except BaseException as exc:
                if isinstance(exc, concurrent.futures.CancelledError):
                    exc = asyncio.CancelledError()
                outcome: tuple[bool, Any] = (False, exc)
            else:
                outcome = (True, result)
            try:
                loop.call_soon_threadsafe(deliver, *outcome)
            except RuntimeError:  # the loop is closed
                pass

        thread = threading.Thread(target=target, name=f"csp-{self.name}", daemon=True)
        thread.start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # Cancel the channel operation the thread is blocked in, then let it unwind.
            scope.cancel()
            with contextlib.suppress(BaseException):
                await done
            raise
        finally:
            await asyncio.to_thread(thread.join)

    def __repr__(self) -> str:
        return f"<csp process {self.name}>"


def process(func: Callable[_P, Any]) -> Callable[_P, Process]:
    """Make a function (``async def``, or plain: it then runs in a thread) into a CSP process.

    Calling the decorated function returns a :class:`Process` to give to
    :func:`Parallel`, :func:`Sequence` or :func:`Spawn`; nothing runs yet.
    """

    @functools.wraps(func)
    def make(*args: _P.args, **kwargs: _P.kwargs) -> Process:
        return Process(func, args, kwargs)

    return make


def multiprocess(func: Callable[_P, Any]) -> Callable[_P, Process]:
    """Like :func:`process`, but the process runs in a new OS process (PyCSP's ``@multiprocess``).

    The function (``async def`` or plain) and its arguments travel to a
    child Python process (the function by reference when importable, else
    by value with cloudpickle over a private pipe); channel ends among the
    arguments *move* to the child as networked ends (this loop serves their
    channels: see :func:`~asyncdist.csp.ChannelServer`), and the result, or
    the exception with its traceback, comes back. The child runs with this
    process's ``sys.path`` and environment, prints to the same terminal,
    and always is reaped: cancelling the process kills it.
    """

    @functools.wraps(func)
    def make(*args: _P.args, **kwargs: _P.kwargs) -> Process:
        return Process(func, args, kwargs, separate=True)

    return make


async def Parallel(*processes: Process) -> list[Any]:
    """Run processes concurrently; return their results in order.

    Ending by poison or retirement is a normal end (its result is None).
    If any process failed otherwise, every failure is raised together as an
    :class:`ExceptionGroup` once all processes ended (their ends were
    poisoned, so the others stop). Cancelling the call cancels every
    process.
    """
    tasks = [asyncio.ensure_future(p.run()) for p in processes]
    try:
        await asyncio.wait(tasks) if tasks else None
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    errors = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if errors:
        message = f"{len(errors)} of {len(tasks)} CSP processes failed"
        if all(isinstance(e, Exception) for e in errors):
            raise ExceptionGroup(message, errors)  # type: ignore[type-var]
        raise BaseExceptionGroup(message, errors)
    return [None if t.cancelled() else t.result() for t in tasks]


async def Sequence(*processes: Process) -> list[Any]:
    """Run processes one after the other; return their results."""
    return [await p.run() for p in processes]


def Spawn(*processes: Process) -> asyncio.Future[list[Any]]:
    """Start processes without waiting; await the returned future for their results (as Parallel)."""
    return asyncio.ensure_future(Parallel(*processes))
