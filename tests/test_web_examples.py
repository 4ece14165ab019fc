"""The web examples (examples/web/): HTTP services whose handlers await asyncdist clients.

Each app is served for real on 127.0.0.1 in the test's event loop (FastAPI by
``uvicorn.Server``, aiohttp by ``web.AppRunner`` and ``web.TCPSite``) and gets 200
concurrent requests from ``httpx`` that mix every endpoint; each answer's status and body
are checked exactly. The lifespan (FastAPI) and the cleanup context (aiohttp) must open the
clients at startup, share them between requests, and close them at shutdown: the pool
closed and its worker processes reaped, the proxy's and the RPC connections closed. With
``ASYNCDIST_BROKER`` / ``ASYNCDIST_SHOP_URI`` / ``ASYNCDIST_RPC_ADDR`` set, the apps use the
servers named there and start none of their own. Finally each example runs as a script
(``python examples/web/X.py --port P``), answers, and exits cleanly on Ctrl-C (SIGINT to
its process group) and on SIGTERM, its workers reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from _util import SCALE, alive, conn_of, eventually, finish, free_port, pids_with_env, stop
from aiohttp import web

import asyncdist
from asyncdist import rpc

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "examples" / "web"
#: Bound of a server's start or shutdown (scaled).
BOUND = 30 * SCALE

PRICES = {"apple": 120, "pear": 150, "plum": 80}  # the demo Shop's
ITEMS = [*PRICES, "kiwi"]  # kiwi: not sold (404)


def with_vat(cents: int, percent: int = 20) -> int:
    return cents * (100 + percent) // 100


@dataclass(frozen=True)
class Answer:
    """An expected answer: a status and a JSON body, or a text body."""

    status: int
    json: Any = None
    text: str | None = None

    def check(self, path: str, response: httpx.Response) -> None:
        assert response.status_code == self.status, (path, response.status_code, response.text)
        if self.text is not None:
            assert response.text == self.text, (path, response.text)
        else:
            assert response.headers["content-type"].startswith("application/json"), path
            assert response.json() == self.json, (path, response.text)


# -- the two examples, behind one interface ------------------------------------------------------


@dataclass(frozen=True)
class Example:
    name: str
    module: ModuleType

    @property
    def services(self) -> ModuleType:
        """What both examples share (examples/web/services.py): tasks, demo servers, clients."""
        return importlib.import_module("services")

    def new_app(self) -> Any:
        """The app as a server runs it (FastAPI's is the module's ``app``; aiohttp's is made)."""
        return self.module.app if self.name == "fastapi_app" else self.module.create_app()

    def clients(self, app: Any) -> Any:
        """The clients the app opened (None before its first startup)."""
        if self.name == "fastapi_app":
            return getattr(app.state, "clients", None)
        return app.get(self.module.CLIENTS)

    def not_found(self, item: str) -> Answer:
        if self.name == "fastapi_app":
            return Answer(404, json={"detail": f"no such item: {item}"})
        return Answer(404, text=f"no such item: {item}")

    def serving(self, app: Any) -> contextlib.AbstractAsyncContextManager[str]:
        return uvicorn_serving(app) if self.name == "fastapi_app" else aiohttp_serving(app)


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any) -> AsyncIterator[str]:
    """Serve a FastAPI app with uvicorn on a free port (lifespan on); yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), "uvicorn did not start", BOUND)
        assert server.started, "uvicorn stopped during startup (did the lifespan fail?)"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await finish(task, BOUND, "uvicorn's shutdown")


@contextlib.asynccontextmanager
async def aiohttp_serving(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on a free port (its cleanup contexts run); yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await finish(runner.setup(), BOUND, "aiohttp's startup")
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await finish(runner.cleanup(), BOUND, "aiohttp's cleanup")


@pytest.fixture(params=["fastapi_app", "aiohttp_app"])
def example(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Example:
    """An example module, imported by its name from examples/web/ (on sys.path, which the
    pool's workers inherit: its functions travel by reference, as in a real deployment)."""
    monkeypatch.syspath_prepend(str(WEB))
    return Example(request.param, importlib.import_module(request.param))


def http_client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=BOUND)


