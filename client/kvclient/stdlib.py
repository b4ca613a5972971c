"""Integration with ``multiprocessing.managers``: the ``"msgpack"`` serializer, by explicit call.

:func:`register` adds ``"msgpack"`` to ``multiprocessing.managers.listener_client``, so a
stdlib ``BaseManager(address, authkey, serializer="msgpack")`` and its stdlib proxies talk to
kvserve over kvmanager's wire (msgpack frames, its handshake) instead of pickles::

    import kvclient.stdlib
    kvclient.stdlib.register()

Importing this module changes nothing; only :func:`register` does. That is also why it is a
module of its own: ``multiprocessing.managers`` costs about 40 ms to import, which neither
``import kvclient`` nor a ``kvctl`` call should pay.
"""

from __future__ import annotations

from typing import Any

from kvclient.connection import Connection
from kvproto.address import parse_address
from kvproto.authkey import load_authkey
from kvproto.errors import KVError

__all__ = ["register"]


def _stdlib_client(address: Any, authkey: bytes | None = None) -> Connection:
    key = load_authkey(bytes(authkey) if authkey else None).key
    conn = Connection(parse_address(address), key)
    conn.timeout = None  # stdlib proxies have no call timeout; keep their semantics
    return conn


class _StdlibListener:
    """Placeholder so ``listener_client["msgpack"]`` is a pair; kvserve has its own loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise KVError("serve kvmanager with kvserve.KVManager, not the stdlib Server")


def register() -> None:
    """Register ``"msgpack"`` in ``multiprocessing.managers.listener_client`` (idempotent).

    It replaces the server-only entry ``kvserve.KVManager`` makes, so a process that both
    serves and connects gets a working client side.
    """
    from multiprocessing import managers  # noqa: PLC0415 - 40 ms; only stdlib-manager users pay

    managers.listener_client["msgpack"] = (_StdlibListener, _stdlib_client)  # type: ignore[attr-defined]
