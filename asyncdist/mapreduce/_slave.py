"""A slave: runs map and reduce tasks for a master, keeps their output on its disk, serves it.

The slave connects to the master (which calls ``mr.map``, ``mr.reduce`` and
``mr.purge`` on that connection) and serves its data directory to reducers
and result readers (``mr.fetch``, a stream of the file's bytes; paths outside
the data directory are refused). Tasks run in a pool of worker processes
(``workers``), which die with the slave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import secrets
import shutil
import signal
import ssl as _ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..connection import Connection, connect
from ..errors import CommunicationError, ConnectionClosed
from ..server import Server, serve
from . import _tasks

__all__ = ["FetchError", "Slave", "fetch_to"]

CHUNK = 1 << 20


class FetchError(CommunicationError):
    """A task could not fetch its input from another slave (that slave is gone): re-run it later."""


def _die_with_parent() -> None:
    """Worker process initializer: exit when the slave dies (Linux), never outlive it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux: the pool's pipes end the worker instead
        pass


async def fetch_to(address: tuple[str, int], path: str, dest: str, **options: Any) -> None:
    """Copy ``path`` from the slave serving at ``address`` into the local file ``dest``."""
    where = f"{address[0]}:{address[1]}"
    try:
        conn = await connect(address[0], address[1], **options)
    except (OSError, CommunicationError) as exc:  # that slave is gone
        raise FetchError(f"cannot fetch {path} from {where}: {exc}") from exc
    async with conn:
        tmp = f"{dest}.part"
        try:
            with open(tmp, "wb") as f:  # noqa: ASYNC230 - local disk, written chunk by chunk
                async for chunk in conn.stream("mr.fetch", path):  # a missing file raises as itself
                    f.write(chunk)
        except ConnectionClosed as exc:
            raise FetchError(f"lost {where} while fetching {path}: {exc}") from exc
        os.replace(tmp, dest)


def _discard(cleanup: str, fut: asyncio.Future[Any]) -> None:
    """An abandoned task ended (or its worker was killed): drop its outcome and its files."""
    if not fut.cancelled():
        fut.exception()
    shutil.rmtree(cleanup, ignore_errors=True)


