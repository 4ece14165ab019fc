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

    __slots__ = ("__weakref__", "_base", "_count", "_members", "_oid", "_path", "_rpc", "_type", "_wire")

    def __init__(self, rpc: Connection, oid: int, type_name: _str, path: tuple[_str, ...] = ()) -> None:
        self._rpc = rpc
        self._oid = oid
        self._type = type_name
        self._path = path
        # The path as sent: None, one name, or a list of names.
        self._wire: Any = None if not path else path[0] if _len(path) == 1 else list(path)
        self._base: Netref | None = None
        self._members: dict[_str, _Member] | None = None
        #: How many times the peer sent this object (released by that count).
        self._count = 0

    def __getattr__(self, name: _str) -> _Member:
        if name[0] == "_":
            raise AttributeError(name)
        members = self._members
        if members is not None and (member := members.get(name)) is not None:
            return member
        member = _Member(self._rpc, self._oid, self._type, (*self._path, name))
        member._base = self._base or self
        if self._oid == 0 and not self._path:  # the peer's root lives as long as the connection:
            if members is None:  # its members are kept (a netref that may be released is not,
                members = self._members = {}  # or it and its members would form a cycle)
            if _len(members) < 256:
                members[name] = member
        return member

    def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Call it on the peer; ``timeout`` (seconds) bounds the call and cancels it remotely."""
        return self._rpc.conn.request("rpc.call", (self._oid, self._wire, *args), kwargs, timeout=timeout)

    def request(
        self, args: Any = (), kwargs: dict[_str, Any] | None = None, *, timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Call with the arguments as a sequence and a mapping (for a remote ``timeout`` argument)."""
        return self._rpc.conn.request("rpc.call", (self._oid, self._wire, *args), kwargs, timeout=timeout)

    def oneway(self, *args: Any, **kwargs: Any) -> None:
        """Send the call and return at once, from any thread; errors are only logged by the peer.

        Calls sent one way from one thread arrive in the order they were made.
        """
        self._rpc.send_oneway((self._oid, self._wire, *args), kwargs)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._rpc.conn.stream("rpc.iter", self._oid, self._wire).__aiter__()

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
        return self._rpc.conn.call("rpc.getattr", self._oid, self._wire).__await__()


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
    await ref._rpc.conn.call("rpc.setattr", ref._oid, ref._wire, name, value)


async def len(ref: Netref) -> int:
    """The peer's ``len(ref)``."""
    ref = _check(ref)
    result: int = await ref._rpc.conn.call("rpc.op", ref._oid, ref._wire, "len")
    return result


async def str(ref: Netref) -> _str:
    """The peer's ``str(ref)``."""
    ref = _check(ref)
    result: _str = await ref._rpc.conn.call("rpc.op", ref._oid, ref._wire, "str")
    return result


async def repr(ref: Netref) -> _str:
    """The peer's ``repr(ref)``."""
    ref = _check(ref)
    result: _str = await ref._rpc.conn.call("rpc.op", ref._oid, ref._wire, "repr")
    return result
