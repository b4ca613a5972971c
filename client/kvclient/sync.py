"""Client side of the synchronization primitives: ``Client.lock()``, ``.event()``, ``.value()``, ...

Each primitive is a named container on the server (get-or-create, like ``kv.dict``) behind a
proxy that behaves like its ``threading`` / ``multiprocessing`` counterpart. What differs is
what happens when a client fails.

Ownership and leases
--------------------
A Lock or a Semaphore slot is held by the :class:`~kvclient.client.Client` that acquired it;
an RLock or a Condition by the client *thread*, as in ``threading``. As with ``threading.Lock``
and the stdlib manager, any client may release a Lock: that ends the holder's hold and wakes
the next waiter (a parent may release what a child process took and never gave back). An
RLock or a Condition is released only by the thread holding it. Each hold is a lease of
``lease`` seconds (default 30). While anything is held, one daemon thread per client renews
every hold every ``lease / 3`` seconds over its own connection, naming the owners explicitly:
the server knows them by ids the client chose, not by the connection. If the client process
dies, stalls, or is cut off for longer than the lease, the renewals stop and the server
releases the hold and wakes the next waiter. Releasing a Lock nobody holds, an RLock this
thread does not hold, or anything after this client's own lease on it ran out raises
``RuntimeError``. The renewal thread exits when
nothing is held, and within one renewal interval of :meth:`~kvclient.client.Client.close`;
holds of a closed client then expire one lease later. After ``fork`` the child gets new owner
ids: it holds nothing its parent holds.

Fencing tokens
--------------
``acquire`` returns True or False exactly as ``threading`` does. Every successful acquisition
also gets a fencing token, an int that grows with every acquisition of that primitive:
``with lock as token:`` gives it, and ``lock.token`` keeps the one of this proxy's last
successful acquire.
Pass it with every write to the resource the lock protects, and have the resource refuse a
token lower than the highest it has seen: a holder whose lease expired while it stalled is then
refused instead of overwriting its successor's work.

Waiting
-------
Waits park on the server without a thread and are served in arrival order for Lock, RLock and
Semaphore. A wait with a timeout returns False when it runs out, as ``threading`` does; the
reply is awaited for that long plus the client's ``call_timeout``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeVar, cast, overload

from kvclient.proxies import Caller, Proxy, register_proxy_type

if TYPE_CHECKING:
    from kvclient.client import Client

__all__ = [
    "DEFAULT_LEASE",
    "ArrayProxy",
    "BarrierProxy",
    "BoundedSemaphoreProxy",
    "ConditionProxy",
    "EventProxy",
    "LockProxy",
    "RLockProxy",
    "RawArrayProxy",
    "RawValueProxy",
    "SemaphoreProxy",
    "SyncMixin",
    "ValueProxy",
]

log = logging.getLogger("kvclient")

DEFAULT_LEASE: Final = 30.0
"""Seconds a hold lasts without renewal, unless ``lease=`` says otherwise."""
_MAX_LEASE: Final = 86400.0
_T = TypeVar("_T")
_S = TypeVar("_S", bound="SemaphoreProxy")

# Guards the creation of each client's _SyncState; replaced in a forked child, where another
# thread may have held it at the fork.
_state_lock = threading.Lock()
_MIXINS: weakref.WeakSet[SyncMixin] = weakref.WeakSet()


def _check_lease(lease: float) -> float:
    if type(lease) is bool or not isinstance(lease, int | float):
        raise TypeError(f"lease must be a number of seconds, not {type(lease).__name__}")
    if not 0 < lease <= _MAX_LEASE:
        raise ValueError(f"lease must be more than 0 and at most {_MAX_LEASE:g} seconds")
    return float(lease)


def _lock_wait(blocking: bool, timeout: float) -> float | None:
    """Return the server-side wait for ``Lock.acquire(blocking, timeout)``, checked as threading.

    None waits for ever; 0 does not wait.
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


def _plain_wait(timeout: float | None) -> float | None:
    """Return the server-side wait for a ``timeout`` where negative means "do not wait"."""
    if timeout is None or timeout == math.inf:
        return None
    if math.isnan(timeout):
        raise ValueError("timeout must be a number, not NaN")
    return max(0.0, float(timeout))


