"""Durability with real processes and real files: restarts, kill -9, torn and damaged logs."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvclient.proxies import to_ref
from kvserve import KVManager, Server
from kvserve.persistence import Persistence, PersistenceError
from tests.conftest import start_kvserve
from tests.durable import DurableServer


@pytest.fixture
def durable(clean_env: dict[str, str], authkey: bytes, tmp_path: Path) -> Iterator[DurableServer]:
    server = DurableServer(dict(clean_env, KV_AUTHKEY=authkey.decode()), tmp_path / "data", authkey)
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def _fill_every_kind(kv: kvclient.Client) -> None:
    d = kv.dict("d")
    d.update({"s": "str", "b": b"\x00bytes", "t": (1, (2, "x")), "n": None, "f": 1.5})
    d[("tuple", "key")] = [1, {"nested": [b"x"]}]
    d["big"] = 2**80
    d.incr("counter", 5)
    d["ref"] = kv.list("l")
    lst = kv.list("l")
    lst.extend([1, 2, 3])
    lst[0:1] = ["zero", "one"]
    lst.pop()
    ns = kv.namespace("ns")
    ns.x = 1
    ns.incr("x", 2)
    q = kv.queue("q", maxsize=7)
    for i in range(4):
        q.put(i)
    q.get()
    kv.dict("dropped")["x"] = 1
    kv.drop("dropped")


def _plain(value: Any) -> Any:
    """Proxies as (kind, name): a proxy's identity includes the server address, which changes."""
    if isinstance(value, kvclient.Proxy):
        ref = to_ref(value)
        assert ref is not None
        return ("proxy", ref.kind, ref.name)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _expected_contents(kv: kvclient.Client) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in kv.names().items():
        if kind == "dict":
            out[name] = _plain(kv.dict(name).copy())
        elif kind == "list":
            out[name] = kv.list(name).copy()
        elif kind == "namespace":
            out[name] = kv.namespace(name).to_dict()
        else:
            q = kv.queue(name)
            out[name] = (q.maxsize, q.qsize())
    return out


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_keeps_every_kind_of_container_and_value(durable: DurableServer, how: str) -> None:
    durable.start()
    with durable.client() as kv:
        _fill_every_kind(kv)
        before = _expected_contents(kv)
    if how == "sigterm":
        assert durable.stop() == 0
    else:
        durable.kill()
    durable.start()
    with durable.client() as kv:
        after = _expected_contents(kv)
        assert after == before
        assert set(kv.names()) == {"d", "l", "ns", "q"}
        ref = kv.dict("d")["ref"]
        assert isinstance(ref, kvclient.ListProxy)
        assert ref.copy() == ["zero", "one", 2]
        assert kv.dict("d")["b"] == b"\x00bytes"
        assert kv.queue("q").get_nowait() == 1
        with pytest.raises(ValueError, match="maxsize 7"):
            kv.queue("q", maxsize=1)
    assert durable.stop() == 0
    assert re.search(r"kvserve INFO loaded [0-9.]+ MiB from .* s: 4 containers, ", durable.stderr)


def test_in_memory_server_says_so(kvserve_proc: Any) -> None:
    kvserve_proc.proc.terminate()
    _, err = kvserve_proc.proc.communicate(timeout=30)
    assert kvserve_proc.proc.returncode == 0
    assert "data is in memory only (use --data-dir to keep it)" in err


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_kill_9_at_random_points_loses_no_acknowledged_write(
    durable: DurableServer, fsync: str
) -> None:
    """A writer keeps going while the server is killed and restarted under it, four times.

    The client's retries ride through each restart, and request ids make every retried call
    apply exactly once, so the totals are exact, not merely "nothing lost".
    """
    durable.extra = ["--fsync", fsync]
    durable.start()
    port = durable.address.rsplit(":", 1)[1]
    durable.extra += ["--port", port]  # restart on the same port, as a supervisor would
    rng = random.Random(1234)
    acked_keys: list[str] = []
    acked_incrs = 0
    acked_puts: list[int] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        nonlocal acked_incrs
        try:
            with durable.client() as kv:
                d, q = kv.dict("acked"), kv.queue("acked-q")
                seq = 0
                while not stop.is_set():
                    seq += 1
                    d[f"k{seq}"] = seq
                    acked_keys.append(f"k{seq}")
                    d.incr("counter")
                    acked_incrs += 1
                    q.put(seq)
                    acked_puts.append(seq)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    for _round in range(4):
        time.sleep(rng.uniform(0.1, 0.5))
        durable.kill()
        durable.start()
    time.sleep(0.3)
    stop.set()
    thread.join(60)
    assert not failure, failure
    with durable.client() as kv:
        stored = kv.dict("acked").copy()
        assert [k for k in acked_keys if k not in stored] == []
        assert stored["counter"] == acked_incrs  # exactly once, across four kill -9s
        q = kv.queue("acked-q")
        items = [q.get_nowait() for _ in range(q.qsize())]
        assert items == acked_puts  # every put once, in order
    assert len(acked_keys) > 20  # the test wrote enough to mean something


