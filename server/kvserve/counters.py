"""Plain counters the serving loop and the engine keep, and the slow-request log.

Everything here is a plain ``int``, ``float`` or list slot updated in place: the loop counts
each request with a few additions and no locks, and :mod:`kvserve.metrics` turns the numbers
into Prometheus series only when something scrapes them. Calling a ``prometheus_client``
``Counter.inc()`` per request instead takes a lock per update and would cost every request,
scraped or not; importing ``prometheus_client`` costs ~100 ms, so this module does not.

Readers on other threads (the metrics HTTP thread) only read: an ``int`` or a list slot is
read whole under the GIL, and dictionaries are copied (``list(d.items())``, atomic in
CPython) before iterating, so a scrape sees each number as it was at some instant of the last
request, never a torn value.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any, Final

from kvproto import schema

__all__ = [
    "LATENCY_BOUNDS",
    "SLOWLOG_SIZE",
    "Counters",
    "Histogram",
]

LATENCY_BOUNDS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
"""Upper bounds of the latency buckets, seconds (a last bucket, +Inf, takes the rest)."""

SLOWLOG_SIZE: Final = 128
"""Slow requests kept for ``kvctl slowlog``, the newest; older ones are forgotten."""

_UNKNOWN: Final = "unknown"  # the label of a kind or operation the schema does not name


def _known(kind: str, method: Any) -> bool:
    """Return whether ``method`` is an operation the schema names for ``kind``."""
    if kind == _UNKNOWN or type(method) is not str:
        return False
    return schema.op(None if kind == "server" else kind, method) is not None


class Histogram:
    """Counts of durations by bucket, and their sum (the shape of a Prometheus histogram).

    Attributes:
        counts: one count per bound of :data:`LATENCY_BOUNDS`, then the +Inf bucket; not
            cumulative (the exposition adds them up).
        total: sum of every duration observed, seconds.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration, in seconds."""
        # bisect_left: a duration equal to a bound belongs to that bucket (Prometheus "le").
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        """Durations observed."""
        return sum(self.counts)


class Counters:
    """What the server counted since it started (see the module docstring).

    Args:
        slow_ms: requests taking this many milliseconds or more go into the slow-request log
            (:attr:`slowlog`); None (default): no slow-request log.
        on_slow: called with each slow entry (the server logs it); None: nothing.

    Attributes:
        requests: ``(kind, op)`` -> latency histogram of the requests handled (its count is
            the number of requests). The kind is ``"server"`` for server-level calls (a
            batch is one request, op ``batch``); kinds and operations the schema does not
            know count as ``"unknown"``, so no client can grow this table.
        errors: exception type name -> errors answered.
        bytes_in: bytes received from clients (handshakes included).
        bytes_out: bytes sent to clients.
        lease_expiries: holds and waits released because their lease ran out.
        slow_requests: requests that went into the slow-request log.
        slowlog: the newest :data:`SLOWLOG_SIZE` slow requests, oldest first.
        timing: whether the server times and counts each request in :attr:`requests`
            (``--metrics`` or ``--slow-ms`` on); set by the server. Off, :attr:`requests`
            stays empty.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "errors",
        "lease_expiries",
        "on_slow",
        "requests",
        "slow_ms",
        "slow_requests",
        "slow_seconds",
        "slowlog",
        "timing",
    )

    def __init__(self, slow_ms: float | None = None, on_slow: Any = None) -> None:
        if slow_ms is not None and not 0 <= slow_ms < float("inf"):
            raise ValueError(f"slow_ms must be a finite number >= 0, not {slow_ms!r}")
        self.slow_ms = slow_ms
        # Compared with every request's duration: infinity when off, so the test is one
        # float comparison and never a None check.
        self.slow_seconds = float("inf") if slow_ms is None else slow_ms / 1000
        self.on_slow = on_slow
        self.requests: dict[tuple[str, str], Histogram] = {}
        self.errors: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.lease_expiries = 0
        self.slow_requests = 0
        self.slowlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=SLOWLOG_SIZE)
        self.timing = False

    def request(self, objects: Mapping[Any, Any], message: Any, seconds: float) -> None:
        """Count one request that took ``seconds``, by the kind and operation it named.

        Args:
            objects: the store's containers by name (to find the kind).
            message: the decoded request, ``[ident, method, ...]``: anything a client sent.
            seconds: from the request's arrival to its reply's hand-off to the socket (a
                call that waits is counted when it parks, its wait not included).
        """
        try:
            ident, method = message[0], message[1]
            kind = "server" if ident is None else objects[ident].kind
            hist = self.requests.get((kind, method))
        except (LookupError, TypeError):  # not a request, no such container, unhashable
            ident = method = kind = None
            hist = None
        if hist is None:
            hist = self._histogram(kind, method)
        # Inline rather than hist.observe(): this runs once per request served.
        hist.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        hist.total += seconds
        if seconds >= self.slow_seconds:
            self._slow(kind or _UNKNOWN, method, ident, seconds)

    def _histogram(self, kind: str | None, method: Any) -> Histogram:
        """Return the histogram of a pair seen for the first time (or ``unknown``'s)."""
        if kind is None:
            key = (_UNKNOWN, _UNKNOWN)
        else:
            try:
                known = schema.op(None if kind == "server" else kind, method) is not None
            except TypeError:  # an unhashable method name
                known = False
            key = (kind, method) if known else (kind, _UNKNOWN)
        hist = self.requests.get(key)
        if hist is None:
            hist = self.requests[key] = Histogram()
        return hist

    def _slow(self, kind: str, method: Any, name: Any, seconds: float) -> None:
        self.slow_requests += 1
        entry = {
            "at": round(time.time(), 3),
            "kind": kind,
            # Names only, never values. An operation the schema does not name is "unknown",
            # as in the metrics: a client may send anything here (a newline forged log lines).
            "op": method if _known(kind, method) else _UNKNOWN,
            "name": name[:200] if type(name) is str else None,
            "ms": round(seconds * 1000, 3),
        }
        self.slowlog.append(entry)
        if self.on_slow is not None:
            self.on_slow(entry)

    def by_operation(self) -> dict[str, dict[str, float]] | None:
        """Return ``{"kind.op": {"count": n, "seconds": total}}`` of the requests handled.

        None when the server does not count them (:attr:`timing` off): an empty table would
        read as "no requests".
        """
        if not self.timing:
            return None
        return {
            f"{kind}.{op}": {"count": hist.count, "seconds": round(hist.total, 6)}
            for (kind, op), hist in sorted(list(self.requests.items()))
        }

    def error(self, exc: object) -> None:
        """Count one error answered to a client."""
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def read_slowlog(self, count: int | None = None) -> dict[str, Any]:
        """Return the slow-request log for ``kvctl slowlog``: settings and newest entries first.

        Args:
            count: at most this many entries (default: all that are kept).

        Raises:
            ValueError: ``count`` is not a non-negative int.
        """
        if count is not None and (type(count) is not int or count < 0):
            raise ValueError(f"count must be an int >= 0, not {count!r}")
        entries = list(self.slowlog)[::-1]
        return {
            "slow_ms": self.slow_ms,
            "kept": SLOWLOG_SIZE,
            "total": self.slow_requests,
            "entries": entries if count is None else entries[:count],
        }
