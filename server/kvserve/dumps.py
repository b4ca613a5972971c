"""Dumps and restores in bounded pieces: what ``kvctl dump``/``restore`` stream over the wire.

A dump or restore of a million keys used to be one request or one reply: larger than
``--max-frame`` for a restore (refused), and, for a dump, one shallow copy plus one reply that
the loop encoded a slice at a time but which the client could only take whole. Here both are
a conversation of small calls, each answered in one loop turn of bounded cost, so other
connections are served between them and no frame has to hold the whole data set:

- ``dump_open()`` takes the point-in-time shallow copy of every container (O(containers) plus
  a C-speed copy of each dict and list, the same copy a compaction takes) and returns
  ``{"format": DUMP_FORMAT, "containers": count, "items": count, "cursor": id}`` (items:
  of every dict and list, plus one per other container);
- ``dump_next(cursor)`` returns the next piece, a list of records
  ``[name, kind, state, part, total]`` (at most :data:`PIECE_ITEMS` items and roughly
  :data:`PIECE_BYTES` bytes), or None at the end (the cursor is then closed);
  ``part`` counts the records of one container from 0, ``total`` is the length of a dict's
  or list's whole state (None for the other kinds, which always come in one record);
- ``dump_close(cursor)`` drops a cursor early;
- ``restore_part(records, first)`` applies records ``[name, kind, state, part]`` (the
  snapshot's record shape, sent msgpack-encoded as bytes): part 0 builds a container that
  must not exist yet, later parts extend it; ``first`` says the server must be empty. Each
  call checks all its records before it changes anything, and is logged as it is, so a
  replay applies exactly the same pieces.

Cursors belong to the connection that opened them (closed with it), at most
:data:`CURSORS_PER_SESSION` per connection and :data:`MAX_CURSORS` in all; past that, the
least recently read one is dropped and its next ``dump_next`` says so. A cursor holds its
shallow copies: memory about one pointer per stored item, the values themselves shared.

A restore is applied piece by piece: other clients can see its containers appear, and one
that fails half-way leaves what it restored so far (drop it and restore again).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any, Final

from kvproto.codec import Codec
from kvproto.errors import NoSuchContainerError, ProtocolError
from kvproto.limits import rough_size
from kvproto.wire import MAX_NAME
from kvserve.containers import Container
from kvserve.store import Store

__all__ = [
    "CURSORS_PER_SESSION",
    "DUMP_FORMAT",
    "MAX_CURSORS",
    "PIECE_BYTES",
    "PIECE_ITEMS",
    "Dumps",
    "restore_records",
    "shallow_copy",
]

DUMP_FORMAT: Final = 1  # of a dump's structure, independent of the data directory's format
PIECE_ITEMS: Final = 8192
"""Items in one ``dump_next`` piece, at most (about 3 ms of the loop to gather and encode)."""
PIECE_BYTES: Final = 4 * 1024 * 1024
"""Rough bytes of one piece: str and bytes values counted by length, others by item count."""
CURSORS_PER_SESSION: Final = 4
MAX_CURSORS: Final = 16


def shallow_copy(store: Store) -> list[tuple[str, Container]]:
    """Return a point-in-time copy of every container (stored values are only replaced)."""
    # On the loop thread, the only one that changes containers: a consistent point in time.
    with store.lock:
        items = list(store.objects.items())
    return [(name, obj.copy_container()) for name, obj in items]


def _partable(obj: Container) -> bool:
    # The kinds kvproto.schema.PARTED_KINDS names, and any registered kind that can extend.
    return type(obj).extend_state is not Container.extend_state


def pieces(copies: list[tuple[str, Container]]) -> Iterator[list[list[Any]]]:
    """Yield the records of a dump of ``copies`` in pieces (see the module docstring)."""
    piece: list[list[Any]] = []
    items = size = 0
    for name, obj in copies:
        state = obj.state()
        if not (_partable(obj) and type(state) in (dict, list)):
            piece.append([name, obj.kind, state, 0, None])
            items += 1
            size += rough_size(state)
        else:
            is_dict = type(state) is dict
            source: Iterator[Any] = iter(state.items()) if is_dict else iter(state)
            part = 0
            while True:
                chunk: list[Any] = []
                # Stops when the piece is full (items or bytes) or the state is exhausted.
                for entry in itertools.islice(source, max(1, PIECE_ITEMS - items)):
                    chunk.append(entry)
                    size += rough_size(entry[1] if is_dict else entry) + 8
                    if size >= PIECE_BYTES:
                        break
                if chunk or part == 0:
                    value = dict(chunk) if is_dict else chunk
                    piece.append([name, obj.kind, value, part, len(state)])
                    items += len(chunk)
                    part += 1
                if items < PIECE_ITEMS and size < PIECE_BYTES:
                    break  # exhausted: the piece has room for the next container
                yield piece
                piece, items, size = [], 0, 0
        if items >= PIECE_ITEMS or size >= PIECE_BYTES:
            yield piece
            piece, items, size = [], 0, 0
    if piece:
        yield piece


class Dumps:
    """The dump cursors open on one server, by id (see the module docstring)."""

    def __init__(self) -> None:
        # id -> (session, pieces); ordered least recently read first.
        self._open: collections.OrderedDict[int, tuple[object, Iterator[list[list[Any]]]]] = (
            collections.OrderedDict()
        )
        self._ids = itertools.count(1)
        self.expired: set[int] = set()  # dropped to make room; their reader is told so

    def open(self, session: object, store: Store) -> dict[str, Any]:
        """Start a dump for ``session``; return its header with the cursor id."""
        mine = [cid for cid, (owner, _) in self._open.items() if owner is session]
        if len(mine) >= CURSORS_PER_SESSION:
            raise ValueError(
                f"{CURSORS_PER_SESSION} dumps are already open on this connection; finish one"
            )
        while len(self._open) >= MAX_CURSORS:
            oldest, _ = self._open.popitem(last=False)
            self._expire(oldest)
        copies = shallow_copy(store)
        cursor = next(self._ids)
        self._open[cursor] = (session, pieces(copies))
        items = sum(
            len(state) if _partable(obj) and type(state := obj.state()) in (dict, list) else 1
            for _, obj in copies
        )
        return {"format": DUMP_FORMAT, "containers": len(copies), "items": items, "cursor": cursor}

    def next(self, session: object, cursor: Any) -> list[list[Any]] | None:
        """Return the next piece of ``cursor`` (None at its end, which closes it)."""
        entry = self._open.get(cursor) if type(cursor) is int else None
        if entry is None or entry[0] is not session:
            if cursor in self.expired:
                raise ValueError(
                    f"dump cursor {cursor} was dropped: more than {MAX_CURSORS} dumps were "
                    "open at once; start the dump again"
                )
            raise ValueError(f"no dump cursor {cursor!r} is open on this connection")
        self._open.move_to_end(cursor)
        piece = next(entry[1], None)
        if piece is None:
            del self._open[cursor]
        return piece

    def close(self, session: object, cursor: Any) -> bool:
        """Drop ``cursor`` early; return whether it was open on this connection."""
        entry = self._open.get(cursor) if type(cursor) is int else None
        if entry is None or entry[0] is not session:
            return False
        del self._open[cursor]
        return True

    def forget(self, session: object) -> None:
        """Drop every cursor of a connection that went away."""
        for cursor in [cid for cid, (owner, _) in self._open.items() if owner is session]:
            del self._open[cursor]

    def _expire(self, cursor: int) -> None:
        self.expired.add(cursor)
        if len(self.expired) > 4 * MAX_CURSORS:
            self.expired.discard(min(self.expired))


def restore_records(store: Store, records: Any, first: Any) -> tuple[int, list[str]]:
    """Apply one ``restore_part`` piece; return ``(containers built, their names)``.

    Every record is checked, and every new container built, before anything changes: a bad
    piece changes nothing (and is not logged).

    Raises:
        ValueError: malformed records, a part 0 of a name that exists (or a later part of one
            that does not), or ``first`` with a non-empty server.
    """
    if type(records) is bytes:
        # Sent encoded (kvclient does): decoded with the depth stored data may have, since
        # inside the request's own arrays the deepest stored values would nest too deep.
        try:
            records = Codec(decode_exceptions=False).unpack(records)
        except ProtocolError as exc:
            raise ValueError(f"not a piece of a kvmanager dump ({exc})") from None
    if type(records) is not list or type(first) is not bool:
        raise ValueError("restore_part takes a list of records (or its encoding) and a bool")
    if first and store.objects:
        raise ValueError("restore needs an empty server; drop every container first")
    built: dict[str, Container] = {}
    extend: list[tuple[Container, Any]] = []
    for record in records:
        if not (
            type(record) is list
            and len(record) == 4
            and type(record[0]) is str
            and type(record[1]) is str
            and type(record[3]) is int
            and record[3] >= 0
        ):
            raise ValueError("malformed restore record: expected [name, kind, state, part]")
        name, kind, state, part = record
        if not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"container names are non-empty str of at most {MAX_NAME} chars")
        if part == 0:
            if name in built or name in store.objects:
                raise ValueError(f"restore: a container named {name!r} exists already")
            built[name] = store.kind_class(kind).from_state(state)
            continue
        target = built.get(name) or (store.objects.get(name) if name in store.restoring else None)
        if target is None:
            raise NoSuchContainerError(
                f"restore: part {part} of {name!r} comes before part 0 (of this restore)"
            )
        if target.kind != kind or not _partable(target) or type(state) is not type(target.state()):
            raise ValueError(f"restore: part {part} of {name!r} does not fit a {target.kind}")
        extend.append((target, state))
    for target, state in extend:
        target.extend_state(state)
    if first:
        store.restoring.clear()
    for name, obj in built.items():
        store.install(name, obj)
    store.restoring.update(built)
    return len(built), list(built)
