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
"""

from __future__ import annotations

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
    "translate_os_error",
]
