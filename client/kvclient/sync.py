"""The proxies of the synchronization primitives (``Client.lock()``, ``.event()``, ``.value()``).

Each primitive is a named container on the server (get-or-create, like ``kv.dict``; the
``Client`` methods making them are in :mod:`kvclient.client`) behind a proxy that behaves like
its ``threading`` / ``multiprocessing`` counterpart. What differs is what happens when a
client fails. The multi-step operations (acquire, release, ``Condition.wait``,
``Barrier.wait``) are flows in :mod:`kvclient._flows`, run by the proxy's runner; the leases
are kept by the client's :class:`~kvclient._leases.LeaseKeeper` (``Client.leases``).

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

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Literal, TypeVar, cast

from kvclient import _flows
from kvclient._leases import LeaseKeeper
from kvclient._runner import Runner
from kvclient.proxies import Proxy, register_proxy_type
from kvproto.limits import check_lease

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
    "ValueProxy",
    "check_lease",
    "check_lock_arg",
]

DEFAULT_LEASE: Final = 30.0
"""Seconds a hold lasts without renewal, unless ``lease=`` says otherwise."""
_T = TypeVar("_T")


# -- proxies -----------------------------------------------------------------------------------


class _SyncProxy(Proxy):
    """A proxy with a public ``name``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        """The primitive's name."""
        return self._name


def _rebuild_leased(func: Callable[..., Proxy], args: tuple[Any, ...], lease: float) -> Proxy:
    proxy = func(*args)
    if isinstance(proxy, _LeasedProxy):
        proxy._lease = lease
    return proxy


class _LeasedProxy(_SyncProxy):
    """A primitive whose holds are leased: acquire, release, renewal, fencing tokens."""

    __slots__ = ("_lease", "_token")

    def __init__(
        self, client: Runner, name: str, kind: str | None = None, lease: float = DEFAULT_LEASE
    ) -> None:
        super().__init__(client, name, kind)
        self._lease = check_lease(lease)
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

    def _keeper(self) -> LeaseKeeper:
        leases = self._client.leases
        if leases is None:
            raise TypeError(f"a {self._kind} cannot be used in a batch; use it on the client")
        return leases

    def _owner(self, keeper: LeaseKeeper) -> bytes:
        return keeper.owner

    def _set_token(self, token: int) -> None:
        self._token = token

    def _acquire(self, blocking: bool, wait: float | None) -> int | Literal[False]:
        """Acquire; return the fencing token, or False (``acquire`` turns it into a bool)."""
        keeper = self._keeper()
        token = self._client.run(
            _flows.acquire(
                keeper, self._kind, self._name, self._owner(keeper), blocking, wait, self._lease
            )
        )
        if token is not False:
            self._token = token
        return token

    def _release(self, extra: list[int]) -> None:
        keeper = self._keeper()
        return self._client.run(
            _flows.release(keeper, self._kind, self._name, self._owner(keeper), extra)
        )

    def status(self) -> dict[str, Any]:
        """Return who holds it, with which token, since when, and how many wait.

        Returns:
            ``{"kind", "locked", "holders", "last_token", "waiters"}``; each holder is
            ``{"owner"`` (hex, see ``Client.owner_id``), ``"token", "tokens", "count",
            "held_for", "lease_left"}`` (seconds).
        """
        result: dict[str, Any] = self._call("status", [])
        return result

    def release(self) -> Any:
        """Release this proxy's hold (each primitive says whose hold that is).

        None from a blocking runner; an awaitable from an asyncio one (``kvclient.aio``).
        """
        raise NotImplementedError

    def __enter__(self) -> int:
        """Acquire, waiting as long as it takes; return the fencing token."""
        token = self._acquire(True, None)
        assert token is not False  # a wait without timeout returns only once acquired
        return token

    def __exit__(self, *exc_info: object) -> None:
        self.release()


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
        return self._acquire(bool(blocking), _flows.lock_wait(bool(blocking), timeout)) is not False

    def release(self) -> None:
        """Release the lock (held by this client, or by another one: see the module docstring).

        Raises:
            RuntimeError: nobody holds it, or this client's own lease on it expired (an RLock:
                this thread does not hold it).
        """
        return self._release([])

    def locked(self) -> bool:
        """Return whether any client holds it."""
        return bool(self._call("locked", []))

    def release_token(self, token: int) -> bool:
        """End the hold that fencing ``token`` was issued to, whichever client holds it.

        For a hold taken by another process that handed on only its token (``kvctl lock
        acquire`` prints it; ``kvctl lock release`` calls this). Unlike :meth:`release`, it
        can never end a later holder's hold: the token names the one hold it ends. The
        holder's own later ``release`` raises ``RuntimeError``.

        Args:
            token: the fencing token the hold was acquired with.

        Returns:
            True; False when no hold has that token (released already, or its lease ran
            out), and nothing changed. From an asyncio client, an awaitable of that.

        Raises:
            TypeError: ``token`` is not an int.
        """
        if type(token) is not int:
            raise TypeError(f"token must be an int, not {type(token).__name__}")
        result: bool = self._call("release_token", [token])
        return result


