"""Ephemeral keys: bound to their owner's lease, deleted when the owner dies or goes silent.

Conformance tests (they take `kv`, `kv_factory` and `kv_target` only): the owner is a real
client, in this process or a worker process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import pytest

import kvclient
import kvclient.aio
from tests.targets import ClientFactory, Target
from tests.watch_workers import ephemeral_owner

FORKSERVER = mp.get_context("forkserver")


def test_an_ephemeral_key_lives_while_its_owner_renews_it(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    owner = kv_factory()
    assert owner.dict("workers").set("w1", "up", ephemeral=True, lease=1.0) is True
    time.sleep(2.5)  # more than two leases: only the renewals keep it
    assert kv.dict("workers")["w1"] == "up"
    left = kv.dict("workers").ttl("w1")
    assert left is not None and 0 < left <= 1.0
    revision = kv.dict("workers").revision()
    assert revision == 1  # renewals are not changes


def test_an_ephemeral_key_of_a_killed_owner_is_deleted_and_watchers_see_it(
    kv: kvclient.Client, kv_target: Target
) -> None:
    lease = 1.0
    ready = FORKSERVER.Event()
    worker = FORKSERVER.Process(target=ephemeral_owner, args=(kv_target, "w7", lease, ready))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.1):  # a worker that failed to announce itself ends the test
            assert worker.is_alive(), f"the owner exited ({worker.exitcode}) before announcing"
            assert time.monotonic() < deadline, "the owner did not announce itself in 60 s"
        d = kv.dict("workers")
        assert "w7" in d
        watch = d.watch(since=d.revision(), timeout=30)
        time.sleep(lease * 1.5)
        assert "w7" in d  # renewed while the owner lives
        worker.kill()  # SIGKILL: no goodbye
        worker.join(30)
        killed = time.monotonic()
        event = next(watch)
        gone_after = time.monotonic() - killed
        assert (event.op, event.key) == ("expire", "w7")
        assert "w7" not in d
        assert gone_after < lease + 10  # within the lease plus a generous margin
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(30)


def test_ephemeral_needs_a_client_and_no_ttl(kv: kvclient.Client) -> None:
    d = kv.dict("eph")
    with pytest.raises(ValueError, match="leave out ttl"):
        d.set("k", 1, ephemeral=True, ttl=5)
    with pytest.raises(ValueError):
        d.set("k", 1, ephemeral=True, lease=0)
    with kv.batch() as batch, pytest.raises(TypeError, match="batch"):
        batch.dict("eph").set("k", 1, ephemeral=True)
    with pytest.raises((TypeError, ValueError)):
        kv.call("dict", "eph", "set", ["k", 1, None, False, b"owner"])
    with pytest.raises(TypeError):
        kv.call("dict", "eph", "renew", ["not bytes", 0])


def test_overwriting_an_ephemeral_key_makes_it_an_ordinary_one(
    kv: kvclient.Client, kv_factory: ClientFactory
) -> None:
    owner = kv_factory()
    owner.dict("reg").set("svc", "a", ephemeral=True, lease=1.0)
    kv.dict("reg")["svc"] = "b"  # taken over by a plain write: no deadline, no owner
    owner.close()
    time.sleep(2.0)
    assert kv.dict("reg")["svc"] == "b"


def test_the_asyncio_client_renews_its_ephemeral_keys(
    kv: kvclient.Client, kv_target: Target
) -> None:
    if not kv_target.implementation.startswith("kvserve"):
        pytest.skip("kvclient.aio speaks to kvserve")

    async def main() -> None:
        async with kvclient.aio.connect(kv_target.address, kv_target.authkey) as akv:
            d = await akv.dict("aworkers")
            assert await d.set("a1", "up", ephemeral=True, lease=1.0) is True
            await asyncio.sleep(2.5)
            assert kv.dict("aworkers")["a1"] == "up"  # renewed by the client's task

    asyncio.run(main())
    start = time.monotonic()
    while "a1" in kv.dict("aworkers"):  # closed: nobody renews it any more
        assert time.monotonic() - start < 11
        time.sleep(0.05)
