"""The kvmanager version (defined once, in :mod:`kvproto._version`)."""

from __future__ import annotations

from kvproto._version import __version__

__all__ = ["__version__"]
