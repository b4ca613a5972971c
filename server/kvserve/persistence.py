r"""Durability: an append-only log of mutations, snapshots, compaction, crash recovery.

Nothing here knows about sockets. The serving loop calls :meth:`Persistence.append` for every
mutation it has applied, and :meth:`Persistence.flush` once per loop iteration *before* it
releases any reply, so no client is ever told "done" about a write the log does not hold.

Guarantees, by ``fsync`` policy (the same promises Redis makes for its append-only file)
------------------------------------------------------------------------------------------
``always``
    A reply is released only after the log is fsynced. Group commit: every request handled in
    the same loop iteration shares one ``fdatasync``.
``everysec`` (default)
    The log is written to the OS before any reply is released, and fsynced by a background
    thread about once a second. A process crash (``kill -9``) loses nothing acknowledged; a
    power failure or kernel crash loses at most about one second.
``no``
    Written to the OS before replies, never fsynced by kvserve: the OS flushes when it likes
    (typically within 30 s on Linux). A power failure can lose that much.

Files in the data directory (format version 1)
----------------------------------------------
``LOCK``
    Held with ``flock`` while a server runs; holds its pid. A second server fails clearly.
``snapshot.kvs``
    Header then records. Written as ``snapshot.kvs.tmp``, fsynced, renamed over the old one,
    and the directory fsynced, so a crash leaves either the old or the new snapshot.
``log.<seq>.kvl``
    Header then records: the mutations after the snapshot, in the order they were applied.
    ``<seq>`` is a zero-padded, increasing segment number.

Every file starts with a 16-byte header::

    magic (8 bytes: b"KVSNAP\0\0" or b"KVLOG\0\0\0") | format version (u32 BE) | reserved (u32)

and continues with records::

    +------------------+-----------------+------------------------------+
    | length: u32 BE   | crc32: u32 BE   | payload: msgpack, `length` B |
    +------------------+-----------------+------------------------------+

Snapshot payloads: first ``{"log_seq": N, "containers": count}`` (the first log segment *not*
covered), then ``[name, kind, state, part]`` records: a dict or list is written in parts of
10,000 items (part 0 builds it, later parts extend it), anything else in one. Log payloads are
the requests that mutated state, ``[name, method, args, kwds]`` (plus the request id when the
call had one), or ``[None, "create", [kind, name, *args], {}]`` / ``[None, "drop", [name], {}]``,
and what the clock changed (expired leases) as journaled calls. Replaying them in order against
the snapshot rebuilds the state: every container operation is deterministic given the state it
runs on.

Recovery
--------
A torn last record (a crash in the middle of a write: short or failing CRC, with nothing valid
after it) is truncated away with a warning. Damage anywhere else (a bad CRC followed by more
data, an unreadable snapshot) refuses to start, naming the file and offset, unless ``repair``
is set: then everything before the damage is kept and the damaged file is moved aside to
``<name>.damaged-<time>`` (never deleted).

Compaction
----------
When the log outgrows ``compact_at`` bytes (and the last snapshot's size), or on demand, the
loop rotates to a new log segment and takes a shallow copy of every container (stored values
are never mutated in place, only replaced, so a shallow copy is a consistent point-in-time
view); a background thread writes the snapshot from that copy and then deletes the segments it
covers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from kvclient.codec import Codec
from kvclient.errors import KVError, RemoteError
from kvserve.containers import Container
from kvserve.store import Store

__all__ = [
    "FORMAT_VERSION",
    "FsyncPolicy",
    "LoadReport",
    "Persistence",
    "PersistenceError",
    "dump_state",
    "restore_state",
]

log = logging.getLogger("kvserve")

FORMAT_VERSION: Final = 1
FsyncPolicy = Literal["always", "everysec", "no"]
AnswerHook = Callable[[bytes, int, str, Any], None]
_RETURN: Final = "#RETURN"
_ERROR: Final = "#ERROR"
_REPLY_LOST: Final = (
    "this batch was applied just before the server restarted and its reply was lost; "
    "read the data to see its effect"
)
_SNAP_MAGIC: Final = b"KVSNAP\0\0"
_LOG_MAGIC: Final = b"KVLOG\0\0\0"
_FILE_HEADER: Final = struct.Struct(">8sII")
_RECORD_HEADER: Final = struct.Struct(">II")
_SNAPSHOT: Final = "snapshot.kvs"
_SNAPSHOT_PART: Final = 10_000  # items per snapshot record of a large dict or list
_LOCK: Final = "LOCK"


class PersistenceError(KVError):
    """The data directory cannot be used: locked, damaged, or of an unknown format."""


@dataclass
class LoadReport:
    """What start-up found and did."""

    containers: int = 0
    snapshot_records: int = 0
    log_records: int = 0
    truncated_bytes: int = 0
    seconds: float = 0.0


def _frame(codec: Codec, payload: Any) -> bytes:
    data = codec.pack(payload)
    return _RECORD_HEADER.pack(len(data), zlib.crc32(data)) + data


def _header(magic: bytes) -> bytes:
    return _FILE_HEADER.pack(magic, FORMAT_VERSION, 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _StopReplay(Exception):  # an internal signal
    pass


class _Damage(Exception):  # an internal signal, always converted
    def __init__(self, offset: int, reason: str, torn_tail: bool) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        self.torn_tail = torn_tail


def _read_records(data: bytes, magic: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)``; raise _Damage at the first bad record."""
    if len(data) < _FILE_HEADER.size:
        raise _Damage(0, "file shorter than its header", torn_tail=True)
    got_magic, version, _ = _FILE_HEADER.unpack_from(data)
    if got_magic != magic:
        raise PersistenceError(f"{path} is not a kvserve file (bad magic at offset 0)")
    if version != FORMAT_VERSION:
        raise PersistenceError(
            f"{path} has format version {version}; this kvserve reads version "
            f"{FORMAT_VERSION}. Use a matching kvserve, or `kvctl dump` with the old one"
        )
    pos = _FILE_HEADER.size
    end = len(data)
    while pos < end:
        if end - pos < _RECORD_HEADER.size:
            raise _Damage(pos, "truncated record header", torn_tail=True)
        size, crc = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        if start + size > end:
            raise _Damage(pos, "record runs past the end of the file", torn_tail=True)
        payload = data[start : start + size]
        if zlib.crc32(payload) != crc:
            raise _Damage(pos, "CRC mismatch", torn_tail=start + size == end)
        yield pos, payload
        pos = start + size


