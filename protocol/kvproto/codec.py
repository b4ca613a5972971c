"""Values on the wire: msgpack with ext types, the limits a decoder enforces. Nothing else.

This module encodes and decodes message payloads; framing, the handshake and the message
shapes are in :mod:`kvproto.wire`. It knows nothing of sockets. Nothing is ever pickled.

Values
------
msgpack natives with ``use_bin_type=True`` (so ``str`` and ``bytes`` stay distinct): None, bool,
int (64-bit), float, str, bytes, list, dict (keys of any encodable hashable type). Ext types:

=====  ==========  =================================================================
code   type        payload
=====  ==========  =================================================================
1      tuple       msgpack array of the items (a tuple stays a tuple, a list a list)
2      ref         ``[kind, name]``: a reference to a named container (a proxy)
3      exception   ``[type_name, args]``; only allow-listed types are rebuilt as
                   themselves, any other becomes :class:`~kvproto.errors.RemoteError`
4      bigint      signed big-endian two's complement bytes (ints beyond 64 bits)
=====  ==========  =================================================================

Anything else (a set, an arbitrary object) raises ``TypeError`` naming the type when it is
encoded, that is on the client before anything is sent.

Limits (what a decoder accepts is always what an encoder can write back)
-------------------------------------------------------------------------
- **Depth.** A request nests at most ``MAX_DEPTH`` (128) levels of arrays, maps and ext types,
  the request's own array and its ``args`` included (so a value in a plain call has 126). The
  server refuses deeper requests (``ProtocolError``) and the client refuses to send them
  (``TypeError``): without a limit, a 20 KB value of tuples nesting lists decoded fine and then
  crashed the server (C stack overflow) when it was read back, dumped or compacted. Replies,
  logs, snapshots and dumps wrap stored values in a few more levels and are decoded with
  ``STORED_DEPTH`` (``MAX_DEPTH`` + 16).
- **Keys.** A map key (and a key stored in a dict container) may not contain an int beyond 64
  bits: CPython's int hash is not randomized, so such keys can be chosen to all collide and
  make one dict insert cost O(n) (a 1 MB map stalled the server for 48 s). Ints of any size
  remain fine as values. ``TypeError`` on both sides.
- **Cost.** Decoding is linear in the input: the depth check walks the decoded containers only
  when the payload holds more container headers than ``MAX_DEPTH``, and maps take the slower
  checked path only when a bigint ext is present. Linear is not enough, since what costs is
  what is built (64 MiB of empty arrays: 9 s; of 100-byte strings: 0.3 s): a decoder given
  ``decode_values`` (the server's, :data:`kvproto.limits.MAX_REQUEST_VALUES`) counts every
  array and map it completes, with its elements, and stops at the limit, so no frame costs
  the loop more than about 0.3 s.
"""

from __future__ import annotations

import builtins
import gc
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgpack

from kvproto.errors import (
    AuthError,
    CompactedError,
    KindError,
    KVConnectionError,
    KVError,
    NoSuchContainerError,
    NotSupportedError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
)
from kvproto.limits import CONTAINER_COST, EXT_COST

__all__ = [
    "EXT_BIGINT",
    "EXT_EXCEPTION",
    "EXT_REF",
    "EXT_TUPLE",
    "MAX_DEPTH",
    "MAX_EXT_DEPTH",
    "PLAIN",
    "STORED_DEPTH",
    "Codec",
    "Ref",
    "check_key",
    "encode_exception",
    "too_deep",
]

EXT_TUPLE: Final = 1
EXT_REF: Final = 2
EXT_EXCEPTION: Final = 3
EXT_BIGINT: Final = 4
MAX_EXT_DEPTH: Final = 100
MAX_DEPTH: Final = 128
STORED_DEPTH: Final = MAX_DEPTH + 16
_INT64_MIN: Final = -(2**63)
_UINT64_END: Final = 2**64

# First bytes of msgpack arrays, maps and exts: every nesting level has one of these in the
# payload, so a payload with at most MAX_DEPTH of them cannot nest deeper (see _may_be_deep).
_CONTAINER_CODES: Final = bytes(
    [*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF, 0xC7, 0xC8, 0xC9, *range(0xD4, 0xD9)]
)
_SCAN_LIMIT: Final = 64 * 1024  # above this, walk the decoded value instead of scanning bytes
_NESTING: Final = frozenset({list, tuple, dict})
# Values msgpack writes with no nesting (an int beyond 64 bits goes through `default`, which
# Codec.pack_request sees): args of only these make a request two levels deep.
_SCALARS: Final = frozenset({str, bytes, int, float, bool, type(None)})
PLAIN: Final = _SCALARS - {int}
"""Types msgpack encodes natively with no hook (not int: one beyond 64 bits needs the ext)."""
_GC_PAUSE_BYTES: Final = 256 * 1024  # above this, decoding pauses the garbage collector
# Above this, a decoder with a value limit counts what it builds (a Python call per array and
# map: ~0.1 us each, not worth it below, where the worst payload decodes in ~30 ms).
_COUNT_ABOVE: Final = 256 * 1024


