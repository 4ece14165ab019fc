"""Event loops: :func:`run` runs a coroutine on uvloop when it is installed.

This is the only module that imports uvloop. ``ASYNCDIST_LOOP=asyncio``
forces the standard loop (``uvloop`` requires it, failing if missing).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigurationError

__all__ = ["loop_factory", "new_event_loop", "run", "uvloop_available"]

_T = TypeVar("_T")


def uvloop_available() -> bool:
    """True if uvloop can be imported here."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_factory(name: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a function making new event loops.

    ``name`` is ``"uvloop"``, ``"asyncio"`` or None (``ASYNCDIST_LOOP``,
    else uvloop when available, else asyncio).
    """
    choice = (name or os.environ.get("ASYNCDIST_LOOP") or "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigurationError(f"unknown event loop {choice!r}: use 'uvloop' or 'asyncio'")
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigurationError("uvloop was asked for but is not installed") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def new_event_loop(name: str | None = None) -> asyncio.AbstractEventLoop:
    """Return a new event loop of the kind :func:`loop_factory` picks."""
    return loop_factory(name)()


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None, loop: str | None = None) -> _T:
    """Run ``main`` to completion like :func:`asyncio.run`, on uvloop when available.

    Like :func:`asyncio.run`: a new loop, remaining tasks cancelled and async
    generators finalized at the end, the loop closed, Ctrl-C cancels ``main``.
    """
    with asyncio.Runner(debug=debug, loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
