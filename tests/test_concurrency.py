"""Several real client processes and clients against one store: exact totals, no lost items.

Conformance tests: the workers get `kv_target` and connect through the same implementation.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from collections import Counter
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest

import kvclient
from tests.targets import ClientFactory, Target

SPAWN = mp.get_context("spawn")


def _incr_worker(target: Target, times: int) -> None:
    with target.connect() as kv:
        d = kv.dict("counters")
        for _ in range(times):
            d.incr("hits")


def _run_all(procs: list[Any], timeout: float = 60) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def test_incr_from_many_processes_is_exact(kv: kvclient.Client, kv_target: Target) -> None:
    n_procs, per_proc = 4, 250
    args = (kv_target, per_proc)
    _run_all([SPAWN.Process(target=_incr_worker, args=args) for _ in range(n_procs)])
    assert kv.dict("counters")["hits"] == n_procs * per_proc


def _read_modify_write(target: Target, barrier: Barrier, atomic: bool) -> None:
    # Both processes read, then meet at the barrier, then write: the interleaving that loses
    # an update happens every time instead of by luck.
    with target.connect() as kv:
        d = kv.dict("race")
        if atomic:
            barrier.wait(30)
            d.incr("n")
        else:
            value = d["n"]
            barrier.wait(30)
            d["n"] = value + 1


@pytest.mark.parametrize("atomic", [False, True], ids=["read-modify-write", "incr"])
def test_read_modify_write_loses_updates_but_incr_does_not(
    kv: kvclient.Client, kv_target: Target, atomic: bool
) -> None:
    kv.dict("race")["n"] = 0
    barrier = SPAWN.Barrier(2)
    args = (kv_target, barrier, atomic)
    _run_all([SPAWN.Process(target=_read_modify_write, args=args) for _ in range(2)])
    # d[k] = d[k] + 1 from two processes: both read 0, both write 1; one update is lost.
    assert kv.dict("race")["n"] == (2 if atomic else 1)


def _producer(target: Target, start: int, count: int) -> None:
    with target.connect() as kv:
        q = kv.queue("jobs", maxsize=50)  # bounded: producers also block and wake
        for i in range(start, start + count):
            q.put(i)


def _consumer(target: Target, out_name: str) -> None:
    with target.connect() as kv:
        q = kv.queue("jobs", maxsize=50)
        got = kv.list(out_name)
        batch = []
        while True:
            item = q.get(timeout=30)
            if item is None:
                break
            batch.append(item)
        got.extend(batch)


def test_queue_across_processes_delivers_every_item_exactly_once(
    kv: kvclient.Client, kv_target: Target
) -> None:
    n_producers, per_producer, n_consumers = 3, 300, 3
    consumers = [
        SPAWN.Process(target=_consumer, args=(kv_target, f"got{i}")) for i in range(n_consumers)
    ]
    producers = [
        SPAWN.Process(target=_producer, args=(kv_target, i * per_producer, per_producer))
        for i in range(n_producers)
    ]
    for p in consumers + producers:
        p.start()
    for p in producers:
        p.join(60)
        assert p.exitcode == 0
    q = kv.queue("jobs", maxsize=50)
    for _ in consumers:
        q.put(None)  # one stop marker per consumer
    for p in consumers:
        p.join(60)
        assert p.exitcode == 0
    seen: Counter[int] = Counter()
    for i in range(n_consumers):
        seen.update(kv.list(f"got{i}").copy())
    assert sorted(seen) == list(range(n_producers * per_producer))
    assert set(seen.values()) == {1}


def test_blocked_get_does_not_stall_other_clients(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    result: list[Any] = []
    waiter, other = kv, kv_factory()
    wq = waiter.queue("slow")

    def blocked_get() -> None:
        result.append(wq.get(timeout=20))

    thread = threading.Thread(target=blocked_get)
    thread.start()
    time.sleep(0.2)  # let the get park on the server
    d = other.dict("busy")
    for i in range(200):  # served while the other client waits
        d[i] = i
    assert len(d) == 200
    assert thread.is_alive()
    other.queue("slow").put("wake up")
    thread.join(20)
    assert result == ["wake up"]


def test_waiters_are_served_in_fifo_order(kv: kvclient.Client, kv_factory: ClientFactory) -> None:
    order: list[tuple[int, Any]] = []
    clients = [kv_factory() for _ in range(3)]
    threads = []
    for i, client in enumerate(clients):
        q = client.queue("fifo")

        def get(i: int = i, q: kvclient.QueueProxy = q) -> None:
            order.append((i, q.get(timeout=20)))

        t = threading.Thread(target=get)
        t.start()
        threads.append(t)
        time.sleep(0.15)  # park in a known order
    q = kv.queue("fifo")  # the producer: another client than the three waiting
    for item in ("a", "b", "c"):
        q.put(item)
    for t in threads:
        t.join(20)
    assert sorted(order) == [(0, "a"), (1, "b"), (2, "c")]


def test_a_client_can_be_shared_by_threads(kv: kvclient.Client) -> None:
    d = kv.dict("threads")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                d.incr("n")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert d["n"] == 800


def _blocking_getter(target: Target) -> None:
    with target.connect() as kv:
        kv.queue("handoff").get()  # parks forever, until the process is killed


def test_dead_client_parked_get_does_not_swallow_an_item(
    kv: kvclient.Client, kv_target: Target
) -> None:
    getter = SPAWN.Process(target=_blocking_getter, args=(kv_target,))
    getter.start()
    deadline = time.monotonic() + 30
    while kv.stats()["clients"] < 2:  # wait until the getter is connected
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # and parked in get()
    getter.kill()
    getter.join(10)
    while kv.stats()["clients"] > 1:  # the server noticed the dead connection
        assert time.monotonic() < deadline
        time.sleep(0.05)
    q = kv.queue("handoff")
    q.put("precious")
    assert q.get(timeout=5) == "precious"


def test_get_timeout_zero_is_immediate(kv: kvclient.Client) -> None:
    with pytest.raises(queue.Empty):
        kv.queue("z").get(timeout=0)