# -- holds and their renewal -------------------------------------------------------------------


class _Tracked:
    """One (container, owner) this client may hold something on, for the renewal thread."""

    __slots__ = ("lease", "token", "version")

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.token = 0
        self.version = 0


class _SyncState:
    """A client's owner ids, what it holds, and its renewal thread."""

    def __init__(self) -> None:
        self.owner = secrets.token_bytes(8)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.tracked: dict[tuple[str, bytes], _Tracked] = {}
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def thread_owner(self) -> bytes:
        """Return this thread's owner id: the client's, plus 4 bytes for the thread."""
        suffix: bytes | None = getattr(self.local, "suffix", None)
        if suffix is None:
            suffix = self.local.suffix = secrets.token_bytes(4)
        return self.owner + suffix

    def track(self, client: Client, key: tuple[str, bytes], lease: float, token: int) -> None:
        """Renew ``key`` from now on; start the renewal thread if it is not running."""
        with self.lock:
            tracked = self.tracked.get(key)
            if tracked is None:
                tracked = self.tracked[key] = _Tracked(lease)
            tracked.lease = min(tracked.lease, lease)
            tracked.token = max(tracked.token, token)
            # A release racing with this acquire must not untrack what was just acquired.
            tracked.version += 1
            if self.thread is None:
                self.thread = threading.Thread(
                    target=_renew_loop,
                    args=(client, self),
                    name=f"kvclient-renew {client.endpoint}",
                    daemon=True,
                )
                self.thread.start()
            else:
                self.wake.set()  # a shorter lease may need an earlier renewal

    def version(self, key: tuple[str, bytes]) -> int:
        """Return the version of ``key``'s tracking, to pass to :meth:`untrack` later."""
        with self.lock:
            tracked = self.tracked.get(key)
            return -1 if tracked is None else tracked.version

    def untrack(self, key: tuple[str, bytes], version: int) -> None:
        """Stop renewing ``key``, unless it was tracked again since ``version`` was read."""
        with self.lock:
            tracked = self.tracked.get(key)
            if tracked is not None and tracked.version == version:
                del self.tracked[key]


def _renew_loop(client: Client, state: _SyncState) -> None:
    """Renew every tracked hold every ``lease / 3`` seconds until nothing is held."""
    last = time.monotonic()
    while True:
        batch: list[tuple[tuple[str, bytes], int, int]] = []
        with state.lock:
            if client._closed or not state.tracked or client._sync is not state:
                state.thread = None
                return
            interval = min(t.lease for t in state.tracked.values()) / 3
            due = last + interval - time.monotonic()
            if due <= 0:
                batch = [(key, t.version, t.token) for key, t in state.tracked.items()]
        if due > 0:
            state.wake.wait(due)
            state.wake.clear()
            continue
        last = time.monotonic()
        calls = [[name, "renew", [owner, token], None] for (name, owner), _, token in batch]
        try:
            replies = client._call(None, "batch", [calls])
        except Exception as exc:
            # Closed: noticed at the top of the loop. Unreachable after the client's own
            # retries: the next round tries again, and the server keeps the holds until their
            # leases run out.
            if not client._closed:
                log.warning(
                    "could not renew %d lease(s) at %s: %s", len(calls), client.endpoint, exc
                )
            continue
        for (key, version, _), (kind, value) in zip(batch, replies, strict=True):
            if kind == "#RETURN" and value:
                continue
            # 0: the server says this owner holds nothing there (released, or its lease ran
            # out); an error: the container was dropped or replaced.
            state.untrack(key, version)


def _after_fork_in_child() -> None:
    global _state_lock  # noqa: PLW0603 - the parent's lock may have been held at the fork
    _state_lock = threading.Lock()
    for mixin in list(_MIXINS):
        mixin._sync = None


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- proxies -----------------------------------------------------------------------------------


class _SyncProxy(Proxy):
    """A proxy with a public ``name``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        """The primitive's name."""
        return self._name

    def _reply_timeout(self, wait: float | None) -> float | None:
        # The server answers by `wait`; the call timeout is grace for the network on top.
        grace = self._client.call_timeout
        return None if wait is None or grace is None else wait + grace


