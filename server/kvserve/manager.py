"""``KVManager``: the ``multiprocessing.managers.BaseManager`` subclass kvserve serves.

It keeps the stdlib shape (a registry of typeids, ``get_server().serve_forever()``,
``start()``, ``connect()``), and changes what is underneath: the ``"msgpack"`` serializer,
get-or-create by name, a lock per container, and the
single-threaded :class:`~kvserve.server.Server` loop.

It is the *server* side only. The stdlib client path (``m.connect(); m.dict("users")``, which
hands out ``AutoProxy`` objects) is not offered: those proxies cannot send slices, do not
support ``with lock:`` and call ``acquire`` without the owner and lease a kvserve lock needs.
:meth:`KVManager.connect` raises and points to :func:`kvclient.connect`, whose proxies behave
like the stdlib's (see the README's table of differences). The typeids are registered without
creation methods for the same reason.
"""

from __future__ import annotations

from multiprocessing import ProcessError, managers
from multiprocessing.context import BaseContext
from typing import Any

from kvproto.address import parse_address
from kvproto.authkey import AuthkeySource, check_server_key, load_authkey
from kvproto.errors import KVError
from kvserve.containers import KINDS
from kvserve.server import Server
from kvserve.sync import SYNC_KINDS

__all__ = ["KVManager"]


class _NoStdlibListener:
    """``listener_client["msgpack"]``'s listener: kvserve serves with its own loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise KVError("serve kvmanager with kvserve.KVManager, not the stdlib Server")


def _no_stdlib_client(address: Any, authkey: bytes | None = None) -> Any:
    """``listener_client["msgpack"]``'s client, as far as the server side needs one.

    ``BaseManager`` calls it only to send a stopping ``start()``-ed server a ``shutdown``
    message, which kvserve does not take; the manager then stops the process itself
    (``shutdown_timeout``). A stdlib client proxy talking msgpack to kvserve is
    ``kvclient``'s business, not the server's.
    """
    raise KVError("KVManager has no stdlib client side; use kvclient.connect()")


def _register_serializer() -> None:
    # BaseManager.__init__ looks the serializer up; keep a real client if kvclient set one.
    managers.listener_client.setdefault(  # type: ignore[attr-defined]
        "msgpack", (_NoStdlibListener, _no_stdlib_client)
    )


# typeshed does not describe BaseManager's internals that a subclass overriding
# get_server() must use; declare what we touch.
_STATE_INITIAL: Any = managers.State.INITIAL  # type: ignore[attr-defined]


class KVManager(managers.BaseManager):
    """A BaseManager serving named, lock-guarded dicts, lists, Namespaces and Queues.

    Args:
        address: ``(host, port)`` or ``"host:port"``; port 0 picks a free port.
        authkey: the shared key, at least 16 bytes; default: the documented search order
            (see :func:`kvclient.auth.load_authkey`), creating the default file if needed.
        serializer: must be ``"msgpack"``.
        ctx: multiprocessing context for :meth:`start`.
        **server_options: passed to :class:`~kvserve.server.Server` by :meth:`get_server`
            (``max_frame``, ``handshake_timeout``, ...).

    Raises:
        AuthError: the key is shorter than 16 bytes (or its file is readable by others).
    """

    _Server = Server
    _state: Any
    _registry: dict[str, Any]
    _address: tuple[str, int]
    _authkey: bytes
    _serializer: str

    def __init__(
        self,
        address: tuple[str, int] | str | None = None,
        authkey: bytes | None = None,
        serializer: str = "msgpack",
        ctx: BaseContext | None = None,
        *,
        shutdown_timeout: float = 1.0,
        **server_options: Any,
    ) -> None:
        _register_serializer()
        source = (
            load_authkey(create=True)
            if authkey is None
            else AuthkeySource(bytes(authkey), "argument")
        )
        # The same rule as the kvserve command: a short key is refused before anything runs.
        check_server_key(source)
        authkey = source.key
        parsed = parse_address(address if address is not None else ("127.0.0.1", 0))
        super().__init__(parsed, authkey, serializer, ctx, shutdown_timeout=shutdown_timeout)
        self._server_options = server_options

    def connect(self) -> None:
        """Refuse: KVManager is the server side. Use :func:`kvclient.connect` as a client.

        Raises:
            NotImplementedError: always, naming the replacement.
        """
        raise NotImplementedError(
            "KVManager.connect() is not supported: KVManager is the server side; connect "
            "with kvclient.connect(address, authkey), whose proxies behave like the stdlib's"
        )

    def get_server(self) -> Server:  # type: ignore[override]
        """Return a bound :class:`Server`; call ``serve_forever()`` on it."""
        if self._state.value != _STATE_INITIAL:
            raise ProcessError("this manager has already started or connected")
        return self._Server(
            self._registry,
            self._address,
            bytes(self._authkey),
            self._serializer,
            **self._server_options,
        )


for _kind, _cls in {**KINDS, **SYNC_KINDS}.items():
    # create_method=False: no m.dict(...) client methods (see the module docstring).
    KVManager.register(
        _kind, callable=_cls, exposed=tuple(sorted(_cls.exposed)), create_method=False
    )
