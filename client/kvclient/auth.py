"""Authkey loading and the HMAC-SHA256 handshake computations, shared by client and server.

The handshake messages are drawn in :mod:`kvclient.codec`. This module only computes and checks
them; it does no I/O, so the server can drive it from its event loop and the client from a
blocking socket.

Authkey sources, first match wins: an explicit key or file passed by the caller, env
``KV_AUTHKEY`` (the key itself, UTF-8), env ``KV_AUTHKEY_FILE``, then the default file
``~/.config/kvmanager/authkey``, which ``kvserve`` creates on first start (32 random bytes,
mode 0600, directory 0700). The key never appears in argv, logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING, Final

from kvclient.codec import CHALLENGE, FAILURE, HELLO, NONCE_SIZE, VERSION, WELCOME, WIRE_VERSION
from kvclient.errors import AuthError, ProtocolError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "DEFAULT_AUTHKEY_FILE",
    "MIN_AUTHKEY_BYTES",
    "AuthkeySource",
    "ServerHandshake",
    "check_server_key",
    "client_response",
    "client_verify_welcome",
    "default_authkey_file",
    "load_authkey",
]

DEFAULT_AUTHKEY_FILE: Final = "~/.config/kvmanager/authkey"
_MAC_SIZE: Final = 32
_VERSION_SIZE: Final = 2
_CLIENT_LABEL: Final = b"kv-client"
_SERVER_LABEL: Final = b"kv-server"


def _path(name: str | os.PathLike[str]) -> Path:
    # pathlib costs kvctl about 4 ms to import; a key given by value never needs it.
    from pathlib import Path  # noqa: PLC0415

    return Path(name).expanduser()


def default_authkey_file() -> Path:
    """Return the default authkey path, ``~/.config/kvmanager/authkey``, expanded."""
    return _path(DEFAULT_AUTHKEY_FILE)


class AuthkeySource:
    """Where an authkey came from, for messages that must not show the key itself."""

    def __init__(
        self, key: bytes, origin: str, path: Path | None = None, *, created: bool = False
    ) -> None:
        self.key = key
        self.origin = origin
        self.path = path
        self.created = created

    def __repr__(self) -> str:
        return f"AuthkeySource(origin={self.origin!r})"


def _new_key_command(path: Path) -> str:
    return f"`(umask 077 && head -c 32 /dev/urandom > {path})`"


def _read_key_file(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if path == default_authkey_file():
            hint = "start kvserve once on this host to create it, or copy it from the server host"
        else:
            hint = f"copy it from the server host, or make a new one: {_new_key_command(path)}"
        raise AuthError(f"authkey file {path} does not exist; {hint}") from None
    except OSError as exc:
        raise AuthError(f"cannot read authkey file {path} ({exc.strerror})") from None
    # A trailing newline is what editors and `echo` add; it is never part of a key.
    key = key.rstrip(b"\r\n")
    if not key:
        raise AuthError(f"authkey file {path} is empty")
    return key


def _create_key_file(path: Path) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(32)
    while key.endswith((b"\r", b"\n")):
        # Readers strip a trailing newline (editors add one): a key ending in one would
        # differ from what every reader of the file gets (1 new key in 128).
        key = os.urandom(32)
    # O_EXCL: two servers starting at once must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


MIN_AUTHKEY_BYTES: Final = 16


def check_server_key(source: AuthkeySource) -> None:
    """Refuse a key a server should not run with: short, or in a file others can read.

    Raises:
        AuthError: the key is shorter than 16 bytes, or its file is readable or writable by
            group or others (as ssh refuses such private keys).
    """
    if len(source.key) < MIN_AUTHKEY_BYTES:
        raise AuthError(
            f"the authkey from {source.origin} is {len(source.key)} bytes; use at least "
            f"{MIN_AUTHKEY_BYTES}, e.g. {_new_key_command(source.path or _path('authkey'))}"
        )
    if source.path is not None:
        mode = source.path.stat().st_mode
        if mode & 0o077:
            raise AuthError(
                f"authkey file {source.path} is accessible by group or others (mode "
                f"{mode & 0o777:o}); run `chmod 600 {source.path}`"
            )


def load_authkey(
    authkey: bytes | str | None = None,
    authkey_file: str | os.PathLike[str] | None = None,
    *,
    create: bool = False,
) -> AuthkeySource:
    """Find the authkey, in the documented order.

    Args:
        authkey: the key itself (str is UTF-8 encoded). Wins over everything else.
        authkey_file: a file holding the key. Wins over the environment.
        create: create the default file if nothing else gives a key (the server does this).

    Returns:
        The key and a description of where it came from.

    Raises:
        AuthError: no key could be found or read.
    """
    if authkey is not None:
        key = authkey.encode() if isinstance(authkey, str) else bytes(authkey)
        if not key:
            raise AuthError("the authkey is empty")
        return AuthkeySource(key, "argument")
    if authkey_file is not None:
        path = _path(authkey_file)
        return AuthkeySource(_read_key_file(path), str(path), path)
    env_key = os.environ.get("KV_AUTHKEY")
    if env_key:
        return AuthkeySource(env_key.encode(), "KV_AUTHKEY")
    env_file = os.environ.get("KV_AUTHKEY_FILE")
    if env_file:
        path = _path(env_file)
        return AuthkeySource(_read_key_file(path), str(path), path)
    path = default_authkey_file()
    if create and not path.exists():
        return AuthkeySource(_create_key_file(path), str(path), path, created=True)
    return AuthkeySource(_read_key_file(path), str(path), path)


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
