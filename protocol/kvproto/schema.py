"""What every operation is: the one table client and server derive their behaviour from.

For each container kind, and for the server-level calls (``ident`` nil), the operations the
wire accepts and, for each, an :class:`Op` saying:

- whether it **mutates**: the server logs it (with ``--data-dir``), refuses it on a
  read-only-key connection and remembers its answer under its request id; a client sends it
  with a request id, so a retry after a lost connection is answered instead of applied twice.
  A call that does not mutate is retried freely and sent without one.
- whether it **blocks**: it may park on the server until another call wakes it or its wait
  runs out. ``wait_arg`` is the position of the wait (seconds, None for ever) in its args and
  ``block_arg`` that of a ``block`` flag that turns the wait off: a client waits for the
  reply that long plus its call timeout.
- **caller**: the server passes ``caller=`` (the session token) to the method.
- **clock**: the server passes ``now=`` (its wall clock, ``time.time()``) to the method and
  logs it with the call, so a replay computes the same deadlines (a key's TTL).

The server builds each kind's exposed, mutating and read-only sets from here
(:func:`exposed`, :func:`mutating`); clients decide request ids and reply timeouts from here
(:func:`op`). Neither keeps a list of method names of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NamedTuple

__all__ = [
    "KINDS",
    "PARTED_KINDS",
    "SERVER",
    "STDLIB_NOOPS",
    "Op",
    "caller_methods",
    "exposed",
    "mutating",
    "op",
    "register_kind",
    "unsupported",
]


class Op(NamedTuple):
    """What one operation is (see the module docstring).

    A NamedTuple, not a dataclass: ``dataclasses`` costs every client ~20 ms of imports.

    Attributes:
        mutates: may change state (logged, refused read-only, request id remembered).
        blocks: may park on the server.
        wait_arg: position in args of the wait in seconds (None waits for ever), if it blocks.
        block_arg: position in args of the ``block`` flag (False: answer at once), if any.
        caller: the server passes ``caller=`` to it.
        logged: the request is appended to the log as it is (default: ``mutates``).
            Server-level calls differ: ``compact`` changes nothing a replay needs.
        own_policy: the call applies the read-only rule and the logging itself
            (``create`` attaches freely and logs only what it creates; ``batch`` checks and
            logs each of its calls).
        idempotent: applying it twice is applying it once (get-or-create), so a client
            retries it freely and sends it without a request id: an id would take one of the
            server's remembered answers and could evict another client's pending retry.
        clock: the server passes ``now=`` (wall-clock seconds) and logs it with the call.
        feature: the optional capability it belongs to (``"watch"``, ``"ttl"``), "" for the
            core every backend has. A backend without a feature raises
            :class:`~kvproto.errors.NotSupportedError` for its operations (see
            :func:`unsupported`), never a silent difference.
        fenced: a blocking call that hands its caller something taken from everyone else (a
            queue's item, a lock's hold): a client that gives up on it while it waits (a
            cancelled asyncio task) must find out whether it was answered and undo it, or
            the item or the hold is lost (kvclient.aio's cancellation fences).
        unwatched: it changes state no watcher sees (a lease renewal moves deadlines only):
            no revision, no event, so renewals every few seconds do not fill the history.
        session: a server-level call on state the calling connection owns (a dump's
            cursors), answered by the engine with that connection's session; it goes when
            the connection does.
    """

    mutates: bool = False
    blocks: bool = False
    wait_arg: int | None = None
    block_arg: int | None = None
    caller: bool = False
    logged: bool | None = None
    own_policy: bool = False
    idempotent: bool = False
    clock: bool = False
    feature: str = ""
    session: bool = False
    unwatched: bool = False
    fenced: bool = False

    @property
    def is_logged(self) -> bool:
        """Whether the request itself goes into the log."""
        return self.mutates if self.logged is None else self.logged

    @property
    def needs_id(self) -> bool:
        """Whether a client sends it with a request id (it mutates, and not idempotently)."""
        return self.mutates and not self.idempotent


_READ: Final = Op()
_WRITE: Final = Op(mutates=True)


def _ops(read: str = "", write: str = "", **special: Op) -> Mapping[str, Op]:
    table = dict.fromkeys(read.split(), _READ)
    table.update(dict.fromkeys(write.split(), _WRITE))
    table.update(special)
    return MappingProxyType(table)


# Leased primitives: acquire [owner, blocking, timeout, lease, wait_id] waits unless blocking
# is False; release, renew and the rest answer at once.
_ACQUIRE: Final = Op(mutates=True, blocks=True, wait_arg=2, block_arg=1, fenced=True)
# Every data container keeps a revision and a bounded history of its changes. watch [since,
# timeout, key, prefix, limit] answers the changes after revision ``since``, parked until there
# is one (it changes nothing, so the read-only key may watch).
_WATCH: Final = {
    "revision": Op(feature="watch"),
    "watch": Op(blocks=True, wait_arg=1, feature="watch"),
}
_RLOCK: Final = _ops("locked status", "release renew", acquire=_ACQUIRE)
# A Lock's hold may also be ended by the fencing token it was issued (kvctl lock release).
_LOCK: Final = _ops("locked status", "release release_token renew", acquire=_ACQUIRE)
_SEMAPHORE: Final = _ops("locked status get_value", "release renew", acquire=_ACQUIRE)

KINDS: dict[str, Mapping[str, Op]] = {
    "dict": _ops(
        "__contains__ __getitem__ __len__ copy get get_many items keys values",
        "__delitem__ __setitem__ cas clear delete_many incr pop popitem set_many setdefault update",
        **_WATCH,
        # Time to live: set [key, value, ttl, nx(, owner)] and set_ttl [key, ttl] take a
        # deadline from the server's clock; ttl [key] reads what is left; persist [key] drops it.
        set=Op(mutates=True, clock=True, feature="ttl"),
        set_ttl=Op(mutates=True, clock=True, feature="ttl"),
        ttl=Op(feature="ttl"),
        persist=Op(mutates=True, feature="ttl"),
        # renew [owner, token]: extends the deadlines of the owner's ephemeral keys (the
        # client's lease keeper sends it, as it does to locks).
        renew=Op(mutates=True, clock=True, feature="ttl", unwatched=True),
    ),
    "list": _ops(
        "__contains__ __getitem__ __len__ copy count getslice index",
        "__delitem__ __setitem__ append clear delslice extend imul insert pop remove reverse "
        "setslice sort",
        **_WATCH,
    ),
    "namespace": _ops("getattr hasattr to_dict", "delattr incr setattr update", **_WATCH),
    "queue": _ops(
        "empty full maxsize qsize unfinished",
        "get_nowait put_nowait task_done",
        # put [item, block, timeout], get [block, timeout]: they consume or add an item.
        put=Op(mutates=True, blocks=True, wait_arg=2, block_arg=1),
        get=Op(mutates=True, blocks=True, wait_arg=1, block_arg=0, fenced=True),
        # join []: waits for ever until every task is done, and changes nothing.
        join=Op(blocks=True),
        **_WATCH,
    ),
    "lock": _LOCK,
    "rlock": _RLOCK,
    "semaphore": _SEMAPHORE,
    "bounded_semaphore": _SEMAPHORE,
    "event": _ops("is_set", "clear set", wait=Op(blocks=True, wait_arg=0)),
    "condition": _ops(
        "locked status",
        "notify release renew wait_begin",
        acquire=_ACQUIRE,
        # wait_end [owner, wait_id, count, timeout, lease]; reacquire waits for the lock.
        wait_end=Op(mutates=True, blocks=True, wait_arg=3),
        reacquire=Op(mutates=True, blocks=True),
    ),
    "barrier": _ops("info", "abort arrive reset timed_out", await_trip=Op(blocks=True, wait_arg=1)),
    "value": _ops("get typecode", "incr set"),
    "array": _ops("__getitem__ __len__ getslice tolist typecode", "__setitem__ setslice"),
}
"""Operations of each container kind, by kind name then method name."""

SERVER: Final[Mapping[str, Op]] = _ops(
    "describe dump get_methods names number_of_objects ping slowlog stats",
    "drop restore restore_part",
    # A dump in pieces: a cursor of the connection's own (dump_open, dump_next, dump_close).
    dump_open=Op(session=True),
    dump_next=Op(session=True),
    dump_close=Op(session=True),
    compact=Op(mutates=True, logged=False),
    create=Op(mutates=True, own_policy=True, idempotent=True),
    batch=Op(mutates=True, own_policy=True),
)
"""Server-level operations (requests whose ``ident`` is nil)."""

PARTED_KINDS: Final = frozenset({"dict", "list"})
"""Kinds whose state a dump or a restore may carry in several parts (a dict's or list's items;
``kvserve`` containers with ``extend_state``)."""

STDLIB_NOOPS: Final = frozenset({"dummy", "incref", "decref", "accept_connection"})
"""Server-level calls a stdlib ``BaseManager`` client makes, answered None and ignored."""


def register_kind(kind: str, ops: Mapping[str, Op]) -> None:
    """Add (or replace) the operations of a container kind beyond the built-in ones.

    Register before the first call on that kind: clients and servers cache what they derive.
    """
    KINDS[kind] = MappingProxyType(dict(ops))


def unsupported(kind: str, method: str, backend: str) -> str | None:
    """Return the NotSupportedError message for ``kind.method`` on a backend without it.

    None: a core operation (no ``feature``), which every backend must offer.

    Args:
        kind: the container kind.
        method: the operation.
        backend: the backend's name, for the message ("the Valkey/Redis Cluster backend").
    """
    found = op(kind, method)
    if found is None or not found.feature:
        return None
    return (
        f"{kind}.{method} needs {found.feature!r}, which {backend} does not offer; "
        "see the guarantees table in the README"
    )


def op(kind: str | None, method: str) -> Op | None:
    """Return what ``method`` is on ``kind`` (None: a server-level call), or None if unknown."""
    table = SERVER if kind is None else KINDS.get(kind)
    return None if table is None else table.get(method)


def exposed(kind: str) -> frozenset[str]:
    """Return the methods the wire may call on ``kind``.

    Raises:
        KeyError: no such kind.
    """
    return frozenset(KINDS[kind])


def mutating(kind: str) -> frozenset[str]:
    """Return the methods of ``kind`` that mutate (see the module docstring).

    Raises:
        KeyError: no such kind.
    """
    return frozenset(name for name, o in KINDS[kind].items() if o.mutates)


def caller_methods(kind: str) -> frozenset[str]:
    """Return the methods of ``kind`` the server passes ``caller=`` to.

    Raises:
        KeyError: no such kind.
    """
    return frozenset(name for name, o in KINDS[kind].items() if o.caller)
