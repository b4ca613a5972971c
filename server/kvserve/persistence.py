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

A failed write or fsync of the log is fatal and sticky: the calls waiting on it are never
acknowledged, every later :meth:`Persistence.flush` raises, and the server stops with a
non-zero exit status (after a failed fsync the kernel may already have dropped the unwritten
pages, so retrying could acknowledge data that is not on disk; PostgreSQL made the same choice).
A failed *compaction* (a full disk while writing the snapshot) is not fatal: the log still holds
every write, the failure is logged once and shown in ``stats``, and automatic compaction backs
off before it tries again.

Files in the data directory (format version 2; version 1 files are still read)
------------------------------------------------------------------------------
The directory is kept mode 0700 and every file in it 0600.

``LOCK``
    Held with ``flock`` while a server runs; holds its pid. A second server fails clearly.
``snapshot.kvs``
    Header, records, then a trailer record. Written as ``snapshot.kvs.tmp``, fsynced, renamed
    over the old one, and the directory fsynced, so a crash leaves either the old or the new
    snapshot.
``log.<seq>.kvl``
    Header then records: the mutations after the snapshot, in the order they were applied.
    ``<seq>`` is a zero-padded, increasing segment number; every start and every compaction
    opens a new segment, so only the newest segment is ever appended to.

Every file starts with a 16-byte header::

    magic (8 bytes: b"KVSNAP\0\0" or b"KVLOG\0\0\0") | format version (u32 BE) | reserved (u32)

and continues with records (version 2)::

    +----------------+-----------------+-----------------------+-----------------------------+
    | length: u32 BE | crc32: u32 BE   | header crc32: u32 BE  | payload: msgpack, `length` B |
    |                | (of the payload)| (of the first 8 bytes)|                             |
    +----------------+-----------------+-----------------------+-----------------------------+

Version 1 records lack the header CRC (an 8-byte header). The header CRC is what lets start-up
tell a torn append from damage: without it, one flipped bit in a length field makes a record
look as if it ran past the end of the file, exactly like a write cut short.

