"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier on Valkey/Redis.

Handlers over ``scripts/sync.lua``, with kvserve's semantics (:mod:`kvserve.sync` is the
reference; the proxies of :mod:`kvclient.sync`, the flows of :mod:`kvclient._flows` and the
lease renewal of :mod:`kvclient._leases` run unchanged on them): every hold is a lease that
ends when its holder stops renewing, every acquire gets the next fencing token of that
primitive's counter, a release by an owner that does not hold is a ``RuntimeError`` (a Lock
may be released by another owner, as ``threading`` allows), and every argument is checked here
as kvserve checks it (:mod:`kvproto.limits`). Everything of one primitive is under its hash
tag, so in one slot: each operation is one atomic script on one node, and its lease clock is
that node's (``TIME``), never a client's. Leases and timeouts are milliseconds there, so
sub-second ones work.

Waiting: per-waiter wake lists
------------------------------
A call that must wait (acquire, ``Condition.wait``, ``Event.wait``, ``Barrier.wait``) runs its
script, which either answers or registers the call (under a random ``wait_id``) and answers
``again``; the caller then sleeps in ``BLPOP`` on its own list ``kv{name}:x:<wait_id>`` on its
own connection, and runs the script again when woken. What frees a hold pushes one element to
the list of the waiter it concerns: a release or an expiry *hands* a Lock, RLock or Semaphore
hold to the first blocked acquire (FIFO, as on kvserve) and wakes it with the hold already its
own; ``notify`` wakes the notified Condition waiters; ``set`` every Event waiter; a trip,
abort, reset or timeout every Barrier waiter. So a blocked call holds nothing but its own
connection (no thread, no connection of the pool beyond its own, no lock on the server) and
makes no calls while nothing happens.

Nothing on Redis runs by itself when a lease runs out, so a waiter's ``again`` carries the
milliseconds until the earliest holder's lease ends, and it sleeps no longer than that: it
wakes to find the hold either renewed (and sleeps again) or expired (the script releases it and
hands it on). Cost of a wait, measured in round trips: 2 for one that is woken once; while a
live holder keeps renewing, 1 more per two thirds of a lease (it sleeps until the lease it saw
would end, the holder renews every third of one); at most one every ``_MAX_SLEEP`` seconds
otherwise, and no sleep is longer than half the call timeout (a ``BLPOP`` must answer before
the socket times out). A waiter's registration is itself leased (the lease keeper renews it),
so a waiter that died is forgotten and never handed a hold.

Each operation reads every hold and blocked call of its primitive (to release what expired),
so its cost grows with the number of waiters on that one primitive, not with the store.

Differences from kvserve
------------------------
- A waiter whose process died keeps its place in line until its registration's lease runs
  out (kvserve drops it when its connection closes): a hold handed to it in that time is
  released one lease later.
- Leases run on the serving node's wall clock: a clock step on that node, or a failover to a
  replica whose clock differs, lengthens or shortens the leases in flight (kvserve's clock is
  monotonic).