def dump_state(store: Store) -> dict[str, Any]:
    """Return a point-in-time copy of every container, as ``kvctl dump`` writes it."""
    return {
        "format": FORMAT_VERSION,
        "containers": [[name, obj.kind, obj.state()] for name, obj in _shallow_copy(store)],
    }


def restore_state(store: Store, dump: Any) -> int:
    """Load a :func:`dump_state` copy into an empty store; return the number of containers.

    Raises:
        ValueError: the store is not empty, or the dump is malformed or of another format.
    """
    if not isinstance(dump, dict) or dump.get("format") != FORMAT_VERSION:
        raise ValueError(f"not a kvmanager dump of format version {FORMAT_VERSION}")
    if store.objects:
        raise ValueError("restore needs an empty server; drop every container first")
    containers = dump.get("containers")
    if not isinstance(containers, list):
        raise ValueError("malformed dump: 'containers' must be a list")
    built: dict[str, Container] = {}
    for entry in containers:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise ValueError(f"malformed dump entry: {entry!r:.80}")
        name, kind, state = entry
        built[name] = store.kind_class(kind).from_state(state)
    for name, obj in built.items():
        store.install(name, obj)
    return len(built)


def _shallow_copy(store: Store) -> list[tuple[str, Container]]:
    with store.lock:
        items = list(store.objects.items())
    copies = []
    for name, obj in items:
        with obj.lock:
            copies.append((name, obj.copy_container()))
    return copies


