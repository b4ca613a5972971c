"""Client-process bodies for the watch, TTL and ephemeral-key tests (no pytest: cheap to import)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import kvclient
import kvclient.retry
from tests.targets import Target


def incr_worker(target: Target, name: str, worker: int, n_ops: int) -> None:
    """Make ``n_ops`` increments of key ``w<worker>`` and of ``total`` in dict ``name``."""
    with target.connect() as kv:
        d = kv.dict(name)
        for _ in range(n_ops):
            d.incr(f"w{worker}")
            d.incr("total")


def acked_incr_worker(address: str, authkey: bytes, n_ops: int) -> None:
    """Increment ``n`` of dict ``seq`` until the server goes away; print each acknowledged value.

    Each line is flushed as soon as its increment is acknowledged, so the test knows exactly
    what the server promised to keep.
    """
    retry = kvclient.retry.Retry(retries=0)
    with kvclient.connect(address, authkey, retry=retry) as kv:
        d = kv.dict("seq")
        for _ in range(n_ops):
            try:
                value = d.incr("n")
            except kvclient.KVError:
                return
            sys.stdout.write(f"{value}\n")
            sys.stdout.flush()


def ephemeral_owner(target: Target, key: str, lease: float, ready: Any) -> None:
    """Announce ``key`` in dict ``workers`` as an ephemeral key, then wait to be killed."""
    with target.connect() as kv:
        kv.dict("workers").set(key, {"pid": os.getpid()}, ephemeral=True, lease=lease)
        ready.set()
        time.sleep(600)
