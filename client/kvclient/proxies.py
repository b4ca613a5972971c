"""Proxies: local-looking handles on named containers. Every method is one call.

A proxy is a runner (:class:`kvclient._runner.Runner`: a :class:`~kvclient.client.Client`, or a
:class:`~kvclient.client.Batch` that records calls), a kind and a container name; it knows
nothing of sockets, retries or request ids. Each call carries the proxy's kind, from which the
runner derives the rest (:mod:`kvproto.schema`). A proxy pickles as what its runner says
rebuilds it (:meth:`~kvclient._runner.Runner.rebuild_info`) plus its kind and name. Kinds
beyond the four containers (the synchronization primitives) register their proxy class with
:func:`register_proxy_type`, so a reference to them read back from the server becomes a
working proxy too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, MutableSequence
from typing import Any, ClassVar, Final, TypeVar, cast

from kvclient._runner import Runner
from kvclient._watch import Watch
from kvproto.codec import Ref
from kvproto.limits import MAX_WATCH_EVENTS, check_lease, check_ttl

__all__ = [
    "DictProxy",
    "ListProxy",
    "NamespaceProxy",
    "Proxy",
    "QueueProxy",
    "make_proxy",
    "register_proxy_type",
    "to_ref",
]

_MISSING: Any = object()
EPHEMERAL_LEASE: Final = 10.0
"""Default lease of an ephemeral key, seconds: it outlives its owner by at most this."""
# The SyncManager typeid of each kind, for repr().
_STDLIB_TYPEIDS: dict[str, str] = {
    "namespace": "Namespace",
    "queue": "Queue",
    "lock": "Lock",
    "rlock": "RLock",
    "semaphore": "Semaphore",
    "bounded_semaphore": "BoundedSemaphore",
    "condition": "Condition",
    "event": "Event",
    "barrier": "Barrier",
    "value": "Value",
    "array": "Array",
}
P = TypeVar("P", bound="Proxy")


class Proxy:
    """A handle on one named container: a client and a name.

    Proxies compare equal when they name the same container on the same server, and can be
    stored inside other containers (``d["jobs"] = kv.list("jobs")``) or passed to child
    processes.
    """

    __slots__ = ("_client", "_kind", "_name")
    _client: Runner
    _name: str
    _kind: str
    # Underscored, like every attribute here: NamespaceProxy forwards all other names.
    _proxy_kind: ClassVar[str] = ""

    def __init__(self, client: Runner, name: str, kind: str | None = None) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_kind", kind or self._proxy_kind)

    @property
    def _kv_ref(self) -> Ref:
        return Ref(self._kind, self._name)

    def __repr__(self) -> str:
        # The stdlib proxies' shape, "<DictProxy object, typeid 'dict' at 0x...>", with the
        # server and the name in place of a memory address.
        typeid = _STDLIB_TYPEIDS.get(self._kind, self._kind)
        return (
            f"<{type(self).__name__} object, typeid {typeid!r} at {self._client.endpoint}, "
            f"name {self._name!r}>"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Proxy):
            return NotImplemented
        return (self._kind, self._name, self._client.address) == (
            other._kind,
            other._name,
            other._client.address,
        )

    def __hash__(self) -> int:
        return hash((self._kind, self._name, self._client.address))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The runner says what rebuilds it (a Batch: its client); the authkey travels only
        # to a child process being spawned (see Client.rebuild_info).
        factory, args = self._client.rebuild_info()
        return (_rebuild_proxy, (self._kind, self._name, factory, args))

    def _call(self, method: str, args: list[Any], kwds: dict[str, Any] | None = None) -> Any:
        return self._client.call(self._kind, self._name, method, args, kwds)


class _NamedProxy(Proxy):
    """A proxy with a public ``name`` (not NamespaceProxy, where ``ns.name`` is user data)."""

    __slots__ = ()

    @property
    def name(self) -> str:
        """The container's name."""
        return self._name


