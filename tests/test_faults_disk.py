"""Disk faults, by property: what was acknowledged survives, and damage is never silently dropped.

Each section is one property of kvserve's ``--data-dir`` (see "Recovery" in
``kvserve/persistence.py``). Servers are real ``kvserve`` subprocesses (or a real server in a
thread where only files matter); full disks are small tmpfs mounts made here, which needs root:
those tests skip, saying why, elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvclient
from kvclient.errors import KVError, RemoteError
from kvserve import KVManager, Server
from kvserve.persistence import Persistence
from tests.durable import DurableServer
from tests.wire import authed_connection, recv_frame

# These tests see each failure as it happens: the client neither retries nor waits long.
NO_RETRY: dict[str, Any] = {"client_options": {"retry": None, "call_timeout": 10}}
FILE_HEADER = 16
RECORD_HEADER = 12  # format version 2: length, payload crc32, header crc32


@pytest.fixture
def disk(clean_env: dict[str, str], authkey: bytes, tmp_path: Path) -> Iterator[DurableServer]:
    server = DurableServer(
        dict(clean_env, KV_AUTHKEY=authkey.decode()), tmp_path / "data", authkey, **NO_RETRY
    )
    yield server
    server.kill_all()


@contextlib.contextmanager
def small_disk(path: Path, size: int, *options: str) -> Iterator[Path]:
    """Mount a ``size``-byte tmpfs at ``path`` (root only), unmount it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill it needs root")
    path.mkdir()
    opts = ",".join([f"size={size}", "mode=0700", *options])
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``path`` until at most ``leave`` bytes are free."""
    filler = path / "filler"
    with filler.open("wb") as fh, contextlib.suppress(OSError):
        while free_bytes(path) > leave:
            fh.write(b"\xaa" * min(65536, max(4096, free_bytes(path) - leave)))
            fh.flush()
    return filler


def log_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("log.*.kvl"))


def records(path: Path) -> list[tuple[int, int]]:
    """``(offset, total bytes)`` of every record in a data file."""
    data = path.read_bytes()
    (version,) = struct.unpack_from(">I", data, 8)
    head = RECORD_HEADER if version == 2 else 8
    found, pos = [], FILE_HEADER
    while pos + head <= len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        found.append((pos, head + size))
        pos += head + size
    assert pos == len(data), "the test's own parser disagrees with the file"
    return found


def flip(path: Path, offset: int, bit: int = 0) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return bytes(data)


def v1_log(records_: list[list[Any]], torn: bytes = b"") -> bytes:
    """A format-version-1 log segment, as kvserve 0.x wrote it (8-byte record headers)."""
    out = b"KVLOG\0\0\0" + struct.pack(">II", 1, 0)
    for record in records_:
        payload = msgpack.packb(record)
        out += struct.pack(">II", len(payload), zlib.crc32(payload)) + payload
    return out + torn


def fill_keys(kv: kvclient.Client, n: int, value: Any = None) -> dict[str, Any]:
    d = kv.dict("d")
    expected = {}
    for i in range(n):
        expected[f"k{i}"] = i if value is None else value
        d[f"k{i}"] = expected[f"k{i}"]
    return expected


# -- 1. Damage is never mistaken for a torn tail --------------------------------------------


def test_damage_a_flipped_length_bit_in_the_last_segment_refuses_and_truncates_nothing(
    disk: DurableServer,
) -> None:
    """The reported instance: 901 of 1000 acknowledged keys were truncated away silently."""
    disk.start()
    with disk.client() as kv:
        expected = fill_keys(kv, 1000)
    disk.kill()
    segment = log_files(disk.data_dir)[-1]
    offset = records(segment)[100][0]  # record 0 creates "d"; this one sets k99
    damaged = flip(segment, offset, bit=7)  # the length's top bit: "runs past the end"

    err = disk.refuses()
    assert f"{segment} is damaged at offset {offset}" in err
    assert "--repair" in err
    assert segment.read_bytes() == damaged  # nothing truncated in place

    disk.start("--repair")
    with disk.client() as kv:
        assert kv.dict("d").copy() == {f"k{i}": i for i in range(99)}
    assert disk.stop() == 0
    aside = list(disk.data_dir.glob("*.damaged-*"))
    assert [p.read_bytes() for p in aside] == [damaged]  # moved aside whole
    # What repair kept is on disk now, not only in the memory of that one run.
    disk.start()
    with disk.client() as kv:
        assert kv.dict("d").copy() == {f"k{i}": i for i in range(99)}
        kv.dict("d")["after"] = 1
    assert disk.stop() == 0
    assert len(expected) == 1000


@pytest.mark.parametrize(
    ("field_offset", "bit"),
    [(0, 0), (3, 0), (1, 4), (5, 2), (9, 6), (RECORD_HEADER + 3, 1)],
    ids=["length-top-byte", "length-low-bit", "length-middle", "crc", "header-crc", "payload"],
)
@pytest.mark.parametrize("which", ["middle", "last"])
def test_damage_any_flipped_bit_in_a_record_refuses_to_start(
    disk: DurableServer, field_offset: int, bit: int, which: str
) -> None:
    disk.start()
    with disk.client() as kv:
        fill_keys(kv, 30, value="v" * 40)
    disk.kill()
    segment = log_files(disk.data_dir)[-1]
    index = 15 if which == "middle" else -1
    offset = records(segment)[index][0]
    damaged = flip(segment, offset + field_offset, bit)
    err = disk.refuses()
    assert f"{segment} is damaged at offset {offset}" in err
    assert segment.read_bytes() == damaged


def test_damage_in_an_older_segment_refuses_even_at_its_end(disk: DurableServer) -> None:
    """Only the newest segment is ever appended to, so only it can end in a torn write."""
    disk.start()
    with disk.client() as kv:
        fill_keys(kv, 5)
    assert disk.stop() == 0
    disk.start()  # a second segment
    with disk.client() as kv:
        kv.dict("d")["later"] = 1
    disk.kill()
    older = log_files(disk.data_dir)[0]
    with older.open("r+b") as fh:
        fh.truncate(older.stat().st_size - 3)
    err = disk.refuses()
    assert str(older) in err
    disk.start("--repair")
    with disk.client() as kv:
        assert kv.dict("d").copy() == {f"k{i}": i for i in range(4)}  # "later" came after
    assert disk.stop() == 0
    assert len(list(disk.data_dir.glob("*.after-damage-*"))) == 1


@pytest.mark.parametrize("how", ["cut-payload", "cut-header", "torn-append", "zeros", "header"])
def test_torn_tail_provably_torn_final_writes_are_recovered(disk: DurableServer, how: str) -> None:
    disk.start()
    with disk.client() as kv:
        expected = fill_keys(kv, 10)
    disk.kill()
    segment = log_files(disk.data_dir)[-1]
    last_offset, last_size = records(segment)[-1]
    data = segment.read_bytes()
    if how == "cut-payload":  # the last write was cut short: k9 never happened
        segment.write_bytes(data[: last_offset + last_size - 3])
        del expected["k9"]
    elif how == "cut-header":
        segment.write_bytes(data[: last_offset + 5])
        del expected["k9"]
    elif how == "torn-append":  # a later, unacknowledged write of which only a part landed
        payload = msgpack.packb(["d", "__setitem__", ["k10", "x" * 500], None])
        head = struct.pack(">II", len(payload), zlib.crc32(payload))
        segment.write_bytes(data + head + struct.pack(">I", zlib.crc32(head)) + payload[:100])
    elif how == "zeros":  # space the file system allocated, that the crash never filled
        segment.write_bytes(data + bytes(4096))
    else:  # a crash while starting a new segment
        nxt = int(segment.name.split(".")[1]) + 1
        (disk.data_dir / f"log.{nxt:010d}.kvl").write_bytes(b"KVLOG")
    disk.start()
    with disk.client() as kv:
        assert kv.dict("d").copy() == expected
        kv.dict("d")["after"] = 1  # appends after the cut
    assert disk.stop() == 0
    assert "torn record" in disk.stderr
    disk.start()
    with disk.client() as kv:
        assert kv.dict("d").copy() == {**expected, "after": 1}
    assert disk.stop() == 0


def _v1_records(n: int) -> list[list[Any]]:
    return [[None, "create", ["dict", "d"], None]] + [
        ["d", "__setitem__", [f"k{i}", i], None] for i in range(n)
    ]


@pytest.mark.parametrize("tail", ["cut", "zeros"])
def test_torn_tail_version_1_files_still_load_and_a_torn_tail_is_recovered(
    disk: DurableServer, tail: str
) -> None:
    disk.data_dir.mkdir()
    whole = v1_log(_v1_records(20))
    # Version 1 has no header CRC: zeros parse as an empty record, which kvserve never writes.
    torn = whole[:-2] if tail == "cut" else v1_log(_v1_records(19)) + bytes(4096)
    (disk.data_dir / "log.0000000001.kvl").write_bytes(torn)
    disk.start()
    with disk.client() as kv:
        assert kv.dict("d").copy() == {f"k{i}": i for i in range(19)}
        kv.dict("d")["new"] = 1
        assert kv.compact() is True  # rewrites everything in the current format
    assert disk.stop() == 0
    disk.start()
    with disk.client() as kv:
        assert kv.dict("d")["new"] == 1
        assert len(kv.dict("d")) == 20
    assert disk.stop() == 0
    assert (disk.data_dir / "snapshot.kvs").read_bytes()[8:12] == struct.pack(">I", 2)


def test_damage_version_1_length_flip_is_not_taken_for_a_torn_tail(disk: DurableServer) -> None:
    """Version 1 has no header CRC: the valid records after the bad length give it away."""
    data = bytearray(v1_log(_v1_records(50)))
    offset = FILE_HEADER
    for record in _v1_records(50)[:10]:
        offset += 8 + len(msgpack.packb(record))
    data[offset] ^= 0x80
    disk.data_dir.mkdir()
    segment = disk.data_dir / "log.0000000001.kvl"
    segment.write_bytes(bytes(data))
    err = disk.refuses()
    assert f"{segment} is damaged at offset {offset}" in err
    assert segment.read_bytes() == bytes(data)


# -- 2. A snapshot is checked whole before it is used ---------------------------------------


def _snapshot_of_three(disk: DurableServer) -> Path:
    disk.start()
    with disk.client() as kv:
        kv.dict("a")["x"] = 1
        kv.list("b").extend([1, 2, 3])
        kv.namespace("c").y = 2
        assert kv.compact() is True
        deadline = time.monotonic() + 10
        while kv.stats()["persistence"]["compactions"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert disk.stop() == 0
    return disk.data_dir / "snapshot.kvs"


@pytest.mark.parametrize("cut", ["before-trailer", "before-last-container", "after-header"])
def test_snapshot_cut_at_a_record_boundary_refuses_to_start(disk: DurableServer, cut: str) -> None:
    snapshot = _snapshot_of_three(disk)
    boundaries = records(snapshot)  # header record, a, b, c, trailer
    assert len(boundaries) == 5
    keep = {"before-trailer": 4, "before-last-container": 3, "after-header": 1}[cut]
    data = snapshot.read_bytes()
    cut_at = boundaries[keep][0]
    snapshot.write_bytes(data[:cut_at])
    err = disk.refuses()
    assert f"{snapshot} is damaged at offset {cut_at}" in err
    disk.start("--repair")
    with disk.client() as kv:
        assert sorted(kv.names()) == ["a", "b", "c"][: keep - 1]
    assert disk.stop() == 0
    assert [p.read_bytes() for p in disk.data_dir.glob("snapshot.kvs.damaged-*")] == [data[:cut_at]]
    disk.start()  # and the repaired directory starts cleanly
    with disk.client() as kv:
        assert sorted(kv.names()) == ["a", "b", "c"][: keep - 1]
    assert disk.stop() == 0


def test_snapshot_with_anything_after_its_trailer_refuses_to_start(disk: DurableServer) -> None:
    snapshot = _snapshot_of_three(disk)
    data = snapshot.read_bytes()
    header_record = data[FILE_HEADER : FILE_HEADER + records(snapshot)[0][1]]
    snapshot.write_bytes(data + header_record)  # a whole, CRC-valid record
    err = disk.refuses()
    assert "after the trailer" in err


def test_snapshot_version_1_with_a_missing_container_refuses_to_start(disk: DurableServer) -> None:
    """Version-1 snapshots have no trailer; their container count still catches a cut."""
    out = b"KVSNAP\0\0" + struct.pack(">II", 1, 0)
    for record in [{"log_seq": 1, "containers": 2}, ["a", "dict", {"x": 1}, 0]]:
        payload = msgpack.packb(record)
        out += struct.pack(">II", len(payload), zlib.crc32(payload)) + payload
    disk.data_dir.mkdir()
    (disk.data_dir / "snapshot.kvs").write_bytes(out)
    assert "declares 2 containers and holds 1" in disk.refuses()


# -- 3. Automatic compaction fires every time the log grows past the threshold ---------------


@pytest.fixture
def small_compaction(tmp_path: Path, authkey: bytes) -> Iterator[tuple[Server, Persistence]]:
    persistence = Persistence(tmp_path / "data", "no", compact_at=8192)
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, persistence=persistence).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, persistence
    srv.stop()
    assert srv.wait_stopped(10)
    thread.join(10)


def test_compaction_fires_repeatedly_under_a_bounded_write_loop(
    small_compaction: tuple[Server, Persistence], authkey: bytes, tmp_path: Path
) -> None:
    srv, persistence = small_compaction
    final = {}
    with kvclient.connect(srv.endpoint, authkey) as kv:
        d = kv.dict("hot")
        for i in range(3000):
            key = f"k{i % 20}"
            d[key] = final[key] = "v" * 100 + str(i)
            if i % 500 == 499:
                time.sleep(0.05)  # let a running compaction finish, so the next can start
        persistence.wait_compaction(30)
        stats = kv.stats()["persistence"]
    assert stats["compactions"] >= 5, stats  # it was once per process
    assert stats["last_error"] is None
    # ~460 KB were written; the directory holds a snapshot (with the watch history it keeps:
    # up to 1,000 changes of ~110 bytes here) and a few thresholds of log at most.
    assert persistence.disk_bytes() < 256 * 1024, persistence.disk_bytes()
    srv.stop()
    assert srv.wait_stopped(10)
    again = KVManager(
        ("127.0.0.1", 0), authkey=authkey, persistence=Persistence(tmp_path / "data", "no")
    ).get_server()
    try:
        assert again.store.objects["hot"].state() == final
    finally:
        again.close()


class _SlowToFinish(logging.Handler):
    """Holds the compacting thread after it counted its snapshot, as a loaded machine may."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("compaction done"):
            time.sleep(0.3)


