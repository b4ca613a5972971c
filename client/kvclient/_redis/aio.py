"""The Valkey/Redis backend for ``kvclient.aio``: the same logic, its IO on ``redis.asyncio``.

``await kvclient.aio.connect("redis-cluster://h1:7000,h2:7000")`` returns an
:class:`AsyncRedisClient`: a :class:`kvclient.aio.Client` (the same proxies, flows, batches,
lease keeper) whose backend is :class:`AsyncRedisBackend`. That backend *is* the sync
:class:`~kvclient._redis._backend.RedisBackend` (script selection, keys, arguments, reply
decoding, request ids, retries) over the same :class:`~kvclient._redis._nodes.Nodes` (slot
map, ``MOVED``/``ASK``, error translation) and the same kind handlers; what differs is only
the IO under them:

- each node's client is a ``redis.asyncio.Redis`` (a pool of connections), reached through
  :class:`_NodeClient`, which has the sync client's methods and awaits each command through
  :func:`kvclient._redis._bridge.wait`;
- each call runs in its own greenlet (:mod:`kvclient._redis._bridge`), so a call waiting in
  ``BLMOVE`` or ``BLPOP`` holds its own connection and nothing else, and the loop serves
  other tasks; sleeps (a full queue's poll, a retry's backoff) are ``asyncio.sleep``;
- request-id sessions are pooled (one per call in flight, as the kvserve asyncio backend's
  slots): a session, and so a token, is used by one call at a time.

Cancellation. A call cancelled while it waits raises ``CancelledError`` where it waits;
redis-py drops that connection. For the calls the schema marks ``fenced`` (``queue.get``,
every ``acquire``) a *fence* then runs in the background with the call's own request id,
before its session is used again, as :mod:`kvclient.aio._backend` does on kvserve:

- ``get``: the fence first sends ``CLIENT UNBLOCK`` for the connection its ``BLMOVE`` waited
  on (its ``CLIENT ID`` was read in the same round trip), so that no item can still be moved
  into the call's in-flight list afterwards; then one script (the queue's ``unget``) puts
  back at the tail the item the call had taken (recorded under its request id, or moved in
  flight), if any, with no maxsize check and the unfinished count unchanged; it never takes
  an item from the queue itself;
- ``acquire``: every acquire gets a ``wait_id`` here; the fence runs the acquire script's last
  phase with the same request id and wait id (:func:`kvclient._redis.kinds.sync.withdraw`): a
  hold it had been given or handed is learned and released, and otherwise its place in line
  is withdrawn.

As on kvserve, a ``put`` cancelled after Redis applied it stays in the queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import NoBackoff

from kvclient._redis import _bridge
from kvclient._redis._backend import Call, Handler, RedisBackend, _no_method, _Session
from kvclient._redis._nodes import Nodes
from kvclient._redis.client import RedisClient, redis_settings, settle
from kvclient._runner import DERIVED, plan_of
from kvclient.aio._leases import AsyncLeaseKeeper
from kvclient.aio.client import Client
from kvclient.retry import Retry, call_with_retry
from kvproto.address import RedisTarget
from kvproto.codec import MAX_DEPTH, Codec, Ref
from kvproto.errors import KVConnectionError, KVError

__all__ = ["AsyncNodes", "AsyncRedisBackend", "AsyncRedisClient", "async_client"]

log = logging.getLogger("kvclient")

# Commands that wait on the server: sent on a connection of their own, its CLIENT ID known.
_BLOCKING: Final = frozenset({"BLMOVE", "BLPOP"})


class _Pipeline:
    """A ``redis.asyncio`` pipeline with the sync one's ``execute``."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)  # queuing a command does no IO

    def execute(self) -> Any:
        return _bridge.wait(self._pipe.execute())


class _NodeClient:
    """One node's ``redis.asyncio.Redis``, with the methods of ``redis.Redis`` the backend calls."""

    def __init__(self, node: tuple[str, int], client: aioredis.Redis) -> None:
        self.node = node
        self._client = client

    def execute_command(self, *command: Any) -> Any:
        if command[0] in _BLOCKING:
            return _bridge.wait(self._blocking(_bridge.current(), command))
        return _bridge.wait(self._client.execute_command(*command))  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = False) -> _Pipeline:
        return _Pipeline(self._client.pipeline(transaction=transaction))

    def scan_iter(self, match: str, count: int) -> Iterator[bytes]:
        cursor = 0
        while True:
            found: tuple[int, list[Any]] = _bridge.wait(
                self._client.scan(cursor, match=match, count=count)
            )
            cursor, keys = found
            yield from keys
            if int(cursor) == 0:
                return

    def close(self) -> None:
        _bridge.wait(self._client.aclose())

    def orphan(self) -> None:
        """In a forked child: cut this process's descriptors of the parent's connections."""
        pool = self._client.connection_pool
        # redis.asyncio has no public list of a pool's connections; both of these hold them.
        held = [
            *getattr(pool, "_available_connections", ()),
            *getattr(pool, "_in_use_connections", ()),
        ]
        for conn in held:
            writer = getattr(conn, "_writer", None)
            sock = None if writer is None else writer.transport.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0:
                _orphan(sock.fileno())

    async def _blocking(self, task: _bridge.Task, command: tuple[Any, ...]) -> Any:
        """Send a blocking command on a connection of its own, noting its client id first."""
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(conn.pack_commands([("CLIENT", "ID"), command]))
            task.blocked = (self.node, int(await conn.read_response()))
            reply = await conn.read_response()
        except BaseException:
            await conn.disconnect(nowait=True)  # a reply still due would meet the next command
            raise
        finally:
            await pool.release(conn)
        task.blocked = None
        return reply


