"""Netrefs: the holder's side of an object that stays with its peer.

A :class:`Netref` stands for one object of the peer (its *base*), or for a
member path below it (``ref.a.b``: nothing is sent until it is used).
Everything it does is awaitable:

=====================================  =====================================================
``await ref.m(*args, **kwargs)``       call the peer's ``m`` (``timeout=`` is this side's
                                       bound for the call; see :meth:`Netref.request`)
``ref.m.oneway(*args)``                send the call and return at once; nothing comes back
``await ref.attr``                     read an attribute (same as ``await getattr(ref, "attr")``)
``await ref(*args)``                   call the object itself (a passed function)
``async for x in ref``                 iterate, streamed with flow control
``await len(ref)``, ``str``, ``repr``  the peer's ``len()``, ``str()`` and ``repr()``
=====================================  =====================================================

(``getattr``, ``setattr``, ``len``, ``str`` and ``repr`` are the functions of
:mod:`asyncdist.rpc`, not the builtins.) Names that start with ``_`` are
never looked up remotely, so Python's own probes (``__len__``,
``_repr_html_``...) see an ordinary object. A base netref is released when
the last Python reference to it goes: its owner then drops the object,
unless it sent it again meanwhile.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._session import Connection

__all__ = ["Netref", "getattr", "len", "repr", "setattr", "str"]

_str = builtins.str
_len = builtins.len


class Netref:
    """A reference to an object of the peer, or to a member path below one."""

    __slots__ = ("__weakref__", "_base", "_count", "_oid", "_path", "_rpc", "_type")

    def __init__(self, rpc: Connection, oid: int, type_name: _str, path: tuple[_str, ...] = ()) -> None:
        self._rpc = rpc
        self._oid = oid
        self._type = type_name
        self._path = path
        self._base: Netref | None = None
        #: How many times the peer sent this object (released by that count).
        self._count = 0

    def __getattr__(self, name: _str) -> _Member:
        if name[0] == "_":
            raise AttributeError(name)
        member = _Member(self._rpc, self._oid, self._type, (*self._path, name))
        member._base = self._base or self
        return member

    def _wire_path(self) -> Any:
        path = self._path
        if not path:
            return None
        return path[0] if _len(path) == 1 else list(path)

    def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Call it on the peer; ``timeout`` (seconds) bounds the call and cancels it remotely."""
        if kwargs:
            wire: tuple[Any, ...] = (self._oid, self._wire_path(), list(args), kwargs)
        else:
            wire = (self._oid, self._wire_path(), list(args))
        return self._rpc.conn.request("rpc.call", wire, timeout=timeout)

    def request(
        self, args: Any = (), kwargs: dict[_str, Any] | None = None, *, timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Call with the arguments as a sequence and a mapping (for a remote ``timeout`` argument)."""
        wire: tuple[Any, ...] = (self._oid, self._wire_path(), list(args))
        if kwargs:
            wire += (dict(kwargs),)
        return self._rpc.conn.request("rpc.call", wire, timeout=timeout)

    def oneway(self, *args: Any, **kwargs: Any) -> None:
        """Send the call and return at once, from any thread; errors are only logged by the peer.

        Calls sent one way from one thread arrive in the order they were made.
        """
        wire: tuple[Any, ...] = (self._oid, self._wire_path(), list(args))
        if kwargs:
            wire += (kwargs,)
        self._rpc.send_oneway(wire)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._rpc.conn.stream("rpc.iter", self._oid, self._wire_path()).__aiter__()

    def __repr__(self) -> _str:
        where = "." + ".".join(self._path) if self._path else ""
        return f"<netref {self._type}#{self._oid}{where} of {self._rpc!r}>"

    def __del__(self) -> None:
        if self._count:
            self._rpc.release(self._oid, self._count)


class _Member(Netref):
    """``ref.name``: also awaitable, for the attribute's value."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._rpc.conn.call("rpc.getattr", self._oid, self._wire_path()).__await__()


def _check(ref: Any) -> Netref:
    if not isinstance(ref, Netref):
        raise TypeError(f"expected a netref, not {type(ref).__name__}")
    return ref


async def getattr(ref: Netref, name: _str) -> Any:
    """The peer's ``ref.name`` (a value, or a netref to it)."""
    ref = _check(ref)
    return await ref._rpc.conn.call("rpc.getattr", ref._oid, [*ref._path, name])


async def setattr(ref: Netref, name: _str, value: Any) -> None:
    """Set the peer's ``ref.name`` to ``value`` (where its owner allows writing it)."""
    ref = _check(ref)
    await ref._rpc.conn.call("rpc.setattr", ref._oid, ref._wire_path(), name, value)


async def len(ref: Netref) -> int:
    """The peer's ``len(ref)``."""
    ref = _check(ref)
    result: int = await ref._rpc.conn.call("rpc.op", ref._oid, ref._wire_path(), "len")
    return result


async def str(ref: Netref) -> _str:
    """The peer's ``str(ref)``."""
    ref = _check(ref)
    result: _str = await ref._rpc.conn.call("rpc.op", ref._oid, ref._wire_path(), "str")
    return result


async def repr(ref: Netref) -> _str:
    """The peer's ``repr(ref)``."""
    ref = _check(ref)
    result: _str = await ref._rpc.conn.call("rpc.op", ref._oid, ref._wire_path(), "repr")
    return result
