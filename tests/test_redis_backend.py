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
