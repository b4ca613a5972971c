"""Retry policy for calls that fail because the connection did (redis-py's shape).

A :class:`Retry` holds a backoff and a number of retries. The client retries a call only when
the connection failed (refused, reset, closed, timed out), never when the server answered with
an error. Retrying is always safe: reads and overwrites are idempotent, and every other call
carries a request id the server remembers, so a retried ``incr`` whose first attempt was
applied returns the first attempt's result instead of applying twice.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

__all__ = [
    "ConstantBackoff",
    "ExponentialWithJitterBackoff",
    "NoBackoff",
    "Retry",
]


class Backoff(ABC):
    """How long to wait before retry number ``failures`` (1 for the first retry)."""

    @abstractmethod
    def compute(self, failures: int) -> float:
        """Return seconds to sleep before the next attempt."""


class NoBackoff(Backoff):
    """Retry at once."""

    def compute(self, failures: int) -> float:
        """Return 0."""
        return 0.0


class ConstantBackoff(Backoff):
    """Wait the same time before every retry.

    Args:
        seconds: the wait, in seconds.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def compute(self, failures: int) -> float:
        """Return the constant wait."""
        return self.seconds


class ExponentialWithJitterBackoff(Backoff):
    """Wait between half and all of ``min(cap, base * 2**failures)`` seconds, at random.

    The random half spreads out clients that lost the same server, so they do not come back in
    lockstep; the fixed half guarantees the retries span a server restart (the default policy
    waits at least 6.5 s over its 10 retries, 10 s on average) instead of spending them all in
    the first second, as full jitter sometimes does.

    Args:
        base: seconds for the first retry's ceiling (default 0.05).
        cap: the longest wait, seconds (default 2).
    """

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap

    def compute(self, failures: int) -> float:
        """Return a wait in ``[c / 2, c]`` seconds, ``c = min(cap, base * 2**failures)``."""
        ceiling: float = min(self.cap, self.base * 2 ** min(failures, 32))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311


class Retry:
    """Retry a failed connection this many times, waiting ``backoff`` between attempts.

    The default (10 retries, jittered exponential backoff from 50 ms capped at 2 s) rides out
    a server restart of several seconds. ``Retry(retries=0)`` never retries.

    Args:
        backoff: the waits between attempts.
        retries: how many times to retry after the first failure.
    """

    def __init__(self, backoff: Backoff | None = None, retries: int = 10) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.backoff = backoff if backoff is not None else ExponentialWithJitterBackoff()
        self.retries = retries

    def __repr__(self) -> str:
        return f"Retry({type(self.backoff).__name__}, retries={self.retries})"
