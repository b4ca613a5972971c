"""Limits on call arguments that both ends apply: the client before it sends, the server on arrival.

A limit the client checks is the one the server enforces, so a call the server would refuse
fails locally with the same message, before anything is sent.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "MAX_LEASE",
    "MAX_TIMEOUT",
    "MAX_TTL",
    "MAX_WATCH_EVENTS",
    "check_bool",
    "check_int64",
    "check_lease",
    "check_timeout",
    "check_ttl",
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
