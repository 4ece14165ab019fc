"""What a remote object shows: ``@expose``, ``@oneway``, ``@behavior`` and the member table.

Rules (Pyro's, made strict):

* a member is reachable only when it is exposed: decorated with
  :func:`expose`, or defined in a class that is itself decorated with
  :func:`expose` (members a class inherits from a base that is not exposed
  stay hidden, and so does an override that drops the decorator in a class
  that is not exposed);
* only methods and properties are members; plain attributes never are;
* a name that starts with ``_`` is never reachable, decorated or not, and
  names are single identifiers: no dotted traversal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, overload

__all__ = [
    "ClassInfo",
    "InstanceMode",
    "Member",
    "behavior",
    "class_info",
    "check_member_name",
    "expose",
    "is_exposed",
    "oneway",
]

_EXPOSED: Final = "_asyncdist_exposed"
_ONEWAY: Final = "_asyncdist_oneway"
_BEHAVIOR: Final = "_asyncdist_behavior"
MAX_MEMBER_NAME: Final = 256

InstanceMode = Literal["single", "session", "percall"]
_MODES: Final = ("single", "session", "percall")

_F = TypeVar("_F")
_C = TypeVar("_C", bound=type)


def expose(obj: _F) -> _F:
    """Make a class (all its public methods and properties), a method or a property reachable.

    Use it on a class, on a method, or on a property (above ``@property``,
    or on the getter before ``@property``); the property is writable
    remotely when it has a setter.
    """
    target: Any = obj
    if isinstance(obj, type):
        setattr(obj, _EXPOSED, True)
        return obj
    if isinstance(obj, property):
        target = obj.fget
        if target is None:
            raise TypeError("@expose on a property without a getter")
    elif isinstance(obj, staticmethod | classmethod):
        target = obj.__func__
    if not callable(target):
        raise TypeError(f"@expose applies to classes, methods and properties, not {type(obj).__name__}")
    setattr(target, _EXPOSED, True)
    return obj


def oneway(func: _F) -> _F:
    """Mark a method one-way: callers send it as a notification and do not wait for it.

    The method must also be exposed (by :func:`expose` on it or on its
    class). Its result is dropped and its exceptions are logged by the
    daemon, never reported to the caller.
    """
    target: Any = func.__func__ if isinstance(func, staticmethod | classmethod) else func
    if not callable(target) or isinstance(func, property | type):
        raise TypeError("@oneway applies to methods")
    setattr(target, _ONEWAY, True)
    return func


@overload
def behavior(cls: _C, /) -> _C: ...
@overload
def behavior(
    *, instance_mode: InstanceMode = "single", instance_creator: Callable[[type], Any] | None = None
) -> Callable[[_C], _C]: ...
def behavior(
    cls: _C | None = None,
    /,
    *,
    instance_mode: InstanceMode = "single",
    instance_creator: Callable[[type], Any] | None = None,
) -> _C | Callable[[_C], _C]:
    """Say how a daemon makes instances of a class registered by class.

    ``instance_mode``: ``"single"`` (one instance for everyone, made at the
    first call), ``"session"`` (one per client connection, dropped when it
    closes) or ``"percall"`` (a new one for every call).
    ``instance_creator(cls)`` makes an instance (default ``cls()``).
    """
    if instance_mode not in _MODES:
        raise ValueError(f"instance_mode must be one of {_MODES}, not {instance_mode!r}")
    if instance_creator is not None and not callable(instance_creator):
        raise TypeError("instance_creator must be callable")

    def decorate(klass: _C) -> _C:
        if not isinstance(klass, type):
            raise TypeError("@behavior applies to classes")
        setattr(klass, _BEHAVIOR, (instance_mode, instance_creator))
        return klass

    return decorate(cls) if cls is not None else decorate


def get_behavior(cls: type) -> tuple[InstanceMode, Callable[[type], Any] | None]:
    """The ``(instance_mode, instance_creator)`` of a class (``("single", None)`` by default)."""
    value = getattr(cls, _BEHAVIOR, None)
    if value is None:
        return "single", None
    mode, creator = value
    return mode, creator


@dataclass(frozen=True, slots=True)
class Member:
    """One exposed member: a method (``kind="method"``) or a property."""

    kind: Literal["method", "property"]
    is_async: bool = False
    #: ``""`` for a plain method, ``"gen"`` / ``"agen"`` for (async) generator functions.
    stream: str = ""
    oneway: bool = False
    writable: bool = False


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """The exposed members of a class, and the summary sent to proxies."""

    members: dict[str, Member]
    meta: dict[str, list[str]]


_cache: dict[type, ClassInfo] = {}


def _member_of(value: Any, class_exposed: bool) -> Member | None:
    if isinstance(value, property):
        fget = value.fget
        if fget is None or not (class_exposed or getattr(fget, _EXPOSED, False)):
            return None
        return Member("property", is_async=inspect.iscoroutinefunction(fget), writable=value.fset is not None)
    func = value.__func__ if isinstance(value, staticmethod | classmethod) else value
    if not (inspect.isfunction(func) or inspect.ismethoddescriptor(func) or inspect.isbuiltin(func)):
        return None
    if not (class_exposed or getattr(func, _EXPOSED, False)):
        return None
    stream = (
        "agen" if inspect.isasyncgenfunction(func) else "gen" if inspect.isgeneratorfunction(func) else ""
    )
    return Member(
        "method",
        is_async=inspect.iscoroutinefunction(func),
        stream=stream,
        oneway=bool(getattr(func, _ONEWAY, False)),
    )


def class_info(cls: type) -> ClassInfo:
    """The exposed members of ``cls`` (computed once per class)."""
    info = _cache.get(cls)
    if info is not None:
        return info
    members: dict[str, Member] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        class_exposed = klass.__dict__.get(_EXPOSED) is True
        for name, value in klass.__dict__.items():
            if name.startswith("_"):
                continue
            member = _member_of(value, class_exposed)
            if member is None:
                members.pop(name, None)  # overridden by something that is not exposed
            else:
                members[name] = member
    meta = {
        "methods": sorted(n for n, m in members.items() if m.kind == "method"),
        "oneway": sorted(n for n, m in members.items() if m.oneway),
        "streams": sorted(n for n, m in members.items() if m.stream),
        "properties": sorted(n for n, m in members.items() if m.kind == "property"),
        "writable": sorted(n for n, m in members.items() if m.writable),
    }
    info = ClassInfo(members, meta)
    _cache[cls] = info
    return info


def is_exposed(obj: Any) -> bool:
    """True when ``obj`` is an instance of a class with at least one exposed member."""
    return not isinstance(obj, type) and bool(class_info(type(obj)).members)


def check_member_name(name: Any) -> str:
    """Return ``name`` if it may name a member at all, else raise :class:`AttributeError`."""
    if type(name) is not str or not name or len(name) > MAX_MEMBER_NAME:
        raise AttributeError("a member name must be a non-empty string of at most 256 characters")
    if name.startswith("_"):
        raise AttributeError(f"{name[:64]!r} is private: names starting with '_' are never exposed")
    if not name.isidentifier():
        raise AttributeError(f"{name[:64]!r} is not a member name (no dotted or other traversal)")
    return name
