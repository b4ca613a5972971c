"""What a failover to a replica that fell behind does to acknowledged writes and locks (issue 16).

README's guarantees table says that on the Valkey/Redis backend acknowledged writes can be lost
on failover and a fencing token can be issued twice, and that ``durability="replica"`` closes
both. These tests make that happen on a real cluster (tests/redis_cluster.py), each on a
cluster of its own because each kills a master, and assert exact counts, so a change of the
behaviour either way fails here.

How the replica falls behind: it is stopped (SIGSTOP) and its master drops the replication
link (``CLIENT KILL TYPE replica``), as a partition between the two would; the stopped
replica cannot reconnect, so the master acknowledges writes no replica receives. Then the
master is killed (SIGKILL), the replica continued (SIGCONT), and the cluster promotes it
without those writes. Stopping the replica alone loses nothing, and a test shows it: the
kernel keeps accepting the replication stream into the stopped process's socket buffer, and
the replica reads it on waking before it takes over.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import kvclient
from kvclient._redis._nodes import _Learnt
from kvclient.retry import Retry
from tests.redis_cluster import Cluster, Node, require, running_cluster

pytestmark = pytest.mark.timeout(120)

WRITES = 40
# The hash tag of kvclient's keys of container NAME is {NAME} (kvclient._redis._backend).
PROBE = "kv{%s}:probe"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A 3-master / 3-replica cluster of this test's own (it will lose a master)."""
    require()
    with running_cluster(3, 1) as running:
        yield running


def _url(cluster: Cluster) -> str:
    return "redis-cluster://" + ",".join(cluster.seeds)


def _stall_replica(cluster: Cluster, name: str, cut: bool = True) -> tuple[Node, Node]:
    """Stop the replica of container ``name``'s master (and cut its link); return both.

    Everything written to the master so far is on the replica first (checked).
    """
    master = cluster.master_of(PROBE % name)
    assert master is not None
    replica = cluster.replica_of(master)
    assert master.replicated(PROBE % name) == 1
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGSTOP)
    if cut:
        assert master.cli("client", "kill", "type", "replica").strip() == "1"
    return master, replica


def _fail_over(cluster: Cluster, name: str, master: Node, replica: Node) -> float:
    """Kill ``master``, wake ``replica``, wait until it serves ``name``; return the seconds."""
    cluster.kill(master)
    killed = time.monotonic()
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGCONT)
    while cluster.master_of(PROBE % name, ask=replica) is not replica:
        assert time.monotonic() < killed + 30, "the stalled replica did not take over in 30 s"
        time.sleep(0.1)
    return time.monotonic() - killed


@pytest.mark.parametrize("cut", [True, False], ids=["link-cut", "paused-only"])
def test_acknowledged_writes_are_lost_when_the_replica_fell_behind(
    cluster: Cluster, cut: bool
) -> None:
    url = _url(cluster)
    with kvclient.connect(url, durability="replica") as confirmed:
        confirmed.dict("stall")["before"] = "confirmed"
    with kvclient.connect(url, retry=Retry(retries=40)) as kv:
        d = kv.dict("stall")
        master, replica = _stall_replica(cluster, "stall", cut=cut)
        for i in range(WRITES):
            d[i] = i  # acknowledged by the master
        assert len(d) == WRITES + 1
        took = _fail_over(cluster, "stall", master, replica)
        kept = sum(1 for i in range(WRITES) if i in d)
        assert d["before"] == "confirmed"
        if cut:
            # Every write the master acknowledged after the link was cut is gone.
            assert (kept, len(d)) == (0, 1), f"{kept} of {WRITES} kept"
        else:
            # Paused only: the replica had them all in its socket buffer.
            assert (kept, len(d)) == (WRITES, WRITES + 1), f"{kept} of {WRITES} kept"
    print(f"failover {took:.1f}s after the kill; {kept} of {WRITES} acknowledged writes kept")


