"""The HMAC-SHA256 handshake of both sides, as state machines that do no I/O.

The bytes are drawn in :mod:`kvproto.wire`. Whoever owns the socket feeds frames in and sends
what comes out: the server from its event loop (:class:`ServerHandshake`), the blocking client
and an asyncio client alike (:class:`ClientHandshake`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

from kvproto.errors import AuthError, ProtocolError
from kvproto.wire import CHALLENGE, FAILURE, HELLO, NONCE_SIZE, VERSION, WELCOME, WIRE_VERSION

__all__ = ["ClientHandshake", "ServerHandshake", "client_response", "client_verify_welcome"]

_MAC_SIZE: Final = 32
_VERSION_SIZE: Final = 2
_CLIENT_LABEL: Final = b"kv-client"
_SERVER_LABEL: Final = b"kv-server"


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


# -- client side ---------------------------------------------------------------------------


def client_response(key: bytes, challenge: bytes) -> tuple[bytes, bytes]:
    """Answer the server's challenge frame.

    Returns:
        ``(response frame payload, client nonce)``.

    Raises:
        ProtocolError: the frame is not a kvmanager challenge (another service on that port).
    """
    if not challenge.startswith(CHALLENGE) or len(challenge) != len(CHALLENGE) + NONCE_SIZE:
        raise ProtocolError("the server did not send a kvmanager challenge; is it kvserve?")
    nonce_s = challenge[len(CHALLENGE) :]
    # os.urandom is what secrets.token_bytes returns; secrets itself costs kvctl ~1 ms.
    nonce_c = os.urandom(NONCE_SIZE)
    response = (
        _mac(key, _CLIENT_LABEL, nonce_s) + nonce_c + WIRE_VERSION.to_bytes(_VERSION_SIZE, "big")
    )
    return response, nonce_c


def client_verify_welcome(key: bytes, frame: bytes, challenge: bytes, nonce_c: bytes) -> None:
    """Check the server's last handshake frame.

    Raises:
        AuthError: the server rejected our key, or could not prove it knows it.
        ProtocolError: the server speaks another wire version, or sent something else.
    """
    nonce_s = challenge[len(CHALLENGE) :]
    if frame == FAILURE:
        raise AuthError("the server rejected the authkey; check that both sides use the same key")
    if frame.startswith(VERSION) and len(frame) == len(VERSION) + _VERSION_SIZE:
        theirs = int.from_bytes(frame[len(VERSION) :], "big")
        raise ProtocolError(
            f"wire version mismatch: server speaks {theirs}, this client {WIRE_VERSION}; "
            "install matching kvmanager versions"
        )
    expected_len = len(WELCOME) + _MAC_SIZE + _VERSION_SIZE
    if not frame.startswith(WELCOME) or len(frame) != expected_len:
        raise ProtocolError("unexpected handshake reply from the server")
    mac = frame[len(WELCOME) : len(WELCOME) + _MAC_SIZE]
    if not hmac.compare_digest(mac, _mac(key, _SERVER_LABEL, nonce_c, nonce_s)):
        raise AuthError("the server could not prove it knows the authkey")
    theirs = int.from_bytes(frame[-_VERSION_SIZE:], "big")
    if theirs != WIRE_VERSION:
        raise ProtocolError(
            f"wire version mismatch: server speaks {theirs}, this client {WIRE_VERSION}"
        )


class ClientHandshake:
    """The client half of one connection's handshake, driven by whoever owns the socket.

    Usage: send :data:`HELLO` (:attr:`hello`) at once; feed the server's first frame to
    :meth:`on_challenge` and send what it returns; feed the second to :meth:`on_welcome`,
    which returns when the connection is authenticated and raises otherwise.

    Args:
        key: the authkey.
    """

    __slots__ = ("_challenge", "_key", "_nonce")

    hello: Final = HELLO

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._challenge = b""
        self._nonce = b""

    def on_challenge(self, frame: bytes) -> bytes:
        """Take the server's challenge; return the response frame payload to send.

        Raises:
            ProtocolError: the frame is not a kvmanager challenge (another service).
        """
        response, self._nonce = client_response(self._key, frame)
        self._challenge = frame
        return response

    def on_welcome(self, frame: bytes) -> None:
        """Take the server's last frame.

        Raises:
            AuthError: the server rejected the key, or could not prove it knows it.
            ProtocolError: another wire version, or something else entirely.
        """
        client_verify_welcome(self._key, frame, self._challenge, self._nonce)


# -- server side ---------------------------------------------------------------------------


class ServerHandshake:
    """The server half of one connection's handshake, driven by whoever owns the socket.

    Usage: send :attr:`challenge`; feed each client frame to :meth:`answer` and send what it
    returns (None for the client's HELLO: nothing to send); the connection is authenticated
    iff :attr:`ok` is then True.

    Args:
        keys: acceptable authkeys, in order; :attr:`key_index` tells which one matched.
    """

    __slots__ = ("challenge", "got_hello", "key_index", "keys", "ok", "reason")

    RESPONSE_SIZE: Final = _MAC_SIZE + NONCE_SIZE + _VERSION_SIZE

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys
        self.challenge = CHALLENGE + os.urandom(NONCE_SIZE)
        self.ok = False
        self.got_hello = False
        self.key_index = -1
        self.reason = ""

    def answer(self, response: bytes) -> bytes | None:
        """Take the client's next frame; return the frame payload to send back, if any."""
        if not self.got_hello:
            self.got_hello = True
            if response == HELLO:
                return None
            self.reason = "no hello from the client (not a kvmanager client?)"
            return FAILURE
        nonce_s = self.challenge[len(CHALLENGE) :]
        if len(response) != self.RESPONSE_SIZE:
            self.reason = "malformed handshake response"
            return FAILURE
        mac = response[:_MAC_SIZE]
        nonce_c = response[_MAC_SIZE : _MAC_SIZE + NONCE_SIZE]
        version = int.from_bytes(response[-_VERSION_SIZE:], "big")
        for index, key in enumerate(self.keys):
            # compare_digest on every key: the time taken must not reveal which one matched.
            if hmac.compare_digest(mac, _mac(key, _CLIENT_LABEL, nonce_s)):
                self.key_index = index
        if self.key_index < 0:
            self.reason = "wrong authkey"
            return FAILURE
        if version != WIRE_VERSION:
            self.reason = f"client wire version {version}, server {WIRE_VERSION}"
            return VERSION + WIRE_VERSION.to_bytes(_VERSION_SIZE, "big")
        self.ok = True
        key = self.keys[self.key_index]
        return (
            WELCOME
            + _mac(key, _SERVER_LABEL, nonce_c, nonce_s)
            + WIRE_VERSION.to_bytes(_VERSION_SIZE, "big")
        )