def _rebuild_leased(func: Callable[..., Proxy], args: tuple[Any, ...], lease: float) -> Proxy:
    proxy = func(*args)
    if isinstance(proxy, _LeasedProxy):
        proxy._lease = lease
    return proxy


class _LeasedProxy(_SyncProxy):
    """A primitive whose holds are leased: acquire, release, renewal, fencing tokens."""

    __slots__ = ("_lease", "_token")

    def __init__(
        self, client: Caller, name: str, kind: str | None = None, lease: float = DEFAULT_LEASE
    ) -> None:
        super().__init__(client, name, kind)
        self._lease = _check_lease(lease)
        self._token: int | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        func, args = super().__reduce__()
        return (_rebuild_leased, (func, args, self._lease))

    @property
    def lease(self) -> float:
        """Seconds each hold lasts without renewal (renewed every third of it)."""
        return self._lease

    @property
    def token(self) -> int | None:
        """The fencing token of this proxy's last successful acquire (None before any)."""
        return self._token

    def _state(self) -> _SyncState:
        client = self._client
        if not isinstance(client, SyncMixin):
            raise TypeError(f"a {self._kind} cannot be used in a batch; use it on the client")
        return client._sync_state()

    def _owner(self, state: _SyncState) -> bytes:
        return state.owner

    def _sync_client(self) -> Client:
        return cast("Client", self._client)

    def _acquire(self, blocking: bool, wait: float | None) -> int | Literal[False]:
        """Acquire; return the fencing token, or False (``acquire`` turns it into a bool)."""
        state = self._state()
        owner = self._owner(state)
        key = (self._name, owner)
        waits = blocking and wait != 0
        wait_id = None
        if waits:
            # Tracked while waiting too: the renewals keep this waiter counted in status(),
            # and after a server restart they are the mutating calls that make the server
            # schedule the lease timers of the holds it restored (it does not on its own).
            wait_id = secrets.token_bytes(8)
            state.track(self._sync_client(), key, self._lease, 0)
        result = self._client._call(
            self._name,
            "acquire",
            [owner, blocking, wait if blocking else None, self._lease, wait_id],
            None,
            self._reply_timeout(wait) if waits else False,
        )
        if result is False:
            return False
        token = int(result)
        self._token = token
        state.track(self._sync_client(), key, self._lease, token)
        return token

    def _release(self, extra: list[Any]) -> None:
        state = self._state()
        owner = self._owner(state)
        key = (self._name, owner)
        version = state.version(key)
        remaining = self._client._call(self._name, "release", [owner, *extra])
        if remaining == 0:
            state.untrack(key, version)

    def status(self) -> dict[str, Any]:
        """Return who holds it, with which token, since when, and how many wait.

        Returns:
            ``{"kind", "locked", "holders", "last_token", "waiters"}``; each holder is
            ``{"owner"`` (hex, see ``Client.owner_id``), ``"token", "tokens", "count",
            "held_for", "lease_left"}`` (seconds).
        """
        result: dict[str, Any] = self._call("status", [])
        return result


