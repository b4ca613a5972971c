"""The store: named containers, created on first use, looked up by name. No networking here.

Kinds come from the manager's registry (``typeid -> callable, exposed``), so
``KVManager.register`` decides what can be created, as with ``multiprocessing.managers``.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

from kvproto import schema
from kvproto.errors import KindError, NoSuchContainerError
from kvproto.wire import MAX_NAME
from kvserve.containers import Container
from kvserve.history import DEFAULT_HISTORY_AGE as DEFAULT_AGE
from kvserve.history import DEFAULT_HISTORY_COUNT as DEFAULT_COUNT
from kvserve.history import MANY

__all__ = ["GENERAL", "READ", "WRITE", "Method", "MethodTable", "Registry", "Store", "method_table"]

# typeid -> (callable, exposed, method_to_typeid, proxytype), as BaseManager._registry holds it.
Registry = dict[str, tuple[Callable[..., Any] | None, Any, Any, Any]]

_NAME_MAX = MAX_NAME

Method = tuple[Callable[..., Any] | None, schema.Op, int]
"""One callable method: its function (called as ``function(obj, *args)``; None: looked up on
the instance at call time), what the schema says it is, and the engine's path for it:
:data:`READ`, :data:`WRITE` or :data:`GENERAL`."""
GENERAL = 0
"""The engine's general path: server-set keywords (``caller=``, ``now=``), leases' deadlines,
unwatched writes, methods looked up at call time."""
READ = 1
"""A plain function that changes nothing: called with the request's args, nothing recorded."""
WRITE = 2
"""A plain function that changes the container: its revision and history, the log; no
server-set keywords and no deadline to schedule."""
MethodTable = Mapping[str, Method]
"""What the wire may call on one container: method name -> :data:`Method`."""


_TABLES: dict[tuple[type[Container], frozenset[str]], MethodTable] = {}


def method_table(cls: type[Container], exposed: frozenset[str]) -> MethodTable:
    """Return the table of ``exposed`` methods of ``cls``, built once per class and exposure.

    Each entry's :class:`~kvproto.schema.Op` is the schema's when the class agrees with it
    (every built-in kind), else one made from the class's own ``mutating`` and
    ``caller_methods`` (a kind registered without a schema entry): the server's behaviour
    follows the same sets it always did, looked up once here instead of per call.
    """
    cached = _TABLES.get((cls, exposed))
    if cached is not None:
        return cached
    table: dict[str, Method] = {}
    kind = getattr(cls, "kind", None)
    mutating: frozenset[str] = getattr(cls, "mutating", frozenset())
    callers: frozenset[str] = getattr(cls, "caller_methods", frozenset())
    for name in exposed:
        op = schema.op(kind, name) if type(kind) is str and kind in schema.KINDS else None
        mutates, caller = name in mutating, name in callers
        if op is None or op.mutates != mutates or op.caller != caller:
            op = schema.Op(mutates=mutates, caller=caller)
        function = next((b.__dict__[name] for b in cls.__mro__ if name in b.__dict__), None)
        # Plain functions are called unbound; anything else (a staticmethod, a callable
        # attribute, a name the class lacks) goes through getattr at call time, as before.
        plain = function if type(function) is types.FunctionType else None
        path = GENERAL
        if plain is not None and not (op.caller or op.clock):
            if not op.mutates:
                path = READ
            elif not (op.unwatched or cls.timed or name in MANY):
                path = WRITE  # MANY: recorded by History.record, which counts their items
        table[name] = (plain, op, path)
    # A plain dict, not a read-only proxy: it is looked up on every call. Nothing writes it.
    _TABLES[(cls, exposed)] = table
    return table


