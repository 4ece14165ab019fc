"""``@csp.multiprocess``: a CSP process in a child OS process, its channel ends moved there.

The parent serves the channels of the ends it gives (its loop's channel
server, started on first need), encodes the function and arguments (ends
as mobile ends, the rest by cloudpickle: the pipe is private to the two
processes) and writes them to the child's stdin. The child
(``python -m asyncdist.csp._multi FD``) runs the process with the usual
poison/retire propagation over its networked ends, closes its links (so
its last writes arrive), and writes its outcome to the pipe ``FD``. Its
stdout and stderr are the parent's. The child exits when its stdin closes
(the parent ended or died); the parent always reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Any

from ..codec import Codec
from ..errors import RemoteError
from . import _trace
from ._channel import Channel, ChannelEnd
from ._net import deferred_effects, host_here, shutdown
from ._process import Process

__all__ = ["run_separately"]

_STOP_TIMEOUT = 5.0


def _codec() -> Codec:
    return Codec(accept_pickle="load", send_pickle=True)


async def _encode(proc: Process) -> bytes:
    ends = proc.channel_ends()
    if any(isinstance(e, Channel) for e in ends):
        raise TypeError("give a multiprocess channel ends (channel.reader(), channel.writer()), not channels")
    if any(isinstance(e, ChannelEnd) and e._link is None for e in ends):
        await host_here()
    with deferred_effects() as effects:
        payload = _codec().encode([proc.func, list(proc.args), proc.kwargs])
    for action in effects:
        action()
    # The ends now belong to the child: the parent's copies leave (the ends in transit hold the places).
    for end in ends:
        if isinstance(end, ChannelEnd) and end._active:
            end._active = False
            if end._link is not None:
                end._link.send("csp.retire", end.channel.name, end.kind)
            else:
                end._home.leave(end.kind)
    return payload


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    tracer = _trace.tracer
    if tracer is not None:
        env["ASYNCDIST_CSP_TRACE"] = tracer.file.name
    return env


async def run_separately(proc: Process) -> Any:
    """Run ``proc`` in a child Python process; return its result or raise its failure."""
    payload = await _encode(proc)
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "asyncdist.csp._multi",
            str(write_fd),
            stdin=asyncio.subprocess.PIPE,
            pass_fds=(write_fd,),
            env=_child_env(),
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    try:
        assert child.stdin is not None
        child.stdin.write(len(payload).to_bytes(8, "big") + payload)
        await child.stdin.drain()
        outcome = await reader.read()
        await child.wait()
    finally:
        transport.close()
        await _reap(child)
    if not outcome:
        raise RemoteError(
            "asyncdist.csp.ChildDied",
            f"the multiprocess child running {proc.name} (pid {child.pid}) exited with {child.returncode} "
            "before reporting its outcome",
        )
    status, value, text = _codec().decode(outcome)
    if status == "ok":
        return value
    exc = value if isinstance(value, BaseException) else RemoteError("?", str(value), text)
    exc.add_note(f"raised in the multiprocess child (pid {child.pid}) running {proc.name}:\n{text}")
    raise exc


async def _reap(child: asyncio.subprocess.Process) -> None:
    """Close the child's stdin (it exits), then SIGTERM, then SIGKILL; always wait for it."""
    if child.stdin is not None:
        child.stdin.close()
    waiter = asyncio.ensure_future(child.wait())
    try:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if child.returncode is not None:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)
            await asyncio.wait((waiter,), timeout=_STOP_TIMEOUT if sig != signal.SIGKILL else None)
    finally:
        if not waiter.done():  # cancelled while reaping: kill it (asyncio's child watcher reaps it)
            waiter.cancel()
            with contextlib.suppress(ProcessLookupError):
                child.kill()


# -- the child ---------------------------------------------------------------------------------


async def _child_main(payload: bytes) -> tuple[str, Any, str]:
    func, args, kwargs = _codec().decode(payload)
    try:
        result = await Process(func, tuple(args), kwargs).run()
        return "ok", result, ""
    except BaseException as exc:
        return "err", exc, "".join(traceback.format_exception(exc))
    finally:
        await shutdown()


def _watch_stdin() -> None:
    """Exit at once when stdin closes: the parent ended or died."""
    while True:
        try:
            if not os.read(0, 65536):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os._exit(70)


def _read_exactly(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit(70)  # the parent went away before sending the process
        data += chunk
    return data


def main() -> None:
    from ..loop import run

    fd = int(sys.argv[1])
    size = int.from_bytes(_read_exactly(8), "big")
    payload = _read_exactly(size)
    threading.Thread(target=_watch_stdin, name="csp-stdin-watch", daemon=True).start()
    trace_path = os.environ.get("ASYNCDIST_CSP_TRACE")
    if trace_path:
        _trace.TraceInit(trace_path)
    status, value, text = run(_child_main(payload))
    if trace_path:
        _trace.TraceQuit()
    codec = _codec()
    try:
        outcome = codec.encode([status, value, text])
    except Exception as exc:  # the result or exception does not pickle
        outcome = codec.encode(
            ["err", f"{type(value).__name__}: {value} (and it could not be sent: {exc})", text]
        )
    with os.fdopen(fd, "wb") as out:
        out.write(outcome)
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main()
