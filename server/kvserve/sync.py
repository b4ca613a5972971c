"""Synchronization primitives: Lock, RLock, Semaphore, Event, Condition, Barrier, Value, Array.

They are registered with ``KVManager`` through :data:`SYNC_KINDS`. Like every container they
are named, run each method under their own lock, and know nothing of networking. What they add
is *ownership that survives a crash*, and waiting that never holds a server thread.

Owners and leases
-----------------
Every hold (a Lock, an RLock, a Semaphore slot, a Condition's lock or a Condition waiter's
place in line) names its owner explicitly: an opaque id of at most 64 bytes chosen by the
client (kvclient uses 8 random bytes per ``Client`` for Lock and Semaphore, as ``threading.Lock``
may be released by any thread of its process, and 8 + 4 bytes per client thread for RLock and
Condition, which are owned by a thread). The server's ``caller`` injection was rejected for
this: it names the calling *thread's* session, and renewals come from a background thread.

A hold is a lease of ``lease`` seconds (given with each acquire). ``renew(owner)`` extends every
hold of that owner on the container; kvclient renews from one background thread per client
every ``lease / 3``. When a lease runs out (the client died, stalled, or lost its connection for
longer than the lease) the server releases the hold in :meth:`expire` and wakes the next
waiter; the old owner's later ``release`` raises ``RuntimeError``, as releasing an unheld lock
does in ``threading``. Leases are measured with ``time.monotonic()`` and nothing else here
reads a clock.

Fencing tokens
--------------
Every successful acquire returns the next integer of a per-container counter, so a resource
that remembers the largest token it has seen can refuse a holder whose lease already expired.
Re-entering an RLock returns the token of the hold it enters.

Waiting
-------
A call that must wait raises :class:`~kvserve.containers.WouldBlock`; the server parks it and
calls it again after every change. Lock, RLock and Semaphore are ``strict_fifo``: waiters are
served in arrival order. A blocking method changes nothing persistent when it raises
WouldBlock, and a mutating method never changes state and then raises: the persistence log
holds only calls that returned, so those are the only changes replay can repeat. That is why
``Condition.wait`` and ``Barrier.wait`` are several calls on the wire (``wait_begin`` /
``wait_end`` / ``reacquire``; ``arrive`` / ``await_trip`` / ``timed_out``), each of which
either changes state and returns, or waits without changing anything. The one exception is the
table of waiting acquirers kept for ``status()`` (``kvctl lock status``): it is advisory, never
saved, and never consulted for a decision.

Restarts
--------
``state()`` keeps holders, Condition waiters, Barrier arrivals, Event flags, values and the
token counters; ``from_state`` gives every restored hold a fresh lease (its owner renews it if
it is still alive; otherwise it expires one lease after the restart), and token counters only
ever grow. Lease *expiries* are not in the log (the server does not log what :meth:`expire`
does), so replaying a log across an expiry can leave the expired holder in place instead of
its successor; ``renew`` carries the owner's last token and raises the counter to it, so a
renewing successor still never sees its token issued again.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Final

from kvproto.errors import release_error
from kvproto.limits import MAX_LEASE, check_bool, check_int64, check_lease
from kvproto.typecodes import FLOAT_CODES as _FLOAT_CODES
from kvproto.typecodes import INT_CODES as _INT_CODES
from kvproto.typecodes import MAX_ARRAY_LENGTH, TYPECODES, coerce_items, joined
from kvproto.typecodes import ZERO as _ZERO
from kvproto.typecodes import check_typecode as _check_typecode
from kvproto.typecodes import coerce as _coerce
from kvproto.typecodes import typecode_of as _typecode_of
from kvserve.containers import Container, WouldBlock, check_timeout

__all__ = [
    "MAX_ARRAY_LENGTH",
    "MAX_LEASE",
    "SYNC_KINDS",
    "TYPECODES",
    "KVArray",
    "KVBarrier",
    "KVBoundedSemaphore",
    "KVCondition",
    "KVEvent",
    "KVLock",
    "KVRLock",
    "KVSemaphore",
    "KVValue",
]

"""Most items an Array may hold: a length is a few bytes on the wire but a list on the server,
and ``tolist()`` of the largest array still fits in one frame."""
_OWNER_MAX: Final = 64
_LOST_MAX: Final = 1024  # owners remembered as expired, for a clearer release() error
_WAITING_MAX: Final = 4096  # waiting acquirers remembered for status()
_HISTORY: Final = 64  # Barrier generations whose outcome is remembered


# -- argument checks ---------------------------------------------------------------------------


def _check_owner(owner: Any) -> bytes:
    if type(owner) is not bytes or not 0 < len(owner) <= _OWNER_MAX:
        raise TypeError(f"owner must be 1 to {_OWNER_MAX} bytes")
    return owner


def _check_wait_id(wait_id: Any) -> bytes | None:
    if wait_id is None:
        return None
    if type(wait_id) is not bytes or not 0 < len(wait_id) <= _OWNER_MAX:
        raise TypeError(f"wait_id must be None or 1 to {_OWNER_MAX} bytes")
    return wait_id


def _is_number(value: Any) -> bool:
    return type(value) is not bool and isinstance(value, int | float)


_check_lease = check_lease


def _check_timeout(timeout: Any) -> float | None:
    return check_timeout(timeout)


_check_bool = check_bool
_check_int = check_int64


# -- leased ownership --------------------------------------------------------------------------


class _Hold:
    """What one owner holds on one container, and until when."""

    __slots__ = ("count", "deadline", "lease", "owner", "since", "tokens")

    def __init__(self, owner: bytes, lease: float, now: float) -> None:
        self.owner = owner
        self.lease = lease
        self.deadline = now + lease
        self.since = now
        self.tokens: list[int] = []  # one per Semaphore slot; one for a (re-entered) lock
        self.count = 0  # RLock/Condition recursion depth; slots for a Semaphore

    def to_state(self) -> list[Any]:
        return [self.owner, self.tokens, self.count, self.lease]

    @classmethod
    def from_state(cls, state: Any, now: float) -> _Hold:
        owner, tokens, count, lease = state
        hold = cls(_check_owner(owner), _check_lease(lease), now)
        hold.tokens = [_check_int(t, "token") for t in tokens]
        hold.count = _check_int(count, "count")
        return hold


class _Leased(Container):
    """Holds with leases and fencing tokens: the part Lock, Semaphore and Condition share."""

    def __init__(self, last_token: int = 0, holds: Iterable[Any] = ()) -> None:
        super().__init__()
        now = time.monotonic()
        self._last_token = _check_int(last_token, "last_token")
        self._holds: dict[bytes, _Hold] = {}
        for item in holds:
            hold = _Hold.from_state(item, now)
            self._holds[hold.owner] = hold
        # Advisory (status only), never saved: wait_id -> [owner, lease, deadline].
        self._waiting: dict[bytes, list[Any]] = {}
        # Owners whose holds expired or were released by another owner, so release() can
        # say why it fails: owner -> "expired" | "released". Never saved.
        self._lost: dict[bytes, str] = {}

    # -- tokens and holds ---------------------------------------------------------------

    def _grant(self, owner: bytes, lease: float, now: float, count: int = 1) -> int:
        """Record one more acquisition by ``owner`` and return its fencing token."""
        self._last_token += 1
        token = self._last_token
        hold = self._holds.get(owner)
        if hold is None:
            hold = self._holds[owner] = _Hold(owner, lease, now)
        else:
            hold.lease = lease
            hold.deadline = max(hold.deadline, now + lease)
        hold.tokens.append(token)
        hold.count += count
        self._lost.pop(owner, None)
        return token

    def _acquire_args(
        self, owner: Any, blocking: Any, timeout: Any, lease: Any, wait_id: Any
    ) -> tuple[float | None, float, bytes | None, float]:
        """Check an acquire's arguments and release expired holds; return them and the time."""
        _check_owner(owner)
        _check_bool(blocking, "blocking")
        checked = (_check_timeout(timeout), _check_lease(lease), _check_wait_id(wait_id))
        now = time.monotonic()
        self._prune(now)
        return (*checked, now)

    def _take(
        self,
        owner: bytes,
        blocking: Any,
        timeout: Any,
        lease: Any,
        wait_id: Any,
        *,
        reentrant: bool,
    ) -> int | bool:
        """Take a lock-like hold for ``owner`` (shared by Lock, RLock and Condition)."""
        timeout, lease, wait_id, now = self._acquire_args(owner, blocking, timeout, lease, wait_id)
        if reentrant:
            hold = self._holds.get(owner)
            if hold is not None:
                hold.count += 1
                self._forget_waiting(wait_id)
                return hold.tokens[-1]
        if not self._holds:
            self._forget_waiting(wait_id)
            return self._grant(owner, lease, now)
        if not blocking or timeout == 0:
            self._forget_waiting(wait_id)
            return False
        raise self._block(wait_id, owner, timeout, lease, now)

    def _release_level(self, owner: bytes, what: str) -> int:
        """Release one level of ``owner``'s lock-like hold; return the levels left."""
        _check_owner(owner)
        self._prune(time.monotonic())
        hold = self._holds.get(owner)
        if hold is None:
            raise self._not_held(owner, what)
        hold.count -= 1
        if hold.count <= 0:
            del self._holds[owner]
            return 0
        return hold.count

    def _prune(self, now: float) -> None:
        """Release every hold whose lease ran out by ``now``, journaling each release.

        Expiry depends on the clock, so replaying the calls alone would not reproduce it: each
        release is journaled as an ``evict`` call, which the server logs before the call that
        noticed it, and which replays without looking at the clock.
        """
        for owner in [o for o, h in self._holds.items() if h.deadline <= now]:
            self.evict(owner)
            self.journal.append(["evict", [owner]])

    def evict(self, owner: bytes) -> None:
        """Release ``owner``'s hold as its lease running out does (journal and replay only)."""
        hold = self._holds.pop(owner, None)
        if hold is not None:
            self._drop_hold(hold)
        self._mark_lost(owner)

    def _drop_hold(self, hold: _Hold) -> None:
        """Give back what an expired hold held (a Semaphore returns its slots)."""

    def _mark_lost(self, owner: bytes, why: str = "expired") -> None:
        self._lost.pop(owner, None)
        self._lost[owner] = why
        if len(self._lost) > _LOST_MAX:
            del self._lost[next(iter(self._lost))]

    def _not_held(self, owner: bytes, what: str) -> RuntimeError:
        return release_error(what.replace("_", " "), self._lost.get(owner))

    def _note_waiting(self, wait_id: bytes | None, owner: bytes, lease: float, now: float) -> None:
        if wait_id is None:
            return
        self._waiting[wait_id] = [owner, lease, now + lease]
        if len(self._waiting) > _WAITING_MAX:
            del self._waiting[next(iter(self._waiting))]

    def _forget_waiting(self, wait_id: bytes | None) -> None:
        if wait_id is not None:
            self._waiting.pop(wait_id, None)

    def _block(
        self, wait_id: bytes | None, owner: bytes, timeout: float | None, lease: float, now: float
    ) -> WouldBlock:
        self._note_waiting(wait_id, owner, lease, now)
        forget = functools.partial(self._forget_waiting, wait_id)
        return WouldBlock(timeout, result=False, on_expire=forget, on_withdraw=forget)

    def _deadlines(self) -> Iterable[float]:
        return (hold.deadline for hold in self._holds.values())

    # -- Container hooks ----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Return when the earliest lease runs out, or None when nothing is held."""
        return min(self._deadlines(), default=None)

    def expire(self, now: float) -> None:
        """Release the holds whose leases ran out; the server then wakes the waiters."""
        self._prune(now)

    def size(self) -> int:
        """Return the number of owners holding it."""
        return len(self._holds)

    # -- exposed ------------------------------------------------------------------------

    def renew(self, owner: bytes, token: int = 0) -> int:
        """Extend every hold of ``owner`` by its lease; return how many things it holds here.

        Args:
            owner: the owner id given when acquiring.
            token: the largest token the owner got here; the counter is raised to it, so a
                token is never issued twice even after a replay that missed an expiry.

        Returns:
            The owner's holds, recursion levels and waits here; 0 means it has lost them all
            (their lease ran out) or never had any, and need not renew again.
        """
        _check_owner(owner)
        _check_int(token, "token")
        now = time.monotonic()
        self._prune(now)
        self._last_token = max(self._last_token, token)
        held = 0
        hold = self._holds.get(owner)
        if hold is not None:
            hold.deadline = now + hold.lease
            held += hold.count
        for entry in self._waiting.values():
            if entry[0] == owner:
                entry[2] = now + entry[1]
                held += 1
        return held + self._renew_more(owner, now)

    def _renew_more(self, owner: bytes, now: float) -> int:
        return 0

    def locked(self) -> bool:
        """Return whether anyone holds it (a lease that ran out does not count)."""
        now = time.monotonic()
        return any(h.deadline > now for h in self._holds.values())

    def status(self) -> dict[str, Any]:
        """Return who holds it, since when, with which token, and how many wait.

        ``held_for`` and ``lease_left`` are seconds; the owner is shown in hex.
        """
        now = time.monotonic()
        holders = [
            {
                "owner": hold.owner.hex(),
                "token": hold.tokens[-1] if hold.tokens else None,
                "tokens": list(hold.tokens),
                "count": hold.count,
                "held_for": round(now - hold.since, 3),
                "lease_left": round(hold.deadline - now, 3),
            }
            for hold in self._holds.values()
            if hold.deadline > now
        ]
        waiting = sum(1 for entry in self._waiting.values() if entry[2] > now)
        return {
            "kind": self.kind,
            "locked": bool(holders),
            "holders": holders,
            "last_token": self._last_token,
            "waiters": waiting + self._more_waiters(now),
        }

    def _more_waiters(self, now: float) -> int:
        return 0

    def _holds_state(self) -> list[list[Any]]:
        return [hold.to_state() for hold in self._holds.values()]


