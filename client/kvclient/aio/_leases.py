"""The asyncio lease keeper: the same bookkeeping as the thread's, renewed by a task.

:class:`AsyncLeaseKeeper` is a :class:`kvclient._leases.LeaseKeeper` whose renewer is a task
on the client's event loop instead of a daemon thread: it runs the same rounds
(``_next_round``, ``_settle``), awaiting its sleep and its one batch call per round. Owners
that ``threading`` gives each thread (RLock, Condition) are given each *task* here, so two
tasks of one client are two holders, as two threads of a sync client are; called outside a
task (another thread), the thread's owner is used, as the sync keeper does.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from kvclient._leases import LeaseKeeper

__all__ = ["AsyncLeaseKeeper"]


class _LoopWake:
    """``threading.Event``'s ``set``/``clear`` for a task on ``loop``, callable from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()

    def set(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.event.set()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.event.set)

    def clear(self) -> None:
        self.event.clear()


class AsyncLeaseKeeper(LeaseKeeper):
    """Owner ids and lease renewal for one asyncio client (renewed by a task).

    Args:
        call: the client's coroutine call (the renewal task's only I/O).
        endpoint: the server's ``host:port``, for log messages.
        loop: the client's event loop, where the renewal task runs.
    """

    def __init__(
        self,
        call: Callable[[str | None, str | None, str, list[Any]], Awaitable[Any]],
        endpoint: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._loop = loop
        self._acall = call
        self._task_suffix: weakref.WeakKeyDictionary[asyncio.Task[Any], bytes] = (
            weakref.WeakKeyDictionary()
        )
        self._task: asyncio.Task[None] | None = None
        super().__init__(self._no_sync_call, endpoint)

    @staticmethod
    def _no_sync_call(kind: str | None, ident: str | None, method: str, args: list[Any]) -> Any:
        raise RuntimeError("an asyncio keeper renews from its task, never from a thread")

    def _reset(self) -> None:
        super()._reset()
        self._wake = _LoopWake(self._loop)  # type: ignore[assignment]

    def thread_owner(self) -> bytes:
        """Return this task's owner id (the client's plus 4 bytes), else this thread's."""
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is None:
            return super().thread_owner()
        suffix = self._task_suffix.get(task)
        if suffix is None:
            suffix = self._task_suffix[task] = secrets.token_bytes(4)
        return self.owner + suffix

    def _start_renewer(self) -> object:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._spawn()
        else:
            self._loop.call_soon_threadsafe(self._spawn)
        return self  # a marker: "running"; the task itself is self._task

    def _spawn(self) -> None:
        self._task = self._loop.create_task(
            self._renew_task(), name=f"kvclient-renew {self.endpoint}"
        )

    async def _renew_task(self) -> None:
        """Renew every tracked hold every ``lease / 3`` seconds until nothing is held."""
        last = time.monotonic()
        lock: threading.Lock = self._lock
        wake: _LoopWake = self._wake  # type: ignore[assignment]
        while True:
            step = self._next_round(lock, last)
            if step is None:
                return
            due, batch = step
            if due > 0:
                try:
                    async with asyncio.timeout(due):
                        await wake.event.wait()
                except TimeoutError:
                    pass
                wake.clear()
                continue
            last = time.monotonic()
            calls = self._renewals(batch)
            try:
                replies = await self._acall(None, None, "batch", [calls])
            except Exception as exc:
                self._failed(len(calls), exc)
                continue
            self._settle(batch, replies)

    async def aclose(self) -> None:
        """Stop renewing now: the task is cancelled; holds then expire one lease later."""
        self.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
