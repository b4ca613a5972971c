"""Client processes of tests/test_redis_retention.py: queue consumers, producers, short writers.

Run as ``python -m tests.redis_retention_workers ROLE URL NAME [ARGS...]``; each prints one
JSON line per result (flushed), so the test reads what a process received even after it
killed it. ``SHORT`` are the settings of a client whose retry window is a few seconds (the
lease of its in-flight queue items and the life of its request ids derive from them).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import kvclient
from kvclient.retry import ConstantBackoff, Retry

# Windows (kvclient/_redis/_retention.py): in flight 0.1 + 0.5 + 2 + 1 = 3.6 s (a BLMOVE waits
# 1 s of it), request ids 0.1 + 2 * 2.5 + 1 = 6.1 s.
SHORT: dict[str, Any] = {"timeout": 0.5, "call_timeout": 2.0}


def short_retry() -> Retry:
    """The ``retry`` of a client with :data:`SHORT` windows."""
    return Retry(ConstantBackoff(0.1), retries=1)


def _say(value: Any) -> None:
    print(json.dumps(value), flush=True)


def consume(url: str, name: str, idle: str, short: str = "0") -> None:
    """Get items until none came for ``idle`` seconds; print each."""
    options = {**SHORT, "retry": short_retry()} if short == "1" else {}
    with kvclient.connect(url, **options) as kv:
        q = kv.queue(name)
        _say("ready")
        while True:
            try:
                _say(q.get(timeout=float(idle)))
            except queue.Empty:
                return


def consume_pausing(url: str, name: str, idle: str) -> None:
    """As :func:`consume` (short windows), but stop this process just before its first wait.

    Right before its first ``get`` sends the command that waits on the server (what a client
    descheduled, paused or slow between its ``get`` script and that command does), it
    prints ``"pausing"`` and stops itself (SIGSTOP); the test decides when it goes on.
    """
    from kvclient._redis._backend import Call

    send = Call.execute
    paused = False

    def execute(self: Call, *command: Any) -> Any:
        nonlocal paused
        if not paused and str(command[0]).upper().startswith("BL"):
            paused = True
            _say("pausing")
            os.kill(os.getpid(), signal.SIGSTOP)
        return send(self, *command)

    Call.execute = execute  # type: ignore[method-assign]
    consume(url, name, idle, "1")


def produce(url: str, name: str, tag: str, count: str) -> None:
    """Put ``count`` items ``[tag, i]``."""
    with kvclient.connect(url) as kv:
        q = kv.queue(name)
        for i in range(int(count)):
            q.put([tag, i])
    _say("done")


def write_once(url: str, name: str, threads: str) -> None:
    """``threads`` short-lived writers: each thread of one short-window client increments once."""
    with kvclient.connect(url, **SHORT, retry=short_retry()) as kv:
        d = kv.dict(name)
        workers = [threading.Thread(target=d.incr, args=("n",)) for _ in range(int(threads))]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
    _say("done")


ROLES: dict[str, Callable[..., None]] = {
    "consume": consume,
    "consume_pausing": consume_pausing,
    "produce": produce,
    "write_once": write_once,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