class LockProxy(_LeasedProxy):
    """A ``threading.Lock`` shared by every client, released by the server if its holder dies.

    ``acquire`` returns True/False as ``threading.Lock.acquire`` does; the fencing token of a
    successful acquire is :attr:`token` (or ``with lock as token:``). As ``threading.Lock``,
    it may be released by any thread of any client (see the module docstring).
    """

    __slots__ = ()
    _proxy_kind = "lock"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; return True, or False when it was not free in time.

        The fencing token of this acquisition is then :attr:`token`.

        Args:
            blocking: wait while another holds it (default); False returns at once.
            timeout: seconds to wait; -1 (default) waits for ever.

        Raises:
            ValueError: a timeout with ``blocking=False``, or a negative timeout other than -1.
        """
        return self._acquire(bool(blocking), _lock_wait(bool(blocking), timeout)) is not False

    def release(self) -> None:
        """Release the lock (held by this client, or by another one: see the module docstring).

        Raises:
            RuntimeError: nobody holds it, or this client's own lease on it expired (an RLock:
                this thread does not hold it).
        """
        self._release([])

    def locked(self) -> bool:
        """Return whether any client holds it."""
        return bool(self._call("locked", []))

    def __enter__(self) -> int:
        token = self._acquire(True, None)
        assert token is not False  # a wait without timeout returns only once acquired
        return token

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class RLockProxy(LockProxy):
    """A ``threading.RLock``: re-entrant for the thread holding it, released if it dies.

    Re-entering gets the token of the hold it enters. Only the thread holding it may release it.
    """

    __slots__ = ()
    _proxy_kind = "rlock"

    def _owner(self, state: _SyncState) -> bytes:
        return state.thread_owner()


class SemaphoreProxy(_LeasedProxy):
    """A ``threading.Semaphore`` whose slots come back when their holder dies.

    A slot belongs to the client that took it. ``release`` by a client holding no slot adds
    one, as ``threading.Semaphore`` does, unless its slots were taken back because its lease
    ran out: then it raises ``RuntimeError``, so a stalled holder cannot add capacity.
    """

    __slots__ = ()
    _proxy_kind = "semaphore"

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a slot; return True, or False when none was free in time (token: :attr:`token`).

        Args:
            blocking: wait while no slot is free (default); False returns at once.
            timeout: seconds to wait; None (default) waits for ever.

        Raises:
            ValueError: a timeout with ``blocking=False``.
        """
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        wait = _plain_wait(timeout) if blocking else 0.0
        return self._acquire(bool(blocking), wait) is not False

    def release(self, n: int = 1) -> None:
        """Give back ``n`` slots (default 1).

        Raises:
            ValueError: ``n`` < 1, or a bounded semaphore released above its initial value.
            RuntimeError: this client's slots were taken back when its lease expired.
        """
        if n < 1:
            raise ValueError("n must be one or more")
        self._release([n])

    def get_value(self) -> int:
        """Return the number of free slots."""
        return int(self._call("get_value", []))

    def __enter__(self) -> int:
        token = self._acquire(True, None)
        assert token is not False
        return token

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class BoundedSemaphoreProxy(SemaphoreProxy):
    """A ``threading.BoundedSemaphore``: releasing above the initial value is a ValueError.

    A release by a client holding no slot gives back the oldest other holder's slot (a child
    process that took one and exited), so it fails only when every slot is free.
    """

    __slots__ = ()
    _proxy_kind = "bounded_semaphore"


class ConditionProxy(_LeasedProxy):
    """A ``threading.Condition`` over its own RLock, owned by the thread that holds it.

    ``wait`` releases the lock and waits on the server, then takes the lock back (a new
    fencing token) before it returns. A waiter whose client dies stops counting after its
    lease.
    """

    __slots__ = ()
    _proxy_kind = "condition"

    def _owner(self, state: _SyncState) -> bytes:
        return state.thread_owner()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take (or re-enter) the lock; as :meth:`LockProxy.acquire`."""
        return self._acquire(bool(blocking), _lock_wait(bool(blocking), timeout)) is not False

    def release(self) -> None:
        """Release one level of the lock.

        Raises:
            RuntimeError: this thread does not hold it.
        """
        self._release([])

    def __enter__(self) -> int:
        token = self._acquire(True, None)
        assert token is not False
        return token

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify, take the lock back; False if timed out.

        Args:
            timeout: seconds to wait for a notify; None (default) waits for ever. Taking the
                lock back afterwards is not limited, as in ``threading``.

        Raises:
            RuntimeError: this thread does not hold the lock.
        """
        wait = _plain_wait(timeout)
        state = self._state()
        owner = self._owner(state)
        client = self._sync_client()
        wait_id = secrets.token_bytes(8)
        count = self._client._call(self._name, "wait_begin", [owner, wait_id, self._lease])
        state.track(client, (self._name, owner), self._lease, 0)
        try:
            result = self._client._call(
                self._name,
                "wait_end",
                [owner, wait_id, count, wait, self._lease],
                None,
                self._reply_timeout(wait),
            )
        except BaseException:
            # As threading.Condition.wait does: leave holding the lock again, then raise.
            self._reacquire(state, owner, wait_id, count)
            raise
        if result is not False:
            self._token = int(result)
            state.track(client, (self._name, owner), self._lease, self._token)
            return True
        return self._reacquire(state, owner, wait_id, count)

    def _reacquire(self, state: _SyncState, owner: bytes, wait_id: bytes, count: int) -> bool:
        token, notified = self._client._call(
            self._name, "reacquire", [owner, wait_id, count, self._lease], None, None
        )
        self._token = int(token)
        state.track(self._sync_client(), (self._name, owner), self._lease, self._token)
        return bool(notified)

    def wait_for(self, predicate: Callable[[], _T], timeout: float | None = None) -> _T:
        """Wait until ``predicate()`` is true (checked with the lock held); return its value.

        Args:
            predicate: called locally after each wake-up.
            timeout: seconds in all; None (default) waits for ever.
        """
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
            self.wait(wait)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiting threads (of any client).

        Raises:
            RuntimeError: this thread does not hold the lock.
        """
        self._call("notify", [self._owner(self._state()), n])

    def notify_all(self) -> None:
        """Wake every waiting thread.

        Raises:
            RuntimeError: this thread does not hold the lock.
        """
        self._call("notify", [self._owner(self._state()), None])


class EventProxy(_SyncProxy):
    """A ``threading.Event``: ``set``, ``clear``, ``is_set``, ``wait``."""

    __slots__ = ()
    _proxy_kind = "event"

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        self._call("set", [])

    def clear(self) -> None:
        """Reset the flag."""
        self._call("clear", [])

    def is_set(self) -> bool:
        """Return the flag."""
        return bool(self._call("is_set", []))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set; return it (False when ``timeout`` seconds passed first).

        Args:
            timeout: seconds to wait; None (default) waits for ever.
        """
        wait = _plain_wait(timeout)
        return bool(self._client._call(self._name, "wait", [wait], None, self._reply_timeout(wait)))


