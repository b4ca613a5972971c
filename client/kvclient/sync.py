"""Client side of the synchronization primitives: ``Client.lock()``, ``.event()``, ...

Placeholder: :class:`SyncMixin` is a base of :class:`~kvclient.client.Client`.
"""

from __future__ import annotations

__all__ = ["SyncMixin"]


class SyncMixin:
    """The ``Client`` methods that create synchronization primitives."""
