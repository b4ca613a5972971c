"""``python -m bench.redis_aggregate``: aggregate GET/SET throughput of 16 client processes.

Issue 16: what a 3-master Valkey/Redis Cluster buys over one kvserve. ``--clients`` processes
(16) each read (``get``) or write (``set``) 100-char str values for ``--duration`` seconds, on
``--keys`` keys (256) spread over ``--containers`` containers (8, so over several hash slots
and all three masters), against:

- ``cluster``: kvclient's Redis backend on a 3-master / 3-replica cluster
  (``tests.redis_cluster.running_cluster()``, ``redis-cluster://`` with every node a seed);
- ``kvserve``: one kvserve with kvclient (started by :func:`bench.systems.start_server`), the
  baseline of the ratios;
- ``redis``: kvclient's Redis backend on one standalone redis-server
  (``tests.redis_cluster.Standalone``);
- ``redis-py``: plain redis-py (hiredis) ``GET``/``SET`` on that same standalone server
  (:class:`bench.systems.RedisDriver`), the reference without kvclient's codec and scripts.

Every client process connects and writes its keys first; all start each phase together
(a barrier) and count their calls. A round runs every system once, the order rotating; the
report is ops/s summed over the processes, median [min-max] over ``--rounds``, and the median
of the per-round ratios to kvserve. Clients and servers share the machine's CPUs (2 vCPUs
here: 16 processes oversubscribe them), so this is the machine's throughput, not a server's
capacity. Written with :func:`bench.measure.write_results` to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Final

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import environment, loadavg, write_results
from bench.systems import STR_VALUE, Endpoint, make_driver, start_server

SYSTEMS: Final = ("cluster", "kvserve", "redis", "redis-py")
LABELS: Final = {
    "cluster": "kvclient, 3-master Redis Cluster",
    "kvserve": "kvclient, one kvserve",
    "redis": "kvclient, one redis-server",
    "redis-py": "redis-py + hiredis, one redis-server",
}
OPS: Final = ("get", "set")
_BARRIER_TIMEOUT: Final = 60.0

Call = Callable[[], object]


def _kvclient_calls(address: Any, authkey: bytes | None, keys: list[tuple[int, int]]) -> Any:
    import kvclient

    kv = kvclient.connect(address, authkey)
    dicts = {c: kv.dict(f"agg{c}") for c, _ in keys}
    sets: list[Call] = []
    gets: list[Call] = []
    for c, k in keys:
        d = dicts[c]
        d[k] = STR_VALUE
        sets.append(functools.partial(d.__setitem__, k, STR_VALUE))
        gets.append(functools.partial(d.__getitem__, k))
    if gets[0]() != STR_VALUE:
        raise RuntimeError("kvclient get read back another value")
    return kv, {"get": gets, "set": sets}


def _redis_py_calls(endpoint: Endpoint, keys: list[tuple[int, int]]) -> Any:
    driver = make_driver(endpoint)
    calls = {op: [driver.op(op, f"agg{c}", k, STR_VALUE, 1) for c, k in keys] for op in OPS}
    return driver, calls


def _client(
    system: str,
    target: Any,
    keys: list[tuple[int, int]],
    duration: float,
    barrier: Barrier,
    results: Any,
) -> None:
    """One client process: connect, write its keys, then one timed phase per op."""
    if system == "redis-py":
        conn, calls = _redis_py_calls(target, keys)
    elif system == "kvserve":
        conn, calls = _kvclient_calls((target.host, target.port), target.authkey.encode(), keys)
    else:
        conn, calls = _kvclient_calls(target, None, keys)
    out: dict[str, float] = {}
    for op in OPS:
        ring = calls[op]
        barrier.wait(_BARRIER_TIMEOUT)
        count = 0
        start = time.monotonic()
        end = start + duration
        while True:
            for call in ring:
                call()
            count += len(ring)
            now = time.monotonic()
            if now >= end:
                break
        out[op] = count / (now - start)
    conn.close()
    results.put(out)


def _keys_for(index: int, keys: int, containers: int) -> list[tuple[int, int]]:
    """Every key, (container, key) pairs, rotated so each process starts elsewhere."""
    pairs = [(i % containers, i // containers) for i in range(keys)]
    shift = index * keys // 16 % keys
    return pairs[shift:] + pairs[:shift]


def _phase(system: str, target: Any, args: argparse.Namespace) -> dict[str, float]:
    """Run ``--clients`` processes against one system; return summed ops/s per op."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(args.clients + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client,
            args=(
                system,
                target,
                _keys_for(i, args.keys, args.containers),
                args.duration,
                barrier,
                results,
            ),
            daemon=True,
        )
        for i in range(args.clients)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in OPS:
            barrier.wait(_BARRIER_TIMEOUT)
        rows = [results.get(timeout=args.duration * len(OPS) + _BARRIER_TIMEOUT) for _ in procs]
    finally:
        barrier.abort()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{system}: client processes exited with {bad}")
    return {op: sum(row[op] for row in rows) for op in OPS}