class Store:
    """Named containers of the kinds a registry allows.

    Args:
        registry: ``BaseManager._registry``-shaped mapping from kind to factory.
        history: ``(count, age)``: how many changes, and for how many seconds, each
            watchable container keeps for ``watch`` (:mod:`kvserve.history`).
    """

    def __init__(
        self, registry: Registry, history: tuple[int, float] = (DEFAULT_COUNT, DEFAULT_AGE)
    ) -> None:
        self.history = history
        self._factories: dict[str, tuple[Callable[..., Any], frozenset[str]]] = {}
        for typeid, (factory, exposed, _m2t, _proxytype) in registry.items():
            if factory is None:
                continue
            names = frozenset(getattr(factory, "exposed", ()) if exposed is None else exposed)
            self._factories[typeid] = (factory, names)
        self.objects: dict[str, Container] = {}
        # The containers the restore in progress made (kvserve.dumps.restore_records): only
        # these may be extended by its later pieces, never a container made otherwise.
        self.restoring: set[str] = set()
        self.exposed: dict[str, frozenset[str]] = {}
        # name -> the method table of its container (see method_table), kept with `exposed`.
        self.methods: dict[str, MethodTable] = {}
        # name -> (container, method table): what a call looks up, in one step.
        self.calls: dict[str, tuple[Container, MethodTable]] = {}
        # Guards the name table itself; each container has its own lock for its contents.
        self.lock = threading.Lock()

    @property
    def kinds(self) -> list[str]:
        """The kinds this store can create."""
        return sorted(self._factories)

    def create(self, kind: str, name: str, *args: Any, **kwds: Any) -> Container:
        """Return the container called ``name``, creating it as ``kind`` if it does not exist.

        Raises:
            KindError: ``name`` exists with another kind.
            ValueError: unknown kind, or a name that is not a non-empty str.
        """
        if not isinstance(name, str) or not name or len(name) > _NAME_MAX:
            raise ValueError(f"container names are non-empty str of at most {_NAME_MAX} chars")
        with self.lock:
            existing = self.objects.get(name)
            if existing is not None:
                if existing.kind != kind:
                    raise KindError(
                        f"{name!r} already exists as a {existing.kind}, not a {kind}; "
                        f"use another name or drop it first"
                    )
                if args or kwds:
                    existing.check_args(*args, **kwds)
                return existing
            try:
                factory, exposed = self._factories[kind]
            except KeyError:
                raise ValueError(
                    f"unknown container kind {kind!r}; known: {', '.join(self.kinds)}"
                ) from None
            obj = factory(*args, **kwds)
            if obj.history is not None and self.history != (DEFAULT_COUNT, DEFAULT_AGE):
                obj.history.configure(*self.history)
            self._put(name, obj, exposed)
            return obj  # type: ignore[no-any-return]

    def kind_class(self, kind: str) -> type[Container]:
        """Return the container class registered for ``kind``.

        Raises:
            ValueError: no such kind is registered.
        """
        try:
            cls: type[Container] = self._factories[kind][0]  # type: ignore[assignment]
        except KeyError:
            raise ValueError(
                f"unknown container kind {kind!r}; known: {', '.join(self.kinds)}"
            ) from None
        return cls

    def install(self, name: str, obj: Container) -> None:
        """Put a ready-made container under ``name`` (start-up, restore), replacing any."""
        factory_exposed = self._factories.get(obj.kind)
        if obj.history is not None:
            obj.history.configure(*self.history)
        with self.lock:
            self._put(name, obj, factory_exposed[1] if factory_exposed else obj.exposed)

    def _put(self, name: str, obj: Container, exposed: frozenset[str]) -> None:
        table = method_table(type(obj), exposed)
        self.objects[name] = obj
        self.exposed[name] = exposed
        self.methods[name] = table
        self.calls[name] = (obj, table)

    def get(self, name: str) -> Container:
        """Return an existing container.

        Raises:
            NoSuchContainerError: there is none called ``name``.
        """
        try:
            return self.objects[name]
        except (KeyError, TypeError):
            raise NoSuchContainerError(
                f"no container named {name!r}; it was dropped or never created"
            ) from None

    def names(self) -> dict[str, str]:
        """Return ``{name: kind}`` for every container."""
        with self.lock:
            return {name: obj.kind for name, obj in self.objects.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Return ``{name: {"kind": kind, "size": items held}}`` for every container."""
        with self.lock:
            objects = list(self.objects.items())
        return {name: {"kind": obj.kind, "size": obj.size()} for name, obj in objects}

    def drop(self, name: str) -> bool:
        """Delete a container; return whether it existed."""
        with self.lock:
            self.exposed.pop(name, None)
            self.methods.pop(name, None)
            self.calls.pop(name, None)
            self.restoring.discard(name)
            return self.objects.pop(name, None) is not None
