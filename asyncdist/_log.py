"""Logging: every component logs under ``asyncdist.*``, each record naming its host and worker.

Records from asyncdist's loggers carry two attributes, ``host`` (this
machine's name) and ``worker`` (this worker's name in a worker process,
else ``""``), so a handler's format may use ``%(host)s`` and
``%(worker)s``. In a worker process every record has them, the task code's
own included (:func:`tag_all_records`). The library adds no handler;
``asyncdist`` commands configure one (:func:`configure`, level from
``--log-level`` or ``ASYNCDIST_LOG_LEVEL``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from typing import Any

__all__ = ["FORMAT", "HOST", "Logger", "configure", "get_logger", "set_worker", "tag_all_records"]

#: This machine's name, in every record.
HOST = socket.gethostname()
#: The format the ``asyncdist`` commands log with.
FORMAT = "%(asctime)s %(levelname)-7s %(host)s %(worker)s %(name)s: %(message)s"

_worker = ""
_factory_installed = False


def set_worker(name: str) -> None:
    """Name this process's worker in the records from now on."""
    global _worker
    _worker = name


class Logger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adding ``host`` and ``worker`` to each record (caller's ``extra`` kept)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        if _factory_installed:  # every record of this process has them already
            return msg, kwargs
        extra = kwargs.get("extra")
        kwargs["extra"] = {"host": HOST, "worker": _worker, **(extra or {})}
        return msg, kwargs


def get_logger(name: str) -> Logger:
    """The logger ``name`` (under ``asyncdist.``), tagging records with host and worker."""
    return Logger(logging.getLogger(name), {})


def tag_all_records() -> None:
    """Give every record of this process ``host`` and ``worker`` (worker processes only).

    Wraps the record factory once; records that already have the
    attributes keep them.
    """
    global _factory_installed
    if _factory_installed:
        return
    _factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.host = HOST
        record.worker = _worker
        return record

    logging.setLogRecordFactory(factory)


class _Defaults(logging.Filter):
    """Fill ``host``/``worker`` in for records of other libraries, so the format never fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "host"):
            record.host = HOST
        if not hasattr(record, "worker"):
            record.worker = _worker
        return True


def configure(level: str | int | None = None) -> None:
    """Log to stderr with :data:`FORMAT` at ``level`` (else ``ASYNCDIST_LOG_LEVEL``, else WARNING).

    For the ``asyncdist`` commands; an application configures logging itself.
    """
    if level is None:
        level = os.environ.get("ASYNCDIST_LOG_LEVEL") or "WARNING"
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"unknown log level {level!r}")
        level = name
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_Defaults())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