class _LockBase(_Leased):
    """What a Lock and an RLock share: acquire, release, state (see :class:`KVLock`)."""

    reentrant: ClassVar[bool] = False

    def state(self) -> list[Any]:
        """Return ``[last_token, holds]``."""
        return [self._last_token, self._holds_state()]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from :meth:`state`; every restored hold gets a fresh lease."""
        return cls(*state)

    def acquire(
        self,
        owner: bytes,
        blocking: bool = True,
        timeout: float | None = None,
        lease: float = 30.0,
        wait_id: bytes | None = None,
    ) -> int | bool:
        """Take the lock for ``owner``; return its fencing token, or False.

        Args:
            owner: who takes it (see the module docstring).
            blocking: wait while it is held; False answers False at once.
            timeout: seconds to wait, None for ever; False is answered when it runs out.
            lease: seconds the hold lasts without a ``renew``.
            wait_id: names this waiting call in ``status()``.

        Raises:
            TypeError, ValueError: a malformed argument.
        """
        return self._take(owner, blocking, timeout, lease, wait_id, reentrant=self.reentrant)

    def release(self, owner: bytes) -> int:
        """Release one level of ``owner``'s hold, or (a Lock) another owner's hold.

        Returns:
            The levels ``owner`` still holds (0 after releasing another owner's hold).

        Raises:
            RuntimeError: the lock is not held; or ``owner``'s own lease on it expired; or
                (an RLock) ``owner`` does not hold it.
        """
        _check_owner(owner)
        self._prune(time.monotonic())
        if self.reentrant or owner in self._holds or owner in self._lost or not self._holds:
            return self._release_level(owner, self.kind)
        holder = next(iter(self._holds))
        del self._holds[holder]
        self._mark_lost(holder, "released")
        return 0


class KVLock(_LockBase):
    """A ``threading.Lock`` with leases and fencing tokens.

    As with ``threading.Lock`` and the stdlib manager's Lock, any owner may release it: a
    release by another owner ends the holder's hold and wakes the next waiter (the holder's
    own later ``release`` then raises ``RuntimeError``). The one exception keeps fencing
    meaningful: an owner whose lease expired gets ``RuntimeError`` instead, so a holder that
    stalled past its lease cannot release its successor's hold. An RLock is released by its
    owner only, as ``threading.RLock`` is.

    State: ``[last_token, holds]``.
    """

    kind = "lock"

    def release_token(self, token: int) -> bool:
        """End the hold that fencing ``token`` was issued to, whoever holds it.

        For a hold taken in one process and ended by another that knows only its token
        (``kvctl lock acquire`` then ``kvctl lock release``). Unlike a release by another
        owner, it cannot end a later holder's hold: the token names the one hold it ends.
        The holder's own later ``release`` then raises ``RuntimeError``, as after a release
        by another owner.

        Returns:
            True; False when no hold has that token (released already, or its lease ran
            out), and nothing changes.

        Raises:
            TypeError, ValueError: ``token`` is not an int of 64 bits.
        """
        _check_int(token, "token")
        self._prune(time.monotonic())
        for holder, hold in self._holds.items():
            if token in hold.tokens:
                del self._holds[holder]
                self._mark_lost(holder, "released")
                return True
        return False


class KVRLock(_LockBase):
    """A ``threading.RLock``: re-entrant for its owner (a client thread), leased and fenced."""

    kind = "rlock"
    reentrant = True


class KVSemaphore(_Leased):
    """A ``threading.Semaphore`` whose slots are leased to their holders.

    A slot taken by ``acquire`` comes back when its owner releases it or its lease runs out.
    ``release`` by an owner holding no slot adds one, as ``threading.Semaphore.release`` does
    (a Semaphore(0) used as a gate); :class:`KVBoundedSemaphore` refuses to go above its
    initial value, and a release it accepts from an owner holding fewer slots than it gives
    back returns the oldest other holders' slots (a child that took a slot and exited is
    released by its parent, as with ``threading``). An owner whose slots expired gets
    ``RuntimeError`` instead, so a stalled holder cannot add capacity by releasing late.

    State: ``[value, free, last_token, holds]``.
    """

    kind = "semaphore"
    bounded: ClassVar[bool] = False

    def __init__(
        self,
        value: int = 1,
        free: int | None = None,
        last_token: int = 0,
        holds: Iterable[Any] = (),
    ) -> None:
        _check_int(value, "the semaphore value")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__(last_token, holds)
        self._initial = value
        self._free = value if free is None else _check_int(free, "free")

    def state(self) -> list[Any]:
        """Return ``[value, free, last_token, holds]``."""
        return [self._initial, self._free, self._last_token, self._holds_state()]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from :meth:`state`; every restored hold gets a fresh lease."""
        return cls(*state)

    def check_args(self, value: int = 1, *args: Any, **kwds: Any) -> None:
        """Refuse to hand out an existing semaphore as one with another initial value."""
        if value != self._initial:
            raise ValueError(
                f"this {self.kind} exists with initial value {self._initial}, not {value}"
            )

    def size(self) -> int:
        """Return the number of slots held."""
        return sum(hold.count for hold in self._holds.values())

    def _drop_hold(self, hold: _Hold) -> None:
        self._free += hold.count

    def get_value(self) -> int:
        """Return the number of free slots (a slot whose lease ran out counts as free)."""
        now = time.monotonic()
        expired = sum(h.count for h in self._holds.values() if h.deadline <= now)
        return self._free + expired

    def acquire(
        self,
        owner: bytes,
        blocking: bool = True,
        timeout: float | None = None,
        lease: float = 30.0,
        wait_id: bytes | None = None,
    ) -> int | bool:
        """Take a slot for ``owner``; return its fencing token, or False (as KVLock.acquire)."""
        timeout, lease, wait_id, now = self._acquire_args(owner, blocking, timeout, lease, wait_id)
        if self._free > 0:
            self._free -= 1
            self._forget_waiting(wait_id)
            return self._grant(owner, lease, now)
        if not blocking or timeout == 0:
            self._forget_waiting(wait_id)
            return False
        raise self._block(wait_id, owner, timeout, lease, now)

    def release(self, owner: bytes, n: int = 1) -> int:
        """Give back ``n`` slots (``owner``'s newest first); return the slots it still holds.

        Raises:
            ValueError: ``n`` < 1, or a bounded semaphore would exceed its initial value.
            RuntimeError: ``owner`` holds no slot because its lease expired.
        """
        _check_owner(owner)
        _check_int(n, "n")
        if n < 1:
            raise ValueError("n must be one or more")
        self._prune(time.monotonic())
        hold = self._holds.get(owner)
        held = hold.count if hold is not None else 0
        if held == 0 and owner in self._lost:
            raise self._not_held(owner, f"{self.kind} slot")
        returned = min(n, held)
        # As threading.BoundedSemaphore checks: free slots plus those given back. Slots held
        # by others count as given back, not as still held: a dead holder's slot must not
        # make a legitimate release fail.
        if self.bounded and self._free + n > self._initial:
            raise ValueError("Semaphore released too many times")
        if hold is not None:
            self._take_slots(hold, returned)
        if self.bounded:
            for other in sorted(self._holds.values(), key=lambda h: h.since):
                if returned == n:
                    break
                taken = min(n - returned, other.count)
                self._take_slots(other, taken)
                returned += taken
                if other.owner not in self._holds:
                    self._mark_lost(other.owner, "released")
        self._free += n
        return held - min(n, held)

    def _take_slots(self, hold: _Hold, count: int) -> None:
        """Remove ``count`` of ``hold``'s slots (its newest first), and the hold if it is empty."""
        del hold.tokens[len(hold.tokens) - count :]
        hold.count -= count
        if hold.count == 0:
            del self._holds[hold.owner]