class _OverBudget(Exception):
    """Raised by a counting hook: the payload holds more values than its decoder allows."""


class _NeedsCheckedMaps(Exception):
    """Raised by the fast decoder at the first bigint or tuple: decode again, maps checked."""


def _may_be_deep(data: Any, limit: int) -> bool:
    size = len(data)
    if size <= limit:
        return False
    if size > _SCAN_LIMIT:
        return True  # the walk then decides; it is quick for a few large strings
    # tobytes(): a server decodes views of its receive buffer, and bytes() of one costs twice.
    raw = data.tobytes() if type(data) is memoryview else bytes(data)
    return size - len(raw.translate(None, _CONTAINER_CODES)) > limit


def too_deep(obj: Any, limit: int) -> bool:
    """Return whether ``obj`` nests lists, tuples and dicts more than ``limit`` levels.

    Iterative, so it cannot itself overflow a stack; stops at the first level too deep. Empty
    children are never pushed (they cannot go deeper), which keeps a payload of millions of
    empty containers cheap to check.
    """
    if limit < 1:
        return True
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        inner = depth + 1
        children = item.values() if type(item) is dict else item
        if type(item) is dict:
            keys_nest = not _NESTING.isdisjoint(map(type, item))
        else:
            keys_nest = False
        if not keys_nest and _NESTING.isdisjoint(map(type, children)):
            continue  # flat: checked at C speed, no Python step per item
        if keys_nest:
            for key in item:
                if type(key) is tuple and key:
                    if inner > limit:
                        return True
                    stack.append((key, inner))
        for value in children:
            kind = type(value)
            if kind is list or kind is tuple or kind is dict:
                if inner > limit:
                    return True
                if value:
                    stack.append((value, inner))
    return False


def check_key(key: Any) -> None:
    """Refuse a dict key that contains an int beyond 64 bits (see "Keys" above).

    Raises:
        TypeError: it does.
    """
    if type(key) is int:
        if not _INT64_MIN <= key < _UINT64_END:
            raise TypeError(
                "dict keys may not be ints beyond 64 bits (they can be made to collide)"
            )
    elif type(key) is tuple:
        for item in key:
            check_key(item)


class Ref(NamedTuple):
    """A reference to a named container, as stored inside another container.

    Attributes:
        kind: container kind (``"dict"``, ``"list"``, ``"namespace"``, ``"queue"``).
        name: container name.
    """

    kind: str
    name: str


# Exceptions rebuilt as themselves on the receiving side, by wire name. Anything else becomes
# RemoteError: rebuilding arbitrary types by name would let a peer instantiate any class.
_EXCEPTIONS: Final[dict[str, type[BaseException]]] = {
    name: getattr(builtins, name)
    for name in (
        "ArithmeticError",
        "AttributeError",
        "IndexError",
        "KeyError",
        "LookupError",
        "NotImplementedError",
        "OverflowError",
        "PermissionError",
        "RuntimeError",
        "TimeoutError",
        "TypeError",
        "ValueError",
        "ZeroDivisionError",
    )
}
_EXCEPTIONS.update(
    {
        "queue.Empty": queue.Empty,
        "queue.Full": queue.Full,
        "threading.BrokenBarrierError": threading.BrokenBarrierError,
        "KVError": KVError,
        "KVConnectionError": KVConnectionError,
        "AuthError": AuthError,
        "CompactedError": CompactedError,
        "NotSupportedError": NotSupportedError,
        "KindError": KindError,
        "NoSuchContainerError": NoSuchContainerError,
        "ProtocolError": ProtocolError,
        "ReadOnlyError": ReadOnlyError,
    }
)
_EXCEPTION_NAMES: Final[dict[type[BaseException], str]] = {v: k for k, v in _EXCEPTIONS.items()}


def _wire_name(exc: BaseException) -> str | None:
    for klass in type(exc).__mro__:
        name = _EXCEPTION_NAMES.get(klass)
        if name is not None:
            return name
    return None


