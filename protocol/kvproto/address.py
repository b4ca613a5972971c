"""Server addresses: the one parser behind ``connect()``, ``KV_ADDRESS`` and ``kvctl -a``.

Accepted forms
--------------
=====================================  ============================================================
``HOST:PORT``, ``HOST``                a host name or IPv4 address; the port defaults to 50000
``[V6]:PORT``, ``[V6]``, ``V6``        an IPv6 address (brackets are needed to give a port)
``kv://[KEY@]HOST[:PORT]``             the same, as a URL
``kvs://[KEY@]HOST[:PORT]``            TLS to that server (trusting ``ca=`` / ``KV_TLS_CA``, else
                                       the system's CAs)
=====================================  ============================================================

The userinfo part (``KEY@``) names the authkey, never holds it: kvserve has no user accounts,
only shared keys, and a URL shows in ``ps``, shell history and logs. ``KEY`` is either a name,
``[A-Za-z0-9_][A-Za-z0-9._-]*``, meaning the file ``~/.config/kvmanager/KEY.key``, or a path
to a key file: anything containing ``/`` or starting with ``~`` or ``.``
(``kv://~/keys/prod.key@db1:50000``; everything up to the last ``@`` is the userinfo, so the
path needs no percent-encoding, though ``%XX`` is decoded). ``user:password@`` is refused.

``redis://``, ``rediss://`` and ``redis-cluster://`` are reserved for the Valkey/Redis Cluster
backend and refused as not supported yet. Every refusal is an :class:`AddressError` (a
``ValueError``) whose message ends with the forms that are accepted.

This module does no I/O and imports little: ``kvctl``'s fast path uses it too.
"""

from __future__ import annotations

import os
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_PORT",
    "FORMS",
    "AddressError",
    "Target",
    "key_file_for",
    "parse_address",
    "parse_host_port",
    "parse_target",
]

DEFAULT_PORT: Final = 50000
FORMS: Final = "HOST:PORT, [IPv6]:PORT, kv://[KEY@]HOST:PORT or kvs://[KEY@]HOST:PORT"
KEY_DIR: Final = "~/.config/kvmanager"
# Key names: [A-Za-z0-9_][A-Za-z0-9._-]*, checked without re (compiling costs kvctl ~1 ms).
_NAME_FIRST: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_NAME_REST: Final = _NAME_FIRST | {".", "-"}
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_SCHEMES: Final = {"kv": False, "kvs": True}
_LATER: Final = ("redis", "rediss", "redis-cluster", "valkey", "valkeys")


class AddressError(ValueError):
    """An address that is none of the accepted forms; the message says which forms those are."""


class Target(NamedTuple):
    """What an address says: where to connect, whether TLS is asked for, which key file.

    Attributes:
        host: the host name or IP address (IPv6 without brackets).
        port: the TCP port.
        tls: True for ``kvs://``; None leaves TLS to the other options (``ca=``, ``KV_TLS_CA``).
        key_file: the authkey file the URL's userinfo names, expanded; None if it names none.
    """

    host: str
    port: int
    tls: bool | None = None
    key_file: str | None = None


def _fail(address: str, why: str) -> AddressError:
    return AddressError(f"invalid address {address!r}: {why}; write {FORMS}")


