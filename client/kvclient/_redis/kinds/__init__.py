"""The container kinds of the Valkey/Redis backend: one module of handlers per kind family.

Each kind is a :class:`Kind`: its methods (names as :data:`kvproto.schema.KINDS` has them,
each a :data:`~kvclient._redis._backend.Handler`), how ``create`` lays out its initial
contents for ``scripts/create.lua``, how an existing one's creation arguments are checked,
and which command counts its items (``describe``). :data:`KINDS` is the registry the backend
dispatches from; a new kind (the synchronization primitives) is a module and a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from kvclient._redis._backend import Call, Handler

__all__ = ["KINDS", "Kind", "register"]


def _accept(check: bytes, args: list[Any]) -> None:
    """Accept any creation arguments for an existing container (get-or-create)."""


class Kind(NamedTuple):
    """What the backend knows of one container kind.

    Attributes:
        methods: method name -> handler.
        create: given the call context and the creation arguments, return ``(check, layout,
            items)``: ``check`` is kept to compare later creations against, ``layout`` is
            ``'list'``, ``'hash'`` or ``'none'`` and ``items`` the initial contents encoded as
            ``create.lua`` takes them.
        check_existing: given an existing container's ``check`` and the creation arguments
            of another ``create``, raise ValueError if they do not match.
        size: the Redis command (on the data key) that counts the items, e.g. ``HLEN``;
            None: the size is 1.
    """

    methods: dict[str, Handler]
    create: Callable[[Call, list[Any]], tuple[bytes, str, list[bytes]]]
    check_existing: Callable[[bytes, list[Any]], None] = _accept
    size: str | None = "LLEN"


KINDS: dict[str, Kind] = {}
"""kind name -> :class:`Kind`, filled by :func:`register` as each kind module is imported."""


def register(name: str, kind: Kind) -> None:
    """Add a kind to :data:`KINDS`."""
    KINDS[name] = kind


def _load() -> None:
    # The kind modules register themselves; imported here so that importing this package is
    # all the backend needs.
    from kvclient._redis.kinds import (  # noqa: PLC0415, F401
        mapping,
        queue,
        sequence,
        sync,
        typed,
    )


_load()
