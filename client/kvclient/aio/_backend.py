"""The asyncio socket backend: a bounded pool of connections, request ids, retries, fences.

Design (issue 15). The wire pairs replies with requests by order on a connection, and a call
the server parks (a ``q.get()`` on an empty queue, a contended ``lock.acquire()``) holds its
connection until it is answered. So concurrent tasks on one :class:`~kvclient.aio.Client` get
a connection each, from a pool: a call takes an idle connection (or opens one, up to
``max_connections``; beyond that it waits, first come first served, for one to come back),
makes its call and puts it back. No call waits behind another's reply, parked or not, until
the bound is reached. Correlation ids in the protocol would multiplex one connection instead,
but need a wire change on both sides; the pool needs none, and the server already withdraws a
parked call when its connection closes, which is what cancellation needs (below).

Each pooled *slot* has its request-id session (a random token and a sequence number), kept
when its connection is replaced, exactly as the blocking backend keeps one per thread: a call
that mutates (not idempotently: ``Op.needs_id``) carries ``[token, seq]`` and is retried,
after a failed connection, with the same id on a new connection, so the server applies it
once (:class:`~kvclient.retry.Retry`). The server remembers one answer per token, which is
why a token is never used by two calls at once: it belongs to its slot, and a slot to one
call at a time.

Cancellation. A call cancelled (or timed out by ``asyncio.timeout``) closes its connection:
the server withdraws what it parked for it. The reply may, though, have been on its way: the
server gave the cancelled ``get`` an item, or the ``acquire`` the lock, just before it saw the
connection go. For those calls (the blocking, mutating ones the schema names) a *fence* runs
in the background before the slot is used again: it sends a request with the **same request
id** on a new connection. The server answers a repeated id with the first answer if there was
one (the call was applied: the fence learns its result); if there was none, the fence itself
is applied, a call made to fail (too many arguments) that changes nothing, and its answer now
holds that id, so the withdrawn call can never be applied later either (a parked retry of an
id already answered only repeats that answer). A result the fence learns is undone: an item a
cancelled ``get`` took is put back (at the tail, with its ``task_done`` so the queue's count of
unfinished tasks is unchanged), a lock or slot granted to a cancelled ``acquire`` is released.
What is not undone: a ``put`` cancelled after the server accepted it stays in the queue.
``Condition.wait``'s steps are not fenced: its flow takes the lock back itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from kvclient._runner import DERIVED, RequestIds, plan_of, reply_timeout
from kvclient.aio._connection import AsyncConnection, make_codec, open_connection
from kvclient.retry import Retry
from kvproto.codec import Ref
from kvproto.errors import AuthError, KVConnectionError, KVError
from kvproto.net import format_address

__all__ = ["DEFAULT_MAX_CONNECTIONS", "AsyncBackend"]

log = logging.getLogger("kvclient")

DEFAULT_MAX_CONNECTIONS = 64
"""Connections a client opens at most (each in-flight call holds one)."""

# Handshakes in flight at once: a burst of tasks must not open max_connections at the same
# instant, past the server's --max-pending (64 by default), which closes the excess (each
# then waits out a retry's backoff).
_MAX_OPENING = 8

# Longer than any method's positional parameters: a fence fails to bind, changing nothing.
_FENCE_ARGS = [None] * 24


class _Slot(RequestIds):
    """One pooled connection and its request-id session (kept across reconnects)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        super().__init__()
        self.conn: AsyncConnection | None = None


