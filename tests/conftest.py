"""Shared fixtures: leak checks after every test, both event loops, time scaling.

After each test: no new threads, no new open file descriptors, no child
processes left, no asyncio tasks still pending (checked inside the test's
loop). Time in tests is a unit scaled by ``ASYNCDIST_TEST_TIME_SCALE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: Multiply every test delay and bound by this (slow CI machines: 2 or more).
SCALE = float(os.environ.get("ASYNCDIST_TEST_TIME_SCALE", "1"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run this async test on the asyncio loop and on uvloop")
    config.addinivalue_line("markers", "slow: a slow test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "no_leak_check: skip the leak checks (the test does its own)")
    # uvloop opens a process-wide pipe with its first loop: open it before any baseline.
    import uvloop

    loop = uvloop.new_event_loop()
    loop.close()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any] | None:
    """Run tests marked ``both_loops`` on both loops; the rest on the asyncio loop."""
    import uvloop

    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _fds() -> set[int]:
    try:
        return {int(n) for n in os.listdir("/proc/self/fd")}
    except OSError:  # pragma: no cover - not Linux
        return set()


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _children() -> set[int]:
    kids: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                kids.update(int(p) for p in f.read().split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return kids


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves threads, file descriptors or child processes behind."""
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    threads = set(threading.enumerate())
    fds = _fds()
    children = _children()
    yield
    deadline = time.monotonic() + 2 * SCALE
    while True:
        gc.collect()
        new_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        new_fds = sorted(_fds() - fds)
        new_children = sorted(_children() - children)
        if not (new_threads or new_fds or new_children) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    problems = []
    if new_threads:
        problems.append(f"threads left running: {new_threads}")
    if new_fds:
        problems.append(f"file descriptors left open: {[(fd, _fd_target(fd)) for fd in new_fds]}")
    if new_children:
        problems.append(f"child processes left: {new_children}")
        for pid in new_children:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Wrap every async test so that it fails if it leaves asyncio tasks pending."""
    for item in items:
        func = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(func) and not item.get_closest_marker("no_leak_check"):
            item.obj = _with_task_check(func)  # type: ignore[attr-defined]


def _with_task_check(func: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        await func(*args, **kwargs)
        current = asyncio.current_task()
        others: list[asyncio.Task[Any]] = []
        for _ in range(100):
            others = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
            if not others:
                return
            await asyncio.sleep(0.01)
        for task in others:
            task.cancel()
        pytest.fail(f"leak check: asyncio tasks still pending: {others}", pytrace=False)

    return wrapper


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's ASYNCDIST_* settings (secret, broker, loop)."""
    for name in list(os.environ):
        if name.startswith("ASYNCDIST_") and name != "ASYNCDIST_TEST_TIME_SCALE":
            monkeypatch.delenv(name)


@pytest.fixture
def secret() -> str:
    """A strong shared secret for tests."""
    return "test-secret-0123456789abcdef-0123456789"


@pytest.fixture
def fast() -> dict[str, float]:
    """Connection options with short timers (scaled), for heartbeat and timeout tests."""
    return {
        "heartbeat_interval": 0.05 * SCALE,
        "heartbeat_timeout": 0.3 * SCALE,
        "handshake_timeout": 2.0 * SCALE,
        "close_timeout": 1.0 * SCALE,
    }


@pytest.fixture
def sync_name_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A name server on :mod:`asyncdist.sync`'s loop, on a free port (``ASYNCDIST_NS_PORT``
    says where, as ``locate_ns`` reads it); closed after the test."""
    from asyncdist import sync
    from asyncdist.naming import NameServerDaemon

    nsd = NameServerDaemon(port=0)
    sync.run(nsd.start())
    monkeypatch.setenv("ASYNCDIST_NS_PORT", str(nsd.port))
    try:
        yield nsd
    finally:
        sync.run(nsd.aclose())
