"""kvclient.aio on Valkey/Redis: cancellation leaks no item and no lock, waits do not block.

Real redis-server (standalone) and a real 3-master cluster; the conformance suite runs the
rest through `tests/aio_adapter.py` (the `redis-*-asyncio` implementations in
tests/backends.py). Here: what only an asyncio caller can do, cancel a task while it waits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import kvclient.aio
from kvclient._redis._backend import container_keys
from kvclient.retry import ConstantBackoff, Retry
from kvproto.errors import KVConnectionError
from tests import redis_cluster
from tests.backends import in_ci
from tests.redis_cluster import available

_MISSING = available()
pytestmark = pytest.mark.skipif(
    _MISSING is not None and not in_ci(), reason=f"redis-server needed: {_MISSING}"
)


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    name = "redis_standalone_url" if request.param == "standalone" else "redis_cluster_url"
    url: str = request.getfixturevalue(name)
    return url


async def _settle(kv: kvclient.aio.Client) -> None:
    """Wait (bounded) for the fences of cancelled calls to finish."""
    fences = kv._backend._fences
    if fences:
        await asyncio.wait(list(fences), timeout=10)
    assert not fences


def test_a_cancelled_get_never_swallows_an_item(redis_url: str) -> None:
    """Cancel waiting gets as items arrive: each item is got by the waiter or back in the queue.

    Three orders, in turn: cancel then put (Redis may serve the waiter's BLMOVE before it sees
    that connection close: the fence unblocks it and takes the item back), put in flight
    then cancel, put answered then cancel. An item a cancelled get took and nobody put back
    would sit in that client's in-flight list: not in the queue, so counted missing here.
    """

    async def main() -> None:
        async with (
            kvclient.aio.connect(redis_url) as kv,
            kvclient.aio.connect(redis_url) as other,
        ):
            q = await kv.queue("jobs")
            q2 = await other.queue("jobs")
            cancelled_with_item_queued = 0
            for i in range(30):
                waiter = asyncio.create_task(q.get())
                await asyncio.sleep(0.02)  # the get is waiting in BLMOVE
                if i % 3 == 0:
                    waiter.cancel()
                    await q.put(i)
                elif i % 3 == 1:
                    putter = asyncio.create_task(q.put(i))
                    await asyncio.sleep(0.0005 * (i % 4))
                    waiter.cancel()
                    await putter
                else:
                    await q.put(i)
                    waiter.cancel()
                try:
                    got = [await waiter]
                except asyncio.CancelledError:
                    got = []
                await _settle(kv)
                queued = await q2.qsize()
                assert len(got) + queued == 1, (i, got, queued)
                if queued:
                    cancelled_with_item_queued += got == []
                    got = [await q2.get_nowait()]
                assert got == [i]
            assert await q2.unfinished_tasks() == 30  # a put back item keeps its count
            assert cancelled_with_item_queued > 0  # some rounds did cancel a get

    asyncio.run(main())


def test_a_cancelled_acquire_never_keeps_the_lock(redis_url: str) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(redis_url) as kv:
            lock = await kv.lock("deploy", lease=30)
            for i in range(10):
                assert await lock.acquire()
                waiter = asyncio.create_task(lock.acquire())
                await asyncio.sleep(0.03)  # waiting in line, in BLPOP
                await lock.release()  # hands the lock to the waiter, which is being cancelled
                await asyncio.sleep((i % 3) * 0.001)
                waiter.cancel()
                try:
                    if await waiter:
                        await lock.release()  # it won before the cancel landed: ours
                except asyncio.CancelledError:
                    pass
                await _settle(kv)
                status = await lock.status()
                assert (status["locked"], status["waiters"]) == (False, 0), i

    asyncio.run(main())


def test_waiting_calls_do_not_hold_up_others(redis_url: str) -> None:
    """Five gets and a lock wait parked on one client; other calls answer at once."""

    async def main() -> float:
        async with kvclient.aio.connect(redis_url) as kv:
            q = await kv.queue("idle")
            lock = await kv.lock("held")
            assert await lock.acquire()
            waits = [asyncio.create_task(q.get()) for _ in range(5)]
            waits.append(asyncio.create_task(lock.acquire()))
            await asyncio.sleep(0.2)
            d = await kv.dict("d")
            began = time.monotonic()
            for i in range(20):
                await d.set(i, i)
            assert await d.get(19) == 19
            took = time.monotonic() - began
            for i in range(5):
                await q.put(i)
            assert sorted([await w for w in waits[:5]]) == [0, 1, 2, 3, 4]
            await lock.release()
            assert await asyncio.wait_for(waits[5], 10)
            await lock.release()
            return took

    assert asyncio.run(main()) < 5.0


def test_connect_refuses_an_authkey_for_a_redis_url() -> None:
    with pytest.raises(ValueError, match="authkey= is kvserve's"):
        kvclient.aio.connect("redis://127.0.0.1:6379/0", b"k" * 32)
    with pytest.raises(ValueError, match="max_connections= is for kvserve"):
        kvclient.aio.connect("redis://127.0.0.1:6379/0", max_connections=2)


def test_a_retrys_backoff_pauses_only_its_task() -> None:
    """A call whose server went away waits out its backoff in asyncio: other tasks run.

    The server is stopped after connecting, so every attempt of ``d.set`` fails at once
    (connection refused) and the call spends its time in the four 0.1 s backoffs; a 1 ms
    ticker task must keep ticking through them (time.sleep there would stop the loop).
    """
    server = redis_cluster.Standalone().start()

    async def main() -> int:
        retry = Retry(ConstantBackoff(0.1), retries=4)
        async with kvclient.aio.connect(server.url, retry=retry) as kv:
            d = await kv.dict("d")
            await d.set("k", 1)
            server.stop()
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0)
            with pytest.raises(KVConnectionError):
                await asyncio.wait_for(d.set("k", 2), 30)
            ticker.cancel()
            return ticks

    try:
        assert asyncio.run(main()) >= 20
    finally:
        server.stop()


def test_a_cancelled_gets_fence_takes_only_what_that_get_took(
    redis_standalone_session: redis_cluster.Standalone, redis_standalone_url: str
) -> None:
    """Items queued after a cancelled get stopped waiting are not the fence's: order kept.

    The get is cancelled while it waits; once the server counts no blocked client (its
    ``BLMOVE`` is over, so it took nothing), A and B are put by a sync client, with the
    loop held, so before the fence's script runs. The fence must leave them alone: the
    queue stays [A, B] (a fence taking A from the queue and putting it back made it [B, A],
    and on a full queue lost it), with two unfinished tasks.
    """
    node = redis_standalone_session.node
    assert node is not None

    async def main() -> None:
        with kvclient.connect(redis_standalone_url) as sync:
            async with kvclient.aio.connect(redis_standalone_url) as kv:
                q = await kv.queue("jobs")
                waiter = asyncio.create_task(q.get())
                await asyncio.sleep(0.05)  # waiting in BLMOVE
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                deadline = time.monotonic() + 10
                while "blocked_clients:0" not in node.cli("info", "clients"):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                sync.queue("jobs").put("A")
                sync.queue("jobs").put("B")
                await _settle(kv)
                assert await q.unfinished_tasks() == 2
                assert [await q.get_nowait(), await q.get_nowait()] == ["A", "B"]

    asyncio.run(main())


def test_a_new_retry_gives_pooled_sessions_its_window(redis_standalone_url: str) -> None:
    """After ``kv.retry = ...`` every call's request id carries the new retention window.

    The token's ``:<ms>`` suffix tells the scripts how long to keep its answer. Sessions
    idle in the pool, and one in a call in flight (a waiting get) when the setting changes,
    must not be used again: every token the later calls record ends in the new window.
    """
    import redis

    async def main() -> tuple[set[bytes], int, int]:
        async with kvclient.aio.connect(redis_standalone_url) as kv:
            before = await kv.dict("before")
            await asyncio.gather(*(before.set(i, i) for i in range(3)))  # 3 sessions pooled
            q = await kv.queue("jobs")
            waiter = asyncio.create_task(q.get())
            await asyncio.sleep(0.05)  # in flight with a pooled session
            backend: Any = kv._backend  # an AsyncRedisBackend
            old = backend.windows.request_ids
            kv.retry = Retry(ConstantBackoff(0.5), retries=2)
            new = backend.windows.request_ids
            await q.put("x")
            assert await waiter == "x"
            after = await kv.dict("after")
            for i in range(3):
                await after.set(i, i)
            await asyncio.gather(*(after.set(i, i) for i in range(4)))
        with redis.Redis.from_url(redis_standalone_url) as r:
            return set(r.hkeys(container_keys("after")[1])), old, new

    tokens, old, new = asyncio.run(main())
    assert old != new
    assert tokens and {t.rsplit(b":", 1)[1] for t in tokens} == {str(new).encode()}
