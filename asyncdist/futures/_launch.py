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
import os
import runpy
import sys
import threading
import traceback
from typing import Any

from .. import loop as _loop
from . import _client
from ._client import Pool

__all__ = ["launch"]


class _Cluster(threading.Thread):
    """A local pool served from its own thread and event loop."""

    def __init__(self, workers: int, slots: int, script: str, pool_options: dict[str, Any]) -> None:
        super().__init__(name="asyncdist-launcher", daemon=True)
        self.workers = workers
        self.slots = slots
        self.script = script
        self.pool_options = pool_options
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
        pool = Pool(workers=self.workers, slots=self.slots, main=self.script, **self.pool_options)
        async with pool:
            self.address = pool.address
            self.secret = pool.secret
            self.ready.set()
            await self._stop_event.wait()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop already finished


def launch(script: str, args: list[str], *, workers: int, slots: int = 1, **pool_options: Any) -> int:
    """Run ``script`` with ``args`` on a fresh local cluster; return its exit status."""
    script = os.path.abspath(script)
    if not os.path.isfile(script):
        print(f"asyncdist: error: no such script: {script}", file=sys.stderr)
        return 2
    cluster = _Cluster(workers, slots, script, pool_options)
    cluster.start()
    cluster.ready.wait()
    if cluster.error is not None or cluster.address is None or cluster.secret is None:
        print(f"asyncdist: error: could not start the cluster: {cluster.error}", file=sys.stderr)
        cluster.join()
        return 1
    _client._launcher = (cluster.address, cluster.secret, script)
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
        cluster.stop()
        cluster.join()
    return status


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
