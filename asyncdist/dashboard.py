"""A live web dashboard of a futures broker (and a MapReduce master), and its text twin.

::

    async with Dashboard("127.0.0.1:5555", secret=..., master="127.0.0.1:7878") as dash:
        print(dash.url)                       # http://127.0.0.1:8787/
        await asyncio.Event().wait()

    asyncdist dashboard --broker H:P [--port 8787] [--master H:P]     # the same, from the shell
    asyncdist status --broker H:P [--master H:P] [--json]             # one look, as a table

:class:`Dashboard` samples the broker's ``status`` (and the master's
``mr.status``) every ``interval`` seconds into a bounded history, and serves
(aiohttp, the only module of asyncdist that imports it) a self-contained page
at ``/`` — its own script draws the charts as inline SVG, nothing is loaded
from elsewhere — and the same data as JSON at ``/api/status``. Tasks per
second are differences of the broker's ``completed`` counter between samples.

The page has no authentication: it binds 127.0.0.1 by default, and another
address must be asked for with ``insecure=True`` (``--insecure``). On a
loopback address it also refuses requests whose ``Host`` header is not a
loopback name (DNS rebinding), and its Content-Security-Policy allows only
its own inline script, its own style and requests to itself.

An unreachable broker (or master) never stops the server: the page and the
JSON say so, keep the last state seen, and recover when it is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import secrets
import ssl as _ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._log import get_logger
from ._version import __version__
from .connection import Connection, connect, parse_address
from .errors import ConfigurationError, ConnectError, ProtocolError
from .security import is_loopback, resolve_secret

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["Dashboard", "StatusSource", "fetch_status", "format_status"]

log = get_logger("asyncdist.dashboard")

#: An async callable returning a status dict (``Broker.status()`` or ``mr.status``).
StatusSource = Callable[[], Awaitable[Mapping[str, Any]]]

#: Samples over which the headline tasks/s is measured (the chart shows each interval).
RATE_WINDOW = 5


# -- sources --------------------------------------------------------------------------------------


class _Remote:
    """A connection to a broker or master, (re)made when needed, that answers one status call."""

    def __init__(
        self,
        address: str,
        method: str,
        default_port: int | None,
        *,
        secret: bytes | None,
        ssl: _ssl.SSLContext | None,
        timeout: float,
        options: Mapping[str, Any],
    ) -> None:
        self.host, self.port = parse_address(address, default_port)
        self.address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.method = method
        self.secret = secret
        self.ssl = ssl
        self.timeout = timeout
        self.options = {"handshake_timeout": timeout, **options}
        self.conn: Connection | None = None

    async def __call__(self) -> dict[str, Any]:
        conn = self.conn
        if conn is None or conn.closed:
            self.conn = None
            conn = await connect(self.host, self.port, secret=self.secret, ssl=self.ssl, **self.options)
            self.conn = conn
        result = await conn.call(self.method, timeout=self.timeout)
        if not isinstance(result, dict):
            raise ProtocolError(
                f"{self.method} at {self.address} answered {type(result).__name__}, not a map"
            )
        return result

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


class _Source:
    """One thing sampled (the broker or the master): how to ask it, and whether it answered."""

    def __init__(self, what: str, fetch: StatusSource, address: str | None, timeout: float) -> None:
        self.what = what
        self.fetch = fetch
        self.address = address
        self.timeout = timeout
        self.reachable: bool | None = None  # None: not asked yet
        self.error: str | None = None
        self.last_ok: float | None = None
        self.value: dict[str, Any] | None = None  # the last answer (kept while unreachable)

    async def sample(self, now: float) -> dict[str, Any] | None:
        """Ask once, bounded by the timeout; record the outcome. Never raises but CancelledError."""
        try:
            async with asyncio.timeout(self.timeout):
                value = await self.fetch()
            if not isinstance(value, Mapping):
                raise ProtocolError(f"the {self.what}'s status is a {type(value).__name__}, not a map")
            value = dict(value)
        except Exception as exc:
            message = _describe(exc, self.timeout)
            if self.reachable is not False or message != self.error:
                where = f" at {self.address}" if self.address else ""
                log.warning("dashboard: cannot reach the %s%s: %s", self.what, where, message)
            self.reachable = False
            self.error = message
            return None
        if self.reachable is False:
            log.info("dashboard: the %s answers again", self.what)
        self.reachable = True
        self.error = None
        self.last_ok = now
        self.value = value
        return value

    def state(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "reachable": self.reachable,
            "error": self.error,
            "last_ok": self.last_ok,
        }


def _describe(exc: BaseException, timeout: float) -> str:
    """One line about why a source did not answer."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout:g} s"
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, ConnectError) and text.startswith("cannot connect to "):
        text = text.partition(": ")[2] or text  # the address is said already
    return text


def _remote_or_callable(
    source: str | StatusSource,
    what: str,
    method: str,
    default_port: int | None,
    *,
    secret: bytes | None,
    ssl: _ssl.SSLContext | None,
    timeout: float,
    options: Mapping[str, Any],
) -> tuple[_Source, _Remote | None]:
    if isinstance(source, str):
        remote = _Remote(
            source, method, default_port, secret=secret, ssl=ssl, timeout=timeout, options=options
        )
        return _Source(what, remote, remote.address, timeout), remote
    if not callable(source):
        raise TypeError(f"the {what} source must be 'host:port' or an async callable, not {source!r}")
    return _Source(what, source, None, timeout), None


