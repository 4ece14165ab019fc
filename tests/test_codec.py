"""Sans-I/O tests of asyncdist.codec: values, extension types, the pickle gate, error rebuilding."""

from __future__ import annotations

import datetime
import enum
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncdist
from asyncdist.codec import (
    EXT_BIGINT,
    EXT_ERROR,
    EXT_PICKLE,
    EXT_TUPLE,
    Codec,
    ObjectRef,
    Pickled,
    decode_plain,
    encode_plain,
    register_type,
)
from asyncdist.errors import ProtocolError, RemoteError, SerializationError

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
hashables = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(scalars, max_size=3))
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(scalars, max_size=4)
    ),
    max_leaves=20,
)


@given(values)
@settings(max_examples=300, deadline=None)
def test_values_round_trip_with_their_types(value: Any) -> None:
    codec = Codec()
    back = codec.decode(codec.encode(value))
    assert back == value
    assert type(back) is type(value)


def test_big_ints_travel_as_extension() -> None:
    codec = Codec()
    for n in (2**64, -(2**63) - 1, 10**100, -(10**100)):
        body = codec.encode(n)
        assert msgpack.unpackb(body, ext_hook=lambda c, d: c) == EXT_BIGINT
        assert codec.decode(body) == n
    with pytest.raises(SerializationError, match="too large"):
        codec.encode(1 << (8 * 70_000))


def test_subclasses_of_native_types_travel_as_their_base() -> None:
    class Color(enum.IntEnum):
        RED = 1

    codec = Codec()
    assert codec.decode(codec.encode([Color.RED, OrderedDict(a=1), bytearray(b"xy")])) == [
        1,
        {"a": 1},
        b"xy",
    ]


def test_unsendable_values_raise_serialization_error_without_pickle() -> None:
    codec = Codec()
    with pytest.raises(SerializationError, match="does not pickle"):
        codec.encode([threading.Lock()])
    with pytest.raises(SerializationError):
        codec.encode(datetime.datetime.now())
    # The codec stays usable afterwards.
    assert codec.decode(codec.encode([1, 2])) == [1, 2]


def test_object_refs() -> None:
    codec = Codec()
    ref = ObjectRef("adist:abc@127.0.0.1:9", {"type": "Shop"})
    back = codec.decode(codec.encode([ref]))[0]
    assert back == ref
    assert back.meta == {"type": "Shop"}


def test_registered_types() -> None:
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

    register_type(Point, "test.Point", lambda p: [p.x, p.y], lambda v: Point(*v))
    codec = Codec()
    back = codec.decode(codec.encode({"p": Point(1, 2)}))["p"]
    assert isinstance(back, Point)
    assert (back.x, back.y) == (1, 2)
    unknown = msgpack.packb(
        msgpack.ExtType(7, msgpack.packb(["test.Nope", 1], use_bin_type=True)), use_bin_type=True
    )
    with pytest.raises(ProtocolError, match="unknown registered type"):
        codec.decode(unknown)


# -- the pickle gate ----------------------------------------------------------------------


