"""Revisions and the retained history of changes of a data container, read by ``watch``.

Every dict, list, namespace and queue has a :class:`History`: a revision, increased by one by
each mutating call that succeeds (and by each change the clock makes, such as an expiring key),
and the last changes as entries ``(revision, method, args, kwds, result)``. An entry
is the call as it was applied, not its events: recording one is an increment and an append on
the write path (a ``d[k] = v`` pays nothing more), and the events a watcher sees are derived
from it when it is read (:func:`events_of`). One call is one revision; a call that changes
several keys (``update``) gives one event per key, all with that revision.

The history is bounded by count (a ``deque`` with ``maxlen``) and by age (older entries are
dropped when a watch or a snapshot reads it): it never grows with the number of watchers or
with how far behind they are. The count is of changes to keys, not of calls: a call of
:data:`MANY` (``set_many`` of 10,000 keys) counts as its keys, so the history's memory does not
grow with the size of batches (100 kept ``set_many`` batches of 10,000 held 111 B per stored
key, bench/results/*-memory-history.md). The newest change is always kept, whatever its size,
so a watcher that is up to date never misses one. Single writes are recorded inline by the
engine and count when the next batch is recorded: at most ``2 * count`` changes plus the
newest are kept. A watcher pulls at most :data:`MAX_WATCH_EVENTS` events (and about
:data:`_REPLY_BUDGET` bytes) per call, and one that asks for a revision older than the
history is told so (:class:`~kvproto.errors.CompactedError`, carrying the oldest revision it can
resume from), as etcd does after a compaction.

Revisions and history are kept in snapshots and rebuilt by log replay, which re-applies the
same calls in the same order, so a restart with ``--data-dir`` resumes the same numbering.
Age is known from checkpoints taken when the history is read, not from a clock read per write
(see :attr:`History.marks`); entries replayed from the log after the last snapshot get their
first checkpoint after the restart. Either way a change is kept at least the retention age,
sometimes longer, never shorter.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from kvproto.errors import CompactedError
from kvproto.limits import MAX_WATCH_EVENTS

__all__ = [
    "DEFAULT_HISTORY_AGE",
    "DEFAULT_HISTORY_COUNT",
    "MANY",
    "MAX_HISTORY_COUNT",
    "MAX_WATCH_EVENTS",
    "History",
    "events_of",
]

DEFAULT_HISTORY_COUNT: Final = 1000
"""Changes kept per container by default (``kvserve --watch-history``)."""
DEFAULT_HISTORY_AGE: Final = 3600.0
"""Seconds a change is kept by default (``kvserve --watch-history-age``)."""
MAX_HISTORY_COUNT: Final = 10_000_000
_REPLY_BUDGET: Final = 1 << 20  # rough bytes of values per watch reply (at least one change)
_NEAR: Final = 4096  # changes behind the newest at most, to walk the history from its end

MANY: Final = frozenset({"update", "set_many", "delete_many", "extend", "expire_keys"})
"""Methods whose first argument holds one change per item: counted as that many changes (the
engine records them through :meth:`History.record`, never inline)."""

Entry = tuple[int, str, list[Any], dict[str, Any] | None, Any]
Event = tuple[int, str, Any, Any]  # revision, op, key, value: what crosses the wire


class History:
    """The revision and the retained changes of one container (see the module docstring).

    Args:
        count: most changes kept (>= 0).
        age: seconds a change is kept (> 0).
    """

    __slots__ = ("entries", "extra", "heavy", "marks", "max_age", "revision")

    def __init__(
        self, count: int = DEFAULT_HISTORY_COUNT, age: float = DEFAULT_HISTORY_AGE
    ) -> None:
        self.revision = 0
        self.entries: collections.deque[Entry] = collections.deque(maxlen=count)
        self.max_age = age
        # (revision, wall time) checkpoints, taken when the history is read (trim), at most
        # one a second: "by then the revision was this". A write reads no clock; a change is
        # dropped for age once a checkpoint at or after it is older than max_age (so it is
        # kept at least max_age, and at most max_age plus the time between two reads).
        self.marks: collections.deque[tuple[int, float]] = collections.deque()
        # (revision, changes beyond the first) of the kept entries of MANY calls, oldest
        # first, and their sum: len(entries) + extra is the number of changes kept. Entries
        # dropped by maxlen or age leave theirs behind until the next MANY call clears them.
        self.heavy: collections.deque[tuple[int, int]] = collections.deque()
        self.extra = 0

    def configure(self, count: int, age: float) -> None:
        """Apply the server's retention (keeps the newest ``count`` changes)."""
        if self.entries.maxlen != count:
            # The same bound as record's (maxlen, then _evict's), so a restart from a
            # snapshot keeps what the running server kept: up to 2 * count changes.
            self.entries = collections.deque(self.entries, maxlen=count)
            self._reweigh()
            self._evict()
        self.max_age = age

    def record(
        self, method: str, args: list[Any], kwds: dict[str, Any] | None, result: Any
    ) -> None:
        """Count one applied change and keep it (callers skip ``Op.unwatched`` calls)."""
        self.revision = rev = self.revision + 1
        self.entries.append((rev, method, args, kwds, result))
        if method in MANY:
            extra = _weight(args, kwds) - 1
            # self.entries is empty only with maxlen 0 (--watch-history 0): nothing to count.
            if extra > 0 and self.entries:
                self.heavy.append((rev, extra))
                self.extra += extra
                self._evict()

    def _evict(self) -> None:
        """Drop the oldest entries while those up to the newest MANY one exceed ``maxlen``.

        Counted as changes, down to that entry alone. That is the bound record applies when
        it records a MANY call (then the newest entry); the single writes after it are
        bounded by ``maxlen`` alone. Applying the same rule on load (configure) keeps what
        the running server kept, no less.
        """
        entries, heavy = self.entries, self.heavy
        if not entries:
            heavy.clear()
            self.extra = 0
            return
        first = entries[0][0]
        while heavy and heavy[0][0] < first:  # gone already (maxlen, age)
            self.extra -= heavy.popleft()[1]
        if not heavy:
            return
        last = heavy[-1][0]
        counted = len(entries)  # entries up to the newest MANY one
        for entry in reversed(entries):
            if entry[0] <= last:
                break
            counted -= 1
        limit = entries.maxlen or 0
        while counted > 1 and counted + self.extra > limit:
            rev = entries.popleft()[0]
            counted -= 1
            if heavy[0][0] == rev:
                self.extra -= heavy.popleft()[1]

    def _reweigh(self) -> None:
        """Rebuild :attr:`heavy` and :attr:`extra` from the entries (loaded or copied)."""
        self.heavy = collections.deque(
            (e[0], w - 1) for e in self.entries if e[1] in MANY and (w := _weight(e[2], e[3])) > 1
        )
        self.extra = sum(w for _, w in self.heavy)

    def trim(self, now: float) -> None:
        """Take a checkpoint, and drop the entries known to be older than the retention age."""
        marks = self.marks
        if not marks or marks[-1][1] <= now - 1.0:
            marks.append((self.revision, now))
        oldest = now - self.max_age
        cutoff = -1
        while marks and marks[0][1] < oldest:
            cutoff = marks.popleft()[0]
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            entries.popleft()

    def oldest(self) -> int:
        """Return the oldest ``since`` a watch can resume from (every later change is kept)."""
        entries = self.entries
        return entries[0][0] - 1 if entries else self.revision

    def scan(
        self,
        kind: str,
        cls: type,
        since: int,
        key: Any,
        prefix: str | bytes | None,
        limit: int,
    ) -> tuple[int, list[Event]]:
        """Return ``(cursor, events)``: the changes after ``since`` that pass the filters.

        ``cursor`` is the revision the answer covers up to (the caller resumes from it):
        changes filtered out are covered too. At most ``limit`` events are taken, but a
        change is never split (its events share one revision).

        Raises:
            CompactedError: ``since`` is older than the history, or ahead of the revision.
        """
        self.trim(time.time())
        oldest, revision = self.oldest(), self.revision
        if since < oldest:
            raise CompactedError(
                f"revision {since} is older than the history kept (oldest {oldest}, now "
                f"{revision}); read the container again and watch from its revision",
                oldest,
                revision,
            )
        if since > revision:
            raise CompactedError(
                f"revision {since} is ahead of this container's ({revision}): it was dropped "
                "and created again, or the server lost unsynced writes; read it again and "
                "watch from its revision",
                oldest,
                revision,
            )
        events: list[Event] = []
        cursor = since
        budget = _REPLY_BUDGET
        entries = self.entries
        behind = revision - since
        # A deque is walked from one end: a watcher near the newest change (the usual one)
        # costs what it reads, not the length of the history.
        if behind <= _NEAR:
            newer: Iterable[Entry] = reversed(list(itertools.islice(reversed(entries), behind)))
        else:
            newer = itertools.islice(entries, len(entries) - behind, None)
        for rev, method, args, kwds, result in newer:
            found = [
                (rev, op, k, v)
                for op, k, v in events_of(kind, cls, method, args, kwds, result)
                if _matches(k, key, prefix)
            ]
            if events and (len(events) + len(found) > limit or budget <= 0):
                break
            events.extend(found)
            budget -= sum(_size(e[3]) for e in found)
            cursor = rev
        return cursor, events

    def to_state(self) -> list[Any]:
        """Return ``[revision, [entry, ...], [mark, ...]]`` for a snapshot."""
        return [self.revision, [list(e) for e in self.entries], [list(m) for m in self.marks]]

    def load_state(self, state: Any) -> None:
        """Restore what :meth:`to_state` returned (a snapshot being loaded)."""
        revision, entries, marks = state
        self.revision = int(revision)
        # Loaded before the server's retention is applied (configure): keep everything the
        # snapshot held, so a larger --watch-history than the default survives a restart.
        kept = [tuple(e) for e in entries]
        self.entries = collections.deque(kept, maxlen=max(self.entries.maxlen or 0, len(kept)))
        self.marks = collections.deque((int(r), float(t)) for r, t in marks)
        self._reweigh()

    def copy(self) -> History:
        """Return an independent copy (a snapshot's point-in-time view)."""
        other = History(self.entries.maxlen or 0, self.max_age)
        other.revision = self.revision
        other.entries.extend(self.entries)
        other.marks.extend(self.marks)
        other.heavy.extend(self.heavy)
        other.extra = self.extra
        return other


