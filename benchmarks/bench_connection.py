"""Connection benchmark: asyncdist round trips against raw floors and Pyro5.

For each implementation the server runs in its own subprocess (127.0.0.1,
port 0) and the client runs in this process. Three figures each:

(a) sequential round trips per second: one caller, ``echo(1)``, one call at a time;
(b) calls per second with 64 calls in flight on ONE connection. Peers that
    cannot pipeline use the closest equivalent, named in the table: the
    blocking floor keeps 64 requests in flight on its one socket with a sender
    thread and a receiver thread; Pyro5 runs 8 client threads, each with its
    own proxy (so 8 connections), one call at a time each ("8 threads");
(c) 1 MiB ``bytes`` echo, sequential: payload bytes per second ONE WAY,
    N * 1 MiB / elapsed, in MB/s (1 MB = 10**6 bytes).

Implementations (``--only`` takes these names, or a prefix such as ``asyncdist``):

asyncdist-uvloop   asyncdist.serve / asyncdist.connect, server and client both on uvloop
asyncdist-asyncio  the same on the default asyncio loop
floor-uvloop       the "asyncio floor": asyncio.start_server and open_connection, each frame
                   read with readexactly(4) then readexactly(n), msgpack.unpackb, reply
                   msgpack.packb, write + drain. Messages have asyncdist's shape
                   ([CALL, id, "echo", [arg]] -> [REPLY, id, result]) and the server looks the
                   handler up by name, so the floor does the same serialization work. Its (b)
                   client pipelines 64 requests (a sender task and a reader task). On uvloop.
floor-asyncio      the same floor on the default loop
blocking-floor     blocking sockets, a thread per connection, the same frames received with
                   recv_into into one preallocated buffer (no copy beyond msgpack's own):
                   the physical floor for Python here
pyro5              Pyro5 (SERVERTYPE "thread", SERIALIZER "msgpack" on both sides), an exposed
                   echo method; Pyro5's other settings are left at their defaults

Ratios of asyncdist-uvloop against the floors and Pyro5 are printed next to
their targets (plus a few informational ones). The last line of stdout is one
JSON object with the mode, every figure and every ratio. Each figure is the
best of ``--repeat`` runs (default 2) of ``--duration`` seconds (default 2), after
``--warmup`` seconds (default 0.5; 0.1 s before the later runs); every run is in the JSON.

Run from the repository root::

    .venv/bin/python benchmarks/bench_connection.py              # about 1.5 minutes
    .venv/bin/python benchmarks/bench_connection.py --pin 0      # everything shares CPU 0
    .venv/bin/python benchmarks/bench_connection.py --quick      # smoke test, about 10 s
    .venv/bin/python benchmarks/bench_connection.py --only asyncdist-uvloop,floor-uvloop --measure seq
    # cProfile each server (one .prof file per implementation):
    .venv/bin/python benchmarks/bench_connection.py --only asyncdist-uvloop --measure bulk \\
        --profile-server /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
from _harness import (
    Rate,
    ServerProcess,
    acount_for,
    announce_port,
    arun_for,
    best,
    count_for,
    emit_json,
    exit_on_sigterm,
    exit_when_parent_exits,
    fmt_number,
    format_table,
    format_versions,
    pin_to_cpu,
    run_async,
    run_for,
    versions,
    wait_for_termination,
)

#: Packages whose versions each report names.
VERSIONS_OF = ("asyncdist", "uvloop", "msgpack", "Pyro5")

WINDOW = 64  # calls in flight for (b)
PYRO_THREADS = 8  # Pyro5's stand-in for (b)
BULK_SIZE = 1 << 20  # (c) payload: 1 MiB
MB = 1e6
CONNECT_TIMEOUT = 15.0
SOCKET_TIMEOUT = 15.0
# Message kinds, the same numbers as asyncdist.protocol: the floors send messages of the same shape.
CALL = 1
REPLY = 3
_header = struct.Struct(">I")
_pack = msgpack.packb
_unpack = msgpack.unpackb

MEASURES = ("seq", "pipe", "bulk")


def _echo(x: Any) -> Any:
    return x


ECHO_HANDLERS: dict[str, Callable[..., Any]] = {"echo": _echo}


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    repeat: int
    measures: frozenset[str]

    @property
    def budget(self) -> float:
        """Timeout for one measurement, warm-up included."""
        return self.warmup + self.duration + 30.0

    def warmup_for(self, run: int) -> float:
        """The full warm-up before the first run of a measurement, a short one before the others."""
        return self.warmup if run == 0 else min(self.warmup, 0.1)


@dataclass
class Figures:
    """The three results of one implementation (None: not measured or failed)."""

    seq_calls_per_s: float | None = None
    pipelined_calls_per_s: float | None = None
    pipelined_mode: str = ""
    bulk_mb_per_s: float | None = None
    error: str | None = None
    #: Every run of each figure, in the figure's unit (the figure is the best).
    runs: dict[str, list[float]] = field(default_factory=dict)

    def record(self, metric: str, rates: Sequence[Rate], scale: float = 1.0) -> None:
        values = [r.per_second * scale for r in rates]
        self.runs[metric] = [round(v, 1) for v in values]
        setattr(self, metric, best(rates).per_second * scale)


BULK_SCALE = BULK_SIZE / MB  # calls/s -> MB/s of payload one way


def _repeat(s: Settings, measure: Callable[[float], Rate]) -> list[Rate]:
    """Run ``measure(warmup)`` ``s.repeat`` times."""
    return [measure(s.warmup_for(i)) for i in range(s.repeat)]


async def _arepeat(s: Settings, measure: Callable[[float], Awaitable[Rate]]) -> list[Rate]:
    """Async :func:`_repeat`, each run bounded by ``s.budget``."""
    rates = []
    for i in range(s.repeat):
        async with asyncio.timeout(s.budget):
            rates.append(await measure(s.warmup_for(i)))
    return rates


def _bulk_payload() -> bytes:
    return os.urandom(BULK_SIZE)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"wrong echo: {what}")


async def _stop_tasks(tasks: Sequence[asyncio.Task[None]], timeout: float = 15.0) -> None:
    """Wait for worker tasks told to stop; cancel stragglers; re-raise the first failure."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for t in tasks:
        exc = t.exception() if t.done() and not t.cancelled() else None
        if exc is not None:
            raise exc
    if pending:
        raise TimeoutError(f"{len(pending)} worker tasks did not stop within {timeout:g} s")


