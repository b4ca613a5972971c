"""``python bench/engine_instructions.py OP N``: N calls of OP through Engine.handle.

OP: ``get``, ``set`` (a ``__setitem__`` without a request id), ``set-rid`` (with one, as
kvclient sends every write).

No sockets and no client: the engine's own cost of a GET or SET of a 100-char str, after 2,000
SETs that fill the change history (``kvserve.history``) to its default bound. Run it under
callgrind at two values of N and divide the difference by the difference of N (start-up
cancels), with ``PYTHONPATH`` pointing at the tree to measure::

    for n in 0 20000; do PYTHONHASHSEED=0 PYTHONPATH=TREE/protocol:TREE/server:TREE/client \\
        valgrind --tool=callgrind --callgrind-out-file=/dev/null python \\
        bench/engine_instructions.py set $n 2>&1 | grep Collected; done

It isolates what a change to the engine or a container costs per call, which the whole-server
count of :mod:`bench.instructions` (varying by several percent between runs) cannot resolve.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from kvserve.engine import Engine, Waiter
from kvserve.manager import KVManager


class _Handle:
    def cancel(self) -> None:
        pass


class _Scheduler:
    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        return _Handle()


class _Session:
    readonly = False
    caller = b"c" * 8
    parked: Waiter | None = None

    def late_reply(self, kind: str, value: Any) -> None:
        pass

    def resume(self) -> None:
        pass


def main(op: str, n: int) -> None:
    """Make ``n`` calls of ``op`` after the warm-up."""
    engine = Engine(KVManager(("127.0.0.1", 0), authkey=b"k" * 32)._registry, _Scheduler())
    engine.start()
    session = _Session()
    engine.handle(session, [None, "create", ["dict", "d"], None])
    value = "v" * 100
    for _ in range(2000):
        engine.handle(session, ["d", "__setitem__", ["k", value], None])
    if op == "set":
        for _ in range(n):
            engine.handle(session, ["d", "__setitem__", ["k", value], None])
    elif op == "set-rid":
        token = b"t" * 16
        for seq in range(n):
            engine.handle(session, ["d", "__setitem__", ["k", value], None, [token, seq + 1]])
    else:
        for _ in range(n):
            engine.handle(session, ["d", "get", ["k", None], None])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
