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

__all__ = [
    "AuthError",
    "Batch",
    "Client",
    "DictProxy",
    "KVConnectionError",
    "KVError",
    "KVTimeoutError",
    "KindError",
    "ListProxy",
    "NamespaceProxy",
    "NoSuchContainerError",
    "Pending",
    "ProtocolError",
    "Proxy",
    "QueueProxy",
    "ReadOnlyError",
    "RemoteError",
    "TLSError",
    "__version__",
    "connect",
]
