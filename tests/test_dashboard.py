"""The dashboard (``asyncdist.dashboard``): the page in headless Chromium against a real pool, the JSON
API, an unreachable broker, the loopback rule, MapReduce jobs, and a clean close.

The page is driven by Debian's ``chromium`` (``--headless --dump-dom`` with a virtual time budget,
so that the page's own script runs its polls), and the DOM it leaves is read here: every number
sits in an element with an ``id`` or ``data-field`` and its raw value in ``data-value``. States
that the page must show are made stable first (tasks that block on a release file, a broker whose
counters no longer move), so that the broker's state can be compared with the page's exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import _futures_tasks as T
import aiohttp
import pytest
from _util import SCALE, eventually, free_port, stop

import asyncdist
from asyncdist.dashboard import Dashboard, format_status
from asyncdist.errors import ConfigurationError
from asyncdist.futures import serve_broker
from asyncdist.mapreduce import Job, shutdown_local_cluster
from asyncdist.mapreduce._job import local_cluster

INTERVAL = 0.1 * SCALE
CHROMIUM = shutil.which("chromium")
TESTS = Path(__file__).resolve().parent

# -- Chromium and the DOM it leaves ----------------------------------------------------------------------


def chromium_command(user_data_dir: Path, *extra: str) -> list[str]:
    """Headless Chromium, with nothing that reaches out to the network by itself."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        f"--user-data-dir={user_data_dir}",
        *extra,
    ]


async def run_chromium(cmd: list[str], timeout: float = 45.0) -> bytes:
    """Run Chromium to its end (in its own process group, killed whole if it overstays); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        async with asyncio.timeout(timeout * SCALE):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


async def render(url: str, tmp_path: Path, budget_ms: int = 3000) -> Node:
    """Load ``url``, let its script run for ``budget_ms`` of virtual time (about three polls),
    and return the DOM it leaves."""
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    cmd = chromium_command(profile, f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
    dom = await run_chromium(cmd)
    shutil.rmtree(profile, ignore_errors=True)
    return parse(dom.decode())


class Node:
    """An element of the dumped DOM: tag, attributes, children, text."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Node | str] = []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def all(self, tag: str | None = None, **attrs: str | None) -> list[Node]:
        """Descendants with this tag (any if None) whose attributes (``data_x`` for ``data-x``) match;
        an attribute given as None must merely exist."""
        found = []
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            ok = True
            for key, value in attrs.items():
                name = key.replace("_", "-")
                if name not in node.attrs or (value is not None and node.attrs[name] != value):
                    ok = False
                    break
            if ok:
                found.append(node)
        return found

    def one(self, tag: str | None = None, **attrs: str | None) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag or '*'} {attrs}>, found {len(found)}"
        return found[0]

    def by_id(self, id: str) -> Node:
        return self.one(id=id)

    def value(self, **attrs: str) -> str:
        """The ``data-value`` of the one element matching ``attrs``."""
        return self.one(**attrs).attrs["data-value"]

    def __repr__(self) -> str:
        return f"<{self.tag} {self.attrs}>"


_VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "source", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in _VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


def number(text: str) -> float:
    return float(text) if text else float("nan")


# -- checks of a page against a broker status -----------------------------------------------------------


def check_page_matches(page: Node, status: Mapping[str, Any]) -> None:
    """Every number the page shows about the broker equals ``status``'s."""
    stats = status["stats"]
    workers = status["workers"]
    assert page.value(id="workers-count") == str(len(workers))
    assert page.value(id="slots-total") == str(sum(w["slots"] for w in workers))
    assert page.value(id="queued") == str(status["queued"])
    assert page.value(id="running") == str(status["running"])
    assert page.value(id="completed") == str(stats["completed"])
    assert page.value(id="failed") == str(stats["failed"])
    assert page.value(id="clients") == str(status["clients"])
    assert page.value(id="workers-lost") == str(stats["workers_lost"])
    # What a person reads is the same number (thousands separated).
    assert page.by_id("completed").text.replace(",", "") == str(stats["completed"])
    assert page.by_id("failed").text.replace(",", "") == str(stats["failed"])
    rows = page.all("tr", data_wid=None)
    assert sorted(int(r.attrs["data-wid"]) for r in rows) == sorted(w["wid"] for w in workers)
    for w in workers:
        row = page.one("tr", data_wid=str(w["wid"]))
        assert row.value(data_field="running") == str(w["running"])
        assert row.value(data_field="slots") == str(w["slots"])
        assert row.value(data_field="completed") == str(w["completed"])
        assert row.value(data_field="pid") == str(w["pid"])
        assert row.one(data_field="running").text == str(w["running"])
        assert number(row.value(data_field="load")) == pytest.approx(w["running"] / w["slots"])


