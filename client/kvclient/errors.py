"""kvmanager's exceptions, under their public name (defined in :mod:`kvproto.errors`).

```
KVError
+-- KVConnectionError(KVError, ConnectionError)   unreachable, lost, refused
|   +-- KVTimeoutError(KVConnectionError, TimeoutError)   connect or call timed out
+-- AuthError(KVError)                             authkey rejected (either direction)
+-- ProtocolError(KVError)                         undecodable frame, bad shape, version mismatch
+-- RemoteError(KVError)                           server-side failure: type name + message
+-- KindError(KVError, TypeError)                  a name exists with another container kind
+-- NoSuchContainerError(KVError, LookupError)     the container was dropped
+-- ReadOnlyError(KVError, PermissionError)        a write on a read-only-key connection
+-- TLSError(KVError)                              TLS setup or verification failed
+-- CompactedError(KVError, LookupError)          a watch asked for history no longer kept
+-- NotSupportedError(KVError, NotImplementedError)  this backend lacks the operation
```

What failed while a connection was being set up (TCP, TLS, the authkey handshake) is translated
here, by :func:`translate_handshake_error`, for the blocking and the asyncio connection alike;
socket errors of calls by :func:`translate_os_error`.
"""

from __future__ import annotations

import sys
from typing import Final, Literal

from kvproto.errors import (
    AuthError,
    CompactedError,
    KindError,
    KVConnectionError,
    KVError,
    KVTimeoutError,
    NoSuchContainerError,
    NotSupportedError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
    TLSError,
    translate_os_error,
)

__all__ = [
    "AuthError",
    "CompactedError",
    "KVConnectionError",
    "KVError",
    "KVTimeoutError",
    "KindError",
    "NoSuchContainerError",
    "NotSupportedError",
    "ProtocolError",
    "ReadOnlyError",
    "RemoteError",
    "TLSError",
    "needs_tls_probe",
    "translate_handshake_error",
    "translate_os_error",
]

# The peer closed the connection (a reset, or a clean end where a reply was due).
_CLOSED: Final = (EOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
# Reasons OpenSSL gives when the peer's first bytes are not a TLS record: it answered, but not
# in TLS (as a plain kvserve does: OpenSSL then says WRONG_VERSION_NUMBER, 3.2+ may say
# RECORD_LAYER_FAILURE).
_NOT_TLS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)


def translate_handshake_error(
    exc: BaseException,
    endpoint: str,
    *,
    stage: Literal["tls", "hello"],
    tls: bool,
    expects_tls: bool = False,
) -> KVError:
    """Return the error to raise (``from exc``) for ``exc``, raised while connecting.

    Args:
        exc: what the socket or ssl layer raised (an ``OSError``, ``ssl.SSLError``, ``EOFError``).
        endpoint: ``host:port``, named in the message.
        stage: ``"tls"``, during the TLS handshake; ``"hello"``, during kvmanager's own
            (inside TLS if ``tls``).
        tls: the connection uses TLS.
        expects_tls: a plain connection closed during ``"hello"``, and the server at
            ``endpoint`` answered a TLS ClientHello (see :func:`needs_tls_probe`).

    Returns:
        A :class:`TLSError` where TLS is the cause (the server expects TLS, or did not answer
        it, or refused a certificate), else a :class:`KVConnectionError` (retryable): also
        for a close during the TLS handshake, as kvserve at its --max-connections limit does.
    """
    ssl = sys.modules.get("ssl")  # loaded if an ssl error could be raised (see connection.py)
    closed = isinstance(exc, _CLOSED) or (
        ssl is not None and isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    )
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(
            f"the certificate of {endpoint} was refused ({exc.verify_message}); "
            "check the CA (ca= or KV_TLS_CA), the host name and the certificate dates"
        )
    failed = ssl is not None and isinstance(exc, ssl.SSLError) and not closed
    if stage == "tls":
        if failed and getattr(exc, "reason", None) in _NOT_TLS:
            return TLSError(
                f"server at {endpoint} did not answer TLS ({_reason(exc)}); is it started "
                "with --tls-cert?"
            )
        if closed:
            # Retryable: kvserve at its --max-connections limit closes at accept, before TLS.
            # A server answering in TLS but refusing it says so (an alert, a certificate).
            return KVConnectionError(
                f"server at {endpoint} closed the connection during the TLS handshake "
                f"({_reason(exc)}); is it at its --max-connections limit, or not serving TLS "
                "(--tls-cert)?"
            )
        if failed:
            return TLSError(
                f"TLS handshake with {endpoint} failed ({_reason(exc)}); is kvserve serving "
                "TLS there (--tls-cert)?"
            )
        return translate_os_error(exc, endpoint, "connect to")
    if failed:
        text = str(exc).upper()
        if "CERTIFICATE_REQUIRED" in text or "CERTIFICATE REQUIRED" in text:
            return TLSError(
                f"{endpoint} requires a client certificate; pass cert= and key= "
                "(or KV_TLS_CERT and KV_TLS_KEY)"
            )
        if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
            return TLSError(
                f"{endpoint} refused this client's certificate ({_reason(exc)}); it "
                "must be signed by the CA the server trusts (its --tls-ca)"
            )
    if failed or (closed and tls):
        # A server refusing our certificate may reset the connection before its alert (the
        # "certificate required" one) is read: say so too.
        return TLSError(
            f"TLS session with {endpoint} failed during the handshake ({_reason(exc)}); if "
            "the server requires client certificates (--tls-ca), pass cert= and key= (or "
            "KV_TLS_CERT and KV_TLS_KEY)"
        )
    if closed and expects_tls:
        return TLSError(
            f"server at {endpoint} expects TLS; pass tls=True, or ca= with its CA "
            "(or set KV_TLS_CA; kvctl: --tls-ca)"
        )
    if closed:
        # Retryable: a server at its --max-connections limit does this too (a TLS one
        # then closes the probe as well, so it may still be a TLS server).
        return KVConnectionError(
            f"{endpoint} closed the connection during the handshake (is it kvserve? at its "
            "--max-connections limit?); if it serves TLS, connect with tls=True (or KV_TLS_CA)"
        )
    return translate_os_error(exc, endpoint, "connect to")


def needs_tls_probe(exc: BaseException, tls: bool) -> bool:
    """Whether a plain connection that failed with ``exc`` may have reached a TLS port.

    A TLS server closes a plain connection at its first bytes, and sends nothing a plain
    client could read as the reason: the connection then asks the server whether it answers
    a TLS ClientHello (``kvclient.connection.speaks_tls``) to say which it was.
    """
    return not tls and isinstance(exc, _CLOSED)


def _reason(exc: BaseException) -> str:
    # asyncio raises a bare ConnectionResetError() for a reset during its TLS handshake.
    reason = str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
    return reason or type(exc).__name__
