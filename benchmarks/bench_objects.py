"""Remote objects benchmark: asyncdist Daemon/Proxy against Pyro5's thread and multiplex servers.

For each implementation the daemon runs in its own subprocess (127.0.0.1,
port 0) and the client runs in this process. Three figures each, all calls
``proxy.echo(x)`` on a registered object whose ``echo`` returns its argument:

(a) sequential round trips per second: one caller, ``echo(1)``, one call at a time;
(b) calls per second with 8 callers: asyncdist runs 8 tasks sharing ONE proxy (so one
    connection), each ``await proxy.echo(1)`` in a loop; Pyro5 runs 8 client threads,
    each with its own proxy (so 8 connections), one call at a time each;
(c) 1 MiB ``bytes`` echo, sequential: payload bytes per second ONE WAY,
    N * 1 MiB / elapsed, in MB/s (1 MB = 10**6 bytes).

Implementations (``--only`` takes these names, or a prefix such as ``pyro5``):

asyncdist-async    asyncdist.Daemon serving an object whose echo is ``async def`` (runs on the
                   daemon's event loop); client: asyncdist.Proxy, ``await proxy.echo(x)``.
                   Daemon and client both on uvloop (asyncdist.run)
asyncdist-plain    the same with a plain ``def echo`` (runs in the daemon's thread pool)
pyro5-thread       Pyro5, SERVERTYPE "thread", SERIALIZER "msgpack" on both sides (1 MiB
                   ``bytes`` travel as msgpack bin, checked), an exposed object registered by
                   instance; Pyro5's other settings are left at their defaults
pyro5-multiplex    the same with SERVERTYPE "multiplex" (one thread, select-based)

"Pyro5 best" is, for each figure, the better of the two Pyro5 servers; the
ratios of asyncdist against it are printed next to their targets. The last
line of stdout is one JSON object with the mode, every figure and every
ratio. Each figure is the best of ``--repeat`` runs (default 3) of
``--duration`` seconds (default 2), after ``--warmup`` seconds (default 0.5;
0.1 s before the later runs); every run is in the JSON. Before the first
figure, one short pass of the first implementation is run and discarded
(``--no-process-warmup`` skips it): without it, whichever implementation is
measured first in this process moves 1 MiB payloads 10-20 % slower than the
same one measured later, which would handicap asyncdist (measured first).

Run from the repository root::

    .venv/bin/python benchmarks/bench_objects.py              # about 1.5 minutes
    .venv/bin/python benchmarks/bench_objects.py --pin 0      # everything shares CPU 0
    .venv/bin/python benchmarks/bench_objects.py --quick      # smoke test, a few seconds
    .venv/bin/python benchmarks/bench_objects.py --only asyncdist --measure seq,conc
    # cProfile each daemon (one .prof file per implementation):
    .venv/bin/python benchmarks/bench_objects.py --only asyncdist-plain --measure seq \\
        --profile-server /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
    run_for,
    versions,
    wait_for_termination,
)

#: Packages whose versions each report names.
VERSIONS_OF = ("asyncdist", "uvloop", "msgpack", "Pyro5")

CONCURRENCY = 8  # callers for (b): tasks on one proxy (asyncdist), threads with a proxy each (Pyro5)
BULK_SIZE = 1 << 20  # (c) payload: 1 MiB
MB = 1e6
BULK_SCALE = BULK_SIZE / MB  # calls/s -> MB/s of payload one way
OBJECT_ID = "echo"
CONNECT_TIMEOUT = 15.0
MEASURES = ("seq", "conc", "bulk")
PYRO5 = ("pyro5-thread", "pyro5-multiplex")
PYRO5_BEST = "pyro5 best"


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
    concurrent_calls_per_s: float | None = None
    concurrent_mode: str = ""
    bulk_mb_per_s: float | None = None
    error: str | None = None
    #: Every run of each figure, in the figure's unit (the figure is the best).
    runs: dict[str, list[float]] = field(default_factory=dict)

    def record(self, metric: str, rates: Sequence[Rate], scale: float = 1.0) -> None:
        values = [r.per_second * scale for r in rates]
        self.runs[metric] = [round(v, 1) for v in values]
        setattr(self, metric, best(rates).per_second * scale)


METRICS = ("seq_calls_per_s", "concurrent_calls_per_s", "bulk_mb_per_s")


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


def _serve_asyncdist(kind: str) -> None:
    import asyncdist

    if kind == "async":

        @asyncdist.expose
        class AsyncEcho:
            async def echo(self, x: Any) -> Any:
                return x

        obj: object = AsyncEcho()
    else:

        @asyncdist.expose
        class PlainEcho:
            def echo(self, x: Any) -> Any:
                return x

        obj = PlainEcho()

    async def main() -> None:
        daemon = await asyncdist.Daemon(host="127.0.0.1", port=0)
        try:
            daemon.register(obj, OBJECT_ID)
            announce_port(daemon.port)
            await wait_for_termination()
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await daemon.aclose()

    asyncdist.run(main(), loop="uvloop")


async def _asyncdist_client(port: int, s: Settings) -> Figures:
    import asyncdist

    fig = Figures(concurrent_mode=f"{CONCURRENCY} tasks, 1 proxy")
    proxy = asyncdist.Proxy(f"adist:{OBJECT_ID}@127.0.0.1:{port}", connect_attempts=1)
    async with asyncio.timeout(CONNECT_TIMEOUT):
        await proxy._connect()
    try:
        if "seq" in s.measures:

            async def one() -> None:
                _check(await proxy.echo(1) == 1, "echo(1)")

            fig.record("seq_calls_per_s", await _arepeat(s, lambda w: arun_for(one, s.duration, w)))

        if "conc" in s.measures:

            async def concurrent(warmup: float) -> Rate:
                done = 0
                stop = False

                async def worker() -> None:
                    nonlocal done
                    while not stop:
                        _check(await proxy.echo(1) == 1, "echo(1)")
                        done += 1

                tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
                try:
                    return await acount_for(lambda: done, s.duration, warmup)
                finally:
                    stop = True
                    await _stop_tasks(tasks)

            fig.record("concurrent_calls_per_s", await _arepeat(s, concurrent))

        if "bulk" in s.measures:
            payload = _bulk_payload()
            _check(await proxy.echo(payload) == payload, "1 MiB payload")

            async def big() -> None:
                _check(len(await proxy.echo(payload)) == BULK_SIZE, "1 MiB payload")

            fig.record("bulk_mb_per_s", await _arepeat(s, lambda w: arun_for(big, s.duration, w)), BULK_SCALE)
    finally:
        async with asyncio.timeout(15):
            await proxy._release()
    return fig


def _run_asyncdist_client(port: int, s: Settings) -> Figures:
    import asyncdist

    return asyncdist.run(_asyncdist_client(port, s), loop="uvloop")


def _uvloop_missing() -> str | None:
    if importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed"
    return None


# -- Pyro5 -------------------------------------------------------------------------------------


def _pyro5_missing() -> str | None:
    if importlib.util.find_spec("Pyro5") is None:
        return "Pyro5 is not installed (pip install 'Pyro5>=5.15', the 'bench' extra)"
    return None


def _pyro5_setup(servertype: str = "thread") -> Any:
    import Pyro5
    import Pyro5.api

    Pyro5.config.SERIALIZER = "msgpack"
    Pyro5.config.SERVERTYPE = servertype
    return Pyro5.api


def _serve_pyro5(servertype: str) -> None:
    api = _pyro5_setup(servertype)

    @api.expose
    class EchoService:
        def echo(self, x: Any) -> Any:
            return x

    exit_on_sigterm()
    daemon = api.Daemon(host="127.0.0.1", port=0)
    try:
        daemon.register(EchoService(), objectId=OBJECT_ID)
        announce_port(daemon.sock.getsockname()[1])
        daemon.requestLoop()
    finally:
        daemon.close()


def _pyro5_threads(uri: str, s: Settings, warmup: float) -> Rate:
    api = _pyro5_setup()
    counts = [0] * CONCURRENCY
    stop = threading.Event()
    ready = threading.Barrier(CONCURRENCY + 1, timeout=CONNECT_TIMEOUT)
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

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    try:
        ready.wait()
        return count_for(lambda: sum(counts), s.duration, warmup)
    finally:
        stop.set()
        for t in threads:
            t.join(CONNECT_TIMEOUT)
        if errors:
            raise errors[0]


def _pyro5_client(port: int, s: Settings) -> Figures:
    api = _pyro5_setup()
    uri = f"PYRO:{OBJECT_ID}@127.0.0.1:{port}"
    fig = Figures(concurrent_mode=f"{CONCURRENCY} threads, 1 proxy each")
    with api.Proxy(uri) as proxy:
        proxy._pyroBind()
        if "seq" in s.measures:

            def one() -> None:
                _check(proxy.echo(1) == 1, "echo(1)")

            fig.record("seq_calls_per_s", _repeat(s, lambda w: run_for(one, s.duration, w)))

        if "conc" in s.measures:
            fig.record("concurrent_calls_per_s", _repeat(s, lambda w: _pyro5_threads(uri, s, w)))

        if "bulk" in s.measures:
            payload = _bulk_payload()
            echoed = proxy.echo(payload)
            # msgpack carries bytes as bin: they must come back as the same bytes object type.
            _check(type(echoed) is bytes and echoed == payload, "1 MiB payload (msgpack bytes)")

            def big() -> None:
                _check(len(proxy.echo(payload)) == BULK_SIZE, "1 MiB payload")

            fig.record("bulk_mb_per_s", _repeat(s, lambda w: run_for(big, s.duration, w)), BULK_SCALE)
    return fig


# -- the implementations -----------------------------------------------------------------------


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
            "asyncdist-async",
            lambda: _serve_asyncdist("async"),
            _run_asyncdist_client,
            _uvloop_missing,
            "asyncdist Daemon/Proxy, `async def echo` (on the daemon's loop); uvloop both sides",
        ),
        Impl(
            "asyncdist-plain",
            lambda: _serve_asyncdist("plain"),
            _run_asyncdist_client,
            _uvloop_missing,
            "asyncdist Daemon/Proxy, plain `def echo` (in the daemon's thread pool); uvloop",
        ),
        Impl(
            "pyro5-thread",
            lambda: _serve_pyro5("thread"),
            _pyro5_client,
            _pyro5_missing,
            "Pyro5, thread server, msgpack serializer; (b) uses 8 client threads",
        ),
        Impl(
            "pyro5-multiplex",
            lambda: _serve_pyro5("multiplex"),
            _pyro5_client,
            _pyro5_missing,
            "Pyro5, multiplex server, msgpack serializer; (b) uses 8 client threads",
        ),
    )
}


def pyro5_best(results: dict[str, Figures]) -> dict[str, tuple[float, str]]:
    """For each metric, the better Pyro5 server's figure and that server's name."""
    out: dict[str, tuple[float, str]] = {}
    for metric in METRICS:
        found = [
            (value, name)
            for name in PYRO5
            if name in results and (value := getattr(results[name], metric)) is not None
        ]
        if found:
            out[metric] = max(found)
    return out


@dataclass(frozen=True)
class RatioSpec:
    part: str  # "a", "b" or "c"
    metric: str  # a Figures field
    num: str
    den: str  # an implementation or PYRO5_BEST
    target: float | None  # None: informational

    @property
    def key(self) -> str:
        return f"{self.part}:{self.num}/{self.den}"


RATIOS = (
    RatioSpec("a", "seq_calls_per_s", "asyncdist-async", PYRO5_BEST, 1.0),
    RatioSpec("b", "concurrent_calls_per_s", "asyncdist-async", PYRO5_BEST, 2.0),
    RatioSpec("c", "bulk_mb_per_s", "asyncdist-async", PYRO5_BEST, 1.0),
    RatioSpec("a", "seq_calls_per_s", "asyncdist-plain", PYRO5_BEST, 0.8),
    RatioSpec("b", "concurrent_calls_per_s", "asyncdist-plain", PYRO5_BEST, None),
    RatioSpec("c", "bulk_mb_per_s", "asyncdist-plain", PYRO5_BEST, None),
    RatioSpec("a", "seq_calls_per_s", "asyncdist-plain", "asyncdist-async", None),
    RatioSpec("b", "concurrent_calls_per_s", "asyncdist-plain", "asyncdist-async", None),
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
    met: bool | None = None
    #: For a PYRO5_BEST denominator: the Pyro5 server that gave it.
    den_source: str | None = None


def compute_ratios(results: dict[str, Figures]) -> list[Ratio]:
    best_pyro = pyro5_best(results)
    out = []
    for spec in RATIOS:
        source = None
        num = getattr(results[spec.num], spec.metric) if spec.num in results else None
        if spec.den == PYRO5_BEST:
            den, source = best_pyro.get(spec.metric, (None, None))
        else:
            den = getattr(results[spec.den], spec.metric) if spec.den in results else None
        value = num / den if num is not None and den else None
        met = None if value is None or spec.target is None else value >= spec.target
        out.append(
            Ratio(spec.key, spec.part, spec.metric, spec.num, spec.den, value, spec.target, met, source)
        )
    return out


# -- running -----------------------------------------------------------------------------------


def select_impls(only: str | None) -> list[str]:
    """``--only`` names (comma-separated; a prefix like ``pyro5`` selects every match)."""
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
        f"pinned: the benchmark and every daemon share CPU {pin} (like taskset -c {pin})"
        if pin is not None
        else f"unpinned: client and daemon processes free to use the {len(os.sched_getaffinity(0))} CPUs"
    )
    print()
    print("asyncdist remote objects benchmark")
    print(f"mode: {mode}")
    print(
        f"each figure: best of {s.repeat} run(s) of {s.duration:g} s, {s.warmup:g} s warm-up first; "
        f"whole run {elapsed:.0f} s"
    )
    print(format_versions(versions(*VERSIONS_OF)))
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
                fmt_number(fig.concurrent_calls_per_s),
                fig.concurrent_mode if fig.concurrent_calls_per_s is not None else "",
                fmt_number(fig.bulk_mb_per_s),
            ]
        )
    best_pyro = pyro5_best(results)
    if best_pyro:

        def cell(metric: str) -> str:
            if metric not in best_pyro:
                return "n/a"
            value, source = best_pyro[metric]
            return f"{fmt_number(value)} ({source.removeprefix('pyro5-')})"

        rows.append(
            [
                PYRO5_BEST,
                cell("seq_calls_per_s"),
                cell("concurrent_calls_per_s"),
                f"{CONCURRENCY} threads" if "concurrent_calls_per_s" in best_pyro else "",
                cell("bulk_mb_per_s"),
            ]
        )
    print(format_table(headers, rows, "lrrlr"))
    print()
    for name in results:
        print(f"  {name:<16} {IMPLS[name].description}")
    if best_pyro:
        print(f"  {PYRO5_BEST:<16} per column, the better of the two Pyro5 servers (named)")
    errors = [(n, f.error) for n, f in results.items() if f.error]
    if errors:
        print()
        for name, err in errors:
            print(f"note: {name}: {err}")
    print()
    labels = {
        "a": "(a) sequential",
        "b": f"(b) {CONCURRENCY} concurrent",
        "c": "(c) 1 MiB echo",
    }
    rrows = []
    for r in ratios:
        den_known = r.den_source is not None if r.den == PYRO5_BEST else r.den in results
        if r.value is None and (r.num not in results or not den_known):
            continue
        target = f">= {r.target:g}x" if r.target is not None else "info"
        met = "" if r.met is None else ("yes" if r.met else "NO")
        # Three decimals where two would round a miss up to the target (0.799 -> "0.80x ... NO").
        near = r.value is not None and r.target is not None and round(r.value, 2) >= r.target > r.value
        den = f"{r.den} ({r.den_source.removeprefix('pyro5-')})" if r.den_source else r.den
        rrows.append(
            [labels[r.part], f"{r.num} / {den}", fmt_number(r.value, 3 if near else 2) + "x", target, met]
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
        "--repeat", type=int, help="runs per measurement, the best is kept (default 3, --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke-test run")
    parser.add_argument("--pin", type=int, metavar="CPU", help="pin the benchmark and every daemon to CPU")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(IMPLS)}")
    parser.add_argument(
        "--measure", default="seq,conc,bulk", help="comma-separated subset of seq,conc,bulk (default all)"
    )
    parser.add_argument(
        "--profile-server", metavar="DIR", help="run each daemon under cProfile, DIR/NAME.prof"
    )
    parser.add_argument(
        "--no-process-warmup",
        action="store_true",
        help="skip the discarded pass of the first implementation before the measured ones",
    )
    parser.add_argument("--serve", choices=list(IMPLS), help=argparse.SUPPRESS)  # internal: be a daemon
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
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if duration <= 0 or warmup < 0 or repeat < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    settings = Settings(duration, warmup, repeat, measures)
    names = select_impls(args.only)
    if args.profile_server:
        os.makedirs(args.profile_server, exist_ok=True)
    if args.pin is not None:
        pin_to_cpu(args.pin)
    exit_on_sigterm()  # SIGTERM unwinds through the finally blocks that stop the daemons

    started = time.monotonic()
    results: dict[str, Figures] = {}
    try:
        if not args.no_process_warmup:
            # The first implementation measured in a process moves 1 MiB payloads 10-20 % slower
            # than the ones after it (client-process state, whichever peer goes first), so one
            # short pass of the first implementation is run and discarded before any figure.
            print(f"process warm-up: {names[0]}, discarded ...", file=sys.stderr, flush=True)
            warm = Settings(min(duration, 1.0), warmup, 1, measures)
            discarded = run_one(names[0], warm, args.pin, None)
            if discarded.error:
                print(f"  [{discarded.error}]", file=sys.stderr, flush=True)
        for name in names:
            print(f"{name}: measuring ...", file=sys.stderr, flush=True)
            fig = results[name] = run_one(name, settings, args.pin, args.profile_server)
            summary = (
                f"  (a) {fmt_number(fig.seq_calls_per_s)} calls/s,"
                f" (b) {fmt_number(fig.concurrent_calls_per_s)} calls/s,"
                f" (c) {fmt_number(fig.bulk_mb_per_s)} MB/s"
            )
            print(summary + (f"  [{fig.error}]" if fig.error else ""), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: every daemon was stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    ratios = compute_ratios(results)
    report(results, ratios, settings, args.pin, elapsed)
    best_pyro = pyro5_best(results)
    emit_json(
        {
            "benchmark": "bench_objects",
            "mode": "pinned" if args.pin is not None else "unpinned",
            "pin_cpu": args.pin,
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "repeat": settings.repeat,
            "measures": sorted(settings.measures),
            "process_warmup": None if args.no_process_warmup else names[0],
            "units": {
                "seq_calls_per_s": "sequential proxy.echo(1) round trips per second",
                "concurrent_calls_per_s": "proxy.echo(1) calls per second, callers per concurrent_mode",
                "bulk_mb_per_s": "1 MiB bytes echo, payload bytes one way per second / 1e6",
            },
            "versions": versions(*VERSIONS_OF),
            "elapsed_s": round(elapsed, 1),
            "results": {name: asdict(fig) for name, fig in results.items()},
            "pyro5_best": {m: {"value": v, "server": src} for m, (v, src) in best_pyro.items()},
            "ratios": {r.key: asdict(r) for r in ratios},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