def test_a_compaction_counted_as_done_lets_the_next_one_start(
    small_compaction: tuple[Server, Persistence], authkey: bytes
) -> None:
    """compact() said "already running" after stats() had counted the last one as done."""
    srv, persistence = small_compaction
    handler = _SlowToFinish()
    logger = logging.getLogger("kvserve")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with kvclient.connect(srv.endpoint, authkey) as kv:
            kv.dict("d")["k"] = "v"
            for _ in range(3):
                before = kv.stats()["persistence"]["compactions"]
                assert kv.compact() is True
                deadline = time.monotonic() + 10
                while kv.stats()["persistence"]["compactions"] == before:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        persistence.wait_compaction(10)


def test_compaction_counts_the_log_left_by_earlier_runs(disk: DurableServer) -> None:
    """A server restarted before each run fills --compact-at must still compact."""
    disk.extra = ["--compact-at", "20000"]
    for run in range(4):
        disk.start()
        with disk.client() as kv:
            for i in range(60):
                kv.dict("d")[f"k{i}"] = f"{run}-" + "v" * 100
        assert disk.stop() == 0
    assert "compaction done" in disk.stderr
    assert len(log_files(disk.data_dir)) < 4


# -- 4. A fatal stop exits non-zero with the reason on stderr -------------------------------


