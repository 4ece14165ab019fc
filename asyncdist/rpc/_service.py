"""Services and what a peer may reach: ``exposed_`` names, ``@exposed``, and the access policy.

Rules (RPyC's defaults, made strict), applied to every object a peer holds
a netref to, services included:

* a name is one identifier: never empty, never dotted, and never one that
  starts with ``_`` (``__class__``, ``__globals__``, ``__subclasses__``...:
  the CVE-2019-16328 traversal path is closed);
* ``NAME`` is reachable when the object has an attribute ``exposed_NAME``
  (what the peer sees is that attribute), or when ``NAME`` is a method or
  property decorated with :func:`exposed`;
* with ``allow_public_attrs=True`` every public attribute is reachable too;
* an attribute may be written only where it is reachable, and never where
  it is a method;
* a netref may always be called (if its object is callable), iterated, and
  asked for its ``len``, ``str`` and ``repr`` (RPyC's safe attributes).

A classic-mode server lifts all of this (``allow_all``): its clients may run
any code anyway.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final, TypeVar, overload

from ._netref import Netref

__all__ = ["Policy", "Service", "exposed", "is_blocking"]

_EXPOSED: Final = "_asyncdist_rpc_exposed"
_BLOCKING: Final = "_asyncdist_rpc_blocking"
_PREFIX: Final = "exposed_"
MAX_NAME: Final = 256
_MISSING: Final = object()
_HOOKS: Final = frozenset({"on_connect", "on_disconnect"})

_F = TypeVar("_F")


class Service:
    """Base class of what one side of an RPC connection offers the other.

    The peer reaches the members named ``exposed_NAME`` as ``NAME`` (and the
    members decorated with :func:`exposed`), on ``conn.root``. A server
    makes one instance per connection (from the class given to
    :func:`~asyncdist.rpc.serve`, called without arguments), and so does a
    client (``connect(..., service=...)``).

    ``async def`` members run on the event loop as their own task, so they
    may await anything, including calls back into the peer, to any depth.
    Plain members run inline on the event loop and must not block (as in
    RPyC, where a method holds its connection's thread); decorate a blocking
    one with ``@exposed(blocking=True)`` to run it in a thread.
    """

    def on_connect(self, conn: Any) -> Any:
        """Called (and awaited, if it returns an awaitable) when the connection opens.

        ``conn`` is the :class:`~asyncdist.rpc.Connection`; calls from the
        peer wait until this returns.
        """

    def on_disconnect(self, conn: Any) -> Any:
        """Called (and awaited, if it returns an awaitable) once the connection has closed."""


@overload
def exposed(obj: _F, /) -> _F: ...


@overload
def exposed(*, blocking: bool = False) -> Callable[[_F], _F]: ...


def exposed(obj: Any = None, /, *, blocking: bool = False) -> Any:
    """Make a method or property reachable by its own name (``@exposed``).

    ``@exposed(blocking=True)`` on a plain method (or on an ``exposed_``
    one) runs it in a thread of the server's pool instead of on the event
    loop.
    """

    def mark(target: Any) -> Any:
        func = target.fget if isinstance(target, property) else target
        if isinstance(func, staticmethod | classmethod):
            func = func.__func__
        if func is None or not callable(func):
            raise TypeError("@exposed goes on a method or a property")
        setattr(func, _EXPOSED, True)
        if blocking:
            if inspect.iscoroutinefunction(func):
                raise TypeError("blocking=True is for plain methods; an async def runs on the loop")
            setattr(func, _BLOCKING, True)
        return target

    if obj is None:
        return mark
    return mark(obj)


def is_blocking(func: Any) -> bool:
    """True for a callable marked ``@exposed(blocking=True)``."""
    return getattr(func, _BLOCKING, False) is True


def check_name(name: Any) -> str:
    """The name itself, or :class:`AttributeError` for one no peer may use."""
    if type(name) is not str or not name or len(name) > MAX_NAME:
        raise AttributeError("a member name is a non-empty string of at most 256 characters")
    if name[0] == "_":
        raise AttributeError(f"{name[:64]!r} is private: names starting with '_' are never reachable")
    if not name.isidentifier():
        raise AttributeError(f"{name[:64]!r} is not one identifier (no dotted traversal)")
    result: str = name
    return result


class Policy:
    """What a peer may do with the objects of one side (see the module's rules)."""

    __slots__ = ("_marked", "_members", "allow_all", "allow_public_attrs")

    def __init__(self, *, allow_public_attrs: bool = False, allow_all: bool = False) -> None:
        self.allow_public_attrs = allow_public_attrs
        self.allow_all = allow_all
        # (type, name) -> the name's class attribute is decorated with @exposed
        self._marked: dict[tuple[type, str], bool] = {}
        # (type, name) -> (the attribute it reaches, blocking), for members the class defines
        self._members: dict[tuple[type, str], tuple[str, bool]] = {}

    def _is_marked(self, obj: Any, name: str) -> bool:
        key = (type(obj), name)
        marked = self._marked.get(key)
        if marked is None:
            attr = inspect.getattr_static(obj, name, _MISSING)
            if isinstance(attr, property):
                attr = attr.fget
            elif isinstance(attr, staticmethod | classmethod):
                attr = attr.__func__
            marked = getattr(attr, _EXPOSED, False) is True
            if len(self._marked) < 4096:
                self._marked[key] = marked
        return marked

    def real_name(self, obj: Any, peer_name: Any) -> str:
        """The attribute of ``obj`` that the peer's name reaches; AttributeError if none."""
        if self.allow_all:
            if not isinstance(peer_name, str) or not peer_name:
                raise AttributeError("a member name is a non-empty string")
            return peer_name
        name = check_name(peer_name)
        if isinstance(obj, Netref):
            return name  # an object of a third party: its owner checks the name
        if hasattr(obj, _PREFIX + name):
            return _PREFIX + name
        if self._is_marked(obj, name) or (name.startswith(_PREFIX) and hasattr(obj, name)):
            return name
        if self.allow_public_attrs and not (isinstance(obj, Service) and name in _HOOKS):
            return name
        raise AttributeError(f"{type(obj).__name__}.{name} is not exposed")

    def lookup(self, obj: Any, path: Any) -> tuple[Any, bool]:
        """The member at ``path`` to call, and whether it is ``@exposed(blocking=True)``.

        Each step is checked as by :meth:`resolve`; the check of the last
        name is remembered per class when the member is defined by the class.
        """
        if type(path) is not str:
            if type(path) is not list or not 0 < len(path) <= 64:
                raise AttributeError("a member path is a name or a list of 1 to 64 names")
            for name in path[:-1]:
                obj = getattr(obj, self.real_name(obj, name))
            path = path[-1]
            if type(path) is not str:
                raise AttributeError("a member name is a non-empty string of at most 256 characters")
        cls = type(obj)
        known = self._members.get((cls, path))
        if known is not None:
            return getattr(obj, known[0]), known[1]
        real = self.real_name(obj, path)
        member = getattr(obj, real)
        blocking = is_blocking(member)
        cacheable = not self.allow_all and not isinstance(obj, Netref) and hasattr(cls, real)
        if cacheable and len(self._members) < 4096:
            self._members[(cls, path)] = (real, blocking)
        return member, blocking

    def resolve(self, obj: Any, path: Any) -> Any:
        """Follow ``path`` (a name or a list of names), checking every step."""
        if type(path) is str:
            return getattr(obj, self.real_name(obj, path))
        if type(path) is not list or len(path) > 64:
            raise AttributeError("a member path is a list of at most 64 names")
        for name in path:
            obj = getattr(obj, self.real_name(obj, name))
        return obj

    def set(self, obj: Any, name: Any, value: Any) -> None:
        """``obj.name = value`` if the peer may write it."""
        real = self.real_name(obj, name)
        if not self.allow_all:
            current = inspect.getattr_static(obj, real, _MISSING)
            if inspect.isfunction(current) or isinstance(current, staticmethod | classmethod):
                raise AttributeError(f"{type(obj).__name__}.{name} is a method: it cannot be replaced")
        setattr(obj, real, value)