# -- the requests and their answers --------------------------------------------------------------


def mixed_requests(example: Example, count: int = 200) -> list[tuple[str, Answer, int]]:
    """``count`` requests over every endpoint (shuffled): (path, answer, tasks it maps)."""
    out: list[tuple[str, Answer, int]] = []
    for i in range(count):
        item, n, cents, tasks = ITEMS[i % len(ITEMS)], i % 23, 7 * i, 0
        sold = item in PRICES
        kind = i % 5
        if kind == 0:
            path, answer = "/health", Answer(200, json={"status": "ok"})
        elif kind == 1:
            path, answer = f"/square?n={n}", Answer(200, json={"n": n, "squares": [x * x for x in range(n)]})
            tasks = n
        elif kind == 2:
            path, answer = f"/shop/{item}", example.not_found(item)
            if sold:
                answer = Answer(200, json={"item": item, "cents": PRICES[item]})
        elif kind == 3:
            vat = {"cents": cents, "with_vat": with_vat(cents)}
            path, answer = f"/rpc/vat?cents={cents}", Answer(200, json=vat)
        else:
            path, answer = f"/combined?item={item}&n={n}", example.not_found(item)
            if sold:
                body = {"item": item, "cents": PRICES[item], "with_vat": with_vat(PRICES[item])}
                answer, tasks = Answer(200, json={**body, "squares": [x * x for x in range(n)]}), n
        out.append((path, answer, tasks))
    random.Random(9).shuffle(out)
    return out


async def send_all(url: str, requests: list[tuple[str, Answer, int]]) -> None:
    """Send every request at once and check every answer."""
    async with http_client(url) as client:
        responses = await asyncio.gather(*(client.get(path) for path, _, _ in requests))
    for (path, answer, _), response in zip(requests, responses, strict=True):
        answer.check(path, response)


async def completed_tasks(pool: asyncdist.Pool) -> int:
    status = await pool.status()
    done: int = status["stats"].get("completed", 0)
    return done