def test_fatal_a_full_disk_stops_with_exit_1_and_the_reason_and_loses_nothing_acked(
    disk: DurableServer, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "mnt", 256 * 1024) as mnt:
        disk.data_dir = mnt / "data"
        disk.start()
        acked = {}
        with disk.client() as kv, pytest.raises(KVError):
            d = kv.dict("d")
            for i in range(1000):  # 1 MB into 256 KiB: fails long before the end
                d[f"k{i}"] = "x" * 1000
                acked[f"k{i}"] = "x" * 1000
        assert disk.wait() == 1  # so Restart=on-failure restarts it
        assert "kvserve: fatal: cannot write the log" in disk.stderr
        assert "No space left on device" in disk.stderr
        assert 50 < len(acked) < 1000
        resize(mnt, 4 * 1024 * 1024)  # the operator frees space
        disk.start()
        with disk.client() as kv:
            stored = kv.dict("d").copy()
            assert {k: stored.get(k) for k in acked} == acked
            kv.dict("d")["after"] = 1
        assert disk.stop() == 0


# -- 5. Compaction failure never loses acknowledged writes ----------------------------------


def test_compaction_set_then_compact_in_one_iteration_on_a_full_disk_acks_nothing_it_loses(
    disk: DurableServer, tmp_path: Path
) -> None:
    """The reported instance: the set was acknowledged, compact's flush lost it."""
    with small_disk(tmp_path / "mnt", 512 * 1024) as mnt:
        disk.data_dir = mnt / "data"
        disk.start()
        with disk.client() as kv:
            kv.dict("d")["before"] = 1
        filler = fill(mnt)
        sock = authed_connection(disk.address, disk.authkey)
        set_frame = msgpack.packb(["d", "__setitem__", ["big", "y" * 65536], None])
        compact_frame = msgpack.packb([None, "compact", [], None])
        # One sendall: both requests are handled in one iteration of the serving loop.
        sock.sendall(
            struct.pack(">I", len(set_frame))
            + set_frame
            + struct.pack(">I", len(compact_frame))
            + compact_frame
        )
        replies = []
        with contextlib.suppress(OSError, EOFError):
            for _ in range(2):
                replies.append(msgpack.unpackb(recv_frame(sock), raw=False))
        sock.close()
        set_acked = bool(replies) and replies[0][0] == "#RETURN"
        assert disk.proc is not None
        try:
            status = disk.proc.wait(10)
        except subprocess.TimeoutExpired:
            status = None  # still serving: a crash now must not lose what it acknowledged
        if status is None:
            disk.kill()
        else:
            disk.wait()
        filler.unlink()
        disk.start()
        with disk.client() as kv:
            stored = kv.dict("d").copy()
        assert disk.stop() == 0
        assert stored["before"] == 1
        if set_acked:
            assert stored.get("big") == "y" * 65536, "an acknowledged set was lost"
        # The log could not take the set: it was never acknowledged, and kvserve stopped.
        assert (set_acked, status) == (False, 1)
        assert "No space left on device" in disk.stderr


