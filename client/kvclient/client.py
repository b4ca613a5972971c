r"""The Python client: :func:`connect`, :class:`Client`, and proxies that behave like local types.

A :class:`Client` holds one connection per thread (opened on first use in that thread), so it is
safe to share between threads. After ``fork`` the child drops the parent's connections and opens
its own; a proxy pickled to a spawned child process rebuilds its client there.

Proxies are cheap handles (a client and a container name). Every method is one round trip and
runs under the container's lock on the server. Iteration fetches a snapshot in one round trip
(stdlib iterator proxies pay one round trip per item).

This module owns the front end: :func:`connect`, the :class:`Client` methods that name
containers and primitives, and :class:`Batch`. Both are :class:`~kvclient._runner.Runner`\ s
for proxies. The calls themselves are made by :class:`~kvclient._backend.SocketBackend`
(connections, request ids, retries), the leases kept by
:class:`~kvclient._leases.LeaseKeeper`, and multi-step flows (:mod:`kvclient._flows`) driven
by :func:`~kvclient._runner.run_sync`.
"""

from __future__ import annotations

import builtins
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from kvclient._backend import SocketBackend
from kvclient._dumps import Collector, OpenSink, dump_flow, restore_flow
from kvclient._leases import LeaseKeeper
from kvclient._runner import DERIVED, Flow, run_sync
from kvclient.connection import DEFAULT_ADDRESS
from kvclient.proxies import (
    DictProxy,
    ListProxy,
    NamespaceProxy,
    P,
    Proxy,
    QueueProxy,
    make_proxy,
    to_ref,
)
from kvclient.retry import Retry
from kvclient.sync import (
    DEFAULT_LEASE,
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
    check_lease,
    check_lock_arg,
)
from kvclient.tls import resolve_client_tls
from kvproto.address import REDIS_SCHEMES, parse_address, parse_target
from kvproto.authkey import MIN_AUTHKEY_BYTES, load_authkey
from kvproto.codec import STORED_DEPTH, Codec, Ref
from kvproto.errors import AuthError
from kvproto.net import format_address
from kvproto.wire import MAX_BATCH

if TYPE_CHECKING:
    import ssl

__all__ = ["Batch", "Client", "Pending", "connect"]

_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()
_DEFAULT_RETRY: Any = object()
_T = TypeVar("_T")
_S = TypeVar("_S", bound=SemaphoreProxy)


