"""The asyncio proxies: the sync proxy classes over an async runner, plus what cannot await.

A sync proxy method is one call, ``return self._client.call(...)``; on an
:class:`~kvclient.aio.Client`, whose ``call`` is a coroutine, it returns an awaitable, so the
classes here *are* the sync ones (each subclasses its counterpart and adds no state) and only
add what awaiting changes:

- a method that works on its call's result (``lock.acquire`` turns a token into a bool,
  ``event.is_set`` makes a bool) is an ``async def`` doing the same;
- a dunder Python calls for its result (``d[k] = v``, ``del d[k]``, ``k in d``, ``len(d)``,
  ``iter(d)``, ``ns.x = 1``, ``with lock:``) cannot be awaited: it raises ``TypeError``
  naming the awaitable method to use instead (``await d.set(k, v)``, ``await d.delete(k)``,
  ``await d.contains(k)``, ``await d.length()``, ``async for k in d``,
  ``await ns.set("x", 1)``, ``async with lock:``). Reads through a dunder that returns its
  call are awaitable as they are: ``await d[k]``, ``await lst[0:3]``, ``await ns.x``,
  ``await v.value``, ``await q.maxsize``.

A proxy bound to a :class:`~kvclient.aio.Batch` is the sync class (a batch records calls
synchronously).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

from kvclient import _flows
from kvclient._watch import AsyncWatch
from kvclient.proxies import (
    EPHEMERAL_LEASE,
    DictProxy,
    ListProxy,
    NamespaceProxy,
    Proxy,
    QueueProxy,
)
from kvclient.sync import (
    ArrayProxy,
    BarrierProxy,
    BoundedSemaphoreProxy,
    ConditionProxy,
    EventProxy,
    LockProxy,
    RawArrayProxy,
    RawValueProxy,
    RLockProxy,
    SemaphoreProxy,
    ValueProxy,
    _LeasedProxy,
)

__all__ = [
    "AsyncArrayProxy",
    "AsyncBarrierProxy",
    "AsyncBoundedSemaphoreProxy",
    "AsyncConditionProxy",
    "AsyncDictProxy",
    "AsyncEventProxy",
    "AsyncListProxy",
    "AsyncLockProxy",
    "AsyncNamespaceProxy",
    "AsyncQueueProxy",
    "AsyncRLockProxy",
    "AsyncRawArrayProxy",
    "AsyncRawValueProxy",
    "AsyncSemaphoreProxy",
    "AsyncValueProxy",
    "async_class",
    "sync_class",
]

_T = TypeVar("_T")


def _not_awaitable(what: str, instead: str) -> Callable[..., NoReturn]:
    def refuse(self: Any, *args: Any) -> NoReturn:
        raise TypeError(f"{what} cannot be awaited on an asyncio proxy; use {instead}")

    refuse.__doc__ = f"Refused: use ``{instead}``."
    return refuse


class AsyncDictProxy(DictProxy):
    """An asyncio ``dict`` proxy: ``await d.get(k)``, ``await d[k]``, ``await d.set(k, v)``.

    ``set`` is :meth:`DictProxy.set` (``ttl=``, ``nx=``), awaitable.
    """

    _watch_class = AsyncWatch  # async for ev in d.watch()

    def set(
        self,
        key: Any,
        value: Any,
        *,
        ttl: float | None = None,
        nx: bool = False,
        ephemeral: bool = False,
        lease: float = EPHEMERAL_LEASE,
    ) -> Any:
        """Store ``d[key] = value`` (awaitable; see :meth:`DictProxy.set`)."""
        if not ephemeral:
            return DictProxy.set(self, key, value, ttl=ttl, nx=nx)
        return self._set_ephemeral(key, value, nx, lease)

    async def _set_ephemeral(self, key: Any, value: Any, nx: bool, lease: float) -> bool:
        stored = await DictProxy.set(self, key, value, nx=nx, ephemeral=True, lease=lease)  # type: ignore[misc]
        keeper = self._client.leases
        if stored is True and keeper is not None:
            keeper.track((self._name, keeper.owner), lease, 0)
        return bool(stored)

    __slots__ = ()

    def delete(self, key: Any) -> Any:
        """Delete ``d[key]`` (awaitable); ``KeyError`` when missing."""
        return DictProxy.__delitem__(self, key)

    def contains(self, key: Any) -> Any:
        """Return whether ``key`` is in the dict (awaitable)."""
        return DictProxy.__contains__(self, key)

    def length(self) -> Any:
        """Return the number of keys (awaitable)."""
        return DictProxy.__len__(self)

    async def __aiter__(self) -> AsyncIterator[Any]:
        for key in await self.keys():  # type: ignore[misc]
            yield key

    __setitem__ = _not_awaitable("d[k] = v", "await d.set(k, v)")
    __delitem__ = _not_awaitable("del d[k]", "await d.delete(k)")
    __contains__ = _not_awaitable("k in d", "await d.contains(k)")
    __len__ = _not_awaitable("len(d)", "await d.length()")
    __iter__ = _not_awaitable("iter(d)", "async for k in d, or await d.keys()")
    __str__ = _not_awaitable("str(d)", "await d.copy()")


class AsyncListProxy(ListProxy):
    """An asyncio ``list`` proxy: ``await lst.append(x)``, ``await lst[0]``, ``lst.set(0, x)``."""

    _watch_class = AsyncWatch  # async for ev in d.watch()

    __slots__ = ()

    def set(self, index: int | slice, value: Any) -> Any:
        """Store ``lst[index] = value`` (a slice too; awaitable)."""
        return ListProxy.__setitem__(self, index, value)

    def delete(self, index: int | slice) -> Any:
        """Delete ``lst[index]`` (a slice too; awaitable)."""
        return ListProxy.__delitem__(self, index)

    def contains(self, value: Any) -> Any:
        """Return whether ``value`` is in the list (awaitable)."""
        return ListProxy.__contains__(self, value)

    def length(self) -> Any:
        """Return the number of items (awaitable)."""
        return ListProxy.__len__(self)

    async def __aiter__(self) -> AsyncIterator[Any]:
        for item in await self.copy():  # type: ignore[misc]
            yield item

    __setitem__ = _not_awaitable("lst[i] = v", "await lst.set(i, v)")
    __delitem__ = _not_awaitable("del lst[i]", "await lst.delete(i)")
    __contains__ = _not_awaitable("x in lst", "await lst.contains(x)")
    __len__ = _not_awaitable("len(lst)", "await lst.length()")
    __iter__ = _not_awaitable("iter(lst)", "async for x in lst, or await lst.copy()")
    __reversed__ = _not_awaitable("reversed(lst)", "await lst.copy()")
    __str__ = _not_awaitable("str(lst)", "await lst.copy()")
    __add__ = _not_awaitable("lst + other", "await lst.copy()")
    __mul__ = __rmul__ = _not_awaitable("lst * n", "await lst.copy()")
    __iadd__ = _not_awaitable("lst += other", "await lst.extend(other)")
    __imul__ = _not_awaitable("lst *= n", "the sync client")


class AsyncNamespaceProxy(NamespaceProxy):
    """An asyncio Namespace proxy: ``await ns.x``, ``await ns.set("x", 1)``, ``ns.delete("x")``.

    ``set`` and ``delete`` are methods here, so attributes of those names are reached with
    ``await ns.to_dict()``.
    """

    _watch_class = AsyncWatch  # async for ev in d.watch()

    def set(self, attr: str, value: Any) -> Any:
        """Store attribute ``attr`` (awaitable)."""
        return self._call("setattr", [attr, value])

    def delete(self, attr: str) -> Any:
        """Delete attribute ``attr`` (awaitable); ``AttributeError`` when unset."""
        return self._call("delattr", [attr])

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            raise TypeError(
                f"ns.{attr} = ... cannot be awaited on an asyncio proxy; use "
                f"await ns.set({attr!r}, value)"
            )

    def __delattr__(self, attr: str) -> None:
        if attr.startswith("_"):
            object.__delattr__(self, attr)
        else:
            raise TypeError(
                f"del ns.{attr} cannot be awaited on an asyncio proxy; use "
                f"await ns.delete({attr!r})"
            )

    __str__ = _not_awaitable("str(ns)", "await ns.to_dict()")


class AsyncQueueProxy(QueueProxy):
    """An asyncio ``queue.Queue`` proxy: ``await q.put(x)``, ``await q.get(timeout=5)``.

    Cancelling a task blocked in ``get`` withdraws it on the server; an item the server had
    already handed it is put back (see :mod:`kvclient.aio._backend`).
    """

    _watch_class = AsyncWatch  # async for ev in d.watch()

    __slots__ = ()

    async def put(  # type: ignore[override]
        self, item: Any, block: bool = True, timeout: float | None = None
    ) -> None:
        """Put ``item``; when full, wait up to ``timeout`` (None: for ever) or raise Full."""
        # As QueueProxy.put: an unbounded queue's put never waits, so it gets the usual call
        # timeout; maxsize is fixed at creation, so it is asked once.
        client = self._client
        bounded: bool | None = getattr(self, "_bounded", None)
        if bounded is None and block and timeout is None:
            maxsize: Any = self.maxsize  # an awaitable here
            bounded = await maxsize > 0
            object.__setattr__(self, "_bounded", bounded)
        if bounded is False:
            await client.call(self._kind, self._name, "put", [item, block, timeout], None, False)
        else:
            await client.call(self._kind, self._name, "put", [item, block, timeout])


class _AsyncLeased(_LeasedProxy):
    """Acquire and ``async with`` for a leased primitive."""

    __slots__ = ()

    async def _acquire_async(self, blocking: bool, wait: float | None) -> int | bool:
        keeper = self._keeper()
        runner: Any = self._client  # an asyncio Client: run() is a coroutine
        token: int | bool = await runner.run(
            _flows.acquire(
                keeper, self._kind, self._name, self._owner(keeper), blocking, wait, self._lease
            )
        )
        if token is not False:
            self._token = int(token)
        return token

    async def __aenter__(self) -> int:
        token = await self._acquire_async(True, None)
        assert token is not False  # a wait without timeout returns only once acquired
        return int(token)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()

    __enter__ = _not_awaitable("with lock:", "async with lock:")
    __exit__ = _not_awaitable("with lock:", "async with lock:")


class AsyncLockProxy(_AsyncLeased, LockProxy):
    """An asyncio Lock proxy: ``await lock.acquire()``, ``async with kv.lock("x") as token:``.

    Cancelling a task waiting in ``acquire`` withdraws its wait; a grant that was already on
    its way is released.
    """

    __slots__ = ()

    async def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:  # type: ignore[override]
        """Take the lock; return True, or False when it was not free in time (as the sync one)."""
        wait = _flows.lock_wait(bool(blocking), timeout)
        return await self._acquire_async(bool(blocking), wait) is not False

    async def locked(self) -> bool:  # type: ignore[override]
        """Return whether any client holds it."""
        return bool(await self._call("locked", []))


class AsyncRLockProxy(AsyncLockProxy, RLockProxy):
    """An asyncio RLock proxy: re-entrant for the *task* holding it."""

    __slots__ = ()


class AsyncSemaphoreProxy(_AsyncLeased, SemaphoreProxy):
    """An asyncio Semaphore proxy: ``await sem.acquire()``, ``async with sem:``."""

    __slots__ = ()

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Take a slot; return True, or False when none was free in time."""
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        wait = _flows.plain_wait(timeout) if blocking else 0.0
        return await self._acquire_async(bool(blocking), wait) is not False

    async def get_value(self) -> int:  # type: ignore[override]
        """Return the number of free slots."""
        return int(await self._call("get_value", []))


