"""The client of the Valkey/Redis backend: :func:`connect_redis` and :class:`RedisClient`.

:class:`RedisClient` is a :class:`~kvclient.client.Client` (every method that names a
container, batches, proxies and flows are the same code) whose calls are made by a
:class:`~kvclient._redis._backend.RedisBackend` instead of kvserve's socket backend.
"""

from __future__ import annotations

import builtins
import os
import ssl
import weakref
from collections.abc import Callable
from multiprocessing import context as mp_context
from typing import Any

from kvclient._leases import LeaseKeeper
from kvclient.client import Client
from kvclient.proxies import to_ref
from kvclient.retry import Retry
from kvproto.address import RedisTarget, parse_redis_url
from kvproto.errors import KVConnectionError

__all__ = ["RedisClient", "connect_redis", "import_error", "redis_settings", "settle"]

_CLIENTS: weakref.WeakSet[RedisClient] = weakref.WeakSet()


def import_error() -> ImportError:
    return ImportError(
        "redis:// addresses need redis-py: pip install 'kvmanager[redis]' (or redis hiredis)"
    )


def connect_redis(
    address: str | RedisTarget,
    timeout: float | None = 10.0,
    *,
    call_timeout: float | None = 30.0,
    retry: Retry | None = None,
    tls: bool | ssl.SSLContext | None = None,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    durability: str | None = None,
) -> RedisClient:
    """Connect to a Valkey/Redis server or cluster (see :func:`kvclient.connect`).

    Raises:
        ValueError: a malformed address (the message never shows the password).
        KVConnectionError: no node answered.
        AuthError: the credentials were refused.
    """
    target, options = redis_settings(address, timeout, call_timeout, tls, ca, cert, key)
    return RedisClient(target, options, timeout, call_timeout, retry, durability)


def redis_settings(
    address: str | RedisTarget,
    timeout: float | None,
    call_timeout: float | None,
    tls: bool | ssl.SSLContext | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> tuple[RedisTarget, dict[str, Any]]:
    """Return the target and the redis-py client options of a connect (sync or asyncio).

    Raises:
        ValueError: a malformed address, or TLS asked for and refused.
    """
    target = parse_redis_url(address) if isinstance(address, str) else address
    if tls is False and target.tls:
        raise ValueError("the address asks for TLS (rediss://), and tls=False refuses it")
    use_tls = target.tls or bool(tls) or bool(ca or cert)
    options: dict[str, Any] = {
        "socket_timeout": call_timeout,
        "socket_connect_timeout": timeout,
        "username": target.username,
        "password": target.password,
        "db": target.db,
    }
    if use_tls:
        if isinstance(tls, ssl.SSLContext):
            raise ValueError("give ca=, cert= and key= for TLS to Redis, not an SSLContext")
        ca = ca or os.environ.get("KV_TLS_CA") or None
        cert = cert or os.environ.get("KV_TLS_CERT") or None
        key = key or os.environ.get("KV_TLS_KEY") or None
        options.update(
            ssl=True,
            ssl_check_hostname=True,  # redis-py 5 did not by default; kvserve's TLS does
            ssl_ca_certs=None if ca is None else os.fspath(ca),
            ssl_certfile=None if cert is None else os.fspath(cert),
            ssl_keyfile=None if key is None else os.fspath(key),
        )
    return target, options


def settle(
    client: Any,
    target: RedisTarget,
    options: dict[str, Any],
    nodes: Callable[..., Any],
    backend: Callable[..., Any],
    timeout: float | None,
    call_timeout: float | None,
    retry: Retry | None,
    durability: str | None,
) -> None:
    """Make ``client`` (sync or asyncio) a client of ``target``: its attributes and backend.

    The one constructor of both Redis clients (not ``Client.__init__``: that resolves a
    kvserve address and authkey). ``nodes`` and ``backend`` are the classes of the client's
    flavour (:class:`~kvclient._redis._nodes.Nodes` and
    :class:`~kvclient._redis._backend.RedisBackend`, or their asyncio counterparts); the
    caller adds its lease keeper, whose shape differs.
    """
    from kvclient._redis._server import SERVER  # noqa: PLC0415 - needs redis-py
    from kvclient._redis.kinds import KINDS  # noqa: PLC0415

    found = nodes(target.nodes, target.cluster, options)
    client.target = target
    client.durability = durability
    client._options = options
    client.tls = None
    client._authkey = b""
    client.address = found.seeds[0]
    client.endpoint = ("redis-cluster://" if target.cluster else "redis://") + found.endpoint
    client._closed = False
    client._backend = backend(
        found,
        {kind: spec.methods for kind, spec in KINDS.items()},
        SERVER,
        timeout,
        call_timeout,
        retry,
        make_ref=client._make_ref,
        to_ref=to_ref,
        durability=durability,
    )
    client.call = client._backend.call


class RedisClient(Client):
    """A :class:`~kvclient.client.Client` of a Valkey/Redis server or cluster.

    Use :func:`kvclient.connect` with a ``redis://``, ``rediss://`` or ``redis-cluster://``
    address to make one.
    """

    target: RedisTarget
    durability: str | None
    _options: dict[str, Any]

    def __init__(
        self,
        target: RedisTarget,
        options: dict[str, Any],
        timeout: float | None,
        call_timeout: float | None,
        retry: Retry | None,
        durability: str | None = None,
    ) -> None:
        try:
            from kvclient._redis._backend import RedisBackend  # noqa: PLC0415
            from kvclient._redis._nodes import Nodes  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            if exc.name == "redis" or (exc.name or "").startswith("redis."):
                raise import_error() from exc
            raise
        settle(self, target, options, Nodes, RedisBackend, timeout, call_timeout, retry, durability)
        self.leases = LeaseKeeper(self._backend.call, self.endpoint)
        try:
            self.ping()  # fail now, not at the first call, if it is unreachable
        except KVConnectionError:
            self._backend.close()
            raise
        _CLIENTS.add(self)

    def __repr__(self) -> str:
        return f"<kvclient.RedisClient {self.endpoint}{' closed' if self._closed else ''}>"

    def send_batch(
        self, calls: builtins.list[builtins.list[Any]], kinds: builtins.list[str | None]
    ) -> builtins.list[Any]:
        """Make a batch's calls in order, each its own atomic script (errors as values)."""
        backend: Any = self._backend
        result: builtins.list[Any] = backend.batch(calls, kinds)
        return result

    def rebuild_info(self) -> tuple[Callable[..., Client], tuple[Any, ...]]:
        """Pickle as the target; the password only to a child being spawned (as authkeys)."""
        spawning = mp_context.get_spawning_popen() is not None
        target = self.target if spawning else self.target._replace(password=None)
        options = self._options if spawning else None
        return (_rebuild_redis, (target, options, self.timeout, self.durability))


def _rebuild_redis(
    target: RedisTarget,
    options: dict[str, Any] | None,
    timeout: float | None,
    durability: str | None = None,
) -> Client:
    """Return a live client of this process for ``target``, or a new one."""
    for client in list(_CLIENTS):
        if client.target.nodes == target.nodes and not client._closed:
            return client
    if options is None:
        return connect_redis(parse_redis_url(_url(target)), timeout, durability=durability)
    call_timeout = options.get("socket_timeout")
    return RedisClient(target, options, timeout, call_timeout, Retry(), durability)


def _url(target: RedisTarget) -> str:
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.nodes)
    scheme = "redis-cluster" if target.cluster else "redis"
    return f"{scheme}{'s' if target.tls else ''}://{hosts}/{'' if target.cluster else target.db}"
