"""The multi-step operations of the synchronization primitives, written once and with no I/O.

Each flow is a generator (:data:`kvclient._runner.Flow`): it yields the calls to make as
:class:`~kvclient._runner.Call` descriptions, is sent each result (or thrown the exception the
call raised), and returns the operation's result. Lease tracking goes to the client's
:class:`~kvclient._leases.LeaseKeeper`. The sync proxies run them with
:func:`kvclient._runner.run_sync`; an asyncio front end runs the same generators, awaiting
each call, instead of copying them.

Also here: the checks that turn ``threading``-style timeout arguments into the server's waits.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from kvclient._leases import LeaseKeeper
from kvclient._runner import Call, Flow

__all__ = [
    "acquire",
    "barrier_wait",
    "condition_wait",
    "condition_wait_for",
    "lock_wait",
    "plain_wait",
    "release",
]

_T = TypeVar("_T")


def lock_wait(blocking: bool, timeout: float) -> float | None:
    """Return the server-side wait for ``Lock.acquire(blocking, timeout)``, checked as threading.

    None waits for ever; 0 does not wait.

    Raises:
        ValueError: a timeout with ``blocking=False``, or a negative one other than -1.
    """
    if not blocking:
        if timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return 0.0
    if timeout in (-1, math.inf):
        return None
    if math.isnan(timeout) or timeout < 0:
        raise ValueError("timeout value must be positive")
    return float(timeout)


def plain_wait(timeout: float | None) -> float | None:
    """Return the server-side wait for a ``timeout`` where negative means "do not wait".

    Raises:
        ValueError: ``timeout`` is NaN.
    """
    if timeout is None or timeout == math.inf:
        return None
    if math.isnan(timeout):
        raise ValueError("timeout must be a number, not NaN")
    return max(0.0, float(timeout))


def acquire(
    keeper: LeaseKeeper,
    kind: str,
    name: str,
    owner: bytes,
    blocking: bool,
    wait: float | None,
    lease: float,
) -> Flow[int | Literal[False]]:
    """Acquire a leased primitive; return the fencing token, or False when not acquired."""
    key = (name, owner)
    wait_id = None
    if blocking and wait != 0:
        # Tracked while waiting too: the renewals keep this waiter counted in status(), and
        # after a server restart they are the mutating calls that make the server schedule
        # the lease timers of the holds it restored (it does not on its own).
        wait_id = secrets.token_bytes(8)
        keeper.track(key, lease, 0)
    result = yield Call(
        kind, name, "acquire", [owner, blocking, wait if blocking else None, lease, wait_id]
    )
    if result is False:
        return False
    token = int(result)
    keeper.track(key, lease, token)
    return token


def release(
    keeper: LeaseKeeper, kind: str, name: str, owner: bytes, extra: list[int]
) -> Flow[None]:
    """Release one hold (or ``extra[0]`` semaphore slots); stop renewing once none is left."""
    key = (name, owner)
    version = keeper.version(key)
    remaining = yield Call(kind, name, "release", [owner, *extra])
    if remaining == 0:
        keeper.untrack(key, version)


def condition_wait(
    keeper: LeaseKeeper,
    name: str,
    owner: bytes,
    wait: float | None,
    lease: float,
    set_token: Callable[[int], None],
) -> Flow[bool]:
    """Release a Condition's lock, wait for a notify, take the lock back; False if timed out.

    ``set_token`` is given the fencing token of the lock taken back, also when the wait
    raised (the flow then re-raises, holding the lock again, as ``threading`` does).
    """
    key = (name, owner)
    wait_id = secrets.token_bytes(8)
    count = yield Call("condition", name, "wait_begin", [owner, wait_id, lease])
    keeper.track(key, lease, 0)
    try:
        result = yield Call("condition", name, "wait_end", [owner, wait_id, count, wait, lease])
    except BaseException:
        # As threading.Condition.wait does: leave holding the lock again, then raise.
        yield from _reacquire(keeper, name, owner, wait_id, count, lease, set_token)
        raise
    if result is not False:
        set_token(int(result))
        keeper.track(key, lease, int(result))
        return True
    return (yield from _reacquire(keeper, name, owner, wait_id, count, lease, set_token))


def _reacquire(
    keeper: LeaseKeeper,
    name: str,
    owner: bytes,
    wait_id: bytes,
    count: int,
    lease: float,
    set_token: Callable[[int], None],
) -> Flow[bool]:
    token, notified = yield Call("condition", name, "reacquire", [owner, wait_id, count, lease])
    set_token(int(token))
    keeper.track((name, owner), lease, int(token))
    return bool(notified)


def condition_wait_for(
    keeper: LeaseKeeper,
    name: str,
    owner: bytes,
    lease: float,
    predicate: Callable[[], _T],
    timeout: float | None,
    set_token: Callable[[int], None],
) -> Flow[_T]:
    """Wait until ``predicate()`` is true (checked locally, lock held); return its value."""
    end = None
    wait = timeout
    result = predicate()
    while not result:
        if wait is not None:
            if end is None:
                end = time.monotonic() + wait
            else:
                wait = end - time.monotonic()
                if wait <= 0:
                    break
        yield from condition_wait(keeper, name, owner, plain_wait(wait), lease, set_token)
        result = predicate()
    return result


def barrier_wait(name: str, timeout: float | None) -> Flow[int]:
    """Arrive at a Barrier and wait for it to trip; return this party's arrival index.

    Raises:
        threading.BrokenBarrierError: it is or became broken while waiting.
    """
    generation, index, tripped, default = yield Call("barrier", name, "arrive", [])
    if tripped:
        return int(index)
    wait = plain_wait(default if timeout is None else timeout)
    if (yield Call("barrier", name, "await_trip", [generation, wait])):
        return int(index)
    if (yield Call("barrier", name, "timed_out", [generation])):
        return int(index)
    raise threading.BrokenBarrierError
