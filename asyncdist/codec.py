"""Values on the wire: msgpack plus asyncdist's extension types (sans-I/O).

This is the only module that imports msgpack. A frame body is one msgpack
object. Python values map to msgpack's own types (None, bool, int, float,
str, bytes, list, dict) and to these extension types:

====  ==============  =========================================================================
code  name            payload (itself msgpack)
====  ==============  =========================================================================
1     remote error    ``[type_name, args, message, traceback_text]``; rebuilt only from an
                      allow-list (:func:`asyncdist.errors.rebuild_exception`), never imported
2     object ref      ``[uri, meta]``: a reference to an object that stays where it is
3     pickled         opaque cloudpickle bytes; decoded only through :meth:`Codec.decode`'s
                      gate, on connections whose local policy says ``"load"``
4     tuple           ``[items...]``
5     set             ``[items...]``
6     frozenset       ``[items...]``
7     registered      ``[tag, value]`` for classes given to :func:`register_type`
8     big int         an int outside msgpack's 64-bit range: signed big-endian bytes (raw)
====  ==============  =========================================================================

Decoding is bounded: msgpack derives its length limits from the body length,
and extension types may nest at most 64 deep. Maps are decoded with string
keys only, at msgpack's full speed; a body holding a map with other keys
(``{1: "a"}``) is decoded again with a check that refuses maps and sets
where many keys share one hash, so crafted collisions cannot make decoding
quadratic. Any failure raises :class:`asyncdist.errors.ProtocolError`.
"""

from __future__ import annotations

import struct
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from .errors import (
    ProtocolError,
    SerializationError,
    exception_type_name,
    rebuild_exception,
)

__all__ = [
    "Codec",
    "ObjectRef",
    "PicklePolicy",
    "Pickled",
    "decode_plain",
    "encode_plain",
    "register_type",
]

EXT_ERROR = 1
EXT_REF = 2
EXT_PICKLE = 3
EXT_TUPLE = 4
EXT_SET = 5
EXT_FROZENSET = 6
EXT_REGISTERED = 7
EXT_BIGINT = 8
MAX_BIGINT_BYTES = 64 * 1024

#: What a connection does with pickled payloads it receives:
#: ``"refuse"`` (a protocol error), ``"opaque"`` (kept as :class:`Pickled` bytes,
#: never loaded, e.g. to forward them) or ``"load"`` (unpickled).
PicklePolicy = Literal["refuse", "opaque", "load"]