def gone(pid: int) -> bool:
    """The process has exited and been reaped (a zombie still has its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def expected_nice(increment: int = 10) -> int:
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment)


# -- in this process -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_200_concurrent_requests(example: Example) -> None:
    """Every endpoint at once, 200 requests in flight on one pool, one proxy and one RPC connection."""
    app = example.new_app()
    requests = mixed_requests(example)
    async with example.serving(app) as url:
        clients = example.clients(app)
        shop_conn, rpc_conn = conn_of(clients.shop), clients.pricing.conn
        before = await completed_tasks(clients.pool)
        await send_all(url, requests)
        # Every task mapped ran once; the requests shared the connections opened at startup.
        assert await completed_tasks(clients.pool) - before == sum(n for _, _, n in requests)
        assert conn_of(clients.shop) is shop_conn
        assert shop_conn is not None
        assert not shop_conn.closed
        assert clients.pricing.conn is rpc_conn
        assert not clients.pricing.closed
        await send_all(url, requests[:20])  # and they still serve after the burst


@pytest.mark.timeout(120)
async def test_the_clients_open_at_startup_and_close_at_shutdown(example: Example) -> None:
    app = example.new_app()
    earlier = example.clients(app)  # FastAPI's module-level app may have run in another test
    async with example.serving(app) as url:
        clients = example.clients(app)
        assert isinstance(clients, example.services.Clients)
        assert clients is not earlier
        # Open before the first request: a local pool with 2 workers at nice 10, and connections.
        assert not clients.pool.closed
        assert clients.pool.workers == 2
        pids = [w["pid"] for w in (await clients.pool.status())["workers"]]
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [expected_nice()] * 2
        shop_conn = conn_of(clients.shop)
        assert shop_conn is not None
        assert not shop_conn.closed
        assert not clients.pricing.closed
        async with http_client(url) as client:
            Answer(200, json={"item": "plum", "cents": 80, "with_vat": 96, "squares": [0, 1]}).check(
                "/combined", await client.get("/combined", params={"item": "plum", "n": 2})
            )
    assert clients.pool.closed
    assert [pid for pid in pids if not gone(pid)] == [], "workers not reaped at shutdown"
    assert conn_of(clients.shop) is None
    assert shop_conn.closed
    assert clients.pricing.closed
    with pytest.raises(asyncdist.ConnectionClosed):
        await clients.pool.map(example.services.square, [1])


@pytest.mark.timeout(120)
async def test_the_service_answers_while_the_workers_compute(example: Example) -> None:
    """Both workers busy with a long map: /health and the shop still answer at once."""
    app = example.new_app()
    ms = int(2000 * SCALE)
    async with example.serving(app) as url, http_client(url) as client:
        pool = example.clients(app).pool

        async def running() -> bool:
            status = await pool.status()
            return bool(status["running"] == 2)

        busy = asyncio.create_task(client.get("/spin", params={"tasks": 2, "ms": ms}))
        try:
            await eventually(running, "the workers did not start the spin tasks", BOUND)
            Answer(200, json={"status": "ok"}).check("/health", await client.get("/health"))
            pear = await client.get("/shop/pear")
            Answer(200, json={"item": "pear", "cents": 150}).check("/shop/pear", pear)
            assert not busy.done(), f"/spin answered before the other requests ({ms} ms of work)"
            Answer(200, json={"tasks": 2, "ms": ms}).check("/spin", await finish(busy, BOUND, "/spin"))
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)


class TenPercent(rpc.Service):
    def exposed_with_vat(self, cents: int) -> int:
        return with_vat(cents, 10)


@pytest.mark.timeout(120)
async def test_servers_named_by_the_environment(
    example: Example, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    """With ASYNCDIST_BROKER, _SECRET, _SHOP_URI and _RPC_ADDR set, the app joins those servers
    (here: a cluster, a daemon and an RPC server of this test) and starts none of its own."""
    shop = example.services.Shop({"apple": 1000, "fig": 7})
    async with (
        asyncdist.Pool(workers=1, secret=secret) as cluster,
        asyncdist.Daemon(secret=secret) as daemon,
        rpc.serve(TenPercent, port=0, secret=secret) as pricing,
    ):
        monkeypatch.setenv("ASYNCDIST_BROKER", cluster.address or "")
        monkeypatch.setenv("ASYNCDIST_SECRET", secret)
        monkeypatch.setenv("ASYNCDIST_SHOP_URI", daemon.register(shop))
        monkeypatch.setenv("ASYNCDIST_RPC_ADDR", f"127.0.0.1:{pricing.port}")
        app = example.new_app()
        before = await completed_tasks(cluster)
        async with example.serving(app) as url, http_client(url) as client:
            clients = example.clients(app)
            assert clients.pool.workers is None  # joined, not local
            assert clients.pool.address == cluster.address
            await eventually(lambda: len(daemon.server.connections) == 1, "no proxy connection")
            await eventually(lambda: len(pricing.connections) == 1, "no RPC connection")
            answers = await asyncio.gather(
                *(client.get("/combined", params={"item": "fig", "n": n}) for n in range(10))
            )
            for n, response in enumerate(answers):
                body = {"item": "fig", "cents": 7, "with_vat": 7, "squares": [x * x for x in range(n)]}
                Answer(200, json=body).check(f"/combined?n={n}", response)
            example.not_found("pear").check("/shop/pear", await client.get("/shop/pear"))
            Answer(200, json={"cents": 1000, "with_vat": 1100}).check(
                "/rpc/vat", await client.get("/rpc/vat", params={"cents": 1000})
            )
        assert await completed_tasks(cluster) - before == sum(range(10))  # on the cluster's worker
        # The app's shutdown closed its connections to the servers, which serve on.
        await eventually(lambda: not daemon.server.connections, "the proxy's connection stayed open")
        await eventually(lambda: not pricing.connections, "the RPC connection stayed open")
        assert await cluster.map(example.services.square, [3]) == [9]


@pytest.mark.timeout(120)
async def test_a_failed_startup_leaves_nothing_behind(
    example: Example, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Shop cannot be reached: the app does not start, and what it had opened (the demo RPC
    server, the pool and its workers) is closed again (the leak checks see the workers)."""
    monkeypatch.setenv("ASYNCDIST_SHOP_URI", f"adist:{'0' * 32}@127.0.0.1:{free_port()}")
    app = example.new_app()
    earlier = example.clients(app)  # FastAPI's module-level app may have run in another test
    if example.name == "fastapi_app":
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None)
        server = uvicorn.Server(config)
        with contextlib.suppress(SystemExit):  # uvicorn >= 0.30 exits with its STARTUP_FAILURE
            await finish(server.serve(), BOUND, "uvicorn's failed startup")
        assert not server.started
    else:
        runner = web.AppRunner(app)
        with pytest.raises(asyncdist.ConnectError, match="cannot reach"):
            await finish(runner.setup(), BOUND, "aiohttp's failed startup")
        await runner.cleanup()
    assert example.clients(app) is earlier  # no clients were published


