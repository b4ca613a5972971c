"""dict and Namespace on Valkey/Redis: handlers over ``scripts/dict.lua``.

Key identity follows Python: a key is stored under its *canonical* encoding, in which a bool
or an integral float becomes the int it equals (recursively inside tuples), so ``1``, ``1.0``
and ``True`` are one key, as in a dict. The key as first inserted is kept beside it where the
two encodings differ, so ``keys()`` gives back ``1.0`` if ``1.0`` came first, as Python does.
Insertion order is kept (``keys()``, ``popitem()``).

``cas`` compares encodings: equal values of the same type encode alike, which is kvserve's
strict ``cas``, except for values whose equality ignores their order (two dicts with the
same items inserted in another order are equal in Python, not here).
"""

from __future__ import annotations

import math
from typing import Any, Final

from kvclient._redis._backend import Call, Handler, kind_scripts
from kvclient._redis.kinds import Kind, register
from kvproto import schema
from kvproto.codec import check_key
from kvproto.errors import NotSupportedError

__all__ = ["DICT", "NAMESPACE", "canonical"]

_S: Final = kind_scripts("dict")
_MISSING: Any = object()


def canonical(key: Any) -> Any:
    """Return the key a dict treats ``key`` as: ``True``/``1.0`` -> ``1``, tuples recursively.

    Raises:
        TypeError: ``key`` is unhashable (a list, a dict), as a dict raises it.
    """
    kind = type(key)
    if kind is str or kind is bytes or kind is int:
        return key
    if kind is bool:
        return int(key)
    if kind is float:
        return int(key) if math.isfinite(key) and key.is_integer() else key
    if kind is tuple:
        return tuple(canonical(item) for item in key)
    hash(key)  # raises TypeError: unhashable type, as a dict would
    return key


def _keys(ctx: Call, key: Any) -> tuple[bytes, bytes]:
    """Return ``(canonical encoding, original encoding or b'')`` of ``key``."""
    if type(key) is int or type(key) is tuple:
        check_key(key)
    canon = canonical(key)
    packed = ctx.pack(canon)
    if canon is key or (type(canon) is type(key) and canon == key and type(key) is not tuple):
        return packed, b""
    original = ctx.pack(key)
    return packed, (b"" if original == packed else original)


def _check_number(value: Any, what: str) -> None:
    if type(value) is bool or not isinstance(value, int | float):
        raise TypeError(f"{what} is {type(value).__name__}, not a number")


def _ok(ctx: Call, script: str, *argv: Any) -> list[Any]:
    found = ctx.run(_S[script], *argv)
    assert found is not None  # dict scripts never answer 'again'
    return found


def _getitem(ctx: Call, args: list[Any]) -> Any:
    (key,) = args
    found = _ok(ctx, "get", _keys(ctx, key)[0])
    if not found:
        raise KeyError(key)
    return ctx.unpack(found[0])


def _get(ctx: Call, args: list[Any]) -> Any:
    key, default = (args[0], None) if len(args) == 1 else args
    found = _ok(ctx, "get", _keys(ctx, key)[0])
    return ctx.unpack(found[0]) if found else default


def _contains(ctx: Call, args: list[Any]) -> bool:
    try:
        canon = _keys(ctx, args[0])[0]
    except TypeError:
        return False  # an unhashable value is in no dict (kvserve: the same answer)
    return bool(_ok(ctx, "contains", canon)[0])


def _len(ctx: Call, args: list[Any]) -> int:
    return int(_ok(ctx, "len")[0])


def _setitem(ctx: Call, args: list[Any]) -> None:
    key, value = args
    _ok(ctx, "set", *_keys(ctx, key), ctx.pack(value))


def _set(ctx: Call, args: list[Any]) -> bool:
    """Store ``d[key] = value``: ``set`` without a ttl, nx or lease, as kvclient.aio stores one.

    The rest of ``set`` is TTL's, which this backend does not offer yet.
    """
    if len(args) == 4 and args[2] is None and args[3] is False:
        _setitem(ctx, args[:2])
        return True
    raise NotSupportedError(schema.unsupported("dict", "set", "the Valkey/Redis backend"))


def _triples(ctx: Call, mapping: Any) -> list[bytes]:
    if not isinstance(mapping, dict):
        raise TypeError(f"update() needs a mapping, not {type(mapping).__name__}")
    argv: list[bytes] = []
    for key, value in mapping.items():
        argv.extend((*_keys(ctx, key), ctx.pack(value)))
    return argv


def _update(ctx: Call, args: list[Any]) -> None:
    _ok(ctx, "update", *_triples(ctx, args[0]))


def _delitem(ctx: Call, args: list[Any]) -> None:
    (key,) = args
    try:
        _ok(ctx, "delete", _keys(ctx, key)[0], "raise")
    except KeyError:
        raise KeyError(key) from None


def _delete_many(ctx: Call, args: list[Any]) -> int:
    return int(_ok(ctx, "delete_many", *(_keys(ctx, key)[0] for key in args[0]))[0])


def _pop(ctx: Call, args: list[Any]) -> Any:
    key = args[0]
    default = args[1] if len(args) > 1 else _MISSING
    try:
        found = _ok(ctx, "pop", _keys(ctx, key)[0], "0" if default is _MISSING else "1")
    except KeyError:
        raise KeyError(key) from None
    return ctx.unpack(found[0]) if found else default


def _popitem(ctx: Call, args: list[Any]) -> tuple[Any, Any]:
    key, value = _ok(ctx, "popitem")
    return ctx.unpack(key), ctx.unpack(value)


def _setdefault(ctx: Call, args: list[Any]) -> Any:
    key, default = (args[0], None) if len(args) == 1 else args
    return ctx.unpack(_ok(ctx, "setdefault", *_keys(ctx, key), ctx.pack(default))[0])


