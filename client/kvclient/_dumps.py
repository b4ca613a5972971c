"""Dump and restore as conversations of small calls, written once for every front end.

The server serves a dump in pieces through a cursor and takes a restore in pieces
(``dump_open``/``dump_next``/``dump_close`` and ``restore_part``; the server side is
``kvserve.dumps``), so neither is limited by ``--max-frame`` nor freezes other clients. The
flows here (:data:`kvclient._runner.Flow` generators, no I/O) are driven by the sync client
with :func:`~kvclient._runner.run_sync` and by the asyncio client with ``await``.

A dump is a msgpack (or tagged JSON) document ``{"format": 1, "containers": [[name, kind,
state], ...]}``; :class:`MsgpackDumpWriter` writes exactly the bytes that encoding the whole
dict at once would, a piece at a time, from the counts the server sends ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import msgpack

from kvclient._runner import Call, Flow
from kvproto.limits import rough_size
from kvproto.schema import PARTED_KINDS

__all__ = [
    "PIECE_BYTES",
    "PIECE_ITEMS",
    "Collector",
    "MsgpackDumpWriter",
    "OpenSink",
    "Record",
    "dump_flow",
    "restore_flow",
]

PIECE_ITEMS: Final = 4096
"""Items in one ``restore_part`` request, at most."""
PIECE_BYTES: Final = 512 * 1024
"""Rough bytes of one ``restore_part`` request (str and bytes by length)."""

Record = list[Any]
"""``[name, kind, state, part, total]`` as ``dump_next`` sends it (see ``kvserve.dumps``)."""
OpenSink = Callable[[dict[str, Any]], Callable[[Record], None]]
"""Called with a dump's header; returns what each of its records is passed to."""


def dump_flow(open_sink: OpenSink) -> Flow[dict[str, Any]]:
    """Read a dump piece by piece; return what was read.

    ``open_sink`` is called once with the dump's header (``{"format": 1, "containers":
    count, "items": count}``, what the server announces) and returns the function each record
    is passed to. Returns the header with ``records`` and ``items`` as read. The cursor is
    closed on the server if anything fails (the sink raising included).
    """
    header: dict[str, Any] = yield Call(None, None, "dump_open", [])
    cursor = header.pop("cursor")
    records = items = 0
    try:
        sink = open_sink(dict(header))
        while True:
            piece = yield Call(None, None, "dump_next", [cursor])
            if piece is None:
                break
            for record in piece:
                sink(record)
                records += 1
                items += 1 if record[4] is None else len(record[2])
    except BaseException:
        try:
            yield Call(None, None, "dump_close", [cursor])
        except Exception:  # noqa: S110 - the connection is gone, and the cursor with it
            pass
        raise
    header.update(records=records, items=items)
    return header


class Collector:
    """Assemble a dump's records into the dump document (what :meth:`Client.dump` returns)."""

    def __init__(self) -> None:
        self.containers: list[list[Any]] = []

    def open(self, header: dict[str, Any]) -> Collector:
        """Be the sink of a dump (see :func:`dump_flow`)."""
        return self

    def __call__(self, record: Record) -> None:
        """Add one record from ``dump_next``."""
        name, kind, state, part, _total = record
        if part == 0:
            self.containers.append([name, kind, state])
        elif type(state) is dict:
            self.containers[-1][2].update(state)
        else:
            self.containers[-1][2].extend(state)

    def document(self, fmt: int) -> dict[str, Any]:
        """Return the whole dump."""
        return {"format": fmt, "containers": self.containers}


class MsgpackDumpWriter:
    """Write a dump's records to a binary file as one msgpack document, a piece at a time.

    Args:
        write: where the bytes go (a binary file's ``write``).
        pack: the client's encoder (proxies become refs).
        header: what ``dump_open`` said (``format`` and ``containers``).
    """

    def __init__(
        self, write: Callable[[bytes], Any], pack: Callable[[Any], bytes], header: dict[str, Any]
    ) -> None:
        self._out = write
        self._pack = pack
        self._headers = msgpack.Packer()
        self.written = 0
        self._write(self._headers.pack_map_header(2))
        self._write(pack("format") + pack(header["format"]) + pack("containers"))
        self._write(self._headers.pack_array_header(header["containers"]))

    def _write(self, data: bytes) -> None:
        self._out(data)
        self.written += len(data)

    def __call__(self, record: Record) -> None:
        """Write one record from ``dump_next``."""
        name, kind, state, part, total = record
        if part == 0:
            self._write(self._headers.pack_array_header(3) + self._pack(name) + self._pack(kind))
            if total is None:
                self._write(self._pack(state))
                return
            opening = self._headers.pack_map_header if type(state) is dict else None
            if opening is None:
                opening = self._headers.pack_array_header
            self._write(opening(total))
        # The part's items without the part's own header: the whole state's header is above.
        encoded = self._pack(state)
        if type(state) is dict:
            skip = len(self._headers.pack_map_header(len(state)))
        else:
            skip = len(self._headers.pack_array_header(len(state)))
        self._write(encoded[skip:])


def restore_records(containers: Iterable[Any]) -> Iterator[list[Record]]:
    """Yield ``restore_part`` pieces (``[name, kind, state, part]`` records) of a dump."""
    piece: list[Record] = []
    items = size = 0
    for entry in containers:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise ValueError(f"malformed dump entry: {str(entry)[:80]}")
        name, kind, state = entry
        if kind in PARTED_KINDS and (type(state) is dict or type(state) is list):
            is_dict = type(state) is dict
            values: list[Any] = list(state.items()) if isinstance(state, dict) else state
            start = part = 0
            while part == 0 or start < len(values):
                end = start
                while end < len(values) and items < PIECE_ITEMS and size < PIECE_BYTES:
                    item = values[end]
                    size += rough_size(item[1] if is_dict else item) + 8
                    items += 1
                    end += 1
                chunk = values[start:end]
                piece.append([name, kind, dict(chunk) if is_dict else chunk, part])
                part += 1
                start = end
                if items >= PIECE_ITEMS or size >= PIECE_BYTES:
                    yield piece
                    piece, items, size = [], 0, 0
        else:
            piece.append([name, kind, state, 0])
            items += 1
            size += rough_size(state)
            if items >= PIECE_ITEMS or size >= PIECE_BYTES:
                yield piece
                piece, items, size = [], 0, 0
    if piece:
        yield piece


def restore_flow(
    dump: Any, pack: Callable[[Any], bytes], on_piece: Callable[[int], None] | None = None
) -> Flow[int]:
    """Send ``dump`` in ``restore_part`` pieces; return the number of containers made.

    ``on_piece`` is called with the number of items of each piece the server took.

    Each piece goes encoded (``pack``), as bytes: inside the request's own arrays the
    deepest stored values would nest past the request depth limit.

    Raises:
        ValueError: ``dump`` is not a kvmanager dump, or the server is not empty.
    """
    if not isinstance(dump, dict) or dump.get("format") != 1:
        raise ValueError("not a kvmanager dump of format version 1")
    containers = dump.get("containers")
    if not isinstance(containers, list):
        raise ValueError("malformed dump: 'containers' must be a list")
    count = 0
    first = True
    for piece in restore_records(containers):
        count += yield Call(None, None, "restore_part", [pack(piece), first])
        first = False
        if on_piece is not None:
            on_piece(sum(len(r[2]) if r[1] in PARTED_KINDS else 1 for r in piece))
    if first:  # an empty dump: still refused by a server that is not empty
        count += yield Call(None, None, "restore_part", [pack([]), True])
    return count