def connect(
    address: str | tuple[str, int] | None = None,
    authkey: bytes | str | None = None,
    timeout: float | None = 10.0,
    *,
    call_timeout: float | None = 30.0,
    retry: Retry | None = _DEFAULT_RETRY,
    tls: bool | ssl.SSLContext | None = None,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    durability: str | None = None,
) -> Client:
    """Connect to a kvserve server and return a :class:`Client` (a context manager).

    Args:
        address: ``"host:port"`` (IPv6: ``"[::1]:50000"``), ``(host, port)``, or a URL:
            ``kv://[KEY@]host:port``, or ``kvs://...`` for TLS (see :mod:`kvproto.address`:
            ``KEY`` names the authkey file, ``~/.config/kvmanager/KEY.key`` or a path);
            ``redis://host:6379/0``, ``rediss://...`` or ``redis-cluster://h1:7000,h2:7000``
            for the same API on Valkey/Redis (``pip install 'kvmanager[redis]'``; README
            "Outgrowing one host");
            default env ``KV_ADDRESS``, else ``127.0.0.1:50000``.
        authkey: the key itself; default: the file the URL names, then env ``KV_AUTHKEY``,
            then the file named by env ``KV_AUTHKEY_FILE``, then ``~/.config/kvmanager/authkey``.
        timeout: seconds allowed for connecting and the handshake (default 10).
        call_timeout: seconds allowed for each call's reply (default 30; blocking queue
            operations wait as long as their own timeout asks). None waits forever.
        retry: what to do when a call's connection fails (refused, reset, timed out):
            default ``Retry()``, 10 retries with jittered exponential backoff (about 10 s
            in all), enough to ride out a server restart. None never retries. Every call is
            safe to retry: the server remembers request ids, so nothing is applied twice.
        tls: True or an ``ssl.SSLContext`` to use TLS; default: TLS when ``ca``/``cert`` or
            env ``KV_TLS_CA``/``KV_TLS_CERT`` is set. The server's host name is verified.
        ca: CA file to trust for the server certificate (env ``KV_TLS_CA``).
        cert: client certificate for mutual TLS (env ``KV_TLS_CERT``).
        key: its private key (env ``KV_TLS_KEY``; default: inside ``cert``).
        durability: Valkey/Redis only: ``"replica"`` confirms every call that changes state
            with ``WAIT 1`` on the connection that made it, and raises
            ``KVConnectionError`` (after the retries) when no replica confirms it. kvserve's
            durability is the server's (``--data-dir --fsync always``).

    Raises:
        ValueError: the address is malformed (the message lists the accepted forms), or says
            ``kvs://`` with ``tls=False``, or names a key file as well as ``authkey``.
        KVConnectionError: the server is unreachable.
        AuthError: the authkey was rejected, is shorter than 16 bytes, or none could be found.
        ProtocolError: the peer is not kvserve or speaks another wire version.
        TLSError: TLS failed: a certificate was refused, or only one side speaks TLS.
    """
    address = address or os.environ.get("KV_ADDRESS") or DEFAULT_ADDRESS
    if isinstance(address, str) and address.strip().partition("://")[0].lower() in REDIS_SCHEMES:
        if authkey is not None:
            raise ValueError(
                "authkey= is kvserve's; a Valkey/Redis server takes a password in the URL "
                "(redis://:PASSWORD@host) or in REDIS_PASSWORD"
            )
        from kvclient._redis.client import connect_redis  # noqa: PLC0415 - needs redis-py

        return connect_redis(
            address,
            timeout,
            call_timeout=call_timeout,
            retry=Retry() if retry is _DEFAULT_RETRY else retry,
            tls=tls,
            ca=ca,
            cert=cert,
            key=key,
            durability=durability,
        )
    if durability is not None:
        raise ValueError(
            "durability= is for Valkey/Redis addresses; kvserve's is the server's "
            "(kvserve --data-dir --fsync always)"
        )
    target = parse_target(address)
    if target.tls:
        if tls is False:
            raise ValueError(f"{address!r} asks for TLS (kvs://), and tls=False refuses it")
        if tls is None:
            tls = True
    if target.key_file is not None:
        if authkey is not None:
            raise ValueError(
                "the address names an authkey file and authkey= is given too; give one of them"
            )
        authkey = load_authkey(authkey_file=target.key_file).key
    return Client(
        (target.host, target.port),
        authkey,
        timeout,
        call_timeout=call_timeout,
        retry=retry,
        tls=tls,
        ca=ca,
        cert=cert,
        key=key,
    )


