"""Worker logs and prints, forwarded to the clients whose tasks made them (``Pool(forward_logs=True)``).

SCOOP's logger, re-created: while at least one client connected to the
broker asks for them, each worker sends the broker its log records (at the
lowest level asked for) and what its tasks print, and the broker passes
each on to the client that submitted the task that made it; output made
outside any task goes to every client asking. The client re-emits records
through its own ``logging`` (``record.worker`` and ``record.host`` name
where they came from) and writes prints to its own stdout and stderr.

Entries, batched per loop iteration (worker -> broker ``log``, broker ->
client ``logs`` with the worker's name and host in front):

* ``[key, 0, {name, levelno, levelname, msg, created, ...}]``: a record,
  already formatted (``msg`` is ``getMessage()``; ``exc_text`` the traceback);
* ``[key, 1, text]`` / ``[key, 2, text]``: lines printed to stdout / stderr.

``key`` is the broker's task key of the task that made it, or None. The
broker marks the tasks of clients that ask (a log level in the ``run``
item): the output of other clients' tasks stays with the worker.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["LogForwarder", "RECORD", "STDERR", "STDOUT", "async_task_key", "reemit"]

RECORD, STDOUT, STDERR = 0, 1, 2
_MAX_TEXT = 64 * 1024
_MAX_PENDING = 10_000

#: The key of the async task running in this context (the worker sets it).
async_task_key: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "asyncdist_task_key", default=None
)

# Records of these loggers are never forwarded: sending them could log again.
_QUIET = ("asyncdist.connection", "asyncdist.security", "asyncdist.server")

_RECORD_FIELDS = ("name", "levelno", "levelname", "created", "pathname", "lineno", "funcName", "threadName")


class _Handler(logging.Handler):
    def __init__(self, forwarder: LogForwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_QUIET):
            return
        key = self.forwarder.key()
        if not self.forwarder.wants(key, record.levelno):
            return  # not asked for: the worker's own handlers show it
        try:
            data: dict[str, Any] = {k: getattr(record, k, None) for k in _RECORD_FIELDS}
            data["msg"] = record.getMessage()[:_MAX_TEXT]
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            data["exc_text"] = record.exc_text
            data["process"] = record.process
        except Exception:
            self.handleError(record)
            return
        record.asyncdist_forwarded = True
        self.forwarder.push(key, RECORD, data)


class _Stream:
    """A stand-in for sys.stdout/stderr: whole lines, per thread, go to the forwarder (or
    stay here for a task whose client does not ask); ``flush()`` sends a partial one."""

    def __init__(self, forwarder: LogForwarder, kind: int, original: TextIO) -> None:
        self._forwarder = forwarder
        self._kind = kind
        self._original = original
        self._partial: dict[int, str] = {}
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        ident = threading.get_ident()
        with self._lock:
            buffered = self._partial.pop(ident, "") + text
            cut = buffered.rfind("\n") + 1
            if cut:
                lines, rest = buffered[:cut], buffered[cut:]
            else:
                lines, rest = "", buffered
            if len(rest) > _MAX_TEXT:
                lines, rest = lines + rest, ""
            if rest:
                self._partial[ident] = rest
        if lines:
            self._emit(lines)
        return len(text)

    def flush(self) -> None:
        self.end_line()
        self._original.flush()

    def end_line(self) -> None:
        """Send the calling thread's unfinished line, if any, as it is."""
        if self._partial:
            with self._lock:
                rest = self._partial.pop(threading.get_ident(), "")
            if rest:
                self._emit(rest)

    def _emit(self, text: str) -> None:
        """Whole lines (or what a flush asked for) to the client, or here when it does not ask.

        Kept whole here too: the worker's stdout is unbuffered and shared
        (a terminal, the parent's file), where a half line would be cut
        into by what the clients and the other workers write.
        """
        key = self._forwarder.key()
        if self._forwarder.wants(key, None):
            self._forwarder.push(key, self._kind, text)
        else:
            self._original.write(text)

    def drain(self) -> None:
        with self._lock:
            parts, self._partial = list(self._partial.values()), {}
        for rest in parts:  # forwarding stops: unfinished lines stay here
            self._original.write(rest)

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class LogForwarder:
    """The worker's side: capture records and prints, send them in batches with ``send``.

    ``key_of_thread()`` names the task running in the calling thread (or
    None); ``level_of(key)`` is the level its client asks for, None when it
    does not ask (its output then stays with the worker, as without
    forwarding). Output made outside any task goes to every client asking.
    ``send(entries)`` runs on the loop; :meth:`start` and :meth:`stop` too.
    """

    def __init__(
        self,
        loop: Any,
        send: Callable[[list[list[Any]]], None],
        key_of_thread: Callable[[], int | None],
        level_of: Callable[[int], int | None],
    ) -> None:
        self._loop = loop
        self._send = send
        self._key_of_thread = key_of_thread
        self._level_of = level_of
        self._pending: deque[list[Any]] = deque()
        self._scheduled = False
        self._handler: _Handler | None = None
        self._streams: tuple[_Stream, _Stream] | None = None
        self._saved_level: int | None = None
        self.level = 0

    @property
    def active(self) -> bool:
        return self._handler is not None

    def key(self) -> int | None:
        """The task running here (this thread, or this async task's context), if any."""
        key = self._key_of_thread()
        return key if key is not None else async_task_key.get()

    def wants(self, key: int | None, levelno: int | None) -> bool:
        """Whether output of task ``key`` (a record at ``levelno``, or a print: None) goes out."""
        if self._handler is None:
            return False
        level = self.level if key is None else self._level_of(key)
        return level is not None and (levelno is None or levelno >= level)

    def push(self, key: int | None, kind: int, data: Any) -> None:
        """Queue one entry (any thread); sent on the loop's next iteration."""
        if len(self._pending) >= _MAX_PENDING:
            return  # the client cannot keep up: drop rather than grow without bound
        self._pending.append([key, kind, data])
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._flush)

    def flush(self) -> None:
        """Send what is queued now (on the loop; the worker does it before sending results)."""
        pending = self._pending
        batch = [pending.popleft() for _ in range(len(pending))]
        if batch:
            self._send(batch)

    def _flush(self) -> None:
        self._scheduled = False
        self.flush()

    def end_task(self) -> None:
        """The calling thread's task ends: its unfinished lines go where its output goes
        (not onto the next task's first line, maybe another client's)."""
        streams = self._streams
        if streams is not None:
            streams[0].end_line()
            streams[1].end_line()

    def start(self, level: int) -> None:
        """Forward records at ``level`` and up, and every print; again to change the level."""
        self.level = level
        root = logging.getLogger()
        if self._handler is None:
            self._handler = _Handler(self)
            root.handlers.insert(0, self._handler)
            for handler in root.handlers[1:]:
                handler.addFilter(_not_forwarded)
            self._saved_level = root.level
            out = _Stream(self, STDOUT, sys.stdout)
            err = _Stream(self, STDERR, sys.stderr)
            self._streams = (out, err)
            sys.stdout, sys.stderr = out, err
        self._handler.setLevel(level)
        saved = self._saved_level
        if saved:  # NOTSET (0) lets every record through already
            root.setLevel(min(saved, level))

    def stop(self) -> None:
        """Stop forwarding: restore the handlers, the level, stdout and stderr."""
        handler, self._handler = self._handler, None
        if handler is None:
            return
        root = logging.getLogger()
        with contextlib.suppress(ValueError):
            root.handlers.remove(handler)
        for other in root.handlers:
            other.removeFilter(_not_forwarded)
        if self._saved_level is not None:
            root.setLevel(self._saved_level)
        self._saved_level = None
        streams, self._streams = self._streams, None
        if streams is not None:
            out, err = streams
            out.drain()
            err.drain()
            if sys.stdout is out:
                sys.stdout = out._original
            if sys.stderr is err:
                sys.stderr = err._original
        self._flush()


def _not_forwarded(record: logging.LogRecord) -> bool:
    """The worker's own handlers skip what went to a client (no double lines on a shared terminal)."""
    return not getattr(record, "asyncdist_forwarded", False)


def reemit(worker: str, host: str, entries: list[Any]) -> None:
    """The client's side: records through ``logging``, prints to this process's stdout/stderr."""
    for entry in entries:
        if not (type(entry) is list and len(entry) == 3):
            continue
        _, kind, data = entry
        if kind == RECORD and isinstance(data, dict):
            fields = {k: data.get(k) for k in (*_RECORD_FIELDS, "exc_text", "process") if k in data}
            name = fields.get("name")
            if not isinstance(name, str) or not name:
                continue
            levelno = fields.get("levelno")
            if not isinstance(levelno, int):
                continue
            record = logging.makeLogRecord(
                {**fields, "msg": str(data.get("msg", "")), "args": None, "worker": worker, "host": host}
            )
            logger = logging.getLogger(name)
            if logger.isEnabledFor(levelno):
                logger.handle(record)
        elif kind in (STDOUT, STDERR) and isinstance(data, str):
            stream = sys.stdout if kind == STDOUT else sys.stderr
            stream.write(data)
            stream.flush()