def encode_exception(exc: BaseException) -> tuple[str, list[Any]]:
    """Return ``(wire type name, args)`` for an exception about to cross the wire.

    An allow-listed type keeps its args; a subclass of one (``UnicodeDecodeError`` is a
    ``ValueError``) is sent as that base with its message; anything else is sent as a
    ``RemoteError`` carrying the original type name and message. Never a traceback.
    """
    if isinstance(exc, RemoteError):
        return "RemoteError", [exc.type_name, exc.message]
    name = _wire_name(exc)
    if name is None:
        return "RemoteError", [type(exc).__name__, str(exc)]
    if _EXCEPTIONS[name] is type(exc):
        return name, list(exc.args)
    return name, [str(exc)]


def _decode_exception(name: str, args: list[Any]) -> BaseException:
    if name == "RemoteError" and len(args) == 2:
        return RemoteError(str(args[0]), str(args[1]))
    klass = _EXCEPTIONS.get(name)
    if klass is None:
        return RemoteError(name, " ".join(map(str, args)))
    try:
        return klass(*args)
    except Exception:
        return RemoteError(name, " ".join(map(str, args)))


def _bigint_to_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)


class Codec:
    """Encode and decode message payloads (not frames) for one connection.

    A Codec holds a msgpack ``Packer``, which is not thread-safe: use one Codec per
    connection (connections are per thread).

    Args:
        make_ref: called with each decoded :class:`Ref`; the client turns it into a proxy,
            the server keeps it as a ``Ref``. Default: keep the ``Ref``.
        to_ref: called by the encoder with objects msgpack cannot encode natively; return a
            :class:`Ref` for objects that stand for a named container (proxies), else None.
        encode_exceptions: allow exceptions to be encoded (the server, for error replies).
            Clients cannot send exceptions, so a stored value is never one.
        decode_depth: deepest nesting :meth:`unpack` accepts (the server decodes requests
            with ``MAX_DEPTH``; everything else defaults to ``STORED_DEPTH``); None: no check
            (a client reading replies: what the server stores it checked on the way in).
        decode_exceptions: rebuild exception exts (replies); the server decodes requests with
            False, so a client cannot store an exception as a value (snapshots could not
            write it back).
        encode_depth: deepest nesting :meth:`pack` writes (clients: ``MAX_DEPTH``, so a
            request the server would refuse fails before it is sent); None: no check.
        decode_values: the most decoding work one payload may cost, in
            :func:`kvproto.limits.decode_cost` units (the server decodes requests with
            :data:`~kvproto.limits.MAX_REQUEST_VALUES`); None: no limit (logs, snapshots,
            replies: data the server already accepted).
    """

    __slots__ = (
        "_bigint_packed",
        "_budget",
        "_checked_maps",
        "_counted",
        "_decode_depth",
        "_decode_exceptions",
        "_decode_values",
        "_depth",
        "_encode_depth",
        "_encode_exceptions",
        "_make_ref",
        "_nest",
        "_nested",
        "_packer",
        "_plain_decode",
        "_to_ref",
        "ext_hook",
        "pack_plain",
    )

    def __init__(
        self,
        make_ref: Callable[[Ref], Any] | None = None,
        to_ref: Callable[[Any], Ref | None] | None = None,
        *,
        encode_exceptions: bool = False,
        decode_depth: int | None = STORED_DEPTH,
        encode_depth: int | None = None,
        decode_exceptions: bool = True,
        decode_values: int | None = None,
    ) -> None:
        self._decode_values = decode_values
        # unpack_reply's one-call decode: nothing to count or to check the depth of.
        self._plain_decode = decode_values is None and decode_depth is None
        self._counted = False
        self._budget = 0
        self._encode_exceptions = encode_exceptions
        self._decode_depth = decode_depth
        self._decode_exceptions = decode_exceptions
        self._encode_depth = encode_depth
        self._checked_maps = False
        self._bigint_packed = False
        self._nest = 0
        self._nested: list[msgpack.Packer] = []
        self._make_ref: Callable[[Ref], Any] = make_ref or (lambda ref: ref)
        self._to_ref = to_ref
        self._depth = 0
        # Bound once: unpackb(..., ext_hook=self._ext_hook) would bind a new method per call.
        self.ext_hook: Final = self._ext_hook
        self._packer = msgpack.Packer(
            default=self._default, use_bin_type=True, strict_types=True, autoreset=True
        )
        # The packer's own pack, for a message of lists and :data:`PLAIN` values only, which
        # msgpack writes without `default` (so no bigint, no ext, no depth to check): what
        # :meth:`pack` adds around it costs a Python call (the server's reply to a GET/SET).
        self.pack_plain: Final[Callable[[Any], bytes]] = self._packer.pack

    # -- encoding ---------------------------------------------------------------------------

    def _default(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is tuple:
            return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(obj)))
        if kind is Ref:
            return msgpack.ExtType(EXT_REF, self._pack_nested(list(obj)))
        if kind is int:  # only reached when it does not fit in 64 bits
            self._bigint_packed = True
            return msgpack.ExtType(EXT_BIGINT, _bigint_to_bytes(obj))
        if isinstance(obj, BaseException) and self._encode_exceptions:
            name, args = encode_exception(obj)
            try:
                payload = self._pack_nested([name, args])
            except (TypeError, ValueError, OverflowError):
                payload = self._pack_nested([name, [str(a) for a in args]])
            return msgpack.ExtType(EXT_EXCEPTION, payload)
        if self._to_ref is not None:
            ref = self._to_ref(obj)
            if ref is not None:
                return msgpack.ExtType(EXT_REF, self._pack_nested(list(ref)))
        # Subclasses of the native containers (OrderedDict, defaultdict, IntEnum, str
        # enums) are accepted as their base type: that is what a user storing them means.
        if isinstance(obj, str):
            return str.__str__(obj)  # str(obj) would call a str-enum's __str__
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, bytes):
            return bytes(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, int):  # IntEnum, IntFlag; bool never gets here
            return int(obj)
        if isinstance(obj, tuple):  # namedtuple
            return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(obj)))
        if isinstance(obj, bytearray | memoryview):
            return bytes(obj)
        raise TypeError(
            f"cannot encode value of type {kind.__qualname__!r}; supported: None, bool, int, "
            "float, str, bytes, list, tuple, dict and container proxies"
        )

    def _pack_nested(self, obj: Any) -> bytes:
        # The connection's packer is mid-message while `default` runs, so an ext's payload
        # needs a packer of its own: one per nesting level, made on first use and kept (a new
        # Packer per tuple cost ~10 us: a list of 100k tuples took 110 ms to encode).
        depth = self._nest
        nested = self._nested
        if depth == len(nested):
            nested.append(
                msgpack.Packer(
                    default=self._default, use_bin_type=True, strict_types=True, autoreset=True
                )
            )
        packer = nested[depth]
        self._nest = depth + 1
        try:
            out: bytes = packer.pack(obj)
        except BaseException:
            packer.reset()  # autoreset only resets after a success
            raise
        finally:
            self._nest = depth
        return out

    def pack(self, obj: Any) -> bytes:
        """Encode one payload; an unsupported value raises ``TypeError`` naming its type."""
        self._bigint_packed = False
        try:
            out: bytes = self._packer.pack(obj)
        except TypeError:
            raise
        except (ValueError, OverflowError) as exc:
            # msgpack: "recursion limit exceeded", lone surrogates in str, and so on.
            raise TypeError(f"cannot encode value: {exc}") from exc
        except RecursionError:
            raise TypeError("cannot encode value: nested too deeply") from None
        # No reset(): with autoreset a Packer empties its buffer after each pack, and on an
        # exception too (msgpack >= 1.0).
        if self._bigint_packed:
            self._bigint_packed = False
            _check_keys(obj)  # what the decoder would refuse, refused before it is sent
        limit = self._encode_depth
        if limit is not None and len(out) > limit:  # a shorter payload cannot nest deeper
            _refuse_deep(obj, out, limit)
        return out

    def pack_request(self, message: list[Any]) -> bytes:
        """Encode a request ``[ident, method, args, kwds(, request id)]`` as :meth:`pack` does.

        The client's per-call encoder: a request whose args are all scalars, with no kwds,
        nests two levels, so its depth check (a scan of every payload byte, most of the cost
        of encoding a 100-byte SET) is skipped.
        """
        try:
            out: bytes = self._packer.pack(message)
        except Exception:  # pack() raises it again, as the TypeError it is
            return self.pack(message)
        if self._bigint_packed:
            self._bigint_packed = False
            _check_keys(message)
        limit = self._encode_depth
        if limit is None or len(out) <= limit:
            return out
        if message[3] is None:
            for arg in message[2]:
                if type(arg) not in _SCALARS:
                    break
            else:
                return out
        _refuse_deep(message, out, limit)
        return out

    # -- decoding ---------------------------------------------------------------------------

    def _ext_hook(self, code: int, data: bytes) -> Any:
        # Each nested ext is a recursive unpackb on the C stack: a peer nesting thousands of
        # tuples would overflow it and kill the process, below any Python recursion check.
        if self._depth >= MAX_EXT_DEPTH:
            raise ValueError(f"ext types nested deeper than {MAX_EXT_DEPTH}")
        if self._counted:
            self._spend(EXT_COST)  # a Python call and a nested unpackb: ~4 us
        self._depth += 1
        try:
            return self._decode_ext(code, data)
        finally:
            self._depth -= 1

    def _decode_ext(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            if not self._checked_maps:
                raise _NeedsCheckedMaps  # a tuple may be a map key: its hash is not randomized
            return tuple(self._unpack_raw(data))
        if code == EXT_REF:
            kind, name = self._unpack_raw(data)
            if not isinstance(kind, str) or not isinstance(name, str):
                raise ValueError("malformed ref ext")
            return self._make_ref(Ref(kind, name))
        if code == EXT_EXCEPTION:
            if not self._decode_exceptions:
                raise ValueError("exceptions are not values: a request cannot carry one")
            name, args = self._unpack_raw(data)
            if not isinstance(name, str) or not isinstance(args, list):
                raise ValueError("malformed exception ext")
            return _decode_exception(name, args)
        if code == EXT_BIGINT:
            if not self._checked_maps:
                raise _NeedsCheckedMaps
            return int.from_bytes(data, "big", signed=True)
        raise ValueError(f"unknown ext type {code}")

    def _unpack_raw(self, data: Any) -> Any:
        if self._counted or self._checked_maps:
            return msgpack.unpackb(data, **self._hooked_options())
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, ext_hook=self._ext_hook, use_list=True
        )

    def _hooked_options(self) -> dict[str, Any]:
        """Return the unpackb options for checked maps or counted decoding."""
        options: dict[str, Any] = {
            "raw": False,
            "strict_map_key": False,
            "ext_hook": self._ext_hook,
            "use_list": True,
        }
        if self._checked_maps:
            options["object_pairs_hook"] = _checked_map
        if self._counted:
            limit = self._decode_values
            assert limit is not None
            # Every container reports its length as it is completed, so the work done before
            # a payload over budget is refused is bounded by the budget (and, for the one
            # container under construction, by max_array_len/max_map_len, checked in C
            # before anything is allocated).
            options.update(list_hook=self._count_list, max_array_len=limit, max_map_len=limit)
            if self._checked_maps:
                options["object_pairs_hook"] = self._count_checked_map
            else:
                options["object_hook"] = self._count_map
        return options

    def _spend(self, cost: int) -> None:
        self._budget -= cost
        if self._budget < 0:
            raise _OverBudget

    def _count_list(self, items: list[Any]) -> list[Any]:
        self._spend(len(items) + CONTAINER_COST)
        return items

    def _count_map(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        self._spend(2 * len(mapping) + CONTAINER_COST)
        return mapping

    def _count_checked_map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self._spend(2 * len(pairs) + CONTAINER_COST)
        return _checked_map(pairs)

    def unpack_reply(self, data: Any) -> Any:
        """Decode one payload as :meth:`unpack` does: the client's per-call decoder.

        A codec without decode limits (a client's: ``decode_depth`` and ``decode_values``
        None) decodes a small payload in one ``unpackb`` call; anything it does not decode
        there (a tuple or a bigint, whose maps need the checked path; a malformed payload)
        goes through :meth:`unpack`, which decides.
        """
        if self._plain_decode and len(data) <= _GC_PAUSE_BYTES:
            try:
                return msgpack.unpackb(data, strict_map_key=False, ext_hook=self.ext_hook)
            except Exception:  # noqa: S110 - unpack() decodes it again and decides
                pass
        return self.unpack(data)

    def unpack(self, data: Any) -> Any:
        """Decode one payload; anything malformed raises :class:`ProtocolError`."""
        size = len(data)
        if size > _COUNT_ABOVE or size > _GC_PAUSE_BYTES:
            return self._unpack(data)
        # A small payload (a request or reply of one call): no budget to count, no collector
        # to pause, and no state to reset (the ext hook's depth is back to 0 after every
        # decode), so only the decode and the depth check. The rest is _unpack's.
        try:
            obj = msgpack.unpackb(data, strict_map_key=False, ext_hook=self.ext_hook)
        except _NeedsCheckedMaps:
            return self._unpack(data)
        except (ValueError, TypeError, KeyError, RecursionError, msgpack.UnpackException) as exc:
            raise _undecodable(exc) from None
        limit = self._decode_depth
        if limit is not None and size > limit:
            # _may_be_deep, inline (a call is a tenth of the scan of a 150-byte SET); every
            # pure-Python test of the decoded request's shape measured slower than this scan.
            if size > _SCAN_LIMIT:
                deep = True
            else:
                raw = data.tobytes() if type(data) is memoryview else bytes(data)
                deep = size - len(raw.translate(None, _CONTAINER_CODES)) > limit
            if deep and too_deep(obj, limit):
                raise _too_deep(limit)
        return obj

    def _unpack(self, data: Any) -> Any:
        """:meth:`unpack` of any payload: counted if large, maps checked if it needs them."""
        self._depth = 0
        self._checked_maps = False
        limit = self._decode_values
        if limit is not None and len(data) > _COUNT_ABOVE:  # not on the small-request path
            self._counted = True
            self._budget = limit
        # Decoding millions of small containers triggers a full collection again and again
        # (a 15 MiB frame of empty arrays: 14.5 s); nothing decoded here can form a cycle.
        pause_gc = len(data) > _GC_PAUSE_BYTES and gc.isenabled()
        if pause_gc:
            gc.disable()
        try:
            try:
                try:
                    if self._counted:  # a large request: its decoding work is budgeted
                        obj = self._unpack_raw(data)
                    else:
                        # _unpack_raw's unchecked case, inline: this runs once per message.
                        obj = msgpack.unpackb(
                            data,
                            raw=False,
                            strict_map_key=False,
                            ext_hook=self._ext_hook,
                            use_list=True,
                        )
                except _NeedsCheckedMaps:
                    # Rare: build maps through a hook that refuses colliding-prone keys before
                    # they are hashed, rather than paying for the hook on every message.
                    self._depth = 0
                    self._checked_maps = True
                    self._budget = limit or 0  # counted again from the start
                    obj = self._unpack_raw(data)
            except _OverBudget:
                raise ProtocolError(
                    f"undecodable message: it holds more than {limit} values (arrays and maps "
                    f"count {CONTAINER_COST} more each, tuples and other ext types "
                    f"{EXT_COST}; see kvproto.limits); split it into several calls"
                ) from None
            except (
                ValueError,
                TypeError,
                KeyError,
                RecursionError,
                msgpack.UnpackException,
            ) as exc:
                raise _undecodable(exc) from None
            limit = self._decode_depth
            if limit is not None and _may_be_deep(data, limit) and too_deep(obj, limit):
                raise _too_deep(limit)
        finally:
            self._checked_maps = False
            self._counted = False
            if pause_gc:
                gc.enable()
        return obj


def _refuse_deep(obj: Any, out: bytes, limit: int) -> None:
    """Raise ``TypeError`` if ``obj`` (encoded as ``out``) nests deeper than ``limit``."""
    if _may_be_deep(out, limit) and too_deep(obj, limit):
        raise TypeError(f"cannot encode value: nested deeper than {limit} levels")


def _undecodable(exc: BaseException) -> ProtocolError:
    return ProtocolError(f"undecodable message ({type(exc).__name__}: {exc})")


def _too_deep(limit: int) -> ProtocolError:
    return ProtocolError(f"undecodable message: nested deeper than {limit} levels")


def _check_keys(obj: Any) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        if isinstance(item, dict):
            for key, value in item.items():
                check_key(key)
                stack.append(value)
        elif kind is list or isinstance(item, tuple):
            stack.extend(item)


_COLLISIONS_ALLOWED: Final = 16


def _checked_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Build a decoded map whose keys may have been chosen to collide; refuse if they do.

    Ints, floats and tuples hash without randomization, and CPython's tuple hash can be
    inverted: keys sharing one hash make each insert O(n). Keys are counted by hash before the
    dict is built (a dict of ints, which hash to themselves, so this count cannot collide).
    """
    for key, _ in pairs:
        check_key(key)
    if len(pairs) > _COLLISIONS_ALLOWED:
        seen: dict[int, int] = {}
        for key, _ in pairs:
            if type(key) is not str and type(key) is not bytes:
                code = hash(key)
                count = seen.get(code, 0) + 1
                if count > _COLLISIONS_ALLOWED:
                    raise TypeError(
                        f"map keys collide in the hash table ({count}+ keys of one hash); "
                        "refused: such keys are chosen to stall the server"
                    )
                seen[code] = count
    return dict(pairs)