class Persistence:
    """The data directory of one server.

    Args:
        data_dir: directory to keep the snapshot and log in (created if missing).
        fsync: ``"always"``, ``"everysec"`` (default) or ``"no"``; see the module docstring.
        compact_at: log size in bytes that triggers background compaction (default 64 MiB;
            the log must also have outgrown the last snapshot).
        repair: keep what precedes damage instead of refusing to start.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: FsyncPolicy = "everysec",
        compact_at: int = 64 * 1024 * 1024,
        *,
        repair: bool = False,
    ) -> None:
        if fsync not in ("always", "everysec", "no"):
            raise ValueError(f"fsync must be always, everysec or no, not {fsync!r}")
        self.dir = Path(data_dir)
        self.fsync = fsync
        self.compact_at = compact_at
        self.repair = repair
        self._codec = Codec()
        self._buffer = bytearray()
        self._fd = -1
        self._seq = 0
        self._log_bytes = 0
        self._snapshot_bytes = 0
        self._lock_fd = -1
        self._fd_lock = threading.Lock()  # the fd may be swapped while the fsync thread runs
        self._dirty = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._compactor: threading.Thread | None = None
        self.compactions = 0
        self.last_error: str | None = None
        self.last_sync_seconds = 0.0  # duration of the last fdatasync under "always"

    # -- start-up ------------------------------------------------------------------------

    def open(self, store: Store, on_answer: AnswerHook | None = None) -> LoadReport:
        """Lock the directory, load the snapshot, replay the log, and open a new segment.

        Args:
            store: the empty store to fill.
            on_answer: called ``(token, seq, kind, value)`` for each replayed call that carried
                a request id, so the server can still recognise a retry of it.

        Raises:
            PersistenceError: locked by another server, damaged (without ``repair``), or
                of an unknown format version.
        """
        started = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        report = LoadReport()
        try:
            log_seq = self._load_snapshot(store, report)
            segments = self._segments()
            stopped = False
            for seq, path in segments:
                if seq < log_seq:
                    path.unlink()  # covered by the snapshot; a crash before deletion left it
                elif stopped:
                    # Repair keeps only what precedes the damage: later segments would apply
                    # on top of a gap. Keep them aside for a human to look at.
                    aside = path.with_name(f"{path.name}.after-damage-{int(time.time())}")
                    os.replace(path, aside)
                    log.warning("repair: moved %s aside to %s", path, aside)
                else:
                    try:
                        self._replay(store, path, report, on_answer, last=seq == segments[-1][0])
                    except _StopReplay:
                        stopped = True
            self._seq = max([log_seq, *(s for s, _ in segments)])
            self._open_segment(self._seq + (1 if segments else 0))
        except BaseException:
            self._release_lock()
            raise
        report.containers = len(store.objects)
        report.seconds = time.monotonic() - started
        if self.fsync == "everysec":
            self._syncer = threading.Thread(
                target=self._sync_loop, name="kvserve-fsync", daemon=True
            )
            self._syncer.start()
        return report

    def _take_lock(self) -> None:
        path = self.dir / _LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise PersistenceError(
                f"data directory {self.dir} is in use by another kvserve (pid {holder}); "
                "stop it or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = -1

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.dir.glob("log.*.kvl"):
            try:
                found.append((int(path.name.split(".")[1]), path))
            except ValueError:
                continue
        return sorted(found)

    def _damaged(self, path: Path, damage: _Damage) -> None:
        if not self.repair:
            raise PersistenceError(
                f"{path} is damaged at offset {damage.offset} ({damage.reason}); start with "
                "--repair to keep everything before that offset (the file is moved aside, "
                "not deleted)"
            )
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        os.replace(path, aside)
        log.warning(
            "repair: %s damaged at offset %d (%s); kept what precedes it, moved the file to %s",
            path,
            damage.offset,
            damage.reason,
            aside,
        )

    def _load_snapshot(self, store: Store, report: LoadReport) -> int:
        path = self.dir / _SNAPSHOT
        if not path.exists():
            return 0
        data = path.read_bytes()
        self._snapshot_bytes = len(data)
        log_seq = 0
        built: list[tuple[str, Container]] = []
        try:
            for index, (_, payload) in enumerate(_read_records(data, _SNAP_MAGIC, path)):
                record = self._codec.unpack(payload)
                if index == 0:
                    log_seq = int(record["log_seq"])
                    continue
                name, kind, state = record[:3]
                if len(record) == 4 and record[3] > 0:
                    built[-1][1].extend_state(state)  # the next part of the same container
                else:
                    built.append((name, store.kind_class(kind).from_state(state)))
                report.snapshot_records += 1
        except _Damage as damage:
            # A snapshot is renamed into place complete, so any damage is real corruption.
            damage.torn_tail = False
            self._damaged(path, damage)
        for name, obj in built:
            store.install(name, obj)
        return log_seq

    def _replay(
        self,
        store: Store,
        path: Path,
        report: LoadReport,
        on_answer: AnswerHook | None,
        *,
        last: bool,
    ) -> None:
        data = path.read_bytes()
        try:
            for _, payload in _read_records(data, _LOG_MAGIC, path):
                record = self._codec.unpack(payload)
                kind, value = apply_record(store, record)
                report.log_records += 1
                if on_answer is not None and len(record) == 5:
                    rid = record[4]
                    if len(rid) == 3:  # a call inside a batch: the batch's answer is not logged
                        kind, value = _ERROR, RemoteError("ReplyLost", _REPLY_LOST)
                    on_answer(rid[0], rid[1], kind, value)
        except _Damage as damage:
            if damage.torn_tail and last:
                log.warning(
                    "%s: torn record at offset %d (%s), from a crash mid-write; truncating %d "
                    "bytes",
                    path,
                    damage.offset,
                    damage.reason,
                    len(data) - damage.offset,
                )
                report.truncated_bytes += len(data) - damage.offset
                with path.open("r+b") as fh:
                    fh.truncate(max(damage.offset, _FILE_HEADER.size))
                    if damage.offset < _FILE_HEADER.size:
                        fh.seek(0)
                        fh.write(_header(_LOG_MAGIC))
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                self._damaged(path, damage)
                raise _StopReplay from None

    def _open_segment(self, seq: int) -> None:
        path = self.dir / f"log.{seq:010d}.kvl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if os.fstat(fd).st_size == 0:
            os.write(fd, _header(_LOG_MAGIC))
            os.fsync(fd)
            _fsync_dir(self.dir)
        with self._fd_lock:
            old, self._fd = self._fd, fd
            self._seq = seq
        if old >= 0:
            os.fsync(old)
            os.close(old)

    # -- the write path ------------------------------------------------------------------

    def append(self, record: list[Any]) -> None:
        """Queue one applied mutation; it reaches the OS at the next :meth:`flush`."""
        self._buffer += _frame(self._codec, record)

    def append_encoded(self, payload: bytes | memoryview) -> None:
        """Queue one applied mutation given as its msgpack encoding (a request as received)."""
        self._buffer += _RECORD_HEADER.pack(len(payload), zlib.crc32(payload))
        self._buffer += payload

    @property
    def pending(self) -> bool:
        """True when appended records have not been flushed yet."""
        return bool(self._buffer)

    def flush(self) -> None:
        """Write queued records to the OS (and fsync them under ``always``)."""
        if not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._log_bytes += len(data)
        if self.fsync == "always":
            started = time.monotonic()
            os.fdatasync(self._fd)
            self.last_sync_seconds = time.monotonic() - started
        else:
            self._dirty = True

    def _sync_loop(self) -> None:
        while not self._stop.wait(1.0):
            if not self._dirty:
                continue
            self._dirty = False
            with self._fd_lock:
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:  # surfaced by stats; the loop keeps serving
                    self.last_error = f"fsync failed: {exc}"
                    log.error("fsync of the log failed: %s", exc)

    # -- compaction ----------------------------------------------------------------------

    def should_compact(self) -> bool:
        """True when the log has grown past ``compact_at`` and past the last snapshot."""
        return (
            self._compactor is None
            and self._log_bytes >= self.compact_at
            and self._log_bytes >= self._snapshot_bytes
        )

    @property
    def compacting(self) -> bool:
        """True while a background snapshot is being written."""
        return self._compactor is not None and self._compactor.is_alive()

    def compact(self, store: Store) -> bool:
        """Start a background snapshot of ``store``; False if one is already running.

        Call from the serving loop: the rotation and the copy happen here, atomically with
        respect to mutations; only the writing happens in the background.
        """
        if self.compacting:
            return False
        self.flush()
        covered = self._seq + 1
        self._open_segment(covered)
        self._log_bytes = 0
        copies = _shallow_copy(store)
        self._compactor = threading.Thread(
            target=self._write_snapshot, args=(copies, covered), name="kvserve-compact", daemon=True
        )
        self._compactor.start()
        return True

    def _write_snapshot(self, copies: list[tuple[str, Container]], covered: int) -> None:
        codec = Codec()
        tmp = self.dir / (_SNAPSHOT + ".tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(_header(_SNAP_MAGIC))
                fh.write(_frame(codec, {"log_seq": covered, "containers": len(copies)}))
                for name, obj in copies:
                    # In parts: one huge packb would hold the GIL, and stall the serving loop,
                    # for half a second per million keys.
                    for part, chunk in enumerate(obj.state_parts(_SNAPSHOT_PART)):
                        fh.write(_frame(codec, [name, obj.kind, chunk, part]))
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            os.replace(tmp, self.dir / _SNAPSHOT)
            _fsync_dir(self.dir)
            self._snapshot_bytes = size
            for seq, path in self._segments():
                if seq < covered:
                    path.unlink()
            self.compactions += 1
            log.info("compaction done: snapshot of %d containers, %d bytes", len(copies), size)
        except Exception as exc:  # the log still holds everything; report and keep serving
            self.last_error = f"compaction failed: {exc}"
            log.error("compaction failed (the log still holds every write): %s", exc)

    def wait_compaction(self, timeout: float | None = None) -> None:
        """Block until a running compaction finishes (tests, shutdown)."""
        if self._compactor is not None:
            self._compactor.join(timeout)

    def disk_bytes(self) -> int:
        """Total size of the snapshot and log files, bytes."""
        total = 0
        for path in self.dir.iterdir():
            if path.suffix in (".kvs", ".kvl"):
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    pass  # a segment the compaction thread just deleted
        return total

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and fsync the log, stop background threads, release the directory."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(5)
        self.wait_compaction()
        if self._fd >= 0:
            self.flush()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._release_lock()


def apply_record(store: Store, record: Any) -> tuple[str, Any]:
    """Re-apply one logged mutation to ``store`` (start-up replay); return its answer."""
    ident, method, args, kwds = record[:4]
    try:
        if ident is None:
            if method == "create":
                store.create(*args, **(kwds or {}))
                return _RETURN, [args[1], sorted(store.exposed[args[1]])]
            if method == "drop":
                return _RETURN, store.drop(*args)
            if method == "restore":
                return _RETURN, restore_state(store, args[0])
            return _RETURN, None
        obj = store.get(ident)
        return _RETURN, getattr(obj, method)(*args, **(kwds or {}))
    except Exception as exc:  # the same error the original call answered with
        return _ERROR, exc
