"""``python -m bench.redis_cpu``: client CPU per call, kvclient's cluster backend vs redis-py.

Issue 16's target: the cluster backend's per-call client CPU at or below redis-py's
``RedisCluster``. One process (this one, pinned to one vCPU with ``os.sched_setaffinity``)
makes ``--ops`` calls per (system, op) on a real 3-master / 3-replica cluster
(``tests/redis_cluster.py``, its servers pinned to the other vCPU) and measures its own CPU
(``getrusage``: user + system) per call. Systems:

- ``kvclient``: ``kvclient.connect("redis-cluster://...")``, ``d.get(k)`` and ``d.incr(k)``
  (one EVALSHA each, with the codec, the request id of ``incr`` and its record);
- ``RedisCluster``: ``redis.cluster.RedisCluster``, ``hget`` and ``hincrby`` (no codec, no
  exactly-once: less work, the reference the issue names);
- ``Redis``: a plain ``redis.Redis`` on the key's master, ``hget``/``hincrby`` (the floor).

Rounds interleave the systems (order rotating); the report is the median over rounds and the
median per-round ratio to ``RedisCluster``, written to ``bench/results/<date>-<time>-redis-cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_call(call: Callable[[], Any], ops: int) -> float:
    for _ in range(200):
        call()
    start = _cpu()
    for _ in range(ops):
        call()
    return (_cpu() - start) / ops * 1e6


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and write the report."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster
    from tests.redis_cluster import running_cluster

    import kvclient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu = cpus[-1]
    with running_cluster() as cluster:
        for node in cluster.nodes:
            if node.proc is not None and len(cpus) > 1:
                os.sched_setaffinity(node.proc.pid, {cpus[0]})
        os.sched_setaffinity(0, {client_cpu})
        url = "redis-cluster://" + ",".join(cluster.seeds)
        kv = kvclient.connect(url)
        d = kv.dict("bench")
        d["k"] = "v" * 100
        host, port = cluster.seeds[0].split(":")
        rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))])  # type: ignore[no-untyped-call]
        rc.hset("hb", "k", "v" * 100)
        slot_node = rc.get_node_from_key("hb")  # type: ignore[no-untyped-call]
        plain = redis.Redis(host=slot_node.host, port=slot_node.port)
        systems: dict[str, dict[str, Callable[[], Any]]] = {
            "kvclient": {"get": lambda: d.get("k"), "incr": lambda: d.incr("n")},
            "RedisCluster": {
                "get": lambda: rc.hget("hb", "k"),
                "incr": lambda: rc.hincrby("hb", "n", 1),
            },
            "Redis": {
                "get": lambda: plain.hget("hb", "k"),
                "incr": lambda: plain.hincrby("hb", "n", 1),
            },
        }
        results: dict[tuple[str, str], list[float]] = {}
        names = list(systems)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for op in ("get", "incr"):
                for name in order:
                    results.setdefault((name, op), []).append(
                        _per_call(systems[name][op], args.ops)
                    )
        kv.close()
        rc.close()
        plain.close()
    lines = [
        f"# Client CPU per call on a 3+3 Redis Cluster ({datetime.date.today()})",
        "",
        f"{args.rounds} rounds x {args.ops} calls per cell, client pinned to cpu {client_cpu}, "
        f"servers to cpu {cpus[0]}; redis-py {redis.__version__}; us of client CPU per call, "
        "median [min-max]; ratio: median of per-round ratios to RedisCluster.",
        "",
        "| system | op | us/call | ratio to RedisCluster |",
        "|---|---|---|---|",
    ]
    for op in ("get", "incr"):
        for name in names:
            values = results[(name, op)]
            ratios = [v / b for v, b in zip(values, results[("RedisCluster", op)], strict=True)]
            lines.append(
                f"| {name} | {op} | {statistics.median(values):.1f} "
                f"[{min(values):.1f}-{max(values):.1f}] | {statistics.median(ratios):.2f}x |"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(__file__).parent / "results" / f"{stamp}-redis-cpu.md"
    out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