def _weight(args: list[Any], kwds: dict[str, Any] | None = None) -> int:
    """Return how many changes a :data:`MANY` call with ``args`` made (1 when malformed).

    Every MANY method takes one argument (tests/test_watch.py checks it), so a call that was
    applied passed it either first in ``args`` or as the one keyword besides the server's own.
    """
    items: Any = None
    if args:
        items = args[0]
    elif kwds:
        given = [v for k, v in kwds.items() if k not in {"caller", "now"}]
        items = given[0] if len(given) == 1 else None
    return len(items) if isinstance(items, (dict, list, tuple)) else 1


def _size(value: Any) -> int:
    return len(value) if type(value) is str or type(value) is bytes else 16


def _matches(k: Any, key: Any, prefix: str | bytes | None) -> bool:
    if k is None:
        return True  # a change of the whole container (clear, sort) concerns every key
    if key is not None and not (type(k) is type(key) and k == key):
        return False
    return prefix is None or (type(k) is type(prefix) and k.startswith(prefix))  # type: ignore[arg-type]


def _positional(cls: type, method: str, args: list[Any], kwds: dict[str, Any]) -> list[Any]:
    """Return a call's arguments as positional ones (a raw client may send keywords)."""
    try:
        bound = inspect.signature(getattr(cls, method)).bind(None, *args, **kwds)
    except (TypeError, ValueError, AttributeError):
        return list(args)
    bound.apply_defaults()
    return list(bound.args[1:])


