"""Leases, fencing and timeouts of the synchronization primitives, against the peers' known bugs.

Conformance tests (they take `kv`): each behaviour holds on every implementation. They pin
down what the Redis lock libraries get wrong (issue 16):

- redis-py's ``Lock`` has no expiry unless asked (``timeout=None``) and no fencing token: a
  holder that stalls holds for ever, and one whose hold ran out cannot be told apart from its
  successor. Here every hold is a lease, and every acquire gets a larger token.
- python-redis-lock takes its expiry in whole seconds (``expire=0.3`` is refused or becomes
  0 or 1 s): sub-second leases and waits must work as given.
- Timeouts and leases that are not finite, negative, too large or of the wrong type are
  refused before they reach a timer (kvproto.limits).
- A blocked call waits without polling: it costs a few server operations however long it
  waits.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest

import kvclient
from tests.targets import ClientFactory, Target


def test_every_hold_is_a_lease_and_a_stalled_holders_token_is_fenced_off(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    stalled = kv_factory()
    lock = stalled.lock("fenced", lease=0.5)
    assert lock.acquire() is True
    first = lock.token
    holder = lock.status()["holders"][0]
    assert 0 < holder["lease_left"] <= 0.5  # never a hold without expiry (redis-py's default)
    stalled.leases.close()  # its renewals stop, as when its process stalls
    successor = kv.lock("fenced", lease=5.0)
    assert successor.acquire(timeout=10) is True  # the lease ran out: handed on
    assert first is not None and successor.token is not None and successor.token > first
    with pytest.raises(RuntimeError, match="this client's lease on it expired"):
        lock.release()  # the stalled holder cannot release its successor's hold
    assert [h["owner"] for h in successor.status()["holders"]] == [kv.owner_id]
    successor.release()
    # Tokens keep growing per lock, whoever acquires: no two holds ever share one.
    tokens = []
    for client in (kv, kv_factory(), kv):
        other = client.lock("fenced")
        with other as token:
            tokens.append(token)
    assert tokens == sorted(set(tokens)) and tokens[0] > successor.token


@pytest.mark.parametrize("kind", ["semaphore", "rlock", "condition"])
def test_every_leased_kind_expires_without_renewal(
    kv: kvclient.Client, kv_factory: ClientFactory, kind: str
) -> None:
    stalled = kv_factory()
    held = getattr(stalled, kind)("leased", lease=0.4)
    assert held.acquire() is True
    stalled.leases.close()
    mine = getattr(kv, kind)("leased")
    assert mine.acquire(timeout=10) is True
    assert mine.token is not None and held.token is not None and mine.token > held.token
    mine.release()


def test_sub_second_leases_and_timeouts_are_not_rounded_to_seconds(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    stalled = kv_factory()
    assert stalled.lock("subsecond", lease=0.2).acquire() is True
    stalled.leases.close()
    # A 0.2 s lease rounded up to 1 s (python-redis-lock's whole seconds) would still be held
    # when this 0.8 s wait runs out; rounded down to 0 it would never have been held.
    started = time.monotonic()
    lock = kv.lock("subsecond", lease=0.3)
    assert lock.acquire(timeout=0.8) is True
    assert time.monotonic() - started < 0.8
    # A 0.25 s wait for a held lock gives up after about 0.25 s, not 0 or 1 s.
    other = kv_factory().lock("subsecond")
    started = time.monotonic()
    assert other.acquire(timeout=0.25) is False
    assert 0.2 <= time.monotonic() - started < 0.9
    # The holder's renewals (every 0.1 s) keep a 0.3 s lease alive far past it.
    time.sleep(1.0)
    assert other.acquire(blocking=False) is False
    lock.release()
    event = kv.event("subsecond-e")
    started = time.monotonic()
    assert event.wait(0.15) is False
    assert 0.1 <= time.monotonic() - started < 0.9


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([b"me", True, float("inf"), 30.0, None], ValueError),
        ([b"me", True, float("nan"), 30.0, None], ValueError),
        ([b"me", True, 1e9, 30.0, None], ValueError),
        ([b"me", True, -0.5, 30.0, None], ValueError),
        ([b"me", True, True, 30.0, None], TypeError),
        ([b"me", True, None, float("nan"), None], ValueError),
        ([b"me", True, None, float("inf"), None], ValueError),
        ([b"me", True, None, 1e9, None], ValueError),
        ([b"me", True, None, 0, None], ValueError),
        ([b"me", True, None, "30", None], TypeError),
        ([b"x" * 65, True, None, 30.0, None], TypeError),
        ([b"me", True, None, 30.0, "id"], TypeError),
    ],
)
def test_hostile_timeouts_and_leases_are_refused(
    kv: kvclient.Client, args: list[Any], error: type[Exception]
) -> None:
    kv.lock("hostile")
    with pytest.raises(error):
        kv.call("lock", "hostile", "acquire", args)
    with pytest.raises(error):
        kv.call("semaphore", kv.semaphore("hostile-s").name, "acquire", args)
    assert kv.lock("hostile").acquire(timeout=1) is True  # nothing was taken, still served


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e9, -1.0])
def test_hostile_waits_of_event_barrier_condition_are_refused(
    kv: kvclient.Client, timeout: float
) -> None:
    kv.event("he")
    kv.barrier("hb", 2)
    with pytest.raises(ValueError):
        kv.call("event", "he", "wait", [timeout])
    with pytest.raises(ValueError):
        kv.call("barrier", "hb", "await_trip", [0, timeout])
    cond = kv.condition("hc")
    with cond:
        owner = kv.leases.thread_owner()
        with pytest.raises(ValueError):
            kv.call("condition", "hc", "wait_end", [owner, b"w" * 8, 1, timeout, 30.0])


def _ops_of_a_wait(kv: kvclient.Client, factory: ClientFactory, timeout: float) -> int:
    """Return the server operations a new client's acquire of the held "quiet" costs."""
    got: list[bool] = []
    before = int(kv.stats()["ops"])
    thread = threading.Thread(
        target=lambda: got.append(factory().lock("quiet").acquire(timeout=timeout))
    )
    thread.start()
    thread.join(10)
    assert got == [False]
    return int(kv.stats()["ops"]) - before


