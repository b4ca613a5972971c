"""Long operations do not freeze other clients (issue 12), and dump/restore stream (issue 18).

Against real ``kvserve`` subprocesses on loopback, bounded in time: while a dump or a restore
of a million keys runs (far more than ``--max-frame`` in all), a probe client on another
connection is answered within 1 s, every time; the dump and the restore are exact; a dump
written with ``-o`` appears whole or not at all; the restored data survives a restart (the
pieces are logged as they are applied).
"""

from __future__ import annotations

import dataclasses
import os
import pty
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvproto.codec import Codec
from tests import test_faults_wire
from tests.test_cli import kvctl_script
from tests.test_faults_disk import small_disk
from tests.test_faults_wire import Prober, Target

pytestmark = pytest.mark.timeout(180)
make_target = test_faults_wire.make_target  # the fixtures: kvserve subprocesses under attack
target = test_faults_wire.target

KEYS = 1_000_000
SMALL_FRAME = "4194304"  # --max-frame 4 MiB: the data set is ~10x that


def _fill(target: Target, keys: int) -> dict[str, Any]:
    expected: dict[str, Any] = {}
    with target.client(timeout=30, call_timeout=60) as kv:
        d = kv.dict("big")
        chunk = 50_000
        for start in range(0, keys, chunk):
            part = {f"key:{i:07d}": f"value-{i:013d}" for i in range(start, start + chunk)}
            d.update(part)
            expected.update(part)
        kv.list("l").extend(list(range(20_000)))
        kv.queue("q").put((1, b"x"))
    return expected


def _kvctl(target: Target, *args: str, **kwds: Any) -> subprocess.CompletedProcess[bytes]:
    env = dict(target.env, KV_AUTHKEY=target.authkey.decode())
    return subprocess.run(
        [kvctl_script(), "-a", target.address, *args],
        env=env,
        capture_output=True,
        timeout=150,
        check=False,
        **kwds,
    )


@pytest.fixture
def big(make_target: Callable[..., Target]) -> Iterator[tuple[Target, dict[str, Any]]]:
    target = make_target("--max-frame", SMALL_FRAME)
    yield target, _fill(target, KEYS)


def test_long_a_dump_far_above_max_frame_streams_while_others_are_served(
    big: tuple[Target, dict[str, Any]], make_target: Callable[..., Target], tmp_path: Path
) -> None:
    target, expected = big
    out = tmp_path / "backup.msgpack"
    with Prober(target) as prober:
        dumped = _kvctl(target, "dump", "-o", str(out))
    assert dumped.returncode == 0, dumped.stderr
    prober.assert_answered()
    assert out.stat().st_size > 4 * int(SMALL_FRAME)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # The summary line, and no progress bar when stderr is not a terminal.
    assert b"dumped 4 containers, 1020004 items" in dumped.stderr
    assert b"\r" not in dumped.stderr
    # Exactly what dumping in one piece produced (the file format did not change).
    data = Codec().unpack(out.read_bytes())
    assert data["format"] == 1
    by_name = {name: (kind, state) for name, kind, state in data["containers"]}
    assert by_name["big"] == ("dict", expected)
    assert by_name["l"] == ("list", list(range(20_000)))
    assert by_name["precious"] == ("dict", target.seeded)

    # Restore into a persistent server, again far above its --max-frame, probed meanwhile.
    fresh = make_target("--max-frame", SMALL_FRAME, data=True)
    with fresh.client() as kv:
        kv.drop("precious")  # restore wants an empty server
    with Prober(fresh) as prober, out.open("rb") as fh:
        restored = _kvctl(fresh, "restore", stdin=fh)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == b"4\n"
    assert b"restored 4 containers, 1020004 items" in restored.stderr
    prober.assert_answered()
    for server in ("restored", "restarted"):
        with fresh.client(timeout=30, call_timeout=60) as kv:
            assert kv.dict("big").copy() == expected, server
            assert kv.list("l").copy() == list(range(20_000))
            assert kv.queue("q").get_nowait() == (1, b"x")
            kv.queue("q").put((1, b"x"))
        if server == "restored":
            fresh.restart()  # the pieces were logged as they were applied
    fresh.assert_serving()


def test_long_client_dump_and_restore_round_trip_in_pieces(
    make_target: Callable[..., Target],
) -> None:
    target = make_target("--max-frame", "1048576")
    with target.client() as kv:
        d = kv.dict("d")
        for start in range(0, 30_000, 1000):
            d.update({(i, "t"): [i, {"n": "v" * 100}] for i in range(start, start + 1000)})
        kv.list("refs").append(d)
        kv.lock("lk").acquire()
        with Prober(target) as prober:
            dump = kv.dump()
        prober.assert_answered()
    fresh = make_target("--max-frame", "1048576")
    with fresh.client() as kv:
        kv.drop("precious")
        assert kv.restore(dump) == 4
        assert kv.dump() == _plain_refs(dump, kv)
        with pytest.raises(ValueError, match="empty server"):
            kv.restore(dump)
    fresh.assert_serving()


def _plain_refs(value: Any, kv: kvclient.Client) -> Any:
    # Refs decode as proxies of the client that read them: compare through this client's.
    if isinstance(value, kvclient.Proxy):
        return kv.dict(value._name)
    if isinstance(value, list):
        return [_plain_refs(v, kv) for v in value]
    if isinstance(value, dict):
        return {k: _plain_refs(v, kv) for k, v in value.items()}
    return value