class BarrierProxy(_SyncProxy):
    """A ``threading.Barrier`` for parties in any process (no ``action``: code stays local)."""

    __slots__ = ()
    _proxy_kind = "barrier"

    def wait(self, timeout: float | None = None) -> int:
        """Wait until ``parties`` parties wait; return this one's arrival index.

        Args:
            timeout: seconds to wait; None (default) uses the barrier's own timeout. When it
                runs out the barrier breaks, for every party.

        Raises:
            threading.BrokenBarrierError: the barrier is or became broken (abort, reset or a
                timeout) while waiting.
        """
        generation, index, tripped, default = self._call("arrive", [])
        if tripped:
            return int(index)
        wait = _plain_wait(default if timeout is None else timeout)
        passed = self._client._call(
            self._name, "await_trip", [generation, wait], None, self._reply_timeout(wait)
        )
        if passed or self._call("timed_out", [generation]):
            return int(index)
        raise threading.BrokenBarrierError

    def abort(self) -> None:
        """Break the barrier: parties waiting now, and later ones, get BrokenBarrierError."""
        self._call("abort", [])

    def reset(self) -> None:
        """Return the barrier to its empty state; parties waiting now get BrokenBarrierError."""
        self._call("reset", [])

    def _info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("info", [])
        return result

    @property
    def parties(self) -> int:
        """The number of parties needed to pass."""
        return int(self._info()["parties"])

    @property
    def n_waiting(self) -> int:
        """The number of parties waiting now."""
        return int(self._info()["n_waiting"])

    @property
    def broken(self) -> bool:
        """Whether the barrier is broken."""
        return bool(self._info()["broken"])


def _check_lock_arg(lock: Any) -> Any:
    """Check ``lock=`` as ``multiprocessing.Value`` does: True/None, False, or a lock."""
    if lock is None or lock is True or lock is False:
        return lock
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def _rebuild_locked(func: Callable[..., Proxy], args: tuple[Any, ...], lock: Any) -> Proxy:
    proxy = func(*args)
    if isinstance(proxy, _Synchronized):
        object.__setattr__(proxy, "_lock", lock)
    return proxy


