"""Whether and how a client uses TLS: arguments first, then the ``KV_TLS_*`` variables.

The contexts themselves are built by :mod:`kvproto.tls`, which the server shares.
"""

from __future__ import annotations

import os
import ssl

from kvproto.tls import client_context, server_context

__all__ = ["client_context", "resolve_client_tls", "server_context"]


def resolve_client_tls(
    tls: bool | ssl.SSLContext | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> ssl.SSLContext | None:
    """Decide whether and how a client uses TLS, from arguments then ``KV_TLS_*`` variables.

    ``tls=None`` means: TLS if any of ``ca``/``cert``/``key`` or ``KV_TLS_CA``/``KV_TLS_CERT``
    is given. ``tls=False`` never uses TLS; ``tls=True`` uses it with the system CAs unless a CA
    is given; an ``SSLContext`` is used as it is.
    """
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is False:
        return None
    ca = ca or os.environ.get("KV_TLS_CA") or None
    cert = cert or os.environ.get("KV_TLS_CERT") or None
    key = key or os.environ.get("KV_TLS_KEY") or None
    if tls is None and ca is None and cert is None:
        return None
    return client_context(ca, cert, key)
