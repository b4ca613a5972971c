"""``KVManager``: the ``multiprocessing.managers.BaseManager`` subclass kvserve serves.

It keeps the stdlib shape (a registry of typeids, ``get_server().serve_forever()``,
``start()``, ``connect()``), and changes what is underneath: the msgpack serializer registered
by :mod:`kvclient.connection`, get-or-create by name, a lock per container, and the
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

from kvclient.auth import AuthkeySource, check_server_key, load_authkey
from kvclient.connection import parse_address, register_stdlib_serializer
from kvserve.containers import KINDS
from kvserve.server import Server
from kvserve.sync import SYNC_KINDS

__all__ = ["KVManager"]


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
        register_stdlib_serializer()  # BaseManager.__init__ looks the serializer up
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
