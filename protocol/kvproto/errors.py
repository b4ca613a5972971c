"""The one exception tree of kvmanager, and the one place lower-level errors are translated.

Shared by client and server (``kvclient.errors`` is this module under its public name).

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

Errors a local container would raise (``KeyError``, ``IndexError``, ``ValueError``,
``TypeError``, ``AttributeError``, ``queue.Empty``, ``queue.Full``, ...) cross the wire as
themselves, so ``d["missing"]`` raises ``KeyError`` on the client exactly as a local dict would.

Raw socket errors are translated only by :func:`translate_os_error`; nothing else in the
package catches ``OSError`` to re-raise it. Messages start lowercase, name the endpoint, and give
the fix when it is obvious. They never contain the authkey.
"""

from __future__ import annotations

import errno
import socket

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
    "release_error",
    "translate_os_error",
]


class KVError(Exception):
    """Base class of every error kvmanager raises on its own account."""


class KVConnectionError(KVError, ConnectionError):
    """The server could not be reached, refused us, or the connection was lost."""


class KVTimeoutError(KVConnectionError, TimeoutError):
    """Connecting, the handshake or a call did not finish within its timeout."""


class AuthError(KVError):
    """The authkey was rejected, or the server could not prove it knows the key."""


class ProtocolError(KVError):
    """A peer sent something that is not kvmanager's wire protocol, or another version of it."""


class RemoteError(KVError):
    """The server failed in a way that has no local equivalent.

    Attributes:
        type_name: name of the exception type raised on the server.
        message: its message. No traceback ever crosses the wire.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str]]:
        return (type(self), (self.type_name, self.message))


class KindError(KVError, TypeError):
    """A container name is already used by a container of another kind."""


class NoSuchContainerError(KVError, LookupError):
    """A proxy names a container that no longer exists (it was dropped)."""


class ReadOnlyError(KVError, PermissionError):
    """The connection authenticated with the read-only key, and the call would change data."""


class TLSError(KVError):
    """TLS could not be set up: a certificate was refused, or one side does not speak TLS.

    Not a :class:`KVConnectionError`: retrying cannot fix a certificate.
    """


class CompactedError(KVError, LookupError):
    """A watch asked to resume from a revision the server no longer keeps the history of.

    Raised too when the revision is ahead of the container's (it was dropped and created
    again, or the server lost unsynced writes). Either way: re-read the container, then watch
    again from :attr:`revision` (or from ``since=None``).

    Attributes:
        oldest: the oldest ``since`` the server can still resume from.
        revision: the container's current revision.
    """

    def __init__(self, message: str = "", oldest: int = 0, revision: int = 0) -> None:
        super().__init__(message, oldest, revision)
        self.oldest = oldest
        self.revision = revision

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotSupportedError(KVError, NotImplementedError):
    """The backend serving this container does not offer the operation (say, watch or TTL)."""


_HINTS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.EPIPE: "connection closed by peer",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EADDRNOTAVAIL: "address not available",
}


def translate_os_error(exc: BaseException, endpoint: str, action: str) -> KVConnectionError:
    """Map a socket-level exception to the kvmanager error a user should see.

    Args:
        exc: the exception raised by the socket layer (``OSError``, ``EOFError``, ...).
        endpoint: ``host:port`` to name in the message.
        action: what was being done, e.g. ``"connect to"`` or ``"call"``.

    Returns:
        A :class:`KVConnectionError` (or :class:`KVTimeoutError`) to raise ``from exc``.
    """
    # BlockingIOError on a blocking socket means SO_RCVTIMEO/SO_SNDTIMEO ran out.
    if isinstance(exc, TimeoutError | socket.timeout | BlockingIOError):
        return KVTimeoutError(f"timed out trying to {action} {endpoint}")
    if isinstance(exc, socket.gaierror):
        return KVConnectionError(
            f"could not resolve {endpoint} ({exc.strerror}); check the host name"
        )
    if isinstance(exc, EOFError):
        return KVConnectionError(
            f"connection to {endpoint} closed by the server during {action}; "
            "did kvserve stop or restart?"
        )
    reason = None
    if isinstance(exc, OSError):
        reason = _HINTS.get(exc.errno or 0) or exc.strerror
    reason = reason or type(exc).__name__
    hint = ""
    if action.startswith("connect"):
        errno_ = exc.errno if isinstance(exc, OSError) else None
        if errno_ in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            hint = "; check the network path to that host"
        elif errno_ == errno.ECONNREFUSED:
            hint = (
                "; is kvserve running? (for other hosts it must listen on them: "
                "kvserve --host 0.0.0.0)"
            )
        else:
            hint = "; is kvserve running?"
    return KVConnectionError(f"could not {action} {endpoint} ({reason}){hint}")


def release_error(what: str, why: str | None) -> RuntimeError:
    """Return the error of a release by an owner that holds nothing (every backend's words).

    Args:
        what: what was released ("lock", "condition lock", "semaphore slot", ...).
        why: "released" (another owner released what it held), "expired" (its lease ran
            out), or None (it never held it).
    """
    if why == "released":
        return RuntimeError(
            f"cannot release {what}: another client released what this client held "
            "(as threading lets any thread release a Lock); it is not held by this client"
        )
    if why:
        return RuntimeError(
            f"cannot release {what}: this client's lease on it expired, and the server "
            "released it (the client stalled or lost its connection for longer than the "
            "lease); another holder may have used the resource since"
        )
    return RuntimeError(f"cannot release {what}: this client does not hold it")