def _log_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("log.*.kvl"))


def test_torn_tail_is_truncated_with_a_warning(durable: DurableServer) -> None:
    durable.start()
    with durable.client() as kv:
        d = kv.dict("d")
        for i in range(10):
            d[f"k{i}"] = i
    durable.kill()
    log_file = _log_files(durable.data_dir)[-1]
    size = log_file.stat().st_size
    with log_file.open("r+b") as fh:
        fh.truncate(size - 3)  # the last record (k9) loses its tail
    durable.start()
    with durable.client() as kv:
        assert kv.dict("d").copy() == {f"k{i}": i for i in range(9)}
        kv.dict("d")["after"] = 1  # and the server appends after the truncation point
    durable.stop()
    assert "torn record" in durable.stderr
    durable.start()
    with durable.client() as kv:
        assert kv.dict("d")["after"] == 1
    durable.stop()


def test_damage_in_the_middle_refuses_to_start_then_repair_keeps_the_prefix(
    durable: DurableServer,
) -> None:
    durable.start()
    with durable.client() as kv:
        d = kv.dict("d")
        for i in range(20):
            d[f"k{i}"] = "v" * 50
    durable.kill()
    log_file = _log_files(durable.data_dir)[-1]
    data = bytearray(log_file.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    log_file.write_bytes(bytes(data))

    proc = start_kvserve(durable.env, "--data-dir", str(durable.data_dir))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == ""
    assert str(log_file) in err
    assert "damaged at offset" in err
    assert "--repair" in err
    assert "Traceback" not in err

    durable.start("--repair")
    with durable.client() as kv:
        kept = kv.dict("d").copy()
        assert 0 < len(kept) < 20
        assert kept == {f"k{i}": "v" * 50 for i in range(len(kept))}  # a prefix, in order
    durable.stop()
    aside = list(durable.data_dir.glob("*.damaged-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == bytes(data)  # moved aside, never deleted


def test_unknown_format_version_refuses_to_start(durable: DurableServer) -> None:
    durable.start()
    with durable.client() as kv:
        kv.dict("d")["k"] = 1
    durable.stop()
    log_file = _log_files(durable.data_dir)[-1]
    data = bytearray(log_file.read_bytes())
    data[8:12] = (99).to_bytes(4, "big")
    log_file.write_bytes(bytes(data))
    proc = start_kvserve(durable.env, "--data-dir", str(durable.data_dir))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "format version 99" in err


def test_two_servers_on_one_data_directory(durable: DurableServer) -> None:
    durable.start()
    proc = start_kvserve(durable.env, "--data-dir", str(durable.data_dir))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == ""
    assert f"in use by another kvserve (pid {durable.proc.pid if durable.proc else ''})" in err
    with durable.client() as kv:  # the first one is unaffected
        kv.ping()


@pytest.fixture
def persistent_server(tmp_path: Path, authkey: bytes) -> Iterator[tuple[Server, Persistence]]:
    persistence = Persistence(tmp_path / "data", "no", compact_at=1 << 30)
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, persistence=persistence).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, persistence
    srv.stop()
    assert srv.wait_stopped(10)
    thread.join(10)


def test_compaction_during_concurrent_writes_loses_nothing_and_shrinks_the_directory(
    persistent_server: tuple[Server, Persistence], authkey: bytes, tmp_path: Path
) -> None:
    srv, persistence = persistent_server
    stop = threading.Event()
    errors: list[BaseException] = []
    final: dict[str, int] = {}

    def overwrite(worker: int) -> None:
        try:
            with kvclient.connect(srv.endpoint, authkey) as kv:
                d = kv.dict("hot")
                i = 0
                while not stop.is_set() or i < 300:
                    key = f"w{worker}-{i % 50}"
                    d[key] = i
                    final[key] = i
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=overwrite, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    size_before = persistence.disk_bytes()
    with kvclient.connect(srv.endpoint, authkey) as kv:
        assert kv.compact() is True
        time.sleep(0.2)
        persistence.wait_compaction(30)
        assert kv.compact() is True  # and once more while writes continue
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    persistence.wait_compaction(30)
    with kvclient.connect(srv.endpoint, authkey) as kv:
        assert kv.compact() is True
        persistence.wait_compaction(30)
        assert kv.dict("hot").copy() == final
    assert persistence.compactions == 3
    assert persistence.disk_bytes() < size_before / 2, (persistence.disk_bytes(), size_before)

    srv.stop()
    assert srv.wait_stopped(10)
    # A new server on the same directory sees exactly the final values.
    again = Persistence(tmp_path / "data", "no")
    srv2 = KVManager(("127.0.0.1", 0), authkey=authkey, persistence=again).get_server()
    try:
        assert srv2.store.objects["hot"].state() == final
    finally:
        srv2.close()


def test_dump_then_restore_into_a_fresh_server(
    kv: kvclient.Client, tmp_path: Path, authkey: bytes
) -> None:
    _fill_every_kind(kv)
    expected = _expected_contents(kv)
    dump = kv.dump()
    srv = KVManager(("127.0.0.1", 0), authkey=authkey).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with kvclient.connect(srv.endpoint, authkey) as fresh:
            assert fresh.restore(dump) == 4
            assert _expected_contents(fresh) == expected
            with pytest.raises(ValueError, match="empty server"):
                fresh.restore(dump)
            with pytest.raises(ValueError, match="not a kvmanager dump"):
                fresh.restore({"format": 99})
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


def test_compact_without_data_dir_is_a_clear_error(kv: kvclient.Client) -> None:
    with pytest.raises(ValueError, match="--data-dir"):
        kv.compact()


def test_persistence_rejects_a_locked_directory_in_process(tmp_path: Path) -> None:
    from kvserve.manager import KVManager as M
    from kvserve.store import Store

    first = Persistence(tmp_path / "d")
    first.open(Store(M._registry))
    try:
        with pytest.raises(PersistenceError, match=f"pid {os.getpid()}"):
            Persistence(tmp_path / "d").open(Store(M._registry))
    finally:
        first.close()


def test_large_containers_are_snapshotted_in_parts_and_load_back(
    persistent_server: tuple[Server, Persistence], authkey: bytes, tmp_path: Path
) -> None:
    srv, persistence = persistent_server
    big = {f"key:{i:06d}": i for i in range(25_001)}  # three parts and a bit
    items = [[i, str(i)] for i in range(20_000)]
    with kvclient.connect(srv.endpoint, authkey) as kv:
        kv.dict("big").set_many(big)
        kv.dict("empty")
        kv.list("items").extend(items)
        assert kv.compact() is True
        persistence.wait_compaction(60)
    srv.stop()
    assert srv.wait_stopped(10)
    again = Persistence(tmp_path / "data", "no")
    srv2 = KVManager(("127.0.0.1", 0), authkey=authkey, persistence=again).get_server()
    try:
        assert srv2.load_report is not None
        assert srv2.load_report.log_records == 0  # everything came from the snapshot
        assert srv2.load_report.snapshot_records >= 3 + 2 + 1
        assert srv2.store.objects["big"].state() == big
        assert srv2.store.objects["empty"].state() == {}
        assert srv2.store.objects["items"].state() == items
    finally:
        srv2.close()
