"""The server-level calls of the Valkey/Redis backend: create, names, describe, drop, ping, stats.

``names`` and ``describe`` scan every master for meta keys (``kv{*}:m``): they see each
container, but not at one instant across nodes (kvserve's are consistent). ``dump``,
``restore`` and ``slowlog`` are kvserve's (NotSupportedError; ``compact`` a ValueError, as
kvserve's without ``--data-dir``): Redis persists by its own configuration (``appendonly``,
``save``) and is backed up with its own tools.
"""

from __future__ import annotations

from typing import Any, Final

from redis import exceptions as rx

from kvclient._redis._backend import (
    RedisBackend,
    _name_of,
    check_name,
    container_keys,
    server_script,
)
from kvclient._redis._nodes import translate
from kvclient._redis.kinds import KINDS
from kvproto._version import __version__
from kvproto.errors import KindError, NotSupportedError
from kvproto.net import format_address
from kvproto.wire import ERROR, RETURN

__all__ = ["SERVER"]

_META_PATTERN: Final = "kv{*}:m"


def create(backend: RedisBackend, args: list[Any]) -> None:
    """Get or create ``args[1]`` as kind ``args[0]`` with the creation arguments after them."""
    kind, name, *rest = args
    check_name(name)
    spec = KINDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ValueError(f"unknown container kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    ctx = backend.new_call(kind, name, "create")
    check, layout, items = spec.create(ctx, rest)
    reply = backend.evalsha(server_script("create"), ctx.keys, [kind, check, layout, *items])
    status = reply[0]
    if status == b"err":
        raise KindError(
            f"{name!r} already exists as a {reply[2].decode()}, not a {kind}; "
            "use another name or drop it first"
        )
    if status == b"exists" and rest:
        spec.check_existing(reply[1], rest)


def _scan(backend: RedisBackend) -> list[tuple[tuple[str, int], list[bytes], list[str]]]:
    """Return, per master, its meta keys and their kinds."""
    found = []
    for node in backend.nodes.masters():
        client = backend.nodes.client(node)
        try:
            keys = list(client.scan_iter(match=_META_PATTERN, count=1000))
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, "kind")
            kinds = pipe.execute()
        except rx.RedisError as exc:
            backend.nodes.mark_stale()
            raise translate(exc, format_address(*node)) from exc
        pairs = [(k, v.decode()) for k, v in zip(keys, kinds, strict=True) if v is not None]
        found.append((node, [k for k, _ in pairs], [v for _, v in pairs]))
    return found


def names(backend: RedisBackend, args: list[Any]) -> dict[str, str]:
    """Return ``{name: kind}`` for every container on every master."""
    return {
        _name_of(key): kind
        for _node, keys, kinds in _scan(backend)
        for key, kind in zip(keys, kinds, strict=True)
    }


def describe(backend: RedisBackend, args: list[Any]) -> dict[str, dict[str, Any]]:
    """Return ``{name: {"kind": kind, "size": items held}}`` for every container."""
    out: dict[str, dict[str, Any]] = {}
    for node, keys, kinds in _scan(backend):
        client = backend.nodes.client(node)
        pipe = client.pipeline(transaction=False)
        counted = []
        for key, kind in zip(keys, kinds, strict=True):
            spec = KINDS.get(kind)
            command = None if spec is None else spec.size
            if command is not None:
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    command, key[:-1] + b"d"
                )
            counted.append(command is not None)
        try:
            sizes = iter(pipe.execute())
        except rx.RedisError as exc:
            raise translate(exc, format_address(*node)) from exc
        for key, kind, has_size in zip(keys, kinds, counted, strict=True):
            out[_name_of(key)] = {"kind": kind, "size": int(next(sizes)) if has_size else 1}
    return out


def drop(backend: RedisBackend, args: list[Any]) -> bool:
    """Delete a container and its contents; return whether it existed."""
    (name,) = args
    check_name(name)
    ctx = backend.new_call("dict", name, "drop")
    return bool(backend.evalsha(server_script("drop"), ctx.keys, []))


