"""Limits on call arguments that both ends apply: the client before it sends, the server on arrival.

A limit the client checks is the one the server enforces, so a call the server would refuse
fails locally with the same message, before anything is sent.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "CONTAINER_COST",
    "EXT_COST",
    "MAX_LEASE",
    "MAX_REQUEST_VALUES",
    "MAX_TIMEOUT",
    "MAX_TTL",
    "MAX_WATCH_EVENTS",
    "check_bool",
    "check_int64",
    "check_lease",
    "check_timeout",
    "check_ttl",
    "rough_size",
]

MAX_TIMEOUT: Final = 366 * 86400.0
"""Longest wait a call may ask for, seconds (a year); None waits for ever."""


def check_timeout(timeout: Any) -> float | None:
    """Return a wire timeout as seconds, or None (wait for ever).

    Every timeout that reaches the server from a client goes through here before it is used:
    ``inf``, ``nan``, a negative number or one beyond :data:`MAX_TIMEOUT` would otherwise
    reach the loop's timer heap and ``select()`` (an ``OverflowError`` that stopped the
    server, or a ``nan`` that froze every timer).

    Raises:
        TypeError: not None and not a number (bool included).
        ValueError: negative, not finite, or above :data:`MAX_TIMEOUT`.
    """
    if timeout is None:
        return None
    if type(timeout) is bool or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be None or a number of seconds, not {type(timeout).__name__}"
        )
    if not 0 <= timeout <= MAX_TIMEOUT:  # also false for nan
        raise ValueError(
            f"'timeout' must be a non-negative number of seconds, at most {MAX_TIMEOUT:.0f}, "
            f"or None to wait for ever (got {timeout!r})"
        )
    return float(timeout)


MAX_LEASE: Final = 86400.0
"""Longest lease a hold may ask for, seconds (one day)."""


def check_lease(lease: Any) -> float:
    """Return a lease as seconds, checked.

    Raises:
        TypeError: not a number (bool included).
        ValueError: not more than 0 and at most :data:`MAX_LEASE`.
    """
    if type(lease) is bool or not isinstance(lease, int | float):
        raise TypeError(f"lease must be a number of seconds, not {type(lease).__name__}")
    if not 0 < lease <= MAX_LEASE:
        raise ValueError(f"lease must be more than 0 and at most {MAX_LEASE:g} seconds")
    return float(lease)


def check_bool(value: Any, what: str) -> bool:
    """Return ``value`` if it is a bool.

    Raises:
        TypeError: anything else (an int included).
    """
    if type(value) is not bool:
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def check_int64(value: Any, what: str) -> int:
    """Return ``value`` if it is an int of 64 bits (a token, a count, a generation).

    Raises:
        TypeError: not an int (a bool included).
        ValueError: beyond 64 bits: an 8 MB int accepted once is kept and compared for ever.
    """
    if type(value) is not int:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{what} must fit in 64 bits")
    return value


MAX_TTL: Final = 366 * 86400.0
"""Longest time to live a key may be given, seconds (a year)."""


def check_ttl(ttl: Any) -> float:
    """Return a key's time to live as seconds, checked.

    Raises:
        TypeError: not a number (bool included).
        ValueError: not more than 0, not finite, or above :data:`MAX_TTL`.
    """
    if type(ttl) is bool or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not 0 < ttl <= MAX_TTL:  # also false for nan
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:.0f} seconds (got {ttl!r})")
    return float(ttl)


MAX_WATCH_EVENTS: Final = 1000
"""Most events one ``watch`` call answers; a client calls again for the rest."""


MAX_REQUEST_VALUES: Final = 4_000_000
"""Decoding work one request frame may cost, in values: the server refuses more.

Decoding cost follows what is built, not bytes: a 64 MiB frame of empty arrays took 9 s (22 s
under load) to decode on the loop, stalling every client, where 64 MiB of 100-byte strings
takes 0.3 s. Each element of an array counts 1, each key and each value of a map 1, each array
or map :data:`CONTAINER_COST` more (building one, and counting it, costs ~8 times a scalar),
and each tuple (or other ext type) :data:`EXT_COST` more (a Python call and a nested decode,
~4 us). At this limit the worst frame decodes in about 0.35 s on the loop (measured on 2
shared vCPUs under load); an ``update`` of a million plain keys costs 2,000,008 and passes,
one with 100,000 pair-tuple keys costs about 5.2 M and must be split in two.

Only the server applies it, to requests above 256 KiB (below, the worst frame decodes in
~30 ms): a request over it gets ``ProtocolError`` ("holds more than ... values; split it")
and the connection is closed, as for any undecodable frame. kvclient's own large operations
(restore, batches) stay far below it.
"""

CONTAINER_COST: Final = 8
"""What one array or map costs beyond its elements (see :data:`MAX_REQUEST_VALUES`)."""

EXT_COST: Final = 40
"""What one tuple (or other ext value) costs beyond its elements (see
:data:`MAX_REQUEST_VALUES`)."""


def rough_size(value: Any) -> int:
    """Return a cheap guess of ``value``'s encoded size in bytes, for sizing dump pieces.

    str and bytes by length, lists, tuples and dicts by item count (16 bytes an item, not
    walked), anything else 9: O(1), so sizing a piece costs nothing next to encoding it.
    """
    kind = type(value)
    if kind is str or kind is bytes:
        return len(value) + 5
    if kind is list or kind is tuple or kind is dict:
        return 16 * len(value) + 5
    return 9