class _Watchable(Proxy):
    """``watch`` and ``revision`` of the four data containers (see :mod:`kvclient._watch`)."""

    __slots__ = ()
    _watch_class: ClassVar[Callable[..., Any] | None] = None  # the asyncio proxies' AsyncWatch

    def revision(self) -> int:
        """Return the container's revision: how many changes it has had (watch from it)."""
        return cast(int, self._call("revision", []))

    def watch(
        self,
        since: int | None = None,
        *,
        key: Any = None,
        prefix: str | bytes | None = None,
        timeout: float | None = None,
        limit: int = MAX_WATCH_EVENTS,
    ) -> Watch:
        """Return an iterator over the changes after revision ``since``, as they happen.

        Args:
            since: the revision already seen (a previous watch's ``.revision``, or
                :meth:`revision` read before the container); None (default): from now.
            key: only changes of this key (plus changes of the whole container, ``clear``).
            prefix: only changes of str (or bytes) keys starting with it (plus those).
            timeout: stop iterating when no event came for this many seconds (default
                None: wait for ever).
            limit: most events fetched per round trip (1 to 1000).

        Returns:
            A :class:`~kvclient.Watch` yielding :class:`~kvclient.Event` in revision order
            (``async for`` on an asyncio proxy); its ``revision`` is where to resume.
        """
        factory = self._watch_class or Watch
        return factory(self, since, key, prefix, timeout, limit)


