"""kvclient: read and write a kvserve server's named containers through local-looking proxies.

Quick start::

    import kvclient

    with kvclient.connect("127.0.0.1:50000") as kv:
        hits = kv.dict("hits")
        hits.incr("home")              # atomic on the server
        jobs = kv.queue("jobs")
        jobs.put({"id": 1})

Only msgpack crosses the wire; see :mod:`kvclient.codec` for the format and
:mod:`kvclient.errors` for the exceptions.
"""

from __future__ import annotations

from kvclient._version import __version__
from kvclient.client import Batch, Client, Pending, connect
from kvclient.errors import (
    AuthError,
    KindError,
    KVConnectionError,
    KVError,
    KVTimeoutError,
    NoSuchContainerError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
    TLSError,
)
from kvclient.proxies import DictProxy, ListProxy, NamespaceProxy, Proxy, QueueProxy
from kvclient.sync import (
    ArrayProxy,
    BarrierProxy,
    BoundedSemaphoreProxy,
    ConditionProxy,
    EventProxy,
    LockProxy,
    RawArrayProxy,
    RawValueProxy,
    RLockProxy,
    SemaphoreProxy,
    ValueProxy,
)

__all__ = [
    "ArrayProxy",
    "AuthError",
    "BarrierProxy",
    "Batch",
    "BoundedSemaphoreProxy",
    "Client",
    "ConditionProxy",
    "DictProxy",
    "EventProxy",
    "KVConnectionError",
    "KVError",
    "KVTimeoutError",
    "KindError",
    "ListProxy",
    "LockProxy",
    "NamespaceProxy",
    "NoSuchContainerError",
    "Pending",
    "ProtocolError",
    "Proxy",
    "QueueProxy",
    "RLockProxy",
    "RawArrayProxy",
    "RawValueProxy",
    "ReadOnlyError",
    "RemoteError",
    "SemaphoreProxy",
    "TLSError",
    "ValueProxy",
    "__version__",
    "connect",
]
