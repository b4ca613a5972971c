"""Queue on Valkey/Redis: handlers over ``scripts/queue.lua``.

``put`` and ``get`` are one script each, exactly-once under their request id. An item leaves
the queue's list only inside a ``get`` script, which records it as that get's answer in the
same step: it is always in the queue or in one recorded answer, so a retry after a lost reply
gets it, and no consumer can die holding an item it was not answered with.

A ``get`` on an empty queue waits in ``BLPOP`` on the queue's *bell* (a list holding at most one
token, never an item), on its own connection only; the server wakes waiters in arrival
order. ``put`` rings it; the woken get runs its script again, with the same request id, to
take the item, and rings again for any left. A waiter that stalls or dies once woken holds
only the token: another waiter then takes the item after at most one wait (below) or the next
``put``. Waits are chunks of at most 5 s (and half the call timeout), each followed by the
script, so a bell lost so is never waited for longer.

A ``put`` on a full queue, and ``join``, poll (5 ms doubling to 50 ms): Redis has no blocking
wait on a count.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Final

from kvclient._redis._backend import Call, Handler, kind_scripts
from kvclient._redis.kinds import Kind, register
from kvproto.limits import check_timeout

__all__ = ["QUEUE", "unget"]

_S: Final = kind_scripts("queue")
_POLL_FIRST: Final = 0.005
_POLL_MOST: Final = 0.05
# Longest single wait: a longer one is several, each well under the reply timeout, and each
# followed by the get script (so an item whose bell another waiter took waits no longer).
_CHUNK: Final = 5.0
_SHORTEST: Final = 0.001  # BLPOP's timeout 0 would wait for ever


def _deadline(block: Any, timeout: Any, ctx: Call) -> tuple[bool, float | None]:
    check_timeout(timeout)
    if ctx.in_batch or not block:
        return False, None
    return True, None if timeout is None else time.monotonic() + max(0.0, float(timeout))


def _put(ctx: Call, args: list[Any]) -> None:
    item = args[0]
    block, deadline = _deadline(
        args[1] if len(args) > 1 else True, args[2] if len(args) > 2 else None, ctx
    )
    packed = ctx.pack(item)
    pause = _POLL_FIRST
    while ctx.run(_S["put"], packed, "1" if block else "0") is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise queue.Full
        left = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
        ctx.sleep(left)
        pause = min(pause * 2, _POLL_MOST)


def _get(ctx: Call, args: list[Any]) -> Any:
    block, deadline = _deadline(args[0] if args else True, args[1] if len(args) > 1 else None, ctx)
    waited = "0"
    while True:
        left = _CHUNK if deadline is None else deadline - time.monotonic()
        found = ctx.run(_S["get"], "1" if block else "0", waited)
        if found is not None:  # not waiting: answers an item or raises queue.Empty
            return ctx.unpack(found[0])
        if left <= 0:
            raise queue.Empty
        wait = min(left, _CHUNK)
        if ctx.call_timeout is not None:
            wait = min(wait, max(0.01, ctx.call_timeout / 2))
        ctx.execute("BLPOP", ctx.keys[3], f"{max(wait, _SHORTEST):.3f}")
        waited = "1"  # woken or not, take what is there now; then wait again if need be


def unget(ctx: Call) -> int:
    """Put back what the cancelled get ``ctx`` took (asyncio's fence); return how many.

    Run once its ``BLPOP`` can take nothing more. Only that get's item (recorded under its
    request id) goes back, at the queue's tail, in one script: never one taken from the
    queue itself, no maxsize check, the unfinished count unchanged. The bell is rung if the
    queue holds items (the cancelled wait may have taken its token).
    """
    return int(ctx.read(_S["unget"], ctx.token, ctx.seq)[0])


def _put_nowait(ctx: Call, args: list[Any]) -> None:
    _put(ctx, [args[0], False, None])


def _get_nowait(ctx: Call, args: list[Any]) -> Any:
    return _get(ctx, [False, None])


def _info(ctx: Call) -> tuple[int, int, int]:
    found = ctx.read(_S["info"])
    maxsize, unfinished, length = (int(x) for x in found)
    return maxsize, unfinished, length


def _qsize(ctx: Call, args: list[Any]) -> int:
    return _info(ctx)[2]


def _empty(ctx: Call, args: list[Any]) -> bool:
    return _info(ctx)[2] == 0


def _full(ctx: Call, args: list[Any]) -> bool:
    maxsize, _unfinished, length = _info(ctx)
    return 0 < maxsize <= length


def _maxsize(ctx: Call, args: list[Any]) -> int:
    return _info(ctx)[0]


def _unfinished(ctx: Call, args: list[Any]) -> int:
    return _info(ctx)[1]


def _task_done(ctx: Call, args: list[Any]) -> None:
    ctx.run(_S["task_done"])


def _join(ctx: Call, args: list[Any]) -> None:
    pause = _POLL_FIRST
    while unfinished := _info(ctx)[1]:
        if ctx.in_batch:
            raise ValueError(f"{unfinished} task(s) unfinished; join() cannot wait in a batch")
        ctx.sleep(pause)
        pause = min(pause * 2, _POLL_MOST)


QUEUE: Final[dict[str, Handler]] = {
    "empty": _empty,
    "full": _full,
    "get": _get,
    "get_nowait": _get_nowait,
    "join": _join,
    "maxsize": _maxsize,
    "put": _put,
    "put_nowait": _put_nowait,
    "qsize": _qsize,
    "task_done": _task_done,
    "unfinished": _unfinished,
}
"""The Queue's methods."""


def _create(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    maxsize = args[0] if args else 0
    if type(maxsize) is not int:
        raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
    return str(maxsize).encode(), "none", []


def _check_existing(check: bytes, args: list[Any]) -> None:
    have = int(check or b"0")
    if args[0] != have:
        raise ValueError(f"this queue exists with maxsize {have}, not {args[0]}")


register("queue", Kind(QUEUE, _create, _check_existing))
