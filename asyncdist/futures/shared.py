"""Shared constants of a pool (SCOOP's ``shared``): set once, read in every worker.

::

    await asyncdist.shared.set_const(table=big_table, factor=3)
    ...
    def task(x):                       # on any worker of the same pool
        return asyncdist.shared.get_const("factor") * x

A constant is set once per pool; setting it again to another value raises
ValueError. It reaches every worker, including workers that join later,
before any task submitted after :func:`set_const` returned.
"""

from __future__ import annotations

from typing import Any

from ._client import default_pool, existing_pool
from ._worker import current_worker

__all__ = ["get_const", "set_const"]

_MISSING: Any = object()


async def set_const(**constants: Any) -> None:
    """Set shared constants on the current (or default) pool."""
    pool = await default_pool()
    for name, value in constants.items():
        await pool.shared_set(name, value)


def get_const(name: str, default: Any = _MISSING) -> Any:
    """Read a shared constant: in a worker, the cluster's; elsewhere, the current pool's.

    Raises KeyError if the constant is not set (unless ``default`` is given).
    """
    worker = current_worker()
    try:
        if worker is not None:
            return worker.get_const(name)
        pool = existing_pool()
        if pool is None:
            raise KeyError(name)
        return pool._consts[name]
    except KeyError:
        if default is not _MISSING:
            return default
        raise KeyError(f"shared constant {name!r} is not set") from None
