"""Value and Array on Valkey/Redis: handlers over ``scripts/value.lua`` and ``array.lua``.

Values are converted to the typecode in the client by :mod:`kvproto.typecodes`, the rules
kvserve applies, before a script stores them. ``Value.incr`` reads, computes with those
rules (range checks: OverflowError, nothing changes) and commits only if the value's
version is still the one read, else recomputes: atomic, one script per attempt.
"""

from __future__ import annotations

from typing import Any, Final

from kvclient._redis._backend import Call, Handler, kind_scripts
from kvclient._redis.kinds import Kind, register
from kvclient._redis.kinds.sequence import slice_args
from kvproto.typecodes import (
    FLOAT_CODES,
    INT_CODES,
    MAX_ARRAY_LENGTH,
    ZERO,
    check_typecode,
    coerce,
    coerce_items,
    is_number,
    joined,
    typecode_of,
)

__all__ = ["ARRAY", "VALUE"]

_V: Final = kind_scripts("value")
_A: Final = kind_scripts("array")


def _run(ctx: Call, scripts: dict[str, Any], name: str, *argv: Any) -> list[Any]:
    found = ctx.run(scripts[name], *argv)
    assert found is not None
    return found


def _typecode(ctx: Call, scripts: dict[str, Any]) -> str:
    return bytes(ctx.read(scripts["typecode"])[0]).decode()


# -- Value --------------------------------------------------------------------------------------


def _value_get(ctx: Call, args: list[Any]) -> Any:
    return ctx.unpack(_run(ctx, _V, "get")[0])


def _value_set(ctx: Call, args: list[Any]) -> None:
    _run(ctx, _V, "set", ctx.pack(coerce(_typecode(ctx, _V), args[0])))


def _value_incr(ctx: Call, args: list[Any]) -> Any:
    by = args[0] if args else 1
    code = _typecode(ctx, _V)
    if code not in INT_CODES + FLOAT_CODES:
        raise TypeError(f"cannot add to a value of typecode {code!r}")
    if not is_number(by):
        raise TypeError(f"the increment must be a number, not {type(by).__name__}")
    if code in INT_CODES and type(by) is not int:
        raise TypeError(
            f"'{type(by).__name__}' object cannot be interpreted as an integer (typecode {code!r})"
        )
    while True:
        version, packed = ctx.read(_V["snapshot"])
        new = coerce(code, ctx.unpack(packed) + by)
        if ctx.run(_V["commit"], version, ctx.pack(new)) is not None:
            return new


def _value_typecode(ctx: Call, args: list[Any]) -> str:
    return _typecode(ctx, _V)


VALUE: Final[dict[str, Handler]] = {
    "get": _value_get,
    "incr": _value_incr,
    "set": _value_set,
    "typecode": _value_typecode,
}
"""The Value's methods."""


def _create_value(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    first = args[0] if args else None
    value = args[1] if len(args) > 1 else None
    if isinstance(first, str):
        code = check_typecode(first)
        initial = ZERO[code] if value is None else coerce(code, value)
    else:
        if value is not None:
            raise TypeError("give either a typecode and a value, or a default value alone")
        code = typecode_of(first)
        initial = coerce(code, first)
    return code.encode(), "string", [ctx.pack(initial)]


def _check_value(check: bytes, args: list[Any]) -> None:
    have = check.decode()
    first = args[0]
    if isinstance(first, str):
        wanted = {check_typecode(first)}
    else:
        code = typecode_of(first)
        wanted = set(INT_CODES if code == "q" else FLOAT_CODES if code == "d" else code)
    if have not in wanted:
        raise ValueError(
            f"this value exists with typecode {have!r}, which does not match {first!r}"
        )


# -- Array --------------------------------------------------------------------------------------


def _array_index(index: Any) -> str:
    if type(index) is not int:
        raise TypeError("indices must be integers")
    return str(index)


def _array_len(ctx: Call, args: list[Any]) -> int:
    return int(_run(ctx, _A, "len")[0])


def _array_getitem(ctx: Call, args: list[Any]) -> Any:
    return ctx.unpack(_run(ctx, _A, "getitem", _array_index(args[0]))[0])


def _array_setitem(ctx: Call, args: list[Any]) -> None:
    index = _array_index(args[0])
    value = coerce(_typecode(ctx, _A), args[1])
    _run(ctx, _A, "setitem", index, ctx.pack(value))


def _array_getslice(ctx: Call, args: list[Any]) -> Any:
    parts = slice_args(*args)
    items = [ctx.unpack(item) for item in _run(ctx, _A, "getslice", *parts)]
    return joined(_typecode(ctx, _A), items)


def _array_setslice(ctx: Call, args: list[Any]) -> None:
    start, stop, step, values = args
    parts = slice_args(start, stop, step)
    items = coerce_items(_typecode(ctx, _A), values)
    _run(ctx, _A, "setslice", *parts, *(ctx.pack(item) for item in items))


def _array_tolist(ctx: Call, args: list[Any]) -> list[Any]:
    return [ctx.unpack(item) for item in _run(ctx, _A, "tolist")]


def _array_typecode(ctx: Call, args: list[Any]) -> str:
    return _typecode(ctx, _A)


ARRAY: Final[dict[str, Handler]] = {
    "__getitem__": _array_getitem,
    "__len__": _array_len,
    "__setitem__": _array_setitem,
    "getslice": _array_getslice,
    "setslice": _array_setslice,
    "tolist": _array_tolist,
    "typecode": _array_typecode,
}
"""The Array's methods."""


def _create_array(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    code = check_typecode(args[0])
    size_or_initializer = args[1]
    if type(size_or_initializer) is int:
        if size_or_initializer < 0:
            raise ValueError("Array length must be >= 0")
        if size_or_initializer > MAX_ARRAY_LENGTH:
            raise ValueError(f"an array holds at most {MAX_ARRAY_LENGTH} items")
        items = [ZERO[code]] * size_or_initializer
    else:
        if hasattr(size_or_initializer, "__len__") and len(size_or_initializer) > MAX_ARRAY_LENGTH:
            raise ValueError(f"an array holds at most {MAX_ARRAY_LENGTH} items")
        items = coerce_items(code, size_or_initializer)
    return f"{code}:{len(items)}".encode(), "list", [ctx.pack(item) for item in items]


def _check_array(check: bytes, args: list[Any]) -> None:
    code, _, length = check.decode().partition(":")
    typecode = args[0]
    if typecode != code:
        raise ValueError(f"this array exists with typecode {code!r}, not {typecode!r}")
    size = args[1] if len(args) > 1 else None
    if type(size) is int and size != int(length):
        raise ValueError(f"this array exists with length {length}, not {size}")


register("value", Kind(VALUE, _create_value, _check_value, size=None))
register("array", Kind(ARRAY, _create_array, _check_array))