def check_charts(page: Node) -> None:
    """Both charts are inline SVG the page built, with a line of data points per series."""
    for chart, series in (
        ("chart-rate", ("tasks_per_s", "failures_per_s")),
        ("chart-queue", ("queued", "running")),
    ):
        svg = page.by_id(chart)
        assert svg.tag == "svg"
        for name in series:
            path = svg.one("path", data_series=name)
            points = int(path.attrs["data-points"])
            assert points >= 2, (chart, name, points)
            assert path.attrs["d"].count("L") >= points - 1  # a polyline through the points
        assert len(svg.all("text", **{"class": "axis"})) >= 5  # axis labels


def comparable(status: Mapping[str, Any]) -> dict[str, Any]:
    """A broker status without what changes by itself (uptime, credit)."""
    out = {k: v for k, v in status.items() if k != "uptime"}
    out["workers"] = [{k: v for k, v in w.items() if k != "credit"} for w in status["workers"]]
    return out


async def get_json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    async with session.get(url, **kwargs) as response:
        assert response.status == 200, await response.text()
        return await response.json()


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10 * SCALE)) as session:
        yield session


# -- a pool in a known, stable state ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def busy_pool(directory: Path) -> AsyncIterator[tuple[asyncdist.Pool, list[Any]]]:
    """A pool of 2 workers that completed 12 tasks, failed 3, and holds 5 that block until released
    (some running, some prefetched or queued); its broker's counters no longer move."""
    async with asyncdist.Pool(workers=2) as pool:
        blocked: list[Any] = []
        try:
            assert await pool.map(T.square, range(12)) == [x * x for x in range(12)]
            for i in range(3):
                with pytest.raises(ValueError, match="bad value"):
                    await pool.submit(T.fail, str(directory), f"f{i}", "value")
            blocked = [pool.submit(T.block_until_released, str(directory), "hold", i) for i in range(5)]
            await eventually(
                lambda: len(T.markers(directory, "started", "hold")) == 2, "both workers run a blocked task"
            )
            broker = pool._broker
            assert broker is not None
            await eventually(
                lambda: broker.status()["queued"] + broker.status()["running"] == 5, "5 tasks held or queued"
            )
            yield pool, blocked
        finally:
            (directory / "release-hold").write_text("go")
            if blocked:
                assert await asyncio.gather(*blocked) == list(range(5))


def broker_of(pool: asyncdist.Pool) -> Any:
    broker = pool._broker
    assert broker is not None
    return broker


async def settled(dash: Dashboard, broker: Any) -> None:
    """Wait until the dashboard's last sample is the broker's state and tasks/s has fallen to 0."""

    def same() -> bool:
        snap = dash.snapshot()
        return (
            snap["status"] is not None
            and comparable(snap["status"]) == comparable(broker.status())
            and snap["tasks_per_s"] == 0
            and len(snap["history"]) >= 3
        )

    await eventually(same, "the dashboard did not catch up with the broker", timeout=10)


# -- the page in Chromium ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["address", "callable"])
async def test_page_shows_the_brokers_state(tmp_path: Path, form: str) -> None:
    async with busy_pool(tmp_path) as (pool, _):
        broker = broker_of(pool)
        source: Any = pool.address if form == "address" else pool.status
        secret = pool.secret if form == "address" else None
        async with Dashboard(source, port=0, interval=INTERVAL, secret=secret) as dash:
            assert dash.url == f"http://127.0.0.1:{dash.port}/"
            await settled(dash, broker)
            before = broker.status()
            page = await render(dash.url, tmp_path)
            after = broker.status()
            assert comparable(before) == comparable(after), "the state moved while the page was read"
            body = page.one("body")
            assert int(body.attrs["data-updates"]) >= 2, "the page's own polls did not run"
            assert "stale" not in body.attrs.get("class", "")
            assert page.by_id("broker-state").attrs["data-state"] == "ok"
            assert "hidden" in page.by_id("alert").attrs
            address = pool.address if form == "address" else "in-process broker"
            assert page.by_id("broker-address").text == address
            check_page_matches(page, after)
            assert after["queued"] + after["running"] == 5
            assert after["stats"]["completed"] == 12
            assert after["stats"]["failed"] == 3
            assert number(page.value(id="tasks-per-s")) == 0
            check_charts(page)
            assert "hidden" in page.by_id("mr-panel").attrs  # no master: no MapReduce panel