class KVBoundedSemaphore(KVSemaphore):
    """A ``threading.BoundedSemaphore``: releasing above the initial value is a ValueError."""

    kind = "bounded_semaphore"
    bounded = True


class _CondWaiter:
    """A Condition waiter between ``wait_begin`` and getting the lock back."""

    __slots__ = ("count", "deadline", "lease", "notified", "owner")

    def __init__(self, owner: bytes, count: int, lease: float, now: float) -> None:
        self.owner = owner
        self.count = count
        self.lease = lease
        self.deadline = now + lease
        self.notified = False


class KVCondition(_Leased):
    """A ``threading.Condition`` over its own leased RLock (owned by a client thread).

    ``wait`` is three calls, each either changing state and returning or waiting without
    changing anything (see the module docstring): ``wait_begin`` releases the lock and joins
    the waiters; ``wait_end`` waits until notified and the lock is free, then takes it back;
    if that times out, ``reacquire`` waits for the lock alone and says whether a notify came
    meanwhile. Waiters are leased too: a waiter whose client died stops taking notifies once
    its lease runs out.

    State: ``[last_token, holds, waiters]``, a waiter being ``[wait_id, owner, count,
    notified, lease]``.
    """

    kind = "condition"
    strict_fifo = False

    def __init__(
        self, last_token: int = 0, holds: Iterable[Any] = (), waiters: Iterable[Any] = ()
    ) -> None:
        super().__init__(last_token, holds)
        now = time.monotonic()
        self._waiters: dict[bytes, _CondWaiter] = {}
        for wait_id, owner, count, notified, lease in waiters:
            waiter = _CondWaiter(
                _check_owner(owner), _check_int(count, "count"), _check_lease(lease), now
            )
            waiter.notified = _check_bool(notified, "notified")
            self._waiters[_check_owner(wait_id)] = waiter

    def state(self) -> list[Any]:
        """Return ``[last_token, holds, waiters]``."""
        waiters = [
            [wait_id, w.owner, w.count, w.notified, w.lease] for wait_id, w in self._waiters.items()
        ]
        return [self._last_token, self._holds_state(), waiters]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from :meth:`state`; holds and waiters get fresh leases."""
        return cls(*state)

    def size(self) -> int:
        """Return holders plus waiters."""
        return len(self._holds) + len(self._waiters)

    def _deadlines(self) -> Iterable[float]:
        yield from super()._deadlines()
        yield from (w.deadline for w in self._waiters.values())

    def _prune(self, now: float) -> None:
        super()._prune(now)
        for wait_id in [i for i, w in self._waiters.items() if w.deadline <= now]:
            self.evict_waiter(wait_id)
            self.journal.append(["evict_waiter", [wait_id]])

    def evict_waiter(self, wait_id: bytes) -> None:
        """Forget a waiter whose lease ran out (journal and replay only)."""
        waiter = self._waiters.pop(wait_id, None)
        if waiter is not None:
            self._mark_lost(waiter.owner)

    def _renew_more(self, owner: bytes, now: float) -> int:
        mine = [w for w in self._waiters.values() if w.owner == owner]
        for waiter in mine:
            waiter.deadline = now + waiter.lease
        return len(mine)

    def _more_waiters(self, now: float) -> int:
        return sum(1 for w in self._waiters.values() if w.deadline > now)

    def _free_for(self, owner: bytes) -> bool:
        return not self._holds or owner in self._holds

    def acquire(
        self,
        owner: bytes,
        blocking: bool = True,
        timeout: float | None = None,
        lease: float = 30.0,
        wait_id: bytes | None = None,
    ) -> int | bool:
        """Take (or re-enter) the condition's lock; as KVLock.acquire."""
        return self._take(owner, blocking, timeout, lease, wait_id, reentrant=True)

    def release(self, owner: bytes) -> int:
        """Release one level of the lock; return the levels ``owner`` still holds.

        Raises:
            RuntimeError: ``owner`` does not hold the lock.
        """
        return self._release_level(owner, "condition lock")

    def wait_begin(self, owner: bytes, wait_id: bytes, lease: float = 30.0) -> int:
        """Release the lock completely and join the waiters; return the recursion level saved.

        Raises:
            RuntimeError: ``owner`` does not hold the lock.
        """
        _check_owner(owner)
        _check_owner(wait_id)
        lease = _check_lease(lease)
        now = time.monotonic()
        self._prune(now)
        hold = self._holds.get(owner)
        if hold is None:
            raise RuntimeError("cannot wait on un-acquired lock")
        if wait_id in self._waiters:
            raise ValueError("this wait_id is already waiting")
        del self._holds[owner]
        self._waiters[wait_id] = _CondWaiter(owner, hold.count, lease, now)
        return hold.count

    def wait_end(
        self,
        owner: bytes,
        wait_id: bytes,
        count: int,
        timeout: float | None = None,
        lease: float = 30.0,
    ) -> int | bool:
        """Wait until notified and the lock is free, then take it at level ``count``.

        Returns:
            The new fencing token; False when ``timeout`` ran out first or the wait's lease
            expired (then call :meth:`reacquire`).
        """
        _check_owner(owner)
        _check_owner(wait_id)
        _check_int(count, "count")
        timeout = _check_timeout(timeout)
        lease = _check_lease(lease)
        now = time.monotonic()
        self._prune(now)
        waiter = self._waiters.get(wait_id)
        if waiter is None:
            return False
        if waiter.notified and self._free_for(owner):
            del self._waiters[wait_id]
            return self._grant(owner, lease, now, max(1, count))
        if timeout == 0:
            return False
        raise WouldBlock(timeout, result=False)

    def reacquire(self, owner: bytes, wait_id: bytes, count: int, lease: float = 30.0) -> list[Any]:
        """Wait (without limit) for the lock, leave the waiters, and take it at ``count``.

        Returns:
            ``[token, notified]``: whether a notify reached this waiter before it left.
        """
        _check_owner(owner)
        _check_owner(wait_id)
        _check_int(count, "count")
        lease = _check_lease(lease)
        now = time.monotonic()
        self._prune(now)
        if not self._free_for(owner):
            raise WouldBlock(None)
        waiter = self._waiters.pop(wait_id, None)
        notified = waiter is not None and waiter.notified
        return [self._grant(owner, lease, now, max(1, count)), notified]

    def notify(self, owner: bytes, n: int | None = 1) -> int:
        """Wake up to ``n`` waiters (None: all of them); return how many were woken.

        Raises:
            RuntimeError: ``owner`` does not hold the lock.
        """
        _check_owner(owner)
        if n is not None:
            _check_int(n, "n")
        self._prune(time.monotonic())
        if owner not in self._holds:
            raise RuntimeError("cannot notify on un-acquired lock")
        woken = 0
        for waiter in self._waiters.values():
            if n is not None and woken >= n:
                break
            if not waiter.notified:
                waiter.notified = True
                woken += 1
        return woken