# -- asyncdist ---------------------------------------------------------------------------------


async def _asyncdist_client(port: int, s: Settings) -> Figures:
    import asyncdist

    fig = Figures(pipelined_mode=f"{WINDOW} in flight, 1 connection")
    async with asyncio.timeout(CONNECT_TIMEOUT):
        conn = await asyncdist.connect("127.0.0.1", port)
    try:
        call = conn.call

        if "seq" in s.measures:

            async def one() -> None:
                _check(await call("echo", 1) == 1, "echo(1)")

            fig.record("seq_calls_per_s", await _arepeat(s, lambda w: arun_for(one, s.duration, w)))

        if "pipe" in s.measures:

            async def pipelined(warmup: float) -> Rate:
                done = 0
                stop = False

                async def worker() -> None:
                    nonlocal done
                    while not stop:
                        _check(await call("echo", 1) == 1, "echo(1)")
                        done += 1

                tasks = [asyncio.create_task(worker()) for _ in range(WINDOW)]
                try:
                    return await acount_for(lambda: done, s.duration, warmup)
                finally:
                    stop = True
                    await _stop_tasks(tasks)

            fig.record("pipelined_calls_per_s", await _arepeat(s, pipelined))

        if "bulk" in s.measures:
            payload = _bulk_payload()
            _check(await call("echo", payload) == payload, "1 MiB payload")

            async def big() -> None:
                _check(len(await call("echo", payload)) == BULK_SIZE, "1 MiB payload")

            fig.record("bulk_mb_per_s", await _arepeat(s, lambda w: arun_for(big, s.duration, w)), BULK_SCALE)
    finally:
        async with asyncio.timeout(15):
            await conn.close()
    return fig