def test_compaction_failed_snapshot_keeps_serving_logs_once_and_loses_nothing(
    disk: DurableServer, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "mnt", 1024 * 1024) as mnt:
        disk.data_dir = mnt / "data"
        disk.start()
        expected: dict[str, Any] = {}
        with disk.client() as kv:
            d = kv.dict("d")
            big = {f"b{i}": "z" * 1000 for i in range(300)}  # ~300 KB of state
            d.set_many(big)
            expected.update(big)
            fill(mnt, leave=100 * 1024)  # room for log appends, not for a snapshot
            for attempt in range(3):
                assert kv.compact() is True  # the rotation fits; the snapshot cannot
                deadline = time.monotonic() + 10
                while kv.stats()["persistence"]["compaction_failures"] < attempt + 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                with disk.client() as probe:  # another connection is served at once
                    started = time.monotonic()
                    probe.ping()
                    assert time.monotonic() - started < 1
                for i in range(20):  # still acknowledged, still logged
                    d[f"after{attempt}-{i}"] = i
                    expected[f"after{attempt}-{i}"] = i
            stats = kv.stats()["persistence"]
            assert stats["compaction_failures"] == 3
            assert "No space left on device" in stats["last_error"]
            assert stats["compactions"] == 0
        assert not (disk.data_dir / "snapshot.kvs.tmp").exists()  # its space was given back
        disk.kill()
        assert disk.stderr.count("compaction failed (") == 1  # logged once, not per attempt
        (mnt / "filler").unlink()
        disk.start()
        with disk.client() as kv:
            assert kv.dict("d").copy() == expected
        assert disk.stop() == 0