def test_long_a_failed_dump_leaves_no_file_and_frees_its_cursor(
    target: Target, tmp_path: Path
) -> None:
    out = tmp_path / "backup.msgpack"
    before = set(tmp_path.iterdir())
    # A server that is not there: no file, no temporary, a connection error (exit 3).
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    failed = _kvctl(
        dataclasses.replace(target, address=f"127.0.0.1:{port}"), "dump", "-o", str(out)
    )
    assert failed.returncode == 3, failed.stderr
    assert set(tmp_path.iterdir()) == before
    # A sink that fails mid-dump closes the cursor on the server (4 may be open at once).
    with target.client() as kv:
        kv.dict("more").update({i: i for i in range(20_000)})

        def open_sink(header: dict[str, Any]) -> Callable[[list[Any]], None]:
            def sink(record: list[Any]) -> None:
                raise OSError(28, "No space left on device")

            return sink

        for _ in range(5):
            with pytest.raises(OSError, match="No space"):
                kv.dump_stream(open_sink)
        assert len(kv.dump()["containers"]) == 2
    target.assert_serving()


def test_long_a_dump_onto_a_full_disk_is_a_usage_error_and_leaves_nothing(
    target: Target, tmp_path: Path
) -> None:
    with target.client() as kv:
        kv.dict("more").update({i: "x" * 100 for i in range(20_000)})  # ~2.5 MB dumped
    with small_disk(tmp_path / "full", 256 * 1024) as disk:
        out = disk / "backup.msgpack"
        failed = _kvctl(target, "dump", "-o", str(out))
        assert failed.returncode == 2, failed.stderr
        assert b"cannot write" in failed.stderr and b"No space" in failed.stderr
        assert list(disk.iterdir()) == []  # neither the file nor its temporary
    target.assert_serving()


def test_long_dump_cursors_are_bounded_and_the_connections_own(target: Target) -> None:
    with target.client() as kv, target.client() as other:
        cursors = [kv.call(None, None, "dump_open", [])["cursor"] for _ in range(4)]
        with pytest.raises(ValueError, match="already open on this connection"):
            kv.call(None, None, "dump_open", [])
        with pytest.raises(ValueError, match="no dump cursor"):
            other.call(None, None, "dump_next", [cursors[0]])  # not its cursor
        piece = kv.call(None, None, "dump_next", [cursors[0]])
        assert piece[0][0] == "precious"
        assert kv.call(None, None, "dump_next", [cursors[0]]) is None  # the end closes it
        with pytest.raises(ValueError, match="no dump cursor"):
            kv.call(None, None, "dump_next", [cursors[0]])
        with pytest.raises(TypeError, match="takes no arguments"):
            kv.call(None, None, "dump_open", [cursors[1]])  # never read as a close
        assert kv.call(None, None, "dump_close", [cursors[1]]) is True
    target.assert_serving()


def test_long_a_bad_restore_piece_changes_nothing(target: Target) -> None:
    codec = Codec()
    with target.client() as kv:
        kv.drop("precious")
        good = ["a", "dict", {"k": 1}, 0]
        for records, first in (
            ([good, ["b", "dict", [1], 1]], True),  # a later part before its part 0
            ([good, ["a", "dict", {"x": 1}, 0]], True),  # part 0 twice
            ([good, ["c", "nosuchkind", {}, 0]], True),
            ([good, ["a", "list", [1], 1]], True),  # a part that does not fit
            ([good, "nonsense"], True),
            ([good], "yes"),
        ):
            with pytest.raises((ValueError, kvclient.NoSuchContainerError, TypeError)):
                kv.call(None, None, "restore_part", [codec.pack(records), first])
            assert kv.names() == {}
        assert kv.call(None, None, "restore_part", [codec.pack([good]), True]) == 1
        with pytest.raises(ValueError, match="empty server"):
            kv.call(None, None, "restore_part", [codec.pack([]), True])
        assert (
            kv.call(None, None, "restore_part", [codec.pack([["a", "dict", {"y": 2}, 1]]), False])
            == 0
        )
        assert kv.dict("a").copy() == {"k": 1, "y": 2}
        kv.dict("live")["own"] = 1  # made by a client, not by the restore
        with pytest.raises(kvclient.NoSuchContainerError, match="of this restore"):
            kv.call(
                None, None, "restore_part", [codec.pack([["live", "dict", {"x": 1}, 1]]), False]
            )
        assert kv.dict("live").copy() == {"own": 1}


def test_long_dump_and_restore_show_progress_on_a_terminal(
    make_target: Callable[..., Target], tmp_path: Path
) -> None:
    target = make_target()
    _fill(target, 300_000)
    out = tmp_path / "backup.msgpack"
    controller, terminal = pty.openpty()
    try:
        env = dict(target.env, KV_AUTHKEY=target.authkey.decode())
        proc = subprocess.run(
            [kvctl_script(), "-a", target.address, "dump", "-o", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            timeout=120,
            check=False,
        )
        os.close(terminal)
        terminal = -1
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0, seen
    assert b"\rdump [" in seen and b"items" in seen
    assert b"dumped 4 containers, 320004 items" in seen
