"""kvclient.aio cancellation: what a cancelled task leaves behind, proved by exact accounting.

A task cancelled while parked (``await q.get()``, ``await lock.acquire()``) must leave the
server as if it had never asked: the item goes to the next getter, the lock to the next
client, at once (not one lease later). The hard case is the race: the server hands the item
over, or grants the lock, at the moment the task is cancelled, so the answer is on its way
(or unread in the socket) when the call is abandoned. The loops below hit that moment on
purpose (the server answers while the event loop cannot run) and at random, with random
cancel delays, and count: every item put is received exactly once, the lock is never left
granted to nobody. A ``put`` the server accepted before the cancel stays; ``asyncio.timeout``
around any call leaves the client usable.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import kvclient
import kvclient.aio
from kvserve import Server
from tests.test_aio import run, until

# Iterations of each race loop: enough that every branch is taken many times (the deterministic
# one is the first iteration of each), small enough for a few seconds per test.
ROUNDS = 120


def _rng() -> random.Random:
    """A seeded generator; the seed is printed so a failing run can be replayed."""
    seed = int(os.environ.get("KV_TEST_SEED", random.randrange(1 << 32)))
    print(f"KV_TEST_SEED={seed}")
    return random.Random(seed)


def _undone(caplog: pytest.LogCaptureFixture, what: str) -> int:
    return sum(what in r.getMessage() for r in caplog.records if r.name == "kvclient")


def _parked_or_done(server: Server, name: str, task: asyncio.Task[Any]) -> bool:
    return name in server.engine.parked or task.done()


async def _fences_done(kv: kvclient.aio.Client) -> None:
    await until(lambda: not kv._backend._fences, "the fences to finish")


def test_a_cancelled_gets_item_goes_to_the_next_getter(
    server: Server, address: str, authkey: bytes
) -> None:
    async def main() -> None:
        async with (
            kvclient.aio.connect(address, authkey) as kv,
            kvclient.aio.connect(address, authkey) as other,
        ):
            q = await kv.queue("q")
            first = asyncio.create_task(q.get())
            await until(lambda: len(server.engine.parked.get("q", ())) == 1, "the first get")
            second = asyncio.create_task((await other.queue("q")).get(timeout=30))
            await until(lambda: len(server.engine.parked.get("q", ())) == 2, "the second get")
            with kvclient.connect(address, authkey) as sync:
                # Blocking: the server hands the item to the first get (first parked, first
                # served) while the loop cannot run; its reply is unread when it is cancelled.
                sync.queue("q").put("item")
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                assert await second == "item"  # put back by the fence, taken by the next getter
                assert sync.queue("q").qsize() == 0

    run(main)


def test_racing_cancels_of_parked_gets_lose_no_item(
    server: Server, address: str, authkey: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvclient")
    rng = _rng()

    async def main() -> tuple[list[Any], list[Any], int]:
        received: list[Any] = []
        async with kvclient.aio.connect(address, authkey, max_connections=4) as kv:
            q = await kv.queue("q")
            with kvclient.connect(address, authkey) as sync:
                sq = sync.queue("q")
                for i in range(ROUNDS):
                    getter = asyncio.create_task(q.get())
                    how = i if i < 3 else rng.randrange(3)
                    if how == 0:
                        # Hand-over while the loop is blocked: the reply is in the socket,
                        # unread, when the task is cancelled (the fence must put it back).
                        parked = functools.partial(_parked_or_done, server, "q", getter)
                        await until(parked, "the get")
                        sq.put(i)
                        getter.cancel()
                    elif how == 1:
                        # The put races the cancel from another thread, at random moments.
                        await asyncio.sleep(rng.uniform(0, 0.003))
                        putting = asyncio.create_task(asyncio.to_thread(sq.put, i))
                        await asyncio.sleep(rng.uniform(0, 0.003))
                        getter.cancel()
                        await putting
                    else:
                        # Cancelled early: perhaps before the get was even sent.
                        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002]))
                        getter.cancel()
                        sq.put(i)
                    try:
                        received.append(await getter)
                    except asyncio.CancelledError:
                        pass
                await _fences_done(kv)
                drained = []
                while True:
                    try:
                        drained.append(sq.get_nowait())
                    except queue.Empty:
                        break
                return received, drained, sq.unfinished_tasks()

    received, drained, unfinished = run(main)
    assert sorted(received + drained) == list(range(ROUNDS))  # each item exactly once
    assert unfinished == ROUNDS  # a put back is not counted as a new task
    assert received and drained  # both ends of the race were reached
    assert _undone(caplog, "putting it back") >= 1  # the hand-over race was hit (first round)


def test_racing_cancels_of_lock_waits_never_orphan_the_lock(
    address: str, authkey: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvclient")
    rng = _rng()
    # Far longer than the test's waits: an orphaned grant would only be freed by its lease
    # running out, and the other client's bounded acquire would fail first.
    lease = 120.0

    async def main() -> tuple[int, int]:
        granted = cancelled = 0
        async with kvclient.aio.connect(address, authkey, max_connections=4) as kv:
            lock = await kv.lock("l", lease=lease)
            with kvclient.connect(address, authkey) as sync:
                held = sync.lock("l", lease=lease)
                for i in range(ROUNDS):
                    # Another client takes it at once: no cancelled waiter kept it.
                    assert await asyncio.to_thread(held.acquire, True, 20), f"round {i}"
                    waiter = asyncio.create_task(lock.acquire())
                    how = i if i < 3 else rng.randrange(3)
                    if how == 0:
                        await until(lambda: held.status()["waiters"] == 1, "the acquire")
                        held.release()  # blocking: the grant's reply is unread at the cancel
                        waiter.cancel()
                    elif how == 1:
                        await asyncio.sleep(rng.uniform(0, 0.003))
                        releasing = asyncio.create_task(asyncio.to_thread(held.release))
                        await asyncio.sleep(rng.uniform(0, 0.003))
                        waiter.cancel()
                        await releasing
                    else:
                        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002]))
                        waiter.cancel()
                        held.release()
                    try:
                        assert await waiter is True
                    except asyncio.CancelledError:
                        cancelled += 1
                    else:
                        granted += 1  # the task got it, alive: it releases it itself
                        await lock.release()
                assert await asyncio.to_thread(held.acquire, True, 20)
                assert [h["owner"] for h in held.status()["holders"]] == [sync.owner_id]
                await _fences_done(kv)
                # The last cancelled wait is withdrawn once the server reads its connection's
                # close, which it may not have yet.
                await until(lambda: held.status()["waiters"] == 0, "no waiter left")
                held.release()
                assert not await lock.locked()
        return granted, cancelled

    granted, cancelled = run(main)
    assert granted + cancelled == ROUNDS and cancelled > 0
    assert _undone(caplog, "releasing it") >= 1  # the grant race was hit (first round)


def test_a_cancelled_lock_wait_leaves_no_waiter_behind(
    server: Server, address: str, authkey: bytes
) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            with kvclient.connect(address, authkey) as sync:
                held = sync.lock("l", lease=0.6)
                assert held.acquire()
                waiter = asyncio.create_task((await kv.lock("l", lease=0.6)).acquire())
                await until(lambda: held.status()["waiters"] == 1, "the acquire to park")
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                await until(lambda: "l" not in server.engine.parked, "the wait to be withdrawn")
                assert held.status()["waiters"] == 0
                # Several renewal rounds of the client (lease / 3): they renew nothing of it.
                await asyncio.sleep(1.0)
                assert held.status()["waiters"] == 0
                held.release()

    run(main)


def test_a_put_accepted_before_the_cancel_stays(
    server: Server, address: str, authkey: bytes
) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            q = await kv.queue("q", maxsize=1)
            await q.put("first")
            with kvclient.connect(address, authkey) as sync:
                sq = sync.queue("q")
                putter = asyncio.create_task(q.put("second"))
                await until(lambda: "q" in server.engine.parked, "the put to park")
                assert sq.get() == "first"  # room: the server takes the parked put now
                putter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await putter
                assert sq.get(timeout=5) == "second"  # accepted: cancelling does not undo it
                await q.put("third")
                putter = asyncio.create_task(q.put("never"))
                await until(lambda: "q" in server.engine.parked, "the put to park")
                putter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await putter
                await until(lambda: "q" not in server.engine.parked, "the put to be withdrawn")
                assert sq.get_nowait() == "third"
                assert sq.qsize() == 0  # withdrawn before it was accepted: never put

    run(main)


def test_racing_cancels_of_parked_puts_keep_exactly_the_accepted(
    address: str, authkey: bytes
) -> None:
    rng = _rng()

    async def main() -> tuple[set[int], list[int]]:
        returned: set[int] = set()
        async with kvclient.aio.connect(address, authkey, max_connections=4) as kv:
            q = await kv.queue("q", maxsize=1)
            with kvclient.connect(address, authkey) as sync:
                sq = sync.queue("q")
                taken = []
                await q.put(-1)
                for i in range(ROUNDS):
                    putter = asyncio.create_task(q.put(i))
                    await asyncio.sleep(rng.uniform(0, 0.003))
                    getting = asyncio.create_task(asyncio.to_thread(sq.get, True, 5))
                    await asyncio.sleep(rng.uniform(0, 0.003))
                    putter.cancel()
                    taken.append(await getting)  # never empty: the last item, or this put's
                    try:
                        await putter
                        returned.add(i)
                    except asyncio.CancelledError:
                        pass
                    if sq.qsize() == 0:
                        await q.put(-1 - i - 1)  # full again for the next round
                while True:
                    try:
                        taken.append(sq.get_nowait())
                    except queue.Empty:
                        break
        return returned, taken

    returned, taken = run(main)
    assert len(taken) == len(set(taken))  # nothing twice
    assert returned <= set(taken)  # every put that returned is there
    assert returned  # some puts completed before their cancel


SCENARIOS: dict[str, Callable[[kvclient.aio.Client], Awaitable[Any]]] = {}


def _scenario(
    fn: Callable[[kvclient.aio.Client], Awaitable[Any]],
) -> Callable[[kvclient.aio.Client], Awaitable[Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


@_scenario
async def queue_get(kv: kvclient.aio.Client) -> Any:
    return await (await kv.queue("q")).get()


@_scenario
async def queue_put_on_a_full_queue(kv: kvclient.aio.Client) -> Any:
    q = await kv.queue("full", maxsize=1)
    await q.put(0)
    return await q.put(1)


@_scenario
async def lock_acquire(kv: kvclient.aio.Client) -> Any:
    return await (await kv.lock("held")).acquire()


@_scenario
async def semaphore_acquire(kv: kvclient.aio.Client) -> Any:
    return await (await kv.semaphore("none", 0)).acquire()


@_scenario
async def event_wait(kv: kvclient.aio.Client) -> Any:
    return await (await kv.event("e")).wait()


@_scenario
async def barrier_wait(kv: kvclient.aio.Client) -> Any:
    return await (await kv.barrier("b", 2)).wait()


@_scenario
async def condition_wait(kv: kvclient.aio.Client) -> Any:
    cond = await kv.condition("c")
    async with cond:
        return await cond.wait()


@_scenario
async def incr(kv: kvclient.aio.Client) -> Any:
    d = await kv.dict("d")
    while True:  # until the timeout strikes, wherever the call is
        await d.incr("spin")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_asyncio_timeout_around_any_call_leaves_the_client_usable(
    address: str, authkey: bytes, scenario: str
) -> None:
    async def main() -> None:
        with kvclient.connect(address, authkey) as sync:
            assert sync.lock("held").acquire()
            async with kvclient.aio.connect(address, authkey, max_connections=1) as kv:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await SCENARIOS[scenario](kv)
                # The one connection is replaced (after its fence, if any) and serves on.
                d = await kv.dict("after")
                assert await d.incr("n") == 1
                q = await kv.queue("after-q")
                await q.put("x")
                assert await q.get(timeout=5) == "x"
                sync.lock("held").release()
                lock = await kv.lock("held")
                assert await lock.acquire(timeout=5)  # nothing of the gone wait holds it
                await lock.release()
                cond = await kv.condition("c")
                assert await cond.acquire(timeout=5)  # the condition's lock is free
                await cond.release()
            assert sync.queue("q").qsize() == 0 and sync.queue("after-q").qsize() == 0

    run(main)


def test_random_timeouts_around_calls_apply_each_at_most_once(address: str, authkey: bytes) -> None:
    rng = _rng()

    async def main() -> tuple[int, int, int]:
        done = 0
        async with kvclient.aio.connect(address, authkey, max_connections=1) as kv:
            d = await kv.dict("d")
            for _ in range(ROUNDS):
                try:
                    async with asyncio.timeout(rng.uniform(0, 0.002)):
                        await d.incr("n")
                    done += 1
                except TimeoutError:
                    pass
            total = int(await d.get("n", 0))
            return done, total, await d.incr("n")

    done, total, after = run(main)
    assert done <= total <= ROUNDS  # a call timed out in flight may or may not have applied
    assert after == total + 1  # and the client goes on exactly
