"""The blocking client's call path: settings reaching open connections, the fast request packer.

Against real kvserve processes; the fast packer against the reference encoding
(:func:`kvproto.wire.request` through :class:`kvproto.codec.Codec`) with hypothesis.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

import kvclient
from tests.conftest import ServerProcess


def _stalled_call_seconds(kv: kvclient.Client, proc: ServerProcess) -> float:
    """Seconds until a GET to the stopped server fails (bounded: the test's timeout)."""
    d = kv.dict("d")
    proc.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(kvclient.KVConnectionError):
            d["k"]
        return time.monotonic() - start
    finally:
        proc.proc.send_signal(signal.SIGCONT)


def test_a_new_call_timeout_reaches_the_open_connection(kvserve_proc: ServerProcess) -> None:
    with kvclient.connect(
        kvserve_proc.address, kvserve_proc.authkey, call_timeout=8.0, retry=None
    ) as kv:
        kv.dict("d")["k"] = 1  # this thread's connection is open, with the 8 s timeout
        kv.call_timeout = 0.3  # was only read by connections opened after it
        assert kv.call_timeout == 0.3
        assert _stalled_call_seconds(kv, kvserve_proc) < 4


def test_a_new_call_timeout_reaches_other_threads_connections(
    kvserve_proc: ServerProcess,
) -> None:
    with kvclient.connect(
        kvserve_proc.address, kvserve_proc.authkey, call_timeout=8.0, retry=None
    ) as kv:
        d = kv.dict("d")
        opened = threading.Event()
        go = threading.Event()
        took: list[float] = []

        def worker() -> None:
            d["k"] = 1  # the worker's own connection, opened with the 8 s timeout
            opened.set()
            assert go.wait(20)
            start = time.monotonic()
            try:
                d["k"]
            except kvclient.KVConnectionError:
                took.append(time.monotonic() - start)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert opened.wait(20)
        kv.call_timeout = 0.3
        kvserve_proc.proc.send_signal(signal.SIGSTOP)
        try:
            go.set()
            thread.join(20)
        finally:
            kvserve_proc.proc.send_signal(signal.SIGCONT)
        assert not thread.is_alive()
        assert took and took[0] < 4