def test_compaction_that_cannot_start_a_segment_is_an_error_to_its_caller_not_a_stop(
    disk: DurableServer, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "mnt", 256 * 1024) as mnt:
        disk.data_dir = mnt / "data"
        disk.start()
        with disk.client() as kv:
            d = kv.dict("d")
            d["before"] = 1
            filler = fill(mnt)  # not even a new segment's 16-byte header fits
            with pytest.raises(RemoteError, match="No space left on device"):
                kv.compact()
            kv.ping()  # still serving
            stats = kv.stats()["persistence"]
            assert "cannot start log segment" in stats["last_error"]
            assert stats["compaction_failures"] == 1
            filler.unlink()
            d["after"] = 2  # the old segment is still the one appended to
        assert disk.stop() == 0
        assert len(log_files(disk.data_dir)) == 1
        disk.start()
        with disk.client() as kv:
            assert kv.dict("d").copy() == {"before": 1, "after": 2}
        assert disk.stop() == 0


# -- 6. A bad --data-dir is a data-dir error; files 0600, directories 0700 ------------------


@pytest.mark.parametrize("how", ["a-file", "under-a-file", "read-only"])
def test_data_dir_unusable_is_reported_as_a_data_dir_error(
    disk: DurableServer, tmp_path: Path, how: str
) -> None:
    target = tmp_path / "data"
    if how == "a-file":
        target.write_text("not a directory")
    elif how == "under-a-file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "data"
    elif os.geteuid() == 0:
        ctx = small_disk(tmp_path / "ro", 64 * 1024, "ro")
        target = ctx.__enter__() / "data"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "data"
    disk.data_dir = target
    try:
        err = disk.refuses()
    finally:
        if how == "read-only" and os.geteuid() == 0:
            ctx.__exit__(None, None, None)
    assert f"PersistenceError: cannot use data directory {target}" in err
    assert "cannot listen" not in err


