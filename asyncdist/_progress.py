"""Progress bars (tqdm) shared by the paradigms: quiet unless asked for, no monitor thread."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, name: str, *, leave: bool = False) -> Any:
    """A tqdm bar of ``total`` tasks named ``name`` (tqdm.auto: a widget in Jupyter)."""
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        # No monitor thread: bars are updated as results come, and tqdm would leave the
        # thread running for the life of the process.
        monitor_interval = 0

    return Bar(total=total, desc=name, unit="task", leave=leave)
