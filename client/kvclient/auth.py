"""Authkey loading, under the name kvclient has always exported (see :mod:`kvproto.authkey`)."""

from __future__ import annotations

from kvproto.authkey import (
    DEFAULT_AUTHKEY_FILE,
    MIN_AUTHKEY_BYTES,
    AuthkeySource,
    check_server_key,
    default_authkey_file,
    load_authkey,
)

__all__ = [
    "DEFAULT_AUTHKEY_FILE",
    "MIN_AUTHKEY_BYTES",
    "AuthkeySource",
    "check_server_key",
    "default_authkey_file",
    "load_authkey",
]