MAX_NESTED_EXT = 64
#: Bytes values at least this large are written by reference, not copied (see Codec.encode_parts).
LARGE_BYTES = 64 * 1024
MAX_TRACEBACK = 64 * 1024
_SAME_HASH_LIMIT = 8


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A reference to an object that stays on its owner; paradigms give ``uri`` its meaning."""

    uri: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Pickled:
    """Opaque pickled bytes, carried without being loaded."""

    data: bytes


@dataclass(frozen=True, slots=True)
class _Registration:
    cls: type
    tag: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


_by_class: dict[type, _Registration] = {}
_by_tag: dict[str, _Registration] = {}


def register_type(cls: type, tag: str, encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> None:
    """Send instances of ``cls`` by value as ``encode(obj)``, rebuilt by ``decode(value)``.

    ``tag`` names the type on the wire and must be registered under the same
    name with a compatible ``decode`` on both ends. ``encode`` must return a
    value the codec can send. Registering a tag again replaces it.
    """
    if not tag or len(tag) > 128:
        raise ValueError("a type tag must be 1 to 128 characters")
    reg = _Registration(cls, tag, encode, decode)
    old = _by_tag.get(tag)
    if old is not None:
        _by_class.pop(old.cls, None)
    _by_class[cls] = reg
    _by_tag[tag] = reg


def _loads_pickle(data: bytes) -> Any:
    import cloudpickle  # imported only where pickle is allowed

    return cloudpickle.loads(data)


def _dumps_pickle(obj: Any) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps(obj)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(obj).__qualname__}: {exc}") from exc


def _reject_all_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"extension type {code} is not allowed here")


def _plain_default(obj: Any) -> Any:
    raise SerializationError(f"cannot send a {type(obj).__qualname__} here")


def encode_plain(obj: Any) -> bytes:
    """Encode msgpack-native values only (no extension types), e.g. for handshakes."""
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True, default=_plain_default)
        return data
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(str(exc)) from exc


def decode_plain(data: bytes | bytearray | memoryview) -> Any:
    """Decode msgpack-native values only: no extension types, string map keys."""
    try:
        return msgpack.unpackb(data, ext_hook=_reject_all_ext, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc


_BYTES_TYPES: frozenset[type] = frozenset({bytes, bytearray, memoryview})
_array16 = struct.Struct(">BH").pack
_array32 = struct.Struct(">BI").pack


def _nbytes(value: bytes | bytearray | memoryview) -> int:
    return value.nbytes if type(value) is memoryview else len(value)


def _array_header(n: int) -> bytes:
    if n <= 15:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return _array16(0xDC, n)
    return _array32(0xDD, n)


def _bin_header(n: int) -> bytes:
    if n > 0xFFFFFFFF:
        raise SerializationError(f"a bytes value of {n} bytes is too large for msgpack")
    return _array32(0xC6, n)  # bin 32: type byte, 4-byte length


def _check_hashes(keys: list[Any]) -> None:
    if len(keys) <= _SAME_HASH_LIMIT:
        return
    counts = Counter(hash(k) for k in keys)
    if max(counts.values()) > _SAME_HASH_LIMIT:
        raise ProtocolError("dict keys with colliding hashes refused")


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    if len(pairs) > _SAME_HASH_LIMIT:
        for key, _ in pairs:
            if type(key) is not str:
                _check_hashes([k for k, _ in pairs])
                break
    return dict(pairs)


class Codec:
    """Encoder and decoder for one connection.

    ``accept_pickle`` is this side's own policy for pickled payloads it
    receives (see :data:`PicklePolicy`). ``send_pickle`` says whether values
    msgpack cannot carry may be sent pickled; a connection sets it only once
    the peer has authenticated and announced that it accepts pickles.
    Without it, such values raise :class:`SerializationError`.

    Two hooks let a paradigm send some objects by reference: ``ref_encoder``
    is offered every value msgpack, the built-in extension types and
    registered types cannot carry, and returns an :class:`ObjectRef` for it
    (or None to decline); ``ref_decoder`` turns every :class:`ObjectRef`
    decoded into what the application sees (a proxy). Both default to None.
    """

    __slots__ = (
        "_depth",
        "_lenient",
        "_packer",
        "accept_pickle",
        "ref_decoder",
        "ref_encoder",
        "send_pickle",
    )

    def __init__(self, *, accept_pickle: PicklePolicy = "refuse", send_pickle: bool = False) -> None:
        if accept_pickle not in ("refuse", "opaque", "load"):
            raise ValueError(f"accept_pickle must be 'refuse', 'opaque' or 'load', not {accept_pickle!r}")
        self.accept_pickle: PicklePolicy = accept_pickle
        self.send_pickle = send_pickle
        self.ref_encoder: Callable[[Any], ObjectRef | None] | None = None
        self.ref_decoder: Callable[[ObjectRef], Any] | None = None
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True, strict_types=True)
        self._depth = 0
        self._lenient = False

    # -- encoding ----------------------------------------------------------------------

    def encode(self, obj: Any) -> bytes:
        """Encode ``obj``; raise :class:`SerializationError` if it cannot be sent."""
        try:
            data: bytes = self._packer.pack(obj)
            return data
        except SerializationError:
            self._packer.reset()
            raise
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            self._packer.reset()
            raise SerializationError(f"cannot encode value: {exc}") from exc

    def encode_parts(self, msg: list[Any]) -> list[bytes | memoryview] | None:
        """Encode a message array without copying its large bytes values, or return None.

        Looks at the items of ``msg`` and of lists directly inside it. If one
        is a bytes-like value of at least :data:`LARGE_BYTES`, returns
        buffers whose concatenation is exactly ``encode(msg)``, with that
        value itself among them (written by reference, never copied).
        Otherwise returns None: use :meth:`encode`.
        """
        found = False
        for item in msg:
            t = type(item)
            if t in _BYTES_TYPES:
                if _nbytes(item) >= LARGE_BYTES:
                    found = True
                    break
            elif t is list:
                for inner in item:
                    if type(inner) in _BYTES_TYPES and _nbytes(inner) >= LARGE_BYTES:
                        found = True
                        break
                if found:
                    break
        if not found:
            return None
        parts: list[bytes | memoryview] = []
        small: list[bytes] = [_array_header(len(msg))]
        for item in msg:
            if type(item) is list:
                small.append(_array_header(len(item)))
                for inner in item:
                    self._encode_part(inner, parts, small)
            else:
                self._encode_part(item, parts, small)
        if small:
            parts.append(b"".join(small))
        return parts

    def _encode_part(self, item: Any, parts: list[bytes | memoryview], small: list[bytes]) -> None:
        if type(item) in _BYTES_TYPES and _nbytes(item) >= LARGE_BYTES:
            view = memoryview(item).cast("B")
            small.append(_bin_header(len(view)))
            parts.append(b"".join(small))
            small.clear()
            parts.append(view)
        else:
            small.append(self.encode(item))

    def _nested(self, obj: Any) -> bytes:
        data: bytes = msgpack.packb(obj, default=self._default, use_bin_type=True, strict_types=True)
        return data

    def _default(self, obj: Any) -> Any:
        t = type(obj)
        if t is tuple:
            return msgpack.ExtType(EXT_TUPLE, self._nested(list(obj)))
        if t is int:
            size = (obj.bit_length() + 8) // 8
            if size > MAX_BIGINT_BYTES:
                raise SerializationError(f"int of {obj.bit_length()} bits is too large to send")
            return msgpack.ExtType(EXT_BIGINT, obj.to_bytes(size, "big", signed=True))
        if t is set:
            return msgpack.ExtType(EXT_SET, self._nested(list(obj)))
        if t is frozenset:
            return msgpack.ExtType(EXT_FROZENSET, self._nested(list(obj)))
        if t is ObjectRef:
            return msgpack.ExtType(EXT_REF, self._nested([obj.uri, obj.meta]))
        if t is Pickled:
            if not self.send_pickle:
                raise SerializationError("the peer does not accept pickled payloads")
            return msgpack.ExtType(EXT_PICKLE, obj.data)
        reg = _by_class.get(t)
        if reg is not None:
            return msgpack.ExtType(EXT_REGISTERED, self._nested([reg.tag, reg.encode(obj)]))
        if isinstance(obj, BaseException):
            return msgpack.ExtType(EXT_ERROR, self._nested(self.exception_fields(obj)))
        if self.ref_encoder is not None:
            ref = self.ref_encoder(obj)
            if ref is not None:
                return msgpack.ExtType(EXT_REF, self._nested([ref.uri, ref.meta]))
        # Subclasses of msgpack's own types travel as their base type (IntEnum, OrderedDict...),
        # except where pickling would keep them whole.
        if not self.send_pickle:
            for base in (bool, int, float, str, bytes):
                if isinstance(obj, base):
                    return base(obj)  # type: ignore[arg-type]
            if isinstance(obj, bytearray):
                return bytes(obj)
            if isinstance(obj, dict):
                return dict(obj)
            if isinstance(obj, list | tuple):
                return list(obj)
            if isinstance(obj, memoryview):
                return obj.tobytes()
            raise SerializationError(
                f"cannot send a {t.__qualname__}: not a msgpack type, not registered "
                "with asyncdist.codec.register_type, and this connection does not pickle"
            )
        if t is bytearray or t is memoryview:
            return bytes(obj)
        return msgpack.ExtType(EXT_PICKLE, _dumps_pickle(obj))

    def exception_fields(self, exc: BaseException) -> list[Any]:
        """Return the wire fields of an exception: type name, args, message, traceback text."""
        tb = getattr(exc, "remote_traceback", None)
        if not isinstance(tb, str) or not tb:
            tb = "".join(traceback.format_exception(exc))
        if len(tb) > MAX_TRACEBACK:
            tb = tb[: MAX_TRACEBACK // 2] + "\n[...]\n" + tb[-MAX_TRACEBACK // 2 :]
        args: list[Any] = list(exc.args)
        if isinstance(exc, OSError) and exc.filename is not None and len(args) == 2:
            # OSError keeps the file names outside .args; its constructor takes them back.
            args.append(exc.filename)
            if exc.filename2 is not None:
                args += [None, exc.filename2]
        try:
            self._nested(args)
        except Exception:
            args = [a if isinstance(a, str | int | float | bool | None) else repr(a) for a in args]
        try:
            message = str(exc)
        except Exception:
            message = f"<unprintable {type(exc).__qualname__}>"
        return [exception_type_name(type(exc)), args, message, tb]

    # -- decoding ----------------------------------------------------------------------

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode one body; raise :class:`ProtocolError` for anything malformed or refused."""
        self._depth = 0
        self._lenient = False
        try:
            try:
                return msgpack.unpackb(data, ext_hook=self._ext_hook)
            except ValueError as exc:
                if "strict_map_key" not in str(exc):
                    raise
            # A map with non-string keys: decode again, guarding against hash flooding.
            self._depth = 0
            self._lenient = True
            return msgpack.unpackb(
                data, ext_hook=self._ext_hook, strict_map_key=False, object_pairs_hook=_pairs
            )
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc

    def _inner(self, data: bytes) -> Any:
        self._depth += 1
        if self._depth > MAX_NESTED_EXT:
            raise ProtocolError("extension types nested too deeply")
        try:
            if self._lenient:
                return msgpack.unpackb(
                    data, ext_hook=self._ext_hook, strict_map_key=False, object_pairs_hook=_pairs
                )
            return msgpack.unpackb(data, ext_hook=self._ext_hook)
        finally:
            self._depth -= 1

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            items = self._inner(data)
            if type(items) is not list:
                raise ProtocolError("bad tuple payload")
            return tuple(items)
        if code == EXT_ERROR:
            f = self._inner(data)
            if not (
                type(f) is list
                and len(f) == 4
                and type(f[0]) is str
                and type(f[1]) is list
                and type(f[2]) is str
                and type(f[3]) is str
            ):
                raise ProtocolError("bad remote-error payload")
            return rebuild_exception(f[0], f[1], f[2], f[3])
        if code == EXT_PICKLE:
            policy = self.accept_pickle
            if policy == "load":
                try:
                    return _loads_pickle(data)
                except Exception as exc:
                    raise ProtocolError(f"pickled payload failed to load: {exc!r}") from exc
            if policy == "opaque":
                return Pickled(bytes(data))
            raise ProtocolError("pickled payload refused on this connection")
        if code == EXT_REF:
            f = self._inner(data)
            if not (type(f) is list and len(f) == 2 and type(f[0]) is str and type(f[1]) is dict):
                raise ProtocolError("bad object-reference payload")
            ref = ObjectRef(f[0], f[1])
            if self.ref_decoder is not None:
                return self.ref_decoder(ref)
            return ref
        if code == EXT_BIGINT:
            if not 0 < len(data) <= MAX_BIGINT_BYTES:
                raise ProtocolError("bad big-int payload")
            return int.from_bytes(data, "big", signed=True)
        if code in (EXT_SET, EXT_FROZENSET):
            items = self._inner(data)
            if type(items) is not list:
                raise ProtocolError("bad set payload")
            _check_hashes(items)
            return set(items) if code == EXT_SET else frozenset(items)
        if code == EXT_REGISTERED:
            f = self._inner(data)
            if not (type(f) is list and len(f) == 2 and type(f[0]) is str):
                raise ProtocolError("bad registered-type payload")
            reg = _by_tag.get(f[0])
            if reg is None:
                raise ProtocolError(f"unknown registered type {f[0][:128]!r}")
            try:
                return reg.decode(f[1])
            except Exception as exc:
                raise ProtocolError(f"registered type {reg.tag!r} failed to decode: {exc!r}") from exc
        raise ProtocolError(f"unknown extension type {code}")