def _serve_asyncdist(loop: str) -> None:
    import asyncdist

    async def main() -> None:
        server = await asyncdist.serve(ECHO_HANDLERS, host="127.0.0.1", port=0)
        announce_port(server.port)
        await wait_for_termination()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.aclose()

    asyncdist.run(main(), loop=loop)


def _run_asyncdist_client(loop: str) -> Callable[[int, Settings], Figures]:
    def client(port: int, s: Settings) -> Figures:
        import asyncdist

        return asyncdist.run(_asyncdist_client(port, s), loop=loop)

    return client


# -- the asyncio floor -------------------------------------------------------------------------


def _frame_parts(body: bytes) -> list[bytes]:
    """Header and body, joined when small (as asyncdist does), separate when large (no copy)."""
    if len(body) < 64 * 1024:
        return [_header.pack(len(body)) + body]
    return [_header.pack(len(body)), body]


async def _floor_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    handlers = ECHO_HANDLERS
    try:
        while True:
            (n,) = _header.unpack(await reader.readexactly(4))
            msg = _unpack(await reader.readexactly(n))
            result = handlers[msg[2]](*msg[3])
            writer.writelines(_frame_parts(_pack([REPLY, msg[1], result])))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _serve_floor(loop: str) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_floor_handle, "127.0.0.1", 0)
        announce_port(server.sockets[0].getsockname()[1])
        await wait_for_termination()
        server.close()

    run_async(main(), loop)


