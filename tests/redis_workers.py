"""Worker processes of the Valkey/Redis and peer-bug tests (importable by spawned children)."""

from __future__ import annotations

from multiprocessing.synchronize import Barrier as BarrierType
from typing import Any

from tests.targets import Target


def setdefault_racer(target: Target, me: int, rounds: int, barrier: BarrierType, out: Any) -> None:
    """Race the others to ``setdefault`` a fresh key each round; report what each call saw."""
    with target.connect() as kv:
        d = kv.dict("race")
        seen = []
        for r in range(rounds):
            barrier.wait(30)
            seen.append(d.setdefault(f"k{r}", me))
        out.put((me, seen))


def incr_worker(url: str, name: str, n: int, durability: str | None) -> None:
    """``n`` increments of one key, each a retried call over whatever the cluster does."""
    import kvclient
    from kvclient.retry import Retry

    with kvclient.connect(url, retry=Retry(retries=40), durability=durability) as kv:
        d = kv.dict(name)
        for _ in range(n):
            d.incr("n")
        kv.dict("done").incr("workers")