def _orphan(fd: int) -> None:
    """Point descriptor ``fd`` at /dev/null, in this process only (the parent's is its own)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


class AsyncNodes(Nodes):
    """:class:`~kvclient._redis._nodes.Nodes` whose node clients are ``redis.asyncio`` ones."""

    def __init__(self, seeds: Any, cluster: bool, options: dict[str, Any]) -> None:
        super().__init__(seeds, cluster, options)
        self._options["retry"] = AsyncRedisRetry(NoBackoff(), 0)  # ours is the only loop

    def client(self, node: tuple[str, int]) -> Any:
        found = self._clients.get(node)
        if found is None:
            made = aioredis.Redis(host=node[0], port=node[1], **self._options)
            found = self._clients[node] = _NodeClient(node, made)  # type: ignore[assignment]
        return found

    def reset_after_fork(self) -> None:
        """Forget the parent's connections, first making them unreachable from this process.

        Forgotten, they are garbage, collected whenever the collector runs here, maybe inside
        an event loop of the child's own; redis.asyncio then closes each one's transport on
        the parent's loop, whose epoll instance the child shares with the parent
        (``fork`` copies the descriptor, not the instance): ``EPOLL_CTL_DEL`` there takes the
        parent's socket out of the parent's own loop, and the parent's next call on it waits
        out its whole timeout. So each inherited socket descriptor first points at /dev/null
        here: whatever later closes, unregisters or writes it meets that, never the parent's
        socket, which stays open and registered in the parent.
        """
        inherited: list[_NodeClient] = list(self._clients.values())  # type: ignore[arg-type]
        super().reset_after_fork()
        for node_client in inherited:
            node_client.orphan()


class AsyncRedisBackend(RedisBackend):
    """:class:`RedisBackend` with awaitable ``call``, ``connect`` and ``close`` (see the module).

    Args: as :class:`RedisBackend`, ``nodes`` an :class:`AsyncNodes`.
    """

    def __init__(
        self,
        nodes: AsyncNodes,
        kinds: dict[str, dict[str, Handler]],
        server: dict[str, Callable[[RedisBackend, list[Any]], Any]],
        timeout: float | None,
        call_timeout: float | None,
        retry: Retry | None,
        make_ref: Callable[[Ref], Any],
        to_ref: Callable[[Any], Ref | None],
        durability: None = None,
    ) -> None:
        super().__init__(
            nodes, kinds, server, timeout, call_timeout, retry, make_ref, to_ref, durability
        )
        # One thread: the calls share one codec (nothing switches inside an encode).
        self.codec = Codec(make_ref=make_ref, to_ref=to_ref, encode_depth=MAX_DEPTH)
        self._fences: set[asyncio.Task[None]] = set()

    # -- what differs from the sync backend: sessions, sleeps ------------------------------

    def session(self) -> _Session:
        """Return the session of the call running now (taken from the pool for it)."""
        state: _Session = _bridge.current().state
        return state

    def sleep(self, seconds: float) -> None:
        """Pause this call's task only."""
        _bridge.wait(asyncio.sleep(seconds))

    def _retrying(self, attempt: Callable[[], Any], error: KVConnectionError | None = None) -> Any:
        return call_with_retry(self.retry, self.endpoint, attempt, error, sleep=self.sleep)

    def _renew_windows(self) -> None:
        """Renew the windows (a new retry or timeout); pooled sessions keep the old, so go."""
        super()._renew_windows()
        self._idle: list[_Session] = []
        self._suffix = f":{self.windows.request_ids}"

    def _give_back(self, session: _Session) -> None:
        """Pool ``session`` again, unless its token carries a window renewed since."""
        if session.token.endswith(self._suffix):
            self._idle.append(session)

    def _take(self) -> _Session:
        if self.closed:
            raise KVError(f"client for {self.endpoint} is closed")
        return self._idle.pop() if self._idle else _Session(self.codec, self.windows.request_ids)

    async def _run(self, session: _Session, function: Callable[..., Any], *args: Any) -> Any:
        return await _bridge.run(_bridge.Task(function, session), *args)

    # -- the awaitable API -------------------------------------------------------------------

    async def connect(self) -> None:
        """Make one round trip to every master (fail at connect time, not at the first call)."""
        await self.call(None, None, "ping", [])

    async def close(self) -> None:  # type: ignore[override]
        """Close every connection, after the fences still running (at most ``timeout``)."""
        if self._fences:
            await asyncio.wait(list(self._fences), timeout=self.timeout)
        self.closed = True
        await self._run(_Session(self.codec, self.windows.request_ids), self.nodes.close)

    async def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Any:
        """Make one call and return its result (as :meth:`RedisBackend.call`), awaited."""
        session = self._take()
        op = None if ident is None or kind is None else plan_of(kind, method)
        if op is None or not op.fenced:
            try:
                return await self._run(
                    session, RedisBackend.call, self, kind, ident, method, args, kwds, timeout
                )
            finally:
                self._give_back(session)
        assert kind is not None and ident is not None
        handler = self._kinds.get(kind, {}).get(method)
        if handler is None:
            self._give_back(session)
            raise _no_method(kind, ident, method)
        ctx = Call(self, kind, ident, session, op.needs_id)
        if kind != "queue":
            args = _with_wait_id(args)
        task = _bridge.Task(self._retrying, session)
        try:
            result = await _bridge.run(task, functools.partial(handler, ctx, args))
        except asyncio.CancelledError:
            fence = self._fence(session, ctx, args, task.blocked)
            made = asyncio.get_running_loop().create_task(fence, name=f"kvclient-fence {ident}")
            self._fences.add(made)
            made.add_done_callback(self._fences.discard)
            raise
        except BaseException:
            self._give_back(session)
            raise
        self._give_back(session)
        return result

    async def _fence(
        self, session: _Session, ctx: Call, args: list[Any], blocked: tuple[Any, int] | None
    ) -> None:
        """Learn whether a cancelled get or acquire won something (same request id); undo it."""
        try:
            if ctx.kind == "queue":
                await self._fence_get(session, ctx, blocked)
            else:
                await self._fence_acquire(session, ctx, args)
        except Exception as exc:
            log.warning(
                "could not undo a cancelled call on %r at %s: %s", ctx.name, self.endpoint, exc
            )
        finally:
            self._give_back(session)

    async def _fence_get(
        self, session: _Session, ctx: Call, blocked: tuple[Any, int] | None
    ) -> None:
        if blocked is not None:
            node, client_id = blocked
            execute = functools.partial(self.nodes.execute, b"", node=node)
            unblock = functools.partial(execute, "CLIENT", "UNBLOCK", client_id)
            await self._run(session, self._retrying, unblock)
        from kvclient._redis.kinds.queue import unget  # noqa: PLC0415

        if await self._run(session, self._retrying, functools.partial(unget, ctx)):
            log.info("a cancelled get on %r had taken an item; put it back", ctx.name)

    async def _fence_acquire(self, session: _Session, ctx: Call, args: list[Any]) -> None:
        from kvclient._redis.kinds.sync import withdraw  # noqa: PLC0415

        token = await self._run(session, self._retrying, functools.partial(withdraw, ctx, args))
        if token is not None:
            log.info("a cancelled acquire of %r had been granted; releasing it", ctx.name)
            await self.call(ctx.kind, ctx.name, "release", [args[0]])