def _cas(ctx: Call, args: list[Any]) -> bool:
    key, expected, new = args
    return bool(_ok(ctx, "cas", _keys(ctx, key)[0], ctx.pack(expected), ctx.pack(new))[0])


def _incr(ctx: Call, args: list[Any], *, what: str = "the value at", default: Any = 0) -> Any:
    key = args[0]
    by = args[1] if len(args) > 1 else 1
    if len(args) > 2:
        default = args[2]
    _check_number(by, "the increment")
    canon, original = _keys(ctx, key)
    try:
        found = ctx.run(_S["incr"], canon, original, ctx.pack(by), ctx.pack(default))
        while found is None:
            # Lua's numbers are doubles: beyond 2**53 (or a bigint) the sum is Python's,
            # committed only if the stored encoding is still the one it was computed from.
            (stored,) = ctx.read(_S["get_raw"], canon)
            current = ctx.unpack(stored) if stored else default
            _check_number(current, "value")
            new = ctx.pack(current + by)
            found = ctx.run(_S["swap"], canon, original, stored, new)
    except TypeError:
        (stored,) = ctx.read(_S["get_raw"], canon)  # the answer is recorded: read without id
        current = ctx.unpack(stored) if stored else default
        raise TypeError(f"{what} {key!r} is {type(current).__name__}, not a number") from None
    return ctx.unpack(found[0])


def _get_many(ctx: Call, args: list[Any]) -> dict[Any, Any]:
    keys = list(args[0])
    found = _ok(ctx, "get_many", *(_keys(ctx, key)[0] for key in keys))
    return {key: ctx.unpack(value) for key, value in zip(keys, found, strict=True) if value}


def _items(ctx: Call, args: list[Any]) -> list[tuple[Any, Any]]:
    flat = _ok(ctx, "items")
    unpack = ctx.unpack
    return [(unpack(flat[i]), unpack(flat[i + 1])) for i in range(0, len(flat), 2)]


def _keys_list(ctx: Call, args: list[Any]) -> list[Any]:
    return [ctx.unpack(key) for key in _ok(ctx, "keys")]


def _values(ctx: Call, args: list[Any]) -> list[Any]:
    return [ctx.unpack(value) for value in _ok(ctx, "values")]


def _copy(ctx: Call, args: list[Any]) -> dict[Any, Any]:
    return dict(_items(ctx, args))


def _clear(ctx: Call, args: list[Any]) -> None:
    _ok(ctx, "clear")


DICT: Final[dict[str, Handler]] = {
    "__contains__": _contains,
    "__delitem__": _delitem,
    "__getitem__": _getitem,
    "__len__": _len,
    "__setitem__": _setitem,
    "cas": _cas,
    "clear": _clear,
    "copy": _copy,
    "delete_many": _delete_many,
    "get": _get,
    "get_many": _get_many,
    "incr": _incr,
    "items": _items,
    "keys": _keys_list,
    "pop": _pop,
    "popitem": _popitem,
    "set": _set,
    "set_many": _update,
    "setdefault": _setdefault,
    "update": _update,
    "values": _values,
}
"""The dict's methods (the names :data:`kvproto.schema.KINDS` gives them)."""


# -- Namespace: str attributes over the same scripts -------------------------------------------


def _attr(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"attribute name must be str, not {type(name).__name__}")
    return name


def _ns_getattr(ctx: Call, args: list[Any]) -> Any:
    name = _attr(args[0])
    found = _ok(ctx, "get", ctx.pack(name))
    if not found:
        raise AttributeError(f"namespace has no attribute {name!r}")
    return ctx.unpack(found[0])


def _ns_hasattr(ctx: Call, args: list[Any]) -> bool:
    return bool(_ok(ctx, "contains", ctx.pack(_attr(args[0])))[0])


def _ns_setattr(ctx: Call, args: list[Any]) -> None:
    name, value = args
    _ok(ctx, "set", ctx.pack(_attr(name)), b"", ctx.pack(value))


def _ns_delattr(ctx: Call, args: list[Any]) -> None:
    name = _attr(args[0])
    try:
        _ok(ctx, "delete", ctx.pack(name), "raise")
    except KeyError:
        raise AttributeError(f"namespace has no attribute {name!r}") from None


def _ns_incr(ctx: Call, args: list[Any]) -> Any:
    _attr(args[0])
    return _incr(ctx, args[:2], what="attribute")


def _ns_update(ctx: Call, args: list[Any]) -> None:
    mapping = args[0]
    if isinstance(mapping, dict):
        for name in mapping:
            _attr(name)
    _update(ctx, args)


NAMESPACE: Final[dict[str, Handler]] = {
    "delattr": _ns_delattr,
    "getattr": _ns_getattr,
    "hasattr": _ns_hasattr,
    "incr": _ns_incr,
    "setattr": _ns_setattr,
    "to_dict": _copy,
    "update": _ns_update,
}
"""The Namespace's methods."""


def _create_dict(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    if not args or args[0] is None:
        return b"", "hash", []
    if type(args[0]) is not dict:
        raise TypeError(f"a dict's initial contents must be a map, not {type(args[0]).__name__}")
    return b"", "hash", _triples(ctx, args[0])


def _create_namespace(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    if args and args[0] is not None:
        if type(args[0]) is not dict:
            raise TypeError(
                f"a namespace's initial attributes must be a map, not {type(args[0]).__name__}"
            )
        for name in args[0]:
            _attr(name)
    return _create_dict(ctx, args)


register("dict", Kind(DICT, _create_dict, size="HLEN"))
register("namespace", Kind(NAMESPACE, _create_namespace, size="HLEN"))