async def _floor_client(port: int, s: Settings) -> Figures:
    fig = Figures(pipelined_mode=f"{WINDOW} in flight, 1 connection")
    async with asyncio.timeout(CONNECT_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    next_id = 0

    async def roundtrip(arg: Any) -> Any:
        nonlocal next_id
        next_id += 1
        writer.writelines(_frame_parts(_pack([CALL, next_id, "echo", [arg]])))
        await writer.drain()
        (n,) = _header.unpack(await reader.readexactly(4))
        reply = _unpack(await reader.readexactly(n))
        return reply[2]

    try:
        if "seq" in s.measures:

            async def one() -> None:
                _check(await roundtrip(1) == 1, "echo(1)")

            fig.record("seq_calls_per_s", await _arepeat(s, lambda w: arun_for(one, s.duration, w)))

        if "pipe" in s.measures:

            async def pipelined(warmup: float) -> Rate:
                nonlocal next_id
                window = asyncio.Semaphore(WINDOW)
                sent = received = 0
                stop = asyncio.Event()

                async def sender() -> None:
                    nonlocal next_id, sent
                    while not stop.is_set():
                        await window.acquire()
                        if stop.is_set():
                            break
                        next_id += 1
                        writer.writelines(_frame_parts(_pack([CALL, next_id, "echo", [1]])))
                        sent += 1
                        await writer.drain()

                async def receiver() -> None:
                    nonlocal received
                    while True:
                        (n,) = _header.unpack(await reader.readexactly(4))
                        _check(_unpack(await reader.readexactly(n))[2] == 1, "echo(1)")
                        received += 1
                        window.release()

                send_task = asyncio.create_task(sender())
                recv_task = asyncio.create_task(receiver())
                try:
                    return await acount_for(lambda: received, s.duration, warmup)
                finally:
                    stop.set()
                    window.release()  # wake the sender if it waits for a slot
                    await _stop_tasks([send_task])
                    # Read the replies still in flight, so the next measurement starts clean.
                    async with asyncio.timeout(15):
                        while received < sent and not recv_task.done():
                            await asyncio.sleep(0.0005)
                    recv_task.cancel()
                    await asyncio.wait([recv_task])
                    exc = None if recv_task.cancelled() else recv_task.exception()
                    if exc is not None:
                        raise exc

            fig.record("pipelined_calls_per_s", await _arepeat(s, pipelined))

        if "bulk" in s.measures:
            payload = _bulk_payload()
            _check(await roundtrip(payload) == payload, "1 MiB payload")

            async def big() -> None:
                _check(len(await roundtrip(payload)) == BULK_SIZE, "1 MiB payload")

            fig.record("bulk_mb_per_s", await _arepeat(s, lambda w: arun_for(big, s.duration, w)), BULK_SCALE)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                await writer.wait_closed()
    return fig


def _run_floor_client(loop: str) -> Callable[[int, Settings], Figures]:
    def client(port: int, s: Settings) -> Figures:
        return run_async(_floor_client(port, s), loop)

    return client


# -- the blocking floor ------------------------------------------------------------------------


class _FrameReader:
    """Length-prefixed frames from a blocking socket, received with recv_into into one reused buffer."""

    def __init__(self, sock: socket.socket, size: int = 256 * 1024) -> None:
        self._sock = sock
        self._view = memoryview(bytearray(size))
        self._start = 0
        self._end = 0

    def read_frames(self) -> list[memoryview]:
        """Block until at least one frame is complete; return every complete frame ([] at EOF).

        The views stay valid until the next call.
        """
        view = self._view
        start, end = self._start, self._end
        while True:
            frames = []
            while end - start >= 4:
                (n,) = _header.unpack_from(view, start)
                if end - start - 4 < n:
                    break
                frames.append(view[start + 4 : start + 4 + n])
                start += 4 + n
            if frames:
                if start == end:
                    start = end = 0
                self._start, self._end = start, end
                return frames
            need = _header.unpack_from(view, start)[0] + 4 if end - start >= 4 else 4
            if start + need > len(view):  # the frame does not fit after `start`: compact or grow
                pending = bytes(view[start:end])  # a partial frame, copied at most once
                if need > len(view):
                    view = self._view = memoryview(bytearray(max(need, 2 * len(view))))
                view[: len(pending)] = pending
                start, end = 0, len(pending)
            n = self._sock.recv_into(view[end:])
            if n == 0:
                self._start = self._end = 0
                return []
            end += n


def _send_parts(sock: socket.socket, parts: list[bytes]) -> None:
    """sendall for a list of buffers: joined when small, scatter-gather (no copy) when large."""
    if len(parts) == 1:
        sock.sendall(parts[0])
        return
    if sum(len(p) for p in parts) <= 64 * 1024:
        sock.sendall(b"".join(parts))
        return
    views = [memoryview(p) for p in parts]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            first = views[0]
            if sent >= len(first):
                sent -= len(first)
                del views[0]
            else:
                views[0] = first[sent:]
                sent = 0


def _blocking_connection(sock: socket.socket) -> None:
    handlers = ECHO_HANDLERS
    reader = _FrameReader(sock)
    with sock, contextlib.suppress(OSError):
        while True:
            frames = reader.read_frames()
            if not frames:
                return
            out: list[bytes] = []
            for frame in frames:
                msg = _unpack(frame)
                out.extend(_frame_parts(_pack([REPLY, msg[1], handlers[msg[2]](*msg[3])])))
            _send_parts(sock, out)


def _serve_blocking() -> None:
    exit_on_sigterm()
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        announce_port(listener.getsockname()[1])
        while True:
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_blocking_connection, args=(sock,), daemon=True).start()


def _blocking_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    sock.settimeout(SOCKET_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _blocking_pipelined(port: int, s: Settings, warmup: float) -> Rate:
    sock = _blocking_connect(port)
    window = threading.Semaphore(WINDOW)
    stop = threading.Event()
    counts = {"sent": 0, "received": 0}
    errors: list[BaseException] = []

    def sender() -> None:
        call_id = 0
        try:
            while not stop.is_set():
                if not window.acquire(timeout=1.0) or stop.is_set():
                    continue
                call_id += 1
                _send_parts(sock, _frame_parts(_pack([CALL, call_id, "echo", [1]])))
                counts["sent"] += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def receiver() -> None:
        reader = _FrameReader(sock)
        try:
            while True:
                frames = reader.read_frames()
                if not frames:
                    return
                for frame in frames:
                    _check(_unpack(frame)[2] == 1, "echo(1)")
                    counts["received"] += 1
                    window.release()
        except BaseException as exc:
            if not stop.is_set():
                errors.append(exc)
                stop.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (sender, receiver)]
    for t in threads:
        t.start()
    try:
        return count_for(lambda: counts["received"], s.duration, warmup)
    finally:
        stop.set()
        threads[0].join(SOCKET_TIMEOUT)
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while counts["received"] < counts["sent"] and time.monotonic() < deadline and not errors:
            time.sleep(0.001)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        threads[1].join(SOCKET_TIMEOUT)
        sock.close()
        if errors:
            raise errors[0]