class AsyncBoundedSemaphoreProxy(AsyncSemaphoreProxy, BoundedSemaphoreProxy):
    """An asyncio BoundedSemaphore proxy."""

    __slots__ = ()


class AsyncConditionProxy(_AsyncLeased, ConditionProxy):
    """An asyncio Condition proxy, owned by the *task* holding its lock.

    ``await cond.wait()``, ``await cond.wait_for(predicate)`` (a plain function, checked
    locally), ``await cond.notify()``.
    """

    __slots__ = ()

    async def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:  # type: ignore[override]
        """Take (or re-enter) the lock; as :meth:`AsyncLockProxy.acquire`."""
        wait = _flows.lock_wait(bool(blocking), timeout)
        return await self._acquire_async(bool(blocking), wait) is not False


class AsyncEventProxy(EventProxy):
    """An asyncio Event proxy: ``await ev.set()``, ``await ev.wait(timeout)``."""

    __slots__ = ()

    async def is_set(self) -> bool:  # type: ignore[override]
        """Return the flag."""
        return bool(await self._call("is_set", []))

    async def wait(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Wait until the flag is set; return it (False when ``timeout`` seconds passed first)."""
        return bool(await self._call("wait", [_flows.plain_wait(timeout)]))


class AsyncBarrierProxy(BarrierProxy):
    """An asyncio Barrier proxy: ``await barrier.wait()``; ``await barrier.info()``."""

    __slots__ = ()

    async def info(self) -> dict[str, Any]:
        """Return ``{"parties", "n_waiting", "broken"}`` in one round trip."""
        result: dict[str, Any] = await self._call("info", [])
        return result

    @property
    def parties(self) -> Any:
        """The number of parties needed to pass (awaitable)."""
        return self._field("parties", int)

    @property
    def n_waiting(self) -> Any:
        """The number of parties waiting now (awaitable)."""
        return self._field("n_waiting", int)

    @property
    def broken(self) -> Any:
        """Whether the barrier is broken (awaitable)."""
        return self._field("broken", bool)

    async def _field(self, name: str, kind: Callable[[Any], _T]) -> _T:
        return kind((await self.info())[name])


class _AsyncValueMixin(RawValueProxy):
    __slots__ = ()

    @property
    def value(self) -> Any:
        """The value (awaitable); to store one: ``await v.set(x)``."""
        return self._call("get", [])

    @value.setter
    def value(self, value: Any) -> None:
        raise TypeError("v.value = x cannot be awaited on an asyncio proxy; use await v.set(x)")

    @property
    def typecode(self) -> Any:
        """The typecode (awaitable)."""
        return self._call("typecode", [])


class AsyncRawValueProxy(_AsyncValueMixin, RawValueProxy):
    """An asyncio Value proxy made with ``lock=False``."""

    __slots__ = ()


class AsyncValueProxy(_AsyncValueMixin, ValueProxy):
    """An asyncio Value proxy: ``await v.value``, ``await v.set(x)``, ``await v.incr()``.

    ``await v.get_lock()`` returns its RLock (asyncio).
    """

    __slots__ = ()
    _raw = AsyncRawValueProxy

    async def get_lock(self) -> Any:
        """Return the lock guarding compound updates (``async with await v.get_lock():``)."""
        if self._lock is not None:
            return self._lock
        name = f"{self._name}.lock"
        await self._client.call(None, None, "create", ["rlock", name])
        return AsyncRLockProxy(self._client, name)


class _AsyncArrayMixin(RawArrayProxy):
    __slots__ = ()

    def set(self, index: int | slice, value: Any) -> Any:
        """Store ``a[index] = value`` (a slice too; awaitable)."""
        return RawArrayProxy.__setitem__(self, index, value)

    def length(self) -> Any:
        """Return the length (awaitable)."""
        return self._call("__len__", [])

    @property
    def typecode(self) -> Any:
        """The typecode (awaitable)."""
        return self._call("typecode", [])

    __setitem__ = _not_awaitable("a[i] = v", "await a.set(i, v)")
    __len__ = _not_awaitable("len(a)", "await a.length()")
    __iter__ = _not_awaitable("iter(a)", "await a.tolist()")


class AsyncRawArrayProxy(_AsyncArrayMixin, RawArrayProxy):
    """An asyncio Array proxy made with ``lock=False``."""

    __slots__ = ()


class AsyncArrayProxy(_AsyncArrayMixin, ArrayProxy):
    """An asyncio Array proxy: ``await a[0]``, ``await a.set(0, x)``, ``await a.tolist()``."""

    __slots__ = ()
    _raw = AsyncRawArrayProxy

    async def get_lock(self) -> Any:
        """Return the lock guarding compound updates (an asyncio RLock proxy)."""
        if self._lock is not None:
            return self._lock
        name = f"{self._name}.lock"
        await self._client.call(None, None, "create", ["rlock", name])
        return AsyncRLockProxy(self._client, name)


_ASYNC: dict[type[Proxy], type[Proxy]] = {
    DictProxy: AsyncDictProxy,
    ListProxy: AsyncListProxy,
    NamespaceProxy: AsyncNamespaceProxy,
    QueueProxy: AsyncQueueProxy,
    LockProxy: AsyncLockProxy,
    RLockProxy: AsyncRLockProxy,
    SemaphoreProxy: AsyncSemaphoreProxy,
    BoundedSemaphoreProxy: AsyncBoundedSemaphoreProxy,
    ConditionProxy: AsyncConditionProxy,
    EventProxy: AsyncEventProxy,
    BarrierProxy: AsyncBarrierProxy,
    ValueProxy: AsyncValueProxy,
    RawValueProxy: AsyncRawValueProxy,
    ArrayProxy: AsyncArrayProxy,
    RawArrayProxy: AsyncRawArrayProxy,
}
_SYNC: dict[type[Proxy], type[Proxy]] = {a: s for s, a in _ASYNC.items()}
_BY_KIND: dict[str, type[Proxy]] = {
    s._proxy_kind: a for s, a in _ASYNC.items() if s not in (RawValueProxy, RawArrayProxy)
}


def async_class(cls: type[Proxy]) -> type[Proxy]:
    """Return the asyncio class of sync proxy class ``cls`` (``cls`` itself if it has none)."""
    return _ASYNC.get(cls, cls)


def sync_class(cls: type[Proxy]) -> type[Proxy]:
    """Return the sync class of asyncio proxy class ``cls`` (``cls`` itself if it is sync)."""
    return _SYNC.get(cls, cls)


def make_async_proxy(runner: Any, kind: str, name: str) -> Proxy:
    """Return the asyncio proxy for container ``name`` of ``kind`` (a reference decoded)."""
    return _BY_KIND.get(kind, Proxy)(runner, name, kind)