class _Marker:
    """Unpickling this creates a file: proof that pickle.loads ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def _pickled_marker(path: Path) -> bytes:
    import cloudpickle

    return msgpack.packb(
        [msgpack.ExtType(EXT_PICKLE, cloudpickle.dumps(_Marker(str(path))))], use_bin_type=True
    )


def test_pickle_refused_by_default_without_loading(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ProtocolError, match="pickled payload refused"):
        Codec().decode(_pickled_marker(marker))
    assert not marker.exists()


def test_pickle_opaque_keeps_bytes_without_loading(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    value = Codec(accept_pickle="opaque").decode(_pickled_marker(marker))[0]
    assert isinstance(value, Pickled)
    assert not marker.exists()
    # Forwarding re-emits the same bytes, only to a peer that accepts pickles.
    with pytest.raises(SerializationError):
        Codec().encode(value)
    relayed = Codec(send_pickle=True).encode([value])
    assert relayed == _pickled_marker(marker)


def test_pickle_loaded_only_with_load_policy(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    Codec(accept_pickle="load").decode(_pickled_marker(marker))
    assert marker.exists()


def test_send_pickle_carries_lambdas_and_custom_objects() -> None:
    sender = Codec(send_pickle=True)
    receiver = Codec(accept_pickle="load")
    fn = receiver.decode(sender.encode(lambda x: x * 3))
    assert fn(2) == 6
    when = datetime.date(2026, 11, 27)
    assert receiver.decode(sender.encode([when])) == [when]


def test_plain_codec_refuses_every_extension() -> None:
    assert decode_plain(encode_plain({"a": [1, b"x"]})) == {"a": [1, b"x"]}
    with pytest.raises(ProtocolError, match="not allowed"):
        decode_plain(msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\x90")))
    with pytest.raises(ProtocolError):
        decode_plain(msgpack.packb({1: 2}))
    with pytest.raises(SerializationError):
        encode_plain((1, 2j))


# -- limits -------------------------------------------------------------------------------


def test_colliding_hash_keys_are_refused_quickly() -> None:
    p = 2**61 - 1  # hash(i * p) == 0 for every int i
    keys = [msgpack.ExtType(EXT_BIGINT, (i * p).to_bytes(16, "big", signed=True)) for i in range(1, 200_001)]
    packer = msgpack.Packer(use_bin_type=True)
    body = packer.pack_map_header(len(keys)) + b"".join(packer.pack(k) + packer.pack(0) for k in keys)
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="colliding"):
        Codec().decode(body)
    assert time.perf_counter() - started < 5


def test_non_string_keys_are_fine() -> None:
    codec = Codec()
    d = {1: "a", 2.5: "b", None: "c", (1, 2): "d", b"k": "e"}
    assert codec.decode(codec.encode(d)) == d


def test_nested_extensions_are_bounded() -> None:
    body = msgpack.packb([])
    for _ in range(100):
        body = msgpack.packb(msgpack.ExtType(EXT_TUPLE, body))
    with pytest.raises(ProtocolError, match="nested too deeply"):
        Codec().decode(body)


def test_deep_plain_nesting_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Codec().decode(b"\x91" * 3000 + b"\x00")


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x01\x02",  # trailing bytes
        b"\xdd\xff\xff\xff\xff",  # array header claiming 2**32-1 items
        b"\xa2\xff\xfe",  # invalid UTF-8
        msgpack.packb(msgpack.ExtType(42, b"x")),  # unknown extension
        msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\x01")),  # tuple payload not a list
        msgpack.packb(msgpack.ExtType(EXT_BIGINT, b"")),
        msgpack.packb(msgpack.ExtType(EXT_ERROR, msgpack.packb([1, 2]))),
    ],
)
def test_malformed_bodies_raise_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        Codec().decode(body)


# -- remote exceptions --------------------------------------------------------------------


def _remote_error(type_name: str, args: list[Any], message: str, tb: str = "tb") -> bytes:
    return msgpack.packb(
        msgpack.ExtType(EXT_ERROR, msgpack.packb([type_name, args, message, tb], use_bin_type=True)),
        use_bin_type=True,
    )


def test_builtin_exceptions_are_rebuilt_exactly() -> None:
    codec = Codec()
    try:
        {}["unknown account"]
    except KeyError as exc:
        back = codec.decode(codec.encode(exc))
    assert type(back) is KeyError
    assert back.args == ("unknown account",)
    assert str(back) == "'unknown account'"
    assert "test_builtin_exceptions_are_rebuilt_exactly" in back.remote_traceback
    assert any("Remote traceback" in note for note in back.__notes__)


def test_os_error_keeps_its_subclass() -> None:
    codec = Codec()
    back = codec.decode(codec.encode(FileNotFoundError(2, "No such file", "/x")))
    assert type(back) is FileNotFoundError
    assert back.errno == 2


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "subprocess.Popen",
        "builtins.object",
        "builtins.print",
        "builtins.SystemExit",
        "nosuch.Mod",
    ],
)
def test_dangerous_or_unknown_exception_names_become_remote_error(name: str) -> None:
    modules = set(sys.modules)
    back = Codec().decode(_remote_error(name, ["rm -rf /"], "boom", "Traceback: here"))
    assert type(back) is RemoteError
    assert back.type_name == name
    assert back.message == "boom"
    assert back.remote_traceback == "Traceback: here"
    assert set(sys.modules) == modules  # nothing imported


def test_exception_whose_args_do_not_round_trip_becomes_remote_error() -> None:
    class Odd(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(f"code {code}")

    asyncdist.register_error(Odd)
    back = Codec().decode(Codec().encode(Odd(3)))
    # Odd("code 3") would say "code code 3": rather RemoteError than a wrong message.
    assert isinstance(back, RemoteError)
    assert str(back).endswith("code 3")


def test_registered_exceptions_are_rebuilt() -> None:
    class ShopError(Exception):
        pass

    codec = Codec()
    assert type(codec.decode(codec.encode(ShopError("closed")))) is RemoteError
    asyncdist.register_error(ShopError)
    back = codec.decode(codec.encode(ShopError("closed")))
    assert type(back) is ShopError
    assert back.args == ("closed",)


def test_remote_error_relays_keep_the_original_type_name() -> None:
    codec = Codec()
    first = codec.decode(_remote_error("secret.Thing", [1], "bad", "tb1"))
    second = codec.decode(codec.encode(first))
    assert type(second) is RemoteError
    assert second.type_name == "secret.Thing"
    assert second.message == "bad"


def test_unencodable_exception_args_are_sent_as_repr() -> None:
    codec = Codec()
    back = codec.decode(codec.encode(ValueError(threading.Lock())))
    assert isinstance(back, RemoteError | ValueError)
    assert "lock" in str(back).lower()


def test_exception_tree_is_drawn_in_errors_docstring() -> None:
    doc = asyncdist.errors.__doc__ or ""
    for name in asyncdist.errors.__all__:
        obj = getattr(asyncdist.errors, name)
        if isinstance(obj, type):
            assert name in doc, name
            assert issubclass(obj, asyncdist.AsyncDistError)