async def test_page_while_tasks_complete_and_hostile_names(tmp_path: Path) -> None:
    """A source whose counters move: the tasks/s chart rises; names are shown as text, never run."""
    evil = "</script><script>document.title='pwned'</script><img src=x onerror=alert(1)>"
    ticks = 0

    async def status() -> dict[str, Any]:
        nonlocal ticks
        ticks += 1
        return {
            "stats": {"completed": 10 * ticks, "failed": ticks // 5, "workers_lost": 0, "requeued": 0},
            "queued": 7,
            "running": 3,
            "clients": 1,
            "uptime": 5.0,
            "workers": [
                {"wid": 4, "name": evil, "host": "<b>h</b>", "pid": 42, "slots": 2, "running": 3,
                 "completed": 10 * ticks, "joined": time.time()}
            ],
        }  # fmt: skip

    async with Dashboard(status, port=0, interval=INTERVAL) as dash:
        await eventually(lambda: len(dash.snapshot()["history"]) >= 5, "no samples")
        page = await render(dash.url, tmp_path)
    assert page.one("title").text == "asyncdist dashboard"
    assert not page.all("img"), "markup in a worker's name became an element"
    row = page.one("tr", data_wid="4")
    assert row.all("td")[0].text.startswith(evil)
    assert row.value(data_field="host") == "<b>h</b>"
    assert number(row.value(data_field="load")) == 1.5  # 3 tasks held for 2 slots
    rate = number(page.value(id="tasks-per-s"))
    assert rate > 0
    path = page.by_id("chart-rate").one("path", data_series="tasks_per_s")
    assert int(path.attrs["data-points"]) >= 3


async def test_pool_with_a_dashboard(tmp_path: Path) -> None:
    """``Pool(dashboard=PORT)`` shows its in-process broker, and closes the page with the pool."""
    async with asyncdist.Pool(workers=1, dashboard=0) as pool:
        dash = pool.dashboard
        assert isinstance(dash, Dashboard)
        assert await pool.map(T.square, range(4)) == [0, 1, 4, 9]
        await eventually(lambda: dash.snapshot()["completed"] == 4, "the dashboard did not see the tasks")
        page = await render(dash.url, tmp_path)
        check_page_matches(page, broker_of(pool).status())
        port = dash.port
    async with client() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await get_json(session, f"http://127.0.0.1:{port}/api/status")


# -- the JSON API -----------------------------------------------------------------------------------------


async def test_json_api_history_and_tasks_per_second(tmp_path: Path) -> None:
    async with (
        asyncdist.Pool(workers=2) as pool,
        Dashboard(pool.address, secret=pool.secret, port=0, interval=INTERVAL) as dash,
        client() as session,
    ):
        broker = broker_of(pool)
        api = f"{dash.url}api/status"
        await eventually(lambda: dash.snapshot()["broker"]["reachable"] is True, "no first sample")
        first = await get_json(session, api)
        assert first["broker"] == {
            "address": pool.address,
            "reachable": True,
            "error": None,
            "last_ok": first["broker"]["last_ok"],
        }
        assert first["stale"] is False
        assert first["workers"] == 2
        assert first["slots"] == 2
        assert first["interval"] == INTERVAL
        assert first["history_size"] == 300
        assert first["mapreduce"] is None

        results = await pool.map(T.slow_square, range(60), [0.01] * 60)
        assert results == [x * x for x in range(60)]
        await settled(dash, broker)
        data = await get_json(session, api)
        now = broker.status()
        assert comparable(data["status"]) == comparable(now)
        for name in ("completed", "failed", "cancelled", "requeued", "workers_lost"):
            assert data[name] == now["stats"][name], name
        for name in ("queued", "running", "clients"):
            assert data[name] == now[name], name
        assert (data["workers"], data["slots"]) == (2, 2)
        history = data["history"]
        assert [s["t"] for s in history] == sorted(s["t"] for s in history)
        assert history[-1]["completed"] == 60
        assert max(s["tasks_per_s"] or 0 for s in history) > 0, "tasks/s never rose"
        # Each rate is the difference of the completed counter over the time between samples.
        for before, after in itertools.pairwise(history):
            expected = (after["completed"] - before["completed"]) / (after["t"] - before["t"])
            assert after["tasks_per_s"] == pytest.approx(expected, abs=1e-3)
        assert data["tasks_per_s"] == 0

        # ?since= gives only newer samples (what the page asks for after loading).
        cut = history[-3]["t"]
        newer = await get_json(session, api, params={"since": str(cut)})
        assert newer["history"]
        assert all(s["t"] > cut for s in newer["history"])
        async with session.get(api, params={"since": "soon"}) as response:
            assert response.status == 400

        # The page embeds the same snapshot for its first paint, and forbids everything but itself.
        async with session.get(dash.url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            csp = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp
            assert "connect-src 'self'" in csp
            assert response.headers["X-Frame-Options"] == "DENY"
            html = await response.text()
        assert '<script type="application/json" id="initial">' in html
        assert "</script><script>" not in html.split('id="initial">')[1].split("</script>")[0]

        # DNS rebinding: a page on another origin resolved to 127.0.0.1 is refused.
        async with session.get(api, headers={"Host": f"evil.example:{dash.port}"}) as response:
            assert response.status == 403
        async with session.get(api, headers={"Host": f"localhost:{dash.port}"}) as response:
            assert response.status == 200


# -- an unreachable broker --------------------------------------------------------------------------------


async def test_unreachable_broker_is_shown_and_recovers(tmp_path: Path, secret: str) -> None:
    broker, server = await serve_broker("127.0.0.1", 0, secret=secret)
    port = server.port
    try:
        async with Dashboard(f"127.0.0.1:{port}", secret=secret, port=0, interval=INTERVAL) as dash:
            await eventually(lambda: dash.snapshot()["broker"]["reachable"] is True, "no first sample")
            await server.aclose()
            broker.close()

            def refused() -> bool:  # (the first failed sample may say the connection was closed)
                snap = dash.snapshot()
                return (
                    snap["broker"]["reachable"] is False
                    and snap["broker"]["error"].startswith("[Errno 111]")
                    and snap["history"][-1]["completed"] is None
                )

            await eventually(refused, "not seen as lost")
            snap = dash.snapshot()
            assert snap["stale"] is True
            assert snap["status"] is not None  # the last state seen is kept ...
            assert snap["history"][-1]["completed"] is None  # ... and the charts show a gap

            page = await render(dash.url, tmp_path)
            assert page.by_id("broker-state").attrs["data-state"] == "unreachable"
            alert = page.by_id("alert")
            assert "hidden" not in alert.attrs
            assert f"Cannot reach the broker at 127.0.0.1:{port}" in alert.text
            assert "stale" in page.one("body").attrs.get("class", "")

            # The broker comes back on the same port: the dashboard reconnects by itself.
            broker, server = await serve_broker("127.0.0.1", port, secret=secret)
            await eventually(lambda: dash.snapshot()["broker"]["reachable"] is True, "did not recover")
            page = await render(dash.url, tmp_path)
            assert page.by_id("broker-state").attrs["data-state"] == "ok"
            assert "hidden" in page.by_id("alert").attrs
            check_page_matches(page, dash.snapshot()["status"])
    finally:
        await server.aclose()
        broker.close()


async def test_a_failing_source_never_stops_the_server(tmp_path: Path) -> None:
    calls = 0

    async def flaky() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError(f"boom {calls}\nsecond line")
        return {"stats": {"completed": calls}, "queued": 0, "running": 0, "clients": 0, "workers": []}

    async def wrong() -> Any:
        return ["not", "a", "map"]

    async with (
        Dashboard(flaky, port=0, interval=INTERVAL) as dash,
        Dashboard(wrong, port=0, interval=INTERVAL) as bad,
        client() as session,
    ):
        await eventually(lambda: calls >= 6, "sampling stopped")
        data = await get_json(session, f"{dash.url}api/status")
        assert data["broker"]["address"] is None
        await eventually(lambda: dash.snapshot()["broker"]["reachable"] is False, "no failed sample")
        error = dash.snapshot()["broker"]["error"]
        assert error.startswith("boom")
        assert "\n" not in error
        await eventually(lambda: dash.snapshot()["broker"]["reachable"] is True, "no good sample")
        await eventually(lambda: bad.snapshot()["broker"]["error"] is not None, "no error")
        assert "not a map" in bad.snapshot()["broker"]["error"]
        data = await get_json(session, f"{bad.url}api/status")
        assert data["status"] is None
        assert data["workers"] is None
        assert data["completed"] is None
        page = await render(bad.url, tmp_path)
        assert page.by_id("broker-state").attrs["data-state"] == "unreachable"
        assert page.by_id("workers-body").text == "No workers connected"


# -- the loopback rule ------------------------------------------------------------------------------------


def test_non_loopback_address_needs_insecure() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        with pytest.raises(ConfigurationError, match="no authentication"):
            Dashboard("127.0.0.1:5555", host=host)
    Dashboard("127.0.0.1:5555", host="0.0.0.0", insecure=True)  # an explicit choice (not started here)
    Dashboard("127.0.0.1:5555", host="localhost")
    Dashboard("127.0.0.1:5555", host="::1")
    with pytest.raises(ValueError, match="interval"):
        Dashboard("127.0.0.1:5555", interval=0)
    with pytest.raises(ValueError, match="history"):
        Dashboard("127.0.0.1:5555", history=1)
    with pytest.raises(ValueError, match="needs a port"):
        Dashboard("127.0.0.1")
    with pytest.raises(TypeError):
        Dashboard(42)  # type: ignore[arg-type]


# -- MapReduce jobs ---------------------------------------------------------------------------------------


def hold_map(record: str, params: Any) -> Iterator[tuple[str, int]]:
    """Map a word; the record ``block`` waits for the release file (at most 30 s) first."""
    if record == "block":
        deadline = time.monotonic() + 30
        while not os.path.exists(params) and time.monotonic() < deadline:
            time.sleep(0.02)
    yield record, 1


def count_reduce(pairs: Any, params: Any) -> Iterator[tuple[str, int]]:
    from asyncdist.mapreduce import kvgroup

    for key, counts in kvgroup(pairs):
        yield key, sum(counts)


class MapReduceSetup:
    """A local MapReduce cluster (one slave) and a broker, for a dashboard with a master."""

    def __init__(self, master: Any, server: Any, secret: Any) -> None:
        self.master = master
        self.server = server
        self.secret = secret

    def dashboard(self) -> Dashboard:
        host, port = self.master.address
        return Dashboard(
            f"127.0.0.1:{self.server.port}",
            secret=self.secret,
            master=f"{host}:{port}",
            port=0,
            interval=INTERVAL,
        )


@contextlib.asynccontextmanager
async def mapreduce_setup() -> AsyncIterator[MapReduceSetup]:
    try:
        cluster = await local_cluster(slaves=1)
        assert cluster.master is not None
        broker, server = await serve_broker("127.0.0.1", 0, secret=cluster.secret)
        try:
            yield MapReduceSetup(cluster.master, server, cluster.secret)
        finally:
            await server.aclose()
            broker.close()
    finally:
        await shutdown_local_cluster()


async def test_mapreduce_jobs_are_shown(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with mapreduce_setup() as setup:
        try:
            master = setup.master
            host, port = master.address
            # One slave, one task at a time, inputs in order: two maps finish, the third blocks.
            job = await Job(name="dash-words").run(
                input=[["alpha"], ["beta"], ["block"]], map=hold_map, reduce=count_reduce, params=str(release)
            )
            assert job.id is not None

            def progress() -> Any:
                info = master.status()["jobs"].get(job.id)
                return info and info["map"] == [2, 3]

            await eventually(progress, "two of the three maps did not finish", timeout=30)
            async with setup.dashboard() as dash:
                await eventually(lambda: dash.snapshot()["mapreduce"]["reachable"] is True, "no master")
                mr = dash.snapshot()["mapreduce"]
                assert mr["address"] == f"{host}:{port}"
                assert len(mr["slaves"]) == 1
                assert mr["jobs"] == [
                    {
                        "id": job.id,
                        "name": "dash-words",
                        "phases": [
                            {"name": "map", "done": 2, "total": 3},
                            {"name": "reduce", "done": 0, "total": 1},
                        ],
                        "done": False,
                        "state": "running",
                        "error": None,
                    }
                ]
                page = await render(dash.url, tmp_path)
                assert "hidden" not in page.by_id("mr-panel").attrs
                assert page.value(id="mr-slaves") == "1"
                assert page.value(id="mr-jobs-count") == "1"
                assert page.by_id("mr-state").attrs["data-state"] == "ok"
                row = page.one("tr", data_job=job.id)
                assert row.all("td")[0].text.startswith("dash-words")
                phase = row.one(data_field="phase-map")
                assert (phase.attrs["data-done"], phase.attrs["data-total"]) == ("2", "3")
                phase = row.one(data_field="phase-reduce")
                assert (phase.attrs["data-done"], phase.attrs["data-total"]) == ("0", "1")
                assert row.one(data_field="state").text == "running"

                release.write_text("go")
                await job.wait(timeout=30 * SCALE)

                def finished() -> bool:
                    jobs = dash.snapshot()["mapreduce"]["jobs"]
                    return bool(jobs) and jobs[0]["done"] is True

                await eventually(finished, "the job is not shown as done")
                page = await render(dash.url, tmp_path)
                assert page.one("tr", data_job=job.id).one(data_field="state").text == "done"
        finally:
            release.write_text("go")  # a blocked map would hold the slave at shutdown


def failing_map(record: str, params: Any) -> Iterator[tuple[str, int]]:
    raise ValueError(f"cannot map <{record}> & more")
    yield record, 1  # a generator, like every map function


async def test_a_failed_mapreduce_job_is_shown_failed_with_its_error(tmp_path: Path) -> None:
    async with mapreduce_setup() as setup:
        job = await Job(name="dash-bad").run(input=[["x"]], map=failing_map, max_attempts=1)
        with pytest.raises(ValueError):
            await job.wait(timeout=30 * SCALE)
        async with setup.dashboard() as dash:
            await eventually(lambda: dash.snapshot()["mapreduce"]["jobs"], "no job shown")
            [shown] = dash.snapshot()["mapreduce"]["jobs"]
            assert (shown["id"], shown["state"], shown["done"]) == (job.id, "failed", False)
            assert shown["error"] == "ValueError: cannot map <x> & more"
            page = await render(dash.url, tmp_path)
            badge = page.one("tr", data_job=job.id).one(data_field="state")
            assert badge.text == "failed"
            assert badge.attrs["title"] == "ValueError: cannot map <x> & more"
            assert "failed" in badge.attrs["class"].split()
            # The table of `asyncdist status` says the same.
            text = format_status(dash.snapshot()["status"], setup.master.status())
            row = next(line for line in text.splitlines() if line.startswith(str(job.id)))
            assert row.endswith("failed (ValueError: cannot map <x> & more)"), row
        await job.purge()


# -- closing ----------------------------------------------------------------------------------------------


def established_to(port: int) -> int:
    """Established TCP sockets of this process to or from ``port`` (both ends count when both
    are here), from /proc/net/tcp."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            ports = {int(local.split(":")[1], 16), int(remote.split(":")[1], 16)}
            if port in ports and inode in inodes and state == "01":  # ESTABLISHED
                count += 1
    return count


async def test_aclose_leaves_nothing_running(secret: str) -> None:
    broker, server = await serve_broker("127.0.0.1", 0, secret=secret)
    hang = asyncio.Event()

    async def never() -> dict[str, Any]:
        await hang.wait()
        raise AssertionError("unreachable")

    try:
        dash = Dashboard(
            f"127.0.0.1:{server.port}", secret=secret, master=never, port=0, interval=INTERVAL, timeout=30
        )
        assert "not started" in repr(dash)
        await dash.start()
        assert await dash.start() is dash  # idempotent
        port = dash.port
        async with client() as session:
            # A master that never answers holds one sample; the broker is asked meanwhile.
            await eventually(lambda: dash.snapshot()["broker"]["reachable"] is True, "no sample")
            await get_json(session, f"{dash.url}api/status")  # a kept-alive HTTP connection
            assert established_to(server.port) >= 1  # the dashboard's connection to the broker
            tasks_before = {t for t in asyncio.all_tasks() if not t.done()}
            started = time.monotonic()
            await dash.aclose()
            assert time.monotonic() - started < 5 * SCALE, "aclose waited for the hung sample"
            await dash.aclose()  # idempotent
            assert "closed" in repr(dash)
            left = {t for t in asyncio.all_tasks() if not t.done()} - {asyncio.current_task()}
            assert not {t for t in left if t in tasks_before and "dashboard" in repr(t)}
            with pytest.raises(aiohttp.ClientConnectionError):
                await get_json(session, f"http://127.0.0.1:{port}/api/status")
        await eventually(lambda: established_to(server.port) == 0, "the broker connection is still open")
        with pytest.raises(RuntimeError, match="closed"):
            await dash.start()
    finally:
        await server.aclose()
        broker.close()


async def test_port_in_use_raises_and_leaks_nothing() -> None:
    async def status() -> dict[str, Any]:
        return {"stats": {}, "workers": []}

    async with Dashboard(status, port=0) as first:
        second = Dashboard(status, port=first.port)
        with pytest.raises(OSError):
            await second.start()
        await second.aclose()


async def test_pool_dashboard_moves_off_a_taken_default_port() -> None:
    """``Pool(dashboard=True)`` takes 8787, or a free port when another dashboard has it."""

    async def status() -> dict[str, Any]:
        return {"stats": {}, "workers": []}

    holder = Dashboard(status, port=8787)
    try:
        await holder.start()
    except OSError:
        pytest.skip("port 8787 is in use by another program here")
    try:
        async with asyncdist.Pool(workers=0, dashboard=True) as pool:
            dash = pool.dashboard
            assert isinstance(dash, Dashboard)
            assert dash.port not in (0, 8787)
            async with client() as session:
                body = await get_json(session, f"http://127.0.0.1:{dash.port}/api/status")
            assert body["workers"] == 0
        assert pool.dashboard is None
    finally:
        await holder.aclose()


async def test_without_aiohttp_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    async def status() -> dict[str, Any]:
        return {"stats": {}, "workers": []}

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp now raises ImportError
    dash = Dashboard(status, port=0)
    with pytest.raises(asyncdist.ConfigurationError, match=r"asyncdist\[dashboard\]"):
        await dash.start()
    await dash.aclose()


# -- found with the dashboard --------------------------------------------------------------------------------


async def test_a_worker_fills_all_its_slots_with_long_tasks(tmp_path: Path) -> None:
    async with asyncdist.Pool(workers=1, slots=2) as pool:
        broker = broker_of(pool)
        # Let the broker measure the function: about 0.2 s a call.
        await pool.map(T.blocking_sleep, [str(tmp_path)] * 2, ["warm-a", "warm-b"], [0.2, 0.2])
        futures = [pool.submit(T.blocking_sleep, str(tmp_path), f"long-{i}", 3.0 * SCALE) for i in range(2)]
        try:

            def both_started() -> bool:
                return all(T.markers(tmp_path, "started", f"long-{i}") for i in range(2))

            await eventually(both_started, "the second slot stayed idle", timeout=2.0)
            assert broker.status()["workers"][0]["running"] == 2
        finally:
            await asyncio.gather(*futures)


# -- the command line -------------------------------------------------------------------------------------


async def test_dashboard_command(tmp_path: Path, secret: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    broker, server = await serve_broker("127.0.0.1", 0, secret=secret)
    log = tmp_path / "dashboard.log"
    web_port = free_port()
    cmd = [sys.executable, "-m", "asyncdist", "dashboard", "--broker", f"127.0.0.1:{server.port}"]
    cmd += ["--port", str(web_port), "--interval", "0.1", "--secret-file", str(secret_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    try:
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=out, stderr=out, env=env)
        try:
            url = f"http://127.0.0.1:{web_port}/"
            await eventually(lambda: url in log.read_text(), "no banner with the URL", timeout=20)
            async with client() as session:

                async def answered() -> bool:
                    data = await get_json(session, f"{url}api/status")
                    return data["broker"]["reachable"] is True

                await eventually(answered, "the command's dashboard never reached the broker")
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10 * SCALE):
                assert await proc.wait() == 0, log.read_text()
        finally:
            await stop(proc)
    finally:
        await server.aclose()
        broker.close()

    refused = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncdist", "dashboard", "--broker", "127.0.0.1:1", "--host", "0.0.0.0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await refused.communicate()
    assert refused.returncode == 1
    assert err.decode().startswith("asyncdist: error: refusing to serve the dashboard on '0.0.0.0'")
    assert err.decode().count("\n") == 1
