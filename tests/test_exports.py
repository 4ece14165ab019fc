"""The public API: __all__ lists exactly what the package exports, and every name exists."""

from __future__ import annotations

import importlib
import types

import asyncdist

PUBLIC_MODULES = [
    "asyncdist.codec",
    "asyncdist.connection",
    "asyncdist.errors",
    "asyncdist.frames",
    "asyncdist.loop",
    "asyncdist.protocol",
    "asyncdist.security",
    "asyncdist.server",
    "asyncdist.testing",
    "asyncdist.cli",
    "asyncdist.futures",
    "asyncdist.futures.shared",
    "asyncdist.objects",
    "asyncdist.naming",
    "asyncdist.csp",
    "asyncdist.mapreduce",
    "asyncdist.spawn",
    "asyncdist.cluster",
    "asyncdist.rpc",
    "asyncdist.rpc.classic",
    "asyncdist.sync",
    "asyncdist.dashboard",
]


def test_package_all_matches_public_names() -> None:
    # Submodules appear as attributes when imported; they are not exports (asyncdist.shared,
    # the futures' shared-constants module, is one on purpose).
    public = {
        name
        for name, value in vars(asyncdist).items()
        if not name.startswith("_")
        and not (isinstance(value, types.ModuleType) and value.__name__ == f"asyncdist.{name}")
    }
    lazy = set(asyncdist._LAZY)  # imported on first use (asyncssh is heavy for workers)
    assert set(asyncdist.__all__) == (public - lazy) | lazy | {"__version__"}
    for name in lazy:
        assert getattr(asyncdist, name) is not None
    assert "__version__" in asyncdist.__all__
    assert sorted(asyncdist.__all__) == list(asyncdist.__all__)


def test_every_module_all_is_importable() -> None:
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            assert hasattr(module, attr), f"{name}.{attr}"


def test_core_names_of_the_design_contract() -> None:
    for name in (
        "connect",
        "serve",
        "run",
        "Connection",
        "ConnectionClosed",
        "ProtocolError",
        "AuthenticationError",
        "RemoteError",
        "Pool",
        "map",
        "map_as_completed",
        "map_reduce",
        "map_scan",
        "submit",
        "as_completed",
        "wait",
        "shared",
        "WorkerLost",
    ):
        assert name in asyncdist.__all__


def test_csp_names_of_the_design_contract() -> None:
    from asyncdist import csp

    for name in (
        "Channel",
        "One2OneChannel",
        "One2AnyChannel",
        "Any2OneChannel",
        "Any2AnyChannel",
        "ChannelPoisoned",
        "ChannelRetired",
        "ChannelServer",
        "process",
        "multiprocess",
        "Parallel",
        "Sequence",
        "Spawn",
        "poison",
        "retire",
        "AltSelect",
        "FairSelect",
        "PriSelect",
        "InputGuard",
        "OutputGuard",
        "TimeoutGuard",
        "SkipGuard",
        "TraceInit",
        "TraceQuit",
        "shutdown",
    ):
        assert name in csp.__all__, name
