"""The named containers kvserve serves: dict, list, Namespace and Queue.

The server calls containers from its one loop thread, one call at a time, so compound
operations (``incr``, ``cas``, ``setdefault``, ...) are atomic across all clients without a
per-call lock. Only names in a class's ``exposed`` set can be called from the wire.

Containers know nothing of networking. A Queue operation that would block raises
:class:`WouldBlock`; the serving loop parks the request (no thread per waiter) and retries it
after the next change to that queue, or answers it with the exception carried by WouldBlock
when its timeout runs out.

Iteration is never exposed: clients fetch a snapshot (``keys()``, ``copy()``) in one round
trip instead of paying one round trip per item as stdlib iterator proxies do.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from kvproto import schema
from kvproto.codec import check_key
from kvproto.limits import MAX_TIMEOUT, check_timeout, check_ttl
from kvproto.wire import MAX_REPLY_FRAME
from kvserve.history import MAX_WATCH_EVENTS, History

__all__ = [
    "KINDS",
    "MAX_REPEAT_BYTES",
    "MAX_REPEAT_ITEMS",
    "MAX_TIMEOUT",
    "Container",
    "KVDict",
    "KVList",
    "KVNamespace",
    "KVQueue",
    "WouldBlock",
    "check_timeout",
]

_MISSING: Any = object()
MAX_REPEAT_ITEMS = 1 << 24
MAX_REPEAT_BYTES = MAX_REPLY_FRAME  # the largest reply a client accepts


def _payload_bytes(items: list[Any]) -> int:
    """Roughly the encoded size of ``items``: str and bytes by length, anything else 16."""
    return sum(len(x) if type(x) is str or type(x) is bytes else 16 for x in items)


"""Most items ``l *= n`` may leave in a list (16 Mi)."""


class WouldBlock(Exception):
    """Raised by a blocking operation that cannot complete now.

    The server parks the request and calls the method again (same arguments) after each
    change to the container, until it returns or raises something else, or the timeout runs
    out.

    Args:
        timeout: seconds the caller is willing to wait, or None for ever.
        on_timeout: the exception to answer with when the wait times out; None answers
            with ``result`` instead (``Lock.acquire`` returns False on timeout).
        result: the value to answer with on timeout when ``on_timeout`` is None.
        on_expire: called under the container's lock when this wait times out, before the
            answer (a Barrier breaks itself); other parked requests are then retried.
        in_line: whether this wait holds its place in a ``strict_fifo`` line: a retry that
            still blocks stops the later ones from being retried. False for a wait that
            consumes nothing (``Queue.join``), so it never holds up the ``get`` calls that
            will end it.
        on_withdraw: called under the container's lock when the caller goes away while it
            waits (its connection closed: a cancelled asyncio task, a killed process), so
            what the wait noted for ``status()`` goes with it.
        resume: ``(position, name, value)``: retry the parked call with this argument
            (positional ``position``, or keyword ``name``) set to ``value``, not the one it
            came with. A filtered watch moves its cursor past the changes it skipped, so its
            retries neither scan them again nor fall behind the history kept.
    """

    def __init__(
        self,
        timeout: float | None,
        on_timeout: BaseException | None = None,
        *,
        result: Any = None,
        on_expire: Callable[[], None] | None = None,
        in_line: bool = True,
        on_withdraw: Callable[[], None] | None = None,
        resume: tuple[int, str, Any] | None = None,
    ) -> None:
        super().__init__(timeout)
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.result = result
        self.on_expire = on_expire
        self.in_line = in_line
        self.on_withdraw = on_withdraw
        self.resume = resume


def _uninterned(mapping: dict[Any, Any]) -> dict[Any, Any]:
    """Return ``mapping`` with fresh copies of its str keys.

    msgpack interns every str map key it decodes, so storing them would grow CPython's global
    interned-string table by one entry per stored key, and that table never shrinks: 1M keys
    cost 29 MiB on top of the dict (1.125x a plain dict; 1.02x with this copy). Stored keys
    are unique, so interning them shares nothing.
    """
    return {(k.encode().decode() if type(k) is str else k): v for k, v in mapping.items()}


def _check_number(value: Any, what: str) -> None:
    if type(value) is bool or not isinstance(value, int | float):
        raise TypeError(f"{what} is {type(value).__name__}, not a number")


class Container:
    """Base of all containers: a kind name, a lock, and the set of callable methods.

    Class attributes a kind sets:
        kind: its name on the wire (``kv.dict`` creates kind ``"dict"``).
        exposed: method names callable from the wire.
        mutating: those that change state (they are logged, and carry request ids).
        caller_methods: those that receive ``caller=`` (bytes identifying the client
            session: the same across reconnects of one client thread), for ownership.
            These three are derived from :mod:`kvproto.schema` for every kind it lists
            (every built-in kind); a kind it does not list sets them itself.
        strict_fifo: when a parked request still blocks on retry, stop retrying the ones
            parked after it (fair queues, locks); False retries every parked request
            (conditions, barriers, events, where a later waiter may proceed first).
    """

    kind: ClassVar[str]
    exposed: ClassVar[frozenset[str]]
    mutating: ClassVar[frozenset[str]]
    caller_methods: ClassVar[frozenset[str]] = frozenset()
    strict_fifo: ClassVar[bool] = True
    # The revision and retained changes (kvserve.history); None: a kind nobody watches.
    history: History | None = None
    # Whether the server asks next_deadline() after every mutating call: set for a kind that
    # overrides it (leases), unless it says otherwise (a dict's TTLs change only by the calls
    # the schema marks ``clock``, so its plain writes skip the question).
    timed: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if type(kind) is str and kind in schema.KINDS and "exposed" not in cls.__dict__:
            cls.exposed = schema.exposed(kind)
            cls.mutating = schema.mutating(kind)
            cls.caller_methods = schema.caller_methods(kind)
        if "timed" not in cls.__dict__ and cls.next_deadline is not Container.next_deadline:
            cls.timed = True

    def __init__(self, *state: Any) -> None:
        # Subclasses take their state (as returned by `state()`) as constructor arguments.
        # Changes a call made that its own arguments do not determine (a lease that ran out
        # by the clock): ``[method, args]`` the server logs before the call, so a replay
        # reproduces them. Calls must not depend on the clock otherwise.
        self.journal: list[list[Any]] = []

    def size(self) -> int:
        """Return the number of items held, for ``names``/``stats``."""
        raise NotImplementedError

    def check_args(self, *args: Any, **kwds: Any) -> None:
        """Check creation arguments given again for an existing container (default: ignore)."""

    def state(self) -> Any:
        """Return the contents as a msgpack-encodable value (snapshots, dumps)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild a container from :meth:`state`."""
        return cls(state)

    def state_parts(self, size: int) -> Iterator[Any]:
        """Yield :meth:`state` in parts of about ``size`` items (one part unless overridden)."""
        yield self.state()

    def extend_state(self, part: Any) -> None:
        """Add a later part from :meth:`state_parts` to a container built from the first."""
        raise ValueError(f"a {self.kind} is never written in parts")

    def next_deadline(self) -> float | None:
        """Return the ``time.monotonic()`` at which :meth:`expire` must run, or None.

        The server asks after every mutating call and schedules a timer (leases use this).
        """
        return None

    def expire(self, now: float) -> None:
        """Apply whatever is due at ``now`` (``time.monotonic()``); called under the lock."""

    def copy_container(self) -> Container:
        """Return a shallow copy: a consistent view, since stored values are only replaced."""
        copy = self.from_state(self.state())
        if self.history is not None:
            copy.history = self.history.copy()
        return copy

    def snapshot_meta(self) -> dict[str, Any] | None:
        """Return what a snapshot keeps beside :meth:`state` (revision and history), or None."""
        if self.history is None:
            return None
        self.history.trim(time.time())
        return {"history": self.history.to_state()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        """Restore what :meth:`snapshot_meta` returned (a snapshot being loaded)."""
        if self.history is not None and "history" in meta:
            self.history.load_state(meta["history"])


class _Watched(Container):
    """A container with a revision and a history of changes that ``watch`` reads."""

    def __init__(self, *state: Any) -> None:
        super().__init__(*state)
        self.history = History()

    def revision(self) -> int:
        """Return the revision: the number of changes applied since the container was made."""
        assert self.history is not None
        return self.history.revision

    def watch(
        self,
        since: int,
        timeout: float | None = None,
        key: Any = None,
        prefix: str | bytes | None = None,
        limit: int = MAX_WATCH_EVENTS,
    ) -> list[Any]:
        """Return ``[cursor, events]``: the changes after revision ``since``, waiting for one.

        Each event is ``[revision, op, key, value]`` (ops in :func:`kvserve.history.events_of`),
        in revision order. ``cursor`` is the revision to resume from: every change up to it
        was answered or filtered out. With no change to answer, waits (parked) up to
        ``timeout`` seconds (None: for ever) and then answers ``[cursor, []]``.

        Args:
            since: the revision already seen (0: from the start of the history).
            timeout: seconds to wait for a change; 0 answers at once.
            key: only changes of this key (and of the whole container).
            prefix: only changes of str (or bytes) keys starting with it.
            limit: most events answered, 1 to :data:`MAX_WATCH_EVENTS`.

        Raises:
            CompactedError: ``since`` is older than the history kept, or ahead of it.
        """
        check_timeout(timeout)
        if type(since) is not int or since < 0:
            raise TypeError(f"since must be an int >= 0, not {since!r}")
        if type(limit) is not int or not 0 < limit <= MAX_WATCH_EVENTS:
            raise ValueError(f"limit must be an int from 1 to {MAX_WATCH_EVENTS}, not {limit!r}")
        if prefix is not None and type(prefix) is not str and type(prefix) is not bytes:
            raise TypeError(f"prefix must be str or bytes, not {type(prefix).__name__}")
        if key is not None:
            check_key(key)
        assert self.history is not None
        cursor, events = self.history.scan(self.kind, type(self), since, key, prefix, limit)
        if events or timeout == 0:
            return [cursor, events]
        # Holds no place in the line of parked calls: a watch must not hold up a queue's get.
        # Retried from the cursor: the changes up to it were filtered out, not to be seen again.
        raise WouldBlock(timeout, result=[cursor, []], in_line=False, resume=(0, "since", cursor))


class KVDict(_Watched):
    """A dict with atomic server-side compound operations, and keys that can expire.

    A key given a time to live (``set(..., ttl=)``, ``set_ttl``) has a wall-clock deadline
    (the ``now=`` the server passes and logs, so a replay or a restart computes the same one);
    the server's timer removes it at that deadline (``next_deadline``/``expire``), journaled as
    ``expire_keys`` so the log replays the removal and watchers see an ``expire`` event.
    Writing the key again without a ttl (``d[k] = v``, ``update``) clears its deadline, as
    Redis ``SET`` does; ``incr``, ``cas`` and ``setdefault`` keep it.
    """

    kind = "dict"
    timed = False  # deadlines change only by the schema's clock calls (see Container.timed)

    def __init__(self, data: dict[Any, Any] | None = None) -> None:
        super().__init__()
        if data is not None and type(data) is not dict:
            raise TypeError(f"a dict's initial contents must be a map, not {type(data).__name__}")
        self.data: dict[Any, Any] = _uninterned(data) if data else {}
        self._ttl: dict[Any, float] = {}  # key -> wall-clock deadline
        self._heap: list[tuple[float, int, Any]] = []  # (deadline, tie-break, key), lazy
        self._seq = 0
        # Ephemeral keys: key -> (owner, lease). Their deadline is renewed by the owner's
        # lease keeper (renew); an entry whose key lost its deadline is stale (dropped there).
        self._owners: dict[Any, tuple[bytes, float]] = {}

    # -- time to live -----------------------------------------------------------------------

    def _set_deadline(self, key: Any, deadline: float) -> None:
        self._ttl[key] = deadline
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, key))
        if len(self._heap) > 2 * len(self._ttl) + 64:  # superseded entries: rebuild
            self._heap = [(d, i, k) for i, (k, d) in enumerate(self._ttl.items())]
            heapq.heapify(self._heap)

    def _forget_ttls(self, keys: Iterable[Any]) -> None:
        ttl = self._ttl
        for key in keys:
            ttl.pop(key, None)

    def set(
        self,
        key: Any,
        value: Any,
        ttl: float | None = None,
        nx: bool = False,
        owner: bytes | None = None,
        *,
        now: float,
    ) -> bool:
        """Store ``d[key] = value``; return whether it did.

        Args:
            key: the key.
            value: its new value.
            ttl: seconds until the key expires (> 0, at most a year); None: no expiry (and
                any earlier deadline of the key is cleared).
            nx: only if the key is absent (an expired key is absent).
            owner: make it an ephemeral key of this owner (a lease keeper's id): ``ttl`` is
                then its lease, renewed by :meth:`renew`.
            now: the server's wall clock (set by the server, logged with the call).
        """
        if ttl is not None:
            ttl = check_ttl(ttl)
        if owner is not None:
            if type(owner) is not bytes or not 0 < len(owner) <= 64:
                raise TypeError("owner must be 1 to 64 bytes")
            if ttl is None:
                raise ValueError("an ephemeral key needs its lease as ttl")
        if type(key) is int or type(key) is tuple:
            check_key(key)
        if nx and key in self.data:
            deadline = self._ttl.get(key)
            if deadline is None or deadline > now:
                return False
        self.data[key] = value
        if ttl is None:
            self._ttl.pop(key, None)
        else:
            self._set_deadline(key, now + ttl)
        if owner is not None:
            self._owners[key] = (owner, float(ttl))  # type: ignore[arg-type]
        elif self._owners:
            self._owners.pop(key, None)
        return True

    def renew(self, owner: bytes, token: int = 0, *, now: float) -> int:
        """Extend each ephemeral key of ``owner`` by its lease; return how many it has here."""
        if type(owner) is not bytes or not 0 < len(owner) <= 64:
            raise TypeError("owner must be 1 to 64 bytes")
        held = 0
        ttl = self._ttl
        for key, (who, lease) in list(self._owners.items()):
            if key not in ttl:
                del self._owners[key]  # deleted, overwritten or persisted since
            elif who == owner:
                self._set_deadline(key, now + lease)
                held += 1
        return held

    def set_ttl(self, key: Any, ttl: float, *, now: float) -> bool:
        """Give an existing key ``ttl`` seconds to live from now; return False if it is absent."""
        ttl = check_ttl(ttl)
        if key not in self.data:
            return False
        self._set_deadline(key, now + ttl)
        self._owners.pop(key, None)  # an explicit deadline: no longer the owner's to renew
        return True

    def ttl(self, key: Any) -> float | None:
        """Return the seconds ``key`` has left, None if it never expires.

        Raises:
            KeyError: no such key.
        """
        if key not in self.data:
            raise KeyError(key)
        deadline = self._ttl.get(key)
        return None if deadline is None else max(0.0, deadline - time.time())

    def persist(self, key: Any) -> bool:
        """Remove the key's deadline; return whether it had one."""
        return self._ttl.pop(key, None) is not None

    def expire_keys(self, keys: list[Any]) -> None:
        """Remove keys whose time ran out (journaled by :meth:`expire`; replayed from the log)."""
        for key in keys:
            self.data.pop(key, None)
            self._ttl.pop(key, None)
            self._owners.pop(key, None)

    def next_deadline(self) -> float | None:
        """Return the ``time.monotonic()`` of the earliest deadline, or None."""
        heap, ttl = self._heap, self._ttl
        while heap and ttl.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # superseded or cleared
        if not heap:
            return None
        return heap[0][0] - time.time() + time.monotonic()

    def expire(self, now: float) -> None:
        """Remove the keys whose deadline has passed (journaled as ``expire_keys``)."""
        wall = time.time()
        heap, ttl = self._heap, self._ttl
        due = []
        while heap and heap[0][0] <= wall:
            deadline, _, key = heapq.heappop(heap)
            if ttl.get(key) == deadline:
                due.append(key)
        if due:
            self.journal.append(["expire_keys", [due]])
            self.expire_keys(due)

    def snapshot_meta(self) -> dict[str, Any] | None:
        """Return the revision, the history and the deadlines, for a snapshot."""
        meta = super().snapshot_meta() or {}
        if self._ttl:
            meta["ttl"] = [[k, d] for k, d in self._ttl.items()]
        if self._owners:
            meta["owners"] = [[k, o, lease] for k, (o, lease) in self._owners.items()]
        return meta

    def load_meta(self, meta: dict[str, Any]) -> None:
        """Restore what :meth:`snapshot_meta` returned."""
        super().load_meta(meta)
        for key, deadline in meta.get("ttl", ()):
            if key in self.data:
                self._set_deadline(key, float(deadline))
        for key, owner, lease in meta.get("owners", ()):
            self._owners[key] = (owner, float(lease))

    def size(self) -> int:
        """Return the number of keys."""
        return len(self.data)

    def state(self) -> dict[Any, Any]:
        """Return the dict itself (copied by whoever keeps it)."""
        return self.data

    def state_parts(self, size: int) -> Iterator[dict[Any, Any]]:
        """Yield the items in dicts of at most ``size`` (at least one, maybe empty)."""
        items = iter(self.data.items())
        part = dict(itertools.islice(items, size))
        yield part
        while part := dict(itertools.islice(items, size)):
            yield part

    def extend_state(self, part: dict[Any, Any]) -> None:
        """Add a later part of the items."""
        self.data.update(_uninterned(part))

    def copy_container(self) -> Container:
        """Return a shallow copy at C speed, with history and deadlines (a snapshot keeps them).

        For dumps and compaction, taken on the loop. Not through :meth:`from_state`: its fresh
        copy of every str key cost 0.4 s of the loop per million keys, and the keys stored
        here are uninterned already.
        """
        copy: Container
        if type(self) is KVDict:
            copy = KVDict()
            copy.data = dict(self.data)
            if self.history is not None:
                copy.history = self.history.copy()
        else:
            copy = super().copy_container()
        assert isinstance(copy, KVDict)
        # Copied whole, not pushed key by key: a copied heap is still a heap (1M deadlines
        # pushed one by one held the loop ~0.8 s at every compaction and dump).
        copy._ttl = dict(self._ttl)
        copy._heap = list(self._heap)
        copy._seq = self._seq
        copy._owners.update(self._owners)
        return copy

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if type(key) is int or type(key) is tuple:
            check_key(key)  # ints beyond 64 bits can be made to collide in the hash table
        self.data[key] = value
        if self._ttl:
            self._ttl.pop(key, None)

    def __delitem__(self, key: Any) -> None:
        del self.data[key]
        if self._ttl:
            self._ttl.pop(key, None)

    def __contains__(self, key: Any) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: Any, default: Any = None) -> Any:
        """Return ``d[key]``, or ``default`` when missing."""
        return self.data.get(key, default)

    def keys(self) -> list[Any]:
        """Return a snapshot list of the keys."""
        return list(self.data)

    def values(self) -> list[Any]:
        """Return a snapshot list of the values."""
        return list(self.data.values())

    def items(self) -> list[tuple[Any, Any]]:
        """Return a snapshot list of ``(key, value)`` tuples."""
        return list(self.data.items())

    def copy(self) -> dict[Any, Any]:
        """Return a snapshot of the whole dict."""
        return dict(self.data)

    def update(self, other: dict[Any, Any]) -> None:
        """Merge a mapping in (the client turns pairs and keywords into one mapping)."""
        if not isinstance(other, dict):
            raise TypeError(f"update() needs a mapping, not {type(other).__name__}")
        self.data.update(_uninterned(other))
        if self._ttl:
            self._forget_ttls(other)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value; ``KeyError`` when missing and no default."""
        if self._ttl:
            self._ttl.pop(key, None)
        if default is _MISSING:
            return self.data.pop(key)
        return self.data.pop(key, default)

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the last inserted ``(key, value)``; ``KeyError`` when empty."""
        item = self.data.popitem()
        if self._ttl:
            self._ttl.pop(item[0], None)
        return item

    def setdefault(self, key: Any, default: Any = None) -> Any:
        """Return ``d[key]``, first storing ``default`` when missing."""
        if type(key) is int or type(key) is tuple:
            check_key(key)
        return self.data.setdefault(key, default)

    def clear(self) -> None:
        """Remove every key."""
        self.data.clear()
        self._ttl.clear()
        self._heap.clear()
        self._owners.clear()

    def incr(self, key: Any, by: int | float = 1, default: int | float = 0) -> int | float:
        """Add ``by`` to ``d[key]`` (``default`` when missing) and return the new value."""
        _check_number(by, "the increment")
        if type(key) is int or type(key) is tuple:
            check_key(key)
        current: int | float = self.data.get(key, default)
        _check_number(current, f"the value at {key!r}")
        new = current + by
        self.data[key] = new
        return new

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Set ``d[key] = new`` only if it currently equals ``expected``; return whether it did.

        Equality is strict about type (``1`` does not match ``1.0`` or ``True``). A missing key
        never matches: use ``setdefault`` to create.
        """
        current = self.data.get(key, _MISSING)
        if current is _MISSING or type(current) is not type(expected) or current != expected:
            return False
        self.data[key] = new
        return True

    def get_many(self, keys: list[Any]) -> dict[Any, Any]:
        """Return ``{key: value}`` for the keys that exist; missing keys are left out."""
        data = self.data
        return {k: data[k] for k in keys if k in data}

    def set_many(self, mapping: dict[Any, Any]) -> None:
        """Store every pair of ``mapping`` at once."""
        self.update(mapping)

    def delete_many(self, keys: list[Any]) -> int:
        """Delete the keys that exist; return how many were deleted."""
        data = self.data
        count = 0
        for k in keys:
            if k in data:
                del data[k]
                count += 1
        if self._ttl:
            self._forget_ttls(keys)
        return count


class KVList(_Watched):
    """A list. Slices travel as ``getslice``/``setslice``/``delslice`` calls."""

    kind = "list"

    def __init__(self, data: list[Any] | None = None) -> None:
        super().__init__()
        if data is not None and type(data) not in (list, tuple):
            raise TypeError(
                f"a list's initial contents must be an array, not {type(data).__name__}"
            )
        self.data: list[Any] = list(data) if data else []

    def size(self) -> int:
        """Return the number of items."""
        return len(self.data)

    def state(self) -> list[Any]:
        """Return the list itself (copied by whoever keeps it)."""
        return self.data

    def state_parts(self, size: int) -> Iterator[list[Any]]:
        """Yield the items in lists of at most ``size`` (at least one, maybe empty)."""
        yield self.data[:size]
        for start in range(size, len(self.data), size):
            yield self.data[start : start + size]

    def extend_state(self, part: list[Any]) -> None:
        """Add a later part of the items."""
        self.data.extend(part)

    def __getitem__(self, index: int) -> Any:
        return self.data[_index(index)]

    def __setitem__(self, index: int, value: Any) -> None:
        self.data[_index(index)] = value

    def __delitem__(self, index: int) -> None:
        del self.data[_index(index)]

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, value: Any) -> bool:
        return value in self.data

    def getslice(self, start: int | None, stop: int | None, step: int | None) -> list[Any]:
        """Return ``l[start:stop:step]``."""
        return self.data[slice(start, stop, step)]

    def setslice(
        self, start: int | None, stop: int | None, step: int | None, values: list[Any]
    ) -> None:
        """Assign ``l[start:stop:step] = values``."""
        self.data[slice(start, stop, step)] = values

    def delslice(self, start: int | None, stop: int | None, step: int | None) -> None:
        """Delete ``l[start:stop:step]``."""
        del self.data[slice(start, stop, step)]

    def append(self, value: Any) -> None:
        """Append one item."""
        self.data.append(value)

    def extend(self, values: list[Any]) -> None:
        """Append every item of ``values``."""
        self.data.extend(values)

    def imul(self, n: int) -> None:
        """Repeat the contents ``n`` times in place (``l *= n``); 0 or less empties it.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: the result would hold more than :data:`MAX_REPEAT_ITEMS` items (a
                few bytes on the wire must not make the server allocate without bound).
        """
        if type(n) is not int:
            raise TypeError(f"can't multiply sequence by non-int of type {type(n).__name__!r}")
        if n > 1 and len(self.data) * n > MAX_REPEAT_ITEMS:
            raise ValueError(f"l *= {n} would hold more than {MAX_REPEAT_ITEMS} items")
        if n > 1 and _payload_bytes(self.data) * n > MAX_REPEAT_BYTES:
            # The repeats share their items, but every copy, compare, dump and snapshot pays
            # for each: a 1 MiB item times 2M made count() take 46 s and a snapshot terabytes.
            raise ValueError(f"l *= {n} would hold more than {MAX_REPEAT_BYTES} bytes of values")
        self.data *= n

    def insert(self, index: int, value: Any) -> None:
        """Insert ``value`` before ``index``."""
        self.data.insert(_index(index), value)

    def pop(self, index: int = -1) -> Any:
        """Remove and return the item at ``index`` (default last); ``IndexError`` if empty."""
        return self.data.pop(_index(index))

    def remove(self, value: Any) -> None:
        """Remove the first item equal to ``value``; ``ValueError`` if absent."""
        self.data.remove(value)

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """Return the index of the first item equal to ``value``; ``ValueError`` if absent."""
        return self.data.index(value, start, len(self.data) if stop is None else stop)

    def count(self, value: Any) -> int:
        """Return how many items equal ``value``."""
        return self.data.count(value)

    def sort(self, reverse: bool = False) -> None:
        """Sort in place (no key function: code never crosses the wire)."""
        self.data.sort(reverse=reverse)

    def reverse(self) -> None:
        """Reverse in place."""
        self.data.reverse()

    def clear(self) -> None:
        """Remove every item."""
        self.data.clear()

    def copy(self) -> list[Any]:
        """Return a snapshot of the whole list."""
        return list(self.data)


def _index(index: Any) -> int:
    if type(index) is not int:
        raise TypeError(f"list indices must be integers or slices, not {type(index).__name__}")
    return index


class KVNamespace(_Watched):
    """A Namespace: named attributes, with an atomic ``incr``."""

    kind = "namespace"

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        super().__init__()
        if data is not None:
            if type(data) is not dict:
                raise TypeError(
                    f"a namespace's initial attributes must be a map, not {type(data).__name__}"
                )
            for name in data:
                if not isinstance(name, str):
                    raise TypeError(f"attribute name must be str, not {type(name).__name__}")
        self.data: dict[str, Any] = dict(data) if data else {}

    def size(self) -> int:
        """Return the number of attributes."""
        return len(self.data)

    def state(self) -> dict[str, Any]:
        """Return the attributes (copied by whoever keeps them)."""
        return self.data

    def getattr(self, name: str) -> Any:
        """Return an attribute; ``AttributeError`` when it is not set."""
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(f"namespace has no attribute {name!r}") from None

    def hasattr(self, name: str) -> bool:
        """Return whether an attribute is set."""
        return name in self.data

    def setattr(self, name: str, value: Any) -> None:
        """Set an attribute."""
        if not isinstance(name, str):
            raise TypeError(f"attribute name must be str, not {type(name).__name__}")
        self.data[name] = value

    def delattr(self, name: str) -> None:
        """Delete an attribute; ``AttributeError`` when it is not set."""
        try:
            del self.data[name]
        except KeyError:
            raise AttributeError(f"namespace has no attribute {name!r}") from None

    def incr(self, name: str, by: int | float = 1) -> int | float:
        """Add ``by`` to an attribute (0 when unset) and return the new value."""
        _check_number(by, "the increment")
        current: int | float = self.data.get(name, 0)
        _check_number(current, f"attribute {name!r}")
        self.data[name] = new = current + by
        return new

    def update(self, mapping: dict[str, Any]) -> None:
        """Set several attributes at once."""
        for name in mapping:
            if not isinstance(name, str):
                raise TypeError(f"attribute name must be str, not {type(name).__name__}")
        self.data.update(mapping)

    def to_dict(self) -> dict[str, Any]:
        """Return a snapshot of every attribute."""
        return dict(self.data)


class KVQueue(_Watched):
    """A FIFO queue with ``queue.Queue`` semantics; ``maxsize`` is fixed at creation.

    Every queue is joinable, as ``queue.Queue`` is: each ``put`` adds an unfinished task,
    ``task_done`` ends one, and ``join`` waits (parked, like ``get``) until none is left.

    State: ``[maxsize, items, unfinished]``.
    """

    kind = "queue"

    def __init__(
        self, maxsize: int = 0, items: list[Any] | None = None, unfinished: int | None = None
    ) -> None:
        super().__init__()
        if type(maxsize) is not int:
            raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
        self._maxsize = maxsize
        self.items: collections.deque[Any] = collections.deque(items or ())
        if unfinished is None:
            unfinished = len(self.items)
        if type(unfinished) is not int or unfinished < 0:
            raise TypeError("unfinished must be an int >= 0")
        self._unfinished = unfinished

    def size(self) -> int:
        """Return the number of queued items."""
        return len(self.items)

    def state(self) -> list[Any]:
        """Return ``[maxsize, items, unfinished]``."""
        return [self._maxsize, list(self.items), self._unfinished]

    @classmethod
    def from_state(cls, state: Any) -> KVQueue:
        """Rebuild from ``[maxsize, items, unfinished]`` (or ``[maxsize, items]`` of old)."""
        return cls(*state)

    def check_args(self, maxsize: int = 0, *args: Any, **kwds: Any) -> None:
        """Refuse to hand out an existing queue as one with another bound."""
        if maxsize != self._maxsize:
            raise ValueError(f"this queue exists with maxsize {self._maxsize}, not {maxsize}")

    def maxsize(self) -> int:
        """Return the bound fixed at creation (0 or less: unbounded)."""
        return self._maxsize

    def qsize(self) -> int:
        """Return the number of queued items."""
        return len(self.items)

    def empty(self) -> bool:
        """Return whether the queue is empty."""
        return not self.items

    def full(self) -> bool:
        """Return whether the queue is at its maxsize."""
        return 0 < self._maxsize <= len(self.items)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; when full, wait (``WouldBlock``) or raise ``queue.Full``."""
        _check_timeout(timeout)
        if self.full():
            if not block:
                raise queue.Full
            raise WouldBlock(timeout, queue.Full())
        self.items.append(item)
        self._unfinished += 1

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Pop the oldest item; when empty, wait (``WouldBlock``) or raise ``queue.Empty``."""
        _check_timeout(timeout)
        if not self.items:
            if not block:
                raise queue.Empty
            raise WouldBlock(timeout, queue.Empty())
        return self.items.popleft()

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    def task_done(self) -> None:
        """End one unfinished task (one ``put`` item fully processed).

        Raises:
            ValueError: called more times than items were put, as ``queue.Queue`` raises.
        """
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1

    def join(self) -> None:
        """Return once every item put has had its ``task_done``; until then wait, parked.

        The wait holds no place in the queue's line of parked calls (``in_line=False``): the
        ``get`` calls parked after it are what will end it.
        """
        if self._unfinished:
            # Never answered by a timeout; the error is the answer in a batch, which never
            # waits.
            raise WouldBlock(
                None,
                ValueError(f"{self._unfinished} task(s) unfinished; join() cannot wait in a batch"),
                in_line=False,
            )

    def unfinished(self) -> int:
        """Return how many items put have not had their ``task_done`` yet."""
        return self._unfinished


def _check_timeout(timeout: Any) -> None:
    check_timeout(timeout)


KINDS: dict[str, type[Container]] = {
    cls.kind: cls for cls in (KVDict, KVList, KVNamespace, KVQueue)
}
