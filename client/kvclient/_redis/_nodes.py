"""Connections to a Valkey/Redis server or cluster: each call straight to its slot's node.

:class:`Nodes` keeps one ``redis.Redis`` (a thread-safe connection pool) per node and, for a
cluster, the slot map read with ``CLUSTER SLOTS``. A call names one key (every key of a
container shares its hash tag, so one slot); :meth:`Nodes.execute` sends it to that slot's
master. ``MOVED`` updates the map and resends at once, ``ASK`` resends once to the node named
with ``ASKING`` before it on the same connection: neither ran the command, so resending applies
nothing twice. Anything else (a connection lost, ``CLUSTERDOWN``, ``READONLY`` from a demoted
master, ``TRYAGAIN`` while a slot migrates, ``NOREPLICAS`` from a master that has
``min-replicas-to-write`` and no replica in sync) is raised translated, for the caller's one
retry loop (:class:`kvclient.retry.Retry`) to decide; the map is re-read before the next
attempt.

redis-py's own retries are off (``Retry(NoBackoff(), 0)``): it would resend a script whose
reply was lost without the request id check, and kvclient's retry is the only loop.

redis-py's ``RedisCluster`` is not used: its per-call cost was measured at about twice a plain
``redis.Redis`` client, and its retry loop cannot be turned into ours.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry as RedisRetry

from kvproto.errors import AuthError, KVConnectionError, KVTimeoutError, TLSError
from kvproto.net import format_address

__all__ = ["SLOTS", "Confirmed", "Nodes", "translate", "waitaof_counts"]

SLOTS: Final = 16384
# Redirections followed for one call before giving up (a map in flux resettles in a few).
_MAX_REDIRECTS: Final = 16
# A master with min-replicas-to-write refusing writes: no replica in sync (yet), retryable.
_NOREPLICAS: Final = "NOREPLICAS "
# Seconds to reach a replica when learning whether it keeps an AOF (it may be unreachable
# from the client's network: it then counts as keeping none).
_PROBE_TIMEOUT: Final = 2.0
# Seconds before a master confirmed with WAIT is asked again whether WAITAOF can confirm it
# (an AOF replica that was starting, resyncing or added since), instead of at every write.
_RELEARN_AFTER: Final = 10.0

log = logging.getLogger(__name__)


class Confirmed(NamedTuple):
    """How a write was confirmed (``durability="replica"``): enough or not, and if not, why."""

    enough: bool
    shortfall: str


def waitaof_counts(master_aof: bool, replica_aofs: int, wanted: int) -> tuple[int, int] | None:
    """Return ``(numlocal, numreplicas)`` for ``WAITAOF``, or None to confirm with ``WAIT``.

    For a master of Redis 7.2+ (or Valkey) with ``master_aof`` and ``replica_aofs`` of its
    replicas keeping an AOF, asked for ``wanted`` replicas. ``WAITAOF`` counts only replicas
    that fsync an AOF: one without never acknowledges, so asking for more replicas than keep
    one would time out on every write that ``WAIT`` confirms (a replica has it, in memory):
    then ``WAIT``. ``numlocal`` is 1 only where the master keeps an AOF (it refuses 1
    otherwise): so a master without one and replicas with one is confirmed by their fsyncs.
    """
    if replica_aofs < wanted:
        return None
    return (1 if master_aof else 0), wanted


class _Learnt(NamedTuple):
    """What :meth:`Nodes._confirmation` learnt of a master, and when (``time.monotonic()``)."""

    # (the master keeps an AOF, how many of its replicas keep one); None: no WAITAOF (< 7.2).
    aof: tuple[bool, int] | None
    at: float

    def counts(self, wanted: int) -> tuple[int, int] | None:
        """:func:`waitaof_counts` for ``wanted`` replicas, None also where no ``WAITAOF``."""
        return None if self.aof is None else waitaof_counts(*self.aof, wanted)


class _Redirect(Exception):
    """Internal: resend to another node."""

    def __init__(self, node: tuple[str, int], asking: bool) -> None:
        super().__init__(node)
        self.node = node
        self.asking = asking


def translate(exc: BaseException, endpoint: str) -> BaseException:
    """Return the kvmanager error for a redis-py error met talking to ``endpoint``.

    The one place redis-py's exceptions become ours: a lost or refused connection and a cluster
    that is failing over are :class:`KVConnectionError` (retryable), a timeout
    :class:`KVTimeoutError`, a refused password :class:`AuthError`. Anything else is returned
    as it is.
    """
    if isinstance(exc, rx.TimeoutError):
        return KVTimeoutError(f"timed out talking to {endpoint}: {exc}")
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return AuthError(f"{endpoint} refused the credentials: {exc}")
    if isinstance(exc, rx.ConnectionError):
        if isinstance(exc.__context__, ssl.SSLError) or "SSL" in str(exc):
            hint = ""
            if "EOF occurred" in str(exc):  # what a server that wants a client cert does
                hint = " (the server closed it: it may require a client certificate, cert=/key=)"
            return TLSError(f"TLS with {endpoint} failed: {exc}{hint}")
        return KVConnectionError(f"lost or could not open the connection to {endpoint}: {exc}")
    if isinstance(exc, rx.ClusterDownError | rx.TryAgainError | rx.ReadOnlyError):
        return KVConnectionError(f"{endpoint} cannot serve the call now ({exc}); retrying helps")
    if isinstance(exc, rx.BusyLoadingError) or _NOREPLICAS in str(exc):
        return KVConnectionError(f"{endpoint} cannot serve the call now ({exc}); retrying helps")
    return exc


class Nodes:
    """The nodes of one server or cluster, and which node serves which slot.

    Args:
        seeds: ``(host, port)`` of the server, or of any nodes of the cluster.
        cluster: route by slot (a Redis Cluster); else every call goes to ``seeds[0]``.
        options: keyword arguments for every ``redis.Redis`` (timeouts, credentials, TLS, db).
    """

    def __init__(
        self, seeds: Sequence[tuple[str, int]], cluster: bool, options: dict[str, Any]
    ) -> None:
        self.seeds = list(seeds)
        self.cluster = cluster
        self.endpoint = ",".join(format_address(*seed) for seed in self.seeds)
        self._options = dict(options, retry=RedisRetry(NoBackoff(), 0), decode_responses=False)
        self._clients: dict[tuple[str, int], redis.Redis] = {}
        self._lock = threading.Lock()
        # slot -> master (host, port); empty until the first refresh.
        self._slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._stale = cluster
        # master -> what it and its replicas keep (see _confirmation): learnt on first use,
        # again while it is confirmed with WAIT (at most every _RELEARN_AFTER s), forgotten
        # when a WAIT or WAITAOF falls short.
        self._aof: dict[tuple[str, int], _Learnt] = {}
        # Replicas that could not be asked whether they keep an AOF, warned of once each.
        self._unreached: set[tuple[str, int]] = set()

    def client(self, node: tuple[str, int]) -> redis.Redis:
        """Return the client (connection pool) of ``node``, making it on first use."""
        found = self._clients.get(node)
        if found is None:
            with self._lock:
                found = self._clients.get(node)
                if found is None:
                    found = redis.Redis(host=node[0], port=node[1], **self._options)
                    self._clients[node] = found
        return found

    def close(self) -> None:
        """Close every connection of every node."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    def reset_after_fork(self) -> None:
        """Forget the parent's connections (without closing them: they are the parent's)."""
        self._clients = {}
        self._lock = threading.Lock()

    # -- the slot map ---------------------------------------------------------------------

    def mark_stale(self) -> None:
        """Re-read the slot map before the next call (after a failure that may be a failover)."""
        if self.cluster:
            self._stale = True

    def refresh(self) -> None:
        """Read the slot map from the first node that answers ``CLUSTER SLOTS``.

        Raises:
            KVConnectionError: no node answered.
            AuthError: a node refused the credentials.
        """
        known = [*self.seeds, *(n for n in self._clients if n not in self.seeds)]
        error: BaseException | None = None
        for node in known:
            try:
                ranges = self.client(node).execute_command(  # type: ignore[no-untyped-call]
                    "CLUSTER SLOTS"
                )
            except rx.RedisError as exc:
                error = translate(exc, format_address(*node))
                if isinstance(error, AuthError):
                    raise error from exc  # every node has the same password: not retryable
                continue
            slots: list[tuple[str, int] | None] = [None] * SLOTS
            for entry in ranges:
                first, last, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                owner = (host or node[0], int(master[1]))
                slots[first : last + 1] = [owner] * (last - first + 1)
            self._slots = slots
            self._stale = False
            return
        raise KVConnectionError(
            f"no node of {self.endpoint} answered CLUSTER SLOTS: {error}"
        ) from error

    def node_for(self, key: bytes) -> tuple[str, int]:
        """Return the master serving ``key``'s slot (reading the map if it is stale)."""
        if not self.cluster:
            return self.seeds[0]
        if self._stale:
            self.refresh()
        node = self._slots[key_slot(key)]
        if node is None:
            self.refresh()
            node = self._slots[key_slot(key)]
            if node is None:
                raise KVConnectionError(
                    f"no node of {self.endpoint} serves slot {key_slot(key)} (cluster down?)"
                )
        return node

    def masters(self) -> list[tuple[str, int]]:
        """Return every master (one node for a standalone server)."""
        if not self.cluster:
            return [self.seeds[0]]
        if self._stale:
            self.refresh()
        return sorted({node for node in self._slots if node is not None})

    # -- calls ------------------------------------------------------------------------------

    def execute(
        self,
        key: bytes,
        *command: Any,
        node: tuple[str, int] | None = None,
        then: tuple[Any, ...] | None = None,
    ) -> Any:
        """Send ``command`` to the master of ``key``'s slot (or to ``node``); return its reply.

        ``then``: a second command sent right after it on the same connection; the reply is
        then ``(first reply, second reply)``. ``("WAIT", n, ms)`` confirms the writes of
        *this* connection (``durability="replica"``): it is sent as ``WAIT`` or, where the
        master and its replicas can answer it, ``WAITAOF`` (see :meth:`_confirmation`), and
        the second reply is then a :class:`Confirmed`.

        Raises:
            KVConnectionError, KVTimeoutError, AuthError, TLSError: see :func:`translate`;
                the slot map is marked stale first.
            redis.exceptions.ResponseError: the command failed (a script error, NOSCRIPT).
        """
        target = node or self.node_for(key)
        asking = False
        for _ in range(_MAX_REDIRECTS):
            try:
                return self._send(target, asking, command, then)
            except _Redirect as redirect:
                target, asking = redirect.node, redirect.asking
        raise KVConnectionError(f"{self.endpoint}: more than {_MAX_REDIRECTS} redirections")

    def _send(
        self,
        target: tuple[str, int],
        asking: bool,
        command: tuple[Any, ...],
        then: tuple[Any, ...] | None = None,
    ) -> Any:
        client = self.client(target)
        confirm = then is not None and then[0] == "WAIT"
        try:
            if then is not None and confirm:
                then = self._confirmation(target, then)
            if asking or then is not None:
                # A pipeline holds one connection for its commands: ASKING applies to the
                # next command on its connection, WAIT to the writes made on it.
                pipe = client.pipeline(transaction=False)
                if asking:
                    pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                if then is not None:
                    pipe.execute_command(*then)  # type: ignore[no-untyped-call]
                replies = pipe.execute()[1 if asking else 0 :]
                if then is None:
                    return replies[0]
                return replies[0], self._confirmed(
                    target, then, replies[1]
                ) if confirm else replies[1]
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        except rx.MovedError as exc:
            slot, host, port = _redirect_target(exc)
            self._slots[slot] = (host or target[0], port)
            self._stale = True  # a slot moved: others may have too
            raise _Redirect((host or target[0], port), asking=False) from None
        except rx.AskError as exc:
            _slot, host, port = _redirect_target(exc)
            raise _Redirect((host or target[0], port), asking=True) from None
        except (
            rx.ClusterDownError,
            rx.TryAgainError,
            rx.ReadOnlyError,
            rx.BusyLoadingError,
        ) as exc:
            self.mark_stale()
            raise translate(exc, format_address(*target)) from exc
        except rx.ResponseError as exc:
            if then is not None and then[0] == "WAITAOF" and "(WAITAOF" in str(exc):
                # Its AOF was turned off, or it was downgraded: learn anew on the retry (the
                # script ran; its request id makes the retry apply nothing twice).
                self._aof.pop(target, None)
                raise KVConnectionError(
                    f"{format_address(*target)} refused WAITAOF ({exc}); retrying helps"
                ) from exc
            if _NOREPLICAS in str(exc):
                raise translate(exc, format_address(*target)) from exc
            raise
        except rx.RedisError as exc:
            self.mark_stale()
            raise translate(exc, format_address(*target)) from exc

    def _confirmation(self, target: tuple[str, int], wait: tuple[Any, ...]) -> tuple[Any, ...]:
        """Return ``WAIT n ms`` as ``WAITAOF local n ms`` where ``target`` can answer it.

        ``WAITAOF`` (Redis 7.2, so every Valkey) confirms that the write is fsynced to the AOF
        of ``n`` replicas (and of the master where it keeps one): what ``WAIT`` confirms (a
        replica has it) and that it survives a restart of those nodes. It is asked for only
        where at least ``n`` replicas keep an AOF (:func:`waitaof_counts`); else ``WAIT``.
        Learnt per master from ``INFO`` (``COMMAND INFO`` of an unknown command breaks
        redis-py's reply parser; Valkey reports the Redis version it is compatible with), and
        its replicas' from their own ``INFO``: the master does not know whether they keep one.
        Learnt again while it gives ``WAIT``, at most every ``_RELEARN_AFTER`` seconds: a
        replica keeping an AOF may not have been online yet (starting, resyncing), or be new.
        """
        wanted = int(wait[1])
        learnt = self._aof.get(target)
        if learnt is None or (
            learnt.counts(wanted) is None and time.monotonic() - learnt.at >= _RELEARN_AFTER
        ):
            learnt = self._aof[target] = self._learn(target)
        counts = learnt.counts(wanted)
        return wait if counts is None else ("WAITAOF", *counts, *wait[2:])

    def _learn(self, target: tuple[str, int]) -> _Learnt:
        """Ask ``target`` (a master) and its replicas what :meth:`_confirmation` needs."""
        node = self.client(target)
        # One section per INFO: Redis before 7.0 refuses several (and has no WAITAOF).
        server = node.info("server")
        version = tuple(int(part) for part in str(server.get("redis_version", "0")).split(".")[:2])
        aof = None
        if version >= (7, 2):
            master_aof = str(node.info("persistence").get("aof_enabled", "0")) == "1"
            aof = master_aof, sum(self.replica_aofs(target))
        return _Learnt(aof, time.monotonic())

    def replica_aofs(self, master: tuple[str, int]) -> list[bool]:
        """Whether each replica in sync with ``master`` keeps an AOF (``appendonly yes``).

        Asked of each replica at the address its master lists, with the client's credentials
        and TLS; one that does not answer within 2 s counts as keeping none (warned of once).
        """
        found = []
        for name, entry in self.client(master).info("replication").items():
            if not (name.startswith("slave") and isinstance(entry, dict)):
                continue
            if entry.get("state") != "online":
                continue
            options = dict(
                self._options, socket_timeout=_PROBE_TIMEOUT, socket_connect_timeout=_PROBE_TIMEOUT
            )
            replica = str(entry["ip"]), int(entry["port"])
            try:
                with redis.Redis(host=replica[0], port=replica[1], **options) as r:
                    aof = str(r.info("persistence").get("aof_enabled", "0")) == "1"
            except rx.RedisError as exc:
                aof = False
                if replica not in self._unreached:
                    self._unreached.add(replica)
                    log.warning(
                        "kvclient: cannot ask replica %s of %s whether it keeps an AOF (%s): "
                        "counted as keeping none; durability='replica' writes there are "
                        "confirmed with WAIT (in memory) unless enough others keep one",
                        format_address(*replica),
                        format_address(*master),
                        exc,
                    )
            found.append(aof)
        return found

    def _confirmed(self, target: tuple[str, int], sent: tuple[Any, ...], reply: Any) -> Confirmed:
        """Whether the reply of the ``WAIT`` or ``WAITAOF`` ``sent`` confirms enough."""
        if sent[0] == "WAITAOF":
            local, replicas = int(reply[0]), int(reply[1])
            if local >= sent[1] and replicas >= sent[2]:
                return Confirmed(True, "")
            # A replica keeping an AOF may be gone, or an AOF turned off: learn anew on the
            # retry (the script ran; its request id makes the retry apply nothing twice).
            self._aof.pop(target, None)
            return Confirmed(
                False,
                f"no replica confirmed it fsynced to its AOF within {sent[3]} ms (WAITAOF "
                f"{sent[1]} {sent[2]} answered {local} local, {replicas} replicas)",
            )
        if int(reply) >= sent[1]:
            return Confirmed(True, "")
        self._aof.pop(target, None)  # replicas may have changed: learn anew on the retry
        return Confirmed(False, f"no replica confirmed it within {sent[2]} ms")


def _redirect_target(exc: rx.ResponseError) -> tuple[int, str, int]:
    """Return ``(slot, host, port)`` of a MOVED or ASK error."""
    slot = int(getattr(exc, "slot_id", 0))
    host = str(getattr(exc, "host", ""))
    port = int(getattr(exc, "port", 0))
    return slot, host, port
