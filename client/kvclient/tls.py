"""Whether and how a client uses TLS: arguments first, then the ``KV_TLS_*`` variables.

The contexts themselves are built by :mod:`kvproto.tls`, which the server shares. ``ssl`` is
imported only when TLS is used: it costs a client without TLS (``kvctl``, every call) ~5 ms.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

__all__ = ["resolve_client_tls"]


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
    if tls is False:
        return None
    if tls is not None and tls is not True:
        return tls  # an SSLContext, used as it is
    ca = ca or os.environ.get("KV_TLS_CA") or None
    cert = cert or os.environ.get("KV_TLS_CERT") or None
    key = key or os.environ.get("KV_TLS_KEY") or None
    if tls is None and ca is None and cert is None:
        return None
    from kvproto.tls import client_context  # noqa: PLC0415 - ssl, only for TLS

    return client_context(ca, cert, key)
