"""Client-process bodies for multi-process tests: importable cheaply (no pytest) by children."""

from __future__ import annotations

from typing import Any

import kvclient
import kvclient.retry


def mixed_worker(address: str, authkey: bytes, worker: int, n_ops: int, go: Any) -> None:
    # Generous retries: 32 processes reconnecting slow the restarted server's start-up.
    retry = kvclient.retry.Retry(kvclient.retry.ConstantBackoff(0.2), retries=150)
    with kvclient.connect(address, authkey, retry=retry) as kv:
        kv.dict("ready").incr("n")
        if not go.wait(60):
            raise TimeoutError("never told to start")
        d, lst, q, done = kv.dict("mix"), kv.list("appended"), kv.queue("work"), kv.list("got")
        got = []
        for i in range(n_ops):
            d[f"w{worker}"] = i
            d.incr("total")
            lst.append([worker, i])
            q.put([worker, i])
            if d.get(f"w{worker}") != i:
                raise AssertionError("read did not see this worker's own write")
            got.append(q.get(timeout=30))
        done.extend(got)
