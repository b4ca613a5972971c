"""The asyncio client: :func:`connect`, :class:`Client`, :class:`Batch`.

:class:`Client` is a :class:`~kvclient._runner.Runner` whose ``call`` is a coroutine (over
:class:`~kvclient.aio._backend.AsyncBackend`: a pool of connections, request ids, retries,
fences for cancelled calls), whose ``run`` drives the flows of :mod:`kvclient._flows` with
``await``, and whose leases are renewed by a task (:mod:`kvclient.aio._leases`). The methods
naming containers are the sync client's own, run with a recording ``_create``: their checks
and arguments are written once, in :mod:`kvclient.client`; here the recorded ``create`` call
is awaited and the sync proxy becomes its asyncio class (:mod:`kvclient.aio.proxies`, which
adds no state, so the object only changes class).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import ssl
from collections.abc import Callable, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from kvclient import client as _sync
from kvclient._dumps import Collector, OpenSink, dump_flow, restore_flow
from kvclient._runner import DERIVED, Flow
from kvclient.aio._backend import DEFAULT_MAX_CONNECTIONS, AsyncBackend
from kvclient.aio._leases import AsyncLeaseKeeper
from kvclient.aio.proxies import async_class, make_async_proxy, sync_class
from kvclient.client import Pending
from kvclient.connection import DEFAULT_ADDRESS
from kvclient.proxies import P, Proxy, to_ref
from kvclient.retry import Retry
from kvclient.sync import DEFAULT_LEASE
from kvproto.address import REDIS_SCHEMES, parse_target
from kvproto.authkey import load_authkey
from kvproto.codec import STORED_DEPTH, Codec, Ref
from kvproto.net import format_address
from kvproto.wire import MAX_BATCH

__all__ = ["Batch", "Client", "Pending", "connect"]

_DEFAULT_RETRY: Any = object()
_T = TypeVar("_T")


class _Connecting:
    """What :func:`connect` returns: ``await`` it for a client, or ``async with`` it."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._start().__await__()

    async def _start(self) -> Client:
        await self._client._backend.connect()
        return self._client

    async def __aenter__(self) -> Client:
        return await self._start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()


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
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> _Connecting:
    """Connect to a kvserve server: await the result for a Client, or use it in async with.

    A ``redis://``, ``rediss://`` or ``redis-cluster://`` address gives the same client on the
    Valkey/Redis backend (:mod:`kvclient._redis.aio`; an authkey or ``max_connections`` is
    then a ValueError: each call in flight has a connection of its own there).

    Args: as :func:`kvclient.connect` (the same address forms, environment variables, authkey
    search, TLS options and :class:`~kvclient.retry.Retry` policy), and:

        max_connections: connections this client opens at most (default 64). Each call in
            flight holds one, a parked one (``await q.get()``) for as long as it waits; more
            concurrent calls wait for one to come back.

    Raises (when awaited): as :func:`kvclient.connect`. ``ValueError`` and ``AuthError`` for
    a malformed address or a missing key are raised at once.
    """
    address = address or os.environ.get("KV_ADDRESS") or DEFAULT_ADDRESS
    if isinstance(address, str) and address.strip().partition("://")[0].lower() in REDIS_SCHEMES:
        if max_connections != DEFAULT_MAX_CONNECTIONS:
            raise ValueError("max_connections= is for kvserve addresses, not Valkey/Redis ones")
        return _Connecting(
            _redis_client(address, authkey, timeout, call_timeout, retry, tls, ca, cert, key)
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
    return _Connecting(
        Client(
            (target.host, target.port),
            authkey,
            timeout,
            call_timeout=call_timeout,
            retry=retry,
            tls=tls,
            ca=ca,
            cert=cert,
            key=key,
            max_connections=max_connections,
        )
    )


def _redis_client(
    address: str,
    authkey: bytes | str | None,
    timeout: float | None,
    call_timeout: float | None,
    retry: Retry | None,
    tls: bool | ssl.SSLContext | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> Client:
    """The asyncio client of a Valkey/Redis address (README "Outgrowing one host")."""
    if authkey is not None:
        raise ValueError(
            "authkey= is kvserve's; a Valkey/Redis server takes a password in the URL "
            "(redis://:PASSWORD@host) or in REDIS_PASSWORD"
        )
    try:
        from kvclient._redis.aio import async_client  # noqa: PLC0415 - needs redis-py
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in ("redis", "greenlet"):
            from kvclient._redis.client import import_error  # noqa: PLC0415

            raise import_error() from exc
        raise
    return async_client(
        address,
        timeout,
        call_timeout,
        Retry() if retry is _DEFAULT_RETRY else retry,
        tls,
        ca,
        cert,
        key,
    )


class _Made(Generic[P]):
    """A proxy being created: ``await`` it for the proxy, or ``async with`` it (a lock)."""

    __slots__ = ("_client", "_created", "_proxy")

    def __init__(self, client: Client, created: list[list[Any]], proxy: P) -> None:
        self._client = client
        self._created = created
        self._proxy = proxy

    def __await__(self) -> Generator[Any, None, P]:
        return self._make().__await__()

    async def _make(self) -> P:
        for args in self._created:
            await self._client.call(None, None, "create", args)
        return self._proxy

    async def __aenter__(self) -> Any:
        proxy: Any = await self._make()
        return await proxy.__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        proxy: Any = self._proxy
        await proxy.__aexit__(*exc_info)


class Client:
    """An asyncio client of one kvserve server. Use :func:`connect` to make one.

    Every method that talks to the server is awaited; the methods naming containers return
    an awaitable proxy (``d = await kv.dict("d")``), which a lock, semaphore or condition
    also is as an async context manager (``async with kv.lock("x") as token:``). One client
    serves any number of tasks of its event loop (a pool of connections, see
    :mod:`kvclient.aio._backend`); it belongs to the loop it was made in.

    Args: as :func:`connect`.
    """

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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.tls, self.address, self._authkey = _sync.resolve_settings(
            address, authkey, tls, ca, cert, key
        )
        self.endpoint = format_address(*self.address)
        self._closed = False
        self._backend = AsyncBackend(
            self.address,
            self._authkey,
            timeout,
            call_timeout,
            Retry() if retry is _DEFAULT_RETRY else retry,
            self.tls,
            make_ref=self._make_ref,
            to_ref=to_ref,
            max_connections=max_connections,
        )
        self.call = self._backend.call
        self.leases = AsyncLeaseKeeper(self._backend.call, self.endpoint, _loop())
        self._recorded: builtins.list[builtins.list[Any]] | None = None

    @property
    def timeout(self) -> float | None:
        """Seconds allowed for connecting and the handshake."""
        return self._backend.timeout

    @property
    def call_timeout(self) -> float | None:
        """Seconds allowed for each call's reply."""
        return self._backend.call_timeout

    @property
    def retry(self) -> Retry | None:
        """What to do when a call's connection fails (None: never retry)."""
        return self._backend.retry

    @retry.setter
    def retry(self, value: Retry | None) -> None:
        self._backend.retry = value

    @property
    def owner_id(self) -> str:
        """The id (hex) this client holds Locks and Semaphores under (as ``status()`` shows)."""
        return self.leases.owner_id

    def __repr__(self) -> str:
        return f"<kvclient.aio.Client {self.endpoint}{' closed' if self._closed else ''}>"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop renewing leases and close every connection (after undoing cancelled calls)."""
        self._closed = True
        await self.leases.aclose()
        await self._backend.close()

    # -- the Runner protocol ---------------------------------------------------------------

    async def run(self, flow: Flow[_T]) -> _T:
        """Run a multi-step flow (:mod:`kvclient._flows`) to its end, awaiting each call."""
        call = self.call
        try:
            step = next(flow)
            while True:
                try:
                    result = await call(step.kind, step.ident, step.method, step.args)
                except BaseException as exc:  # the flow decides: clean up, then (re)raise
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            value: _T = stop.value
            return value

    def rebuild_info(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """A proxy pickled from an asyncio client rebuilds as a *sync* one (no loop there)."""
        return _sync.Client.rebuild_info(cast(_sync.Client, self))

    def _make_ref(self, ref: Ref) -> Proxy:
        return make_async_proxy(self, ref.kind, ref.name)

    # -- containers and primitives: the sync client's methods, with create recorded ----------

    def _create(self, kind: str, name: str, *args: Any) -> None:
        assert self._recorded is not None
        self._recorded.append([kind, name, *args])

    _semaphore = _sync.Client._semaphore

    def _made(self, method: Callable[..., Any], *args: Any, **kwds: Any) -> Any:
        created: builtins.list[builtins.list[Any]] = []
        self._recorded = created
        try:
            proxy = method(self, *args, **kwds)
        finally:
            self._recorded = None
        # The asyncio class adds no state (see kvclient.aio.proxies): only the class changes.
        proxy.__class__ = async_class(type(proxy))
        return _Made(self, created, proxy)

    def dict(
        self, name: str, initial: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None = None
    ) -> Any:
        """Return an awaitable dict proxy (as :meth:`kvclient.Client.dict`)."""
        return self._made(_sync.Client.dict, name, initial)

    def list(self, name: str, initial: Iterable[Any] | None = None) -> Any:
        """Return an awaitable list proxy (as :meth:`kvclient.Client.list`)."""
        return self._made(_sync.Client.list, name, initial)

    def namespace(self, name: str, initial: Mapping[str, Any] | None = None) -> Any:
        """Return an awaitable Namespace proxy (as :meth:`kvclient.Client.namespace`)."""
        return self._made(_sync.Client.namespace, name, initial)

    def queue(self, name: str, maxsize: int | None = None) -> Any:
        """Return an awaitable Queue proxy (as :meth:`kvclient.Client.queue`)."""
        return self._made(_sync.Client.queue, name, maxsize)

    def lock(self, name: str, lease: float = DEFAULT_LEASE) -> Any:
        """Return an awaitable Lock proxy, also ``async with kv.lock(name) as token:``."""
        return self._made(_sync.Client.lock, name, lease)

    def rlock(self, name: str, lease: float = DEFAULT_LEASE) -> Any:
        """Return an awaitable RLock proxy (re-entrant per task)."""
        return self._made(_sync.Client.rlock, name, lease)

    def semaphore(self, name: str, value: int | None = None, lease: float = DEFAULT_LEASE) -> Any:
        """Return an awaitable Semaphore proxy (as :meth:`kvclient.Client.semaphore`)."""
        return self._made(_sync.Client.semaphore, name, value, lease)

    def bounded_semaphore(
        self, name: str, value: int | None = None, lease: float = DEFAULT_LEASE
    ) -> Any:
        """Return an awaitable BoundedSemaphore proxy."""
        return self._made(_sync.Client.bounded_semaphore, name, value, lease)

    def event(self, name: str) -> Any:
        """Return an awaitable Event proxy."""
        return self._made(_sync.Client.event, name)

    def condition(self, name: str, lease: float = DEFAULT_LEASE) -> Any:
        """Return an awaitable Condition proxy (its lock is owned per task)."""
        return self._made(_sync.Client.condition, name, lease)

    def barrier(self, name: str, parties: int, timeout: float | None = None) -> Any:
        """Return an awaitable Barrier proxy (as :meth:`kvclient.Client.barrier`)."""
        return self._made(_sync.Client.barrier, name, parties, timeout)

    def value(
        self, name: str, typecode_or_default: Any, value: Any = None, *, lock: Any = True
    ) -> Any:
        """Return an awaitable Value proxy (as :meth:`kvclient.Client.value`)."""
        return self._made(_sync.Client.value, name, typecode_or_default, value, lock=lock)

    def array(self, name: str, typecode: str, size_or_initializer: Any, *, lock: Any = True) -> Any:
        """Return an awaitable Array proxy (as :meth:`kvclient.Client.array`)."""
        return self._made(_sync.Client.array, name, typecode, size_or_initializer, lock=lock)

    # -- server-level calls ----------------------------------------------------------------

    async def names(self) -> builtins.dict[str, str]:
        """Return ``{name: kind}`` for every container on the server."""
        result: builtins.dict[str, str] = await self.call(None, None, "names", [])
        return result

    async def describe(self) -> builtins.dict[str, builtins.dict[str, Any]]:
        """Return ``{name: {"kind": kind, "size": items held}}`` for every container."""
        result: builtins.dict[str, builtins.dict[str, Any]] = await self.call(
            None, None, "describe", []
        )
        return result

    async def drop(self, name: str) -> bool:
        """Delete a container and its contents; return whether it existed."""
        return bool(await self.call(None, None, "drop", [name]))

    async def compact(self) -> bool:
        """Ask a persistent server to compact its log now (as :meth:`kvclient.Client.compact`)."""
        return bool(await self.call(None, None, "compact", []))

    async def dump(self) -> builtins.dict[str, Any]:
        """Return a consistent point-in-time copy of every container (read in pieces)."""
        collect = Collector()
        header = await self.run(dump_flow(collect.open))
        return collect.document(header["format"])

    async def dump_stream(self, open_sink: OpenSink) -> builtins.dict[str, Any]:
        """Read a dump piece by piece (as :meth:`kvclient.Client.dump_stream`)."""
        return await self.run(dump_flow(open_sink))

    async def restore(self, dump: builtins.dict[str, Any]) -> int:
        """Load a :meth:`dump` into an empty server in pieces; return the containers made."""
        codec = Codec(to_ref=to_ref, encode_depth=STORED_DEPTH)
        return await self.run(restore_flow(dump, codec.pack))

    async def ping(self) -> None:
        """Make one round trip; raises if the server does not answer."""
        await self.call(None, None, "ping", [])

    async def stats(self) -> builtins.dict[str, Any]:
        """Return server facts: version, uptime (s), clients, containers, keys, ops, requests.

        Also ``memory`` (the server's RSS), ``requests_by_op`` (counts and seconds by kind and
        operation, when the server times requests) and ``persistence`` (with ``--data-dir``:
        disk bytes, compactions, fsyncs and their seconds); the README's "Watching a server"
        lists every field.
        """
        result: builtins.dict[str, Any] = await self.call(None, None, "stats", [])
        return result

    def batch(self) -> Batch:
        """Return a :class:`Batch`: ``async with kv.batch() as b:``, sent as one frame."""
        return Batch(self)


def _loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "kvclient.aio.connect() must be called with an event loop running (inside a coroutine)"
        ) from None


class Batch(_sync.Batch):
    """Calls on any containers, recorded and sent as one frame: ``async with kv.batch() as b:``.

    As :class:`kvclient.Batch`: proxies bound to it (``b.bind(d)``, ``await b.dict(name)``)
    record calls and return :class:`~kvclient.Pending` results, readable once the ``async
    with`` block has sent the batch (or after ``await b.send()``).
    """

    def __init__(self, client: Client) -> None:
        super().__init__(cast(_sync.Client, client))
        self._aclient = client

    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            await self.send()

    def __enter__(self) -> Batch:
        raise TypeError("an asyncio batch is sent by async with kv.batch() as b:")

    def bind(self, proxy: P) -> P:
        """Return a copy of ``proxy`` (of its sync class) whose calls are recorded here."""
        cls = cast(type[P], sync_class(type(proxy)))
        return cls(self, proxy._name, proxy._kind)

    async def dict(self, name: str) -> Any:  # type: ignore[override]
        """Get or create a dict now, and return it bound to this batch."""
        return self.bind(await self._aclient.dict(name))

    async def list(self, name: str) -> Any:  # type: ignore[override]
        """Get or create a list now, and return it bound to this batch."""
        return self.bind(await self._aclient.list(name))

    async def namespace(self, name: str) -> Any:  # type: ignore[override]
        """Get or create a Namespace now, and return it bound to this batch."""
        return self.bind(await self._aclient.namespace(name))

    async def queue(self, name: str, maxsize: int | None = None) -> Any:  # type: ignore[override]
        """Get or create a Queue now, and return it bound to this batch."""
        return self.bind(await self._aclient.queue(name, maxsize))

    async def send(self) -> builtins.list[Any]:  # type: ignore[override]
        """Send the recorded calls, in frames of at most ``MAX_BATCH``; return the results."""
        if self.results is not None:
            return self.results
        replies: builtins.list[Any] = []
        for start in range(0, len(self._calls), MAX_BATCH):
            chunk = self._calls[start : start + MAX_BATCH]
            replies.extend(await self._aclient.call(None, None, "batch", [chunk]))
        self.results = [value for _kind, value in replies]
        return self.results

    def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: builtins.list[Any],
        kwds: builtins.dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Pending:
        """Record one call; return its :class:`~kvclient.Pending`."""
        return super().call(kind, ident, method, args, kwds, timeout)
