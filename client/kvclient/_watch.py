"""Watching a container: the :class:`Event` type and the iterators, written once for both fronts.

``d.watch()`` asks the server for the changes after a revision; the server parks the call until
there is one (no thread, no polling) and answers at most ``limit`` events, the revision they
cover up to, and nothing more: a watcher that reads slowly holds nothing on the server beyond
the container's bounded history. :class:`_Cursor` keeps what an iterator needs between calls
(the revision to resume from, the events not yet handed out) and is shared by the blocking
:class:`Watch` and the asyncio :class:`AsyncWatch`, which only make the calls.

Each wait on the server lasts at most :data:`_CHUNK` seconds, then the call is made again: a
connection that died silently is noticed within that time plus the call timeout, and a watch
that was interrupted by a reconnect (or a server restart) resumes from its revision without
losing or repeating an event.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final, NamedTuple

from kvproto.limits import MAX_WATCH_EVENTS, check_timeout

__all__ = ["AsyncWatch", "Event", "Watch"]

_CHUNK: Final = 30.0


class Event(NamedTuple):
    """One change of a watched container.

    Attributes:
        revision: the container's revision after the change (one call that changed several
            keys, ``update``, gives one event per key with the same revision).
        op: what happened. dict and namespace: ``"set"``, ``"delete"``, ``"expire"`` (the
            key's TTL ran out, or its ephemeral owner went away), ``"clear"``. list:
            ``"append"``, ``"insert"``, ``"set"``, ``"delete"``, ``"pop"``, ``"remove"``, or
            the name of a change of the whole list (``"sort"``, ``"reverse"``, ``"setslice"``,
            ...: re-read it). queue: ``"put"``, ``"get"``, ``"task_done"``.
        key: the key, attribute name or list index it concerns; None for the whole container
            (``clear``) or, for lists and queues, the end.
        value: the value set, appended, put or got; None for deletions.
    """

    revision: int
    op: str
    key: Any
    value: Any


class _Cursor:
    """Where a watch is: the revision consumed so far and the events received, not yet read."""

    __slots__ = ("_buffer", "_next", "args", "revision")

    def __init__(self, since: int | None, key: Any, prefix: str | bytes | None, limit: int) -> None:
        if since is not None and (type(since) is not int or since < 0):
            raise TypeError(f"since must be None or an int >= 0, not {since!r}")
        if type(limit) is not int or not 0 < limit <= MAX_WATCH_EVENTS:
            raise ValueError(f"limit must be an int from 1 to {MAX_WATCH_EVENTS}, not {limit!r}")
        self.revision = since
        self._next = since  # the revision the next call resumes after
        self._buffer: collections.deque[Event] = collections.deque()
        self.args = (key, prefix, limit)

    def request(self, wait: float | None) -> list[Any]:
        """Return the args of the next ``watch`` call, waiting at most ``wait`` (None: a chunk)."""
        key, prefix, limit = self.args
        wait = _CHUNK if wait is None else max(0.0, min(wait, _CHUNK))
        return [self._next, wait, key, prefix, limit]

    def feed(self, reply: Any) -> None:
        """Take one ``[cursor, events]`` answer."""
        cursor, events = reply
        self._buffer.extend(Event(*e) for e in events)
        self._next = cursor
        if not self._buffer:
            self.revision = cursor

    def unstarted(self) -> bool:
        """Whether the watch began with ``since=None`` and has not read the revision yet."""
        return self._next is None

    def start(self, revision: int) -> None:
        """Begin after ``revision`` (the container's, read when ``since`` was None)."""
        self.revision = self._next = revision

    def has_events(self) -> bool:
        """Whether an event is buffered."""
        return bool(self._buffer)

    def pop(self) -> Event:
        """Return the next buffered event (see :meth:`has_events`)."""
        buffer = self._buffer
        event = buffer.popleft()
        if not buffer:
            self.revision = self._next
        elif buffer[0].revision != event.revision:
            self.revision = event.revision
        else:
            self.revision = event.revision - 1  # the rest of this change is still to come
        return event


class _Deadline:
    """When an iterator with a timeout stops: ``timeout`` seconds without an event."""

    __slots__ = ("timeout", "until")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = check_timeout(timeout)
        self.until = 0.0

    def restart(self) -> None:
        if self.timeout is not None:
            self.until = time.monotonic() + self.timeout

    def remaining(self) -> float | None:
        """Seconds left (None: no timeout); 0 or less: it ran out."""
        return None if self.timeout is None else self.until - time.monotonic()


class _Watching:
    """What both iterators hold: the proxy, the cursor and the idle deadline."""

    def __init__(
        self,
        proxy: Any,
        since: int | None,
        key: Any,
        prefix: str | bytes | None,
        timeout: float | None,
        limit: int,
    ) -> None:
        self._proxy = proxy
        self._cursor = _Cursor(since, key, prefix, limit)
        self._deadline = _Deadline(timeout)

    @property
    def revision(self) -> int | None:
        """See :class:`Watch`."""
        return self._cursor.revision

    def _steps(self) -> Iterator[list[Any] | None]:
        """Yield the args of each ``watch`` call until an event is buffered, then None.

        The caller makes each call (blocking or awaited) and feeds its reply to the cursor;
        this ends the iteration (returns) when the idle timeout ran out after at least one call
        (a timeout of 0 still asks once).
        """
        cursor, deadline = self._cursor, self._deadline
        deadline.restart()
        asked = False
        while not cursor.has_events():
            left = deadline.remaining()
            if asked and left is not None and left <= 0:
                return
            asked = True
            yield cursor.request(left)
        yield None


class Watch(_Watching):
    """An iterator over the changes of one container (``for ev in d.watch(): ...``).

    Made by a proxy's ``watch()``. It yields :class:`Event` objects in revision order, waiting
    for each; with a ``timeout`` it stops when none came for that long.

    Attributes:
        revision: the revision every change up to which was yielded (or filtered out): pass
            it as ``since=`` to resume later, in this process or another, without losing or
            repeating an event. None until the first call when started with ``since=None``.

    Raises (while iterating):
        CompactedError: ``since`` is older than the server's retained history (or ahead of
            the container's revision); re-read the container and watch from ``.revision``
            of the error.
        NoSuchContainerError: the container was dropped.
    """

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        cursor = self._cursor
        if cursor.unstarted():
            cursor.start(self._proxy.revision())
        for args in self._steps():
            if args is None:
                return cursor.pop()
            cursor.feed(self._proxy._call("watch", args))
        raise StopIteration


class AsyncWatch(_Watching):
    """The asyncio :class:`Watch`: ``async for ev in d.watch(): ...`` (same attributes)."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        cursor = self._cursor
        if cursor.unstarted():
            cursor.start(await self._proxy.revision())
        for args in self._steps():
            if args is None:
                return cursor.pop()
            cursor.feed(await self._proxy._call("watch", args))
        raise StopAsyncIteration
