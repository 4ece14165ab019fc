"""Progress bars (tqdm) shared by the paradigms: quiet unless asked for, no monitor thread.

``progress=True`` (``show=True`` for MapReduce jobs) shows a bar with the
rate and the time left when the output is a terminal or a notebook, and
stays quiet otherwise (a log file, a pipe, CI); ``"force"`` shows it
anywhere. The bar goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, TypeAlias

__all__ = ["Progress", "progress_bar"]

#: What ``progress=`` takes: False, True (on a terminal or in a notebook), or "force".
Progress: TypeAlias = bool | Literal["force"]


def _interactive() -> bool:
    """True on a terminal, or in a Jupyter kernel (where tqdm.auto draws a widget)."""
    try:
        if sys.stdout is not None and sys.stdout.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stdout
        pass
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    get = getattr(shell, "get_ipython", None)
    return get is not None and get() is not None and hasattr(get(), "kernel")


def progress_bar(total: int, name: str, *, show: Progress = True, leave: bool = False) -> Any | None:
    """A tqdm bar of ``total`` tasks named ``name``, or None when it should not show.

    ``show``: False never, True when :func:`_interactive`, ``"force"`` always.
    """
    if show not in (True, False, "force"):
        raise ValueError(f"progress must be True, False or 'force', not {show!r}")
    if not show or (show is True and not _interactive()):
        return None
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        # No monitor thread: bars are updated as results come, and tqdm would leave the
        # thread running for the life of the process.
        monitor_interval = 0

    return Bar(total=total, desc=name, unit="task", leave=leave)