class DictProxy(_NamedProxy, _Watchable):
    """A proxy that behaves like a ``dict``, plus atomic ``incr``, ``cas`` and batch get/set."""

    __slots__ = ()
    _proxy_kind = "dict"

    def __getitem__(self, key: Any) -> Any:
        return self._client.call(self._kind, self._name, "__getitem__", [key])

    def __setitem__(self, key: Any, value: Any) -> None:
        return self._client.call(self._kind, self._name, "__setitem__", [key, value])  # type: ignore[no-any-return]

    def __delitem__(self, key: Any) -> None:
        return self._client.call(self._kind, self._name, "__delitem__", [key])  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return cast(bool, self._call("__contains__", [key]))

    def __len__(self) -> int:
        return cast(int, self._call("__len__", []))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __str__(self) -> str:
        # As the stdlib's proxies: str() shows the referent, repr() the proxy.
        return str(self.copy())

    def get(self, key: Any, default: Any = None) -> Any:
        """Return ``d[key]``, or ``default`` when missing."""
        return self._client.call(self._kind, self._name, "get", [key, default])

    def set(
        self,
        key: Any,
        value: Any,
        *,
        ttl: float | None = None,
        nx: bool = False,
        ephemeral: bool = False,
        lease: float = EPHEMERAL_LEASE,
    ) -> bool:
        """Store ``d[key] = value``, with a time to live or only if absent; return whether it did.

        Args:
            key: the key.
            value: its value.
            ttl: seconds until the key expires and vanishes for every reader (> 0, at most a
                year; watchers see an ``expire`` event); None (default): it never expires,
                and an earlier ttl of the key is cleared.
            nx: store only if the key is absent (False is returned when it is present).
            ephemeral: bind the key to this client: its lease keeper renews it every
                ``lease / 3`` seconds, and when the client dies, closes, or is cut off for
                longer than ``lease``, the key expires (watchers see ``expire``). Not with
                ``ttl``; not in a batch.
            lease: an ephemeral key's lease, seconds (default 10).

        Raises:
            TypeError, ValueError: a ttl or lease that is not a number in range (checked
                before sending), or ``ephemeral`` with ``ttl`` or in a batch.
        """
        if ttl is not None:
            check_ttl(ttl)
        if not ephemeral:
            return cast(bool, self._call("set", [key, value, ttl, nx]))
        if ttl is not None:
            raise ValueError("an ephemeral key lives as long as its lease: leave out ttl")
        keeper = self._client.leases
        if keeper is None:
            raise TypeError("an ephemeral key cannot be set in a batch; set it on the client")
        lease = check_lease(lease)
        stored = self._call("set", [key, value, lease, nx, keeper.owner])
        if stored is True:  # an asyncio proxy's call is awaited by its own set()
            keeper.track((self._name, keeper.owner), lease, 0)
        return cast(bool, stored)

    def expire(self, key: Any, ttl: float) -> bool:
        """Give an existing key ``ttl`` seconds to live from now; return False if it is absent."""
        check_ttl(ttl)
        return cast(bool, self._call("set_ttl", [key, ttl]))

    def ttl(self, key: Any) -> float | None:
        """Return the seconds ``key`` has left to live, None if it never expires.

        Raises:
            KeyError: no such key.
        """
        return cast("float | None", self._call("ttl", [key]))

    def persist(self, key: Any) -> bool:
        """Make ``key`` never expire; return whether it had a ttl."""
        return cast(bool, self._call("persist", [key]))

    def keys(self) -> list[Any]:
        """Return a snapshot list of the keys."""
        result: list[Any] = self._call("keys", [])
        return result

    def values(self) -> list[Any]:
        """Return a snapshot list of the values."""
        result: list[Any] = self._call("values", [])
        return result

    def items(self) -> list[tuple[Any, Any]]:
        """Return a snapshot list of ``(key, value)`` tuples."""
        result: list[tuple[Any, Any]] = self._call("items", [])
        return result

    def copy(self) -> dict[Any, Any]:
        """Return a snapshot of the whole dict as a local ``dict``."""
        result: dict[Any, Any] = self._call("copy", [])
        return result

    def update(
        self, other: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (), /, **kw: Any
    ) -> None:
        """Merge a mapping, pairs and/or keywords in, in one atomic call."""
        merged = dict(other, **kw)
        return cast(None, self._call("update", [merged]))

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value; ``KeyError`` when missing and no default."""
        return self._call("pop", [key] if default is _MISSING else [key, default])

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the last inserted ``(key, value)``; ``KeyError`` when empty."""
        result: tuple[Any, Any] = self._call("popitem", [])
        return result

    def setdefault(self, key: Any, default: Any = None) -> Any:
        """Return ``d[key]``, first storing ``default`` when missing (atomic)."""
        return self._call("setdefault", [key, default])

    def clear(self) -> None:
        """Remove every key."""
        return cast(None, self._call("clear", []))

    def incr(self, key: Any, by: float = 1, default: float = 0) -> Any:
        """Atomically add ``by`` to ``d[key]`` (``default`` when missing); return the new value.

        Raises:
            TypeError: the stored value or ``by`` is not a number.
        """
        return self._client.call(self._kind, self._name, "incr", [key, by, default])

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Atomically set ``d[key] = new`` if it equals ``expected``; return whether it did.

        Equality is strict about type (``1`` does not match ``1.0``); a missing key never
        matches (use :meth:`setdefault` to create).
        """
        return cast(bool, self._call("cas", [key, expected, new]))

    def get_many(self, keys: Iterable[Any]) -> dict[Any, Any]:
        """Return ``{key: value}`` for those of ``keys`` that exist, in one round trip."""
        result: dict[Any, Any] = self._call("get_many", [list(keys)])
        return result

    def set_many(self, mapping: Mapping[Any, Any]) -> None:
        """Store every pair of ``mapping`` in one round trip, atomically."""
        return cast(None, self._call("set_many", [dict(mapping)]))

    def delete_many(self, keys: Iterable[Any]) -> int:
        """Delete those of ``keys`` that exist, in one round trip; return how many."""
        return cast(int, self._call("delete_many", [list(keys)]))


def _slice_args(index: slice) -> list[Any]:
    return [index.start, index.stop, index.step]


class ListProxy(_NamedProxy, _Watchable):
    """A proxy that behaves like a ``list`` (indexes and slices included)."""

    __slots__ = ()
    _proxy_kind = "list"

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self._call("getslice", _slice_args(index))
        return self._call("__getitem__", [index])

    def __setitem__(self, index: int | slice, value: Any) -> None:
        if isinstance(index, slice):
            return cast(None, self._call("setslice", [*_slice_args(index), list(value)]))
        else:
            return cast(None, self._call("__setitem__", [index, value]))

    def __delitem__(self, index: int | slice) -> None:
        if isinstance(index, slice):
            return cast(None, self._call("delslice", _slice_args(index)))
        else:
            return cast(None, self._call("__delitem__", [index]))

    def __len__(self) -> int:
        return cast(int, self._call("__len__", []))

    def __contains__(self, value: object) -> bool:
        return cast(bool, self._call("__contains__", [value]))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.copy())

    def __reversed__(self) -> Iterator[Any]:
        return iter(self.copy()[::-1])

    def __str__(self) -> str:
        # As the stdlib's proxies: str() shows the referent, repr() the proxy.
        return str(self.copy())

    def __add__(self, other: list[Any]) -> list[Any]:
        """Return a local list: a snapshot of this one followed by ``other`` (as stdlib)."""
        if not isinstance(other, list):
            return NotImplemented
        return self.copy() + other

    def __mul__(self, n: int) -> list[Any]:
        """Return a local list: a snapshot of this one repeated ``n`` times (as stdlib)."""
        if not isinstance(n, int):
            return NotImplemented
        return self.copy() * n

    __rmul__ = __mul__

    def __iadd__(self, values: Iterable[Any]) -> ListProxy:
        self.extend(values)
        return self

    def __imul__(self, n: int) -> ListProxy:
        # One call, atomic on the server: no other client's change can fall between a read
        # and a write-back.
        if not isinstance(n, int):
            return NotImplemented
        self._call("imul", [n])
        return self

    def append(self, value: Any) -> None:
        """Append one item."""
        return self._client.call(self._kind, self._name, "append", [value])  # type: ignore[no-any-return]

    def extend(self, values: Iterable[Any]) -> None:
        """Append every item of ``values``, atomically."""
        return cast(None, self._call("extend", [list(values)]))

    def insert(self, index: int, value: Any) -> None:
        """Insert ``value`` before ``index``."""
        return cast(None, self._call("insert", [index, value]))

    def pop(self, index: int = -1) -> Any:
        """Remove and return the item at ``index`` (default last); ``IndexError`` if empty."""
        return self._call("pop", [index])

    def remove(self, value: Any) -> None:
        """Remove the first item equal to ``value``; ``ValueError`` if absent."""
        return cast(None, self._call("remove", [value]))

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """Return the index of the first item equal to ``value``; ``ValueError`` if absent."""
        return cast(int, self._call("index", [value, start, stop]))

    def count(self, value: Any) -> int:
        """Return how many items equal ``value``."""
        return cast(int, self._call("count", [value]))

    def sort(self, *, key: None = None, reverse: bool = False) -> None:
        """Sort in place on the server.

        Raises:
            TypeError: a ``key`` function was given (code never crosses the wire).
        """
        if key is not None:
            raise TypeError("sort(key=...) is not supported: functions are never sent to kvserve")
        return cast(None, self._call("sort", [reverse]))

    def reverse(self) -> None:
        """Reverse in place."""
        return cast(None, self._call("reverse", []))

    def clear(self) -> None:
        """Remove every item."""
        return cast(None, self._call("clear", []))

    def copy(self) -> list[Any]:
        """Return a snapshot of the whole list as a local ``list``."""
        result: list[Any] = self._call("copy", [])
        return result


class NamespaceProxy(_Watchable):
    """A proxy that behaves like a ``Namespace``: ``ns.x = 1``, ``ns.x``, ``del ns.x``.

    Attribute names starting with ``_`` stay local to this proxy object and are not sent to
    the server, as with the stdlib NamespaceProxy. ``str(ns)`` is ``Namespace(x=1)`` (the
    attributes, sorted); ``repr(ns)`` names the proxy.
    """

    # No __slots__: the instance __dict__ holds the local underscore attributes.
    _proxy_kind = "namespace"

    def __str__(self) -> str:
        attrs = sorted(self.to_dict().items())
        return "Namespace({})".format(", ".join(f"{k}={v!r}" for k, v in attrs))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return self._call("getattr", [attr])

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            self._call("setattr", [attr, value])

    def __delattr__(self, attr: str) -> None:
        if attr.startswith("_"):
            object.__delattr__(self, attr)
        else:
            self._call("delattr", [attr])

    def incr(self, attr: str, by: float = 1) -> Any:
        """Atomically add ``by`` to an attribute (0 when unset); return the new value."""
        return self._call("incr", [attr, by])

    def to_dict(self) -> dict[str, Any]:
        """Return a snapshot of every attribute."""
        result: dict[str, Any] = self._call("to_dict", [])
        return result


class QueueProxy(_NamedProxy, _Watchable):
    """A proxy that behaves like ``queue.Queue``, joinable as it is (``task_done``/``join``).

    A blocked ``get``/``put`` waits on the server without holding a server thread, and never
    stalls other clients. It waits at most ``timeout`` seconds, then raises ``queue.Empty`` /
    ``queue.Full`` exactly as ``queue.Queue`` does. ``join`` waits the same way.
    """

    __slots__ = ("_bounded",)
    _proxy_kind = "queue"

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item``; when full, wait up to ``timeout`` (None: for ever) or raise Full."""
        # A put on an unbounded queue never waits, so it gets the usual call timeout rather
        # than the schema's "for ever"; only a bounded queue's put may wait for ever. maxsize
        # is fixed at creation: ask once. In a batch nothing waits, and the question would
        # only be recorded.
        client = self._client
        bounded: bool | None = getattr(self, "_bounded", None)
        if bounded is None and block and timeout is None and not client.records_calls:
            bounded = self.maxsize > 0
            object.__setattr__(self, "_bounded", bounded)
        if bounded is False:
            client.call(self._kind, self._name, "put", [item, block, timeout], None, False)
        else:
            client.call(self._kind, self._name, "put", [item, block, timeout])

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Get the oldest item; when empty, wait up to ``timeout`` (None: ever) or raise Empty."""
        return self._client.call(self._kind, self._name, "get", [block, timeout])

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        return cast(None, self._call("put_nowait", [item]))

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self._call("get_nowait", [])

    def qsize(self) -> int:
        """Return the number of queued items."""
        return cast(int, self._call("qsize", []))

    def empty(self) -> bool:
        """Return whether the queue is empty."""
        return cast(bool, self._call("empty", []))

    def full(self) -> bool:
        """Return whether the queue is at its maxsize."""
        return cast(bool, self._call("full", []))

    def task_done(self) -> None:
        """Say that one item got with :meth:`get` is fully processed (``queue.Queue``'s).

        Every kv queue counts unfinished tasks: each ``put`` adds one, each ``task_done``
        ends one, whichever client calls them.

        Raises:
            ValueError: called more times than items were put.
        """
        return cast(None, self._call("task_done", []))

    def join(self) -> None:
        """Wait until every item put has had its :meth:`task_done`.

        The wait is parked on the server, as a blocked :meth:`get` is, with no thread on
        either side; it waits for ever, as ``queue.Queue.join`` does. In a batch it does not
        wait: unfinished tasks give ``ValueError``.
        """
        return cast(None, self._client.call(self._kind, self._name, "join", []))

    def unfinished_tasks(self) -> int:
        """Return how many items put have not had their :meth:`task_done` yet."""
        return cast(int, self._call("unfinished", []))

    @property
    def maxsize(self) -> int:
        """The bound fixed at creation (0: unbounded)."""
        return cast(int, self._call("maxsize", []))


# As Python 3.14 does for the stdlib's DictProxy and ListProxy (gh-126435): code checking
# isinstance(x, MutableMapping) takes a proxy where it would take a dict.
MutableMapping.register(DictProxy)
MutableSequence.register(ListProxy)

_PROXY_TYPES: dict[str, type[Proxy]] = {
    cls._proxy_kind: cls for cls in (DictProxy, ListProxy, NamespaceProxy, QueueProxy)
}


def register_proxy_type(kind: str, cls: type[Proxy]) -> None:
    """Make references to containers of ``kind`` decode as ``cls`` proxies."""
    _PROXY_TYPES[kind] = cls


def make_proxy(caller: Runner, kind: str, name: str) -> Proxy:
    """Return the proxy for container ``name`` of ``kind``."""
    return _PROXY_TYPES.get(kind, Proxy)(caller, name, kind)


def to_ref(obj: Any) -> Ref | None:
    """Return the reference a proxy stands for (the codec's ``to_ref`` hook), else None."""
    return obj._kv_ref if isinstance(obj, Proxy) else None


def _rebuild_proxy(
    kind: str, name: str, factory: Callable[..., Runner], args: tuple[Any, ...]
) -> Proxy:
    return make_proxy(factory(*args), kind, name)
