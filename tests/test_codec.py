"""The codec on its own: round trips of every supported type, and refusals."""

from __future__ import annotations

import queue
from collections import OrderedDict
from enum import Enum, IntEnum
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvclient.errors import KindError, ProtocolError, RemoteError
from kvproto.codec import EXT_EXCEPTION, EXT_TUPLE, Codec, Ref

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # includes ints beyond 64 bits (bigint ext)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
# Keys: ints within 64 bits (bigger ones are refused as keys: see test_bigint_keys_are_refused).
keys = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text()
    | st.binary()
)
hashables = st.recursive(keys, lambda inner: st.tuples(inner, inner), max_leaves=5)
values = st.recursive(
    scalars | st.builds(Ref, st.sampled_from(["dict", "list", "queue"]), st.text(min_size=1)),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(hashables, inner, max_size=5)
    ),
    max_leaves=30,
)


def _same(a: Any, b: Any) -> bool:
    """Equality that also checks types all the way down (1 == True would hide a bug)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(values)
def test_round_trip_preserves_value_and_type(value: Any) -> None:
    codec = Codec()
    assert _same(codec.unpack(codec.pack(value)), value)


@given(st.integers(min_value=-(2**200), max_value=2**200))
def test_big_ints_survive(value: int) -> None:
    codec = Codec()
    assert codec.unpack(codec.pack(value)) == value


def test_tuple_stays_tuple_list_stays_list_bytes_stay_bytes() -> None:
    codec = Codec()
    out = codec.unpack(codec.pack([(1, 2), [1, 2], b"x", "x"]))
    assert out == [(1, 2), [1, 2], b"x", "x"]
    assert [type(v) for v in out] == [tuple, list, bytes, str]


def test_subclasses_of_natives_are_sent_as_their_base() -> None:
    class Color(str, Enum):
        RED = "red"

    class Level(IntEnum):
        HIGH = 3

    codec = Codec()
    out = codec.unpack(codec.pack([Color.RED, Level.HIGH, OrderedDict(a=1), bytearray(b"z")]))
    assert out == ["red", 3, {"a": 1}, b"z"]
    assert [type(v) for v in out] == [str, int, dict, bytes]


@pytest.mark.parametrize(
    ("value", "type_name"),
    [({1, 2}, "set"), (frozenset(), "frozenset"), (object(), "object"), (1j, "complex")],
)
def test_unsupported_types_raise_type_error_naming_the_type(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match=f"'{type_name}'"):
        Codec().pack({"k": value})


def test_self_referencing_list_is_a_type_error_not_a_crash() -> None:
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(TypeError, match="cannot encode"):
        Codec().pack(looped)


def test_clients_cannot_send_exceptions_as_values() -> None:
    with pytest.raises(TypeError, match="'KeyError'"):
        Codec().pack(["x", KeyError("k")])


def test_allow_listed_exceptions_cross_as_themselves() -> None:
    codec = Codec(encode_exceptions=True)
    for exc in (KeyError("k"), IndexError("i"), ValueError("v"), queue.Empty(), queue.Full()):
        out = codec.unpack(codec.pack(exc))
        assert type(out) is type(exc)
        assert out.args == exc.args
    out = codec.unpack(codec.pack(KindError("taken")))
    assert isinstance(out, KindError)


def test_other_exceptions_become_remote_error_with_type_and_message() -> None:
    codec = Codec(encode_exceptions=True)
    out = codec.unpack(codec.pack(OSError("disk on fire")))
    assert isinstance(out, RemoteError)
    assert (out.type_name, out.message) == ("OSError", "disk on fire")
    # A subclass of an allow-listed type crosses as that base, with its message.
    out = codec.unpack(codec.pack(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")))
    assert type(out) is ValueError


def test_unknown_exception_names_from_a_peer_are_not_instantiated() -> None:
    payload = msgpack.packb(
        msgpack.ExtType(EXT_EXCEPTION, msgpack.packb(["os.system", ["echo pwned"]])),
        use_bin_type=True,
    )
    out = Codec().unpack(payload)
    assert isinstance(out, RemoteError)
    assert out.type_name == "os.system"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # array of 2 with one element: truncated
        b"\xd9\x02\xff\xfe",  # str with invalid UTF-8
        msgpack.packb(msgpack.ExtType(99, b"")),  # unknown ext code
        msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\xc1")),  # bad nested payload
        msgpack.packb([1]) + b"extra",  # trailing bytes
    ],
)
def test_malformed_payloads_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="undecodable"):
        Codec().unpack(payload)


def test_deeply_nested_ext_is_a_protocol_error_not_a_crash() -> None:
    payload = msgpack.packb(None)
    for _ in range(5000):
        payload = msgpack.packb(msgpack.ExtType(EXT_TUPLE, payload))
    with pytest.raises(ProtocolError):
        Codec().unpack(payload)


def test_codec_module_never_imports_pickle() -> None:
    import ast
    from pathlib import Path

    import kvclient
    import kvserve

    for package in (kvclient, kvserve):
        assert package.__file__ is not None
        for path in Path(package.__file__).parent.glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                assert not any(n.split(".")[0] in {"pickle", "cPickle", "dill"} for n in names), (
                    path
                )


def test_deeply_nested_tuples_refuse_to_encode_cleanly() -> None:
    value: Any = None
    for _ in range(5000):
        value = (value,)
    with pytest.raises(TypeError, match="nested too deeply"):
        Codec().pack(value)


# What the server accepts it can always write back: a value decoded from any bytes either
# raises ProtocolError or encodes again (the segfault of issue 12 was a decodable value that
# could not be re-encoded). Structured messages reach the ext and nesting paths that random
# bytes rarely do.
_wire = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=8)
    | st.text(max_size=8)
    | st.builds(
        lambda n: msgpack.ExtType(4, n.to_bytes(16, "big", signed=True)),
        st.integers(min_value=-(2**120), max_value=2**120),
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(
            lambda items: msgpack.ExtType(EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
        )
        | st.dictionaries(
            st.integers(min_value=-(2**120), max_value=2**120) | st.text(max_size=4),
            inner,
            max_size=4,
        ).map(
            lambda d: {
                (
                    msgpack.ExtType(4, k.to_bytes(16, "big", signed=True))
                    if isinstance(k, int) and not -(2**63) <= k < 2**64
                    else k
                ): v
                for k, v in d.items()
            }
        )
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), _wire.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_anything_the_server_decodes_it_can_encode_again(data: bytes) -> None:
    from kvproto.codec import MAX_DEPTH

    try:
        value = Codec(decode_depth=MAX_DEPTH).unpack(data)
    except ProtocolError:
        return
    encoded = Codec().pack(value)  # must not raise (nor crash)
    assert Codec().pack(Codec().unpack(encoded)) == encoded  # and is stable (nan-safe)


def test_nesting_at_the_limit_round_trips_and_one_more_is_refused() -> None:
    from kvproto.codec import MAX_DEPTH

    deepest: Any = None
    for index in range(MAX_DEPTH):
        deepest = [deepest] if index % 2 else (deepest,)  # lists and tuple exts alike
    client = Codec(encode_depth=MAX_DEPTH)
    server = Codec(decode_depth=MAX_DEPTH)
    assert _same(server.unpack(client.pack(deepest)), deepest)
    with pytest.raises(TypeError, match="nested deeper"):
        client.pack([deepest])
    with pytest.raises(ProtocolError, match="nested deeper"):
        server.unpack(Codec().pack([deepest]))


def test_bigint_keys_are_refused_both_ways() -> None:
    big = 2**70
    with pytest.raises(TypeError, match="64 bits"):
        Codec().pack({big: 1})
    with pytest.raises(TypeError, match="64 bits"):
        Codec().pack([{(1, (big,)): 1}])
    raw = msgpack.packb(
        {msgpack.ExtType(4, big.to_bytes(16, "big", signed=True)): 1}, use_bin_type=True
    )
    with pytest.raises(ProtocolError, match="64 bits"):
        Codec().unpack(raw)
    assert Codec().unpack(Codec().pack({"k": big})) == {"k": big}  # fine as a value


def test_pack_plain_matches_pack_for_plain_values_and_refuses_a_lone_surrogate() -> None:
    # The server's reply fast path (Server._reply) packs PLAIN values with pack_plain and
    # falls back to pack on ValueError; both must give the same bytes where both work.
    from kvproto.codec import PLAIN, Codec

    codec = Codec(encode_exceptions=True)
    for value in ["", "x" * 100, "é", b"\x00\xff", 1.5, True, False, None]:
        assert type(value) in PLAIN
        message = ["#RETURN", value]
        assert codec.pack_plain(message) == codec.pack(message)
        assert msgpack.unpackb(codec.pack_plain(message)) == message
    assert int not in PLAIN  # one beyond 64 bits needs the bigint ext: pack's default
    with pytest.raises(ValueError):  # UnicodeEncodeError: the fallback's case
        codec.pack_plain(["#RETURN", "\ud800"])
    with pytest.raises(TypeError, match="cannot encode"):  # what _reply turns into an error
        codec.pack(["#RETURN", "\ud800"])
