"""Authkey loading and checking, shared by client and server.

Authkey sources, first match wins: an explicit key or file passed by the caller, env
``KV_AUTHKEY`` (the key itself, UTF-8), env ``KV_AUTHKEY_FILE``, then the default file
``~/.config/kvmanager/authkey``, which ``kvserve`` creates on first start (32 random bytes,
mode 0600, directory 0700). The key never appears in argv, logs or error messages.

The one module of :mod:`kvproto` that touches the file system: both ends find their key the
same way, so the rules are written once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from kvproto.errors import AuthError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "DEFAULT_AUTHKEY_FILE",
    "MIN_AUTHKEY_BYTES",
    "AuthkeySource",
    "check_server_key",
    "default_authkey_file",
    "load_authkey",
]

DEFAULT_AUTHKEY_FILE: Final = "~/.config/kvmanager/authkey"


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
