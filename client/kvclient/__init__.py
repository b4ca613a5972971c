"""kvclient: read and write a kvserve server's named containers through local-looking proxies.

Quick start::

    import kvclient

    with kvclient.connect("127.0.0.1:50000") as kv:
        hits = kv.dict("hits")
        hits.incr("home")              # atomic on the server
        jobs = kv.queue("jobs")
        jobs.put({"id": 1})

Only msgpack crosses the wire; see :mod:`kvproto.wire` for the format and
:mod:`kvclient.errors` for the exceptions.

Attributes are imported on first use (PEP 562), so ``import kvclient`` and the modules that
only need a part of it, such as ``kvctl``'s fast path, do not pay for the whole client.
"""

from __future__ import annotations

import typing
from typing import Any

from kvproto._version import __version__

if typing.TYPE_CHECKING:
    from kvclient._watch import Event, Watch
    from kvclient.client import Batch, Client, Pending, connect
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
    )

# Which module defines each public name; read by __getattr__ below.
_WHERE: dict[str, str] = {
    "ArrayProxy": "kvclient.sync",
    "AuthError": "kvclient.errors",
    "BarrierProxy": "kvclient.sync",
    "Batch": "kvclient.client",
    "BoundedSemaphoreProxy": "kvclient.sync",
    "Client": "kvclient.client",
    "CompactedError": "kvclient.errors",
    "ConditionProxy": "kvclient.sync",
    "DictProxy": "kvclient.proxies",
    "Event": "kvclient._watch",
    "EventProxy": "kvclient.sync",
    "KVConnectionError": "kvclient.errors",
    "KVError": "kvclient.errors",
    "KVTimeoutError": "kvclient.errors",
    "KindError": "kvclient.errors",
    "ListProxy": "kvclient.proxies",
    "LockProxy": "kvclient.sync",
    "NamespaceProxy": "kvclient.proxies",
    "NoSuchContainerError": "kvclient.errors",
    "NotSupportedError": "kvclient.errors",
    "Pending": "kvclient.client",
    "ProtocolError": "kvclient.errors",
    "Proxy": "kvclient.proxies",
    "QueueProxy": "kvclient.proxies",
    "RLockProxy": "kvclient.sync",
    "RawArrayProxy": "kvclient.sync",
    "RawValueProxy": "kvclient.sync",
    "ReadOnlyError": "kvclient.errors",
    "RemoteError": "kvclient.errors",
    "SemaphoreProxy": "kvclient.sync",
    "TLSError": "kvclient.errors",
    "ValueProxy": "kvclient.sync",
    "Watch": "kvclient._watch",
    "connect": "kvclient.client",
}

__all__ = [
    "ArrayProxy",
    "AuthError",
    "BarrierProxy",
    "Batch",
    "BoundedSemaphoreProxy",
    "Client",
    "CompactedError",
    "ConditionProxy",
    "DictProxy",
    "Event",
    "EventProxy",
    "KVConnectionError",
    "KVError",
    "KVTimeoutError",
    "KindError",
    "ListProxy",
    "LockProxy",
    "NamespaceProxy",
    "NoSuchContainerError",
    "NotSupportedError",
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
    "Watch",
    "__version__",
    "connect",
]


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` on first use, and keep the value here."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvclient' has no attribute {name!r}")
    from importlib import import_module  # noqa: PLC0415 - only on first use of a name

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
