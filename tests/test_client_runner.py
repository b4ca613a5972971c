"""The client's layering: proxies over runners, flows without I/O, explicit stdlib registration."""

from __future__ import annotations

import asyncio
import json
import os
import pickle  # to check how a proxy pickles; never used on the wire
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

import kvclient
from kvclient import _flows
from kvclient._runner import Call, Flow, plan, reply_timeout

_T = TypeVar("_T")


def test_a_proxy_bound_to_a_batch_pickles_as_one_on_the_batch_client(kv: kvclient.Client) -> None:
    d = kv.dict("d")
    with kv.batch() as batch:
        bound = batch.bind(d)
        data = pickle.dumps(bound)  # raised AttributeError: the batch was cast to a Client
    again = pickle.loads(data)
    assert again == d
    again["k"] = 1  # made now, not recorded: the rebuilt proxy is on the client
    assert again["k"] == 1
    assert d.get("k") == 1


def test_a_flow_in_a_batch_is_a_clear_type_error(kv: kvclient.Client) -> None:
    barrier = kv.barrier("b", 2)
    lock = kv.lock("l")
    batch = kv.batch()
    with pytest.raises(TypeError, match="single calls"):
        batch.bind(barrier).wait(0)
    with pytest.raises(TypeError, match="cannot be used in a batch"):
        batch.bind(lock).acquire()
    assert len(batch) == 0  # nothing was recorded


def test_request_ids_and_reply_timeouts_come_from_the_schema() -> None:
    assert plan("dict", "get") is None  # a plain read
    assert plan("list", "__getitem__") is None
    get = plan("queue", "get")  # the same name, a queue's: it consumes an item
    assert get is not None and get.mutates
    assert reply_timeout(get, [True, 2.0], 30.0) == 32.0
    assert reply_timeout(get, [False, 2.0], 30.0) is False  # block=False: the usual timeout
    assert reply_timeout(get, [True, None], 30.0) is None  # waits for ever
    assert reply_timeout(get, [True, 2.0], None) is None
    for refused in (float("nan"), float("inf"), -1.0):  # refused at once: the usual timeout
        assert reply_timeout(get, [True, refused], 30.0) is False
    join = plan("queue", "join")
    assert join is not None and not join.mutates and reply_timeout(join, [], 30.0) is None
    unknown = plan("dict", "no_such_method")
    assert unknown is not None and unknown.mutates  # never retried without a request id


def test_unknown_and_server_level_calls_through_client_call(kv: kvclient.Client) -> None:
    kv.call(None, None, "create", ["list", "made"])
    assert kv.names()["made"] == "list"
    kv.call("list", "made", "append", [1])
    assert kv.call("list", "made", "copy", []) == [1]
    with pytest.raises(AttributeError, match="has no method 'nope'"):
        kv.call("list", "made", "nope", [])


async def _run_async(call: Callable[[Call], Awaitable[Any]], flow: Flow[_T]) -> _T:
    """A tiny asyncio driver of the same flows the sync proxies run (test only)."""
    try:
        step = next(flow)
        while True:
            try:
                result = await call(step)
            except BaseException as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        value: _T = stop.value
        return value


def test_the_flows_run_under_an_async_driver_unchanged(kv: kvclient.Client) -> None:
    kv.barrier("ab", 2)
    lock = kv.lock("al")
    keeper = kv.leases

    async def call(step: Call) -> Any:
        # A real async backend would await its socket; a thread stands in for it here.
        return await asyncio.to_thread(kv.call, step.kind, step.ident, step.method, step.args)

    async def main() -> tuple[list[int], int | bool]:
        indexes = await asyncio.gather(
            _run_async(call, _flows.barrier_wait("ab", 10.0)),
            _run_async(call, _flows.barrier_wait("ab", 10.0)),
        )
        token = await _run_async(
            call, _flows.acquire(keeper, "lock", "al", keeper.owner, True, 5.0, lock.lease)
        )
        return sorted(indexes), token

    indexes, token = asyncio.run(main())
    assert indexes == [0, 1]
    assert token == 1
    assert lock.locked()
    assert [h["owner"] for h in lock.status()["holders"]] == [keeper.owner_id]
    assert keeper.renewing  # the flow told the keeper, which renews the hold
    lock.release()
    assert not lock.locked()


def test_condition_wait_flow_takes_the_lock_back_when_the_wait_raises(
    kv: kvclient.Client,
) -> None:
    cond = kv.condition("c")
    keeper = kv.leases
    tokens: list[int] = []
    with cond:
        flow = _flows.condition_wait(
            keeper, "c", keeper.thread_owner(), None, cond.lease, tokens.append
        )
        step = next(flow)
        assert step.method == "wait_begin"
        step = flow.send(kv.call(*step))
        assert step.method == "wait_end"
        step = flow.throw(KeyboardInterrupt())  # as if interrupted while waiting
        assert step.method == "reacquire"
        with pytest.raises(KeyboardInterrupt):
            flow.send(kv.call(*step))
        assert len(tokens) == 1  # the lock was taken back before the interrupt went on
        assert cond.status()["locked"]
    assert not cond.status()["locked"]


def test_the_stdlib_serializer_is_registered_only_by_register(address: str, authkey: bytes) -> None:
    code = f"""
import json
from multiprocessing import managers
import kvclient, kvclient.stdlib
before = "msgpack" in managers.listener_client
kvclient.stdlib.register()
manager = managers.BaseManager({address!r}, {authkey!r}, serializer="msgpack")
manager.connect()  # the handshake and a stdlib 'dummy' call, over kvmanager's wire
print(json.dumps([before, "msgpack" in managers.listener_client]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, True]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_lease_keeper_starts_afresh_in_a_forked_child(kv: kvclient.Client) -> None:
    lock = kv.lock("forked")
    assert lock.acquire()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            holder = lock.status()["holders"][0]["owner"]
            fresh = kv.leases.owner_id != holder and not kv.leases.renewing
            os.write(write, b"1" if fresh and kv.dict("d").get("x", 7) == 7 else b"0")
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert got == b"1"  # new owner ids, no renewal thread, its own connection
    assert kv.leases.renewing  # the parent's are untouched
    lock.release()
