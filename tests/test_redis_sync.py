"""The synchronization primitives' layout and exclusion on a real Redis Cluster (issue 16).

About the Valkey/Redis backend itself, so not conformance tests: where its keys are (every key
of one primitive in one hash slot, the bug that makes python-redis-lock's ``lock:NAME`` and
``lock-signal:NAME`` unusable on a cluster), mutual exclusion with exact totals from several
processes on a 3-master cluster, with locks on every master, and lost replies of acquires and
releases (a real socket cut after redis-server ran the script) retried exactly once. The
behaviour is specified in the conformance tests (tests/test_sync.py, tests/test_sync_leases.py),
which run on redis-cluster and redis-standalone too (tests/backends.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

import kvclient
from kvclient.retry import ConstantBackoff, Retry
from tests import test_redis_backend
from tests.redis_cluster import Cluster, available, running_cluster
from tests.test_redis_backend import RespChaosProxy

pytestmark = pytest.mark.timeout(180)
chaos = test_redis_backend.chaos  # the fixture: a proxy losing every 7th script's reply

SPAWN = mp.get_context("forkserver")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = available()
    if reason is not None:
        if os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}:
            pytest.fail(f"the cluster tests must run in CI: {reason}")
        pytest.skip(reason)
    running = Cluster(3, 0).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def url(cluster: Cluster) -> str:
    for node in cluster.nodes:
        redis.Redis(port=node.port).flushall()
    return "redis-cluster://" + ",".join(cluster.seeds)


def _all_keys(cluster: Cluster) -> list[bytes]:
    keys: list[bytes] = []
    for node in cluster.nodes:
        keys.extend(redis.Redis(port=node.port).scan_iter(count=1000))
    return keys


def _tag(name: str) -> bytes:
    escaped = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return f"kv{{{escaped}}}:".encode()


def test_every_key_of_a_primitive_is_in_its_one_slot(cluster: Cluster, url: str) -> None:
    names = ["plain", "a{b}c", "}{", "100%"]
    with kvclient.connect(url) as kv, kvclient.connect(url) as other:
        blocked: list[threading.Thread] = []

        def block(target: object) -> None:
            thread = threading.Thread(target=target)  # type: ignore[arg-type]
            thread.start()
            blocked.append(thread)

        for name in names:
            lock = kv.lock(f"L{name}")
            assert lock.acquire() is True
            other.lock(f"L{name}").release()  # released by another owner: remembered as lost
            assert lock.acquire() is True
            block(lambda n=name: other.lock(f"L{n}").acquire(timeout=1.5))
            sem = kv.semaphore(f"S{name}", 1)
            assert sem.acquire() is True
            block(lambda n=name: other.semaphore(f"S{n}").acquire(timeout=1.5))
            block(lambda n=name: other.event(f"E{n}").wait(1.5))
            block(lambda n=name: _barrier_wait(other, f"B{n}"))
            block(lambda n=name: _condition_wait(other, f"C{n}"))
        time.sleep(0.7)  # every waiter registered and asleep on its wake list
        keys = _all_keys(cluster)
        for thread in blocked:
            thread.join(10)
    by_primitive: dict[bytes, list[bytes]] = {}
    for key in keys:
        assert key.startswith(b"kv{"), key  # nothing outside a container's tag
        prefix = key[: key.index(b"}:") + 2]
        by_primitive.setdefault(prefix, []).append(key)
    for kind in "LSEBC":
        for name in names:
            found = by_primitive.get(_tag(kind + name), [])
            assert found, (kind, name)
            assert {key_slot(key) for key in found} == {key_slot(_tag(kind + name) + b"m")}
    # The auxiliary keys exist while waiting (blocked calls, wake lists, lost owners): the
    # check above covered more than the meta key.
    lock_keys = by_primitive[_tag("Lplain")]
    assert len(lock_keys) >= 4, lock_keys


def _barrier_wait(kv: kvclient.Client, name: str) -> None:
    try:
        kv.barrier(name, 2).wait(1.5)
    except threading.BrokenBarrierError:
        pass


def _condition_wait(kv: kvclient.Client, name: str) -> None:
    cond = kv.condition(name)
    with cond:
        cond.wait(1.5)


def _locked_increments(url: str, names: list[str], cycles: int) -> None:
    with kvclient.connect(url) as kv:
        totals = kv.dict("totals")
        for i in range(cycles):
            name = names[i % len(names)]
            with kv.lock(name):
                totals[name] = totals.get(name, 0) + 1  # read-modify-write: racy without it


def _names_on_every_master(kv: kvclient.Client, count: int) -> list[str]:
    """Return lock names whose slots are served by every master in turn."""
    nodes = kv._backend.nodes  # type: ignore[attr-defined]
    masters = nodes.masters()
    found: dict[tuple[str, int], str] = {}
    i = 0
    while len(found) < len(masters):
        name = f"m{i}"
        found.setdefault(nodes.node_for(_tag(name) + b"m"), name)
        i += 1
    return sorted(found.values())[:count]


def test_locks_give_mutual_exclusion_from_several_processes_with_exact_totals(url: str) -> None:
    with kvclient.connect(url) as kv:
        names = _names_on_every_master(kv, 3)
        kv.dict("totals").update(dict.fromkeys(names, 0))
        procs = [SPAWN.Process(target=_locked_increments, args=(url, names, 150)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        assert kv.dict("totals").copy() == dict.fromkeys(names, 4 * 150 // 3)
        for name in names:
            status = kv.lock(name).status()
            assert status["last_token"] == 4 * 150 // 3  # one token per acquisition, no gaps
            assert (status["locked"], status["waiters"]) == (False, 0)


def test_lost_replies_of_acquires_and_releases_are_applied_once(
    chaos: RespChaosProxy, redis_standalone_url: str
) -> None:
    fast = Retry(ConstantBackoff(0.001), retries=10)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with kvclient.connect(f"redis://{chaos.address}/0", retry=fast) as c:
                lock, sem, total = c.lock("m"), c.bounded_semaphore("s", 2), c.dict("d")
                for _ in range(40):
                    with lock:
                        total["n"] = total.get("n", 0) + 1
                    with sem:
                        pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert chaos.dropped > 20  # many replies really were lost
    with kvclient.connect(redis_standalone_url) as kv:
        assert kv.dict("d")["n"] == 120
        # A retried acquire got its recorded token instead of a second one; a retried release
        # its recorded answer instead of "does not hold it".
        status = kv.lock("m").status()
        assert (status["last_token"], status["locked"], status["waiters"]) == (120, False, 0)
        sem = kv.bounded_semaphore("s", 2)
        assert (sem.get_value(), sem.status()["last_token"]) == (2, 120)


def test_a_lock_and_its_waiter_carry_on_across_a_master_failover() -> None:
    """kill -9 the master serving a held lock with a waiter: the release and the wait retry
    (kvclient's Retry outlasts the 2 s node timeout) and the waiter gets the next token."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with running_cluster(3, 1) as cluster:
        url = "redis-cluster://" + ",".join(cluster.seeds)
        with kvclient.connect(url) as holder, kvclient.connect(url) as other:
            lock = holder.lock("failover", lease=10.0)
            assert lock.acquire() is True
            first = lock.token
            got: list[bool] = []
            waiter = threading.Thread(
                target=lambda: got.append(other.lock("failover").acquire(timeout=60))
            )
            waiter.start()
            deadline = time.monotonic() + 10
            while lock.status()["waiters"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            nodes = holder._backend.nodes  # type: ignore[attr-defined]
            _host, port = nodes.node_for(_tag("failover") + b"m")
            master = next(node for node in cluster.nodes if node.port == port)
            # The hold and the waiter's place reached the replica before the kill (a WAIT on
            # a connection of its own that wrote nothing would prove nothing).
            assert master.replicated((_tag("failover") + b"probe").decode(), 2000) == 1
            cluster.kill(master)
            started = time.monotonic()
            lock.release()  # fails over to the replica, retried within the Retry window
            waiter.join(60)
            assert got == [True]
            status = holder.lock("failover").status()
            assert [h["owner"] for h in status["holders"]] == [other.owner_id]
            assert status["holders"][0]["token"] == (first or 0) + 1
            assert time.monotonic() - started < 30


def test_durability_replica_confirms_acquires_and_releases_or_raises(
    redis_cluster_url: str, redis_standalone_url: str
) -> None:
    with kvclient.connect(redis_cluster_url, durability="replica") as kv:
        lock = kv.lock("confirmed")
        for _ in range(5):
            with lock:
                pass
        assert lock.status()["last_token"] == 5
    # A standalone server has no replica: the grant is applied but never confirmed, and the
    # acquire says so instead of handing out a token a failover could issue again.
    with kvclient.connect(
        redis_standalone_url, durability="replica", call_timeout=0.2, retry=None
    ) as kv:
        with pytest.raises(kvclient.KVConnectionError, match="no replica confirmed"):
            kv.lock("unconfirmed").acquire()
        assert kv.lock("unconfirmed").status()["last_token"] == 1
