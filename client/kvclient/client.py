"""The Python client: :func:`connect`, :class:`Client`, and proxies that behave like local types.

A :class:`Client` holds one connection per thread (opened on first use in that thread), so it is
safe to share between threads. After ``fork`` the child drops the parent's connections and opens
its own; a proxy pickled to a spawned child process rebuilds its client there.

Proxies are cheap handles (a client and a container name). Every method is one round trip and
runs under the container's lock on the server. Iteration fetches a snapshot in one round trip
(stdlib iterator proxies pay one round trip per item).
"""

from __future__ import annotations

import builtins
import os
import secrets
import ssl
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from kvclient.connection import DEFAULT_ADDRESS, Connection
from kvclient.proxies import (
    _NO_TIMEOUT_CHANGE,
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
from kvclient.sync import SyncMixin
from kvclient.tls import resolve_client_tls
from kvproto.address import parse_address, parse_target
from kvproto.authkey import MIN_AUTHKEY_BYTES, load_authkey
from kvproto.codec import STORED_DEPTH, Codec, Ref
from kvproto.errors import AuthError, KVConnectionError, KVError
from kvproto.net import format_address
from kvproto.wire import MAX_BATCH

__all__ = ["Batch", "Client", "Pending", "connect"]

_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()
_DEFAULT_RETRY: Any = object()


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
) -> Client:
    """Connect to a kvserve server and return a :class:`Client` (a context manager).

    Args:
        address: ``"host:port"`` (IPv6: ``"[::1]:50000"``), ``(host, port)``, or a URL:
            ``kv://[KEY@]host:port``, or ``kvs://...`` for TLS (see :mod:`kvclient._address`:
            ``KEY`` names the authkey file, ``~/.config/kvmanager/KEY.key`` or a path);
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

    Raises:
        ValueError: the address is malformed (the message lists the accepted forms), or says
            ``kvs://`` with ``tls=False``, or names a key file as well as ``authkey``.
        KVConnectionError: the server is unreachable.
        AuthError: the authkey was rejected, is shorter than 16 bytes, or none could be found.
        ProtocolError: the peer is not kvserve or speaks another wire version.
        TLSError: TLS failed: a certificate was refused, or only one side speaks TLS.
    """
    address = address or os.environ.get("KV_ADDRESS") or DEFAULT_ADDRESS
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