def _blocking_client(port: int, s: Settings) -> Figures:
    fig = Figures(pipelined_mode=f"{WINDOW} in flight, 1 socket (sender + receiver thread)")
    with _blocking_connect(port) as sock:
        reader = _FrameReader(sock)
        next_id = 0

        def roundtrip(arg: Any) -> Any:
            nonlocal next_id
            next_id += 1
            _send_parts(sock, _frame_parts(_pack([CALL, next_id, "echo", [arg]])))
            (frame,) = reader.read_frames()
            return _unpack(frame)[2]

        if "seq" in s.measures:

            def one() -> None:
                _check(roundtrip(1) == 1, "echo(1)")

            fig.record("seq_calls_per_s", _repeat(s, lambda w: run_for(one, s.duration, w)))

        if "bulk" in s.measures:
            payload = _bulk_payload()
            _check(roundtrip(payload) == payload, "1 MiB payload")

            def big() -> None:
                _check(len(roundtrip(payload)) == BULK_SIZE, "1 MiB payload")

            fig.record("bulk_mb_per_s", _repeat(s, lambda w: run_for(big, s.duration, w)), BULK_SCALE)

    if "pipe" in s.measures:
        fig.record("pipelined_calls_per_s", _repeat(s, lambda w: _blocking_pipelined(port, s, w)))
    return fig


# -- Pyro5 -------------------------------------------------------------------------------------


def _pyro5_missing() -> str | None:
    if importlib.util.find_spec("Pyro5") is None:
        return "Pyro5 is not installed (pip install 'Pyro5>=5.15', the 'bench' extra): Pyro5 rows skipped"
    return None


def _pyro5_setup() -> Any:
    import Pyro5.api

    Pyro5.config.SERIALIZER = "msgpack"
    Pyro5.config.SERVERTYPE = "thread"
    Pyro5.config.COMMTIMEOUT = SOCKET_TIMEOUT
    return Pyro5.api


def _serve_pyro5() -> None:
    api = _pyro5_setup()

    @api.expose
    class EchoService:
        def echo(self, x: Any) -> Any:
            return x

    exit_on_sigterm()
    daemon = api.Daemon(host="127.0.0.1", port=0)
    daemon.register(EchoService, objectId="echo")
    announce_port(daemon.sock.getsockname()[1])
    daemon.requestLoop()


def _pyro5_threads(uri: str, s: Settings, warmup: float) -> Rate:
    api = _pyro5_setup()
    counts = [0] * PYRO_THREADS
    stop = threading.Event()
    ready = threading.Barrier(PYRO_THREADS + 1, timeout=CONNECT_TIMEOUT)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with api.Proxy(uri) as proxy:
                proxy._pyroBind()
                ready.wait()
                while not stop.is_set():
                    _check(proxy.echo(1) == 1, "echo(1)")
                    counts[i] += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(PYRO_THREADS)]
    for t in threads:
        t.start()
    try:
        ready.wait()
        return count_for(lambda: sum(counts), s.duration, warmup)
    finally:
        stop.set()
        for t in threads:
            t.join(SOCKET_TIMEOUT)
        if errors:
            raise errors[0]


