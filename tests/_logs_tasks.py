"""Task functions for ``test_logs.py``, imported by reference on the workers.

Every task logs or prints text that carries a ``tag`` chosen by the test
(unique per client and per test), so that the test can tell whose output
reached which client. The logger of the tasks is ``myapp.tasks`` (not under
``asyncdist.``: the task code's own records). Each returns the worker's pid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time

#: The logger the tasks' own records come from.
LOGGER = "myapp.tasks"

log = logging.getLogger(LOGGER)


def log_plain(tag: str, level: int = logging.INFO) -> int:
    """A plain task (a worker thread): one record at ``level``.

    It lasts a millisecond: a worker never runs it inline on its loop (it does so with tasks
    under 20 us, whose output is then not routed by task: see test_logs.py).
    """
    log.log(level, "plain %s %s", tag, logging.getLevelName(level))
    time.sleep(0.001)
    return os.getpid()


async def log_async(tag: str, level: int = logging.INFO) -> int:
    """An ``async def`` task (the worker's loop): one record at ``level``, around awaits."""
    await asyncio.sleep(0)
    log.log(level, "async %s %s", tag, logging.getLevelName(level))
    await asyncio.sleep(0)
    return os.getpid()


def log_levels(tag: str) -> int:
    """One DEBUG, one INFO, one WARNING and one ERROR record."""
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        log.log(level, "levels %s %s", tag, logging.getLevelName(level))
    return os.getpid()


def log_exception(tag: str) -> int:
    """``log.exception`` inside an ``except`` block: the record carries the traceback."""
    try:
        raise ValueError(f"boom {tag}")
    except ValueError:
        log.exception("failed %s", tag)
    return os.getpid()


def shout(tag: str) -> int:
    """One line to stdout, one to stderr (print), and a line written in two pieces."""
    print(f"out {tag}")
    print(f"err {tag}", file=sys.stderr)
    sys.stdout.write(f"half {tag}")
    time.sleep(0.001)
    sys.stdout.write(" joined\n")
    return os.getpid()


async def async_shout(tag: str) -> int:
    """The same from an ``async def`` task (no await inside the two-piece line: concurrent
    tasks of a worker share its loop thread, whose partial line is one)."""
    await asyncio.sleep(0)
    print(f"out {tag}")
    await asyncio.sleep(0)
    print(f"err {tag}", file=sys.stderr)
    sys.stdout.write(f"half {tag}")
    sys.stdout.write(" joined\n")
    await asyncio.sleep(0)
    return os.getpid()


def quick_shout(tag: str) -> str:
    """A tiny plain task (a few microseconds): one short line to stdout; returns the name of
    the thread that ran it (a worker runs tiny tasks inline on its loop, the main thread)."""
    print(tag)
    return threading.current_thread().name


def myapp_warning(tag: str) -> int:
    """A record of the task code's own logger ``myapp`` (no asyncdist adapter involved)."""
    logging.getLogger("myapp").warning("myapp says %s", tag)
    return os.getpid()


def record_attributes(tag: str) -> dict[str, object]:
    """The ``host`` and ``worker`` attributes a plain record made in this task gets."""
    seen: dict[str, object] = {}

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen["host"] = getattr(record, "host", None)
            seen["worker"] = getattr(record, "worker", None)

    logger = logging.getLogger(f"myapp.grab.{tag}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Grab()
    logger.addHandler(handler)
    try:
        logger.info("grab %s", tag)
    finally:
        logger.removeHandler(handler)
    seen["pid"] = os.getpid()
    return seen


def two_pieces_on_cue(tag: str, folder: str) -> int:
    """Write ``half {tag}`` (no newline), create ``folder/started``, wait for ``folder/go``,
    then end the line: what others write in between must not land inside it."""
    sys.stdout.write(f"half {tag}")
    started, go = os.path.join(folder, "started"), os.path.join(folder, "go")
    with open(started, "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)  # another process's cue: a file is the simplest one to wait on
    sys.stdout.write(" joined\n")
    return os.getpid()


def unfinished_line(tag: str) -> int:
    """Print ``unfinished {tag}`` without a newline and return."""
    print(f"unfinished {tag}", end="")
    time.sleep(0.001)  # not inline on the worker's loop (see log_plain)
    return os.getpid()


def line_of(tag: str) -> int:
    """Print ``line {tag}`` (a whole line)."""
    print(f"line {tag}")
    time.sleep(0.001)
    return os.getpid()
