"""CSP channels and processes (PyCSP re-created): ``from asyncdist import csp``.

Channels (:class:`Channel`, and PyCSP 0.3's ``One2One``/``One2Any``/
``Any2One``/``Any2Any`` kinds) with rendezvous or buffered semantics;
reader and writer ends; :func:`poison` and :func:`retire` with PyCSP's
propagation through :func:`process` endings; :func:`Parallel`,
:func:`Sequence`, :func:`Spawn`; alternation with :func:`AltSelect`,
:func:`FairSelect`, :func:`PriSelect` over :class:`InputGuard`,
:class:`OutputGuard`, :class:`TimeoutGuard` and :class:`SkipGuard`.

Across processes and hosts: a :class:`ChannelServer` (or ``asyncdist
csp-server``) serves named channels, ``Channel(name, connect=(host, port))``
joins one from another process with the same semantics, ends are mobile
(sent over channels or given to a :func:`multiprocess` child), and
:func:`shutdown` closes this loop's servers and links. :func:`TraceInit` /
:func:`TraceQuit` log a run as JSON lines (``asyncdist csp-trace PATH``).
"""

from ..errors import ChannelEnded, ChannelPoisoned, ChannelRetired
from . import _mobile  # noqa: F401 - registers channel ends as mobile (they travel between processes)
from ._alt import AltSelect, FairSelect, Guard, InputGuard, OutputGuard, PriSelect, SkipGuard, TimeoutGuard
from ._channel import (
    Any2AnyChannel,
    Any2OneChannel,
    Channel,
    ChannelEnd,
    One2AnyChannel,
    One2OneChannel,
    ReaderEnd,
    WriterEnd,
)
from ._net import ChannelServer, shutdown
from ._process import Parallel, Process, Sequence, Spawn, multiprocess, poison, process, retire
from ._trace import TraceInit, TraceQuit

__all__ = [
    "AltSelect",
    "Any2AnyChannel",
    "Any2OneChannel",
    "Channel",
    "ChannelEnd",
    "ChannelEnded",
    "ChannelPoisoned",
    "ChannelRetired",
    "ChannelServer",
    "FairSelect",
    "Guard",
    "InputGuard",
    "One2AnyChannel",
    "One2OneChannel",
    "OutputGuard",
    "Parallel",
    "PriSelect",
    "Process",
    "ReaderEnd",
    "Sequence",
    "SkipGuard",
    "Spawn",
    "TimeoutGuard",
    "TraceInit",
    "TraceQuit",
    "WriterEnd",
    "multiprocess",
    "poison",
    "process",
    "retire",
    "shutdown",
]