class Slave:
    """One slave of a MapReduce master: ``await Slave(master, data_dir).start()``."""

    def __init__(
        self,
        master: tuple[str, int],
        data_dir: str,
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        secret: str | bytes | None = None,
        ssl_server: _ssl.SSLContext | None = None,
        ssl_client: _ssl.SSLContext | None = None,
        **options: Any,
    ) -> None:
        self.master = master
        self.data_dir = os.path.abspath(data_dir)
        self.workers = max(1, workers)
        self.host = host
        self.id = secrets.token_hex(6)
        self._secret = secret
        self._ssl_server = ssl_server
        self._ssl_client = ssl_client
        self._options = options
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._dying: list[threading.Thread] = []
        self._server: Server | None = None
        self.conn: Connection | None = None
        self._jobs: set[str] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.tcp_address

    def _client_options(self) -> dict[str, Any]:
        return {"secret": self._secret, "ssl": self._ssl_client, **self._options}

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent
        )

    def _retire_pool(self) -> None:
        """Kill the worker processes now (a task that was cancelled must not run on) and shut the
        pool down without waiting; its manager thread is joined in :meth:`aclose`."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()
        # Joined before the process exits: a manager thread still closing its wake-up pipe when
        # the interpreter's exit hook writes to it prints "Bad file descriptor" (CPython 3.11).
        thread = getattr(pool, "_executor_manager_thread", None)
        pool.shutdown(wait=False, cancel_futures=True)
        if thread is not None:
            self._dying.append(thread)

    def _kill_pool(self) -> None:
        """Kill the worker processes now and start anew."""
        if self._pool is not None:
            self._retire_pool()
            self._pool = self._new_pool()

    async def start(self) -> Slave:
        os.makedirs(self.data_dir, exist_ok=True)
        self._pool = self._new_pool()
        self._server = await serve(
            {"mr.fetch": self._fetch},
            self.host,
            0,
            secret=self._secret,
            ssl=self._ssl_server,
            **self._options,
        )
        handlers = {"mr.map": self._map, "mr.reduce": self._reduce, "mr.purge": self._purge}
        self.conn = await connect(self.master[0], self.master[1], handlers=handlers, **self._client_options())
        await self.conn.call("mr.hello", self.id, list(self.address), self.workers)
        return self

    async def wait_closed(self) -> None:
        """Until the master connection closes."""
        assert self.conn is not None
        await self.conn.wait_closed()

    async def aclose(self) -> None:
        """Stop: leave the master, stop serving, stop the workers, and remove the jobs' files
        (without its master they are of no use)."""
        if self.conn is not None:
            self.conn.abort()
            await self.conn.wait_closed()
        if self._server is not None:
            await self._server.aclose()
        self._retire_pool()  # a task under way is of no use any more: do not wait for it
        dying, self._dying = self._dying, []
        for thread in dying:
            await asyncio.to_thread(thread.join)
        for job in self._jobs:
            shutil.rmtree(os.path.join(self.data_dir, job), ignore_errors=True)
        self._jobs.clear()

    # -- handlers the master calls ---------------------------------------------------------------

    def _job_dir(self, job: Any) -> str:
        if type(job) is not str or not job.isalnum():
            raise ValueError("a job id is alphanumeric")
        self._jobs.add(job)
        return os.path.join(self.data_dir, job)

    async def _run(self, func: Any, task: dict[str, Any], cleanup: str) -> Any:
        assert self._pool is not None
        fut = asyncio.get_running_loop().run_in_executor(self._pool, func, task)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The job was killed (or the task is no longer wanted): its code must not run on.
            if not fut.done():
                self._kill_pool()
            fut.add_done_callback(functools.partial(_discard, cleanup))
            raise
        except concurrent.futures.process.BrokenProcessPool:
            if self._pool is not None and getattr(self._pool, "_broken", False):
                self._kill_pool()
            raise

    async def _map(self, task: dict[str, Any]) -> dict[str, Any]:
        job_dir = self._job_dir(task["job"])
        out = os.path.join(job_dir, f"map-{int(task['task'])}-{int(task['attempt'])}")
        source = task["input"]
        if source[0] == "fetch":  # a previous job's result on some slave: fetch it here first
            _, address, path = source
            local = os.path.join(job_dir, f"in-{int(task['task'])}-{int(task['attempt'])}")
            os.makedirs(job_dir, exist_ok=True)
            await self._get(tuple(address), path, local)
            source = ["result", local]
        local_task = {**task, "input": source, "out": out}
        sizes = await self._run(_tasks.run_map, local_task, out)
        return {"dir": out, "sizes": sizes}

    async def _reduce(self, task: dict[str, Any]) -> dict[str, Any]:
        job_dir = self._job_dir(task["job"])
        work = os.path.join(job_dir, f"reduce-{int(task['partition'])}-{int(task['attempt'])}")
        os.makedirs(work, exist_ok=True)
        inputs = []
        try:
            for i, (address, path) in enumerate(task["sources"]):
                if tuple(address) == self.address and os.path.exists(path):  # noqa: ASYNC240
                    inputs.append(path)
                else:
                    local = os.path.join(work, f"in-{i}")
                    await self._get(tuple(address), path, local)
                    inputs.append(local)
            out = os.path.join(job_dir, f"result-{int(task['partition'])}-{int(task['attempt'])}")
            size = await self._run(_tasks.run_reduce, {**task, "inputs": inputs, "out": out}, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"path": out, "size": size}

    async def _get(self, address: tuple[str, int], path: str, dest: str) -> None:
        await fetch_to(address, path, dest, **self._client_options())

    def _purge(self, job: Any) -> None:
        shutil.rmtree(self._job_dir(job), ignore_errors=True)
        self._jobs.discard(job)

    async def _fetch(self, path: Any) -> AsyncIterator[bytes]:
        if type(path) is not str:
            raise ValueError("a path is a string")
        real = os.path.realpath(path)  # noqa: ASYNC240 - local, no wait worth a thread
        if not real.startswith(self.data_dir + os.sep):
            raise PermissionError("only files of this slave's data directory are served")
        with open(real, "rb") as f:  # noqa: ASYNC230 - read chunk by chunk, as the stream's credit allows
            while chunk := f.read(CHUNK):
                yield chunk
