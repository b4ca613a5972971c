"""kvclient.aio: the asyncio client, with the sync client's API and awaitable methods.

Quick start::

    import kvclient.aio

    async with kvclient.aio.connect("127.0.0.1:50000") as kv:
        hits = await kv.dict("hits")
        await hits.incr("home")
        await hits.set("last", "home")       # d[k] = v cannot be awaited: set()
        jobs = await kv.queue("jobs")
        job = await jobs.get(timeout=5)
        async with kv.lock("deploy") as token:
            ...

Same arguments, environment variables, authkey search, TLS options, Retry policy and errors
as :func:`kvclient.connect`. What differs, and why, is in :mod:`kvclient.aio.proxies` (the
dunders that cannot be awaited) and :mod:`kvclient.aio._backend` (the connection pool, and
what cancelling a call does).

Leases are renewed by a task on the client's loop: a loop blocked for longer than a lease
(a blocking call, a CPU-bound step) stops the renewals, and the server releases the lock as it
does for a stalled process; ``release()`` then raises ``RuntimeError``.
"""

from __future__ import annotations

from kvclient.aio.client import Batch, Client, Pending, connect
from kvclient.aio.proxies import (
    AsyncArrayProxy,
    AsyncBarrierProxy,
    AsyncBoundedSemaphoreProxy,
    AsyncConditionProxy,
    AsyncDictProxy,
    AsyncEventProxy,
    AsyncListProxy,
    AsyncLockProxy,
    AsyncNamespaceProxy,
    AsyncQueueProxy,
    AsyncRawArrayProxy,
    AsyncRawValueProxy,
    AsyncRLockProxy,
    AsyncSemaphoreProxy,
    AsyncValueProxy,
)

__all__ = [
    "AsyncArrayProxy",
    "AsyncBarrierProxy",
    "AsyncBoundedSemaphoreProxy",
    "AsyncConditionProxy",
    "AsyncDictProxy",
    "AsyncEventProxy",
    "AsyncListProxy",
    "AsyncLockProxy",
    "AsyncNamespaceProxy",
    "AsyncQueueProxy",
    "AsyncRLockProxy",
    "AsyncRawArrayProxy",
    "AsyncRawValueProxy",
    "AsyncSemaphoreProxy",
    "AsyncValueProxy",
    "Batch",
    "Client",
    "Pending",
    "connect",
]
