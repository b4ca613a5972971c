"""TLS contexts for both ends, with safe defaults (TLS 1.2+, verification on).

Built from PEM files the caller names; which files a client uses (arguments, then ``KV_TLS_*``)
is decided by ``kvclient.tls``.

The client verifies the server's certificate and host name by default; ``ca`` names the CA
file to trust instead of the system store. The server can require client certificates signed
by a CA (mutual TLS). The authkey handshake still runs inside the TLS session, so a client
needs both a trusted certificate (under mTLS) and the key.
"""

from __future__ import annotations

import os
import ssl

from kvproto.errors import TLSError

__all__ = ["client_context", "server_context"]


def _load(action: str, path: str | os.PathLike[str], call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except FileNotFoundError:
        raise TLSError(f"cannot {action}: {path} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"cannot {action} from {path} ({exc})") from None


def client_context(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Return a client context: verify the server against ``ca`` (default: the system CAs).

    Args:
        ca: PEM file of the CA(s) to trust for the server certificate.
        cert: PEM client certificate, for servers that require one (mutual TLS).
        key: its private key (default: inside ``cert``).

    Raises:
        TLSError: a file is missing or unreadable.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load("load the CA", ca, lambda: ctx.load_verify_locations(cafile=ca))
    if cert is not None:
        try:
            _load("load the client certificate", cert, lambda: ctx.load_cert_chain(cert, key))
        except TLSError as exc:
            if key is None and "PEM lib" in str(exc):
                raise TLSError(
                    f"no private key found with the client certificate {cert}; pass key= "
                    "(or KV_TLS_KEY) naming its key file"
                ) from None
            raise
    return ctx


def server_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str] | None = None,
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Return a server context; with ``client_ca``, clients must present a certificate it signed.

    Raises:
        TLSError: a file is missing, unreadable, or the key does not match the certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("load the server certificate", cert, lambda: ctx.load_cert_chain(cert, key))
    if client_ca is not None:
        _load("load the client CA", client_ca, lambda: ctx.load_verify_locations(cafile=client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
