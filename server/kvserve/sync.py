"""Synchronization primitives served by kvserve (Lock, RLock, Semaphore, Event, ...).

Placeholder: the kinds are registered with ``KVManager`` through :data:`SYNC_KINDS`.
"""

from __future__ import annotations

from kvserve.containers import Container

__all__ = ["SYNC_KINDS"]

SYNC_KINDS: dict[str, type[Container]] = {}
