"""Retry policy for calls that fail because the connection did (redis-py's shape).

A :class:`Retry` holds a backoff and a number of retries. The client retries a call only when
the connection failed (refused, reset, closed, timed out), never when the server answered with
an error. Retrying is always safe: reads and overwrites are idempotent, and every other call
carries a request id the server remembers, so a retried ``incr`` whose first attempt was
applied returns the first attempt's result instead of applying twice.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from kvproto.errors import AuthError, KVConnectionError

__all__ = [
    "ConstantBackoff",
    "ExponentialWithJitterBackoff",
    "NoBackoff",
    "Retry",
    "call_with_retry",
]

_T = TypeVar("_T")


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


def call_with_retry(
    retry: Retry | None,
    endpoint: str,
    attempt: Callable[[], _T],
    error: KVConnectionError | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> _T:
    """Run ``attempt`` until it answers, retrying a failed connection as ``retry`` allows.

    The one retry loop of every backend (a call that changes state carries a request id, so
    running it again applies it at most once). ``error``: a first attempt that already failed;
    ``sleep``: how to wait out a backoff (the asyncio Valkey/Redis backend pauses its task).

    Raises:
        KVConnectionError: the last failure, once the retries ran out (naming ``endpoint``
            and the attempts when there were several).
        AuthError: at once: a server with another key will not accept a retry either.
    """
    retries = 0 if retry is None else retry.retries
    attempts = 0
    while True:
        if error is not None:
            if attempts >= retries:
                if attempts == 0:
                    raise error
                raise KVConnectionError(
                    f"gave up on {endpoint} after {attempts + 1} attempts: {error}"
                ) from error
            attempts += 1
            assert retry is not None
            sleep(retry.backoff.compute(attempts))
        try:
            return attempt()
        except AuthError:
            raise
        except KVConnectionError as exc:
            error = exc
