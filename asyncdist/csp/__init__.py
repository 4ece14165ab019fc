"""CSP channels and processes (PyCSP re-created): ``from asyncdist import csp``.

Channels (:class:`Channel`, and PyCSP 0.3's ``One2One``/``One2Any``/
``Any2One``/``Any2Any`` kinds) with rendezvous or buffered semantics;
reader and writer ends; :func:`poison` and :func:`retire` with PyCSP's
propagation through :func:`process` endings; :func:`Parallel`,
:func:`Sequence`, :func:`Spawn`; alternation with :func:`AltSelect`,
:func:`FairSelect`, :func:`PriSelect` over :class:`InputGuard`,
:class:`OutputGuard`, :class:`TimeoutGuard` and :class:`SkipGuard`.
"""

from ..errors import ChannelEnded, ChannelPoisoned, ChannelRetired
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
from ._process import Parallel, Process, Sequence, Spawn, poison, process, retire

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
    "WriterEnd",
    "poison",
    "process",
    "retire",
    "shutdown",
]