# -- derived numbers ------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _counters(status: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(completed, failed, queued, running) of a broker status."""
    stats = status.get("stats")
    stats = stats if isinstance(stats, Mapping) else {}
    return (
        _int(stats.get("completed")),
        _int(stats.get("failed")),
        _int(status.get("queued")),
        _int(status.get("running")),
    )


def _workers(status: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    workers = status.get("workers") if status is not None else None
    if not isinstance(workers, list):
        return []
    return sorted((w for w in workers if isinstance(w, Mapping)), key=lambda w: _int(w.get("wid")))


_JOB_STATES = ("running", "done", "failed", "killed")


def _jobs(mr: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``mr.status``'s jobs as a list: ``{id, name, phases: [{name, done, total}], done, state,
    error}`` (``state`` one of running, done, failed, killed; ``error`` a string or None)."""
    jobs = mr.get("jobs") if mr is not None else None
    if not isinstance(jobs, Mapping):
        return []
    out: list[dict[str, Any]] = []
    for job_id, info in jobs.items():
        if not isinstance(info, Mapping):
            continue
        phases = [
            {"name": str(key), "done": _int(value[0]), "total": _int(value[1])}
            for key, value in info.items()
            if key not in ("name", "state", "error") and isinstance(value, list | tuple) and len(value) == 2
        ]
        state = info.get("state")
        if state not in _JOB_STATES:  # a master that does not say: judge by the phases
            finished = bool(phases) and all(_int(p["done"]) >= _int(p["total"]) for p in phases)
            state = "done" if finished else "running"
        error = info.get("error") if state == "failed" else None
        out.append(
            {
                "id": str(job_id),
                "name": str(info.get("name", "")),
                "phases": phases,
                "done": state == "done",
                "state": state,
                "error": str(error)[:500] if error is not None else None,
            }
        )
    return out


# -- the dashboard --------------------------------------------------------------------------------


class Dashboard:
    """Serve a live page of a broker's workers, load, queue, throughput, failures and MapReduce jobs.

    ``source`` is the broker: ``"host:port"`` (connected to with ``secret``,
    ``secret_file`` or the environment, ``ssl``, and other keyword arguments
    as :class:`~asyncdist.connection.Options`), or an async callable that
    returns its status (a local pool passes its in-process broker's).
    ``master`` optionally adds a MapReduce master the same ways (its
    ``mr.status``; same secret). Every ``interval`` seconds both are sampled,
    each ask bounded by ``timeout``; the last ``history`` samples are kept.

    ``await dash.start()`` (or ``async with``) serves ``http://host:port/``
    (``port=0``: any free port; :attr:`url`, :attr:`port`); :meth:`aclose`
    stops everything. ``host`` must be a loopback address unless
    ``insecure=True``: the page has no authentication.
    """

    def __init__(
        self,
        source: str | StatusSource,
        *,
        host: str = "127.0.0.1",
        port: int = 8787,
        master: str | StatusSource | None = None,
        interval: float = 1.0,
        history: int = 300,
        secret: str | bytes | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        insecure: bool = False,
        timeout: float = 5.0,
        **connect_options: Any,
    ) -> None:
        if not interval > 0 or not math.isfinite(interval):
            raise ValueError("interval must be a positive number of seconds")
        if history < 2:
            raise ValueError("history must keep at least 2 samples")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        if not is_loopback(host):
            if not insecure:
                raise ConfigurationError(
                    f"refusing to serve the dashboard on {host!r}: the page has no authentication, so "
                    "anyone who can reach it would see the cluster. Serve it on 127.0.0.1 (and use an "
                    "SSH tunnel), or pass insecure=True / --insecure if this network is trusted."
                )
            log.warning("dashboard on %s:%s WITHOUT authentication (insecure=True)", host, port)
        self.host = host
        self.interval = float(interval)
        self.history = int(history)
        self.timeout = float(timeout)
        self._requested_port = port
        key = resolve_secret(secret, secret_file=secret_file)
        self._broker, broker_remote = _remote_or_callable(
            source, "broker", "status", None,
            secret=key, ssl=ssl, timeout=self.timeout, options=connect_options,
        )  # fmt: skip
        self._remotes = [broker_remote]
        self._master: _Source | None = None
        if master is not None:
            self._master, master_remote = _remote_or_callable(
                master, "MapReduce master", "mr.status", 7878,
                secret=key, ssl=ssl, timeout=self.timeout, options=connect_options,
            )  # fmt: skip
            self._remotes.append(master_remote)
        self._samples: deque[dict[str, Any]] = deque(maxlen=self.history)
        self._sampled_at: float | None = None
        self._instance = secrets.token_hex(8)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port served (the one chosen when ``port=0``); the requested one before start."""
        return self._port if self._port is not None else self._requested_port

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> Dashboard:
        """Start sampling and serving (idempotent); raise OSError if the port is taken.

        Needs aiohttp (``pip install 'asyncdist[dashboard]'``): without it,
        :class:`~asyncdist.errors.ConfigurationError` says so.
        """
        if self._runner is not None:
            return self
        if self._closing is not None:
            raise RuntimeError("this dashboard was closed")
        try:
            from aiohttp import web
        except ImportError as exc:
            raise ConfigurationError(
                "the dashboard needs aiohttp: pip install 'asyncdist[dashboard]'"
            ) from exc

        app = web.Application(middlewares=[self._guard()])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._api)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        ports = [address[1] for address in runner.addresses if isinstance(address, tuple)]
        self._port = ports[0] if ports else self._requested_port
        self._sampler = asyncio.create_task(self._run(), name="asyncdist-dashboard-sampler")
        return self

    async def aclose(self) -> None:
        """Stop sampling, close the connections, stop serving. Idempotent."""
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            sampler, self._sampler = self._sampler, None
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            for remote in self._remotes:
                if remote is not None:
                    with contextlib.suppress(Exception):
                        await remote.aclose()
            runner, self._runner = self._runner, None
            if runner is not None:
                await runner.cleanup()
        finally:
            self._closing.set_result(None)

    async def __aenter__(self) -> Dashboard:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closing is not None else "serving" if self._runner else "not started"
        return f"<Dashboard {self.url} {state}>"

    # -- sampling ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample()
            except Exception:  # a bug here must not stop the page: log it and go on
                log.exception("dashboard: sampling failed")
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # fell behind (a slow answer): do not catch up in a burst
                next_at = now
            await asyncio.sleep(next_at - now)

    async def sample(self) -> dict[str, Any]:
        """Sample the broker (and master) now, add it to the history, return :meth:`snapshot`.

        The dashboard does this every ``interval`` seconds by itself.
        """
        now = time.time()
        jobs: list[Awaitable[Any]] = [self._broker.sample(now)]
        if self._master is not None:
            jobs.append(self._master.sample(now))
        status = (await asyncio.gather(*jobs))[0]
        self._add_sample(now, status)
        self._sampled_at = now
        return self.snapshot()

    def _add_sample(self, now: float, status: Mapping[str, Any] | None) -> None:
        sample: dict[str, Any] = dict.fromkeys(
            ("completed", "failed", "queued", "running", "tasks_per_s", "failures_per_s")
        )
        sample["t"] = now
        if status is not None:
            completed, failed, queued, running = _counters(status)
            sample.update(completed=completed, failed=failed, queued=queued, running=running)
            previous = self._samples[-1] if self._samples else None
            rates = _rates(previous, sample)
            if rates is not None:
                sample["tasks_per_s"], sample["failures_per_s"] = rates
        self._samples.append(sample)

    def _smoothed_rates(self) -> tuple[float | None, float | None]:
        """Completed and failed per second over the last RATE_WINDOW samples (while contiguous)."""
        samples = list(self._samples)
        if not samples or samples[-1]["completed"] is None:
            return None, None
        last = samples[-1]
        first = last
        for sample in reversed(samples[-RATE_WINDOW - 1 : -1]):
            if _rates(sample, first) is None:
                break
            first = sample
        rates = _rates(first, last) if first is not last else None
        return rates if rates is not None else (None, None)

    def snapshot(self, since: float | None = None) -> dict[str, Any]:
        """What ``/api/status`` answers: the broker's last status as it sent it (``status``; and
        whether it is current: ``broker``, ``stale``), the numbers the page shows (``workers``,
        ``slots``, ``queued``, ``running``, ``completed``, ``failed``, ``tasks_per_s``, ...; None
        before a first answer), the history (samples after ``since`` only, if given), and the
        MapReduce master's state and jobs (None without a master)."""
        status = self._broker.value
        workers = _workers(status)
        counters = _counters(status) if status is not None else (None, None, None, None)
        stats = status.get("stats") if status is not None else None
        stats = stats if isinstance(stats, Mapping) else {}
        tasks_per_s, failures_per_s = self._smoothed_rates()
        history = [dict(s) for s in self._samples if since is None or s["t"] > since]
        mapreduce: dict[str, Any] | None = None
        if self._master is not None:
            mr = self._master.value
            slaves = mr.get("slaves") if mr is not None else None
            mapreduce = {
                **self._master.state(),
                "stale": self._master.reachable is not True,
                "slaves": slaves if isinstance(slaves, list) else [],
                "jobs": _jobs(mr),
            }
        return {
            "version": __version__,
            "instance": self._instance,
            "time": self._sampled_at,
            "interval": self.interval,
            "history_size": self.history,
            "broker": self._broker.state(),
            "stale": self._broker.reachable is not True,
            "status": status,
            "workers": len(workers) if status is not None else None,
            "slots": sum(_int(w.get("slots")) for w in workers) if status is not None else None,
            **dict(zip(("completed", "failed", "queued", "running"), counters, strict=True)),
            **{
                name: _int(stats.get(name)) if status is not None else None
                for name in ("cancelled", "requeued", "workers_lost")
            },
            "clients": _int(status.get("clients")) if status is not None else None,
            "tasks_per_s": tasks_per_s,
            "failures_per_s": failures_per_s,
            "history": history,
            "mapreduce": mapreduce,
        }

    # -- serving -----------------------------------------------------------------------------------

    def _guard(self) -> Any:
        """Middleware: on a loopback address, answer only loopback Host names (DNS rebinding)."""
        from aiohttp import web

        check = is_loopback(self.host)

        @web.middleware
        async def guard(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if check and not _loopback_name(request.url.host, self.host):
                return web.Response(status=403, text="this dashboard answers only to loopback host names\n")
            response = await handler(request)
            response.headers.update(_SECURITY_HEADERS)
            return response

        return guard

    async def _page(self, request: web.Request) -> web.Response:
        from aiohttp import web

        initial = _json(self.snapshot())
        # Inside <script type="application/json">: no "<" may end the element early.
        initial = initial.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        body = _PAGE.replace("__INITIAL__", initial, 1)
        return web.Response(
            text=body,
            content_type="text/html",
            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"},
        )

    async def _api(self, request: web.Request) -> web.Response:
        from aiohttp import web

        since: float | None = None
        if "since" in request.query:
            try:
                since = float(request.query["since"])
            except ValueError:
                raise web.HTTPBadRequest(text="since must be a number (a sample's t)\n") from None
        return web.Response(
            text=_json(self.snapshot(since)),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )


def _rates(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> tuple[float, float] | None:
    """Completed and failed per second between two samples; None across a gap or a broker restart."""
    if before is None or before["completed"] is None or after["completed"] is None:
        return None
    dt = after["t"] - before["t"]
    done = after["completed"] - before["completed"]
    failed = after["failed"] - before["failed"]
    if dt <= 0 or done < 0 or failed < 0:
        return None
    return round(done / dt, 3), round(failed / dt, 3)


def _loopback_name(name: str | None, bound: str) -> bool:
    if not name:
        return False
    name = name.strip("[]").lower()
    if name in ("localhost", bound.strip("[]").lower()) or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)


# -- one look, as text ----------------------------------------------------------------------------


async def fetch_status(
    broker: str,
    *,
    master: str | None = None,
    secret: str | bytes | None = None,
    secret_file: str | os.PathLike[str] | None = None,
    ssl: _ssl.SSLContext | None = None,
    timeout: float = 5.0,
    **connect_options: Any,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Ask a broker (``"host:port"``) for its status, and a master for ``mr.status`` if given.

    Raises :class:`~asyncdist.errors.ConnectError` naming what could not be
    reached (also on a timeout), or the authentication error.
    """
    key = resolve_secret(secret, secret_file=secret_file)
    results: list[dict[str, Any] | None] = [None, None]
    for i, (address, what, method, port) in enumerate(
        [(broker, "broker", "status", None), (master, "MapReduce master", "mr.status", 7878)]
    ):
        if address is None:
            continue
        remote = _Remote(address, method, port, secret=key, ssl=ssl, timeout=timeout, options=connect_options)
        try:
            async with asyncio.timeout(timeout * 2):
                results[i] = await remote()
        except TimeoutError:
            raise ConnectError(
                f"the {what} at {remote.address} did not answer within {timeout:g} s"
            ) from None
        except ConnectError as exc:
            reason = _describe(exc, timeout)
            raise ConnectError(f"cannot reach the {what} at {remote.address}: {reason}") from exc
        finally:
            await remote.aclose()
    assert results[0] is not None
    return results[0], results[1]


def format_status(
    status: Mapping[str, Any],
    mr: Mapping[str, Any] | None = None,
    *,
    broker: str | None = None,
    tasks_per_s: float | None = None,
) -> str:
    """A broker status (and a master's ``mr.status``) as plain text: one number per line, then
    a table of the workers and one of the MapReduce jobs. ``broker`` names it in the first line."""
    stats = status.get("stats")
    stats = stats if isinstance(stats, Mapping) else {}
    completed, failed, queued, running = _counters(status)
    workers = _workers(status)
    uptime = status.get("uptime")
    head = f"broker      {broker or '(in process)'}"
    if isinstance(uptime, int | float):
        head += f"   up {_duration(uptime)}"
    lines = [
        head,
        f"workers     {len(workers)}   ({sum(_int(w.get('slots')) for w in workers)} slots)",
        f"queued      {queued}",
        f"running     {running}",
        f"completed   {completed}",
        f"failed      {failed}",
    ]
    if tasks_per_s is not None:
        lines.append(f"tasks/s     {tasks_per_s:.2f}")
    lines.append(
        f"clients     {_int(status.get('clients'))}   cancelled {_int(stats.get('cancelled'))}   "
        f"requeued {_int(stats.get('requeued'))}   workers joined {_int(stats.get('workers_joined'))}"
        f"   lost {_int(stats.get('workers_lost'))}"
    )
    lines.append("")
    if workers:
        rows = [["WID", "NAME", "HOST", "PID", "SLOTS", "RUNNING", "LOAD", "COMPLETED"]]
        for w in workers:
            slots, held = _int(w.get("slots")), _int(w.get("running"))
            load = f"{100 * held / slots:.0f}%" if slots else "-"
            rows.append(
                [str(_int(w.get("wid"))), str(w.get("name", "")), str(w.get("host", "")),
                 str(_int(w.get("pid"))), str(slots), str(held), load, str(_int(w.get("completed")))]
            )  # fmt: skip
        lines += _table(rows, right={0, 3, 4, 5, 6, 7})
    else:
        lines.append("no workers connected")
    if mr is not None:
        slaves = mr.get("slaves")
        count = len(slaves) if isinstance(slaves, list) else 0
        jobs = _jobs(mr)
        lines += ["", f"MapReduce   {count} slave{'s' if count != 1 else ''}   {len(jobs)} job(s)"]
        if jobs:
            names = list(dict.fromkeys(p["name"] for job in jobs for p in job["phases"]))
            rows = [["JOB", "NAME", *(n.upper() for n in names), "STATE"]]
            for job in jobs:
                phases = {p["name"]: f"{p['done']}/{p['total']}" for p in job["phases"]}
                rows.append(
                    [job["id"], job["name"], *(phases.get(n, "-") for n in names),
                     _job_state(job)]
                )  # fmt: skip
            lines += _table(rows, right=set(range(2, 2 + len(names))))
    return "\n".join(lines)


def _job_state(job: Mapping[str, Any]) -> str:
    """A job's state for the table: ``failed (ValueError: ...)`` names the error, on one line."""
    error = job["error"]
    if not error:
        return str(job["state"])
    first = " ".join(str(error).split())
    return f"{job['state']} ({first[:77] + '...' if len(first) > 80 else first})"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# -- the page -------------------------------------------------------------------------------------

_STYLE = """
:root { --bg:#f4f6fa; --card:#fff; --line:#e2e7ef; --text:#1b2430; --muted:#637083;
  --blue:#2563eb; --red:#dc2626; --amber:#d97706; --green:#059669; --head:#0f172a; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--text);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
header { background:var(--head); color:#e2e8f0; padding:14px 28px; display:flex; align-items:center;
  gap:18px; flex-wrap:wrap; }
header h1 { margin:0; font-size:18px; font-weight:600; color:#fff; letter-spacing:.2px; }
header h1 span { color:#93c5fd; font-weight:500; }
header .where { color:#94a3b8; font-size:13px; }
header .where b { color:#e2e8f0; font-weight:500; font-family:ui-monospace,"DejaVu Sans Mono",monospace; }
header .right { margin-left:auto; color:#94a3b8; font-size:13px; display:flex; gap:14px; align-items:center; }
.pill { display:inline-flex; align-items:center; gap:6px; padding:2px 10px; border-radius:999px;
  font-size:12px; font-weight:600; background:#334155; color:#e2e8f0; }
.pill::before { content:""; width:8px; height:8px; border-radius:50%; background:currentColor; }
.pill[data-state=ok] { background:#064e3b; color:#6ee7b7; }
.pill[data-state=unreachable], .pill[data-state=offline] { background:#7f1d1d; color:#fecaca; }
main { padding:20px 28px 8px; max-width:1500px; margin:0 auto; }
#alert { margin:16px 28px 0; padding:12px 16px; border-radius:8px; background:#fef2f2;
  border:1px solid #fecaca; color:#991b1b; font-weight:500; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(140px,1fr)); gap:14px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px;
  box-shadow:0 1px 2px rgba(15,23,42,.04); }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.6px; }
.card .value { font-size:28px; font-weight:600; margin-top:2px; font-variant-numeric:tabular-nums; }
.card .sub { color:var(--muted); font-size:12px; }
.card.failed .value { color:var(--red); }
.card.failed .value[data-value="0"] { color:var(--text); }
body.stale .value, body.stale td { opacity:.45; }
.charts { display:grid; grid-template-columns:repeat(auto-fit,minmax(420px,1fr)); gap:14px; margin-top:14px; }
.panel { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 18px;
  margin-top:14px; box-shadow:0 1px 2px rgba(15,23,42,.04); }
.panel h2 { margin:0 0 8px; font-size:15px; font-weight:600; display:flex; align-items:center; gap:14px; }
.panel h2 .meta { color:var(--muted); font-weight:400; font-size:13px; }
.legend { display:flex; gap:14px; font-size:12px; color:var(--muted); font-weight:400; margin-left:auto; }
.legend i { display:inline-block; width:12px; height:3px; border-radius:2px; vertical-align:middle;
  margin-right:5px; }
.legend i.blue { background:var(--blue); } .legend i.red { background:var(--red); }
.legend i.amber { background:var(--amber); } .legend i.green { background:var(--green); }
.chart { width:100%; min-height:190px; }
.chart svg { display:block; }
.chart .grid { stroke:#edf0f5; }
.chart .axis { fill:#8a96a8; font-size:11px; font-variant-numeric:tabular-nums; }
.chart .empty { fill:#a0aab8; font-size:13px; }
table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
th { text-align:left; color:var(--muted); font-weight:500; font-size:12px; text-transform:uppercase;
  letter-spacing:.5px; padding:6px 10px; border-bottom:1px solid var(--line); }
td { padding:6px 10px; border-bottom:1px solid #f0f2f6; }
tr:last-child td { border-bottom:none; }
td.num, th.num { text-align:right; }
td.joined, th.joined { padding-left:36px; color:var(--muted); }
td.mono { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:13px; }
td .small { color:var(--muted); font-size:12px; margin-left:6px; }
td.none { color:var(--muted); text-align:center; padding:18px; }
.bar { display:inline-block; width:140px; height:8px; background:#eef1f6; border-radius:4px;
  overflow:hidden; vertical-align:middle; margin-right:10px; }
.bar > div { height:100%; background:var(--green); border-radius:4px; }
.bar.full > div { background:var(--amber); }
.bar.job > div { background:var(--blue); }
.badge { font-size:12px; font-weight:600; padding:2px 8px; border-radius:999px; background:#dbeafe;
  color:#1d4ed8; }
.badge.done { background:#d1fae5; color:#047857; }
.badge.failed { background:#fee2e2; color:#b91c1c; }
.badge.killed { background:#eef1f6; color:#4b5563; }
footer { color:var(--muted); font-size:12px; padding:10px 28px 22px; max-width:1500px; margin:0 auto; }
"""

_SCRIPT = r"""
"use strict";
(() => {
  const NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let samples = [], instance = null, lastT = null, updates = 0, latest = null;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  const fmtInt = (v) => (v == null ? "\u2013" : Math.round(v).toLocaleString("en-US"));
  function fmtRate(v) {
    if (v == null) return "\u2013";
    if (v === 0) return "0";
    return v >= 100 ? fmtInt(v) : v.toFixed(v >= 10 ? 1 : 2);
  }
  function fmtAxis(v) {
    if (v >= 1e6) return +(v / 1e6).toFixed(1) + "M";
    if (v >= 1e3) return +(v / 1e3).toFixed(1) + "k";
    return String(+v.toFixed(2));
  }
  function fmtAgo(s) {
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    const minutes = String(Math.floor((s % 3600) / 60)).padStart(2, "0");
    if (s < 86400) return Math.floor(s / 3600) + " h " + minutes + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  const clock = (t) => new Date(t * 1000).toLocaleTimeString();
  function setNum(id, v, text) {
    const e = $(id);
    e.dataset.value = v == null ? "" : String(v);
    e.textContent = text != null ? text : fmtInt(v);
  }
  function cell(cls, text, field, value) {
    const td = el("td", cls ? { class: cls } : {}, text);
    if (field) { td.dataset.field = field; td.dataset.value = String(value); }
    return td;
  }
  function bar(ratio, extra) {
    const b = el("span", { class: "bar" + (extra ? " " + extra : "") });
    const fill = el("div");
    fill.style.width = (Math.max(0, Math.min(1, ratio)) * 100).toFixed(1) + "%";
    b.appendChild(fill);
    return b;
  }

  function niceStep(x, integer) {
    if (!(x > 0)) return integer ? 1 : 0.25;
    const e = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of integer ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10]) {
      const step = m * e;
      if (step >= x && (!integer || step >= 1)) return step;
    }
    return 10 * e;
  }
  function timeStep(span) {
    for (const s of [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600])
      if (span / s <= 6) return s;
    return 43200;
  }
  const fmtTick = (s) => (s === 0 ? "now" : s < 60 ? "\u2212" + s + " s" : s < 3600 ?
    "\u2212" + +(s / 60).toFixed(1) + " min" : "\u2212" + +(s / 3600).toFixed(1) + " h");

  function drawChart(id, defs, integer) {
    const node = $(id);
    const W = Math.max(260, node.parentNode.clientWidth || 600), H = 190;
    const m = { l: 46, r: 14, t: 10, b: 26 }, pw = W - m.l - m.r, ph = H - m.t - m.b;
    node.setAttribute("viewBox", "0 0 " + W + " " + H);
    node.setAttribute("width", W);
    node.setAttribute("height", H);
    while (node.firstChild) node.removeChild(node.firstChild);
    const interval = latest ? latest.interval : 1, size = latest ? latest.history_size : 300;
    const t1 = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    const first = samples.length ? samples[0].t : t1;
    const span = Math.min(size * interval, Math.max(60, t1 - first));
    const t0 = t1 - span;
    let vmax = 0;
    for (const s of samples) {
      for (const d of defs) if (s.t >= t0 && s[d.key] != null) vmax = Math.max(vmax, s[d.key]);
    }
    const step = niceStep(vmax / 4, integer), top = 4 * step;
    const x = (t) => m.l + ((t - t0) / span) * pw, y = (v) => m.t + ph - (v / top) * ph;
    for (let i = 0; i <= 4; i++) {
      const v = step * i, yy = y(v).toFixed(1);
      node.appendChild(svg("line", { class: "grid", x1: m.l, x2: W - m.r, y1: yy, y2: yy }));
      const label = { class: "axis", x: m.l - 8, y: +yy + 4, "text-anchor": "end" };
      node.appendChild(svg("text", label, fmtAxis(v)));
    }
    const ts = timeStep(span);
    for (let k = 0; k <= span + 1e-9; k += ts)
      node.appendChild(svg("text", { class: "axis", x: x(t1 - k).toFixed(1), y: H - 6,
        "text-anchor": k === 0 ? "end" : "middle" }, fmtTick(k)));
    let drawn = 0;
    for (const d of defs) {
      const segments = [];
      let seg = null, count = 0;
      for (const s of samples) {
        if (s.t < t0) continue;
        const v = s[d.key];
        if (v == null) { seg = null; continue; }
        if (!seg) { seg = []; segments.push(seg); }
        seg.push([x(s.t).toFixed(1), y(v).toFixed(1)]);
        count++;
      }
      const base = y(0).toFixed(1);
      let area = "", line = "";
      for (const sg of segments) {
        const points = sg.map((p) => p.join(",")).join("L");
        line += "M" + points;
        area += "M" + sg[0][0] + "," + base + "L" + points + "L" + sg[sg.length - 1][0] + "," + base + "Z";
      }
      const fill = { d: area || "M0,0", fill: d.color, "fill-opacity": "0.08", stroke: "none" };
      node.appendChild(svg("path", fill));
      node.appendChild(svg("path", { class: "series", "data-series": d.key, "data-points": count,
        d: line || "M0,0", fill: "none", stroke: d.color, "stroke-width": "2", "stroke-linejoin": "round" }));
      const lastSeg = segments[segments.length - 1];
      if (lastSeg) {
        const p = lastSeg[lastSeg.length - 1];
        node.appendChild(svg("circle", { cx: p[0], cy: p[1], r: 3.5, fill: d.color }));
      }
      drawn += count;
    }
    node.dataset.points = drawn;
    if (!drawn) {
      const where = { class: "empty", x: m.l + pw / 2, y: m.t + ph / 2, "text-anchor": "middle" };
      node.appendChild(svg("text", where, "waiting for data\u2026"));
    }
  }
  function drawCharts() {
    const rate = [{ key: "tasks_per_s", color: "#2563eb" }, { key: "failures_per_s", color: "#dc2626" }];
    drawChart("chart-rate", rate, false);
    const queue = [{ key: "queued", color: "#d97706" }, { key: "running", color: "#059669" }];
    drawChart("chart-queue", queue, true);
  }

  function renderWorkers(status, now) {
    const body = $("workers-body");
    const rows = document.createDocumentFragment();
    const list = status && Array.isArray(status.workers) ? status.workers : [];
    const workers = list.filter((w) => w && typeof w === "object").sort((a, b) => a.wid - b.wid);
    for (const w of workers) {
      const tr = el("tr");
      tr.dataset.wid = String(w.wid);
      const name = el("td");
      name.appendChild(document.createTextNode(w.name || "worker " + w.wid));
      name.appendChild(el("span", { class: "small" }, "#" + w.wid));
      tr.appendChild(name);
      tr.appendChild(cell("mono", w.host, "host", w.host));
      tr.appendChild(cell("num mono", String(w.pid), "pid", w.pid));
      const load = el("td");
      const ratio = w.slots ? w.running / w.slots : 0;
      load.dataset.field = "load";
      load.dataset.value = String(ratio);
      load.title = w.running > w.slots ? w.running + " tasks held for " + w.slots + " slot(s): " +
        (w.running - w.slots) + " prefetched" : w.running + " of " + w.slots + " slot(s) busy";
      load.appendChild(bar(ratio, ratio > 1 ? "full" : ""));
      const r = el("span", { "data-field": "running", "data-value": w.running }, String(w.running));
      const s = el("span", { "data-field": "slots", "data-value": w.slots }, String(w.slots));
      load.append(r, " / ", s);
      tr.appendChild(load);
      tr.appendChild(cell("num", fmtInt(w.completed), "completed", w.completed));
      tr.appendChild(cell("joined", fmtAgo(now - w.joined) + " ago"));
      rows.appendChild(tr);
    }
    if (!workers.length) {
      rows.appendChild(el("tr")).appendChild(el("td", { colspan: 6, class: "none" }, "No workers connected"));
    }
    body.replaceChildren(rows);
  }

  function renderMapReduce(mr) {
    const panel = $("mr-panel");
    panel.hidden = !mr;
    if (!mr) return;
    $("mr-address").textContent = mr.address ? "master " + mr.address : "master (in process)";
    setNum("mr-slaves", mr.slaves.length);
    setNum("mr-jobs-count", mr.jobs.length);
    $("mr-slaves-word").textContent = mr.slaves.length === 1 ? "slave" : "slaves";
    $("mr-jobs-word").textContent = mr.jobs.length === 1 ? "job" : "jobs";
    const state = $("mr-state");
    const s = mr.reachable === true ? "ok" : mr.reachable === false ? "unreachable" : "connecting";
    state.dataset.state = s;
    state.textContent = s === "ok" ? "live" : s;
    state.title = mr.error || "";
    const names = [];
    for (const j of mr.jobs) for (const p of j.phases) if (!names.includes(p.name)) names.push(p.name);
    const head = el("tr");
    head.appendChild(el("th", {}, "Job"));
    for (const n of names) head.appendChild(el("th", {}, n));
    head.appendChild(el("th", {}, "State"));
    $("mr-head").replaceChildren(head);
    const rows = document.createDocumentFragment();
    for (const j of mr.jobs) {
      const tr = el("tr");
      tr.dataset.job = j.id;
      const name = el("td", {}, j.name);
      name.appendChild(el("span", { class: "small mono" }, j.id));
      tr.appendChild(name);
      for (const n of names) {
        const p = j.phases.find((q) => q.name === n);
        const td = el("td");
        if (p) {
          td.dataset.field = "phase-" + n;
          td.dataset.done = String(p.done);
          td.dataset.total = String(p.total);
          td.appendChild(bar(p.total ? p.done / p.total : 0, "job"));
          td.appendChild(document.createTextNode(p.done + " / " + p.total));
        }
        tr.appendChild(td);
      }
      const st = el("td");
      const badge = { class: "badge " + j.state, "data-field": "state" };
      if (j.error) badge.title = j.error;
      st.appendChild(el("span", badge, j.state));
      tr.appendChild(st);
      rows.appendChild(tr);
    }
    if (!mr.jobs.length) {
      const none = el("td", { colspan: names.length + 2, class: "none" }, "No jobs");
      rows.appendChild(el("tr")).appendChild(none);
    }
    $("mr-body").replaceChildren(rows);
  }

  function showAlert(text) {
    const a = $("alert");
    a.hidden = !text;
    a.textContent = text || "";
  }

  function render(data) {
    const b = data.broker, st = data.status, now = data.time || Date.now() / 1000;
    $("broker-address").textContent = b.address || "in-process broker";
    const pill = $("broker-state");
    const state = b.reachable === true ? "ok" : b.reachable === false ? "unreachable" : "connecting";
    pill.dataset.state = state;
    pill.textContent = state === "ok" ? "live" : state === "unreachable" ? "broker unreachable" : state;
    document.body.classList.toggle("stale", b.reachable === false);
    if (b.reachable === false) {
      const seen = b.last_ok ? "Showing the state last seen at " + clock(b.last_ok) + "." :
        "No state seen yet.";
      showAlert("Cannot reach the broker" + (b.address ? " at " + b.address : "") + ": " + b.error + ". " +
        seen + " Retrying every " + data.interval + " s.");
    } else showAlert("");
    setNum("workers-count", data.workers);
    setNum("slots-total", data.slots);
    setNum("queued", data.queued);
    setNum("running", data.running);
    setNum("completed", data.completed);
    setNum("failed", data.failed);
    setNum("tasks-per-s", data.tasks_per_s, fmtRate(data.tasks_per_s));
    setNum("failures-per-s", data.failures_per_s, fmtRate(data.failures_per_s));
    setNum("clients", data.clients);
    setNum("requeued", data.requeued);
    setNum("workers-lost", data.workers_lost);
    setNum("cancelled", data.cancelled);
    const up = $("uptime"), uptime = st && typeof st.uptime === "number" ? st.uptime : null;
    up.dataset.value = uptime == null ? "" : String(uptime);
    up.textContent = uptime == null ? "" : "up " + fmtAgo(uptime);
    $("updated").textContent = data.time ? "updated " + clock(data.time) : "waiting for the first sample";
    renderWorkers(st, now);
    renderMapReduce(data.mapreduce);
    drawCharts();
  }

  function apply(data, partial) {
    if (data.instance !== instance) {
      samples = [];
      lastT = null;
      instance = data.instance;
      if (partial) return false;  // another dashboard process: fetch its whole history
    }
    for (const s of data.history) if (lastT == null || s.t > lastT) samples.push(s);
    if (samples.length > data.history_size) samples.splice(0, samples.length - data.history_size);
    if (samples.length) lastT = samples[samples.length - 1].t;
    latest = data;
    updates++;
    document.body.dataset.updates = String(updates);
    render(data);
    return true;
  }

  async function poll() {
    let again = 1000;
    try {
      const partial = lastT != null;
      const r = await fetch("api/status" + (partial ? "?since=" + lastT : ""), { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      if (!apply(await r.json(), partial)) again = 0;
    } catch (e) {
      const pill = $("broker-state");
      pill.dataset.state = "offline";
      pill.textContent = "dashboard offline";
      document.body.classList.add("stale");
      showAlert("Lost the dashboard server (" + e.message + "); retrying every second.");
    } finally {
      setTimeout(poll, again);
    }
  }

  window.addEventListener("resize", () => { if (latest) drawCharts(); });
  apply(JSON.parse($("initial").textContent), false);
  setTimeout(poll, 1000);
})();
"""

_BODY = """
<header>
  <h1>asyncdist <span>dashboard</span></h1>
  <div class="where">broker <b id="broker-address"></b></div>
  <span class="pill" id="broker-state" data-state="connecting">connecting</span>
  <div class="right"><span id="uptime"></span><span id="updated"></span></div>
</header>
<div id="alert" role="alert" hidden></div>
<main>
  <section class="cards">
    <div class="card"><div class="label">Workers</div><div class="value" id="workers-count"></div>
      <div class="sub"><span id="slots-total"></span> slots &middot;
        <span id="workers-lost"></span> lost</div></div>
    <div class="card"><div class="label">Queued</div><div class="value" id="queued"></div>
      <div class="sub">waiting for a worker</div></div>
    <div class="card"><div class="label">Running</div><div class="value" id="running"></div>
      <div class="sub">held by workers</div></div>
    <div class="card"><div class="label">Completed</div><div class="value" id="completed"></div>
      <div class="sub"><span id="cancelled"></span> cancelled</div></div>
    <div class="card failed"><div class="label">Failed</div><div class="value" id="failed"></div>
      <div class="sub"><span id="requeued"></span> requeued</div></div>
    <div class="card"><div class="label">Tasks / s</div><div class="value" id="tasks-per-s"></div>
      <div class="sub"><span id="failures-per-s"></span> failures / s</div></div>
    <div class="card"><div class="label">Clients</div><div class="value" id="clients"></div>
      <div class="sub">connected</div></div>
  </section>
  <section class="charts">
    <div class="panel"><h2>Tasks per second<span class="legend"><span><i class="blue"></i>completed</span>
      <span><i class="red"></i>failed</span></span></h2>
      <div class="chart"><svg id="chart-rate" role="img" aria-label="tasks per second over time"></svg>
      </div></div>
    <div class="panel"><h2>Queue depth<span class="legend"><span><i class="amber"></i>queued</span>
      <span><i class="green"></i>running</span></span></h2>
      <div class="chart"><svg id="chart-queue" role="img" aria-label="queued and running tasks over time">
      </svg></div></div>
  </section>
  <section class="panel">
    <h2>Workers</h2>
    <table id="workers"><thead><tr><th>Worker</th><th>Host</th><th class="num">PID</th>
      <th>Load (tasks / slots)</th><th class="num">Completed</th><th class="joined">Joined</th></tr></thead>
      <tbody id="workers-body"></tbody></table>
  </section>
  <section class="panel" id="mr-panel" hidden>
    <h2>MapReduce <span class="meta"><span id="mr-address"></span> &middot;
      <span id="mr-slaves"></span> <span id="mr-slaves-word">slaves</span> &middot;
      <span id="mr-jobs-count"></span> <span id="mr-jobs-word">jobs</span></span>
      <span class="pill" id="mr-state" data-state="connecting">connecting</span></h2>
    <table id="mr-jobs"><thead id="mr-head"></thead><tbody id="mr-body"></tbody></table>
  </section>
</main>
<footer>asyncdist __VERSION__ &middot; this page polls the dashboard every second</footer>
"""

_PAGE = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    "<title>asyncdist dashboard</title>"
    f"<style>{_STYLE}</style></head><body>"
    + _BODY.replace("__VERSION__", __version__)
    + '<script type="application/json" id="initial">__INITIAL__</script>'
    + f"<script>{_SCRIPT}</script></body></html>\n"
)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_CSP = (
    f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