Snapshot payloads: first ``{"log_seq": N, "containers": count}`` (the first log segment *not*
covered), then ``[name, kind, state, part]`` records: a dict or list is written in parts of
10,000 items (part 0 builds it, later parts extend it), anything else in one; part 0 of a
watchable container has a fifth item, a map (``history``: revision and changes, see
:mod:`kvserve.history`; ``ttl``: a dict's ``[key, deadline]`` pairs, wall-clock); last
(version 2) the trailer ``{"end": records, "containers": count}``, the number of records
before it. A snapshot without its trailer, with anything after it, or whose counts disagree is
damaged. Log payloads are the requests that mutated state, ``[name, method, args, kwds]``
(plus the request id when the call had one), or ``[None, "create", [kind, name, *args], {}]`` /
``[None, "drop", [name], {}]``, and what the clock changed (expired leases) as journaled calls.
Replaying them in order against the snapshot rebuilds the state: every container operation is
deterministic given the state it runs on.

Recovery
--------
A snapshot is read and checked whole (every record's CRC, the trailer's counts) before anything
from it is used. Only a *provably torn* final write in the newest log segment is dropped
automatically, by truncating it with a warning. A record is torn when the file ends inside it
and nothing after its start could be anything else:

- fewer bytes remain than a record header (or than the file header, for a new segment);
- its header is intact (version 2: the header CRC matches; version 1: no valid record can be
  parsed at any later offset) and its length runs past the end of the file; or
- every byte from its start to the end of the file is zero (space the file system allocated
  but the crash never filled).

Anything else (a bad header CRC, a bad payload CRC, a length that fits but is wrong, damage in
any segment but the newest, any damage in a snapshot) refuses to start with a
:class:`PersistenceError` naming the file and the offset. With ``repair`` set, start-up keeps
everything before the first damage instead: it writes a fresh snapshot of what it kept, moves the
damaged file to ``<name>.damaged-<time>`` and later log segments to
``<name>.after-damage-<time>`` (the bytes are never truncated in place or deleted), and then
starts. A power failure can also leave a last record whose header reached the disk but whose
payload did not (the file system extended the file over stale or zeroed blocks); that shows as
damage and needs ``repair``, which then loses only that record. A ``snapshot.kvs.tmp`` left by
a crash during compaction is never read; start-up deletes it.

Compaction
----------
When the log outgrows ``compact_at`` bytes (and the last snapshot's size), or on demand, the
loop rotates to a new log segment and takes a shallow copy of every container (stored values
are never mutated in place, only replaced, so a shallow copy is a consistent point-in-time
view); a background thread writes the snapshot from that copy and then deletes the segments it
covers. Automatic compaction fires every time the log grows past the threshold again; after a
failure it waits (10 s, doubling per consecutive failure, at most an hour) before the next
automatic try.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import reprlib
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from kvproto import schema
from kvproto.codec import Codec
from kvproto.errors import KVError, ProtocolError, RemoteError
from kvproto.wire import ERROR, RETURN
from kvserve.containers import Container
from kvserve.counters import Histogram
from kvserve.dumps import DUMP_FORMAT, restore_records, shallow_copy
from kvserve.store import Store

__all__ = [
    "DUMP_FORMAT",
    "FORMAT_VERSION",
    "FsyncPolicy",
    "LoadReport",
    "Persistence",
    "PersistenceError",
    "dump_state",
    "restore_state",
]

log = logging.getLogger("kvserve")

FORMAT_VERSION: Final = 2  # of the files in the data directory; version 1 is still read
FsyncPolicy = Literal["always", "everysec", "no"]
AnswerHook = Callable[[bytes, int, str, Any], None]
_ANSWER_LOST: Final = (
    "this call was applied before the server compacted its log and restarted, and its reply "
    "was lost; read the data to see its effect"
)
_REPLY_LOST: Final = (
    "this batch was applied just before the server restarted and its reply was lost; "
    "read the data to see its effect"
)
_SNAP_MAGIC: Final = b"KVSNAP\0\0"
_LOG_MAGIC: Final = b"KVLOG\0\0\0"
_FILE_HEADER: Final = struct.Struct(">8sII")
_RECORD_HEADER_V1: Final = struct.Struct(">II")  # length, payload crc32
_RECORD_HEADER: Final = struct.Struct(">III")  # length, payload crc32, crc32 of those 8 bytes
_SNAPSHOT: Final = "snapshot.kvs"
_SNAPSHOT_PART: Final = 10_000  # items per snapshot record of a large dict or list
_LOCK: Final = "LOCK"
# Looking for a valid record after a version-1 length that runs past the end costs a CRC per
# candidate; past this many bytes of CRC work, give up and call it damage (the safe answer).
_V1_SCAN_BUDGET: Final = 64 * 1024 * 1024
_V1_SCAN_SPAN: Final = 1024 * 1024  # and it tries at most this many offsets (~0.5 s)
_RETRY_FIRST: Final = 10.0  # seconds before the first automatic retry of a failed compaction
_RETRY_MAX: Final = 3600.0
PROGRESS_EVERY: Final = 5.0
"""Default seconds between start-up progress lines while a data directory loads."""
_PROGRESS_MASK: Final = 1023  # look at the clock once per 1,024 records loaded


class PersistenceError(KVError):
    """The data directory cannot be used: unusable, locked, damaged, or of an unknown format."""


@dataclass
class LoadReport:
    """What start-up found and did."""

    containers: int = 0
    snapshot_records: int = 0
    log_records: int = 0
    bytes: int = 0  # of the snapshot and log segments read
    truncated_bytes: int = 0
    seconds: float = 0.0
    moved_aside: list[str] = field(default_factory=list)  # files repair moved out of the way


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class _Progress:
    """Start-up's own log lines: what it loads, how far it got every few seconds, the totals.

    A replay of a large log takes seconds with nothing to show for it; an operator waiting
    for "listening" (or a supervisor's log) should see that the server is working and how
    far it is. Progress is measured in bytes of the files read, the one total known before
    anything is decoded (counting the records first would cost a pass over every file).
    Each line also carries its numbers as the structured field ``startup`` (``--log-format
    json``).

    Args:
        where: the data directory.
        total: bytes of the snapshot and log segments to read.
        every: seconds between progress lines; 0: none.
    """

    __slots__ = ("base", "every", "next_at", "started", "total", "where")

    def __init__(self, where: Path, total: int, every: float) -> None:
        self.where = where
        self.total = total
        self.every = every
        self.base = 0  # bytes of the files read before the current one
        self.started = time.monotonic()
        self.next_at = self.started + every if every > 0 else float("inf")

    def begin(self, snapshot: int, segments: int) -> None:
        """Say what is about to be loaded (``snapshot`` bytes, ``segments`` log files)."""
        if not self.total:
            return
        parts = [f"a {_mib(snapshot)} snapshot"] if snapshot else []
        if segments:
            s = "s" if segments > 1 else ""
            parts.append(f"{_mib(self.total - snapshot)} of log in {segments} segment{s}")
        log.info(
            "loading %s from %s: %s",
            _mib(self.total),
            self.where,
            " and ".join(parts),
            extra={"startup": {"phase": "loading", "path": str(self.where), "bytes": self.total}},
        )

    def at(self, offset: int, records: int) -> None:
        """Log a progress line if one is due: ``offset`` bytes into the current file."""
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.every
        done = min(self.base + offset, self.total)
        seconds = now - self.started
        log.info(
            "loading %s: %d%% (%s of %s), %d records in %.1f s",
            self.where,
            done * 100 // max(self.total, 1),
            _mib(done),
            _mib(self.total),
            records,
            seconds,
            extra={
                "startup": {
                    "phase": "progress",
                    "path": str(self.where),
                    "bytes_done": done,
                    "bytes": self.total,
                    "records": records,
                    "seconds": round(seconds, 3),
                }
            },
        )

    def end(self, report: LoadReport) -> None:
        """Log the totals of a finished load."""
        log.info(
            "loaded %s from %s in %.2f s: %d container%s, %d snapshot and %d log records",
            _mib(report.bytes),
            self.where,
            report.seconds,
            report.containers,
            "" if report.containers == 1 else "s",
            report.snapshot_records,
            report.log_records,
            extra={
                "startup": {
                    "phase": "loaded",
                    "path": str(self.where),
                    "bytes": report.bytes,
                    "containers": report.containers,
                    "snapshot_records": report.snapshot_records,
                    "log_records": report.log_records,
                    "seconds": round(report.seconds, 3),
                }
            },
        )


def _frame(codec: Codec, payload: Any) -> bytes:
    return _frame_encoded(codec.pack(payload))


def _frame_encoded(data: bytes | memoryview) -> bytes:
    head = _RECORD_HEADER_V1.pack(len(data), zlib.crc32(data))
    return head + zlib.crc32(head).to_bytes(4, "big") + data


def _header(magic: bytes) -> bytes:
    return _FILE_HEADER.pack(magic, FORMAT_VERSION, 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_error(data_dir: Path, exc: OSError) -> PersistenceError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(data_dir) else ""
    return PersistenceError(
        f"cannot use data directory {data_dir}: {exc.strerror or exc}{where}; --data-dir must be "
        "a directory this user can create or write"
    )


class _Damage(Exception):  # an internal signal, always converted
    def __init__(self, offset: int, reason: str, torn_tail: bool) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        self.torn_tail = torn_tail


def _zero_from(data: bytes, pos: int) -> bool:
    return data.count(0, pos) == len(data) - pos


def _v1_record_after(data: bytes, pos: int) -> bool:
    """True when a valid version-1 record starts anywhere after ``pos`` (bounded work)."""
    end = len(data)
    if end - pos > _V1_SCAN_SPAN:
        return True  # too far to search: cannot prove the tail torn, so call it damage
    budget = _V1_SCAN_BUDGET
    for at in range(pos + 1, end - _RECORD_HEADER_V1.size + 1):
        size, crc = _RECORD_HEADER_V1.unpack_from(data, at)
        start = at + _RECORD_HEADER_V1.size
        if size == 0 or start + size > end:
            continue
        budget -= size
        if budget < 0:
            return True  # cannot prove the tail torn: treat it as damage
        if zlib.crc32(data[start : start + size]) == crc:
            return True
    return False


def _read_records(data: bytes, magic: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)``; raise _Damage at the first bad record.

    ``torn_tail`` on the _Damage says whether the damage is provably a write cut short by a
    crash (see "Recovery" in the module docstring); the caller decides whether that may be
    dropped (only in the newest log segment).
    """
    if len(data) < _FILE_HEADER.size:
        torn = _zero_from(data, 0) or data == _header(magic)[: len(data)]
        raise _Damage(0, "file shorter than its header", torn_tail=torn)
    got_magic, version, _ = _FILE_HEADER.unpack_from(data)
    if got_magic != magic:
        raise PersistenceError(f"{path} is not a kvserve file (bad magic at offset 0)")
    if version not in (1, FORMAT_VERSION):
        raise PersistenceError(
            f"{path} has format version {version}; this kvserve reads versions 1 and "
            f"{FORMAT_VERSION}. Use a matching kvserve, or `kvctl dump` with the old one"
        )
    head_size = _RECORD_HEADER_V1.size if version == 1 else _RECORD_HEADER.size
    pos = _FILE_HEADER.size
    end = len(data)
    while pos < end:
        if end - pos < head_size:
            raise _Damage(pos, "truncated record header", torn_tail=True)
        size, crc = _RECORD_HEADER_V1.unpack_from(data, pos)
        if version != 1:
            (head_crc,) = struct.unpack_from(">I", data, pos + 8)
            if zlib.crc32(data[pos : pos + 8]) != head_crc:
                raise _Damage(pos, "record header CRC mismatch", torn_tail=_zero_from(data, pos))
        if size == 0:  # never written (a payload is at least one msgpack byte); v1 zeros parse
            raise _Damage(pos, "zero-length record", torn_tail=_zero_from(data, pos))
        start = pos + head_size
        if start + size > end:
            torn = version != 1 or not _v1_record_after(data, pos)
            raise _Damage(
                pos, f"a {size}-byte record runs past the end of the file", torn_tail=torn
            )
        payload = data[start : start + size]
        if zlib.crc32(payload) != crc:
            raise _Damage(pos, "record CRC mismatch", torn_tail=_zero_from(data, pos))
        yield pos, payload
        pos = start + size


def dump_state(store: Store) -> dict[str, Any]:
    """Return a point-in-time copy of every container, as ``kvctl dump`` writes it."""
    return {
        "format": DUMP_FORMAT,
        "containers": [[name, obj.kind, obj.state()] for name, obj in shallow_copy(store)],
    }


def restore_state(store: Store, dump: Any) -> int:
    """Load a :func:`dump_state` copy into an empty store; return the number of containers.

    ``dump`` is the dump itself or its msgpack encoding (as kvclient sends it).

    Raises:
        ValueError: the store is not empty, or the dump is malformed or of another format.
    """
    if type(dump) is bytes:
        # Sent encoded (kvclient does): decoded here with the depth stored data may have,
        # since a request of the dump itself would wrap its deepest values past MAX_DEPTH.
        try:
            dump = Codec(decode_exceptions=False).unpack(dump)
        except ProtocolError as exc:
            raise ValueError(f"not a kvmanager dump ({exc})") from None
    if not isinstance(dump, dict) or dump.get("format") != DUMP_FORMAT:
        raise ValueError(f"not a kvmanager dump of format version {DUMP_FORMAT}")
    if store.objects:
        raise ValueError("restore needs an empty server; drop every container first")
    containers = dump.get("containers")
    if not isinstance(containers, list):
        raise ValueError("malformed dump: 'containers' must be a list")
    built: dict[str, Container] = {}
    for entry in containers:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise ValueError(f"malformed dump entry: {reprlib.repr(entry)}")
        name, kind, state = entry
        built[name] = store.kind_class(kind).from_state(state)
    for name, obj in built.items():
        store.install(name, obj)
    return len(built)


class Persistence:
    """The data directory of one server.

    Args:
        data_dir: directory to keep the snapshot and log in (created mode 0700 if missing).
        fsync: ``"always"``, ``"everysec"`` (default) or ``"no"``; see the module docstring.
        compact_at: log size in bytes that triggers background compaction (default 64 MiB;
            the log must also have outgrown the last snapshot).
        repair: keep what precedes damage instead of refusing to start.
        progress_every: seconds between the progress lines start-up logs while it loads
            (default :data:`PROGRESS_EVERY`); 0: only the first and the last line.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: FsyncPolicy = "everysec",
        compact_at: int = 64 * 1024 * 1024,
        *,
        repair: bool = False,
        progress_every: float = PROGRESS_EVERY,
    ) -> None:
        if fsync not in ("always", "everysec", "no"):
            raise ValueError(f"fsync must be always, everysec or no, not {fsync!r}")
        if not 0 <= progress_every < float("inf"):
            raise ValueError(f"progress_every must be a finite number >= 0, not {progress_every!r}")
        self.dir = Path(data_dir)
        self.fsync = fsync
        self.compact_at = compact_at
        self.repair = repair
        self.progress_every = progress_every
        self._progress = _Progress(self.dir, 0, 0)
        self._codec = Codec()
        self._buffer = bytearray()
        self._fd = -1
        self._seq = 0
        self._log_bytes = 0  # bytes in the segments the snapshot does not cover
        self._file_bytes = 0  # size of the current segment up to its last complete write
        self._snapshot_bytes = 0
        self._lock_fd = -1
        self._fd_lock = threading.Lock()  # the fd may be swapped while the fsync thread runs
        self._dirty = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._compactor: threading.Thread | None = None
        # True from compact() until the snapshot's outcome is known; cleared before the
        # outcome is counted, so whoever sees the count change may compact again at once.
        self._compacting = False
        self._retry_after = 0.0  # monotonic time before which no automatic compaction runs
        self.compactions = 0
        self.compaction_failures = 0  # consecutive; reset by a successful compaction
        self.last_error: str | None = None
        self.failed: str | None = None  # why the log can no longer be written (sticky)
        self.last_sync_seconds = 0.0  # duration of the last fdatasync under "always"
        self.fsync_times = Histogram()  # every fdatasync of the log, for the metrics
        # The request ids the server remembers an answer for, ``[[token, seq], ...]``, read
        # when a snapshot is taken (set by the engine). A snapshot replaces the log segments
        # that held those ids; without them a retry after a restart would be applied again.
        self.answered: Callable[[], list[list[Any]]] | None = None
        self._snapshot_answered: list[Any] = []

    # -- start-up ------------------------------------------------------------------------

    def open(self, store: Store, on_answer: AnswerHook | None = None) -> LoadReport:
        """Lock the directory, load the snapshot, replay the log, and open a new segment.

        Logs what it loads (its size in bytes), a progress line every
        :attr:`progress_every` seconds while it loads, and the totals.

        Args:
            store: the empty store to fill.
            on_answer: called ``(token, seq, kind, value)`` for each replayed call that carried
                a request id, so the server can still recognise a retry of it.

        Raises:
            PersistenceError: the directory cannot be created or written, is locked by another
                server, is damaged (without ``repair``), or holds an unknown format version.
        """
        started = time.monotonic()
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.dir.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.dir))
            self._take_lock()
        except OSError as exc:
            raise _dir_error(self.dir, exc) from None
        report = LoadReport()
        try:
            self._tighten_modes()
            self._load(store, report, on_answer)
        except OSError as exc:
            self._release_lock()
            raise _dir_error(self.dir, exc) from None
        except BaseException:
            self._release_lock()
            raise
        report.containers = len(store.objects)
        report.seconds = time.monotonic() - started
        if report.bytes:
            self._progress.end(report)
        if self.fsync == "everysec":
            self._syncer = threading.Thread(
                target=self._sync_loop, name="kvserve-fsync", daemon=True
            )
            self._syncer.start()
        return report

    def _load(self, store: Store, report: LoadReport, on_answer: AnswerHook | None) -> None:
        # Damaged files are moved aside only once a snapshot of what was kept is safely
        # written: moving them first and crashing would leave a directory that starts
        # cleanly without the damaged segment's good prefix.
        aside: list[tuple[Path, str]] = []
        stale = self.dir / (_SNAPSHOT + ".tmp")
        if stale.exists():  # a compaction cut short; the log still holds all of it
            log.info("removing %s, left by a compaction that did not finish", stale)
            stale.unlink()
        segments = self._segments()
        snapshot = self.dir / _SNAPSHOT
        snapshot_bytes = snapshot.stat().st_size if snapshot.exists() else 0
        sizes = {seq: path.stat().st_size for seq, path in segments}
        self._progress = _Progress(
            self.dir, snapshot_bytes + sum(sizes.values()), self.progress_every
        )
        self._progress.begin(snapshot_bytes, len(segments))
        log_seq, snapshot_damaged = self._load_snapshot(store, report)
        self._progress.base = report.bytes = snapshot_bytes
        if snapshot_damaged:
            aside.append((self.dir / _SNAPSHOT, "damaged"))
        if on_answer is not None:
            # Calls the snapshot covers whose ids were remembered: a retry of one is answered
            # "reply lost", never applied again. The log replayed next holds the later ones.
            for entry in self._snapshot_answered:
                if (
                    type(entry) is list
                    and len(entry) == 2
                    and type(entry[0]) is bytes
                    and type(entry[1]) is int
                ):
                    on_answer(entry[0], entry[1], ERROR, RemoteError("ReplyLost", _ANSWER_LOST))
        stopped = False
        for seq, path in segments:
            if seq < log_seq:
                path.unlink()  # covered by the snapshot; a crash before deletion left it
                self._progress.total -= sizes[seq]
                continue
            self._progress.base = report.bytes
            report.bytes += sizes[seq]
            if stopped:
                # Repair keeps only what precedes the damage: later segments would apply on
                # top of a gap. Keep them aside for a human to look at.
                aside.append((path, "after-damage"))
            elif self._replay(store, path, report, on_answer, last=seq == segments[-1][0]):
                # Still needed until the next snapshot: counts toward the compaction trigger,
                # or a server restarted more often than it fills compact_at never compacts.
                self._log_bytes += path.stat().st_size
            else:
                aside.append((path, "damaged"))
                stopped = True
        self._seq = max([log_seq, *(s for s, _ in segments)])
        if aside:
            covered = self._seq + 1
            size = self._write_snapshot_file(
                Codec(),
                shallow_copy(store),
                covered,
                lambda: self._move_aside(aside, report),
                self.answered() if self.answered is not None else None,
            )
            self._snapshot_bytes = size
            self._delete_covered(covered)
            self._log_bytes = 0
            self._open_segment(covered)
        else:
            self._open_segment(self._seq + (1 if segments else 0))

    def _move_aside(self, aside: list[tuple[Path, str]], report: LoadReport) -> None:
        stamp = int(time.time())
        for path, why in aside:
            target = path.with_name(f"{path.name}.{why}-{stamp}")
            os.replace(path, target)
            report.moved_aside.append(str(target))
            log.warning("repair: moved %s aside to %s", path, target)

    def _tighten_modes(self) -> None:
        """Make the directory 0700 and every file in it 0600 (older versions made 0644 files)."""
        # A directory someone else owns (a mount point) cannot be chmodded: say so, go on.
        mode = stat.S_IMODE(self.dir.stat().st_mode)
        if mode & 0o077:
            try:
                os.chmod(self.dir, mode & 0o700)
                log.warning("data directory %s was mode %04o; made it 0700", self.dir, mode)
            except OSError as exc:
                log.warning("data directory %s is mode %04o and stays so: %s", self.dir, mode, exc)
        for path in self.dir.iterdir():
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
                try:
                    os.chmod(path, stat.S_IMODE(info.st_mode) & 0o600)
                except OSError as exc:
                    log.warning("%s is readable by others and stays so: %s", path, exc)

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
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
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
        """Refuse to start, or (repair) log what is kept; the caller moves the file aside."""
        if not self.repair:
            raise PersistenceError(
                f"{path} is damaged at offset {damage.offset} ({damage.reason}); start with "
                "--repair to keep everything before that offset (the file is moved aside, "
                "not deleted)"
            )
        log.warning(
            "repair: %s damaged at offset %d (%s); keeping what precedes it",
            path,
            damage.offset,
            damage.reason,
        )

    def _load_snapshot(self, store: Store, report: LoadReport) -> tuple[int, bool]:
        """Install the snapshot; return ``(log_seq, damaged)``. Checked whole before use."""
        path = self.dir / _SNAPSHOT
        if not path.exists():
            return 0, False
        data = path.read_bytes()
        self._snapshot_bytes = len(data)
        log_seq = 0
        declared = -1  # containers, as the first record says
        records = 0
        built: list[tuple[str, Container]] = []
        version = _FILE_HEADER.unpack_from(data)[1] if len(data) >= _FILE_HEADER.size else 0
        damaged = False
        trailer = False
        try:
            for offset, payload in _read_records(data, _SNAP_MAGIC, path):
                if trailer:
                    raise _Damage(offset, "data after the trailer record", torn_tail=False)
                record = self._decode(payload, offset)
                if declared < 0:
                    if not (isinstance(record, dict) and "log_seq" in record):
                        raise _Damage(offset, "no snapshot header record", torn_tail=False)
                    log_seq = int(record["log_seq"])
                    declared = int(record.get("containers", 0))
                    answered = record.get("answered", [])  # absent before this version
                    self._snapshot_answered = answered if type(answered) is list else []
                    continue
                if isinstance(record, dict):
                    if record.get("end") != records or record.get("containers") != len(built):
                        raise _Damage(
                            offset,
                            f"trailer says {record.get('end')} records and "
                            f"{record.get('containers')} containers, found {records} and "
                            f"{len(built)}",
                            torn_tail=False,
                        )
                    trailer = True
                    continue
                try:
                    name, kind, state = record[:3]
                    if len(record) >= 4 and record[3] > 0:
                        built[-1][1].extend_state(state)  # the next part of the same container
                    else:
                        obj = store.kind_class(kind).from_state(state)
                        if len(record) == 5:
                            obj.load_meta(record[4])
                        built.append((name, obj))
                except Exception as exc:  # CRC-clean but not a container: still damage
                    raise _Damage(offset, f"bad container record ({exc!r:.80})", False) from None
                records += 1
                if not records & _PROGRESS_MASK:
                    self._progress.at(offset, records)
            if version >= 2 and not trailer:
                raise _Damage(len(data), "the snapshot ends without its trailer", False)
            if declared >= 0 and declared != len(built):
                raise _Damage(
                    len(data),
                    f"the snapshot declares {declared} containers and holds {len(built)}",
                    torn_tail=False,
                )
        except _Damage as damage:
            # A snapshot is renamed into place complete, so any damage is real corruption.
            self._damaged(path, damage)
            damaged = True
        report.snapshot_records += records
        for name, obj in built:
            store.install(name, obj)
        return log_seq, damaged

    def _decode(self, payload: bytes, offset: int) -> Any:
        try:
            return self._codec.unpack(payload)
        except Exception as exc:  # a CRC-clean record that does not decode is still damage
            raise _Damage(offset, f"undecodable record ({exc})", torn_tail=False) from None

    def _replay(
        self,
        store: Store,
        path: Path,
        report: LoadReport,
        on_answer: AnswerHook | None,
        *,
        last: bool,
    ) -> bool:
        """Apply one segment; return False when it is damaged (and repair keeps its prefix)."""
        data = path.read_bytes()
        try:
            for offset, payload in _read_records(data, _LOG_MAGIC, path):
                record = self._decode(payload, offset)
                if not (type(record) is list and 4 <= len(record) <= 5):
                    raise _Damage(offset, "not a logged call", torn_tail=False)
                kind, value = apply_record(store, record)
                report.log_records += 1
                if not report.log_records & _PROGRESS_MASK:
                    self._progress.at(offset, report.snapshot_records + report.log_records)
                if on_answer is not None and len(record) == 5:
                    rid = record[4]
                    if len(rid) == 3:  # a call inside a batch: the batch's answer is not logged
                        kind, value = ERROR, RemoteError("ReplyLost", _REPLY_LOST)
                    on_answer(rid[0], rid[1], kind, value)
        except _Damage as damage:
            if not (damage.torn_tail and last):
                self._damaged(path, damage)
                return False
            log.warning(
                "%s: torn record at offset %d (%s), from a crash mid-write; truncating %d bytes",
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
        return True

    def _open_segment(self, seq: int) -> None:
        """Make segment ``seq`` the one appended to.

        The old segment is fsynced *before* the new one exists, so that only the newest
        segment can ever end in a torn write (recovery tolerates a torn tail nowhere else).
        On failure nothing changes: the old segment stays current and the new file is removed.
        """
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail(f"fsync of the log {self._segment_path()} failed: {exc}")
                raise
        path = self.dir / f"log.{seq:010d}.kvl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.write(fd, _header(_LOG_MAGIC))
                os.fsync(fd)
                _fsync_dir(self.dir)
                size = _FILE_HEADER.size
        except OSError:
            os.close(fd)
            try:
                path.unlink()
            except OSError:
                pass
            raise
        with self._fd_lock:
            old, self._fd = self._fd, fd
            self._seq = seq
            self._file_bytes = size
        if old >= 0:
            os.close(old)

    # -- the write path ------------------------------------------------------------------

    def append(self, record: list[Any]) -> None:
        """Queue one applied mutation; it reaches the OS at the next :meth:`flush`."""
        self._buffer += _frame(self._codec, record)

    def append_encoded(self, payload: bytes | memoryview) -> None:
        """Queue one applied mutation given as its msgpack encoding (a request as received)."""
        # Header and payload go into the buffer separately: framing first would copy the
        # payload once more, and requests logged this way can be megabytes.
        size, crc = len(payload), zlib.crc32(payload)
        self._buffer += _RECORD_HEADER.pack(
            size, crc, zlib.crc32(_RECORD_HEADER_V1.pack(size, crc))
        )
        self._buffer += payload

    @property
    def pending(self) -> bool:
        """True when appended records have not been flushed yet."""
        return bool(self._buffer)

    def flush(self) -> None:
        """Write queued records to the OS (and fsync them under ``always``).

        Raises:
            OSError: the write or fsync failed, now or earlier (:attr:`failed` says why). The
                records stay queued and the segment is cut back to its last complete write,
                so the log never holds half a flush; nothing queued may be acknowledged.
        """
        if self.failed is not None:
            raise OSError(errno.EIO, f"the log is unusable since an earlier failure: {self.failed}")
        if not self._buffer:
            return
        view = memoryview(self._buffer)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync == "always":
                started = time.monotonic()
                os.fdatasync(self._fd)
                self.last_sync_seconds = time.monotonic() - started
                self.fsync_times.observe(self.last_sync_seconds)
        except OSError as exc:
            view.release()
            self._fail(f"cannot write the log {self._segment_path()}: {exc}")
            raise
        view.release()
        self._file_bytes += len(self._buffer)
        self._log_bytes += len(self._buffer)
        self._buffer.clear()
        if self.fsync != "always":
            self._dirty = True

    def _segment_path(self) -> Path:
        return self.dir / f"log.{self._seq:010d}.kvl"

    def _fail(self, reason: str) -> None:
        """Mark the log unusable, and cut off any part of a write that did reach the file."""
        if self.failed is None:
            self.failed = reason
            self.last_error = reason
        try:
            os.ftruncate(self._fd, self._file_bytes)
        except OSError:
            pass  # start-up treats a partial last write as a torn tail

    def _sync_loop(self) -> None:
        while not self._stop.wait(1.0):
            if not self._dirty:
                continue
            self._dirty = False
            with self._fd_lock:
                started = time.monotonic()
                try:
                    os.fdatasync(self._fd)
                    self.fsync_times.observe(time.monotonic() - started)
                except OSError as exc:
                    # Fatal at the next flush: the kernel may have dropped the dirty pages.
                    if self.failed is None:
                        self.failed = self.last_error = f"fsync of the log failed: {exc}"
                    log.error("fsync of the log failed: %s", exc)

    # -- compaction ----------------------------------------------------------------------

    def should_compact(self) -> bool:
        """True when the log has grown past ``compact_at`` and past the last snapshot.

        False while a compaction runs, and for a while after one failed (see the module
        docstring), so a full disk is not hammered with snapshot attempts.
        """
        return (
            not self.compacting
            and self.failed is None
            and self._log_bytes >= self.compact_at
            and self._log_bytes >= self._snapshot_bytes
            and time.monotonic() >= self._retry_after
        )

    @property
    def compacting(self) -> bool:
        """True while a background snapshot is being written."""
        return self._compacting

    def compact(self, store: Store) -> bool:
        """Start a background snapshot of ``store``; False if one is already running.

        Call from the serving loop: the rotation and the copy happen here, atomically with
        respect to mutations; only the writing happens in the background.

        Raises:
            OSError: the log could not be flushed (fatal, see :meth:`flush`), or a new log
                segment could not be started (not fatal: nothing changed, the failure is
                logged and counted like a failed snapshot).
        """
        if self.compacting:
            return False
        self.flush()  # what is queued belongs to the segments this snapshot covers
        covered = self._seq + 1
        try:
            self._open_segment(covered)
        except OSError as exc:
            if self.failed is None:  # else the log itself failed: fatal, not a compaction issue
                self._compaction_failed(f"cannot start log segment {covered}: {exc}")
            raise
        self._log_bytes = 0
        copies = shallow_copy(store)
        answered = self.answered() if self.answered is not None else None
        self._compactor = threading.Thread(
            target=self._write_snapshot,
            args=(copies, covered, answered),
            name="kvserve-compact",
            daemon=True,
        )
        self._compacting = True
        self._compactor.start()
        return True

    def _compaction_failed(self, reason: str) -> None:
        failures = self.compaction_failures + 1
        self.last_error = f"compaction failed: {reason}"
        delay = min(_RETRY_MAX, _RETRY_FIRST * 2 ** (failures - 1))
        self._retry_after = time.monotonic() + delay
        # The outcome is settled (backoff included) before it is seen: then no next compaction.
        self._compacting = False
        self.compaction_failures = failures
        if failures == 1:  # once, not once per attempt on a full disk
            log.error(
                "compaction failed (the log still holds every write; retrying in %.0fs, then "
                "backing off): %s",
                delay,
                reason,
            )
        else:
            log.debug("compaction failed again (%d in a row): %s", failures, reason)

    def _write_snapshot_file(
        self,
        codec: Codec,
        copies: list[tuple[str, Container]],
        covered: int,
        before_rename: Callable[[], None] | None = None,
        answered: list[list[Any]] | None = None,
    ) -> int:
        """Write, fsync and rename a snapshot into place; return its size in bytes."""
        tmp = self.dir / (_SNAPSHOT + ".tmp")
        try:
            tmp.unlink()  # O_CREAT keeps an old file's mode; this one must be 0600
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_header(_SNAP_MAGIC))
                header: dict[str, Any] = {"log_seq": covered, "containers": len(copies)}
                if answered:
                    header["answered"] = answered
                fh.write(_frame(codec, header))
                records = 0
                for name, obj in copies:
                    # In parts: one huge packb would hold the GIL, and stall the serving loop,
                    # for half a second per million keys.
                    for part, chunk in enumerate(obj.state_parts(_SNAPSHOT_PART)):
                        record = [name, obj.kind, chunk, part]
                        meta = obj.snapshot_meta() if part == 0 else None
                        if meta is not None:
                            record.append(meta)  # revision and changes, deadlines
                        fh.write(_frame(codec, record))
                        records += 1
                fh.write(_frame(codec, {"end": records, "containers": len(copies)}))
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            if before_rename is not None:
                before_rename()
            os.replace(tmp, self.dir / _SNAPSHOT)
            _fsync_dir(self.dir)
        except BaseException:
            try:
                tmp.unlink()  # a half-written snapshot on a full disk keeps it full
            except OSError:
                pass
            raise
        return size

    def _delete_covered(self, covered: int) -> None:
        for seq, path in self._segments():
            if seq < covered:
                path.unlink()

    def _write_snapshot(
        self,
        copies: list[tuple[str, Container]],
        covered: int,
        answered: list[list[Any]] | None = None,
    ) -> None:
        try:
            size = self._write_snapshot_file(Codec(), copies, covered, None, answered)
            self._snapshot_bytes = size
            self._delete_covered(covered)
        except Exception as exc:  # the log still holds everything; report and keep serving
            self._compaction_failed(str(exc))
            return
        except BaseException:
            self._compacting = False
            raise
        failed_before = self.compaction_failures
        self.compaction_failures = 0
        self._retry_after = 0.0
        self._compacting = False  # after the reset, so a next one's failure stays counted
        self.compactions += 1
        if failed_before:
            log.info("compaction works again after %d failures", failed_before)
        log.info("compaction done: snapshot of %d containers, %d bytes", len(copies), size)

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
        """Flush and fsync the log, stop background threads, release the directory.

        Never raises for a write failure: what could not be written was never acknowledged;
        :attr:`failed` says why, for the exit status.
        """
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(5)
        self.wait_compaction()
        if self._fd >= 0:
            try:
                self.flush()
                os.fsync(self._fd)
            except OSError as exc:
                self._fail(f"cannot write the log {self._segment_path()}: {exc}")
                log.error("closing the log: %s; unacknowledged writes are not kept", self.failed)
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
                return RETURN, [args[1], sorted(store.exposed[args[1]])]
            if method == "drop":
                return RETURN, store.drop(*args)
            if method == "restore":
                return RETURN, restore_state(store, args[0])
            if method == "restore_part":
                return RETURN, restore_records(store, *args)[0]
            return RETURN, None
        obj = store.get(ident)
        result = getattr(obj, method)(*args, **(kwds or {}))
    except Exception as exc:  # the same error the original call answered with
        return ERROR, exc
    op = schema.op(obj.kind, method)
    if obj.history is not None and not (op is not None and op.unwatched):
        # Every logged container call is a change that was applied (or a journaled one):
        # counting them again gives the revisions they had.
        obj.history.record(method, args, kwds, result)
    return RETURN, result