def _pyro5_client(port: int, s: Settings) -> Figures:
    api = _pyro5_setup()
    uri = f"PYRO:echo@127.0.0.1:{port}"
    fig = Figures(pipelined_mode=f"{PYRO_THREADS} threads, 1 proxy each")
    with api.Proxy(uri) as proxy:
        proxy._pyroBind()
        if "seq" in s.measures:

            def one() -> None:
                _check(proxy.echo(1) == 1, "echo(1)")

            fig.record("seq_calls_per_s", _repeat(s, lambda w: run_for(one, s.duration, w)))

        if "bulk" in s.measures:
            payload = _bulk_payload()
            _check(proxy.echo(payload) == payload, "1 MiB payload")

            def big() -> None:
                _check(len(proxy.echo(payload)) == BULK_SIZE, "1 MiB payload")

            fig.record("bulk_mb_per_s", _repeat(s, lambda w: run_for(big, s.duration, w)), BULK_SCALE)

    if "pipe" in s.measures:
        fig.record("pipelined_calls_per_s", _repeat(s, lambda w: _pyro5_threads(uri, s, w)))
    return fig


# -- the implementations -----------------------------------------------------------------------


def _uvloop_missing() -> str | None:
    if importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed"
    return None


@dataclass(frozen=True)
class Impl:
    name: str
    serve: Callable[[], None]
    client: Callable[[int, Settings], Figures]
    missing: Callable[[], str | None] = lambda: None
    description: str = ""


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        Impl(
            "asyncdist-uvloop",
            lambda: _serve_asyncdist("uvloop"),
            _run_asyncdist_client("uvloop"),
            _uvloop_missing,
            "asyncdist serve/connect, server and client on uvloop",
        ),
        Impl(
            "asyncdist-asyncio",
            lambda: _serve_asyncdist("asyncio"),
            _run_asyncdist_client("asyncio"),
            description="the same on the default asyncio loop",
        ),
        Impl(
            "floor-uvloop",
            lambda: _serve_floor("uvloop"),
            _run_floor_client("uvloop"),
            _uvloop_missing,
            "asyncio floor: start_server/open_connection, readexactly, msgpack; uvloop",
        ),
        Impl(
            "floor-asyncio",
            lambda: _serve_floor("asyncio"),
            _run_floor_client("asyncio"),
            description="the same asyncio floor on the default loop",
        ),
        Impl(
            "blocking-floor",
            _serve_blocking,
            _blocking_client,
            description="blocking sockets, a thread per connection, recv_into a reused buffer",
        ),
        Impl(
            "pyro5",
            _serve_pyro5,
            _pyro5_client,
            _pyro5_missing,
            "Pyro5, thread server, msgpack serializer; (b) uses 8 client threads",
        ),
    )
}


@dataclass(frozen=True)
class RatioSpec:
    part: str  # "a", "b" or "c"
    metric: str  # a Figures field
    num: str
    den: str
    target: float | None  # None: informational

    @property
    def key(self) -> str:
        return f"{self.part}:{self.num}/{self.den}"


RATIOS = (
    RatioSpec("a", "seq_calls_per_s", "asyncdist-uvloop", "floor-uvloop", 0.8),
    RatioSpec("a", "seq_calls_per_s", "asyncdist-uvloop", "pyro5", 1.0),
    RatioSpec("b", "pipelined_calls_per_s", "asyncdist-uvloop", "floor-uvloop", 0.8),
    RatioSpec("b", "pipelined_calls_per_s", "asyncdist-uvloop", "pyro5", 3.0),
    RatioSpec("c", "bulk_mb_per_s", "asyncdist-uvloop", "pyro5", 1.0),
    RatioSpec("c", "bulk_mb_per_s", "asyncdist-uvloop", "floor-uvloop", 1.5),
    RatioSpec("a", "seq_calls_per_s", "asyncdist-asyncio", "floor-asyncio", None),
    RatioSpec("b", "pipelined_calls_per_s", "asyncdist-asyncio", "floor-asyncio", None),
    RatioSpec("c", "bulk_mb_per_s", "asyncdist-asyncio", "floor-asyncio", None),
    RatioSpec("a", "seq_calls_per_s", "asyncdist-uvloop", "blocking-floor", None),
    RatioSpec("b", "pipelined_calls_per_s", "asyncdist-uvloop", "blocking-floor", None),
    RatioSpec("c", "bulk_mb_per_s", "asyncdist-uvloop", "blocking-floor", None),
)