def test_data_dir_a_missing_parent_is_created_and_every_file_is_private(
    disk: DurableServer,
) -> None:
    disk.data_dir = disk.data_dir / "deeper" / "still"
    disk.start()
    with disk.client() as kv:
        fill_keys(kv, 5)
        assert kv.compact() is True
        deadline = time.monotonic() + 10
        while kv.stats()["persistence"]["compactions"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert disk.stop() == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in disk.data_dir.iterdir()}
    assert "snapshot.kvs" in modes and "LOCK" in modes
    assert set(modes.values()) == {0o600}, modes
    assert stat.S_IMODE(disk.data_dir.stat().st_mode) == 0o700


def test_data_dir_a_snapshot_left_half_written_by_a_crash_is_removed(disk: DurableServer) -> None:
    disk.start()
    with disk.client() as kv:
        fill_keys(kv, 3)
    disk.kill()
    stale = disk.data_dir / "snapshot.kvs.tmp"
    stale.write_bytes(b"KVSNAP\0\0" + bytes(100_000))  # would otherwise stay for ever
    disk.start()
    with disk.client() as kv:
        assert len(kv.dict("d")) == 3
    assert disk.stop() == 0
    assert not stale.exists()


def test_data_dir_files_an_older_version_left_readable_are_made_private(
    disk: DurableServer,
) -> None:
    disk.data_dir.mkdir(mode=0o755)
    os.chmod(disk.data_dir, 0o755)
    segment = disk.data_dir / "log.0000000001.kvl"
    segment.write_bytes(v1_log(_v1_records(3)))
    os.chmod(segment, 0o644)
    disk.start()
    with disk.client() as kv:
        assert len(kv.dict("d")) == 3
    assert disk.stop() == 0
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert stat.S_IMODE(disk.data_dir.stat().st_mode) == 0o700
    assert "made it 0700" in disk.stderr


# -- 7. Random requests, restarts and damage, against a model of the containers -------------

_KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
_LEAVES = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.booleans()
    | st.none()
)
_VALUES = st.recursive(
    _LEAVES, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner), max_leaves=4
)
_NUMBERS = st.integers(-1000, 1000) | st.floats(-1e6, 1e6, allow_nan=False)
State = dict[str, Any]


def _is_number(value: Any) -> bool:
    return type(value) is not bool and isinstance(value, int | float)


def _offset(data: st.DataObject, size: int) -> int:
    """A byte offset past the file header of a file of ``size`` bytes.

    Drawn as a number independent of ``size`` (file sizes vary between runs), so that
    hypothesis replays a failing example the same way and reports its error, not
    ``FlakyStrategyDefinition``.
    """
    return FILE_HEADER + data.draw(st.integers(0, 1 << 20)) % (size - FILE_HEADER)


class DiskModel(RuleBasedStateMachine):
    """A kvserve with --data-dir and a plain-Python model that must agree after every restart.

    ``base`` is the model as of the start of the newest log segment and ``ops`` the mutations
    since, so a repair that keeps "everything before the damage" can be checked to have kept a
    prefix of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="kvserve-model-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
        authkey = secrets.token_hex(16).encode()
        env.update(HOME=str(self.tmp / "home"), KV_AUTHKEY=authkey.decode())
        self.server = DurableServer(
            env, self.tmp / "data", authkey, extra=["--fsync", "no"], **NO_RETRY
        )
        self.model: State = {"d": {}, "l": [], "ns": {}}
        self.kv: kvclient.Client | None = None
        try:
            self.server.start()
            self._connect()
        except BaseException:
            self.teardown()  # hypothesis only tears down a machine it finished building
            raise
        self._new_segment()

    def _connect(self) -> None:
        self.kv = self.server.client()
        self.d = self.kv.dict("d")
        self.lst = self.kv.list("l")
        self.ns = self.kv.namespace("ns")

    def _new_segment(self) -> None:
        self.base = copy.deepcopy(self.model)
        self.ops: list[tuple[str, Any, Any]] = []

    def _mutated(self, op: str, a: Any = None, b: Any = None) -> None:
        _apply(self.model, op, a, b)
        self.ops.append((op, a, b))

    def teardown(self) -> None:
        try:
            if self.kv is not None:
                self.kv.close()
        finally:
            self.server.kill_all()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _read(self) -> State:
        assert self.kv is not None
        return {"d": self.d.copy(), "l": self.lst.copy(), "ns": self.ns.to_dict()}

    def _down(self, how: str) -> None:
        assert self.kv is not None
        self.kv.close()
        self.kv = None
        if how == "stop":
            assert self.server.stop() == 0
        else:
            self.server.kill()

    def _up(self, *more: str) -> None:
        self.server.start(*more)
        self._connect()

    def _newest_segment(self) -> Path:
        return log_files(self.server.data_dir)[-1]

    # valid and invalid requests

    @rule(key=_KEYS, value=_VALUES)
    def set_key(self, key: str, value: Any) -> None:
        self.d[key] = value
        self._mutated("d_set", key, value)

    @rule(key=_KEYS)
    def delete_key(self, key: str) -> None:
        if key in self.model["d"]:
            del self.d[key]
            self._mutated("d_del", key)
        else:
            with pytest.raises(KeyError):
                del self.d[key]

    @rule(key=_KEYS)
    def get_key(self, key: str) -> None:
        if key in self.model["d"]:
            assert self.d[key] == self.model["d"][key]
        else:
            with pytest.raises(KeyError):
                self.d[key]

    @rule(key=_KEYS, by=_NUMBERS)
    def incr_key(self, key: str, by: float) -> None:
        current = self.model["d"].get(key, 0)
        if _is_number(current):
            assert self.d.incr(key, by) == current + by
            self._mutated("d_incr", key, by)
        else:
            with pytest.raises(TypeError):
                self.d.incr(key, by)

    @rule(value=_VALUES)
    def append(self, value: Any) -> None:
        self.lst.append(value)
        self._mutated("l_append", value)

    @rule()
    def pop(self) -> None:
        if self.model["l"]:
            assert self.lst.pop() == self.model["l"][-1]
            self._mutated("l_pop")
        else:
            with pytest.raises(IndexError):
                self.lst.pop()

    @rule(attr=st.sampled_from(["x", "y"]), value=_VALUES)
    def set_attribute(self, attr: str, value: Any) -> None:
        setattr(self.ns, attr, value)
        self._mutated("ns_set", attr, value)

    @rule()
    def wrong_kind(self) -> None:
        assert self.kv is not None
        with pytest.raises(KVError):
            self.kv.list("d")

    @rule()
    def compact(self) -> None:
        assert self.kv is not None
        before = self.kv.stats()["persistence"]["compactions"]
        assert self.kv.compact() is True
        deadline = time.monotonic() + 10
        while self.kv.stats()["persistence"]["compactions"] == before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        self._new_segment()

    # restarts and damage

    @rule(how=st.sampled_from(["stop", "kill"]))
    def restart(self, how: str) -> None:
        self._down(how)
        self._up()
        self._new_segment()

    @rule(tail=st.sampled_from(["header", "payload", "zeros"]), cut=st.integers(1, 11))
    def torn_tail(self, tail: str, cut: int) -> None:
        """A crash in the middle of appending a write that was never acknowledged."""
        self._down("kill")
        payload = msgpack.packb(["d", "__setitem__", ["never", "acknowledged"], None])
        head = struct.pack(">II", len(payload), zlib.crc32(payload))
        record = head + struct.pack(">I", zlib.crc32(head)) + payload
        torn = {
            "header": record[:cut],
            "payload": record[: RECORD_HEADER + cut],
            "zeros": bytes(cut * 100),
        }[tail]
        with self._newest_segment().open("ab") as fh:
            fh.write(torn)
        self._up()
        self._new_segment()

    @precondition(lambda self: self.ops)
    @rule(data=st.data())
    def damage_newest_segment(self, data: st.DataObject) -> None:
        """A flipped bit: refuse to start; with --repair, keep a prefix of what was logged."""
        self._down("kill")
        segment = self._newest_segment()
        size = segment.stat().st_size
        flip(segment, _offset(data, size), data.draw(st.integers(0, 7)))
        assert f"{segment} is damaged at offset" in self.server.refuses()
        self._up("--repair")
        kept = self._read()
        prefixes = [copy.deepcopy(self.base)]
        for op in self.ops:
            prefixes.append(copy.deepcopy(prefixes[-1]))
            _apply(prefixes[-1], *op)
        assert kept in prefixes, "repair kept something that is not a prefix of the log"
        self.model = kept
        self._down("stop")
        self._up()  # what repair kept is on disk, not just in that run's memory
        self._new_segment()

    @rule(data=st.data())
    def damage_elsewhere_refuses(self, data: st.DataObject) -> None:
        """Damage in the snapshot or an older segment refuses to start, whatever the bit."""
        self._down("stop")
        newest = self._newest_segment()
        files = [
            p for p in sorted(self.server.data_dir.glob("*.kv[sl]")) if p != newest and records(p)
        ]
        if files:
            target = data.draw(st.sampled_from(files))
            original = target.read_bytes()
            at = _offset(data, len(original))
            flip(target, at, data.draw(st.integers(0, 7)))
            assert f"{target} is damaged at offset" in self.server.refuses()
            target.write_bytes(original)
        self._up()
        self._new_segment()

    @invariant()
    def agrees_with_the_model(self) -> None:
        # Checked after every step, so after every restart too.
        if self.kv is not None:
            assert self._read() == self.model


def _apply(state: State, op: str, a: Any, b: Any) -> None:
    if op == "d_set":
        state["d"][a] = b
    elif op == "d_del":
        del state["d"][a]
    elif op == "d_incr":
        state["d"][a] = state["d"].get(a, 0) + b
    elif op == "l_append":
        state["l"].append(a)
    elif op == "l_pop":
        state["l"].pop()
    elif op == "ns_set":
        state["ns"][a] = b


DiskModel.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestModelSurvivesRestartsAndDamage = pytest.mark.timeout(480)(DiskModel.TestCase)
