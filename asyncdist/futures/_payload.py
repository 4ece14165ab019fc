"""How functions, arguments and results of tasks travel (shared by client and worker).

A task's function is sent once per broker under an id (``fid``) and cached
by every worker. It travels **by reference** (``"module:qualname"``) when
the worker can import it, and **by value** (cloudpickle) otherwise: lambdas,
closures, functions defined in ``__main__``. By value needs an authenticated
cluster: without a shared secret (or mutual TLS) such a function raises
:class:`~asyncdist.errors.SerializationError` at submission.

Arguments and results are encoded into one opaque byte string each (a
*blob*) by the client and the worker. The broker only forwards blobs: it
never decodes, let alone unpickles, user data.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import weakref
from collections.abc import Callable
from typing import Any

from ..codec import Codec
from ..errors import SerializationError

__all__ = ["FunctionCache", "FunctionTable", "PayloadCodec", "resolve_reference"]

#: Name under which the launcher's workers import the script (see the launcher).
MAIN_ALIAS = "__asyncdist_main__"


class PayloadCodec:
    """Encodes task arguments and results into blobs, pickling only where allowed."""

    def __init__(self, *, authenticated: bool) -> None:
        self.authenticated = authenticated
        self._codec = Codec(accept_pickle="load" if authenticated else "refuse", send_pickle=authenticated)

    def encode(self, value: Any) -> bytes:
        """Encode one value; raise SerializationError if it cannot travel."""
        return self._codec.encode(value)

    def decode(self, blob: bytes) -> Any:
        """Decode a blob made by :meth:`encode` on an authenticated peer."""
        return self._codec.decode(blob)


def resolve_reference(ref: str) -> Callable[..., Any]:
    """Import ``module:qualname`` and return the object (``__main__`` means the launcher's script)."""
    module_name, _, qualname = ref.partition(":")
    if module_name == "__main__" and MAIN_ALIAS in sys.modules:
        module: Any = sys.modules[MAIN_ALIAS]
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj  # type: ignore[no-any-return]


def _reference(fn: Callable[..., Any], main_importable: bool) -> str | None:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    if module == "__main__":
        if not main_importable:
            return None
        main = sys.modules.get("__main__")
        found = getattr(main, qualname, None) if "." not in qualname else None
        return f"__main__:{qualname}" if found is fn else None
    mod = sys.modules.get(module)
    if mod is None:
        return None
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return f"{module}:{qualname}" if obj is fn else None


class FunctionTable:
    """The client's side: function -> (fid, blob), computed once per function."""

    def __init__(self, payloads: PayloadCodec, *, main_importable: bool = False) -> None:
        self._payloads = payloads
        self._main_importable = main_importable
        self._weak: weakref.WeakKeyDictionary[Any, tuple[str, bytes]] = weakref.WeakKeyDictionary()

    def lookup(self, fn: Callable[..., Any]) -> tuple[str, bytes]:
        """Return ``(fid, blob)`` for ``fn``; the same function always gets the same fid."""
        try:
            cached = self._weak.get(fn)
        except TypeError:
            cached = None
        if cached is not None:
            return cached
        if not callable(fn):
            raise TypeError(f"a task needs a callable, not {type(fn).__name__}")
        ref = _reference(fn, self._main_importable)
        if ref is not None:
            entry = ("ref:" + ref, self._payloads.encode(ref))
        else:
            if not self._payloads.authenticated:
                raise SerializationError(
                    f"{getattr(fn, '__qualname__', fn)!r} cannot be imported by the workers, and "
                    "sending it by value (cloudpickle) needs an authenticated cluster: give the "
                    "pool a secret (secret=, ASYNCDIST_SECRET) or define the function in a module"
                )
            blob = self._payloads.encode(fn)  # not a msgpack type: cloudpickled by the codec
            entry = ("val:" + hashlib.blake2b(blob, digest_size=16).hexdigest(), blob)
        try:
            self._weak[fn] = entry
        except TypeError:
            pass  # builtins cannot be weakly referenced; they are cheap to look up again
        return entry


class FunctionCache:
    """The worker's side: fid -> callable, decoding each function once."""

    def __init__(self, payloads: PayloadCodec) -> None:
        self._payloads = payloads
        self._blobs: dict[str, bytes] = {}
        self._functions: dict[str, Callable[..., Any]] = {}

    def add(self, fid: str, blob: bytes) -> None:
        """Remember a function's blob (decoded on first use)."""
        if fid not in self._functions:
            self._blobs[fid] = blob

    def get(self, fid: str) -> Callable[..., Any]:
        """Return the function for ``fid``; raise LookupError, ImportError or TypeError."""
        fn = self._functions.get(fid)
        if fn is not None:
            return fn
        blob = self._blobs.pop(fid, None)
        if blob is None:
            raise LookupError(f"unknown function id {fid!r}")
        value = self._payloads.decode(blob)
        fn = resolve_reference(value) if isinstance(value, str) else value
        if not callable(fn):
            raise TypeError(f"function {fid!r} decoded to a {type(fn).__name__}")
        self._functions[fid] = fn
        return fn
