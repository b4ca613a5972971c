"""Queue on Valkey/Redis: handlers over ``scripts/queue.lua``.

``put`` and ``get`` are one script each, exactly-once under their request id. A ``get`` on
an empty queue waits in ``BLMOVE`` on its own connection only (the server wakes waiters in
arrival order), moving the item into this client thread's in-flight list, and then runs the
``get`` script again with the same request id, which takes it from there and records the
answer: if the reply of either is lost, the retry finds the item (in flight, or recorded)
rather than dropping it. The in-flight list has a lease (the wait, then the client's
retry window: :mod:`kvclient._redis._retention`): once it ends, because its consumer died or was cut
off between the ``BLMOVE`` and the ``get``, the next ``get`` (any consumer's, the queue empty
or not) puts the item back at the head of the queue and takes it, as kvserve hands a dead
getter's item on.

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
# Longest single BLMOVE: a wait longer than this is several, each well under the reply timeout.
_CHUNK: Final = 5.0


def _inflight(ctx: Call) -> None:
    """Point the in-flight key (``KEYS[5]``) at this client thread's own list."""
    assert ctx.token, "get carries a request id (kvproto.schema: it mutates)"
    ctx.keys[4] = ctx.keys[0][:-1] + f"f:{ctx.token}".encode()


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
    _inflight(ctx)
    while True:
        left = _CHUNK if deadline is None else deadline - time.monotonic()
        wait = min(left, _CHUNK)
        if ctx.call_timeout is not None:
            wait = min(wait, max(0.01, ctx.call_timeout / 2))
        if block:  # the in-flight list is kept for the wait that may fill it, then the lease
            hold = int(max(wait, 0.0) * 1000) + ctx.windows.in_flight
            found = ctx.run(_S["get"], "1", str(hold))
        else:  # answers an item or raises queue.Empty
            found = ctx.run(_S["get"], "0")
        if found is not None:
            return ctx.unpack(found[0])
        if left <= 0:
            raise queue.Empty
        moved = ctx.execute("BLMOVE", ctx.keys[2], ctx.keys[4], "LEFT", "RIGHT", f"{wait:.3f}")
        if moved is None and deadline is not None and time.monotonic() >= deadline:
            raise queue.Empty


def unget(ctx: Call) -> int:
    """Put back what the cancelled get ``ctx`` took (asyncio's fence); return how many.

    Run once its ``BLMOVE`` can move nothing more. Only that get's item (recorded under its
    request id, or in its in-flight list) goes back, at the queue's tail, in one script:
    never one taken from the queue itself, no maxsize check, the unfinished count unchanged.
    """
    _inflight(ctx)
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