@contextlib.contextmanager
def _targets() -> Iterator[dict[str, Any]]:
    """Start the cluster, one kvserve and one standalone redis-server; yield their addresses."""
    from tests.redis_cluster import Standalone, running_cluster

    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(running_cluster())
        kvserve = start_server("kvserve")
        stack.callback(kvserve.stop)
        standalone = Standalone().start()
        stack.callback(standalone.stop)
        assert standalone.node is not None
        yield {
            "cluster": "redis-cluster://" + ",".join(cluster.seeds),
            "kvserve": kvserve.endpoint,
            "redis": standalone.url,
            "redis-py": Endpoint("redis", "127.0.0.1", standalone.node.port),
        }


def _cell(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def markdown(header: dict[str, Any], args: argparse.Namespace, runs: dict[str, Any]) -> str:
    """The report: ops/s and ratio to kvserve per (system, op)."""
    lines = [
        f"# Aggregate throughput, {args.clients} client processes ({header['date']})",
        "",
        f"Machine: {header['nproc']} vCPUs ({header['cpu']}), Linux {header['kernel']}, "
        f"Python {header['python']}, {header['redis_server']}, redis-py "
        f"{header['packages']['redis']}, commit {header['commit']}. "
        f"{args.clients} client processes and the servers (6 redis-server processes for the "
        f"cluster) share these {header['nproc']} vCPUs: the clients oversubscribe them, so "
        "this is the machine's throughput with clients and servers competing, not what the "
        "servers could serve from clients elsewhere.",
        "",
        f"Each process: {args.keys} keys in {args.containers} containers (several hash slots, "
        f"all masters), 100-char str values, {args.duration} s per op; {args.rounds} "
        "interleaved rounds (order rotating). ops/s summed over the processes, median "
        "[min-max] over rounds; ratio: median [min-max] of per-round ratios to one kvserve. "
        f"Load average {header['loadavg_start']} -> {header['loadavg_end']}; "
        f"{header['wall_s']:.0f} s in all.",
        "",
        "| system | op | ops/s | ratio to one kvserve |",
        "|---|---|---|---|",
    ]
    for op in OPS:
        for name in SYSTEMS:
            values = runs[name][op]
            ratios = [v / b for v, b in zip(values, runs["kvserve"][op], strict=True)]
            lines.append(
                f"| {LABELS[name]} | {op} | {_cell(values, ',.0f')} | {_cell(ratios, '.2f')}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the report and write it with the raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per op per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=256)
    parser.add_argument("--containers", type=int, default=8)
    parser.add_argument("--name", default="redis-aggregate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    header = environment()
    runs: dict[str, dict[str, list[float]]] = {n: {op: [] for op in OPS} for n in SYSTEMS}
    with _targets() as targets:
        for r in range(args.rounds):
            order = SYSTEMS[r % len(SYSTEMS) :] + SYSTEMS[: r % len(SYSTEMS)]
            for name in order:
                rates = _phase(name, targets[name], args)
                print(f"round {r + 1} {name}: {rates}", file=sys.stderr, flush=True)
                for op in OPS:
                    runs[name][op].append(rates[op])
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.monotonic() - t0
    report = markdown(header, args, runs)
    print(report)
    if not args.no_write:
        params = {k: v for k, v in vars(args).items() if k != "out"}
        data = {"header": header, "params": params, "runs": runs}
        base = write_results(args.out, args.name, report, data)
        print(f"wrote {base}.md and {base}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
