"""Tracing (PyCSP's ``TraceInit`` / ``TraceQuit`` / PlayTrace): a JSON-lines log of a CSP run.

``TraceInit(path)`` starts writing one JSON object per line to ``path``
(appending, so that several OS processes may share one file): process
``start`` and ``end`` (with how it ended), and every ``read``, ``write``,
``select``, ``poison`` and ``retire``, each with the time, the OS process
id, the CSP process and the channel. ``TraceQuit()`` stops and closes it.
``asyncdist csp-trace PATH`` (:func:`render`) prints a readable timeline.
"""

from __future__ import annotations

import contextvars
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO, Any, TextIO

__all__ = ["TraceInit", "TraceQuit", "current_process", "event", "read_trace", "render"]

#: The CSP process running in this context (its name), for trace records.
current_process: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "asyncdist_csp_process", default=None
)

VALUE_CHARS = 200


class _Tracer:
    def __init__(self, path: str | os.PathLike[str], stdout: bool) -> None:
        self.file: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by TraceQuit
        self.stdout = stdout
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.t0 = time.time()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=repr)
        with self.lock:
            self.file.write(line + "\n")
            if self.stdout:
                print(_format(record, self.t0), file=sys.stdout, flush=True)

    def close(self) -> None:
        with self.lock:
            self.file.close()


#: The active tracer (None: tracing is off; checked on every channel operation, so cheap).
tracer: _Tracer | None = None


def TraceInit(path: str | os.PathLike[str] = "csp_trace.jsonl", stdout: bool = False) -> None:
    """Start tracing this OS process's CSP processes and channel operations to ``path`` (JSON lines).

    Appends to ``path`` (several processes may trace into one file).
    ``stdout=True`` also prints each record as it happens. Calling it again
    switches to the new file.
    """
    global tracer
    old, tracer = tracer, _Tracer(path, stdout)
    if old is not None:
        old.close()
    event("trace-start")


def TraceQuit() -> None:
    """Stop tracing and close the trace file (no-op when not tracing)."""
    global tracer
    if tracer is not None:
        event("trace-quit")
        old, tracer = tracer, None
        old.close()


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the traced program
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def event(kind: str, /, **fields: Any) -> None:
    """Record one event of the running CSP process (no-op when not tracing)."""
    t = tracer
    if t is None:
        return
    record: dict[str, Any] = {"t": time.time(), "pid": t.pid, "process": current_process.get(), "event": kind}
    for key, value in fields.items():
        record[key] = _short(value) if key in ("value", "msg", "error", "result") else value
    try:
        t.write(record)
    except ValueError:  # closed by TraceQuit in another thread meanwhile
        pass


def read_trace(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The records of a trace, skipping lines that are not JSON objects (a crash mid-line)."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if _valid(record):
            yield record


def _valid(record: Any) -> bool:
    """A record this module wrote: a time, an event name, and plain fields where it puts them."""
    if not isinstance(record, dict):
        return False
    t = record.get("t")
    if type(t) not in (int, float) or t != t or t in (float("inf"), float("-inf")):
        return False
    if type(record.get("event")) is not str:
        return False
    if type(record.get("pid", 0)) not in (int, str):
        return False
    if record.get("process") is not None and type(record["process"]) is not str:
        return False
    return record.get("channel") is None or type(record["channel"]) in (str, int)


def _format(record: dict[str, Any], t0: float) -> str:
    detail = []
    if record.get("channel") is not None:
        detail.append(str(record["channel"]))
    for key in ("kind", "guard", "how", "value", "error", "result"):
        if record.get(key) is not None:
            detail.append(f"{key}={record[key]}" if key != "value" else str(record[key]))
    process = record.get("process") or "-"
    when = float(record["t"]) - t0
    pid = record.get("pid", "?")
    return f"{when:12.6f}  {pid:>7}  {process:<24.24}  {record['event']:<11}  {' '.join(detail)}"


def render(path: str | os.PathLike[str], out: TextIO | None = None) -> int:
    """Print the trace at ``path`` as a timeline, then a summary; return the number of records."""
    out = out or sys.stdout
    with open(path, encoding="utf-8", errors="replace") as f:
        records = sorted(read_trace(f), key=lambda r: float(r["t"]))
    if not records:
        print(f"{path}: no trace records", file=out)
        return 0
    t0 = float(records[0]["t"])
    print(f"{'seconds':>12}  {'pid':>7}  {'process':<24}  {'event':<11}  details", file=out)
    for record in records:
        print(_format(record, t0), file=out)
    ops = Counter((r.get("channel"), r["event"]) for r in records if r["event"] in ("read", "write"))
    processes = {(r.get("pid"), r.get("process")) for r in records if r["event"] == "start"}
    summary = io.StringIO()
    print(
        f"\n{len(records)} records, {len(processes)} processes, {records[-1]['t'] - t0:.6f} s", file=summary
    )
    for (channel, kind), n in sorted(ops.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        print(f"  channel {channel}: {n} {kind}{'s' if n != 1 else ''}", file=summary)
    print(summary.getvalue(), end="", file=out)
    return len(records)
