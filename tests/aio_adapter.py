"""A sync-shaped client backed by the asyncio one, so the conformance suite runs through it.

:class:`SyncOverAsync` is a :class:`kvclient.Client` whose every call and flow is made by a
:class:`kvclient.aio.Client` on an event loop in a thread of its own
(``asyncio.run_coroutine_threadsafe``): connections, the pool, request ids, retries, the
async flow driver and the lease task are all the asyncio client's. The sync proxies and the
sync ``Client`` methods on top only shape the calls, which is what the suite's scenarios are
written against (the tests are not copied). Test support only.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import kvclient
import kvclient.aio
from kvclient._runner import DERIVED, Flow
from kvclient.client import _CLIENTS
from kvclient.proxies import make_proxy
from kvclient.retry import Retry

_T = TypeVar("_T")


class _Bridge:
    """The ``_backend`` of a :class:`SyncOverAsync`: each call run on the loop, awaited."""

    def __init__(self, owner: SyncOverAsync) -> None:
        self.owner = owner

    @property
    def aclient(self) -> kvclient.aio.Client:
        return self.owner.current().aclient

    def wait(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.owner.current().on_loop(coro)

    def call(
        self,
        kind: str | None,
        ident: str | None,
        method: str,
        args: list[Any],
        kwds: dict[str, Any] | None = None,
        timeout: float | bool | None = DERIVED,
    ) -> Any:
        # Made inside the loop: the coroutine belongs to the client of this process.
        owner = self.owner.current()

        async def call() -> Any:
            return await owner.aclient.call(kind, ident, method, args, kwds, timeout)

        return owner.on_loop(call())

    @property
    def timeout(self) -> float | None:
        return self.aclient._backend.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self.aclient._backend.timeout = value

    @property
    def call_timeout(self) -> float | None:
        return self.aclient._backend.call_timeout

    @call_timeout.setter
    def call_timeout(self, value: float | None) -> None:
        self.aclient._backend.call_timeout = value

    @property
    def retry(self) -> Retry | None:
        return self.aclient._backend.retry

    @retry.setter
    def retry(self, value: Retry | None) -> None:
        self.aclient._backend.retry = value


class SyncOverAsync(kvclient.Client):
    """A :class:`kvclient.Client` whose calls the asyncio client makes (see the module)."""

    def __init__(
        self, address: str | None = None, authkey: bytes | str | None = None, **options: Any
    ) -> None:
        # Not Client.__init__: it would open a blocking connection. What the Client methods
        # and the proxies read is set here, from the asyncio client.
        self._args = (address, authkey, options)
        self._pid = os.getpid()
        self._child: SyncOverAsync | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvclient.aio adapter", daemon=True
        )
        self._thread.start()

        async def connect() -> kvclient.aio.Client:
            return await kvclient.aio.connect(address, authkey, **options)

        try:
            aclient = asyncio.run_coroutine_threadsafe(connect(), self._loop).result(60)
        except BaseException:
            self._stop_loop()
            raise
        self.aclient = aclient
        self.tls = aclient.tls
        self.address = aclient.address
        self.endpoint = aclient.endpoint
        self._authkey = aclient._authkey
        self._closed = False
        self._backend = _Bridge(self)  # type: ignore[assignment]
        self.call = self._backend.call
        self.leases = aclient.leases
        # References read back become sync proxies on this adapter (the asyncio client makes
        # asyncio ones, on itself), and pickled proxies find it, as they find a live Client.
        aclient._backend.codec._make_ref = lambda ref: make_proxy(self, ref.kind, ref.name)
        _CLIENTS.add(self)

    def current(self) -> SyncOverAsync:
        """Return the adapter of this process: a forked child gets its own loop and client.

        An event loop (its thread) does not survive fork; as the sync client opens its own
        connections in a child, the child here opens its own asyncio client.
        """
        if self._pid == os.getpid():
            return self
        if self._child is None or self._child._pid != os.getpid():
            address, authkey, options = self._args
            self._child = SyncOverAsync(address, authkey, **options)
            self.leases = self._child.leases
        return self._child

    def rebuild_info(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """Pickle as the asyncio client does (a sync client of its server, kvserve or Redis)."""
        return self.aclient.rebuild_info()

    def run(self, flow: Flow[_T]) -> _T:
        """Run a flow with the asyncio client's driver, on its loop."""
        owner = self.current()

        async def run() -> _T:
            return await owner.aclient.run(flow)

        return owner.on_loop(run())

    def on_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the client's loop; once closed, on a loop of its own.

        A call after close() must meet the asyncio client's own answer (KVError: closed),
        and the loop it ran on is gone by then.
        """
        if self._loop.is_closed():
            return asyncio.run(coro)
        if threading.current_thread() is self._thread:
            # Called from the loop itself (a Condition.wait_for predicate that reads kv through
            # this adapter): waiting here would wait on ourselves for ever.
            coro.close()
            raise RuntimeError(
                "a blocking kvclient call from the asyncio client's own loop (a wait_for "
                "predicate must not call the client)"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C (or any interrupt) of the waiting thread is what cancelling the task is
            # to an asyncio caller: cancel it, so the client withdraws what it parked.
            future.cancel()
            raise

    def close(self) -> None:
        """Close the asyncio client, then stop its loop."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.aclient.close(), self._loop).result(30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


Connect = Callable[..., kvclient.Client]
"""A front end's ``connect(address, authkey, **options)``, returning a (sync-shaped) client."""

FRONT_ENDS: dict[str, Connect] = {
    "sync": kvclient.connect,
    "asyncio": SyncOverAsync,
}
"""The front ends, for tests run through each (the ``connect`` fixture in tests/conftest.py)."""


def connect(address: str, authkey: bytes) -> SyncOverAsync:
    """Connect the asyncio client, with its default options, behind the sync shape."""
    return SyncOverAsync(address, authkey)