Derive = Callable[[list[Any], Any], list[tuple[str, Any, Any]]]


def _set(a: list[Any], r: Any) -> list[tuple[str, Any, Any]]:
    return [("set", a[0], a[1])]


def _set_result(a: list[Any], r: Any) -> list[tuple[str, Any, Any]]:
    return [("set", a[0], r)]


def _delete(a: list[Any], r: Any) -> list[tuple[str, Any, Any]]:
    return [("delete", a[0], None)]


def _set_each(a: list[Any], r: Any) -> list[tuple[str, Any, Any]]:
    return [("set", k, v) for k, v in a[0].items()] if a and isinstance(a[0], dict) else []


def _whole(op: str) -> Derive:
    return lambda a, r: [(op, None, None)]


def _expired(a: list[Any], r: Any) -> list[tuple[str, Any, Any]]:
    return [("expire", k, None) for k in a[0]]


_DICT: Final[dict[str, Derive]] = {
    "__setitem__": _set,
    "set": lambda a, r: [("set", a[0], a[1])] if r else [],
    "set_ttl": lambda a, r: [],  # a deadline is not a change of the value; its expiry is
    "renew": lambda a, r: [],
    "persist": lambda a, r: [],
    "setdefault": lambda a, r: [("set", a[0], r)],
    "incr": _set_result,
    "cas": lambda a, r: [("set", a[0], a[2])] if r else [],
    "__delitem__": _delete,
    # pop with a default of a missing key changed nothing, but cannot be told from a pop of
    # a key holding that default: it is reported as a delete (harmless: the key is absent).
    "pop": _delete,
    "popitem": lambda a, r: [("delete", r[0], None)],
    "delete_many": lambda a, r: [("delete", k, None) for k in a[0]] if r else [],
    "update": _set_each,
    "set_many": _set_each,
    "clear": _whole("clear"),
    "expire_keys": _expired,
}
_NAMESPACE: Final[dict[str, Derive]] = {
    "setattr": _set,
    "incr": _set_result,
    "delattr": _delete,
    "update": _set_each,
}
_LIST: Final[dict[str, Derive]] = {
    "append": lambda a, r: [("append", None, a[0])],
    "extend": lambda a, r: [("append", None, v) for v in a[0]],
    "insert": lambda a, r: [("insert", a[0], a[1])],
    "__setitem__": _set,
    "__delitem__": _delete,
    "pop": lambda a, r: [("pop", a[0] if a else -1, r)],
    "remove": lambda a, r: [("remove", None, a[0])],
}
_QUEUE: Final[dict[str, Derive]] = {
    "put": lambda a, r: [("put", None, a[0])],
    "put_nowait": lambda a, r: [("put", None, a[0])],
    "get": lambda a, r: [("get", None, r)],
    "get_nowait": lambda a, r: [("get", None, r)],
    "task_done": _whole("task_done"),
}
_KINDS: Final = {"dict": _DICT, "namespace": _NAMESPACE, "list": _LIST, "queue": _QUEUE}


def events_of(
    kind: str, cls: type, method: str, args: list[Any], kwds: dict[str, Any] | None, result: Any
) -> list[tuple[str, Any, Any]]:
    """Return the ``(op, key, value)`` events of one applied call.

    Ops: ``set``, ``delete``, ``expire`` (a key's TTL ran out), ``clear`` (dict, namespace);
    ``append``, ``insert``, ``set``, ``delete``, ``pop``, ``remove`` (list; ``key`` is the
    index, None for the end); ``put``, ``get``, ``task_done`` (queue). Any other change of a
    list (``sort``, ``reverse``, slices, ``*=``) is one event named after it with key and
    value None: re-read the list.
    """
    if kwds:
        # caller= and now= are the server's own (schema: caller, clock), never positional.
        extra = {k: v for k, v in kwds.items() if k not in {"caller", "now"}}
        if extra:
            args = _positional(cls, method, args, extra)
    derive = _KINDS.get(kind, {}).get(method)
    if derive is None:
        return [(method.strip("_"), None, None)]
    try:
        return derive(args, result)
    except (IndexError, KeyError, TypeError, AttributeError):
        return [(method.strip("_"), None, None)]