- The token counter is replicated like every write, asynchronously: a failover that loses
  acknowledged writes can issue a token again (see the README's guarantees table). A holder
  that survives it raises the counter back to its own token with its next renewal.
- ``drop`` wakes no waiter: one learns of it (``NoSuchContainerError``) when it next runs its
  script, within ``_MAX_SLEEP`` seconds.
- ``describe`` counts holders (or 1) rather than slots; a Condition's freed lock wakes all its
  blocked calls to compete for it (a small thundering herd; kvserve's Condition is not FIFO
  either). An Event waiter sees every ``set`` made while it waited, even one cleared at once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import msgpack

from kvclient._redis._backend import Call, Handler, container_keys, kind_scripts
from kvclient._redis.kinds import Kind, register
from kvproto.errors import KVError, release_error
from kvproto.limits import check_bool, check_int64, check_lease, check_timeout

__all__ = ["BARRIER", "CONDITION", "EVENT", "LOCK", "RLOCK", "SEMAPHORE", "withdraw"]

_S: Final = kind_scripts("sync")
_OWNER_MAX: Final = 64
_MAX_SLEEP: Final = 10.0  # seconds: the longest BLPOP, when no lease or timeout is sooner
_MIN_SLEEP: Final = 0.005  # BLPOP with 0 would wait for ever
_MARGIN: Final = 0.005  # wake this long after a lease would end, not before


# -- argument checks (as kvserve.sync checks them) ----------------------------------------------


def _owner(owner: Any, what: str = "owner") -> bytes:
    if type(owner) is not bytes or not 0 < len(owner) <= _OWNER_MAX:
        raise TypeError(f"{what} must be 1 to {_OWNER_MAX} bytes")
    return owner


def _wait_id(wait_id: Any) -> bytes | None:
    return None if wait_id is None else _owner(wait_id, "wait_id")


_bool = check_bool
_int = check_int64


def _ms(seconds: float) -> str:
    return repr(seconds * 1000.0)


# -- running scripts and waiting ----------------------------------------------------------------


def _run(ctx: Call, op: str, *argv: Any, what: str = "") -> tuple[bool, list[Any]]:
    """Run ``op``; return ``(answered, payload)`` (False: ``again``, the payload its hint)."""
    # Not Call.run: an 'again' here carries a hint (when the earliest lease ends) that it
    # drops. A call with a request id changes state: confirmed with durability="replica".
    reply = ctx._backend.evalsha(
        _S[op], ctx.keys, [ctx.kind, ctx.token, ctx.seq, *argv], confirm=ctx.token != ""
    )
    status = reply[0]
    if status == b"ok":
        return True, list(reply[1:])
    if status == b"again":
        return False, list(reply[1:])
    name, detail = reply[1].decode(), reply[2].decode() if len(reply) > 2 else ""
    if name == "NotHeld":
        raise release_error(what or ctx.kind.replace("_", " "), detail)
    if name == "BrokenBarrierError":
        raise threading.BrokenBarrierError
    raise ctx.error(name, detail)


def _ok(ctx: Call, op: str, *argv: Any, what: str = "") -> list[Any]:
    answered, payload = _run(ctx, op, *argv, what=what)
    if not answered:
        raise KVError(f"{ctx.name!r}: {op} answered 'again' where it cannot wait")
    return payload


def _sleep_cap(ctx: Call) -> float:
    timeout = ctx.call_timeout
    return _MAX_SLEEP if timeout is None else max(_MIN_SLEEP, min(_MAX_SLEEP, timeout / 2))


def _blocking(
    ctx: Call,
    op: str,
    wait_id: bytes,
    timeout: float | None,
    argv: Callable[[str, list[Any]], list[Any]],
) -> list[Any]:
    """Run ``op`` until it answers, sleeping on ``wait_id``'s wake list between runs.

    ``argv(phase, hint)`` gives the script's arguments: ``phase`` is ``first``, ``again``, or
    ``last`` once ``timeout`` (seconds, None for ever) ran out (the script must then answer);
    ``hint`` is the previous ``again``'s payload. In a batch nothing waits (``last`` at once).
    """
    end = None if timeout is None else time.monotonic() + timeout
    phase = "last" if timeout == 0 or ctx.in_batch else "first"
    wake = container_keys(ctx.name, "x:" + wait_id.hex())[-1]
    hint: list[Any] = []
    cap = _sleep_cap(ctx)
    while True:
        answered, payload = _run(ctx, op, *argv(phase, hint))
        if answered:
            return payload
        if phase == "last":
            raise KVError(f"{ctx.name!r}: {op} answered 'again' after its wait ran out")
        hint, phase = payload, "again"
        sleep = cap
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                phase = "last"
                continue
            sleep = min(sleep, left)
        if hint and hint[0] != b"-1" and ctx.kind not in ("event", "barrier"):
            sleep = min(sleep, float(hint[0]) / 1000.0 + _MARGIN)
        ctx.execute("BLPOP", wake, repr(max(sleep, _MIN_SLEEP)))


# -- leased primitives ---------------------------------------------------------------------------


def _acquire(ctx: Call, args: list[Any]) -> int | bool:
    owner, blocking, timeout, lease, wait_id = _acquire_args(args)
    waits = blocking and timeout != 0 and not ctx.in_batch
    wid = (wait_id or secrets.token_bytes(8)) if waits else None

    def argv(phase: str, hint: list[Any]) -> list[Any]:
        return [owner, "1" if waits else "0", wid or b"", _ms(lease), phase]

    if wid is None:
        found = _ok(ctx, "acquire", *argv("last", []))
    else:
        found = _blocking(ctx, "acquire", wid, timeout, argv)
    return False if found[0] is None else int(found[0])


def withdraw(ctx: Call, args: list[Any]) -> int | None:
    """End a cancelled ``acquire`` with its request id: return the token it got, or None.

    ``args`` are the acquire's, with its ``wait_id`` (the asyncio front end gives every
    acquire one, for this). Run again as a last phase, the script answers what it answered
    (the id is recorded), or hands over a hold given to the waiter meanwhile, or takes a free
    one, or takes the waiter out of the line: afterwards the acquire can win nothing.
    """
    owner, blocking, timeout, lease, wait_id = _acquire_args(args)
    waits = blocking and timeout != 0 and not ctx.in_batch
    found = _ok(ctx, "acquire", owner, "1" if waits else "0", wait_id or b"", _ms(lease), "last")
    return None if found[0] is None else int(found[0])


def _acquire_args(args: list[Any]) -> tuple[bytes, bool, float | None, float, bytes | None]:
    """Check ``acquire [owner, blocking=True, timeout=None, lease=30, wait_id=None]``."""
    if not 1 <= len(args) <= 5:
        raise TypeError(f"acquire takes 1 to 5 arguments, not {len(args)}")
    defaults: list[Any] = [True, None, 30.0, None]
    owner, blocking, timeout, lease, wait_id = [*args, *defaults[len(args) - 1 :]]
    return (
        _owner(owner),
        _bool(blocking, "blocking"),
        check_timeout(timeout),
        check_lease(lease),
        _wait_id(wait_id),
    )


def _release_what(kind: str) -> str:
    if kind == "condition":
        return "condition lock"
    if kind in ("semaphore", "bounded_semaphore"):
        return f"{kind.replace('_', ' ')} slot"
    return kind


def _release(ctx: Call, args: list[Any]) -> int:
    if not args:
        raise TypeError("release takes the owner")
    owner = _owner(args[0])
    extra: list[Any] = []
    if ctx.kind in ("semaphore", "bounded_semaphore"):
        n = _int(args[1] if len(args) > 1 else 1, "n")
        if n < 1:
            raise ValueError("n must be one or more")
        extra = [n]
    return int(_ok(ctx, "release", owner, *extra, what=_release_what(ctx.kind))[0])


def _release_token(ctx: Call, args: list[Any]) -> bool:
    if len(args) != 1:
        raise TypeError("release_token takes the token")
    return bool(_ok(ctx, "release_token", check_int64(args[0], "token"))[0])


def _renew(ctx: Call, args: list[Any]) -> int:
    owner = _owner(args[0])
    token = _int(args[1] if len(args) > 1 else 0, "token")
    return int(_ok(ctx, "renew", owner, token)[0])


def _locked(ctx: Call, args: list[Any]) -> bool:
    return bool(_ok(ctx, "locked")[0])


def _get_value(ctx: Call, args: list[Any]) -> int:
    return int(_ok(ctx, "get_value")[0])


def _status(ctx: Call, args: list[Any]) -> dict[str, Any]:
    last_token, waiters, now, *flat = _ok(ctx, "status")
    now = float(now)
    holders = []
    for i in range(0, len(flat), 2):
        hold = msgpack.unpackb(flat[i + 1])
        tokens = [int(t) for t in hold["t"]]
        holders.append(
            {
                "owner": flat[i].hex(),
                "token": tokens[-1] if tokens else None,
                "tokens": tokens,
                "count": int(hold["c"]),
                "held_for": round((now - hold["s"]) / 1000.0, 3),
                "lease_left": round((hold["d"] - now) / 1000.0, 3),
            }
        )
    return {
        "kind": ctx.kind,
        "locked": bool(holders),
        "holders": holders,
        "last_token": int(last_token),
        "waiters": int(waiters),
    }


def _wait_begin(ctx: Call, args: list[Any]) -> int:
    owner, wait_id = _owner(args[0]), _owner(args[1], "wait_id")
    lease = check_lease(args[2] if len(args) > 2 else 30.0)
    return int(_ok(ctx, "wait_begin", owner, wait_id, _ms(lease))[0])


def _wait_end(ctx: Call, args: list[Any]) -> int | bool:
    owner, wait_id = _owner(args[0]), _owner(args[1], "wait_id")
    count = _int(args[2], "count")
    timeout = check_timeout(args[3] if len(args) > 3 else None)
    lease = check_lease(args[4] if len(args) > 4 else 30.0)

    def argv(phase: str, hint: list[Any]) -> list[Any]:
        return [owner, wait_id, count, _ms(lease), phase]

    found = _blocking(ctx, "wait_end", wait_id, timeout, argv)
    return False if found[0] is None else int(found[0])


def _reacquire(ctx: Call, args: list[Any]) -> list[Any]:
    owner, wait_id = _owner(args[0]), _owner(args[1], "wait_id")
    count = _int(args[2], "count")
    lease = check_lease(args[3] if len(args) > 3 else 30.0)

    def argv(phase: str, hint: list[Any]) -> list[Any]:
        return [owner, wait_id, count, _ms(lease), phase]

    token, notified = _blocking(ctx, "reacquire", wait_id, None, argv)
    return [int(token), bool(notified)]


def _notify(ctx: Call, args: list[Any]) -> int:
    owner = _owner(args[0])
    n = args[1] if len(args) > 1 else 1
    if n is not None:
        _int(n, "n")
    return int(_ok(ctx, "notify", owner, "" if n is None else n)[0])


RLOCK: Final[dict[str, Handler]] = {
    "acquire": _acquire,
    "locked": _locked,
    "release": _release,
    "renew": _renew,
    "status": _status,
}
"""The methods of an RLock (the names :data:`kvproto.schema.KINDS` gives them)."""

LOCK: Final[dict[str, Handler]] = {**RLOCK, "release_token": _release_token}
"""The methods of a Lock: an RLock's, and ending a hold by its fencing token."""

SEMAPHORE: Final[dict[str, Handler]] = {**RLOCK, "get_value": _get_value}
"""The methods of a Semaphore and a BoundedSemaphore."""

CONDITION: Final[dict[str, Handler]] = {
    **RLOCK,
    "notify": _notify,
    "reacquire": _reacquire,
    "wait_begin": _wait_begin,
    "wait_end": _wait_end,
}
"""The methods of a Condition."""


# -- Event and Barrier ----------------------------------------------------------------------------


def _park_ms(ctx: Call) -> str:
    """How long an Event or Barrier waiter stays registered without running again."""
    return _ms(2 * _sleep_cap(ctx) + 30.0)


def _event_wait(ctx: Call, args: list[Any]) -> bool:
    timeout = check_timeout(args[0] if args else None)
    wait_id = secrets.token_bytes(8)

    def argv(phase: str, hint: list[Any]) -> list[Any]:
        return [wait_id, hint[0] if hint else "", phase, _park_ms(ctx)]

    return bool(_blocking(ctx, "wait", wait_id, timeout, argv)[0])


def _flag(op: str) -> Handler:
    def handler(ctx: Call, args: list[Any]) -> Any:
        found = _ok(ctx, op)
        return bool(found[0]) if found else None

    return handler


EVENT: Final[dict[str, Handler]] = {
    "clear": _flag("clear"),
    "is_set": _flag("is_set"),
    "set": _flag("set"),
    "wait": _event_wait,
}
"""The methods of an Event."""


def _barrier_check(check: bytes) -> tuple[int, float | None]:
    parties, _, timeout = check.decode().partition("|")
    return int(parties), (float(timeout) if timeout else None)


def _info(ctx: Call, args: list[Any]) -> dict[str, Any]:
    check, _gen, count, broken = _ok(ctx, "info")
    parties, timeout = _barrier_check(check)
    return {
        "parties": parties,
        "n_waiting": 0 if broken else int(count),
        "broken": bool(broken),
        "timeout": timeout,
    }


def _arrive(ctx: Call, args: list[Any]) -> list[Any]:
    generation, index, tripped, check = _ok(ctx, "arrive")
    return [int(generation), int(index), bool(tripped), _barrier_check(check)[1]]


def _await_trip(ctx: Call, args: list[Any]) -> bool:
    generation = _int(args[0], "generation")
    timeout = check_timeout(args[1] if len(args) > 1 else None)
    wait_id = secrets.token_bytes(8)

    def argv(phase: str, hint: list[Any]) -> list[Any]:
        return [generation, wait_id, phase, _park_ms(ctx)]

    return bool(_blocking(ctx, "await_trip", wait_id, timeout, argv)[0])


def _timed_out(ctx: Call, args: list[Any]) -> bool:
    return bool(_ok(ctx, "timed_out", _int(args[0], "generation"))[0])


BARRIER: Final[dict[str, Handler]] = {
    "abort": _flag("abort"),
    "arrive": _arrive,
    "await_trip": _await_trip,
    "info": _info,
    "reset": _flag("reset"),
    "timed_out": _timed_out,
}
"""The methods of a Barrier."""


# -- creation ------------------------------------------------------------------------------------


def _create_plain(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    return b"", "none", []


def _create_semaphore(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    value = _int(args[0] if args else 1, "the semaphore value")
    if value < 0:
        raise ValueError("semaphore initial value must be >= 0")
    return str(value).encode(), "none", []


def _check_semaphore(kind: str) -> Callable[[bytes, list[Any]], None]:
    def check(existing: bytes, args: list[Any]) -> None:
        if args[0] != int(existing):
            raise ValueError(
                f"this {kind} exists with initial value {int(existing)}, not {args[0]}"
            )

    return check


def _create_barrier(ctx: Call, args: list[Any]) -> tuple[bytes, str, list[bytes]]:
    if not args:
        raise TypeError("a barrier needs its number of parties")
    parties = _int(args[0], "parties")
    if parties < 1:
        raise ValueError("parties must be >= 1")
    timeout = check_timeout(args[1] if len(args) > 1 else None)
    return f"{parties}|{'' if timeout is None else repr(timeout)}".encode(), "none", []


def _check_barrier(existing: bytes, args: list[Any]) -> None:
    parties = _barrier_check(existing)[0]
    if args[0] != parties:
        raise ValueError(f"this barrier exists with {parties} parties, not {args[0]}")


for _kind, _methods in (("lock", LOCK), ("rlock", RLOCK), ("condition", CONDITION)):
    register(_kind, Kind(_methods, _create_plain, size="HLEN"))
for _kind in ("semaphore", "bounded_semaphore"):
    register(_kind, Kind(SEMAPHORE, _create_semaphore, _check_semaphore(_kind), size="HLEN"))
register("event", Kind(EVENT, _create_plain, size=None))
register("barrier", Kind(BARRIER, _create_barrier, _check_barrier, size=None))