@dataclass
class Ratio:
    key: str
    part: str
    metric: str
    num: str
    den: str
    value: float | None
    target: float | None
    met: bool | None = field(default=None)


def compute_ratios(results: dict[str, Figures]) -> list[Ratio]:
    out = []
    for spec in RATIOS:
        num = getattr(results[spec.num], spec.metric) if spec.num in results else None
        den = getattr(results[spec.den], spec.metric) if spec.den in results else None
        value = num / den if num is not None and den else None
        met = None if value is None or spec.target is None else value >= spec.target
        out.append(Ratio(spec.key, spec.part, spec.metric, spec.num, spec.den, value, spec.target, met))
    return out


# -- running -----------------------------------------------------------------------------------


def select_impls(only: str | None) -> list[str]:
    """``--only`` names (comma-separated; a prefix like ``asyncdist`` selects every match)."""
    if not only:
        return list(IMPLS)
    chosen: list[str] = []
    for word in (w.strip() for w in only.split(",")):
        if not word:
            continue
        matches = [n for n in IMPLS if n.startswith(word)]
        if not matches:
            raise SystemExit(f"--only: unknown implementation {word!r}; choose from {', '.join(IMPLS)}")
        chosen.extend(m for m in matches if m not in chosen)
    return [n for n in IMPLS if n in chosen]


def server_argv(name: str, pin: int | None, profile_dir: str | None) -> list[str]:
    argv = [sys.executable]
    if profile_dir:
        argv += ["-m", "cProfile", "-o", os.path.join(profile_dir, f"{name}.prof")]
    argv += [os.path.abspath(__file__), "--serve", name]
    if pin is not None:
        argv += ["--pin", str(pin)]
    return argv


def run_one(name: str, s: Settings, pin: int | None, profile_dir: str | None) -> Figures:
    impl = IMPLS[name]
    reason = impl.missing()
    if reason:
        return Figures(error=f"skipped: {reason}")
    server = ServerProcess(name, server_argv(name, pin, profile_dir))
    try:
        with server:
            fig = impl.client(server.port, s)
        if not server.exited_cleanly:
            tail = server.stderr_tail(1500).strip()
            print(f"warning: {name} server exited with code {server.returncode}: {tail}", file=sys.stderr)
        return fig
    except Exception as exc:
        tail = server.stderr_tail(1500).strip()
        detail = f"{type(exc).__name__}: {exc}"
        if tail:
            detail += f"\n    server stderr: {tail}"
        return Figures(error=f"failed: {detail}")


