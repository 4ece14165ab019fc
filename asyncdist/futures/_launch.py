"""The launcher: ``python -m asyncdist [-n N] script.py args...`` (SCOOP's ``python -m scoop``).

It starts a broker and N local workers (in a background thread of this
process, on their own event loop), then runs the script here as the root
program, with that cluster as the default pool of every event loop the
script starts. Workers import the script under another name, without
running its ``if __name__ == "__main__":`` block, so functions defined in
it resolve by reference. Worker output goes to this process's stdout and
stderr. The launcher exits with the script's exit status and leaves no
process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import runpy
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from .. import loop as _loop
from . import _client
from ._client import Pool

__all__ = ["launch"]


#: Makes the cluster the script runs on, given the script's path: an async context manager
#: that yields the broker's ``HOST:PORT`` and the secret.
ClusterFactory = Callable[[str], AbstractAsyncContextManager[tuple[str, bytes]]]


@contextlib.asynccontextmanager
async def _local_cluster(
    script: str, workers: int, slots: int, pool_options: dict[str, Any]
) -> AsyncIterator[tuple[str, bytes]]:
    async with Pool(workers=workers, slots=slots, main=script, **pool_options) as pool:
        assert pool.address is not None
        assert pool.secret is not None
        yield pool.address, pool.secret


class _Cluster(threading.Thread):
    """The script's cluster, served from its own thread and event loop."""

    def __init__(self, factory: ClusterFactory, script: str) -> None:
        super().__init__(name="asyncdist-launcher", daemon=True)
        self.factory = factory
        self.script = script
        self.ready = threading.Event()
        self.address: str | None = None
        self.secret: bytes | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        loop = _loop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the main thread
            self.error = exc
        finally:
            self.ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        async with self.factory(self.script) as (address, secret):
            self.address = address
            self.secret = secret
            self.ready.set()
            await self._stop_event.wait()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop already finished


def launch(
    script: str,
    args: list[str],
    *,
    workers: int = 0,
    slots: int = 1,
    cluster: ClusterFactory | None = None,
    **pool_options: Any,
) -> int:
    """Run ``script`` with ``args`` on a fresh cluster; return its exit status.

    The cluster is ``workers`` local worker processes, or what ``cluster``
    makes (the SSH launcher passes one that starts workers on other hosts).
    """
    script = os.path.abspath(script)
    if not os.path.isfile(script):
        print(f"asyncdist: error: no such script: {script}", file=sys.stderr)
        return 2
    factory: ClusterFactory = cluster or (lambda path: _local_cluster(path, workers, slots, pool_options))
    thread = _Cluster(factory, script)
    thread.start()
    thread.ready.wait()
    if thread.error is not None or thread.address is None or thread.secret is None:
        print(f"asyncdist: error: could not start the cluster: {thread.error}", file=sys.stderr)
        thread.join()
        return 1
    _client._launcher = (thread.address, thread.secret, script)
    old_argv, old_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        _client._launcher = None
        sys.argv, sys.path[:] = old_argv, old_path
        thread.stop()
        thread.join()
    return status


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