_FENCE_WAIT_ID_DEFAULTS: Final = [True, None, 30.0]


def _with_wait_id(args: list[Any]) -> list[Any]:
    """Return an acquire's arguments with a ``wait_id`` of its own, for its fence."""
    import secrets  # noqa: PLC0415

    if len(args) >= 5 and args[4] is not None:
        return args
    if not 1 <= len(args) <= 5:
        return args  # the handler raises its TypeError
    full = [*args[:4], *_FENCE_WAIT_ID_DEFAULTS[len(args) - 1 :]][:4]
    return [*full, secrets.token_bytes(8)]


class AsyncRedisClient(Client):
    """A :class:`kvclient.aio.Client` of a Valkey/Redis server or cluster.

    Use :func:`kvclient.aio.connect` with a ``redis://``, ``rediss://`` or
    ``redis-cluster://`` address to make one.
    """

    def __init__(
        self,
        target: RedisTarget,
        options: dict[str, Any],
        timeout: float | None,
        call_timeout: float | None,
        retry: Retry | None,
    ) -> None:
        settle(
            self, target, options, AsyncNodes, AsyncRedisBackend, timeout, call_timeout, retry, None
        )
        self.leases = AsyncLeaseKeeper(
            self._backend.call, self.endpoint, asyncio.get_running_loop()
        )
        self._recorded = None

    def __repr__(self) -> str:
        return f"<kvclient.aio.RedisClient {self.endpoint}{' closed' if self._closed else ''}>"

    def rebuild_info(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """A proxy pickled from it rebuilds as a sync one on the same server (no loop there)."""
        return RedisClient.rebuild_info(self)  # type: ignore[arg-type]


def async_client(
    address: str,
    timeout: float | None,
    call_timeout: float | None,
    retry: Retry | None,
    tls: bool | ssl.SSLContext | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> AsyncRedisClient:
    """Return an unconnected :class:`AsyncRedisClient` (``kvclient.aio.connect`` awaits it).

    Raises:
        ValueError: a malformed address, or TLS asked for and refused.
    """
    target, options = redis_settings(address, timeout, call_timeout, tls, ca, cert, key)
    return AsyncRedisClient(target, options, timeout, call_timeout, retry)
