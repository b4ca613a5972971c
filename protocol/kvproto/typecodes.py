"""Value and Array typecodes: which exist, their zero, and how a value is stored as one.

As ``multiprocessing.Value``/``Array`` (ctypes) take them, plus ``?`` (``ctypes.c_bool``). The
rules are shared by kvserve's Value and Array and by the Valkey/Redis backend, which checks a
value in the client before storing it.
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = [
    "FLOAT_CODES",
    "INT_CODES",
    "INT_RANGES",
    "MAX_ARRAY_LENGTH",
    "TYPECODES",
    "ZERO",
    "check_typecode",
    "coerce",
    "coerce_items",
    "is_number",
    "joined",
    "typecode_of",
]

MAX_ARRAY_LENGTH: Final = 1 << 20
"""Most items an Array holds."""


def is_number(value: Any) -> bool:
    """Return whether ``value`` is an int or a float (not a bool)."""
    return type(value) is not bool and isinstance(value, int | float)


TYPECODES: Final = "bBhHiIlLqQfdcu?"
"""Typecodes as ``multiprocessing.Value``/``Array`` take them, plus ``?`` (``ctypes.c_bool``)."""
INT_CODES: Final = "bBhHiIlLqQ"
FLOAT_CODES: Final = "fd"
INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    code: (
        (-(1 << (8 * struct.calcsize(code) - 1)), (1 << (8 * struct.calcsize(code) - 1)) - 1)
        if code.islower()
        else (0, (1 << (8 * struct.calcsize(code))) - 1)
    )
    for code in INT_CODES
}
ZERO: Final[dict[str, Any]] = {
    **dict.fromkeys(INT_CODES, 0),
    "f": 0.0,
    "d": 0.0,
    "c": b"\x00",
    "u": "\x00",
    "?": False,
}


def check_typecode(typecode: Any) -> str:
    """Return ``typecode`` if it is one of :data:`TYPECODES`, else raise ValueError."""
    if not isinstance(typecode, str) or len(typecode) != 1 or typecode not in TYPECODES:
        raise ValueError(f"typecode must be one of {' '.join(TYPECODES)}, not {typecode!r}")
    return typecode


def typecode_of(default: Any) -> str:
    """Return the typecode a default value stands for (``kv.value("hits", 0)``)."""
    kind = type(default)
    if kind is bool:
        return "?"
    if kind is int:
        return "q"
    if kind is float:
        return "d"
    if kind is bytes and len(default) == 1:
        return "c"
    raise TypeError(
        f"a default value must be an int, float, bool or 1-byte bytes, not "
        f"{kind.__name__}; give a typecode ({' '.join(TYPECODES)}) and a value instead"
    )


def coerce(typecode: str, value: Any) -> Any:
    """Return ``value`` stored as ``typecode`` would store it, or raise as ctypes does.

    Unlike ctypes, an int out of the typecode's range raises OverflowError instead of silently
    wrapping: a counter that wraps around is a bug nobody sees.
    """
    kind = type(value)
    if typecode in INT_CODES:
        if kind is bool:
            value = int(value)
        elif kind is not int:
            raise TypeError(f"'{kind.__name__}' object cannot be interpreted as an integer")
        low, high = INT_RANGES[typecode]
        if not low <= value <= high:
            raise OverflowError(
                f"{value} is out of range for typecode {typecode!r} ({low} to {high})"
            )
        return value
    if typecode in FLOAT_CODES:
        if kind is not bool and not isinstance(value, int | float):
            raise TypeError(f"must be real number, not {kind.__name__}")
        if typecode == "f":
            try:
                return struct.unpack("f", struct.pack("f", value))[0]
            except (OverflowError, struct.error):
                raise OverflowError(f"{value} is out of range for typecode 'f'") from None
        return float(value)
    if typecode == "c":
        if kind is int and 0 <= value <= 255:
            return bytes([value])
        if kind is bytes and len(value) == 1:
            return value
        raise TypeError("one character bytes or integer in range(256) expected")
    if typecode == "u":
        if kind is str and len(value) == 1:
            return value
        raise TypeError(f"one character str expected, not {kind.__name__}")
    if kind is bool or kind is int:
        return bool(value)
    raise TypeError(f"bool or int expected, not {kind.__name__}")


def coerce_items(typecode: str, values: Any) -> list[Any]:
    """Return an Array's items from ``values``, each converted by :func:`coerce`.

    ``values`` is a list or tuple, or bytes for ``c`` and str for ``u``.

    Raises:
        TypeError: ``values`` is none of those, or an item the typecode cannot hold.
        OverflowError: an int out of range.
    """
    if typecode == "c" and type(values) is bytes:
        return [values[i : i + 1] for i in range(len(values))]
    if typecode == "u" and type(values) is str:
        return list(values)
    if type(values) not in (list, tuple):
        raise TypeError(
            f"expected a list or tuple of items{' or bytes' if typecode == 'c' else ''}"
            f"{' or str' if typecode == 'u' else ''}, not {type(values).__name__}"
        )
    return [coerce(typecode, value) for value in values]


def joined(typecode: str, items: list[Any]) -> Any:
    """Return a slice of an Array as it reads: bytes for ``c``, str for ``u``, else the list."""
    if typecode == "c":
        return b"".join(items)
    if typecode == "u":
        return "".join(items)
    return items
