"""Lock cost on the Valkey/Redis backend against kvserve and redis-py's own ``Lock``.

Run by hand: ``python -m bench.sync_locks [--duration S] [--procs N]``. Starts a fresh kvserve,
a fresh ``redis-server`` and (with ``redis-cli`` too) a 3-master cluster
(``tests/redis_cluster.py``), all on 127.0.0.1, then measures, in this one invocation:

- uncontended: one client process pinned to CPU 0 (servers on the other CPUs) acquires and
  releases one lock in a loop: pairs per second, and the client's CPU time per pair
  (``time.process_time``, which counts every thread of the process: the lease renewal too);
- contended: ``--procs`` processes take turns on one lock, each pair a read-modify-write of a
  shared counter under it: pairs per second, and the exact total checked.

Baselines in the same run: kvserve (``kvclient.connect``) and redis-py's ``redis.lock.Lock``
(``timeout=30``: with an expiry, as ours; no fencing token, no FIFO, its blocking acquire
polls every 0.1 s) on the same redis-server. Prints one Markdown table with ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

import kvclient
from bench.systems import Server, SkipSystemError, start_server

_CTX = mp.get_context("forkserver")


def _pin(cpu: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _kv_pairs(target: str, authkey: str, name: str) -> Callable[[], None]:
    kv = kvclient.connect(target, authkey.encode() if authkey else None)
    lock = kv.lock(name)

    def pair() -> None:
        lock.acquire()
        lock.release()

    return pair


def _redis_py_pairs(target: str, authkey: str, name: str) -> Callable[[], None]:
    host, port = target.removeprefix("redis://").split("/")[0].split(":")
    lock = redis.Redis(host=host, port=int(port)).lock(name, timeout=30)

    def pair() -> None:
        lock.acquire()
        lock.release()

    return pair


_MAKERS: dict[str, Callable[[str, str, str], Callable[[], None]]] = {
    "kvclient": _kv_pairs,
    "redis-py Lock": _redis_py_pairs,
}


def _uncontended(maker: str, target: str, authkey: str, duration: float, out: Any) -> None:
    _pin(0)
    pair = _MAKERS[maker](target, authkey, "bench-u")
    for _ in range(50):
        pair()
    count, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    end = t0 + duration
    while time.perf_counter() < end:
        pair()
        count += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out.put((count / wall, cpu / count * 1e6))


def _contended(target: str, authkey: str, duration: float, index: int, out: Any) -> None:
    _pin(index)
    kv = kvclient.connect(target, authkey.encode() if authkey else None)
    lock, totals = kv.lock("bench-c"), kv.dict("bench-total")
    count, end = 0, time.perf_counter() + duration
    while time.perf_counter() < end:
        with lock:
            totals["n"] = totals.get("n", 0) + 1
        count += 1
    out.put(count)


def _run(target: Callable[..., None], args: tuple[Any, ...], procs: int) -> list[Any]:
    queue = _CTX.Queue()
    workers = [_CTX.Process(target=target, args=(*args, i, queue)) for i in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    return results


def _measure(
    label: str, maker: str, target: str, authkey: str, args: argparse.Namespace
) -> dict[str, Any]:
    row: dict[str, Any] = {"system": label}
    queue = _CTX.Queue()
    p = _CTX.Process(target=_uncontended, args=(maker, target, authkey, args.duration, queue))
    p.start()
    row["pairs/s"], row["cpu us/pair"] = queue.get(timeout=120)
    p.join(30)
    if maker == "kvclient":
        with kvclient.connect(target, authkey.encode() if authkey else None) as kv:
            kv.dict("bench-total")["n"] = 0
            counts = _run(_contended, (target, authkey, args.duration), args.procs)
            total = kv.dict("bench-total")["n"]
        assert total == sum(counts), (total, counts)  # exclusion: not one update lost
        row["contended pairs/s"] = total / args.duration
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.sync_locks")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=4)
    args = parser.parse_args(argv)
    servers: list[Server] = []
    rows: list[dict[str, Any]] = []
    try:
        kvs = start_server("kvserve")
        servers.append(kvs)
        address = f"{kvs.endpoint.host}:{kvs.endpoint.port}"
        rows.append(_measure("kvserve", "kvclient", address, kvs.endpoint.authkey, args))
        try:
            rds = start_server("redis")
        except SkipSystemError as exc:
            print(f"redis skipped: {exc}", file=sys.stderr)
        else:
            servers.append(rds)
            url = f"redis://{rds.endpoint.host}:{rds.endpoint.port}/0"
            rows.append(_measure("redis backend, standalone", "kvclient", url, "", args))
            rows.append(_measure("redis-py Lock, standalone", "redis-py Lock", url, "", args))
            from tests.redis_cluster import Cluster, available

            if available() is None:
                cluster = Cluster(3, 0).start()
                try:
                    seeds = "redis-cluster://" + ",".join(cluster.seeds)
                    rows.append(
                        _measure("redis backend, 3-master cluster", "kvclient", seeds, "", args)
                    )
                finally:
                    cluster.stop()
    finally:
        for server in servers:
            server.stop()
    base = rows[0]
    print(f"lock acquire+release, {args.duration:g} s per case, {args.procs} contending processes")
    print("| system | pairs/s | client CPU us/pair | x kvserve CPU | contended pairs/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        contended = row.get("contended pairs/s")
        print(
            f"| {row['system']} | {row['pairs/s']:.0f} | {row['cpu us/pair']:.0f} | "
            f"{row['cpu us/pair'] / base['cpu us/pair']:.2f} | "
            f"{'-' if contended is None else f'{contended:.0f}'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