class RLockProxy(LockProxy):
    """A ``threading.RLock``: re-entrant for the thread holding it, released if it dies.

    Re-entering gets the token of the hold it enters. Only the thread holding it may release it.
    """

    __slots__ = ()
    _proxy_kind = "rlock"

    def _owner(self, keeper: LeaseKeeper) -> bytes:
        return keeper.thread_owner()

    def release_token(self, token: int) -> bool:
        """Refused: an RLock is released by the thread holding it, as ``threading.RLock``.

        Raises:
            TypeError: always.
        """
        raise TypeError("an RLock is released only by the thread holding it; use release()")


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
        wait = _flows.plain_wait(timeout) if blocking else 0.0
        return self._acquire(bool(blocking), wait) is not False

    def release(self, n: int = 1) -> None:
        """Give back ``n`` slots (default 1).

        Raises:
            ValueError: ``n`` < 1, or a bounded semaphore released above its initial value.
            RuntimeError: this client's slots were taken back when its lease expired.
        """
        if n < 1:
            raise ValueError("n must be one or more")
        return self._release([n])

    def get_value(self) -> int:
        """Return the number of free slots."""
        return int(self._call("get_value", []))


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

    def _owner(self, keeper: LeaseKeeper) -> bytes:
        return keeper.thread_owner()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take (or re-enter) the lock; as :meth:`LockProxy.acquire`."""
        return self._acquire(bool(blocking), _flows.lock_wait(bool(blocking), timeout)) is not False

    def release(self) -> None:
        """Release one level of the lock.

        Raises:
            RuntimeError: this thread does not hold it.
        """
        return self._release([])

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify, take the lock back; False if timed out.

        Args:
            timeout: seconds to wait for a notify; None (default) waits for ever. Taking the
                lock back afterwards is not limited, as in ``threading``.

        Raises:
            RuntimeError: this thread does not hold the lock.
        """
        keeper = self._keeper()
        return self._client.run(
            _flows.condition_wait(
                keeper,
                self._name,
                self._owner(keeper),
                _flows.plain_wait(timeout),
                self._lease,
                self._set_token,
            )
        )

    def wait_for(self, predicate: Callable[[], _T], timeout: float | None = None) -> _T:
        """Wait until ``predicate()`` is true (checked with the lock held); return its value.

        Args:
            predicate: called locally after each wake-up.
            timeout: seconds in all; None (default) waits for ever.
        """
        keeper = self._keeper()
        return self._client.run(
            _flows.condition_wait_for(
                keeper,
                self._name,
                self._owner(keeper),
                self._lease,
                predicate,
                timeout,
                self._set_token,
            )
        )

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiting threads (of any client).

        Raises:
            RuntimeError: this thread does not hold the lock.
        """
        return cast(None, self._call("notify", [self._owner(self._keeper()), n]))

    def notify_all(self) -> None:
        """Wake every waiting thread.

        Raises:
            RuntimeError: this thread does not hold the lock.
        """
        return cast(None, self._call("notify", [self._owner(self._keeper()), None]))


class EventProxy(_SyncProxy):
    """A ``threading.Event``: ``set``, ``clear``, ``is_set``, ``wait``."""

    __slots__ = ()
    _proxy_kind = "event"

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        return cast(None, self._call("set", []))

    def clear(self) -> None:
        """Reset the flag."""
        return cast(None, self._call("clear", []))

    def is_set(self) -> bool:
        """Return the flag."""
        return bool(self._call("is_set", []))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set; return it (False when ``timeout`` seconds passed first).

        Args:
            timeout: seconds to wait; None (default) waits for ever.
        """
        return bool(self._call("wait", [_flows.plain_wait(timeout)]))


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
        return self._client.run(_flows.barrier_wait(self._name, timeout))

    def abort(self) -> None:
        """Break the barrier: parties waiting now, and later ones, get BrokenBarrierError."""
        return cast(None, self._call("abort", []))

    def reset(self) -> None:
        """Return the barrier to its empty state; parties waiting now get BrokenBarrierError."""
        return cast(None, self._call("reset", []))

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


def check_lock_arg(lock: Any) -> Any:
    """Check ``lock=`` as ``multiprocessing.Value`` does: True/None, False, or a lock.

    Raises:
        AttributeError: ``lock`` is not a bool, None or something with ``acquire``.
    """
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
        self, client: Runner, name: str, kind: str | None = None, lock: Any = None
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
        if client.records_calls:
            raise TypeError("get_lock() is not available in a batch; call it on the client")
        name = f"{self._name}.lock"
        client.call(None, None, "create", ["rlock", name])
        return RLockProxy(client, name)

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
        return cast(None, self._call("set", [value]))

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
            return cast(None, self._call("setslice", [index.start, index.stop, index.step, value]))
        else:
            return cast(None, self._call("__setitem__", [index, value]))

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
