"""Synchronization primitives: threading semantics, crash-safe leases, fencing tokens.

Multi-process tests run real client processes (bodies in tests/sync_workers.py) against the
store `kv` uses (`kv_target`) and check exact totals. Conformance tests, except the ones about
kvserve's own dump, restore and restarts at the end.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle  # to check what a pickled proxy carries; never used on the wire
import signal
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvserve import KVManager, Server
from kvserve.containers import Container
from kvserve.persistence import Persistence
from kvserve.sync import MAX_ARRAY_LENGTH, SYNC_KINDS, KVBarrier, KVCondition, KVLock
from tests import sync_workers
from tests.targets import ClientFactory, Target

# forkserver: one clean interpreter is started, then the children fork from it cheaply.
FORKSERVER = mp.get_context("forkserver")
FORKSERVER.set_forkserver_preload(
    ["kvclient", "tests.workers", "tests.sync_workers", "tests.backends"]
)


def _run_all(procs: list[Any], timeout: float = 30) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def _spawn(target: Callable[..., None], *args: Any) -> Any:
    return FORKSERVER.Process(target=target, args=args)


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _has_waiters(lock: kvclient.LockProxy, count: int) -> bool:
    return bool(lock.status()["waiters"] == count)


# -- Lock: mutual exclusion, leases, fencing ----------------------------------------------------


def test_lock_gives_mutual_exclusion_across_processes(
    kv: kvclient.Client, kv_target: Target
) -> None:
    n_procs, cycles = 4, 200
    kv.dict("shared")["total"] = 0
    _run_all([_spawn(sync_workers.mutex_worker, kv_target, cycles) for _ in range(n_procs)])
    # Unlocked, d[k] = d[k] + 1 from 4 processes loses updates (test_concurrency shows it).
    assert kv.dict("shared")["total"] == n_procs * cycles
    status = kv.lock("m").status()
    assert status["last_token"] == n_procs * cycles
    assert (status["locked"], status["waiters"]) == (False, 0)


def test_a_killed_holder_loses_the_lock_after_its_lease(
    kv: kvclient.Client, kv_target: Target
) -> None:
    holder = _spawn(sync_workers.hold_until_killed, kv_target, "k", 1.0)
    holder.start()
    try:
        first = kv.queue("k-tokens").get(timeout=20)
        lock = kv.lock("k", lease=1.0)
        assert lock.acquire(blocking=False) is False
        time.sleep(1.5)  # longer than the lease: the holder's renewals keep it
        assert lock.acquire(blocking=False) is False
        killed = time.monotonic()
        holder.kill()
        assert lock.acquire(timeout=10) is True
        waited = time.monotonic() - killed
        token = lock.token
        assert token is not None and token > first
        # Released by the lease (at most 1 s after the last renewal), not at once.
        assert 0.2 < waited < 2.5, waited
        lock.release()
    finally:
        holder.kill()
        holder.join(10)


def test_a_stalled_holder_is_fenced_off_and_its_late_release_fails(
    kv: kvclient.Client, kv_target: Target
) -> None:
    holder = _spawn(sync_workers.hold_stall_release, kv_target, "s", 1.0)
    holder.start()
    try:
        outcome = kv.queue("s-outcome")
        stale = outcome.get(timeout=20)
        os.kill(holder.pid, signal.SIGSTOP)  # a GC pause, a swapped-out VM...
        try:
            lock = kv.lock("s")
            assert lock.acquire(timeout=10) is True
            token = lock.token
            assert token is not None and token > stale
            # The fencing pattern: the resource refuses tokens older than the newest seen.
            newest = max(stale, token)
            assert [t >= newest for t in (stale, token)] == [False, True]
            kv.event("s-resume").set()
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        late = outcome.get(timeout=20)
        assert late.startswith("RuntimeError: cannot release lock: this client's lease on it")
        holder.join(10)
        assert holder.exitcode == 0
        # The late release changed nothing: the lock is still ours.
        holders = lock.status()["holders"]
        assert [(h["owner"], h["token"]) for h in holders] == [(kv.owner_id, token)]
        lock.release()
    finally:
        holder.kill()
        holder.join(10)


def test_renewals_keep_a_lock_past_its_lease_and_stop_when_released(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    lock = kv.lock("renewed", lease=0.8)
    assert lock.acquire() is True
    assert lock.token == 1
    started = time.monotonic()
    assert kv2.lock("renewed").acquire(timeout=2.0) is False  # 2.5 leases
    assert time.monotonic() - started >= 1.9
    assert lock.locked()
    assert kv.leases.renewing
    lock.release()
    _wait_until(lambda: not kv.leases.renewing, 5)
    again = kv2.lock("renewed")
    assert again.acquire(blocking=False) is True
    assert again.token == 2


def test_lock_acquire_timeouts_and_arguments_follow_threading(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    mine, theirs = kv.lock("t"), kv2.lock("t")
    assert mine.acquire(blocking=False) is True
    assert mine.token == 1
    assert theirs.acquire(blocking=False) is False
    assert theirs.acquire(timeout=0) is False
    started = time.monotonic()
    assert theirs.acquire(timeout=0.3) is False
    assert 0.25 < time.monotonic() - started < 2
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        theirs.acquire(False, 1)
    with pytest.raises(ValueError, match="timeout value must be positive"):
        theirs.acquire(timeout=-2)
    mine.release()
    with theirs as token:
        assert token == 2
        assert theirs.token == 2
    assert not mine.locked()


def test_lock_waiters_are_served_in_fifo_order_without_stalling_others(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    order: list[int] = []
    clients = [kv_factory() for _ in range(3)]
    lock = kv.lock("fifo")
    lock.acquire()
    threads = []
    for i, client in enumerate(clients):

        def take(i: int = i, client: kvclient.Client = client) -> None:
            waiter = client.lock("fifo")
            with waiter:
                order.append(i)

        t = threading.Thread(target=take)
        t.start()
        threads.append(t)
        _wait_until(functools.partial(_has_waiters, lock, i + 1))  # parked in this order
    other = kv.dict("busy")  # served while three clients wait
    for i in range(100):
        other[i] = i
    assert len(other) == 100
    lock.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2]
    assert lock.status()["last_token"] == 4


def test_any_client_may_release_a_lock_as_with_threading(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    lock, theirs = kv.lock("owned"), kv2.lock("owned")
    with pytest.raises(RuntimeError, match="cannot release lock: this client does not hold it"):
        theirs.release()  # nobody holds it
    assert lock.acquire() is True
    waiter_got: list[bool] = []
    waiter = threading.Thread(target=lambda: waiter_got.append(kv2.lock("owned").acquire()))
    waiter.start()
    _wait_until(functools.partial(_has_waiters, lock, 1))
    # Another client's release ends the holder's hold and wakes the next waiter, as a
    # threading.Lock released by another thread does.
    theirs.release()
    waiter.join(10)
    assert waiter_got == [True]
    assert [h["owner"] for h in lock.status()["holders"]] == [kv2.owner_id]
    with pytest.raises(RuntimeError, match="another client released what this client held"):
        lock.release()  # the former holder's own release now fails, and changes nothing
    assert [h["owner"] for h in lock.status()["holders"]] == [kv2.owner_id]
    theirs.release()
    # Any thread of a client may release it, as with threading.Lock.
    assert lock.acquire() is True
    errors: list[BaseException] = []

    def release() -> None:
        try:
            lock.release()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=release)
    t.start()
    t.join(10)
    assert errors == []
    assert not lock.locked()


def test_release_token_ends_only_the_hold_that_token_was_issued_to(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    lock, theirs = kv.lock("fenced"), kv2.lock("fenced")
    assert lock.acquire() is True
    token = lock.token
    assert token is not None
    assert theirs.release_token(token + 1) is False  # no hold has that token: nothing changes
    assert [h["owner"] for h in lock.status()["holders"]] == [kv.owner_id]
    waiter_got: list[bool] = []
    waiter = threading.Thread(target=lambda: waiter_got.append(kv2.lock("fenced").acquire()))
    waiter.start()
    _wait_until(functools.partial(_has_waiters, lock, 1))
    assert theirs.release_token(token) is True  # from another client: ends it, wakes the next
    waiter.join(10)
    assert waiter_got == [True]
    [holder] = lock.status()["holders"]
    assert holder["owner"] == kv2.owner_id and holder["token"] == token + 1
    with pytest.raises(RuntimeError, match="another client released what this client held"):
        lock.release()
    # The old token can never end the next holder's hold, unlike a release() by a non-holder.
    assert lock.release_token(token) is False
    assert [h["token"] for h in lock.status()["holders"]] == [token + 1]
    assert lock.release_token(token + 1) is True
    assert not lock.locked()
    assert lock.release_token(token + 1) is False  # released already
    with pytest.raises(TypeError, match="token must be an int"):
        lock.release_token("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="released only by the thread holding it"):
        kv.rlock("r").release_token(1)


def test_rlock_is_reentrant_and_owned_by_a_thread(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    rlock = kv.rlock("r")
    assert rlock.acquire() is True
    first = rlock.token
    assert first is not None
    assert rlock.acquire() is True
    assert rlock.token == first  # re-entering keeps the token
    assert rlock.status()["holders"][0]["count"] == 2
    assert kv2.rlock("r").acquire(blocking=False) is False
    errors: list[BaseException] = []

    def release_from_another_thread() -> None:
        try:
            kv.rlock("r").release()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=release_from_another_thread)
    t.start()
    t.join(10)
    assert [type(e) for e in errors] == [RuntimeError]
    rlock.release()
    assert rlock.locked()
    rlock.release()
    assert not rlock.locked()
    with pytest.raises(RuntimeError):
        rlock.release()
    theirs = kv2.rlock("r")
    assert theirs.acquire(blocking=False) is True
    assert theirs.token == first + 1


# -- Semaphore -------------------------------------------------------------------------------


def test_semaphore_never_admits_more_holders_than_its_value(
    kv: kvclient.Client, kv_target: Target
) -> None:
    _run_all([_spawn(sync_workers.semaphore_worker, kv_target, 8) for _ in range(6)])
    peaks = kv.list("pool-peaks").copy()
    assert len(peaks) == 6
    assert max(peaks) == 2  # two at once (it is not a lock), never three
    assert kv.semaphore("pool").get_value() == 2
    assert kv.semaphore("pool").status()["last_token"] == 6 * 8


def test_semaphore_release_rules(kv: kvclient.Client, kv2: kvclient.Client) -> None:
    bounded = kv.bounded_semaphore("bs", 2)
    assert bounded.acquire() is True
    assert bounded.token == 1
    bounded.release()
    with pytest.raises(ValueError, match="Semaphore released too many times"):
        bounded.release()
    with pytest.raises(ValueError, match="n must be one or more"):
        bounded.release(0)
    # A plain Semaphore may be released by anyone, adding a slot (a gate opened by another).
    gate = kv.semaphore("gate", 0)
    assert gate.acquire(blocking=False) is False
    kv2.semaphore("gate").release()
    assert gate.acquire(timeout=5) is True
    assert gate.token == 1
    with pytest.raises(ValueError, match="can't specify timeout for non-blocking acquire"):
        gate.acquire(False, 1)
    with pytest.raises(ValueError, match="exists with initial value 2, not 3"):
        kv.bounded_semaphore("bs", 3)
    with pytest.raises(kvclient.KindError):
        kv.semaphore("bs")  # a bounded_semaphore is another kind


def test_a_bounded_semaphore_slot_left_by_a_dead_child_does_not_fail_the_parents_release(
    kv: kvclient.Client, kv_target: Target
) -> None:
    sem = kv.bounded_semaphore("left", 2)
    assert sem.acquire() is True  # the parent's own slot
    child = _spawn(sync_workers.take_slot_and_exit, kv_target, "left")
    child.start()
    child.join(20)
    assert child.exitcode == 0
    assert sem.get_value() == 0  # the dead child's slot is held until its lease ends
    # As with multiprocessing.BoundedSemaphore: a release is legitimate while fewer than
    # the initial value are free. The parent's second release gives back the child's slot.
    sem.release()
    sem.release()
    assert sem.get_value() == 2
    assert sem.status()["holders"] == []
    with pytest.raises(ValueError, match="Semaphore released too many times"):
        sem.release()
    assert sem.get_value() == 2


# -- Event, Barrier, Condition ------------------------------------------------------------------


def test_event_set_wakes_waiters_in_other_processes(kv: kvclient.Client, kv_target: Target) -> None:
    waiters = [_spawn(sync_workers.event_waiter, kv_target) for _ in range(3)]
    event = kv.event("go")
    assert event.wait(0.1) is False
    for p in waiters:
        p.start()
    _wait_until(lambda: kv.dict("ev").get("ready") == 3)
    time.sleep(0.2)  # let them park
    assert kv.list("ev-got").copy() == []
    event.set()
    for p in waiters:
        p.join(20)
        assert p.exitcode == 0
    assert kv.list("ev-got").copy() == [True, True, True]
    assert event.is_set()
    event.clear()
    assert not event.is_set()


def test_barrier_releases_three_processes_together(kv: kvclient.Client, kv_target: Target) -> None:
    procs = [_spawn(sync_workers.barrier_worker, kv_target, "b3", 3, 20.0) for _ in range(3)]
    for p in procs[:2]:
        p.start()
    barrier = kv.barrier("b3", 3)
    _wait_until(lambda: barrier.n_waiting == 2)
    time.sleep(0.3)  # the first two wait while the third is not there
    procs[2].start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    out = kv.list("b3-out").copy()
    indexes = sorted(index for index, _, _ in out)
    assert indexes == [0, 1, 2]
    last_arrival = max(arrived for _, arrived, _ in out)
    left = [left for _, _, left in out]
    assert min(left) >= last_arrival  # nobody left before the third arrived
    assert max(left) - min(left) < 1.0
    assert (barrier.parties, barrier.n_waiting, barrier.broken) == (3, 0, False)


def test_barrier_timeout_breaks_it_for_every_waiting_process(
    kv: kvclient.Client, kv_target: Target
) -> None:
    procs = [_spawn(sync_workers.barrier_worker, kv_target, "b2", 3, 0.5) for _ in range(2)]
    _run_all(procs)
    assert [index for index, _, _ in kv.list("b2-out").copy()] == ["broken", "broken"]
    barrier = kv.barrier("b2", 3)
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(5)  # broken until reset
    barrier.reset()
    assert not barrier.broken


def test_barrier_abort_and_reset(kv: kvclient.Client, kv2: kvclient.Client) -> None:
    barrier = kv.barrier("ab", 2)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            kv2.barrier("ab", 2).wait(20)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    _wait_until(lambda: barrier.n_waiting == 1)
    barrier.abort()
    t.join(10)
    assert [type(e) for e in errors] == [threading.BrokenBarrierError]
    assert barrier.broken and barrier.n_waiting == 0
    barrier.reset()
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(kv2.barrier("ab", 2).wait(10)))
    t.start()
    results.append(barrier.wait(10))
    t.join(10)
    assert sorted(results) == [0, 1]
    with pytest.raises(ValueError, match="exists with 2 parties, not 3"):
        kv.barrier("ab", 3)


def test_condition_wait_and_notify_across_processes(kv: kvclient.Client, kv_target: Target) -> None:
    consumers = [_spawn(sync_workers.condition_consumer, kv_target) for _ in range(2)]
    for p in consumers:
        p.start()
    try:
        _condition_round(kv, consumers)
    finally:
        for p in consumers:  # a failed round must not leave a waiting child behind
            if p.is_alive():
                p.kill()
                p.join(5)


def _condition_round(kv: kvclient.Client, consumers: list[Any]) -> None:
    cond, items, got = kv.condition("c"), kv.list("c-items"), kv.list("c-got")
    _wait_until(lambda: kv.dict("c-ready").get("n") == 2)
    with cond:  # both consumers are waiting now: they said so holding this lock
        assert cond.status()["waiters"] == 2
        items.append("first")
        cond.notify()
    _wait_until(lambda: len(got) == 1)
    with cond:
        items.append("second")
        cond.notify_all()
    for p in consumers:
        p.join(20)
        assert p.exitcode == 0
    assert sorted(got.copy()) == ["first", "second"]
    assert items.copy() == []


def test_condition_rules(kv: kvclient.Client) -> None:
    cond = kv.condition("rules")
    with pytest.raises(RuntimeError, match="cannot wait on un-acquired lock"):
        cond.wait(0.1)
    with pytest.raises(RuntimeError, match="cannot notify on un-acquired lock"):
        cond.notify()
    assert cond.acquire() is True
    first = cond.token
    assert first is not None
    cond.acquire()  # re-entrant: wait releases both levels and restores them
    started = time.monotonic()
    assert cond.wait(0.2) is False
    assert time.monotonic() - started >= 0.15
    assert cond.token is not None and cond.token > first  # the lock was taken back
    assert cond.status()["holders"][0]["count"] == 2
    assert cond.wait_for(lambda: "ready", timeout=1) == "ready"
    cond.release()
    cond.release()
    with pytest.raises(RuntimeError):
        cond.release()


# -- Value and Array -------------------------------------------------------------------------


def test_value_incr_from_four_processes_is_exact(kv: kvclient.Client, kv_target: Target) -> None:
    procs = [_spawn(sync_workers.value_incr_worker, kv_target, 250) for _ in range(4)]
    procs += [_spawn(sync_workers.value_locked_worker, kv_target, 50) for _ in range(2)]
    _run_all(procs)
    assert kv.value("hits", 0).value == 1000
    assert kv.value("classic", "i").value == 100  # `v.value += 1` under get_lock()


def test_value_types_follow_ctypes(kv: kvclient.Client) -> None:
    i = kv.value("i", "i", 5)
    assert (i.value, i.typecode) == (5, "i")
    with pytest.raises(TypeError):
        i.value = 1.5
    with pytest.raises(OverflowError, match="out of range for typecode 'i'"):
        i.value = 2**31  # ctypes would wrap around silently
    with pytest.raises(OverflowError):
        i.incr(2**31)
    assert i.value == 5  # a failed incr changes nothing
    with pytest.raises(TypeError):
        i.incr(0.5)
    assert i.incr(2) == 7 and i.add(-10) == -3
    d = kv.value("d", "d")
    d.value = 3
    assert d.value == 3.0 and isinstance(d.value, float)
    assert kv.value("f", "f", 0.1).value == struct.unpack("f", struct.pack("f", 0.1))[0]
    assert kv.value("c", "c").value == b"\x00"
    assert kv.value("u", "u", "x").value == "x"
    flag = kv.value("flag", False)
    assert (flag.value, flag.typecode) == (False, "?")
    hits = kv.value("hits", 0)
    assert hits.typecode == "q"
    assert kv.value("hits", 7).value == 0  # get-or-create: the default applies at creation
    with pytest.raises(ValueError, match="typecode 'q'"):
        kv.value("hits", "i")
    with pytest.raises(ValueError):
        kv.value("hits", 0.0)
    assert kv.value("i", 0).value == -3  # an int default accepts any int typecode
    with pytest.raises(ValueError, match="typecode must be one of"):
        kv.value("bad", "z")
    with pytest.raises(TypeError):
        kv.value("bad", [1])
    assert hits.get_lock().name == "hits.lock"


def test_value_and_array_take_lock_as_multiprocessing_does(kv: kvclient.Client) -> None:
    v = kv.value("vl", "i", 5)
    assert (v.get(), v.value) == (5, 5)
    v.set(6)
    assert kv.value("vl", "i").value == 6
    assert v.get_lock() == kv.rlock("vl.lock")  # lock=True (default): its own RLock
    assert kv.value("vl", "i", lock=None).get_lock() == kv.rlock("vl.lock")
    raw = v.get_obj()
    assert isinstance(raw, kvclient.RawValueProxy) and not hasattr(raw, "get_lock")
    assert raw.value == 6
    guard = kv.lock("guard")
    shared = kv.value("vl", "i", lock=guard)
    assert shared.get_lock() == guard
    assert pickle.loads(pickle.dumps(shared)).get_lock() == guard  # travels with the proxy
    plain = kv.value("vl", "i", lock=False)
    assert not hasattr(plain, "get_lock") and not hasattr(plain, "get_obj")
    with pytest.raises(AttributeError, match="has no method 'acquire'"):
        kv.value("vl", "i", lock="notalock")
    a = kv.array("al", "i", range(3), lock=guard)
    assert (a.tolist(), a.get_lock()) == ([0, 1, 2], guard)
    assert a.get_obj().tolist() == [0, 1, 2]
    assert kv.array("al", "i", 3).get_lock() == kv.rlock("al.lock")
    rawa = kv.array("al", "i", 3, lock=False)
    assert isinstance(rawa, kvclient.RawArrayProxy) and not hasattr(rawa, "get_lock")
    with pytest.raises(AttributeError, match="has no method 'acquire'"):
        kv.array("al", "i", 3, lock=1)


def test_array_indexes_and_slices(kv: kvclient.Client) -> None:
    arr = kv.array("a", "i", [1, 2, 3, 4])
    assert (len(arr), arr[0], arr[-1], arr[::2], list(arr)) == (4, 1, 4, [1, 3], [1, 2, 3, 4])
    arr[::2] = [9, 9]
    arr[1] = 7
    assert arr.tolist() == [9, 7, 9, 4]
    with pytest.raises(IndexError, match="invalid index"):
        arr[4]
    with pytest.raises(IndexError):
        arr[-5] = 1
    with pytest.raises(ValueError, match="Can only assign sequence of same size"):
        arr[0:2] = [1]
    with pytest.raises(TypeError):
        arr[0] = 1.5
    assert arr.tolist() == [9, 7, 9, 4]
    chars = kv.array("chars", "c", b"abc")
    chars[0:2] = b"xy"
    assert (chars[:], chars[1]) == (b"xyc", b"y")
    assert kv.array("zeros", "d", 3)[:] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="exists with length 4, not 5"):
        kv.array("a", "i", 5)
    with pytest.raises(ValueError, match="exists with typecode 'i'"):
        kv.array("a", "d", 4)
    with pytest.raises(ValueError, match="at most"):
        kv.array("huge", "i", MAX_ARRAY_LENGTH + 1)
    assert arr.get_lock().name == "a.lock"


def test_array_slices_from_two_processes(kv: kvclient.Client, kv_target: Target) -> None:
    _run_all(
        [
            _spawn(sync_workers.array_reader, kv_target),
            _spawn(sync_workers.array_writer, kv_target),
        ]
    )
    assert kv.array("arr", "i", 10).tolist() == [1, 2, 3, 4, 5, 50, 40, 30, 20, 10]


# -- bad use, persistence, proxies -------------------------------------------------------------


def test_bad_use_raises_the_stdlib_error_and_the_server_keeps_serving(
    kv: kvclient.Client, kv2: kvclient.Client
) -> None:
    with pytest.raises(RuntimeError):
        kv.lock("bad").release()
    with pytest.raises(ValueError, match="semaphore initial value must be >= 0"):
        kv.semaphore("neg", -1)
    with pytest.raises(ValueError, match="semaphore initial value must be >= 0"):
        kv.call(None, None, "create", ["semaphore", "neg", -1])  # the server checks too
    with pytest.raises(ValueError, match="parties must be >= 1"):
        kv.barrier("zero", 0)
    with pytest.raises(ValueError, match="parties must be >= 1"):
        kv.call(None, None, "create", ["barrier", "zero", 0])
    with pytest.raises(IndexError):
        kv.array("small", "i", 2)[2]
    with pytest.raises(ValueError):
        kv.bounded_semaphore("bounded").release()
    # Malformed arguments from a client that is not kvclient.
    malformed: list[tuple[list[Any], type[Exception]]] = [
        (["not bytes", True, None, 30.0, None], TypeError),
        ([b"me", True, None, -1, None], ValueError),
        ([b"me", True, "soon", 30.0, None], TypeError),
        ([b"me", "yes", None, 30.0, None], TypeError),
    ]
    for args, error in malformed:
        with pytest.raises(error):
            kv.call("lock", "bad", "acquire", args)
    assert "bad" in kv2.names()
    kv2.ping()
    assert kv2.lock("bad").acquire(blocking=False) is True


def test_every_kind_survives_state_and_from_state() -> None:
    lock = KVLock()
    lock.acquire(b"owner", lease=5.0)
    cond = KVCondition()
    cond.acquire(b"a", lease=5.0)
    cond.wait_begin(b"a", b"w1", 5.0)
    barrier = KVBarrier(3)
    barrier.arrive()
    made: dict[str, list[Any]] = {
        "semaphore": [2],
        "bounded_semaphore": [1],
        "event": [],
        "rlock": [],
        "value": ["d", 1.5],
        "array": ["c", b"ab"],
    }
    objects: list[Container] = [lock, cond, barrier]
    objects += [SYNC_KINDS[kind](*args) for kind, args in made.items()]
    assert {obj.kind for obj in objects} == set(SYNC_KINDS)
    for obj in objects:
        assert obj.from_state(obj.state()).state() == obj.state()


def test_dump_and_restore_keep_tokens_increasing(kv: kvclient.Client, authkey: bytes) -> None:
    lock = kv.lock("fenced")
    for _ in range(3):
        with lock:
            pass
    kv.value("v", "i", 4)
    dump = kv.dump()
    srv = KVManager(("127.0.0.1", 0), authkey=authkey).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with kvclient.connect(srv.endpoint, authkey) as fresh:
            assert fresh.restore(dump) == 2
            fenced = fresh.lock("fenced")
            assert fenced.acquire() is True
            assert fenced.token == 4
            assert fresh.value("v", "i").value == 4
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


def _persistent(data: Path, authkey: bytes) -> tuple[Server, threading.Thread]:
    srv = KVManager(
        ("127.0.0.1", 0), authkey=authkey, persistence=Persistence(data, "no")
    ).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


def test_releases_by_another_client_stay_applied_after_a_restart(
    tmp_path: Path, authkey: bytes
) -> None:
    srv, thread = _persistent(tmp_path / "data", authkey)
    try:
        with (
            kvclient.connect(srv.endpoint, authkey, retry=None) as a,
            kvclient.connect(srv.endpoint, authkey, retry=None) as b,
        ):
            assert a.lock("x").acquire() is True
            b.lock("x").release()  # ends a's hold
            fenced = a.lock("y")
            assert fenced.acquire() is True
            assert fenced.token is not None and b.lock("y").release_token(fenced.token)
            assert a.lock("z").acquire() is True  # stays held: not every hold is released
            bounded = a.bounded_semaphore("bs", 2)
            assert bounded.acquire() is True
            assert bounded.acquire() is True
            b.bounded_semaphore("bs").release()  # gives back one of a's slots
            srv.stop()
            assert srv.wait_stopped(10)
    finally:
        srv.stop()
        thread.join(10)
    srv, thread = _persistent(tmp_path / "data", authkey)
    try:
        with kvclient.connect(srv.endpoint, authkey) as c:
            assert c.lock("x").status()["holders"] == []
            assert c.lock("y").status()["holders"] == []
            assert len(c.lock("z").status()["holders"]) == 1
            status = c.bounded_semaphore("bs").status()
            assert [h["count"] for h in status["holders"]] == [1]
            assert c.bounded_semaphore("bs").get_value() == 1
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


def test_a_restart_restores_holders_with_a_fresh_lease_and_never_reuses_a_token(
    tmp_path: Path, authkey: bytes
) -> None:
    srv, thread = _persistent(tmp_path / "data", authkey)
    try:
        with kvclient.connect(srv.endpoint, authkey, retry=None) as kv:
            lock = kv.lock("p", lease=1.0)
            for _ in range(2):
                with lock:
                    pass
            assert lock.acquire() is True
            assert lock.token == 3
            owner = kv.owner_id
            srv.stop()  # the holder's client can no longer renew: it is as good as dead
            assert srv.wait_stopped(10)
    finally:
        srv.stop()
        thread.join(10)
    srv, thread = _persistent(tmp_path / "data", authkey)
    try:
        status = srv.store.objects["p"].status()  # type: ignore[attr-defined]
        assert [(h["owner"], h["token"]) for h in status["holders"]] == [(owner, 3)]
        with kvclient.connect(srv.endpoint, authkey) as kv:
            lock = kv.lock("p", lease=1.0)
            assert lock.acquire(blocking=False) is False  # restored: held for a fresh lease
            assert lock.acquire(timeout=5) is True  # then released
            assert lock.token == 4  # token 3 is not issued again
            lock.release()
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


def test_proxies_travel_with_their_lease_and_decode_from_references(kv: kvclient.Client) -> None:
    lock = kv.lock("travel", lease=2.5)
    copy = pickle.loads(pickle.dumps(lock))
    assert isinstance(copy, kvclient.LockProxy)
    assert (copy, copy.lease) == (lock, 2.5)
    d = kv.dict("refs")
    d["all"] = [
        kv.rlock("r1"),
        kv.semaphore("s1"),
        kv.bounded_semaphore("bs1"),
        kv.event("e1"),
        kv.condition("c1"),
        kv.barrier("b1", 2),
        kv.value("v1", 0),
        kv.array("a1", "i", 1),
    ]
    assert [type(p).__name__ for p in d["all"]] == [
        "RLockProxy",
        "SemaphoreProxy",
        "BoundedSemaphoreProxy",
        "EventProxy",
        "ConditionProxy",
        "BarrierProxy",
        "ValueProxy",
        "ArrayProxy",
    ]
    with pytest.raises(ValueError, match="lease must be more than 0"):
        kv.lock("x", lease=0)


def test_a_lease_that_ran_out_stays_released_after_a_restart(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    """Expiry depends on the clock; the log must record it, or a replay hands the lock back."""
    from tests.durable import DurableServer

    server = DurableServer(dict(clean_env, KV_AUTHKEY=authkey.decode()), tmp_path / "d", authkey)
    server.start()
    try:
        port = server.address.rsplit(":", 1)[1]
        server.extra = ["--port", port]
        a = server.client()
        held = a.lock("m", lease=1.0)
        assert held.acquire() is True
        first = held.token
        a.close()  # A stops renewing: its lease runs out a second later
        with server.client() as b:
            lock = b.lock("m", lease=30.0)
            assert lock.acquire(timeout=20) is True
            second = lock.token
            assert second is not None and first is not None and second > first
            server.kill()
            server.start()
            with server.client() as c:
                status = c.lock("m").status()
                assert [h["owner"] for h in status["holders"]] == [b.owner_id]
                assert status["last_token"] == second
                assert c.lock("m").acquire(blocking=False) is False
            lock.release()  # B still holds it after the restart, and can release it
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
