"""Time to live: keys that expire at their deadline for every reader, across restarts.

Tests taking only `kv` are conformance tests; the restart tests start `kvserve` processes.
Deadlines are checked with generous bounds (the suite runs on a loaded 2-vCPU machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import kvclient
from tests.test_watch import _start, _stop


def _wait_gone(d: kvclient.DictProxy, key: str, limit: float) -> float:
    start = time.monotonic()
    while key in d:
        assert time.monotonic() - start < limit, f"{key!r} still there after {limit} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_key_with_a_ttl_vanishes_for_every_reader(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    d = kv.dict("cache")
    assert d.set("k", "v", ttl=0.6) is True
    assert d["k"] == "v"
    left = d.ttl("k")
    assert left is not None and 0 < left <= 0.6
    waited = _wait_gone(kv2.dict("cache"), "k", 20)
    assert waited > 0.2  # it did not vanish at once
    assert d.get("k") is None
    assert len(d) == 0
    assert d.keys() == []


def test_expiry_is_a_change_watchers_see_without_any_reader(kv: kvclient.Client) -> None:
    d = kv.dict("expiring")
    d.set("session", 1, ttl=0.5)
    start = time.monotonic()
    watch = d.watch(since=0, timeout=20)
    events = [next(watch), next(watch)]  # nobody reads the key: the server's timer removes it
    elapsed = time.monotonic() - start
    assert [(e.op, e.key, e.revision) for e in events] == [
        ("set", "session", 1),
        ("expire", "session", 2),
    ]
    assert 0.3 < elapsed < 20
    assert d.revision() == 2


def test_expire_ttl_persist(kv: kvclient.Client) -> None:
    d = kv.dict("meta")
    d["a"] = 1
    assert d.ttl("a") is None
    assert d.expire("a", 30) is True
    left = d.ttl("a")
    assert left is not None and 29 < left <= 30
    assert d.expire("missing", 30) is False
    with pytest.raises(KeyError):
        d.ttl("missing")
    assert d.persist("a") is True
    assert d.persist("a") is False
    assert d.ttl("a") is None
    d.expire("a", 30)
    d["a"] = 2  # a plain write clears the ttl, as Redis SET does
    assert d.ttl("a") is None
    d.set("b", 1, ttl=30)
    d.incr("b")  # incr keeps it
    assert d.ttl("b") is not None
    # Setting or clearing a deadline is not a change of the value: no event.
    assert [(e.op, e.key) for e in d.watch(0, timeout=0)] == [
        ("set", "a"),
        ("set", "a"),
        ("set", "b"),
        ("set", "b"),
    ]


def test_nx_sets_only_an_absent_key(kv: kvclient.Client) -> None:
    d = kv.dict("locks")
    assert d.set("owner", "me", nx=True, ttl=30) is True
    assert d.set("owner", "you", nx=True) is False
    assert d["owner"] == "me"
    d.set("brief", 1, ttl=0.3)
    _wait_gone(d, "brief", 20)
    assert d.set("brief", 2, nx=True) is True


def test_expired_and_deleted_keys_do_not_come_back(kv: kvclient.Client) -> None:
    d = kv.dict("gone")
    d.set("a", 1, ttl=0.3)
    del d["a"]
    d["a"] = 2  # no ttl now: the old deadline must not remove it
    d.set("b", 1, ttl=0.3)
    d.update({"b": 2})
    time.sleep(0.8)
    assert d.copy() == {"a": 2, "b": 2}


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), 1e12, True, "3"])
def test_a_bad_ttl_is_refused_by_client_and_server(kv: kvclient.Client, ttl: object) -> None:
    d = kv.dict("bad")
    d["k"] = 1
    with pytest.raises((TypeError, ValueError)):
        d.set("k", 1, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        d.expire("k", ttl)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        kv.call("dict", "bad", "set", ["k", 1, ttl, False])
    with pytest.raises((TypeError, ValueError)):
        kv.call("dict", "bad", "set_ttl", ["k", ttl])
    assert d.ttl("k") is None


def test_the_server_owns_the_clock(kv: kvclient.Client) -> None:
    kv.dict("clock")
    with pytest.raises(kvclient.ProtocolError, match="'now' is set by the server"):
        kv.call("dict", "clock", "set", ["k", 1, 30, False], {"now": 0.0})


def test_many_keys_expire_in_deadline_order(kv: kvclient.Client) -> None:
    d = kv.dict("many")
    for i in range(50):
        d.set(i, i, ttl=0.2 + (49 - i) * 0.01)
    watch = d.watch(since=50, timeout=20)
    expired = [next(watch).key for _ in range(50)]
    assert sorted(expired) == list(range(50))
    # The timer may take several due keys in one pass; passes come in deadline order.
    assert expired.index(49) < expired.index(0)
    assert len(d) == 0


# -- kvserve: deadlines across restarts -------------------------------------------------------


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


@pytest.mark.parametrize("compact", [False, True], ids=["log", "snapshot"])
def test_deadlines_survive_a_restart_and_are_not_extended(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path, compact: bool
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    data = ["--data-dir", str(tmp_path / "data"), "--fsync", "always"]
    proc, address = _start(env, *data)
    port = address.rsplit(":", 1)[1]
    try:
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("c")
            d.set("short", 1, ttl=1.5)
            d.set("long", 2, ttl=60)
            d["forever"] = 3
            if compact:
                kv.compact()
        time.sleep(0.3)
        _kill(proc)
        time.sleep(1.5)  # "short" passes its deadline while the server is down
        proc, address = _start(env, *data, "--port", port)
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("c")
            start = time.monotonic()
            while "short" in d:
                assert time.monotonic() - start < 5, "an expired key outlived the restart"
                time.sleep(0.02)
            left = d.ttl("long")
            assert left is not None and left < 59.8  # measured from before the restart
            assert d.ttl("forever") is None
            events = [(e.op, e.key) for e in d.watch(since=0, timeout=0)]
            assert events[-1] == ("expire", "short")
    finally:
        _stop(proc)
