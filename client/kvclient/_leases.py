"""The lease keeper: a client's owner ids, the holds it tracks, and the thread renewing them.

A :class:`LeaseKeeper` belongs to one client (``Client.leases``). Acquiring flows
(:mod:`kvclient._flows`) tell it what this client now holds (:meth:`LeaseKeeper.track`) and
what it gave back (:meth:`LeaseKeeper.untrack`); while anything is tracked one daemon thread
renews every hold every ``lease / 3`` seconds, in one batch call per round, naming the owners
explicitly (the server knows them by the ids chosen here, not by the connection). The thread
exits when nothing is held, and at once when the keeper is closed. After ``fork`` the child's
keepers start afresh with new owner ids: the child holds nothing its parent holds.

The keeper does no I/O of its own beyond that thread's calls, made through the ``call``
function it is given (the socket backend's).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import weakref
from typing import Any, Protocol

from kvproto.wire import RETURN

__all__ = ["LeaseKeeper"]

log = logging.getLogger("kvclient")

_KEEPERS: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()
_fork_hook_registered = False


class _CallFn(Protocol):
    def __call__(
        self, kind: str | None, ident: str | None, method: str, args: list[Any]
    ) -> Any: ...


class _Tracked:
    """One (container, owner) this client may hold something on."""

    __slots__ = ("lease", "token", "version")

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.token = 0
        self.version = 0


class LeaseKeeper:
    """Owner ids and lease renewal for one client.

    Args:
        call: makes one call to the server (used by the renewal thread only).
        endpoint: the server's ``host:port``, for the thread's name and log messages.
    """

    def __init__(self, call: _CallFn, endpoint: str) -> None:
        global _fork_hook_registered  # noqa: PLW0603 - registered once, on first use
        self._call = call
        self.endpoint = endpoint
        self._closed = False
        self._reset()
        _KEEPERS.add(self)
        if not _fork_hook_registered:
            _fork_hook_registered = True
            os.register_at_fork(after_in_child=_after_fork_in_child)

    def _reset(self) -> None:
        # Also the child's state after fork: another thread may have held the lock there.
        self.owner = secrets.token_bytes(8)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tracked: dict[tuple[str, bytes], _Tracked] = {}
        # The renewal thread (an asyncio keeper's: its task), None while nothing is held.
        self._thread: object | None = None
        self._wake = threading.Event()

    @property
    def owner_id(self) -> str:
        """The id (hex) Locks and Semaphores are held under, as ``status()`` shows it.

        RLocks and Conditions are held under it plus 8 hex digits per thread.
        """
        return self.owner.hex()

    @property
    def renewing(self) -> bool:
        """Whether the renewal thread is running (something is held, or being waited for)."""
        return self._thread is not None

    def thread_owner(self) -> bytes:
        """Return this thread's owner id: the client's, plus 4 bytes for the thread."""
        suffix: bytes | None = getattr(self._local, "suffix", None)
        if suffix is None:
            suffix = self._local.suffix = secrets.token_bytes(4)
        return self.owner + suffix

    def track(self, key: tuple[str, bytes], lease: float, token: int) -> None:
        """Renew ``key`` (name, owner) from now on; start the renewal thread if not running."""
        with self._lock:
            tracked = self._tracked.get(key)
            if tracked is None:
                tracked = self._tracked[key] = _Tracked(lease)
            tracked.lease = min(tracked.lease, lease)
            tracked.token = max(tracked.token, token)
            # A release racing with this acquire must not untrack what was just acquired.
            tracked.version += 1
            if self._thread is None:
                self._thread = self._start_renewer()
            else:
                self._wake.set()  # a shorter lease may need an earlier renewal

    def _start_renewer(self) -> object:
        """Start renewing (a daemon thread; kvclient.aio's keeper starts a task instead)."""
        thread = threading.Thread(
            target=self._renew_loop, name=f"kvclient-renew {self.endpoint}", daemon=True
        )
        thread.start()
        return thread

    def version(self, key: tuple[str, bytes]) -> int:
        """Return the version of ``key``'s tracking, to pass to :meth:`untrack` later."""
        with self._lock:
            tracked = self._tracked.get(key)
            return -1 if tracked is None else tracked.version

    def untrack(self, key: tuple[str, bytes], version: int) -> None:
        """Stop renewing ``key``, unless it was tracked again since ``version`` was read."""
        with self._lock:
            tracked = self._tracked.get(key)
            if tracked is not None and tracked.version == version:
                del self._tracked[key]

    def close(self) -> None:
        """Stop renewing now (the thread exits); holds then expire one lease later."""
        self._closed = True
        self._wake.set()

    def _renew_loop(self) -> None:
        """Renew every tracked hold every ``lease / 3`` seconds until nothing is held."""
        last = time.monotonic()
        # The state this thread serves: after fork, _reset() replaces it, and this (parent's)
        # thread does not exist in the child anyway.
        lock, wake = self._lock, self._wake
        while True:
            step = self._next_round(lock, last)
            if step is None:
                return
            due, batch = step
            if due > 0:
                wake.wait(due)
                wake.clear()
                continue
            last = time.monotonic()
            calls = self._renewals(batch)
            try:
                replies = self._call(None, None, "batch", [calls])
            except Exception as exc:
                # Closed: noticed at the top of the loop. Unreachable after the client's own
                # retries: the next round tries again, and the server keeps the holds until
                # their leases run out.
                self._failed(len(calls), exc)
                continue
            self._settle(batch, replies)

    # The steps of one renewal round, shared by the thread above and the asyncio task of
    # kvclient.aio (which awaits its call and its sleep instead of blocking on them).

    def _next_round(
        self, lock: threading.Lock, last: float
    ) -> tuple[float, list[tuple[tuple[str, bytes], int, int]]] | None:
        """Return (seconds until the round is due, what to renew then), or None to stop."""
        batch: list[tuple[tuple[str, bytes], int, int]] = []
        with lock:
            if self._closed or not self._tracked or self._lock is not lock:
                if self._lock is lock:
                    self._thread = None
                    self._stopped()
                return None
            interval = min(t.lease for t in self._tracked.values()) / 3
            due = last + interval - time.monotonic()
            if due <= 0:
                batch = [(key, t.version, t.token) for key, t in self._tracked.items()]
        return due, batch

    def _stopped(self) -> None:
        """Hook: the renewer is exiting (nothing is held, or the keeper closed)."""

    @staticmethod
    def _renewals(batch: list[tuple[tuple[str, bytes], int, int]]) -> list[list[Any]]:
        return [[name, "renew", [owner, token], None] for (name, owner), _, token in batch]

    def _failed(self, count: int, exc: Exception) -> None:
        if not self._closed:
            log.warning("could not renew %d lease(s) at %s: %s", count, self.endpoint, exc)

    def _settle(self, batch: list[tuple[tuple[str, bytes], int, int]], replies: list[Any]) -> None:
        for (key, version, _), (kind, value) in zip(batch, replies, strict=True):
            if kind == RETURN and value:
                continue
            # 0: the server says this owner holds nothing there (released, or its lease
            # ran out); an error: the container was dropped or replaced.
            self.untrack(key, version)


def _after_fork_in_child() -> None:
    for keeper in list(_KEEPERS):
        keeper._reset()