class _Synchronized(_SyncProxy):
    """``get_lock()``/``get_obj()`` of ``multiprocessing``'s synchronized wrappers.

    The lock is the one given as ``lock=`` when this proxy was made (kept by the proxy and
    its pickled copies, not by the server), else the RLock named ``"<name>.lock"``.
    """

    __slots__ = ("_lock",)
    _raw: ClassVar[type[_SyncProxy]]

    def __init__(
        self, client: Caller, name: str, kind: str | None = None, lock: Any = None
    ) -> None:
        super().__init__(client, name, kind)
        self._lock = None if lock is True else lock

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        func, args = super().__reduce__()
        return (_rebuild_locked, (func, args, self._lock))

    def get_lock(self) -> Any:
        """Return the lock guarding compound updates (``with v.get_lock(): v.value += 1``)."""
        if self._lock is not None:
            return self._lock
        client = self._client
        if not isinstance(client, SyncMixin):
            raise TypeError("get_lock() is not available in a batch; call it on the client")
        return client.rlock(f"{self._name}.lock")

    def get_obj(self) -> Any:
        """Return the unsynchronized object: a proxy to the same data without ``get_lock``."""
        return self._raw(self._client, self._name, self._kind)


class RawValueProxy(_SyncProxy):
    """A ``multiprocessing.Value`` made with ``lock=False``: no ``get_lock``/``get_obj``.

    Each read or write is atomic on its own; ``v.value += 1`` is two of them, so use
    :meth:`incr` (one call).
    """

    __slots__ = ()
    _proxy_kind = "value"

    @property
    def value(self) -> Any:
        """The value; setting it checks the type as ctypes does."""
        return self._call("get", [])

    @value.setter
    def value(self, value: Any) -> None:
        self._call("set", [value])

    def get(self) -> Any:
        """Return the value (as the stdlib manager's ``ValueProxy.get``)."""
        return self._call("get", [])

    def set(self, value: Any) -> None:
        """Store ``value`` (as the stdlib manager's ``ValueProxy.set``)."""
        self._call("set", [value])

    @property
    def typecode(self) -> str:
        """The typecode (``"i"``, ``"d"``, ...)."""
        return str(self._call("typecode", []))

    def incr(self, by: float = 1) -> Any:
        """Add ``by`` atomically and return the new value.

        Raises:
            TypeError: a float added to an int typecode, or a typecode that is not a number.
            OverflowError: the result does not fit the typecode (nothing changes).
        """
        return self._call("incr", [by])

    def add(self, n: float) -> Any:
        """Add ``n`` atomically and return the new value (``incr(n)``)."""
        return self.incr(n)


class ValueProxy(_Synchronized, RawValueProxy):
    """A ``multiprocessing.Value``: ``v.value`` reads and writes, ``v.incr()`` adds atomically.

    Each read or write is atomic on its own; ``v.value += 1`` is two of them, so use
    :meth:`incr` (one call) or hold :meth:`get_lock` around the two.
    """

    __slots__ = ()
    _raw = RawValueProxy


class RawArrayProxy(_SyncProxy):
    """A ``multiprocessing.Array`` made with ``lock=False``: no ``get_lock``/``get_obj``.

    Fixed length, typed items, indexes and slices. An index out of range raises IndexError; a
    slice assignment of another length raises ValueError; slices of ``c`` and ``u`` arrays
    are bytes and str, as with ctypes.
    """

    __slots__ = ()
    _proxy_kind = "array"

    def __len__(self) -> int:
        return int(self._call("__len__", []))

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self._call("getslice", [index.start, index.stop, index.step])
        return self._call("__getitem__", [index])

    def __setitem__(self, index: int | slice, value: Any) -> None:
        if isinstance(index, slice):
            if not isinstance(value, bytes | str | list | tuple):
                value = list(value)
            self._call("setslice", [index.start, index.stop, index.step, value])
        else:
            self._call("__setitem__", [index, value])

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def tolist(self) -> list[Any]:
        """Return every item, in one round trip."""
        result: list[Any] = self._call("tolist", [])
        return result

    @property
    def typecode(self) -> str:
        """The typecode (``"i"``, ``"d"``, ...)."""
        return str(self._call("typecode", []))


class ArrayProxy(_Synchronized, RawArrayProxy):
    """A ``multiprocessing.Array``: fixed length, typed items, indexes and slices.

    An index out of range raises IndexError; a slice assignment of another length raises
    ValueError; slices of ``c`` and ``u`` arrays are bytes and str, as with ctypes.
    """

    __slots__ = ()
    _raw = RawArrayProxy