class Client(SyncMixin):
    """A connection (one per thread) to one kvserve server. Use :func:`connect` to make one.

    Args: as :func:`connect`.
    """

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
        self.tls = resolve_client_tls(tls, ca, cert, key)
        self.address = parse_address(address or os.environ.get("KV_ADDRESS") or DEFAULT_ADDRESS)
        self.endpoint = format_address(*self.address)
        source = load_authkey(authkey)
        if len(source.key) < MIN_AUTHKEY_BYTES:
            # No kvserve runs with a shorter key (the server refuses one), so it cannot be
            # right; say so here rather than as a rejected handshake.
            raise AuthError(
                f"the authkey from {source.origin} is {len(source.key)} bytes; kvserve keys "
                f"are at least {MIN_AUTHKEY_BYTES}"
            )
        self._authkey = source.key
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.retry = Retry() if retry is _DEFAULT_RETRY else retry
        self._local = threading.local()
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._closed = False
        self._conn()  # fail now, not at the first call, when the server is unreachable
        _CLIENTS.add(self)

    def __repr__(self) -> str:
        return f"<kvclient.Client {self.endpoint}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection this client opened, in all threads."""
        self._closed = True
        self._close_sync()  # stop renewing leases now, not one interval later
        for conn in list(self._conns):
            conn.close()

    def _reset_after_fork(self) -> None:
        # The parent's sockets are shared with the parent; using them here would interleave
        # both processes' frames on one stream (gh-101320). Forget them; do not close them
        # (closing is harmless to the parent, but shutdown() would not be).
        self._local = threading.local()
        self._conns = weakref.WeakSet()

    # -- the call path -------------------------------------------------------------------

    def _session(self) -> _Session:
        session: _Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _Session()
        return session

    def _conn(self) -> Connection:
        session = self._session()
        conn = session.conn
        if conn is None or conn.closed:
            if self._closed:
                raise KVError(f"client for {self.endpoint} is closed")
            conn = Connection(
                self.address,
                self._authkey,
                self.timeout,
                make_ref=self._make_ref,
                to_ref=to_ref,
                tls=self.tls,
            )
            conn.timeout = self.call_timeout
            session.conn = conn
            self._conns.add(conn)
        return conn

    def _call(
        self,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = _NO_TIMEOUT_CHANGE,
        changes: bool = False,
    ) -> Any:
        session: _Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._session()
        if not changes and method in _READ_ONLY:
            message = [ident, method, args, kwds]
        else:
            # A request id makes the call safe to retry: the server answers a repeated id
            # with the first answer instead of applying the call again.
            session.seq += 1
            message = [ident, method, args, kwds, [session.token, session.seq]]
        conn = session.conn
        if conn is not None and not conn.closed:
            try:
                return conn.call(message, timeout)
            except KVConnectionError as exc:
                if self.retry is None or self.retry.retries == 0:
                    raise
                return self._retry_call(message, timeout, exc)
        return self._retry_call(message, timeout, None)

    def _retry_call(
        self, message: list[Any], timeout: float | bool | None, error: KVConnectionError | None
    ) -> Any:
        """(Re)connect and send ``message`` until it is answered or the retries run out."""
        retries = 0 if self.retry is None else self.retry.retries
        attempts = 0
        while True:
            if error is not None:
                if attempts >= retries:
                    if attempts == 0:
                        raise error
                    raise KVConnectionError(
                        f"gave up on {self.endpoint} after {attempts + 1} attempts: {error}"
                    ) from error
                attempts += 1
                assert self.retry is not None
                time.sleep(self.retry.backoff.compute(attempts))
            try:
                return self._conn().call(message, timeout)
            except AuthError:
                raise  # a restarted server with another key: retrying cannot help
            except KVConnectionError as exc:
                error = exc

    def _make_ref(self, ref: Ref) -> Proxy:
        return make_proxy(self, ref.kind, ref.name)

    # -- containers ----------------------------------------------------------------------

    def _create(self, kind: str, name: str, *args: Any) -> None:
        self._call(None, "create", [kind, name, *args])

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
        result: builtins.dict[str, str] = self._call(None, "names", [])
        return result

    def describe(self) -> builtins.dict[str, builtins.dict[str, Any]]:
        """Return ``{name: {"kind": kind, "size": items held}}`` for every container."""
        result: builtins.dict[str, builtins.dict[str, Any]] = self._call(None, "describe", [])
        return result

    def drop(self, name: str) -> bool:
        """Delete a container and its contents; return whether it existed."""
        return bool(self._call(None, "drop", [name]))

    def compact(self) -> bool:
        """Ask a persistent server to compact its log now; False if one is already running.

        Raises:
            ValueError: the server keeps no data on disk.
        """
        return bool(self._call(None, "compact", []))

    def dump(self) -> builtins.dict[str, Any]:
        """Return a consistent point-in-time copy of every container (see :meth:`restore`)."""
        result: builtins.dict[str, Any] = self._call(None, "dump", [])
        return result

    def restore(self, dump: builtins.dict[str, Any]) -> int:
        """Load a :meth:`dump` into an empty server; return the number of containers.

        Raises:
            ValueError: the server is not empty, or ``dump`` is not a kvmanager dump.
        """
        # Sent encoded: a request holding the dump would nest its deepest values beyond
        # MAX_DEPTH (the server decodes the blob with the depth stored data may have).
        blob = Codec(to_ref=to_ref, encode_depth=STORED_DEPTH).pack(dump)
        return int(self._call(None, "restore", [blob]))

    def batch(self) -> Batch:
        """Return a :class:`Batch` (a context manager): calls on any containers, one frame."""
        return Batch(self)

    def ping(self) -> None:
        """Make one round trip; raises if the server does not answer."""
        self._call(None, "ping", [])

    def stats(self) -> builtins.dict[str, Any]:
        """Return server facts: version, uptime (s), clients, containers, keys, ops."""
        result: builtins.dict[str, Any] = self._call(None, "stats", [])
        return result


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
    # value yet).
    records_calls = True

    def __init__(self, client: Client) -> None:
        self._client = client
        self._calls: builtins.list[builtins.list[Any]] = []
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

    def _call(
        self,
        ident: str | None,
        method: str,
        args: builtins.list[Any],
        kwds: builtins.dict[str, Any] | None = None,
        timeout: float | bool | None = _NO_TIMEOUT_CHANGE,
        changes: bool = False,
    ) -> Pending:
        if self.results is not None:
            raise RuntimeError("this batch was already sent; start a new one")
        self._calls.append([ident, method, args, kwds])
        return Pending(self, len(self._calls) - 1)

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
            replies.extend(self._client._call(None, "batch", [chunk]))
        # A value is never an exception (clients cannot encode one), so errors need no tag.
        self.results = [value for _kind, value in replies]
        return self.results


class _Session:
    """One thread's connection and request-id sequence (kept across reconnects)."""

    __slots__ = ("conn", "seq", "token")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.token = secrets.token_bytes(16)
        self.seq = 0


# Calls that change nothing: retried freely and sent without a request id. Names shared by
# kinds (a queue's get changes it, a dict's does not) pass `changes=True` from the proxy.
_READ_ONLY: frozenset[str] = frozenset(
    {
        "__getitem__",
        "__contains__",
        "__len__",
        "get",
        "keys",
        "values",
        "items",
        "copy",
        "get_many",
        "getslice",
        "index",
        "count",
        "getattr",
        "hasattr",
        "to_dict",
        "qsize",
        "empty",
        "full",
        "maxsize",
        "create",
        "names",
        "describe",
        "ping",
        "stats",
        "dump",
        # synchronization primitives (kvclient.sync)
        "locked",
        "is_set",
        "status",
        "get_value",
        "info",
        "typecode",
        "tolist",
        "join",
        "unfinished",
    }
)


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