def test_durability_replica_refuses_what_a_failover_would_lose(cluster: Cluster) -> None:
    url = _url(cluster)
    with kvclient.connect(url, durability="replica", call_timeout=0.5, retry=None) as kv:
        d = kv.dict("stall")
        for i in range(5):
            d[i] = i  # each confirmed by a replica
        master, replica = _stall_replica(cluster, "stall")
        refused = 0
        for i in range(5, 10):
            with pytest.raises(kvclient.KVConnectionError, match="no replica confirmed"):
                d[i] = i
            refused += 1
        assert refused == 5 and len(d) == 10  # applied on the master, never acknowledged
        _fail_over(cluster, "stall", master, replica)
    with kvclient.connect(url, retry=Retry(retries=40)) as kv:
        # Every acknowledged write survived; the refused ones died with the master.
        assert kv.dict("stall").copy() == {i: i for i in range(5)}


@pytest.mark.parametrize("durability", [None, "replica"])
def test_a_fencing_token_is_issued_twice_unless_grants_are_confirmed(
    cluster: Cluster, durability: str | None
) -> None:
    url = _url(cluster)
    with kvclient.connect(url, durability="replica") as setup, setup.lock("fence") as first:
        assert first == 1  # confirmed: the replica has last_token 1
    with kvclient.connect(url, durability=durability, call_timeout=0.5, retry=None) as early:
        master, replica = _stall_replica(cluster, "fence")
        lock = early.lock("fence", lease=30)
        if durability is None:
            assert lock.acquire(timeout=5) is True
            assert lock.token == 2  # handed out by the master, never replicated
        else:
            with pytest.raises(kvclient.KVConnectionError, match="no replica confirmed"):
                lock.acquire(timeout=5)  # granted on the master, refused to the caller
        _fail_over(cluster, "fence", master, replica)
        with kvclient.connect(url, retry=Retry(retries=40)) as late:
            later = late.lock("fence", lease=30)
            assert later.acquire(timeout=10) is True
            # The promoted replica never saw the grant of token 2: it issues 2 again.
            assert later.token == 2
            status = late.lock("fence").status()
            assert [h["owner"] for h in status["holders"]] == [late.owner_id]
            later.release()
        if durability is None:
            # Two clients were granted the lock with fencing token 2.
            assert lock.token == later.token


def _calls(node: Node, command: str) -> int:
    for line in node.cli("info", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


def test_durability_replica_confirms_with_wait_where_waitaof_cannot_serve(
    redis_cluster_url: str, redis_cluster_session: Cluster
) -> None:
    """``WAITAOF 1 1`` needs Redis 7.2 (every Valkey) and the master's AOF on; else ``WAIT 1``.

    The harness runs without AOF (and this machine's redis-server is 7.0), so this is the
    ``WAIT`` path; a node wrongly believed to have ``WAITAOF`` refuses it, and the retry
    confirms with ``WAIT`` and applies the call once.
    """
    with kvclient.connect(redis_cluster_url, durability="replica") as kv:
        d = kv.dict("aof")
        nodes: Any = kv._backend.nodes  # type: ignore[attr-defined]
        target = nodes.node_for(b"kv{aof}:m")
        master = next(n for n in redis_cluster_session.nodes if n.port == target[1])
        waits = _calls(master, "wait")
        d["k"] = 1
        assert nodes._aof[target].aof is None  # 7.0: no WAITAOF
        waited = _calls(master, "wait")
        assert waited > waits and _calls(master, "waitaof") == 0
        nodes._aof[target] = _Learnt(
            (True, 1), time.monotonic()
        )  # as if it had WAITAOF, its AOF and a replica's on
        assert d.incr("n") == 1  # WAITAOF refused, retried with WAIT, applied once
        assert nodes._aof[target].aof is None
        assert d.copy() == {"k": 1, "n": 1}
        assert _calls(master, "wait") == waited + 1