for _cls in (
    LockProxy,
    RLockProxy,
    SemaphoreProxy,
    BoundedSemaphoreProxy,
    ConditionProxy,
    EventProxy,
    BarrierProxy,
    ValueProxy,
    ArrayProxy,
):
    register_proxy_type(_cls._proxy_kind, _cls)


# -- the Client methods ------------------------------------------------------------------------


class SyncMixin:
    """The ``Client`` methods that create synchronization primitives (get-or-create by name).

    Raises (every method):
        KindError: the name exists as another kind.
        ValueError: it exists with other creation arguments (a Semaphore's value, a
            Barrier's parties, a Value's or an Array's typecode).
    """

    _sync: _SyncState | None = None

    def _sync_state(self) -> _SyncState:
        state = self._sync
        if state is None:
            with _state_lock:
                state = self._sync
                if state is None:
                    state = self._sync = _SyncState()
                    _MIXINS.add(self)
        return state

    def _as_client(self) -> Client:
        return cast("Client", self)

    def _close_sync(self) -> None:
        """Stop the renewal thread at once (called by ``Client.close``)."""
        state = self._sync
        if state is not None:
            state.wake.set()  # the loop sees the client closed and exits

    @property
    def owner_id(self) -> str:
        """The id (hex) this client holds Locks and Semaphores under, as ``status()`` shows it.

        RLocks and Conditions are held under it plus 8 hex digits per thread.
        """
        return self._sync_state().owner.hex()

    def lock(self, name: str, lease: float = DEFAULT_LEASE) -> LockProxy:
        """Return a proxy to the Lock called ``name``, creating it if needed.

        Args:
            name: the lock's name.
            lease: seconds a hold lasts if this client stops renewing it (dies, stalls or is
                cut off); default 30.
        """
        lease = _check_lease(lease)
        self._as_client()._create("lock", name)
        return LockProxy(self._as_client(), name, lease=lease)

    def rlock(self, name: str, lease: float = DEFAULT_LEASE) -> RLockProxy:
        """Return a proxy to the RLock called ``name``, creating it if needed (as :meth:`lock`)."""
        lease = _check_lease(lease)
        self._as_client()._create("rlock", name)
        return RLockProxy(self._as_client(), name, lease=lease)

    def semaphore(
        self, name: str, value: int | None = None, lease: float = DEFAULT_LEASE
    ) -> SemaphoreProxy:
        """Return a proxy to the Semaphore called ``name``, creating it if needed.

        Args:
            name: the semaphore's name.
            value: slots, fixed at creation (default 1). None accepts an existing semaphore
                whatever its value.
            lease: seconds a slot lasts if this client stops renewing it; default 30.

        Raises:
            ValueError: ``value`` is negative, or differs from the existing semaphore's.
        """
        return self._semaphore(SemaphoreProxy, name, value, lease)

    def bounded_semaphore(
        self, name: str, value: int | None = None, lease: float = DEFAULT_LEASE
    ) -> BoundedSemaphoreProxy:
        """Return a proxy to the BoundedSemaphore called ``name`` (as :meth:`semaphore`)."""
        return self._semaphore(BoundedSemaphoreProxy, name, value, lease)

    def _semaphore(self, cls: type[_S], name: str, value: int | None, lease: float) -> _S:
        lease = _check_lease(lease)
        if value is not None and value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        client = self._as_client()
        client._create(cls._proxy_kind, name, *(() if value is None else (value,)))
        return cls(client, name, lease=lease)

    def event(self, name: str) -> EventProxy:
        """Return a proxy to the Event called ``name``, creating it (clear) if needed."""
        self._as_client()._create("event", name)
        return EventProxy(self._as_client(), name)

    def condition(self, name: str, lease: float = DEFAULT_LEASE) -> ConditionProxy:
        """Return a proxy to the Condition called ``name``, creating it if needed.

        The condition has its own RLock (a Condition over another named lock cannot be
        atomic on the server). ``lease`` applies to its lock and to its waiters.
        """
        lease = _check_lease(lease)
        self._as_client()._create("condition", name)
        return ConditionProxy(self._as_client(), name, lease=lease)

    def barrier(self, name: str, parties: int, timeout: float | None = None) -> BarrierProxy:
        """Return a proxy to the Barrier called ``name``, creating it if needed.

        Args:
            name: the barrier's name.
            parties: parties that must wait to pass, fixed at creation.
            timeout: default ``wait`` timeout in seconds, set at creation; None waits for ever.

        Raises:
            ValueError: ``parties`` < 1, or differs from the existing barrier's.
        """
        if parties < 1:
            raise ValueError("parties must be >= 1")
        self._as_client()._create("barrier", name, parties, timeout)
        return BarrierProxy(self._as_client(), name)

    @overload
    def value(
        self, name: str, typecode_or_default: Any, value: Any = None, *, lock: Literal[False]
    ) -> RawValueProxy: ...

    @overload
    def value(
        self, name: str, typecode_or_default: Any, value: Any = None, *, lock: object = True
    ) -> ValueProxy: ...

    def value(
        self, name: str, typecode_or_default: Any, value: Any = None, *, lock: Any = True
    ) -> ValueProxy | RawValueProxy:
        """Return a proxy to the Value called ``name``, creating it if needed.

        Args:
            name: the value's name.
            typecode_or_default: a typecode as ``multiprocessing.Value`` takes it (``"i"``,
                ``"d"``, ``"c"``, ...; see ``kvserve.sync.TYPECODES``), or a default value whose
                type picks one: int ``q``, float ``d``, bool ``?``, 1-byte bytes ``c``
                (``kv.value("hits", 0)``).
            value: the initial value with a typecode (default zero).
            lock: as ``multiprocessing.Value`` takes it: True or None (default), a
                :class:`ValueProxy` whose ``get_lock()`` is the RLock ``"<name>.lock"``; a
                lock (a kvclient lock proxy), which ``get_lock()`` then returns; False, a
                :class:`RawValueProxy` without ``get_lock``/``get_obj``. The lock given is
                kept by the proxy (and copies pickled to child processes), not by the server.

        Returns:
            A :class:`ValueProxy`, or a :class:`RawValueProxy` for ``lock=False``.

        Raises:
            ValueError: an unknown typecode, or an existing Value of an incompatible one.
            TypeError: a value the typecode cannot hold.
            AttributeError: ``lock`` is not a bool, None or something with ``acquire``.
        """
        lock = _check_lock_arg(lock)
        args = [typecode_or_default] if value is None else [typecode_or_default, value]
        self._as_client()._create("value", name, *args)
        if lock is False:
            return RawValueProxy(self._as_client(), name)
        return ValueProxy(self._as_client(), name, lock=lock)

    @overload
    def array(
        self, name: str, typecode: str, size_or_initializer: Any, *, lock: Literal[False]
    ) -> RawArrayProxy: ...

    @overload
    def array(
        self, name: str, typecode: str, size_or_initializer: Any, *, lock: object = True
    ) -> ArrayProxy: ...

    def array(
        self, name: str, typecode: str, size_or_initializer: Any, *, lock: Any = True
    ) -> ArrayProxy | RawArrayProxy:
        """Return a proxy to the Array called ``name``, creating it if needed.

        Args:
            name: the array's name.
            typecode: as ``multiprocessing.Array`` takes it (``"i"``, ``"d"``, ``"c"``, ...).
            size_or_initializer: the length (items start at zero), or the items (any
                iterable: ``range(10)`` too).
            lock: as for :meth:`value`: an :class:`ArrayProxy`, or a :class:`RawArrayProxy`
                for ``lock=False``.

        Raises:
            ValueError: an unknown typecode, a negative or too large length, or an existing
                Array of another typecode or length.
            AttributeError: ``lock`` is not a bool, None or something with ``acquire``.
        """
        lock = _check_lock_arg(lock)
        items = size_or_initializer
        if not isinstance(items, int | bytes | str | list | tuple):
            items = list(items)
        self._as_client()._create("array", name, typecode, items)
        if lock is False:
            return RawArrayProxy(self._as_client(), name)
        return ArrayProxy(self._as_client(), name, lock=lock)