# -- as scripts --------------------------------------------------------------------------------------

#: How each example's process ends: (exit code on Ctrl-C, on SIGTERM). uvicorn shuts down, then
#: re-raises SIGTERM with its default action (the process ends "killed by SIGTERM", after the
#: app's shutdown), and turns SIGINT into a normal exit; aiohttp's run_app exits 0 on both.
EXIT_CODES = {"fastapi_app": (0, -signal.SIGTERM), "aiohttp_app": (0, 0)}


async def is_up(client: httpx.AsyncClient, proc: asyncio.subprocess.Process) -> bool:
    if proc.returncode is not None:
        raise AssertionError(f"the example exited with code {proc.returncode} before answering")
    try:
        response = await client.get("/health")
    except httpx.TransportError:
        return False
    return response.status_code == 200


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
@pytest.mark.parametrize("name", ["fastapi_app", "aiohttp_app"])
async def test_the_script(name: str, how: str, tmp_path: Path) -> None:
    """``python examples/web/NAME.py --port P``: serves, then stops cleanly, workers reaped."""
    port, mark = free_port(), uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    env["WEB_EXAMPLE_TEST"] = mark  # inherited by the app's workers: how we find them
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WEB / f"{name}.py"),
            "--port",
            str(port),
            cwd=tmp_path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, as in a terminal
        )
    try:
        async with http_client(f"http://127.0.0.1:{port}") as client:
            await eventually(lambda: is_up(client, proc), f"{name} did not answer /health", BOUND)
            body = {"item": "pear", "cents": 150, "with_vat": 180, "squares": [0, 1, 4, 9, 16, 25, 36]}
            Answer(200, json=body).check("/combined", await client.get("/combined?item=pear&n=7"))
            Answer(200, json={"tasks": 3, "ms": 5}).check("/spin", await client.get("/spin?tasks=3&ms=5"))
        workers = [pid for pid in pids_with_env("WEB_EXAMPLE_TEST", mark) if pid != proc.pid]
        assert len(workers) == 2, workers
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in workers] == [expected_nice()] * 2
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole group
        else:
            proc.send_signal(signal.SIGTERM)  # a service manager's stop: the main process
        await finish(proc.wait(), BOUND, f"{name} after {how}")
        # Reaped by the app itself before it exited: none left, not even as a zombie.
        assert [pid for pid in workers if alive(pid)] == []
    finally:
        await stop(proc)
    log = stderr.read_text()
    assert proc.returncode == EXIT_CODES[name][how == "sigterm"], log
    assert "asyncdist clients open" in log
    assert "asyncdist clients closed" in log, log
    assert "Traceback" not in log, log
    if name == "fastapi_app":
        assert "Application shutdown complete." in log, log


def test_every_web_example_is_tested() -> None:
    # services.py is what both share: the tests above run it through each app.
    assert {p.name for p in WEB.glob("*.py")} == {"fastapi_app.py", "aiohttp_app.py", "services.py"}
