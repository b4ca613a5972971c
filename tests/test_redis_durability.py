"""``durability="replica"`` where the master keeps an AOF and its replica does not.

``WAITAOF`` counts only replicas that fsync an AOF, so confirming with it where no replica
keeps one timed out on every write that ``WAIT`` confirms. Now the client learns, per master,
whether it and its replicas keep an AOF (each replica asked itself) and asks ``WAITAOF`` for
as many replicas as keep one, else ``WAIT`` (kvclient/_redis/_nodes.py).

Real redis-server processes: a master with ``appendonly yes`` and its replica with ``no``
(then ``yes`` by ``CONFIG SET``). This machine's redis-server is 7.0, which has no
``WAITAOF``: what runs here is what the client learns from real servers, which command it
would send for it, and the ``WAIT`` writes; a 7.2 server answering ``WAITAOF`` is not.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import kvclient
from kvclient._redis._nodes import _RELEARN_AFTER, Nodes, _Learnt, waitaof_counts
from tests.redis_cluster import available, free_port_pair

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def _spawn(port: int, directory: Path, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--dir", str(directory), "--save", "", "--logfile", "redis.log", *options),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _until(condition: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if condition():
                return True
        except redis.RedisError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture
def pair() -> Iterator[tuple[int, int, list[subprocess.Popen[bytes]]]]:
    """A master keeping an AOF and its replica keeping none: their ports, their processes."""
    base = Path(tempfile.mkdtemp(prefix="kv-aof-"))
    master_port = free_port_pair(set())
    replica_port = free_port_pair({master_port, master_port + 1})
    (base / "m").mkdir()
    (base / "r").mkdir()
    procs = [_spawn(master_port, base / "m", "--appendonly", "yes")]
    procs.append(
        _spawn(
            replica_port,
            base / "r",
            "--appendonly",
            "no",
            "--replicaof",
            "127.0.0.1",
            str(master_port),
        )
    )
    try:
        with redis.Redis(port=master_port) as m:
            assert _until(
                lambda: m.info("replication").get("slave0", {}).get("state") == "online", 30
            )
        yield master_port, replica_port, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_waitaof_is_asked_for_as_many_replicas_as_keep_an_aof() -> None:
    assert waitaof_counts(True, 1, 1) == (1, 1)  # master and a replica fsync
    assert waitaof_counts(False, 1, 1) == (0, 1)  # a master without AOF refuses numlocal 1
    assert waitaof_counts(True, 2, 1) == (1, 1)
    assert waitaof_counts(True, 0, 1) is None  # the case of this file: WAIT
    assert waitaof_counts(False, 0, 1) is None
    assert waitaof_counts(True, 1, 2) is None  # fewer replicas keep one than asked for


def test_the_client_learns_each_replicas_aof_from_the_replica(
    pair: tuple[int, int, list[subprocess.Popen[bytes]]], caplog: pytest.LogCaptureFixture
) -> None:
    master_port, replica_port, procs = pair
    master = ("127.0.0.1", master_port)
    nodes = Nodes([master], cluster=False, options={"socket_timeout": 5.0})
    try:
        assert nodes.replica_aofs(master) == [False]
        with redis.Redis(port=replica_port) as replica:
            replica.config_set("appendonly", "yes")
            assert _until(lambda: replica.info("persistence")["aof_enabled"] == 1, 30)
        assert nodes.replica_aofs(master) == [True]
        # What it would send, were the master 7.2+ (its AOF is on), for each replica count.
        nodes._aof[master] = _Learnt((True, sum(nodes.replica_aofs(master))), time.monotonic())
        assert nodes._confirmation(master, ("WAIT", 1, 500)) == ("WAITAOF", 1, 1, 500)
        nodes._aof[master] = _Learnt((True, 0), time.monotonic())
        assert nodes._confirmation(master, ("WAIT", 1, 500)) == ("WAIT", 1, 500)
        # A replica that does not answer (stopped) counts as keeping none, within 2 s, and
        # is warned of once (the client asks again every _RELEARN_AFTER s while it WAITs).
        os.kill(procs[1].pid, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="kvclient"):
                began = time.monotonic()
                assert nodes.replica_aofs(master) == [False]
                assert time.monotonic() - began < 2 * 2 + 3
                assert nodes.replica_aofs(master) == [False]
            warned = [r.getMessage() for r in caplog.records if r.name.startswith("kvclient")]
            assert len(warned) == 1, warned
            assert f"replica 127.0.0.1:{replica_port} of 127.0.0.1:{master_port}" in warned[0]
            assert "confirmed with WAIT" in warned[0]
        finally:
            os.kill(procs[1].pid, signal.SIGCONT)
    finally:
        nodes.close()


def test_a_waitaof_short_of_replicas_is_refused_and_learnt_anew(
    pair: tuple[int, int, list[subprocess.Popen[bytes]]],
) -> None:
    """A ``WAITAOF`` answer with too few fsyncs raises (retryable) and forgets what was learnt.

    The answers are given here as a 7.2 server would send them (this one has no ``WAITAOF``).
    """
    master = ("127.0.0.1", pair[0])
    nodes = Nodes([master], cluster=False, options={})
    try:
        nodes._aof[master] = _Learnt((True, 1), time.monotonic())
        assert nodes._confirmed(master, ("WAITAOF", 1, 1, 500), [1, 1]).enough
        assert master in nodes._aof
        short = nodes._confirmed(master, ("WAITAOF", 1, 1, 500), [1, 0])
        assert not short.enough and "answered 1 local, 0 replicas" in short.shortfall
        assert master not in nodes._aof  # the retry learns anew
        assert nodes._confirmed(master, ("WAITAOF", 0, 1, 500), [0, 1]).enough
        nodes._aof[master] = _Learnt((True, 0), time.monotonic())
        assert nodes._confirmed(master, ("WAIT", 1, 500), 1).enough
        assert master in nodes._aof
        assert not nodes._confirmed(master, ("WAIT", 1, 500), 0).enough
        assert master not in nodes._aof  # a short WAIT too: replicas may have changed
    finally:
        nodes.close()


def test_durable_writes_to_a_master_with_aof_and_a_replica_without_are_confirmed(
    pair: tuple[int, int, list[subprocess.Popen[bytes]]],
) -> None:
    """The issue's set-up: every write is confirmed (by ``WAIT``), none raises."""
    master_port, _replica_port, _procs = pair
    url = f"redis://127.0.0.1:{master_port}/0"
    with kvclient.connect(url, durability="replica", call_timeout=5.0) as kv:
        d = kv.dict("durable")
        for i in range(20):
            d[i] = i
        assert d.incr("n") == 1 and len(d) == 21
        q = kv.queue("jobs")
        q.put("a")
        assert q.get() == "a"
        nodes: Any = kv._backend.nodes  # type: ignore[attr-defined]
        assert nodes._aof[("127.0.0.1", master_port)].aof is None  # 7.0 here: no WAITAOF
    with redis.Redis(port=master_port) as m:
        stats = m.info("commandstats")
        assert stats["cmdstat_wait"]["calls"] >= 23 and "cmdstat_waitaof" not in stats