def test_a_blocked_acquire_waits_without_polling(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    lock = kv.lock("quiet")
    assert lock.acquire() is True
    at_once = _ops_of_a_wait(kv, kv_factory, 0)
    waited = _ops_of_a_wait(kv, kv_factory, 2.0)
    # Polling every 20 ms for those 2 s would be 100 more calls, each one operation or more
    # (Redis counts the commands inside a script too: about 10 for an acquire); a parked wait
    # is one sleep and one more try (kvserve: 0 more calls; Redis: about 35 operations).
    assert waited - at_once < 100, (at_once, waited)
    lock.release()


def _wait_for_lock(target: Target, name: str, lease: float) -> None:
    """Block on lock ``name`` (until killed)."""
    with target.connect() as kv:
        kv.lock(name, lease=lease).acquire(timeout=60)


def test_a_waiter_killed_in_line_never_keeps_the_lock_from_the_living(
    kv: kvclient.Client, kv_target: Target
) -> None:
    lock = kv.lock("line", lease=5.0)
    assert lock.acquire() is True
    doomed = mp.get_context("forkserver").Process(
        target=_wait_for_lock, args=(kv_target, "line", 0.5)
    )
    doomed.start()
    try:
        deadline = time.monotonic() + 20
        while lock.status()["waiters"] < 1:
            assert time.monotonic() < deadline, "the waiter never got in line"
            time.sleep(0.02)
        doomed.kill()
        doomed.join(10)
        lock.release()  # the first in line is dead: at most its lease later, the next gets it
        survivor = kv.lock("line", lease=5.0)
        assert survivor.acquire(timeout=10) is True
        assert survivor.token is not None and survivor.token > 1
        assert [h["owner"] for h in survivor.status()["holders"]] == [kv.owner_id]
        survivor.release()
    finally:
        doomed.kill()
        doomed.join(10)