def batch(backend: RedisBackend, args: list[Any]) -> list[list[Any]]:
    """Make a batch sent as kvserve's server call (the lease keeper's renewals, kvctl).

    Its calls do not say their containers' kinds: each is read from the container's meta
    hash first (a call on a missing container fails as its own result). Answers are tagged as
    kvserve tags them (``RETURN``/``ERROR``).
    """
    (calls,) = args
    if not isinstance(calls, list):
        raise TypeError("batch takes a list of calls")
    kinds: list[str | None] = []
    for call in calls:
        name = call[0] if isinstance(call, list) and call else None
        kind = None
        if isinstance(name, str) and name:
            meta = container_keys(check_name(name))[0]
            found = backend.nodes.execute(meta, "HGET", meta, "kind")
            kind = None if found is None else found.decode()
        kinds.append(kind)
    return [[RETURN if tag == 0 else ERROR, value] for tag, value in backend.batch(calls, kinds)]


def ping(backend: RedisBackend, args: list[Any]) -> None:
    """Make one round trip to every master."""
    for node in backend.nodes.masters():
        backend.nodes.execute(b"", "PING", node=node)


def stats(backend: RedisBackend, args: list[Any]) -> dict[str, Any]:
    """Return facts: version, backend, masters, containers, keys, ops, uptime."""
    described = describe(backend, [])
    ops = clients = 0
    uptime = None
    for node in backend.nodes.masters():
        info = backend.nodes.execute(b"", "INFO", "all", node=node)
        fields: dict[str, Any] = info if isinstance(info, dict) else {}
        ops += int(fields.get("total_commands_processed", 0))
        # Every client of this backend talks to every master (ping at connect): the busiest
        # master's count of connections is the number of clients, give or take other users.
        clients = max(clients, int(fields.get("connected_clients", 0)))
        up = int(fields.get("uptime_in_seconds", 0))
        uptime = up if uptime is None else min(uptime, up)
    return {
        "version": __version__,
        "backend": "redis-cluster" if backend.nodes.cluster else "redis",
        "masters": len(backend.nodes.masters()),
        "uptime": uptime,
        "clients": clients,
        "containers": len(described),
        "keys": sum(entry["size"] for entry in described.values()),
        "ops": ops,
        "persistence": None,
    }


def _kvserve_only(what: str) -> Any:
    def refuse(backend: RedisBackend, args: list[Any]) -> Any:
        raise NotSupportedError(
            f"{what} is kvserve's (kvserve --data-dir); on Valkey/Redis, persistence and "
            "backups are the server's own (appendonly, save, BGSAVE, redis-cli --rdb)"
        )

    return refuse


def _no_compact(backend: RedisBackend, args: list[Any]) -> Any:
    # A ValueError, as kvserve's without --data-dir: there is no log to compact.
    raise ValueError(
        "compact is kvserve's (kvserve --data-dir); on Valkey/Redis, persistence and "
        "backups are the server's own (appendonly, save, BGSAVE, redis-cli --rdb)"
    )


def _no_slowlog(backend: RedisBackend, args: list[Any]) -> Any:
    raise NotSupportedError(
        "slowlog is kvserve's (kvserve --slow-ms); on Valkey/Redis, read the server's own: "
        "redis-cli SLOWLOG GET on each master"
    )


SERVER: Final = {
    "batch": batch,
    "compact": _no_compact,
    "create": create,
    "describe": describe,
    "drop": drop,
    "dump": _kvserve_only("dump"),
    "dump_open": _kvserve_only("dump"),
    "dump_next": _kvserve_only("dump"),
    "dump_close": _kvserve_only("dump"),
    "names": names,
    "ping": ping,
    "restore": _kvserve_only("restore"),
    "restore_part": _kvserve_only("restore"),
    "slowlog": _no_slowlog,
    "stats": stats,
}
"""Server-level method -> handler (a :class:`~kvclient.client.Batch` of the client calls
:meth:`RedisBackend.batch` directly, with its calls' kinds)."""
