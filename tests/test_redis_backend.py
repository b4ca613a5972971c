"""The Valkey/Redis backend beyond the conformance suite: lost replies, routing, peers' bugs.

The conformance suite (every test taking `kv`) runs against `redis-cluster` and
`redis-standalone` too (tests/backends.py). Here: what only this backend has (a lost reply
over a real socket to a real redis-server, the slot routing, the URL forms at connect) and
the bugs peers are known for, as conformance tests that would catch them on any backend.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import kvclient
from kvclient.retry import ConstantBackoff, Retry
from tests import redis_workers
from tests.redis_cluster import available
from tests.targets import Target

SPAWN = mp.get_context("spawn")

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


class RespChaosProxy:
    """A TCP proxy to a redis-server that loses the reply of every ``every``-th script.

    The server has run the script (and its request-id record); the client only sees its
    connection die. Without the request id checked inside the script, kvclient's retry
    would apply it a second time. Commands are parsed only to spot ``EVALSHA``/``EVAL``.
    """

    def __init__(self, target: tuple[str, int], every: int) -> None:
        self.target = target
        self.every = every
        self.dropped = 0
        self.scripts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._conns += [client, server]
            drop = threading.Event()
            threading.Thread(target=self._up, args=(client, server, drop), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, drop), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, drop: threading.Event) -> None:
        buffer = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                return
            if not data:
                server.close()
                return
            buffer += data
            # Count the scripts in what arrived (a command's name is its first bulk string).
            for name in (b"\r\nEVALSHA\r\n", b"\r\nEVAL\r\n"):
                for _ in range(buffer.count(name)):
                    with self._lock:
                        self.scripts += 1
                        if self.scripts % self.every == 0:
                            drop.set()
            buffer = buffer[-16:]
            try:
                server.sendall(data)
            except OSError:
                return

    def _down(self, server: socket.socket, client: socket.socket, drop: threading.Event) -> None:
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                data = b""
            if not data or drop.is_set():
                if data:
                    with self._lock:
                        self.dropped += 1
                for sock in (client, server):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()
                return
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._listener.close()
        for sock in self._conns:
            sock.close()


@pytest.fixture
def chaos(redis_standalone_url: str) -> Iterator[RespChaosProxy]:
    host, port = redis_standalone_url.removeprefix("redis://").removesuffix("/0").split(":")
    proxy = RespChaosProxy((host, int(port)), every=7)
    yield proxy
    proxy.close()


def test_lost_replies_are_never_applied_twice(
    chaos: RespChaosProxy, redis_standalone_url: str
) -> None:
    errors: list[BaseException] = []
    fast = Retry(ConstantBackoff(0.001), retries=10)
    got: list[Any] = []

    def work() -> None:
        try:
            with kvclient.connect(f"redis://{chaos.address}/0", retry=fast) as c:
                d, lst, q = c.dict("d"), c.list("l"), c.queue("q")
                for i in range(60):
                    d.incr("n")
                    lst.append(i)
                    q.put(i)
                    d.setdefault(("k", i % 7), i)
                for _ in range(60):
                    got.append(q.get(timeout=10))
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
        assert kv.dict("d")["n"] == 180
        assert Counter(kv.list("l").copy()) == Counter({i: 3 for i in range(60)})
        assert kv.queue("q").qsize() == 0
    assert Counter(got) == Counter({i: 3 for i in range(60)})  # each item got exactly once


def test_a_blocked_get_whose_reply_is_lost_keeps_its_item(
    chaos: RespChaosProxy, redis_standalone_url: str
) -> None:
    """Getters wait in BLMOVE before anything is put; replies are lost on the way back."""
    fast = Retry(ConstantBackoff(0.001), retries=20)
    got: list[Any] = []
    errors: list[BaseException] = []

    def getter() -> None:
        try:
            with kvclient.connect(f"redis://{chaos.address}/0", retry=fast) as c:
                q = c.queue("handoff")
                for _ in range(20):
                    got.append(q.get(timeout=20))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=getter) for _ in range(2)]
    for t in threads:
        t.start()
    with kvclient.connect(redis_standalone_url) as kv:
        q = kv.queue("handoff")
        for i in range(40):
            q.put(i)
            if i % 5 == 0:
                threading.Event().wait(0.05)  # let the getters block again
        for t in threads:
            t.join(60)
        assert errors == []
        assert sorted(got) == list(range(40))  # none dropped, none twice
        assert q.qsize() == 0


def test_a_container_lives_in_one_slot_whatever_its_name(kv: kvclient.Client) -> None:
    """Names with braces, percent signs and unicode: one container each, all operations."""
    for name in ["{x}", "a}b{c", "%7B", "{", "}", "ünï {tag} %", "x" * 1000]:
        d = kv.dict(name)
        d.update({1: "one", (1, 2): b"\x00", "s": {"nested": [1, (2,)]}})
        assert d.setdefault(1.0, "other") == "one"
        assert d.items() == [(1, "one"), ((1, 2), b"\x00"), ("s", {"nested": [1, (2,)]})]
    assert {n for n in kv.names() if n.startswith(("{", "}", "a}", "%", "ü"))} == {
        "{x}",
        "a}b{c",
        "%7B",
        "{",
        "}",
        "ünï {tag} %",
    }


def test_dict_key_identity_follows_python(kv: kvclient.Client) -> None:
    d = kv.dict("ids")
    d[1] = "int"
    d[1.0] = "float"
    d[True] = "bool"
    assert len(d) == 1 and d.keys() == [1] and d[1] == "bool"  # the first key stays, as in Python
    d[2.0] = "two"
    assert d.keys() == [1, 2.0] and type(d.keys()[1]) is float and d[2] == "two"
    d[(1, 2.0)] = "t"
    assert d[(True, 2)] == "t" and (1.0, 2) in d
    assert d.pop(2) == "two" and 2.0 not in d
    d[0.5] = 1
    assert d.get(0.5) == 1 and d.incr(0.5, 1) == 2 and d.incr(3.0) == 1 and d.incr(3) == 2
    with pytest.raises(TypeError):
        d[[1]] = "unhashable"


# -- peers' bugs, as tests that would catch them on any backend ---------------------------------


def test_setdefault_races_from_four_processes_agree(kv: kvclient.Client, kv_target: Target) -> None:
    """pottery's read-then-write setdefault: 4 racing threads disagreed in 149/200 rounds."""
    rounds = 50
    barrier = SPAWN.Barrier(4)
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=redis_workers.setdefault_racer, args=(kv_target, me, rounds, barrier, out)
        )
        for me in range(4)
    ]
    for p in procs:
        p.start()
    seen = dict(out.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    d = kv.dict("race")
    for r in range(rounds):
        answers = {seen[me][r] for me in range(4)}
        assert answers == {d[f"k{r}"]}, f"round {r}: the racers saw {answers}"


@pytest.mark.parametrize("seed", range(3))
def test_list_slice_assignment_matches_python(kv: kvclient.Client, seed: int) -> None:
    """pottery's list slice assignment corrupted data; every slice form against a local list."""
    import random

    rng = random.Random(seed)
    lst = kv.list(f"slices{seed}", initial=range(12))
    local = list(range(12))
    for _ in range(60):
        start, stop = rng.choice([None, -20, -3, 0, 2, 5, 30]), rng.choice([None, -1, 3, 8, 40])
        step = rng.choice([None, 1, 2, -1, -2, 3])
        values = [rng.randrange(100) for _ in range(rng.randrange(5))]
        where = slice(start, stop, step)
        op = rng.choice(["set", "del", "get"])
        if op == "set":
            try:
                local[where] = values
            except ValueError as exc:
                with pytest.raises(ValueError, match="extended slice"):
                    lst[where] = values
                assert "extended slice" in str(exc)
                continue
            lst[where] = values
        elif op == "del":
            del local[where]
            del lst[where]
        else:
            assert lst[where] == local[where]
        assert lst.copy() == local, f"after {op} {where} {values}"


def test_queue_blocking_get_wakes_in_order_and_times_out(kv: kvclient.Client) -> None:
    q = kv.queue("waits", maxsize=1)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    q.put("a")
    with pytest.raises(queue.Full):
        q.put("b", timeout=0.2)
    assert q.get(timeout=1) == "a"
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    threading.Event().wait(0.2)
    q.put(("tuple", b"bytes"))
    t.join(10)
    assert got == [("tuple", b"bytes")]


def test_connect_refuses_an_authkey_and_reports_unreachable_nodes() -> None:
    with pytest.raises(ValueError, match="authkey= is kvserve's"):
        kvclient.connect("redis://127.0.0.1:1/0", authkey=b"k" * 32)
    with pytest.raises(kvclient.KVConnectionError, match=r"127\.0\.0\.1:1"):
        kvclient.connect("redis-cluster://127.0.0.1:1", retry=None)


# -- durability="replica" and failover ------------------------------------------------------


def test_durability_replica_confirms_writes_or_raises(
    redis_cluster_url: str, redis_standalone_url: str
) -> None:
    with kvclient.connect(redis_cluster_url, durability="replica") as kv:
        d = kv.dict("confirmed")
        for i in range(20):
            d[i] = i
        assert d.incr("n") == 1 and len(d) == 21
    # A standalone server has no replica: the write is applied, never confirmed, and says so.
    with kvclient.connect(
        redis_standalone_url, durability="replica", call_timeout=0.2, retry=None
    ) as kv:
        d = kv.dict("unconfirmed")
        with pytest.raises(kvclient.KVConnectionError, match="no replica confirmed"):
            d["k"] = 1
        assert kv.dict("unconfirmed")["k"] == 1  # applied on the master all the same
    with pytest.raises(ValueError, match="durability= is for Valkey/Redis"):
        kvclient.connect("127.0.0.1:1", durability="replica")


def _master_of(cluster: Any, key: bytes, ask: Any = None) -> Any:
    """Return the harness node serving ``key``'s slot as master (as node ``ask`` sees it)."""
    return cluster.master_of(key.decode(), ask)


@pytest.mark.parametrize("durability", [None, "replica"])
def test_a_killed_master_fails_over_and_writers_continue(durability: str | None) -> None:
    """kill -9 the master of a counter under load from 3 processes: they all finish.

    Exactly-once holds either way (a total above what was asked would be a retry applied
    twice). With ``durability="replica"`` every acknowledged increment is on the replica
    that takes over, so the total is exact; without, writes not yet replicated may be lost.
    The killed node is restarted and rejoins as the new master's replica: until it has
    synced, ``durability="replica"`` writes are refused (no replica to confirm them) and
    retried.
    """
    from tests.redis_cluster import running_cluster

    n, procs = 150, 3
    with running_cluster() as cluster:
        url = "redis-cluster://" + ",".join(cluster.seeds)
        workers = [
            SPAWN.Process(target=redis_workers.incr_worker, args=(url, "load", n, durability))
            for _ in range(procs)
        ]
        for w in workers:
            w.start()
        with kvclient.connect(url, retry=Retry(retries=40)) as kv:
            d = kv.dict("load")
            deadline = time.monotonic() + 60
            while d.get("n", 0) < n // 2:
                assert time.monotonic() < deadline, "the workers made no progress"
                time.sleep(0.02)
            victim = _master_of(cluster, b"kv{load}:m")
            assert victim is not None
            cluster.kill(victim)  # SIGKILL
            killed_at = time.monotonic()
            # Restart it only once its replica has taken over: a node without persistence
            # that came back first would still be master of its slots, and empty.
            witness = next(node for node in cluster.nodes if node is not victim)
            while _master_of(cluster, b"kv{load}:m", witness) in (victim, None):
                assert time.monotonic() < killed_at + 30, "no failover within 30 s"
                time.sleep(0.1)
            failover = time.monotonic() - killed_at
            cluster.restart(victim)
            for w in workers:
                w.join(90)
                assert w.exitcode == 0, "a writer did not ride out the failover"
            took = time.monotonic() - killed_at
            total = d["n"]
            done = kv.dict("done")["workers"]
        assert total <= n * procs, f"{total} > {n * procs}: a retry was applied twice"
        assert done <= procs, f"{done} > {procs}: a retry was applied twice"
        if durability == "replica":
            # Without it, acknowledged writes not yet replicated may be lost in the failover
            # (the guarantees table): a run here lost one worker's final "done" increment.
            assert (total, done) == (n * procs, procs)
        print(
            f"failover after {failover:.1f}s; writers done {took:.1f}s after the kill; "
            f"total {total}/{n * procs}"
        )


def test_watch_and_ttl_are_a_clear_not_supported_error(redis_standalone_url: str) -> None:
    # The guarantees table: watch, TTL and ephemeral keys are kvserve's so far. On this
    # backend each says so at once, naming the feature, and changes nothing.
    with kvclient.connect(redis_standalone_url) as kv:
        d = kv.dict("features")
        d["k"] = 1
        calls: dict[str, Any] = {
            "watch": lambda: next(iter(d.watch(timeout=1))),
            "revision": d.revision,
            "ttl": lambda: d.set("k", 2, ttl=30),
            "expire": lambda: d.expire("k", 30),
            "ephemeral": lambda: d.set("k", 2, ephemeral=True),
        }
        for what, call in calls.items():
            with pytest.raises(kvclient.NotSupportedError, match="Valkey/Redis backend") as info:
                call()
            assert isinstance(info.value, NotImplementedError), what
        assert d["k"] == 1
