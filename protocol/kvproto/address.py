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

Valkey/Redis addresses (the cluster backend, :func:`parse_redis_url`; ``kvclient.connect()``
takes them, ``parse_target`` refuses them):

========================================================  ========================================
``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``            one standalone server (port 6379, db 0)
``rediss://...``                                          the same over TLS
``redis-cluster://[[USER]:PASSWORD@]H1:P1[,H2:P2...]``    a Redis Cluster: any of its nodes as
                                                          seeds (``redis-clusters://``: TLS)
``valkey://``, ``valkeys://``, ``valkey-cluster://``...   the same for Valkey
========================================================  ========================================

Unlike kvserve's shared keys, Redis has user accounts and passwords, so these URLs may carry
them (percent-encoded); the usual environment variables ``REDIS_USERNAME`` and
``REDIS_PASSWORD`` fill in what the URL leaves out, and keep the password out of ``ps``.

Every refusal is an :class:`AddressError` (a ``ValueError``) whose message ends with the
forms that are accepted.

This module does no I/O and imports little: ``kvctl``'s fast path uses it too.
"""

from __future__ import annotations

import os
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_PORT",
    "FORMS",
    "REDIS_FORMS",
    "REDIS_SCHEMES",
    "AddressError",
    "RedisTarget",
    "Target",
    "key_file_for",
    "parse_address",
    "parse_host_port",
    "parse_redis_url",
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
REDIS_SCHEMES: Final[dict[str, tuple[bool, bool]]] = {
    # scheme -> (cluster, tls)
    "redis": (False, False),
    "rediss": (False, True),
    "redis-cluster": (True, False),
    "redis-clusters": (True, True),
    "valkey": (False, False),
    "valkeys": (False, True),
    "valkey-cluster": (True, False),
    "valkey-clusters": (True, True),
}
REDIS_FORMS: Final = (
    "redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or "
    "redis-cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]"
)
REDIS_DEFAULT_PORT: Final = 6379


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
            kvserve's (``redis://`` ...: see :func:`parse_redis_url`); the message lists the
            accepted forms.
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
    if scheme in REDIS_SCHEMES:
        raise AddressError(
            f"{scheme}:// addresses are for the Valkey/Redis backend: give them to "
            f"kvclient.connect(); for kvserve write {FORMS}"
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


class RedisTarget(NamedTuple):
    """What a Valkey/Redis address says (see the module docstring).

    Attributes:
        nodes: ``(host, port)`` of the server, or the cluster's seed nodes.
        cluster: a Redis Cluster (slots routed to their nodes), not one standalone server.
        tls: connect over TLS.
        db: the database number (standalone only; a cluster has only 0).
        username: the ACL user, or None (``default``).
        password: the password, or None.
    """

    nodes: tuple[tuple[str, int], ...]
    cluster: bool
    tls: bool
    db: int = 0
    username: str | None = None
    password: str | None = None


def _redis_fail(address: str, why: str) -> AddressError:
    return AddressError(f"invalid address {_redact(address)!r}: {why}; write {REDIS_FORMS}")


def _redact(address: str) -> str:
    """``address`` with any password replaced by ``***`` (messages never show one)."""
    scheme, sep, rest = address.partition("://")
    userinfo, at, authority = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return address
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{authority}"


def parse_redis_url(
    address: str, environ: dict[str, str] | os._Environ[str] = os.environ
) -> RedisTarget:
    """Parse a Valkey/Redis URL (see the module docstring) into a :class:`RedisTarget`.

    Credentials missing from the URL come from ``REDIS_USERNAME`` and ``REDIS_PASSWORD`` in
    ``environ``.

    Raises:
        AddressError: not one of the Redis forms (the message never shows the password).
    """
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES:
        raise _redis_fail(address, "not a redis://, rediss:// or redis-cluster:// URL")
    cluster, tls = REDIS_SCHEMES[scheme.lower()]
    userinfo, at, authority = rest.rpartition("@")
    authority, _, path = authority.partition("/")
    if "?" in path or "#" in path or "?" in authority or "#" in authority:
        raise _redis_fail(address, "query strings and fragments are not supported")
    db = 0
    if path:
        if not (path.isascii() and path.isdigit()) or int(path) > 1 << 16:
            raise _redis_fail(address, f"the database must be a number, not {path!r}")
        db = int(path)
        if cluster and db:
            raise _redis_fail(address, "a Redis Cluster has only database 0")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = _unquote(user_text) or None
        password = _unquote(password_text) if colon else None
    username = username or environ.get("REDIS_USERNAME") or None
    password = password if password is not None else environ.get("REDIS_PASSWORD") or None
    hosts = authority.split(",")
    if not cluster and len(hosts) > 1:
        raise _redis_fail(address, "several hosts need redis-cluster://")
    nodes = []
    for host_text in hosts:
        if not host_text or host_text.startswith(":"):
            raise _redis_fail(address, "no host")
        try:
            host, port = parse_host_port(host_text, url=True)
        except AddressError as exc:
            raise _redis_fail(address, str(exc).split(": ", 1)[-1].split(";")[0]) from None
        if ":" not in host_text.rpartition("]")[2]:
            port = REDIS_DEFAULT_PORT
        nodes.append((host, port))
    return RedisTarget(tuple(nodes), cluster, tls, db, username, password)