def report(
    results: dict[str, Figures], ratios: list[Ratio], s: Settings, pin: int | None, elapsed: float
) -> None:
    mode = (
        f"pinned: the benchmark and every server share CPU {pin} (like taskset -c {pin})"
        if pin is not None
        else f"unpinned: client and server processes free to use the {len(os.sched_getaffinity(0))} CPUs"
    )
    v = versions(*VERSIONS_OF)
    print()
    print("asyncdist connection benchmark")
    print(f"mode: {mode}")
    print(
        f"each figure: best of {s.repeat} run(s) of {s.duration:g} s, {s.warmup:g} s warm-up first; "
        f"whole run {elapsed:.0f} s"
    )
    print(format_versions(v))
    print()
    headers = [
        "implementation",
        "(a) seq calls/s",
        "(b) calls/s",
        "(b) concurrency",
        "(c) 1 MiB echo MB/s, payload one way",
    ]
    rows = []
    for name, fig in results.items():
        rows.append(
            [
                name,
                fmt_number(fig.seq_calls_per_s),
                fmt_number(fig.pipelined_calls_per_s),
                fig.pipelined_mode if fig.pipelined_calls_per_s is not None else "",
                fmt_number(fig.bulk_mb_per_s),
            ]
        )
    print(format_table(headers, rows, "lrrlr"))
    print()
    for name in results:
        print(f"  {name:<18} {IMPLS[name].description}")
    errors = [(n, f.error) for n, f in results.items() if f.error]
    if errors:
        print()
        for name, err in errors:
            print(f"note: {name}: {err}")
    print()
    labels = {"a": "(a) sequential", "b": "(b) 64 in flight", "c": "(c) 1 MiB echo"}
    rrows = []
    for r in ratios:
        if r.value is None and (r.num not in results or r.den not in results):
            continue
        target = f">= {r.target:g}x" if r.target is not None else "info"
        met = "" if r.met is None else ("yes" if r.met else "NO")
        # Three decimals where two would round a miss up to the target (0.799 -> "0.80x ... NO").
        near = r.value is not None and r.target is not None and round(r.value, 2) >= r.target > r.value
        rrows.append(
            [labels[r.part], f"{r.num} / {r.den}", fmt_number(r.value, 3 if near else 2) + "x", target, met]
        )
    if rrows:
        print(format_table(["measure", "ratio", "value", "target", "met"], rrows, "llrll"))
        print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 2, --quick 0.3)")
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each (default 0.5, quick 0.1)"
    )
    parser.add_argument(
        "--repeat", type=int, help="runs per measurement, the best is kept (default 2, --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke-test run")
    parser.add_argument("--pin", type=int, metavar="CPU", help="pin the benchmark and every server to CPU")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(IMPLS)}")
    parser.add_argument(
        "--measure", default="seq,pipe,bulk", help="comma-separated subset of seq,pipe,bulk (default all)"
    )
    parser.add_argument(
        "--profile-server", metavar="DIR", help="run each server under cProfile, DIR/NAME.prof"
    )
    parser.add_argument("--serve", choices=list(IMPLS), help=argparse.SUPPRESS)  # internal: be a server
    args = parser.parse_args(argv)

    if args.serve:
        if args.pin is not None:
            pin_to_cpu(args.pin)
        exit_when_parent_exits()
        IMPLS[args.serve].serve()
        return 0

    measures = frozenset(m.strip() for m in args.measure.split(",") if m.strip())
    if not measures or not measures <= set(MEASURES):
        parser.error(f"--measure takes a comma-separated subset of {','.join(MEASURES)}")
    duration = args.duration if args.duration is not None else (0.3 if args.quick else 2.0)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else min(0.5, duration / 4))
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    if duration <= 0 or warmup < 0 or repeat < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    settings = Settings(duration, warmup, repeat, measures)
    names = select_impls(args.only)
    if args.profile_server:
        os.makedirs(args.profile_server, exist_ok=True)
    if args.pin is not None:
        pin_to_cpu(args.pin)
    exit_on_sigterm()  # SIGTERM unwinds through the finally blocks that stop the servers

    started = time.monotonic()
    results: dict[str, Figures] = {}
    try:
        for name in names:
            print(f"{name}: measuring ...", file=sys.stderr, flush=True)
            fig = results[name] = run_one(name, settings, args.pin, args.profile_server)
            summary = (
                f"  (a) {fmt_number(fig.seq_calls_per_s)} calls/s,"
                f" (b) {fmt_number(fig.pipelined_calls_per_s)} calls/s,"
                f" (c) {fmt_number(fig.bulk_mb_per_s)} MB/s"
            )
            print(summary + (f"  [{fig.error}]" if fig.error else ""), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: every server was stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    ratios = compute_ratios(results)
    report(results, ratios, settings, args.pin, elapsed)
    emit_json(
        {
            "benchmark": "bench_connection",
            "mode": "pinned" if args.pin is not None else "unpinned",
            "pin_cpu": args.pin,
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "repeat": settings.repeat,
            "measures": sorted(settings.measures),
            "units": {
                "seq_calls_per_s": "sequential echo(1) round trips per second",
                "pipelined_calls_per_s": "echo(1) calls per second, concurrency per pipelined_mode",
                "bulk_mb_per_s": "1 MiB bytes echo, payload bytes one way per second / 1e6",
            },
            "versions": versions(*VERSIONS_OF),
            "elapsed_s": round(elapsed, 1),
            "results": {name: asdict(fig) for name, fig in results.items()},
            "ratios": {r.key: asdict(r) for r in ratios},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
