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

import asyncio
import contextlib
import functools
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from _harness import (
    CONNECT_TIMEOUT,
    EchoBenchmark,
    EchoFigures,
    EchoSettings,
    Impl,
    Rate,
    RatioSpec,
    acount_for,
    ameasure_echo,
    announce_port,
    by_name,
    check,
    count_for,
    echo_tasks,
    exit_on_sigterm,
    measure_echo,
    pyro5_echo_client,
    requires,
    run_async,
    serve_pyro5_echo,
    stop_tasks,
    wait_for_termination,
)

WINDOW = 64  # calls in flight for (b)
PYRO_THREADS = 8  # Pyro5's stand-in for (b)
SOCKET_TIMEOUT = 15.0
# Message kinds, the same numbers as asyncdist.protocol: the floors send messages of the same shape.
CALL = 1
REPLY = 3
_header = struct.Struct(">I")
_pack = msgpack.packb
_unpack = msgpack.unpackb


def _echo(x: Any) -> Any:
    return x


ECHO_HANDLERS: dict[str, Callable[..., Any]] = {"echo": _echo}


@dataclass
class Figures(EchoFigures, many="pipelined", measure="pipe"):
    """The three results of one implementation; (b) is pipelined_calls_per_s."""

    pipelined_calls_per_s: float | None = None
    pipelined_mode: str = ""


# -- asyncdist ---------------------------------------------------------------------------------


async def _asyncdist_client(port: int, s: EchoSettings) -> Figures:
    import asyncdist

    fig = Figures(pipelined_mode=f"{WINDOW} in flight, 1 connection")
    async with asyncio.timeout(CONNECT_TIMEOUT):
        conn = await asyncdist.connect("127.0.0.1", port)
    try:
        echo = functools.partial(conn.call, "echo")
        await ameasure_echo(fig, s, echo, echo_tasks(echo, WINDOW, s))
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


def _run_asyncdist_client(loop: str) -> Callable[[int, EchoSettings], Figures]:
    def client(port: int, s: EchoSettings) -> Figures:
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


async def _floor_client(port: int, s: EchoSettings) -> Figures:
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
                check(_unpack(await reader.readexactly(n))[2] == 1, "echo(1)")
                received += 1
                window.release()

        send_task = asyncio.create_task(sender())
        recv_task = asyncio.create_task(receiver())
        try:
            return await acount_for(lambda: received, s.duration, warmup)
        finally:
            stop.set()
            window.release()  # wake the sender if it waits for a slot
            await stop_tasks([send_task])
            # Read the replies still in flight, so the next measurement starts clean.
            async with asyncio.timeout(15):
                while received < sent and not recv_task.done():
                    await asyncio.sleep(0.0005)
            recv_task.cancel()
            await asyncio.wait([recv_task])
            exc = None if recv_task.cancelled() else recv_task.exception()
            if exc is not None:
                raise exc

    try:
        await ameasure_echo(fig, s, roundtrip, pipelined)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                await writer.wait_closed()
    return fig


def _run_floor_client(loop: str) -> Callable[[int, EchoSettings], Figures]:
    def client(port: int, s: EchoSettings) -> Figures:
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


def _blocking_pipelined(port: int, s: EchoSettings, warmup: float) -> Rate:
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
                    check(_unpack(frame)[2] == 1, "echo(1)")
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


def _blocking_client(port: int, s: EchoSettings) -> Figures:
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

        measure_echo(fig, s, roundtrip)  # (a) and (c) on this socket, (b) on one of its own
    measure_echo(fig, s, None, lambda w: _blocking_pipelined(port, s, w))
    return fig


# -- Pyro5 -------------------------------------------------------------------------------------


def _pyro5_setup() -> Any:
    import Pyro5.api

    Pyro5.config.SERIALIZER = "msgpack"
    Pyro5.config.SERVERTYPE = "thread"
    Pyro5.config.COMMTIMEOUT = SOCKET_TIMEOUT
    return Pyro5.api


def _serve_pyro5() -> None:
    serve_pyro5_echo(_pyro5_setup(), "echo", instance=False)


def _pyro5_client(port: int, s: EchoSettings) -> Figures:
    fig = Figures(pipelined_mode=f"{PYRO_THREADS} threads, 1 proxy each")
    uri = f"PYRO:echo@127.0.0.1:{port}"
    return pyro5_echo_client(_pyro5_setup(), uri, s, fig, PYRO_THREADS, many_apart=True)


# -- the implementations -----------------------------------------------------------------------

_uvloop_missing = requires("uvloop", "uvloop is not installed")
_pyro5_missing = requires(
    "Pyro5", "Pyro5 is not installed (pip install 'Pyro5>=5.15', the 'bench' extra): Pyro5 rows skipped"
)

IMPLS = by_name(
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

BENCHMARK = EchoBenchmark(
    sys.modules[__name__],
    Figures,
    IMPLS,
    title="asyncdist connection benchmark",
    many_label=f"(b) {WINDOW} in flight",
    ratios=(
        RatioSpec("a", "asyncdist-uvloop", "floor-uvloop", 0.8),
        RatioSpec("a", "asyncdist-uvloop", "pyro5", 1.0),
        RatioSpec("b", "asyncdist-uvloop", "floor-uvloop", 0.8),
        RatioSpec("b", "asyncdist-uvloop", "pyro5", 3.0),
        RatioSpec("c", "asyncdist-uvloop", "pyro5", 1.0),
        RatioSpec("c", "asyncdist-uvloop", "floor-uvloop", 1.5),
        RatioSpec("a", "asyncdist-asyncio", "floor-asyncio", None),
        RatioSpec("b", "asyncdist-asyncio", "floor-asyncio", None),
        RatioSpec("c", "asyncdist-asyncio", "floor-asyncio", None),
        RatioSpec("a", "asyncdist-uvloop", "blocking-floor", None),
        RatioSpec("b", "asyncdist-uvloop", "blocking-floor", None),
        RatioSpec("c", "asyncdist-uvloop", "blocking-floor", None),
    ),
    units={
        "seq_calls_per_s": "sequential echo(1) round trips per second",
        "pipelined_calls_per_s": "echo(1) calls per second, concurrency per pipelined_mode",
    },
)


def main(argv: Sequence[str] | None = None) -> int:
    return BENCHMARK.main(argv)


if __name__ == "__main__":
    sys.exit(main())
