"""Process bodies for tests/test_sync.py: importable cheaply (no pytest) by forkserver children.

Each body gets the test's `kv_target` (tests/targets.py), connects its own client through the
implementation under test, reports what it saw into containers on the server, and
closes its client; the test process reads the reports.
"""

from __future__ import annotations

import threading
import time

from tests.targets import Target


def mutex_worker(target: Target, cycles: int) -> None:
    """Read-modify-write a shared key ``cycles`` times, each under the lock "m"."""
    with target.connect() as kv:
        lock, shared = kv.lock("m"), kv.dict("shared")
        for _ in range(cycles):
            with lock:
                value = shared["total"]
                shared["total"] = value + 1


def hold_until_killed(target: Target, name: str, lease: float) -> None:
    """Take lock ``name``, report the token in queue "<name>-tokens", then wait to be killed."""
    with target.connect() as kv:
        lock = kv.lock(name, lease=lease)
        assert lock.acquire() is True
        kv.queue(f"{name}-tokens").put(lock.token)
        time.sleep(60)


def hold_stall_release(target: Target, name: str, lease: float) -> None:
    """Take lock ``name``, report the token, wait for event "<name>-resume", then release.

    The test stops this process (SIGSTOP) while it holds the lock, so its lease runs out; the
    outcome of the late release goes to queue "<name>-outcome".
    """
    with target.connect() as kv:
        lock = kv.lock(name, lease=lease)
        assert lock.acquire() is True
        outcome = kv.queue(f"{name}-outcome")
        outcome.put(lock.token)
        kv.event(f"{name}-resume").wait(30)
        try:
            lock.release()
        except RuntimeError as exc:
            outcome.put(f"RuntimeError: {exc}")
        else:
            outcome.put("released")


def take_slot_and_exit(target: Target, name: str) -> None:
    """Take a slot of BoundedSemaphore ``name`` and exit without releasing it."""
    with target.connect() as kv:
        assert kv.bounded_semaphore(name).acquire(blocking=False) is True


def semaphore_worker(target: Target, rounds: int) -> None:
    """Hold a slot of Semaphore(2) ``rounds`` times; report the most holders seen at once."""
    with target.connect() as kv:
        slots, stats = kv.semaphore("pool", 2), kv.dict("pool-stats")
        peak = 0
        for _ in range(rounds):
            with slots:
                peak = max(peak, stats.incr("inside"))
                time.sleep(0.01)
                stats.incr("inside", -1)
        kv.list("pool-peaks").append(peak)


def event_waiter(target: Target) -> None:
    """Say "ready", wait for event "go" and report what ``wait`` returned."""
    with target.connect() as kv:
        kv.dict("ev").incr("ready")
        kv.list("ev-got").append(kv.event("go").wait(20))


def barrier_worker(target: Target, name: str, parties: int, timeout: float) -> None:
    """Wait at barrier ``name``; report [index or "broken", arrived, left] in list "<name>-out"."""
    with target.connect() as kv:
        barrier = kv.barrier(name, parties)
        arrived = time.time()
        try:
            index: int | str = barrier.wait(timeout)
        except threading.BrokenBarrierError:
            index = "broken"
        kv.list(f"{name}-out").append([index, arrived, time.time()])


def condition_consumer(target: Target) -> None:
    """Under condition "c", wait for an item in list "c-items", take it into list "c-got"."""
    with target.connect() as kv:
        cond, items = kv.condition("c"), kv.list("c-items")
        with cond:
            kv.dict("c-ready").incr("n")  # under the lock: the producer enters after wait()
            if cond.wait_for(lambda: len(items) > 0, timeout=20):
                kv.list("c-got").append(items.pop(0))


def value_incr_worker(target: Target, times: int) -> None:
    """Add 1 to Value "hits" ``times`` times with the one-call ``incr``."""
    with target.connect() as kv:
        hits = kv.value("hits", 0)
        for _ in range(times):
            hits.incr()


def value_locked_worker(target: Target, times: int) -> None:
    """Add 1 to Value "classic" ``times`` times the multiprocessing way, under get_lock()."""
    with target.connect() as kv:
        value = kv.value("classic", "i")
        for _ in range(times):
            with value.get_lock():
                value.value += 1


def array_writer(target: Target) -> None:
    """Write the first half of Array "arr", then set event "arr-written"."""
    with target.connect() as kv:
        arr = kv.array("arr", "i", 10)
        arr[0:5] = [1, 2, 3, 4, 5]
        kv.event("arr-written").set()


def array_reader(target: Target) -> None:
    """Once "arr-written" is set, read the first half and write it, times 10, reversed after it."""
    with target.connect() as kv:
        arr = kv.array("arr", "i", 10)
        if not kv.event("arr-written").wait(20):
            raise AssertionError("the writer never wrote")
        first = arr[0:5]
        arr[9:4:-1] = [x * 10 for x in first]
