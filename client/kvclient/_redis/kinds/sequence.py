"""list on Valkey/Redis: handlers over ``scripts/list.lua``.

Index, slice, insert, pop, append, extend, reverse, ``*=`` and clear are one script each.
What needs Python's equality or ordering (``in``, ``index``, ``count``, ``remove``, ``sort``)
is computed here on a snapshot of the items, which is one atomic read; ``remove`` and
``sort`` then commit with a script that applies only if the list's version is still the
snapshot's (else they recompute): atomic, and with Python's semantics exactly (``1.0`` equals
``1``; a list of mixed types refuses to sort with Python's TypeError).
"""

from __future__ import annotations

from typing import Any, Final

from kvclient._redis._backend import Call, Handler, kind_scripts
from kvclient._redis.kinds import Kind, register
from kvproto.wire import MAX_REPLY_FRAME

__all__ = ["LIST", "check_index", "slice_args"]

_S: Final = kind_scripts("list")
MAX_REPEAT_ITEMS: Final = 1 << 24
MAX_REPEAT_BYTES: Final = MAX_REPLY_FRAME  # the largest reply a client accepts, as kvserve


def check_index(index: Any, what: str = "list indices") -> str:
    """Return an index as a script takes it (text).

    Raises:
        TypeError: not an int, as a list raises it.
    """
    if type(index) is not int:
        raise TypeError(f"{what} must be integers or slices, not {type(index).__name__}")
    return str(index)


def slice_args(start: Any, stop: Any, step: Any) -> list[str]:
    """Return ``start, stop, step`` as a script takes them ('' for None).

    Raises:
        TypeError: a part that is neither an int nor None.
        ValueError: a step of zero.
    """
    parts = []
    for part in (start, stop, step):
        if part is not None and type(part) is not int:
            raise TypeError("slice indices must be integers or None or have an __index__ method")
        parts.append("" if part is None else str(part))
    if step == 0:
        raise ValueError("slice step cannot be zero")
    return parts


def _ok(ctx: Call, script: str, *argv: Any) -> list[Any] | None:
    return ctx.run(_S[script], *argv)


def _run(ctx: Call, script: str, *argv: Any) -> list[Any]:
    found = _ok(ctx, script, *argv)
    assert found is not None
    return found


def _snapshot(ctx: Call) -> tuple[bytes, list[Any]]:
    version, *items = ctx.read(_S["copy"])
    return version, [ctx.unpack(item) for item in items]


def _getitem(ctx: Call, args: list[Any]) -> Any:
    return ctx.unpack(_run(ctx, "getitem", check_index(args[0]))[0])


def _setitem(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "setitem", check_index(args[0]), ctx.pack(args[1]))


def _delitem(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "delitem", check_index(args[0]))


def _len(ctx: Call, args: list[Any]) -> int:
    return int(_run(ctx, "len")[0])


def _contains(ctx: Call, args: list[Any]) -> bool:
    return args[0] in _snapshot(ctx)[1]


def _copy(ctx: Call, args: list[Any]) -> list[Any]:
    return _snapshot(ctx)[1]


def _getslice(ctx: Call, args: list[Any]) -> list[Any]:
    return [ctx.unpack(item) for item in _run(ctx, "getslice", *slice_args(*args))]


def _values(ctx: Call, values: Any) -> list[bytes]:
    if type(values) not in (list, tuple):
        raise TypeError(f"can only assign an iterable, not {type(values).__name__}")
    return [ctx.pack(value) for value in values]


def _setslice(ctx: Call, args: list[Any]) -> None:
    start, stop, step, values = args
    _run(ctx, "setslice", *slice_args(start, stop, step), *_values(ctx, values))


def _delslice(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "delslice", *slice_args(*args))


def _append(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "append", ctx.pack(args[0]))


def _extend(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "extend", *_values(ctx, args[0]))


def _imul(ctx: Call, args: list[Any]) -> None:
    (n,) = args
    if type(n) is not int:
        raise TypeError(f"can't multiply sequence by non-int of type {type(n).__name__!r}")
    _run(ctx, "imul", str(n), str(MAX_REPEAT_ITEMS), str(MAX_REPEAT_BYTES))


def _insert(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "insert", check_index(args[0]), ctx.pack(args[1]))


def _pop(ctx: Call, args: list[Any]) -> Any:
    index = args[0] if args else -1
    return ctx.unpack(_run(ctx, "pop", check_index(index))[0])


def _remove(ctx: Call, args: list[Any]) -> None:
    while True:
        version, items = _snapshot(ctx)
        try:
            index = items.index(args[0])
        except ValueError:
            raise ValueError("list.remove(x): x not in list") from None
        if _ok(ctx, "remove_at", version, str(index)) is not None:
            return


def _index(ctx: Call, args: list[Any]) -> int:
    value = args[0]
    items = _snapshot(ctx)[1]
    start = args[1] if len(args) > 1 else 0
    stop = args[2] if len(args) > 2 and args[2] is not None else len(items)
    return items.index(value, start, stop)


def _count(ctx: Call, args: list[Any]) -> int:
    return _snapshot(ctx)[1].count(args[0])


def _sort(ctx: Call, args: list[Any]) -> None:
    reverse = bool(args[0]) if args else False
    while True:
        version, items = _snapshot(ctx)
        items.sort(reverse=reverse)  # Python's ordering, and its TypeError for mixed types
        if _ok(ctx, "replace", version, *(ctx.pack(item) for item in items)) is not None:
            return


def _reverse(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "reverse")


def _clear(ctx: Call, args: list[Any]) -> None:
    _run(ctx, "clear")


LIST: Final[dict[str, Handler]] = {
    "__contains__": _contains,
    "__delitem__": _delitem,
    "__getitem__": _getitem,
    "__len__": _len,
    "__setitem__": _setitem,
    "append": _append,
    "clear": _clear,
    "copy": _copy,
    "count": _count,
    "delslice": _delslice,
    "extend": _extend,
    "getslice": _getslice,
    "imul": _imul,
    "index": _index,
    "insert": _insert,
    "pop": _pop,
    "remove": _remove,
    "reverse": _reverse,
    "setslice": _setslice,
    "sort": _sort,
}
"""The list's methods."""


def _create(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    if not args or args[0] is None:
        return b"", "list", []
    if type(args[0]) not in (list, tuple):
        raise TypeError(f"a list's initial contents must be an array, not {type(args[0]).__name__}")
    return b"", "list", [ctx.pack(item) for item in args[0]]


register("list", Kind(LIST, _create))