class AsyncBackend:
    """Calls to one kvserve server over a pool of asyncio connections (see the module).

    Args:
        address: ``(host, port)``.
        authkey: the shared key.
        timeout: seconds for connecting and the handshake; None waits for ever.
        call_timeout: seconds for each reply (blocking calls: their wait on top); None: ever.
        retry: what to do when a connection fails; None never retries.
        tls: the client TLS context, or None for plain TCP.
        make_ref: turns a container reference read from the server into a proxy.
        to_ref: turns a proxy being sent into a reference.
        max_connections: connections open at most; more concurrent calls wait for one.
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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.retry = retry
        self.tls = tls
        self.max_connections = max_connections
        self.endpoint = format_address(*address)
        self.codec = make_codec(make_ref, to_ref)
        self.closed = False
        self._idle: list[_Slot] = []
        self._waiting: deque[asyncio.Future[_Slot]] = deque()
        self._slots: list[_Slot] = []
        self._fences: set[asyncio.Task[None]] = set()
        self._opening = asyncio.Semaphore(_MAX_OPENING)

    @property
    def open_connections(self) -> int:
        """Connections open now (idle or carrying a call)."""
        return sum(1 for s in self._slots if s.conn is not None and not s.conn.closed)

    async def close(self) -> None:
        """Close every connection, after the fences still running (at most ``timeout``)."""
        if self._fences:
            await asyncio.wait(list(self._fences), timeout=self.timeout)
        self.closed = True
        for slot in self._slots:
            if slot.conn is not None:
                slot.conn.close()
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(KVError(f"client for {self.endpoint} is closed"))
        self._waiting.clear()

    # -- the pool ----------------------------------------------------------------------------

    async def _take(self) -> _Slot:
        if self.closed:
            raise KVError(f"client for {self.endpoint} is closed")
        if self._idle:
            return self._idle.pop()
        if len(self._slots) < self.max_connections:
            slot = _Slot()
            self._slots.append(slot)
            return slot
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give(waiter.result())  # handed over as we were cancelled: pass it on
            else:
                try:
                    self._waiting.remove(waiter)
                except ValueError:
                    pass
            raise

    def _give(self, slot: _Slot) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._idle.append(slot)

    async def connect(self) -> None:
        """Open one connection now (fail at connect time, not at the first call)."""
        slot = await self._take()
        try:
            slot.conn = await self._open()
        finally:
            self._give(slot)

    async def _open(self) -> AsyncConnection:
        async with self._opening:
            return await open_connection(
                self.address, self.authkey, self.timeout, self.codec, self.tls
            )

    # -- calls ------------------------------------------------------------------------------

    async def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Any:
        """Make one call and return its result, raising what the server raised.

        As :meth:`kvclient._backend.SocketBackend.call`, awaited; cancelling it is safe (see
        the module docstring).
        """
        op = plan_of(kind, method)
        if timeout is DERIVED:
            timeout = False if op is None else reply_timeout(op, args, self.call_timeout)
        wait = self.call_timeout if timeout is False else timeout
        assert wait is not True
        slot = await self._take()
        message: list[Any] = [ident, method, args, kwds]
        if op is not None and op.needs_id:
            message.append(slot.next_id())
        try:
            result = await self._call_on(slot, message, wait)
        except asyncio.CancelledError:
            if op is not None and op.fenced and len(message) == 5:
                self._start_fence(slot, kind, ident, method, args, message[4])
            else:
                self._give(slot)
            raise
        except BaseException:
            self._give(slot)
            raise
        self._give(slot)
        return result

    async def _call_on(self, slot: _Slot, message: list[Any], timeout: float | None) -> Any:
        """Send ``message`` on ``slot``, (re)connecting, until answered or retries run out."""
        retries = 0 if self.retry is None else self.retry.retries
        attempts = 0
        error: KVConnectionError | None = None
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
                await asyncio.sleep(self.retry.backoff.compute(attempts))
            try:
                conn = slot.conn
                if conn is None or conn.closed:
                    if self.closed:
                        raise KVError(f"client for {self.endpoint} is closed")
                    conn = slot.conn = await self._open()
                return await conn.call(message, timeout)
            except AuthError:
                raise  # a restarted server with another key: retrying cannot help
            except KVConnectionError as exc:
                error = exc

    # -- fences -----------------------------------------------------------------------------

    def _start_fence(
        self,
        slot: _Slot,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        rid: list[Any],
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._fence(slot, kind, ident, method, args, rid), name=f"kvclient-fence {ident}"
        )
        self._fences.add(task)
        task.add_done_callback(self._fences.discard)

    async def _fence(
        self,
        slot: _Slot,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        rid: list[Any],
    ) -> None:
        """Learn whether a cancelled call was applied (same request id), and undo it if so."""
        try:
            try:
                result = await self._call_on(
                    slot, [ident, method, _FENCE_ARGS, None, rid], self.call_timeout
                )
            except Exception:
                return  # the fence's own TypeError, or the call's error: nothing was given
            if kind == "queue":
                log.info("a cancelled get on %r had taken an item; putting it back", ident)
                await self._call_on(
                    slot, [ident, "put", [result, False, None], None, slot.next_id()], None
                )
                await self._call_on(slot, [ident, "task_done", [], None, slot.next_id()], None)
            elif result is not False:
                log.info("a cancelled acquire of %r had been granted; releasing it", ident)
                await self._call_on(slot, [ident, "release", [args[0]], None, slot.next_id()], None)
        except Exception as exc:
            log.warning(
                "could not undo a cancelled %s on %r at %s: %s", method, ident, self.endpoint, exc
            )
        finally:
            self._give(slot)