# -- Event and Barrier -------------------------------------------------------------------------


class KVEvent(Container):
    """A ``threading.Event``. ``wait`` parks without changing anything.

    A waiter wakes when it is retried after ``set``, which the server does before it reads the
    next request; only a ``set`` and a ``clear`` sent in one batch can slip past a waiter.

    State: ``[flag]``.
    """

    kind = "event"
    strict_fifo = False

    def __init__(self, flag: bool = False) -> None:
        super().__init__()
        self._flag = _check_bool(flag, "flag")

    def state(self) -> list[bool]:
        """Return ``[flag]``."""
        return [self._flag]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from ``[flag]``."""
        return cls(*state)

    def size(self) -> int:
        """Return 1 when set, else 0."""
        return int(self._flag)

    def set(self) -> None:
        """Set the flag; every waiter wakes."""
        self._flag = True

    def clear(self) -> None:
        """Reset the flag."""
        self._flag = False

    def is_set(self) -> bool:
        """Return the flag."""
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once the flag is set; False when ``timeout`` seconds pass first."""
        timeout = _check_timeout(timeout)
        if self._flag:
            return True
        if timeout == 0:
            return False
        raise WouldBlock(timeout, result=False)


def _broken() -> Exception:
    return threading.BrokenBarrierError()


class KVBarrier(Container):
    """A ``threading.Barrier`` (no ``action``: code never crosses the wire).

    ``wait`` is ``arrive`` (count in, learn the generation and the arrival index; the last
    party trips the barrier there), then ``await_trip`` (wait for that generation to end), then,
    when that times out, ``timed_out`` (break the barrier unless it tripped meanwhile). The
    outcome of the last 64 generations is kept, so a party whose ``await_trip`` arrives late
    still learns whether its generation tripped or broke.

    State: ``[parties, timeout, generation, count, broken, history]``.
    """

    kind = "barrier"
    strict_fifo = False

    def __init__(
        self,
        parties: int,
        timeout: float | None = None,
        generation: int = 0,
        count: int = 0,
        broken: bool = False,
        history: Iterable[Any] = (),
    ) -> None:
        super().__init__()
        _check_int(parties, "parties")
        if parties < 1:
            raise ValueError("parties must be >= 1")
        self._parties = parties
        self._timeout = _check_timeout(timeout)
        self._generation = _check_int(generation, "generation")
        self._count = _check_int(count, "count")
        self._broken = _check_bool(broken, "broken")
        entries = list(history)
        if len(entries) > _HISTORY:
            raise ValueError(f"a barrier remembers at most {_HISTORY} generations")
        self._history: dict[int, bool] = {
            _check_int(gen, "generation"): _check_bool(tripped, "tripped")
            for gen, tripped in entries
        }

    def state(self) -> list[Any]:
        """Return ``[parties, timeout, generation, count, broken, history]``."""
        history = [[gen, tripped] for gen, tripped in self._history.items()]
        return [
            self._parties,
            self._timeout,
            self._generation,
            self._count,
            self._broken,
            history,
        ]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from :meth:`state`."""
        return cls(*state)

    def check_args(self, parties: int = 0, *args: Any, **kwds: Any) -> None:
        """Refuse to hand out an existing barrier as one with another number of parties."""
        if parties != self._parties:
            raise ValueError(f"this barrier exists with {self._parties} parties, not {parties}")

    def size(self) -> int:
        """Return the number of parties waiting."""
        return 0 if self._broken else self._count

    def _end_generation(self, tripped: bool) -> None:
        self._history[self._generation] = tripped
        if len(self._history) > _HISTORY:
            del self._history[next(iter(self._history))]
        self._generation += 1
        self._count = 0

    def _outcome(self, generation: int) -> bool:
        """Return whether a past generation tripped (True) or broke (False)."""
        return self._history.get(generation, False)  # forgotten: assume the worse

    def info(self) -> dict[str, Any]:
        """Return ``{"parties", "n_waiting", "broken", "timeout"}``."""
        return {
            "parties": self._parties,
            "n_waiting": self.size(),
            "broken": self._broken,
            "timeout": self._timeout,
        }

    def arrive(self) -> list[Any]:
        """Count one party in; return ``[generation, index, tripped, default timeout]``.

        Raises:
            threading.BrokenBarrierError: the barrier is broken.
        """
        if self._broken:
            raise _broken()
        generation, index = self._generation, self._count
        self._count += 1
        tripped = self._count == self._parties
        if tripped:
            self._end_generation(tripped=True)
        return [generation, index, tripped, self._timeout]

    def await_trip(self, generation: int, timeout: float | None = None) -> bool:
        """Wait until ``generation`` trips: True; False when ``timeout`` passes first.

        Raises:
            threading.BrokenBarrierError: the generation was broken (abort, reset, timeout).
        """
        _check_int(generation, "generation")
        timeout = _check_timeout(timeout)
        if generation > self._generation or generation < 0:
            raise ValueError(f"barrier generation {generation} has not started")
        if generation < self._generation:
            if self._outcome(generation):
                return True
            raise _broken()
        if self._broken:
            raise _broken()
        if timeout == 0:
            return False
        raise WouldBlock(timeout, result=False)

    def timed_out(self, generation: int) -> bool:
        """Break the barrier for a party whose wait timed out; True if it had tripped meanwhile."""
        _check_int(generation, "generation")
        if generation < self._generation:
            return self._outcome(generation)
        if generation == self._generation:
            self._broken = True
        return False

    def abort(self) -> None:
        """Break the barrier: waiting and later parties get BrokenBarrierError until reset."""
        self._broken = True

    def reset(self) -> None:
        """Return to the empty state; parties waiting now get BrokenBarrierError."""
        if self._broken or self._count:
            self._end_generation(tripped=False)
        self._broken = False


# -- Value and Array ---------------------------------------------------------------------------


class KVValue(Container):
    """A ``multiprocessing.Value``: one typed scalar, with an atomic ``incr``.

    Created from a typecode (``"i"``, ``"d"``, ..., initial value zero unless given) or from a
    default value whose type picks the typecode (int: ``q``, float: ``d``, bool: ``?``, 1-byte
    bytes: ``c``). Type checks follow ctypes (an int typecode refuses a float); out-of-range
    ints raise OverflowError instead of wrapping.

    State: ``[typecode, value]``.
    """

    kind = "value"

    def __init__(self, typecode_or_default: Any, value: Any = None) -> None:
        super().__init__()
        if isinstance(typecode_or_default, str):
            self._typecode = _check_typecode(typecode_or_default)
            self._value = _ZERO[self._typecode] if value is None else _coerce(self._typecode, value)
        else:
            if value is not None:
                raise TypeError("give either a typecode and a value, or a default value alone")
            self._typecode = _typecode_of(typecode_or_default)
            self._value = _coerce(self._typecode, typecode_or_default)

    def state(self) -> list[Any]:
        """Return ``[typecode, value]``."""
        return [self._typecode, self._value]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from ``[typecode, value]``."""
        return cls(*state)

    def check_args(self, typecode_or_default: Any = None, *args: Any, **kwds: Any) -> None:
        """Refuse another typecode; a default value need only be of a compatible kind.

        ``kv.value("hits", 0)`` accepts an existing Value of any int typecode, and
        ``kv.value("hits", "i")`` only one of typecode ``i``.
        """
        if isinstance(typecode_or_default, str):
            wanted = {_check_typecode(typecode_or_default)}
        else:
            code = _typecode_of(typecode_or_default)
            wanted = set(_INT_CODES if code == "q" else _FLOAT_CODES if code == "d" else code)
        if self._typecode not in wanted:
            raise ValueError(
                f"this value exists with typecode {self._typecode!r}, which does not match "
                f"{typecode_or_default!r}"
            )

    def size(self) -> int:
        """Return 1."""
        return 1

    def typecode(self) -> str:
        """Return the typecode."""
        return self._typecode

    def get(self) -> Any:
        """Return the value."""
        return self._value

    def set(self, value: Any) -> None:
        """Store ``value``, converted as the typecode requires.

        Raises:
            TypeError: a value the typecode cannot hold (a float for ``i``).
            OverflowError: an int out of the typecode's range.
        """
        self._value = _coerce(self._typecode, value)

    def incr(self, by: int | float = 1) -> Any:
        """Add ``by`` and return the new value, atomically.

        Raises:
            TypeError: a non-numeric typecode, or a float added to an int typecode.
            OverflowError: the result is out of the typecode's range (nothing changes).
        """
        if self._typecode not in _INT_CODES + _FLOAT_CODES:
            raise TypeError(f"cannot add to a value of typecode {self._typecode!r}")
        if not _is_number(by):
            raise TypeError(f"the increment must be a number, not {type(by).__name__}")
        if self._typecode in _INT_CODES and type(by) is not int:
            raise TypeError(
                f"'{type(by).__name__}' object cannot be interpreted as an integer "
                f"(typecode {self._typecode!r})"
            )
        self._value = _coerce(self._typecode, self._value + by)
        return self._value