def parse_host_port(address: str, *, url: bool = False) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``HOST``, ``[V6]`` or a bare IPv6 address.

    Args:
        address: the text.
        url: it came from a URL's authority, where a bare IPv6 address is not allowed.

    Returns:
        ``(host, port)``; the port defaults to 50000 and an empty host to 127.0.0.1.

    Raises:
        AddressError: a missing ``]``, a port that is not a number in 0..65535.
    """
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise _fail(address, "missing ']'")
        if rest and not rest.startswith(":"):
            raise _fail(address, f"unexpected {rest!r} after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        if url:
            raise _fail(address, "an IPv6 address in a URL needs brackets: kv://[::1]:50000")
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, port_text = text, ""
    if not port_text:
        port = DEFAULT_PORT
    elif port_text.isascii() and port_text.isdigit():
        port = int(port_text)
        if port > 65535:
            raise _fail(address, "port out of range (0..65535)")
    else:
        raise _fail(address, f"port must be a number, not {port_text!r}")
    return host or "127.0.0.1", port


def _unquote(text: str) -> str:
    """Decode ``%XX`` escapes (UTF-8), as ``urllib.parse.unquote`` does, without importing it."""
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        hexdigits = text[i + 1 : i + 3]
        if text[i] == "%" and len(hexdigits) == 2 and _HEX.issuperset(hexdigits):
            out.append(int(hexdigits, 16))
            i += 3
        else:
            out += text[i].encode()
            i += 1
    return out.decode("utf-8", "replace")


def key_file_for(userinfo: str) -> str:
    """Return the authkey file a URL's userinfo names (a name, or a path), expanded.

    Raises:
        AddressError: the userinfo has a password part, or is neither a name nor a path.
    """
    key = _unquote(userinfo)
    if "/" in key or key.startswith(("~", ".")):
        return os.path.expanduser(key)
    if ":" in key:
        raise AddressError(
            "a kv:// URL names the authkey file, and never carries a key or password "
            "(a URL shows in ps and shell history); write kv://NAME@HOST:PORT for "
            f"{KEY_DIR}/NAME.key, or kv://PATH@HOST:PORT"
        )
    if not (key and key[0] in _NAME_FIRST and _NAME_REST.issuperset(key)):
        raise AddressError(
            f"{key!r} before '@' is not a key name (letters, digits, '.', '_', '-') or a path "
            "to a key file"
        )
    return os.path.expanduser(f"{KEY_DIR}/{key}.key")


def parse_target(address: str | tuple[str, int]) -> Target:
    """Parse any accepted address form (see the module docstring) into a :class:`Target`.

    Args:
        address: the text, or a ``(host, port)`` tuple.

    Raises:
        AddressError: the address is none of the accepted forms, or uses a scheme that is not
            supported yet (``redis://`` ...); the message lists the accepted forms.
    """
    if isinstance(address, tuple):
        host, port = address
        return Target(str(host), int(port))
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        if "/" in text or "@" in text:
            raise _fail(address, "not a host and port")
        host, port = parse_host_port(text)
        return Target(host, port)
    scheme = scheme.lower()
    if scheme in _LATER:
        raise AddressError(
            f"{scheme}:// addresses are for the Valkey/Redis Cluster backend, which is not "
            f"supported yet; for kvserve write {FORMS}"
        )
    if scheme not in _SCHEMES:
        raise _fail(address, f"unknown scheme {scheme + '://'!r}")
    userinfo, at, authority = rest.rpartition("@")
    authority = authority.removesuffix("/")
    if "/" in authority or "?" in authority or "#" in authority:
        raise _fail(address, f"a {scheme}:// URL has no path, query or fragment")
    if not authority or authority.startswith(":"):
        raise _fail(address, "no host")
    host, port = parse_host_port(authority, url=True)
    key_file = key_file_for(userinfo) if at else None
    return Target(host, port, _SCHEMES[scheme] or None, key_file)


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """Parse ``"host:port"``, ``"[v6]:port"``, ``"host"``, ``kv://host:port`` or a tuple.

    A URL that asks for TLS (``kvs://``) or names a key file is for ``kvclient.connect()``,
    which applies both.

    Raises:
        AddressError: the address is malformed (the message lists the accepted forms), or is a
            URL carrying TLS or a key file.
    """
    target = parse_target(address)
    if target.tls or target.key_file is not None:
        raise AddressError(
            f"{address!r} asks for TLS or names a key file; pass it to kvclient.connect(), "
            "which applies them"
        )
    return target.host, target.port
