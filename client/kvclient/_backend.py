"""The kvserve socket backend: one connection per thread, request ids, retries.

:class:`SocketBackend` makes the calls of a :class:`~kvclient.client.Client`. It opens a
:class:`~kvclient.connection.Connection` per thread on that thread's first call (so a client
is safe to share between threads), gives every call that mutates a request id (a per-thread
random token and a sequence number, kept across reconnects), and when a connection fails
(refused, reset, timed out) reconnects and sends the same request again as its
:class:`~kvclient.retry.Retry` allows: the server answers a repeated request id with the first
answer instead of applying the call twice. What mutates, and how long a blocking call's reply
may take, comes from :mod:`kvproto.schema` through :func:`kvclient._runner.plan`.

After ``fork`` the child forgets the parent's connections (without closing them) and opens
its own.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from kvclient._runner import DERIVED, RequestIds, plan, reply_timeout
from kvclient.connection import Connection
from kvclient.retry import Retry, call_with_retry
from kvproto.codec import Ref
from kvproto.errors import KVConnectionError, KVError
from kvproto.net import format_address
from kvproto.schema import Op

if TYPE_CHECKING:
    import ssl

__all__ = ["SocketBackend"]

_BACKENDS: weakref.WeakSet[SocketBackend] = weakref.WeakSet()
_WITH_ID: Final = True
"""A :data:`_PATHS` entry: the call needs a request id and cannot block (a SET, an incr)."""
# kind -> method -> how SocketBackend.call makes it, from plan() on first use: None for a plain
# read, _WITH_ID, else the Op (it may block). The SET path then reads no Op field.
_PATHS: dict[str | None, dict[str, Op | bool | None]] = {}
_fork_hook_registered = False


class _Session(RequestIds):
    """One thread's connection and request ids (kept across reconnects)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        super().__init__()
        self.conn: Connection | None = None


class SocketBackend:
    """Calls to one kvserve server over blocking sockets, one connection per thread.

    Args:
        address: ``(host, port)``.
        authkey: the shared key.
        timeout: seconds for connecting and the handshake; None waits for ever.
        call_timeout: seconds for each reply (blocking calls: their wait on top); None: ever.
        retry: what to do when a connection fails; None never retries.
        tls: the client TLS context, or None for plain TCP.
        make_ref: turns a container reference read from the server into a proxy.
        to_ref: turns a proxy being sent into a reference.
    """

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        timeout: float | None,
        call_timeout: float | None,
        retry: Retry | None,
        tls: ssl.SSLContext | None,
        make_ref: Callable[[Ref], Any],
        to_ref: Callable[[Any], Ref | None],
    ) -> None:
        global _fork_hook_registered  # noqa: PLW0603 - registered once, on first use
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self._call_timeout = call_timeout
        # Held while a new call timeout is handed to the open connections, and while a new
        # connection joins them: none keeps the old one.
        self._timeout_lock = threading.Lock()
        self.retry = retry
        self.tls = tls
        self._make_ref = make_ref
        self._to_ref = to_ref
        self.endpoint = format_address(*address)
        self._local = threading.local()
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.closed = False
        _BACKENDS.add(self)
        if not _fork_hook_registered:
            _fork_hook_registered = True
            os.register_at_fork(after_in_child=_after_fork_in_child)

    @property
    def call_timeout(self) -> float | None:
        """Seconds for each reply (blocking calls: their wait on top); None: for ever."""
        return self._call_timeout

    @call_timeout.setter
    def call_timeout(self, value: float | None) -> None:
        # Every open connection too, in all threads: each applies it at its next call.
        with self._timeout_lock:
            self._call_timeout = value
            for conn in list(self._conns):
                conn.timeout = value

    def close(self) -> None:
        """Close every connection this backend opened, in all threads."""
        self.closed = True
        for conn in list(self._conns):
            conn.close()

    def _reset_after_fork(self) -> None:
        # The parent's sockets are shared with the parent; using them here would interleave
        # both processes' frames on one stream (gh-101320). Forget them; do not close them
        # (closing is harmless to the parent, but shutdown() would not be).
        self._local = threading.local()
        self._conns = weakref.WeakSet()
        self._timeout_lock = threading.Lock()  # a parent's thread may have held it

    def connection(self) -> Connection:
        """Return this thread's connection, opening it if it has none or it was closed.

        Raises:
            KVError: the backend is closed.
            KVConnectionError, AuthError, ProtocolError, TLSError: as ``Connection``.
        """
        session: _Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _Session()
        conn = session.conn
        if conn is None or conn.closed:
            if self.closed:
                raise KVError(f"client for {self.endpoint} is closed")
            conn = Connection(
                self.address,
                self.authkey,
                self.timeout,
                make_ref=self._make_ref,
                to_ref=self._to_ref,
                tls=self.tls,
            )
            with self._timeout_lock:
                conn.timeout = self._call_timeout
                self._conns.add(conn)
            session.conn = conn
        return conn

    def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Any:
        """Make one call and return its result, raising what the server raised.

        Args:
            kind: the container's kind (None for a server-level call): with ``method`` it
                says, through :mod:`kvproto.schema`, whether the call gets a request id and
                how long its reply may take.
            ident: the container's name (None for a server-level call).
            method: the operation.
            args: its arguments.
            kwds: keyword arguments, for the stdlib's shape of request (kvclient sends none).
            timeout: seconds for the reply, overriding the derived timeout; None: for ever.

        Raises:
            KVConnectionError: the connection failed, and retrying did not help.
            BaseException: what the call raised on the server.
        """
        # The hot path: two dict lookups, this thread's session, a list and Connection.call.
        try:
            op = _PATHS[kind][method]
        except KeyError:
            op = _path(kind, method)
        try:
            session: _Session = self._local.session
        except AttributeError:  # this thread's first call
            session = self._local.session = _Session()
        if op is None:
            message = [ident, method, args, kwds]
            if timeout is DERIVED:
                timeout = False
        elif op is _WITH_ID:
            # A request id makes the call safe to retry: the server answers a repeated id
            # with the first answer instead of applying the call again. RequestIds.next_id(),
            # inline (one Python call less on every SET).
            seq = session.seq = session.seq + 1
            message = [ident, method, args, kwds, [session.token, seq]]
            if timeout is DERIVED:
                timeout = False
        else:
            assert type(op) is Op
            if timeout is DERIVED:
                # reply_timeout() is False for an op that cannot block: skip the call.
                timeout = reply_timeout(op, args, self._call_timeout) if op.blocks else False
            if op.mutates and not op.idempotent:  # op.needs_id, without the property's call
                message = [ident, method, args, kwds, session.next_id()]
            else:
                message = [ident, method, args, kwds]
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
        return call_with_retry(
            self.retry, self.endpoint, lambda: self.connection().call(message, timeout), error
        )


def _path(kind: str | None, method: str) -> Op | bool | None:
    """Return (and cache in :data:`_PATHS`) how ``method`` on ``kind`` is called."""
    op = plan(kind, method)  # None, or an Op that needs a request id or may block
    found = op if op is None or op.blocks else _WITH_ID
    _PATHS.setdefault(kind, {})[method] = found
    return found


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._reset_after_fork()
