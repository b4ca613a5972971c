"""The baseline: a stdlib ``BaseManager`` serving one registered dict, as the Python docs show.

``get_dict`` returns one shared dict (the docs' remote-manager example, with a dict instead of a
queue), through a ``DictProxy`` that also exposes three methods every key-value service needs
and a plain dict lacks: ``incr`` (under a lock, since the stdlib server runs a thread per
connection), ``get_many`` and ``set_many``. ``get_queue(name)`` returns a ``queue.Queue``.
Pickle on the wire, thread per connection: the stdlib as users run it.

Run with ``python -m bench.stdlib_server`` and env ``BENCH_AUTHKEY``; it prints
``stdlib listening on HOST:PORT``.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.managers import BaseManager, DictProxy
from typing import Any

__all__ = ["BenchDict", "BenchDictProxy", "BenchManager", "connect"]


class BenchDict(dict[Any, Any]):
    """A dict with the compound operations the benchmark needs."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def incr(self, key: Any) -> int:
        """Add 1 to ``self[key]`` (0 when missing) and return the new value, atomically."""
        with self._lock:
            value: int = self.get(key, 0) + 1
            self[key] = value
            return value

    def get_many(self, keys: list[Any]) -> dict[Any, Any]:
        """Return ``{key: value}`` for the keys that exist."""
        return {k: self[k] for k in keys if k in self}

    def set_many(self, mapping: dict[Any, Any]) -> None:
        """Store every pair of ``mapping``."""
        self.update(mapping)


class BenchDictProxy(DictProxy):  # type: ignore[type-arg]
    """The stdlib ``DictProxy`` plus ``incr``, ``get_many`` and ``set_many``."""

    _exposed_ = (*DictProxy._exposed_, "incr", "get_many", "set_many")  # type: ignore[attr-defined]

    def incr(self, key: Any) -> int:
        """Remote :meth:`BenchDict.incr`."""
        call: Callable[..., Any] = self._callmethod
        result: int = call("incr", (key,))
        return result

    def get_many(self, keys: list[Any]) -> dict[Any, Any]:
        """Remote :meth:`BenchDict.get_many`."""
        call: Callable[..., Any] = self._callmethod
        result: dict[Any, Any] = call("get_many", (keys,))
        return result

    def set_many(self, mapping: dict[Any, Any]) -> None:
        """Remote :meth:`BenchDict.set_many`."""
        self._callmethod("set_many", (mapping,))


class BenchManager(BaseManager):
    """The manager class both sides register ``get_dict`` and ``get_queue`` on."""


_shared: BenchDict | None = None
_queues: dict[str, queue.Queue[Any]] = {}
_queues_lock = threading.Lock()


def _get_dict() -> BenchDict:
    global _shared  # noqa: PLW0603 - one shared dict per server process, as in the docs
    if _shared is None:
        _shared = BenchDict()
    return _shared


def _get_queue(name: str) -> queue.Queue[Any]:
    with _queues_lock:
        return _queues.setdefault(name, queue.Queue())


BenchManager.register("get_dict", callable=_get_dict, proxytype=BenchDictProxy)
BenchManager.register("get_queue", callable=_get_queue, exposed=("put", "get", "qsize"))


def connect(address: tuple[str, int], authkey: bytes) -> BenchManager:
    """Return a connected client-side manager (``m.get_dict()``, ``m.get_queue(name)``)."""
    manager = BenchManager(address=address, authkey=authkey)
    manager.connect()
    return manager


def main() -> None:
    """Serve on 127.0.0.1, a free port, until SIGTERM."""
    authkey = os.environ["BENCH_AUTHKEY"].encode()
    manager = BenchManager(address=("127.0.0.1", 0), authkey=authkey)
    server = manager.get_server()
    address: Any = server.address
    host, port = address
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"stdlib listening on {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
