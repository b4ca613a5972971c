"""``mypyc_attr`` for the optional compiled build (hatch_build.py), with no runtime dependency.

mypyc reads ``@mypyc_attr(...)`` on a class at compile time, by the name it resolves to
(``mypy_extensions.mypyc_attr``); at run time, compiled or not, the decorator must only return
the class. So mypy sees mypy_extensions' decorator and Python runs a stand-in that does
nothing, and neither build needs mypy_extensions installed.

``@mypyc_attr(native_class=False)`` keeps a compiled module's class an ordinary Python class
(its methods are still compiled): needed for one that is weakly referenced, since mypyc's
native classes take no weak references. ``@mypyc_attr(allow_interpreted_subclasses=True)``
lets interpreted code subclass a compiled class (else creating such an object raises
``TypeError``; tests/test_compiled.py finds every such pair).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

__all__ = ["mypyc_attr"]

_T = TypeVar("_T")

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        """Return a decorator that returns what it decorates (mypyc acts on it at build time)."""

        def keep(cls: _T) -> _T:
            return cls

        return keep