class KVArray(Container):
    """A ``multiprocessing.Array``: a fixed-length typed sequence.

    Indexes and slices work as on ctypes arrays: an index out of range is IndexError, a slice
    assignment must keep the length (ValueError), and slices of ``c`` and ``u`` arrays are
    bytes and str. Items are checked as :class:`KVValue` checks its value.

    State: ``[typecode, items]``.
    """

    kind = "array"

    def __init__(self, typecode: str, size_or_initializer: Any) -> None:
        super().__init__()
        self._typecode = _check_typecode(typecode)
        if type(size_or_initializer) is int:
            if size_or_initializer < 0:
                raise ValueError("Array length must be >= 0")
            self._check_length(size_or_initializer)
            self._items: list[Any] = [_ZERO[typecode]] * size_or_initializer
        else:
            if hasattr(size_or_initializer, "__len__"):
                self._check_length(len(size_or_initializer))  # before converting 30M items
            self._items = self._coerce_all(size_or_initializer)
            self._check_length(len(self._items))

    @staticmethod
    def _check_length(length: int) -> None:
        if length > MAX_ARRAY_LENGTH:
            raise ValueError(f"an array holds at most {MAX_ARRAY_LENGTH} items")

    def _coerce_all(self, values: Any) -> list[Any]:
        return coerce_items(self._typecode, values)

    def _joined(self, items: list[Any]) -> Any:
        return joined(self._typecode, items)

    def state(self) -> list[Any]:
        """Return ``[typecode, items]``."""
        return [self._typecode, self._items]

    @classmethod
    def from_state(cls, state: Any) -> Container:
        """Rebuild from ``[typecode, items]``."""
        return cls(*state)

    def check_args(
        self, typecode: Any = None, size_or_initializer: Any = None, *args: Any, **kwds: Any
    ) -> None:
        """Refuse to hand out an existing array as one of another typecode or length.

        An initializer given again is ignored (get-or-create), but a length must match.
        """
        if typecode != self._typecode:
            raise ValueError(
                f"this array exists with typecode {self._typecode!r}, not {typecode!r}"
            )
        if type(size_or_initializer) is int and size_or_initializer != len(self._items):
            raise ValueError(
                f"this array exists with length {len(self._items)}, not {size_or_initializer}"
            )

    def size(self) -> int:
        """Return the number of items."""
        return len(self._items)

    def typecode(self) -> str:
        """Return the typecode."""
        return self._typecode

    def _index(self, index: Any) -> int:
        if type(index) is not int:
            raise TypeError("indices must be integers")
        length = len(self._items)
        if not -length <= index < length:
            raise IndexError("invalid index")
        return index

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Any:
        return self._items[self._index(index)]

    def __setitem__(self, index: int, value: Any) -> None:
        position = self._index(index)
        self._items[position] = _coerce(self._typecode, value)

    def _slice(self, start: Any, stop: Any, step: Any) -> slice:
        for part in (start, stop, step):
            if part is not None and type(part) is not int:
                raise TypeError("slice indices must be integers or None")
        if step == 0:
            raise ValueError("slice step cannot be zero")
        return slice(start, stop, step)

    def getslice(self, start: int | None, stop: int | None, step: int | None) -> Any:
        """Return ``a[start:stop:step]``: a list, or bytes/str for ``c``/``u`` arrays."""
        return self._joined(self._items[self._slice(start, stop, step)])

    def setslice(self, start: int | None, stop: int | None, step: int | None, values: Any) -> None:
        """Assign ``a[start:stop:step] = values``; the length must not change.

        Raises:
            ValueError: ``values`` has another length than the slice.
        """
        where = self._slice(start, stop, step)
        wanted = len(range(*where.indices(len(self._items))))
        if hasattr(values, "__len__") and len(values) != wanted:
            raise ValueError("Can only assign sequence of same size")  # before converting
        items = self._coerce_all(values)
        if len(items) != wanted:
            raise ValueError("Can only assign sequence of same size")
        self._items[where] = items

    def tolist(self) -> list[Any]:
        """Return every item, as a list."""
        return list(self._items)


SYNC_KINDS: dict[str, type[Container]] = {
    cls.kind: cls
    for cls in (
        KVLock,
        KVRLock,
        KVSemaphore,
        KVBoundedSemaphore,
        KVEvent,
        KVCondition,
        KVBarrier,
        KVValue,
        KVArray,
    )
}
