"""The kvmanager version, shared by kvclient, kvctl and kvserve.

The one place the version is written: hatchling reads it from here for the package metadata
(``[tool.hatch.version]`` in pyproject.toml). A constant rather than
``importlib.metadata.version()``, which costs about 40 ms at import, four times a bare
``python -c pass``, on every ``kvctl`` call.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