def _as_72(nodes: Nodes, master: tuple[str, int]) -> None:
    """Have ``nodes`` read ``master``'s ``INFO server`` as a 7.2 one's (this one is 7.0).

    Only the version it reports changes: its persistence and replication sections, and its
    replicas' answers, are the real server's.
    """
    client = nodes.client(master)
    real = client.info

    def info(section: Any = None, *args: Any, **kwargs: Any) -> Any:
        out = real(section, *args, **kwargs)
        return dict(out, redis_version="7.2.4") if section == "server" else out

    client.info = info  # type: ignore[method-assign]


def test_an_aof_replica_online_after_the_first_write_is_learnt() -> None:
    """A master first confirmed with ``WAIT`` (its AOF replica not online yet: starting,
    resyncing, added later) is asked again, at most every ``_RELEARN_AFTER`` s: its writes are
    then confirmed with ``WAITAOF``, not ``WAIT`` (memory only) for the client's whole life.

    Real redis-server processes (7.0 here) whose ``INFO server`` is read as 7.2's (see
    :func:`_as_72`); no ``WAITAOF`` is sent. The wait of ``_RELEARN_AFTER`` s is stood for by
    dating what was learnt that much earlier.
    """
    base = Path(tempfile.mkdtemp(prefix="kv-aof-"))
    master_port = free_port_pair(set())
    replica_port = free_port_pair({master_port, master_port + 1})
    (base / "m").mkdir()
    (base / "r").mkdir()
    procs = [
        _spawn(master_port, base / "m", "--appendonly", "yes"),
        _spawn(replica_port, base / "r", "--appendonly", "yes"),  # not a replica yet
    ]
    master = ("127.0.0.1", master_port)
    nodes = Nodes([master], cluster=False, options={"socket_timeout": 5.0})
    wait = ("WAIT", 1, 500)
    try:
        with redis.Redis(port=master_port) as m, redis.Redis(port=replica_port) as r:
            assert _until(lambda: m.ping() and r.ping(), 30)
            _as_72(nodes, master)
            assert nodes._confirmation(master, wait) == wait  # no replica online: WAIT
            assert nodes._aof[master].aof == (True, 0)
            r.replicaof("127.0.0.1", master_port)
            assert _until(
                lambda: m.info("replication").get("slave0", {}).get("state") == "online", 30
            )
            assert nodes._confirmation(master, wait) == wait  # not asked again at every write
            learnt = nodes._aof[master]
            nodes._aof[master] = learnt._replace(at=learnt.at - _RELEARN_AFTER)
            assert nodes._confirmation(master, wait) == ("WAITAOF", 1, 1, 500)
            assert nodes._aof[master].aof == (True, 1)
    finally:
        nodes.close()
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)
