"""kvclient.aio on its own: concurrency on one client, cancellation, restarts, the async API.

The behaviour it shares with the sync client is the conformance suite's, run through
`tests/aio_adapter.py` (`[kvserve-asyncio]`); these are what only an asyncio client has.
Cancellation races, with exact accounting, are in `tests/test_aio_cancel.py`.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

import kvclient
import kvclient.aio
from kvclient.retry import ConstantBackoff, Retry
from kvserve import Server
from tests.conftest import read_listening_line, start_kvserve
from tests.test_reliability import ChaosProxy

_T = TypeVar("_T")
SPAWN = mp.get_context("spawn")


def run(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``main()`` on a fresh loop, bounded: a hang fails the test instead of the run."""

    async def bounded() -> _T:
        async with asyncio.timeout(120):
            return await main()

    return asyncio.run(bounded())


async def until(predicate: Callable[[], Any], what: str, seconds: float = 30.0) -> None:
    """Wait (bounded in time) until ``predicate()`` is true."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_the_containers_and_server_calls_awaited(address: str, authkey: bytes) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            d = await kv.dict("d", {"a": 1})
            assert isinstance(d, kvclient.aio.AsyncDictProxy)
            await d.set("b", 2)
            assert await d["a"] == 1
            assert await d.get("b") == 2
            assert await d.incr("a", 5) == 6
            assert await d.contains("b") and await d.length() == 2
            assert [k async for k in d] == ["a", "b"]
            await d.delete("b")
            with pytest.raises(KeyError):
                await d["b"]
            lst = await kv.list("l", range(3))
            await lst.append(3)
            assert await lst[1:3] == [1, 2]
            await lst.set(0, "x")
            assert await lst.copy() == ["x", 1, 2, 3]
            ns = await kv.namespace("n")
            await ns.set("x", 1)
            assert await ns.x == 1
            assert await ns.incr("x") == 2
            q = await kv.queue("q", maxsize=2)
            await q.put("job")
            assert await q.qsize() == 1
            assert await q.get(timeout=5) == "job"
            with pytest.raises(kvclient.KindError):
                await kv.list("d")
            assert await kv.names() == {"d": "dict", "l": "list", "n": "namespace", "q": "queue"}
            assert (await kv.describe())["l"]["size"] == 4
            assert (await kv.stats())["containers"] == 4
            await kv.ping()
            assert await kv.drop("n") and not await kv.drop("n")
            async with kv.batch() as b:
                bd = await b.dict("d")
                first = bd.get("a")
                bd["c"] = 3
                b.bind(lst).append(4)
            assert first.value == 6
            assert await d.get("c") == 3 and await lst.pop() == 4

    run(main)


def test_dunders_that_cannot_be_awaited_name_the_method_to_use(
    address: str, authkey: bytes
) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            d = await kv.dict("d")
            with pytest.raises(TypeError, match=r"await d\.set\(k, v\)"):
                d["k"] = 1
            with pytest.raises(TypeError, match=r"await d\.contains\(k\)"):
                _ = "k" in d
            with pytest.raises(TypeError, match=r"await d\.length\(\)"):
                len(d)
            ns = await kv.namespace("n")
            with pytest.raises(TypeError, match=r"await ns\.set\('x', value\)"):
                ns.x = 1
            lock = await kv.lock("l")
            with pytest.raises(TypeError, match="async with lock"), lock:
                pass
            assert await d.get("k") is None and await ns.to_dict() == {}  # nothing was sent

    run(main)


async def _thousand_incrs(address: str, authkey: bytes) -> tuple[list[int], int]:
    """1,000 tasks on one client, one ``incr`` each; return what each saw, and the pool size."""
    async with kvclient.aio.connect(address, authkey, max_connections=16) as kv:
        d = await kv.dict("totals")
        results = await asyncio.gather(*(d.incr("n") for _ in range(1000)))
        return list(results), kv._backend.open_connections


def _thousand_incrs_in_a_process(address: str, authkey: bytes) -> None:
    results, _ = asyncio.run(_thousand_incrs(address, authkey))
    if len(set(results)) != 1000:
        raise AssertionError("two incr calls saw the same value")


def test_a_thousand_tasks_incr_on_one_client_exact_total(address: str, authkey: bytes) -> None:
    # Two more processes doing the same at the same time: each client's tasks interleave
    # with other clients' calls on the server, not only with one another.
    others = [
        SPAWN.Process(target=_thousand_incrs_in_a_process, args=(address, authkey))
        for _ in range(2)
    ]
    for p in others:
        p.start()
    try:
        results, connections = run(lambda: _thousand_incrs(address, authkey))
    finally:
        for p in others:
            p.join(60)
    assert [p.exitcode for p in others] == [0, 0]
    with kvclient.connect(address, authkey) as sync:
        assert sync.dict("totals")["n"] == 3000  # every incr applied exactly once
    assert len(set(results)) == 1000 and max(results) <= 3000  # each saw its own value
    assert 2 <= connections <= 16  # a pool, not a connection per task (nor one for all)


def test_a_parked_get_blocks_no_other_task(address: str, authkey: bytes) -> None:
    async def main() -> int:
        async with kvclient.aio.connect(address, authkey, max_connections=2) as kv:
            q = await kv.queue("q")
            d = await kv.dict("d")
            getter = asyncio.create_task(q.get())
            await asyncio.sleep(0)  # the get is sent and parks; it holds one connection
            for _ in range(50):
                await d.incr("n")  # served on the other connection, not behind the get
            await q.put("x")
            assert await getter == "x"
            return int(await d["n"])

    assert run(main) == 50


def test_cancelling_a_parked_get_withdraws_it(server: Server, address: str, authkey: bytes) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            q = await kv.queue("q")
            getter = asyncio.create_task(q.get())
            await until(lambda: "q" in server.engine.parked, "the get to park")
            getter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await getter
            await until(lambda: "q" not in server.engine.parked, "the get to be withdrawn")
            await q.put("item")
            with kvclient.connect(address, authkey) as sync:
                assert sync.queue("q").get(timeout=5) == "item"  # not given to the gone task

    run(main)


def test_locks_conditions_barriers_and_the_lease_task(address: str, authkey: bytes) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            async with kv.lock("x", lease=1.0) as token:
                assert token == 1
                assert kv.leases.renewing and kv.leases._task is not None  # a task, no thread
                await asyncio.sleep(1.5)  # longer than the lease: the task renewed it
                lock = await kv.lock("x")
                assert await lock.locked()
            assert not await lock.locked()
            barrier = await kv.barrier("b", 3)
            assert sorted(await asyncio.gather(*(barrier.wait(10) for _ in range(3)))) == [0, 1, 2]
            cond = await kv.condition("c")
            ready = await kv.event("ready")

            async def waiter() -> bool:
                async with cond:
                    await ready.set()
                    return bool(await cond.wait(10))

            task = asyncio.create_task(waiter())
            assert await ready.wait(10)
            async with cond:  # another task: another owner, as another thread would be
                await cond.notify()
            assert await task
            rlock = await kv.rlock("r")
            async with rlock, rlock:  # re-entrant for this task
                other = asyncio.create_task(rlock.acquire(timeout=0.1))
                assert not await other  # another task is another holder

    run(main)


def test_exactly_once_through_lost_replies(server: Server, authkey: bytes) -> None:
    chaos = ChaosProxy(server.address, every=7)
    try:

        async def main() -> tuple[int, list[int]]:
            retry = Retry(ConstantBackoff(0.01), retries=20)
            async with kvclient.aio.connect(chaos.address, authkey, retry=retry) as kv:
                d = await kv.dict("d")
                results = await asyncio.gather(*(d.incr("n") for _ in range(200)))
                return await d["n"], sorted(results)

        total, results = run(main)
    finally:
        chaos.close()
    assert chaos.dropped > 0  # replies were lost, and retried
    assert total == 200 and results == list(range(1, 201))


@pytest.mark.slow
def test_async_load_rides_through_a_server_restart(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    data = ["--data-dir", str(tmp_path / "data")]
    proc = start_kvserve(env, *data)
    address = read_listening_line(proc)
    n_tasks, n_ops = 100, 10

    async def main() -> int:
        async with kvclient.aio.connect(address, authkey, max_connections=8) as kv:
            d = await kv.dict("d")

            async def worker() -> None:
                for _ in range(n_ops):
                    await d.incr("n")

            tasks = [asyncio.create_task(worker()) for _ in range(n_tasks)]
            with kvclient.connect(address, authkey) as sync:
                await until(lambda: sync.dict("d").get("n", 0) >= n_tasks * n_ops // 4, "load")
            nonlocal proc
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            proc = start_kvserve(env, *data, "--port", address.rsplit(":", 1)[1])
            read_listening_line(proc)
            await asyncio.gather(*tasks)
            return int(await d["n"])

    try:
        assert run(main) == n_tasks * n_ops  # none lost, none applied twice
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_loop_blocked_longer_than_the_lease_loses_the_lock(address: str, authkey: bytes) -> None:
    async def main() -> None:
        async with kvclient.aio.connect(address, authkey) as kv:
            lock = await kv.lock("l", lease=0.5)
            assert await lock.acquire()
            time.sleep(1.5)  # blocks the loop: the renewal task cannot run (the documented limit)
            with kvclient.connect(address, authkey) as sync:
                other = sync.lock("l", lease=30)
                assert other.acquire(timeout=5)  # released by the server, as for a stalled process
                with pytest.raises(RuntimeError, match="lease"):
                    await lock.release()
                other.release()

    run(main)


def test_a_burst_of_tasks_opens_connections_within_the_servers_pending_limit(
    address: str, authkey: bytes
) -> None:
    async def main() -> int:
        # retry=None: a connection the server closed for being over its --max-pending (64
        # handshakes at once) would fail its call instead of being retried after a backoff.
        async with kvclient.aio.connect(address, authkey, retry=None, max_connections=200) as kv:
            d = await kv.dict("d")
            event = await kv.event("go")

            async def call() -> None:
                await event.wait(30)  # each holds its connection until all are open
                await d.incr("n")

            tasks = [asyncio.create_task(call()) for _ in range(199)]
            await until(lambda: kv._backend.open_connections >= 199, "199 connections")
            await event.set()
            await asyncio.gather(*tasks)
            return int(await d["n"])

    assert run(main) == 199