def resolve_settings(
    address: str | tuple[str, int] | None,
    authkey: bytes | str | None,
    tls: bool | ssl.SSLContext | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> tuple[ssl.SSLContext | None, tuple[str, int], bytes]:
    """Return ``(TLS context, (host, port), authkey)`` for a client, sync or asyncio.

    Raises:
        ValueError: the address is malformed.
        AuthError: no key, or one shorter than any kvserve accepts.
        TLSError: a TLS file is missing or unreadable.
    """
    context = resolve_client_tls(tls, ca, cert, key)
    parsed = parse_address(address or os.environ.get("KV_ADDRESS") or DEFAULT_ADDRESS)
    source = load_authkey(authkey)
    if len(source.key) < MIN_AUTHKEY_BYTES:
        # No kvserve runs with a shorter key (the server refuses one), so it cannot be
        # right; say so here rather than as a rejected handshake.
        raise AuthError(
            f"the authkey from {source.origin} is {len(source.key)} bytes; kvserve keys "
            f"are at least {MIN_AUTHKEY_BYTES}"
        )
    return context, parsed, source.key


class Client:
    """A connection (one per thread) to one kvserve server. Use :func:`connect` to make one.

    Args: as :func:`connect`.

    Attributes:
        call: the low-level call every proxy makes, ``call(kind, name, method, args)``:
            ``kind`` and ``name`` are the container's (both None for a server-level call such
            as ``"names"``). Whether it carries a request id (safe to retry) and how long its
            reply may take come from :mod:`kvproto.schema`. Raises what the server raised
            (``AttributeError`` for a method the kind does not have).
        leases: the :class:`~kvclient._leases.LeaseKeeper` holding this client's owner ids
            and renewing its Lock, Semaphore, RLock and Condition holds.

    Raises (the primitive methods, ``lock`` to ``array``):
        KindError: the name exists as another kind.
        ValueError: it exists with other creation arguments (a Semaphore's value, a
            Barrier's parties, a Value's or an Array's typecode).
    """

    # Proxies on a client make their calls (a Batch's only record them).
    records_calls = False

    def __init__(
        self,
        address: str | tuple[str, int] | None = None,
        authkey: bytes | str | None = None,
        timeout: float | None = 10.0,
        *,
        call_timeout: float | None = 30.0,
        retry: Retry | None = _DEFAULT_RETRY,
        tls: bool | ssl.SSLContext | None = None,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.tls, self.address, self._authkey = resolve_settings(
            address, authkey, tls, ca, cert, key
        )
        self.endpoint = format_address(*self.address)
        self._closed = False
        self._backend = SocketBackend(
            self.address,
            self._authkey,
            timeout,
            call_timeout,
            Retry() if retry is _DEFAULT_RETRY else retry,
            self.tls,
            make_ref=self._make_ref,
            to_ref=to_ref,
        )
        # The backend's own bound method, not a method forwarding to it: one Python call
        # less on every proxy call.
        self.call = self._backend.call
        self.leases = LeaseKeeper(self._backend.call, self.endpoint)
        self._backend.connection()  # fail now, not at the first call, if it is unreachable
        _CLIENTS.add(self)

    @property
    def timeout(self) -> float | None:
        """Seconds allowed for connecting and the handshake."""
        return self._backend.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._backend.timeout = value

    @property
    def call_timeout(self) -> float | None:
        """Seconds allowed for each call's reply (open connections too, from their next call)."""
        return self._backend.call_timeout

    @call_timeout.setter
    def call_timeout(self, value: float | None) -> None:
        self._backend.call_timeout = value

    @property
    def retry(self) -> Retry | None:
        """What to do when a call's connection fails (None: never retry)."""
        return self._backend.retry

    @retry.setter
    def retry(self, value: Retry | None) -> None:
        self._backend.retry = value

    def __repr__(self) -> str:
        return f"<kvclient.Client {self.endpoint}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection this client opened, in all threads."""
        self._closed = True
        self.leases.close()  # stop renewing leases now, not one interval later
        self._backend.close()

    # -- the Runner protocol, for proxies --------------------------------------------------

    def run(self, flow: Flow[_T]) -> _T:
        """Run a multi-step flow (see :mod:`kvclient._flows`) to its end; return its result."""
        return run_sync(self, flow)

    def rebuild_info(self) -> tuple[Callable[..., Client], tuple[Any, ...]]:
        """Return ``(factory, args)`` rebuilding this client in another process (pickling).

        As the stdlib does with AuthenticationString, the key travels only to a child process
        being spawned, never into a pickle that could be stored or sent anywhere; elsewhere
        the rebuilt proxy finds a live client with the same address, or loads the key itself.
        """
        # Imported here: multiprocessing costs every client (kvctl's each call) ~5 ms.
        from multiprocessing import context as mp_context  # noqa: PLC0415

        spawning = mp_context.get_spawning_popen() is not None
        authkey = self._authkey if spawning else None
        return (_rebuild_client, (self.address, authkey, self.timeout, self.call_timeout))

    def _make_ref(self, ref: Ref) -> Proxy:
        return make_proxy(self, ref.kind, ref.name)

    # -- containers ----------------------------------------------------------------------

    def _create(self, kind: str, name: str, *args: Any) -> None:
        self.call(None, None, "create", [kind, name, *args])

    def dict(
        self,
        name: str,
        initial: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None = None,
    ) -> DictProxy:
        """Return a proxy to the dict called ``name``, creating it if needed.

        Args:
            name: the dict's name.
            initial: contents to create it with (a mapping or ``(key, value)`` pairs), as
                ``manager.dict(...)`` takes them; applied only if this call creates the
                dict, and ignored if it exists already. The check and the creation are one
                call, so of several clients racing to create it exactly one's ``initial``
                is applied.

        Raises:
            KindError: ``name`` exists as another kind.
        """
        if initial is None:
            self._create("dict", name)
        else:
            self._create("dict", name, builtins.dict(initial))
        return DictProxy(self, name)

    def list(self, name: str, initial: Iterable[Any] | None = None) -> ListProxy:
        """Return a proxy to the list called ``name``, creating it if needed.

        Args:
            name: the list's name.
            initial: items to create it with (``kv.list("x", initial=range(10))``); applied
                only if this call creates the list, as for :meth:`dict`.

        Raises:
            KindError: ``name`` exists as another kind.
        """
        if initial is None:
            self._create("list", name)
        else:
            self._create("list", name, builtins.list(initial))
        return ListProxy(self, name)

    def namespace(self, name: str, initial: Mapping[str, Any] | None = None) -> NamespaceProxy:
        """Return a proxy to the Namespace called ``name``, creating it if needed.

        Args:
            name: the namespace's name.
            initial: attributes to create it with (``manager.Namespace(x=1)`` is
                ``initial={"x": 1}``); applied only if this call creates it, as for
                :meth:`dict`.

        Raises:
            KindError: ``name`` exists as another kind.
        """
        if initial is None:
            self._create("namespace", name)
        else:
            self._create("namespace", name, builtins.dict(initial))
        return NamespaceProxy(self, name)

    def queue(self, name: str, maxsize: int | None = None) -> QueueProxy:
        """Return a proxy to the Queue called ``name``, creating it if needed.

        Args:
            name: queue name.
            maxsize: bound fixed at creation (0: unbounded). None accepts an existing queue
                whatever its bound, and creates an unbounded one.

        Raises:
            ValueError: the queue exists with another maxsize than the one given.
        """
        if maxsize is None:
            self._create("queue", name)
        else:
            self._create("queue", name, maxsize)
        return QueueProxy(self, name)

    def names(self) -> builtins.dict[str, str]:
        """Return ``{name: kind}`` for every container on the server."""
        result: builtins.dict[str, str] = self.call(None, None, "names", [])
        return result

    def describe(self) -> builtins.dict[str, builtins.dict[str, Any]]:
        """Return ``{name: {"kind": kind, "size": items held}}`` for every container."""
        result: builtins.dict[str, builtins.dict[str, Any]] = self.call(None, None, "describe", [])
        return result

    def drop(self, name: str) -> bool:
        """Delete a container and its contents; return whether it existed."""
        return bool(self.call(None, None, "drop", [name]))

    def compact(self) -> bool:
        """Ask a persistent server to compact its log now; False if one is already running.

        Raises:
            ValueError: the server keeps no data on disk.
        """
        return bool(self.call(None, None, "compact", []))

    def dump(self) -> builtins.dict[str, Any]:
        """Return a consistent point-in-time copy of every container (see :meth:`restore`).

        Read in pieces of at most a few MiB, whatever the size of the data: other clients
        are served between them (see :meth:`dump_stream` to write one without holding it).
        """
        collect = Collector()
        header = self.dump_stream(collect.open)
        return collect.document(header["format"])

    def dump_stream(self, open_sink: OpenSink) -> builtins.dict[str, Any]:
        """Read a dump piece by piece into the sink ``open_sink(header)`` returns.

        ``header`` is ``{"format", "containers", "items"}`` as the server announces them;
        the sink is called with each record. Records are ``[name, kind, state, part,
        total]``: part 0 of a container, then (for a dict or list) further parts of its
        items; ``total`` is the whole state's length (None for kinds that come in one
        record). Returns ``{"format", "containers",
        "records", "items"}``.
        """
        return run_sync(self, dump_flow(open_sink))

    def restore(self, dump: builtins.dict[str, Any]) -> int:
        """Load a :meth:`dump` into an empty server; return the number of containers.

        Sent in pieces of about 512 KiB, whatever its size. Applied piece by piece: a
        restore that fails half-way leaves what it restored so far.

        Raises:
            ValueError: the server is not empty, or ``dump`` is not a kvmanager dump.
        """
        # Encoded with the depth stored values may have (see restore_flow).
        codec = Codec(to_ref=to_ref, encode_depth=STORED_DEPTH)
        return run_sync(self, restore_flow(dump, codec.pack))

    def batch(self) -> Batch:
        """Return a :class:`Batch` (a context manager): calls on any containers, one frame."""
        return Batch(self)

    def send_batch(
        self, calls: builtins.list[builtins.list[Any]], kinds: builtins.list[str | None]
    ) -> builtins.list[Any]:
        """Send a :class:`Batch`'s calls as one ``batch`` call; return ``[[tag, result], ...]``.

        ``calls`` are ``[name, method, args, kwds]``, on containers of the kinds ``kinds``.
        """
        result: builtins.list[Any] = self.call(None, None, "batch", [calls])
        return result

    def ping(self) -> None:
        """Make one round trip; raises if the server does not answer."""
        self.call(None, None, "ping", [])

    def stats(self) -> builtins.dict[str, Any]:
        """Return server facts: version, uptime (s), clients, containers, keys, ops, requests.

        Also ``memory`` (the server's RSS), ``requests_by_op`` (counts and seconds by kind and
        operation, when the server times requests) and ``persistence`` (with ``--data-dir``:
        disk bytes, compactions, fsyncs and their seconds); the README's "Watching a server"
        lists every field.
        """
        result: builtins.dict[str, Any] = self.call(None, None, "stats", [])
        return result

    # -- synchronization primitives ------------------------------------------------------

    @property
    def owner_id(self) -> str:
        """The id (hex) this client holds Locks and Semaphores under, as ``status()`` shows it.

        RLocks and Conditions are held under it plus 8 hex digits per thread.
        """
        return self.leases.owner_id

    def lock(self, name: str, lease: float = DEFAULT_LEASE) -> LockProxy:
        """Return a proxy to the Lock called ``name``, creating it if needed.

        Args:
            name: the lock's name.
            lease: seconds a hold lasts if this client stops renewing it (dies, stalls or is
                cut off); default 30.
        """
        lease = check_lease(lease)
        self._create("lock", name)
        return LockProxy(self, name, lease=lease)

    def rlock(self, name: str, lease: float = DEFAULT_LEASE) -> RLockProxy:
        """Return a proxy to the RLock called ``name``, creating it if needed (as :meth:`lock`)."""
        lease = check_lease(lease)
        self._create("rlock", name)
        return RLockProxy(self, name, lease=lease)

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
        lease = check_lease(lease)
        if value is not None and value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._create(cls._proxy_kind, name, *(() if value is None else (value,)))
        return cls(self, name, lease=lease)

    def event(self, name: str) -> EventProxy:
        """Return a proxy to the Event called ``name``, creating it (clear) if needed."""
        self._create("event", name)
        return EventProxy(self, name)

    def condition(self, name: str, lease: float = DEFAULT_LEASE) -> ConditionProxy:
        """Return a proxy to the Condition called ``name``, creating it if needed.

        The condition has its own RLock (a Condition over another named lock cannot be
        atomic on the server). ``lease`` applies to its lock and to its waiters.
        """
        lease = check_lease(lease)
        self._create("condition", name)
        return ConditionProxy(self, name, lease=lease)

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
        self._create("barrier", name, parties, timeout)
        return BarrierProxy(self, name)

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
        lock = check_lock_arg(lock)
        args = [typecode_or_default] if value is None else [typecode_or_default, value]
        self._create("value", name, *args)
        if lock is False:
            return RawValueProxy(self, name)
        return ValueProxy(self, name, lock=lock)

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
        lock = check_lock_arg(lock)
        items = size_or_initializer
        if not isinstance(items, int | bytes | str | list | tuple):
            items = list(items)
        self._create("array", name, typecode, items)
        if lock is False:
            return RawArrayProxy(self, name)
        return ArrayProxy(self, name, lock=lock)


class Pending:
    """The result of a call recorded in a :class:`Batch`, available once the batch is sent."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: Batch, index: int) -> None:
        self._batch = batch
        self._index = index

    @property
    def done(self) -> bool:
        """True once the batch has been sent and this call has a result."""
        return self._batch.results is not None

    @property
    def value(self) -> Any:
        """The call's result; raises what the call raised on the server.

        Raises:
            RuntimeError: the batch has not been sent yet.
        """
        results = self._batch.results
        if results is None:
            raise RuntimeError("the batch has not been sent yet; read .value after the with block")
        result = results[self._index]
        if isinstance(result, BaseException):
            raise result
        return result

    def __bool__(self) -> bool:
        raise TypeError(
            "a batched call has no value until the batch is sent: use explicit methods "
            "(get, keys, ...) in a batch, not len(), `in` or truth tests"
        )

    def __repr__(self) -> str:
        state = "pending" if self._batch.results is None else repr(self._batch.results[self._index])
        return f"<Pending #{self._index}: {state}>"


class Batch:
    """Calls on any containers, collected and sent as one frame; results in order.

    Use :meth:`Client.batch`::

        with kv.batch() as b:
            users = b.dict("users")
            first = users.get("alice")        # a Pending
            users["bob"] = {"age": 7}
            b.bind(kv.list("log")).append("added bob")
        first.value                           # the result, or raises what the server raised
        b.results                             # every result (exceptions as values), in order

    Every call is applied in order on the server, each under its container's lock; the batch
    as a whole is not a transaction (another client's call may run between two of them). A
    blocking queue call in a batch never waits: an empty queue gives ``queue.Empty``. If the
    ``with`` block raises, nothing is sent.
    """

    # Proxies bound to a batch ask nothing of the server while recording (a Pending has no
    # value yet), and refuse what needs several calls or a lease.
    records_calls = True
    leases = None

    def __init__(self, client: Client) -> None:
        self._client = client
        self._calls: builtins.list[builtins.list[Any]] = []
        self._kinds: builtins.list[str | None] = []
        self.results: builtins.list[Any] | None = None

    @property
    def endpoint(self) -> str:
        """The server's ``host:port``."""
        return self._client.endpoint

    @property
    def address(self) -> tuple[str, int]:
        """The server's ``(host, port)``."""
        return self._client.address

    @property
    def call_timeout(self) -> float | None:
        """The client's call timeout (the batch's reply is one call)."""
        return self._client.call_timeout

    def __len__(self) -> int:
        return len(self._calls)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            self.send()

    def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: builtins.list[Any],
        kwds: builtins.dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Pending:
        """Record one call (as :attr:`Client.call` makes it); return its :class:`Pending`.

        Raises:
            RuntimeError: the batch was already sent.
        """
        if self.results is not None:
            raise RuntimeError("this batch was already sent; start a new one")
        self._calls.append([ident, method, args, kwds])
        self._kinds.append(kind)
        return Pending(self, len(self._calls) - 1)

    def run(self, flow: Flow[_T]) -> _T:
        """Refuse: an operation of several calls cannot be recorded in one frame.

        Raises:
            TypeError: always (use the primitive on the client).
        """
        flow.close()
        raise TypeError("a batch records single calls; use this operation on the client")

    def rebuild_info(self) -> tuple[Callable[..., Client], tuple[Any, ...]]:
        """A proxy bound to a batch pickles as a proxy on the batch's client."""
        return self._client.rebuild_info()

    def bind(self, proxy: P) -> P:
        """Return a copy of ``proxy`` whose calls are recorded in this batch."""
        return type(proxy)(self, proxy._name, proxy._kind)

    def dict(self, name: str) -> DictProxy:
        """Get or create a dict now, and return it bound to this batch."""
        return self.bind(self._client.dict(name))

    def list(self, name: str) -> ListProxy:
        """Get or create a list now, and return it bound to this batch."""
        return self.bind(self._client.list(name))

    def namespace(self, name: str) -> NamespaceProxy:
        """Get or create a Namespace now, and return it bound to this batch."""
        return self.bind(self._client.namespace(name))

    def queue(self, name: str, maxsize: int | None = None) -> QueueProxy:
        """Get or create a Queue now, and return it bound to this batch."""
        return self.bind(self._client.queue(name, maxsize))

    def send(self) -> builtins.list[Any]:
        """Send the recorded calls; return the results (exceptions as values).

        Calls go in frames of at most ``MAX_BATCH`` (10,000), one after another: the server
        refuses larger ones so that one batch cannot hold its loop for seconds. A batch was
        never atomic, so this changes nothing a caller can see.
        """
        if self.results is not None:
            return self.results
        replies: builtins.list[Any] = []
        for start in range(0, len(self._calls), MAX_BATCH):
            chunk = self._calls[start : start + MAX_BATCH]
            kinds = self._kinds[start : start + MAX_BATCH]
            replies.extend(self._client.send_batch(chunk, kinds))
        # A value is never an exception (clients cannot encode one), so errors need no tag.
        self.results = [value for _kind, value in replies]
        return self.results


def _rebuild_client(
    address: tuple[str, int],
    authkey: bytes | None,
    timeout: float | None,
    call_timeout: float | None,
) -> Client:
    """Return a live client of this process for ``address`` (and ``authkey``), or a new one."""
    for client in list(_CLIENTS):
        if (
            client.address == address
            and not client._closed
            and (authkey is None or client._authkey == authkey)
        ):
            return client
    return Client(address, authkey, timeout, call_timeout=call_timeout)
