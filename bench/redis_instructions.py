"""``python -m bench.redis_instructions``: client instructions per call on a Redis Cluster.

:mod:`bench.redis_cpu` measures client CPU seconds per call, which swing by 20% and more on
this shared VM; this counts user-space instructions with callgrind instead (as
:mod:`bench.instructions` does for kvserve), so a change to the Valkey/Redis backend's call
path can be compared with redis-py's ``RedisCluster`` in one run, deterministically.

A real 3-master cluster (``tests/redis_cluster.py``) runs natively; each measurement is one
fresh client process under ``valgrind --tool=callgrind`` that connects, makes 200 warm-up
calls and then ``n`` calls of one op, and exits. Instructions per call =
``(total(N2) - total(N1)) / (N2 - N1)``: start-up, imports and connecting cancel. Systems:

- ``kvclient``: this tree's ``kvclient.connect("redis-cluster://...")``, ``d.get(k)`` and
  ``d.incr(k)`` (one EVALSHA each, with the codec, and for ``incr`` its request id);
- ``kvclient-NAME`` (``--tree DIR``): the same from another source tree;
- ``RedisCluster``: redis-py's ``hget`` / ``hincrby`` (no codec, no exactly-once);
- ``Redis``: a plain ``redis.Redis`` on the key's master (the floor).

The report goes to ``bench/results/<date>-redis-instructions.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import environment, loadavg, write_results

ROOT: Final = Path(__file__).resolve().parent.parent
OPS: Final = ("get", "incr")
WARMUP: Final = 200
RUN_TIMEOUT: Final = 300.0


def _client(system: str, op: str, n: int, seeds: str) -> int:
    """One measured process: ``n`` calls of ``op`` after the warm-up."""
    from collections.abc import Callable

    call: Callable[[], Any]
    if system == "kvclient":
        import kvclient

        kv = kvclient.connect("redis-cluster://" + seeds)
        d = kv.dict("bench")
        d["k"] = "v" * 100
        call = (lambda: d.get("k")) if op == "get" else (lambda: d.incr("n"))
    else:
        import redis
        from redis.cluster import ClusterNode, RedisCluster

        host, port = seeds.split(",", maxsplit=1)[0].split(":")
        rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))])  # type: ignore[no-untyped-call]
        rc.hset("hb", "k", "v" * 100)
        client: Any = rc
        if system == "Redis":
            node = rc.get_node_from_key("hb")  # type: ignore[no-untyped-call]
            client = redis.Redis(host=node.host, port=node.port)
        call = (
            (lambda: client.hget("hb", "k"))
            if op == "get"
            else (lambda: client.hincrby("hb", "n", 1))
        )
    for _ in range(WARMUP + n):  # bounded: the parent kills a slow run
        call()
    print(
        json.dumps({"kvclient": str(sys.modules["kvclient"].__file__)})
        if system == "kvclient"
        else "{}",
        flush=True,
    )
    return 0


def _count(system: str, path: str, op: str, n: int, seeds: str, scratch: Path) -> int:
    out = scratch / f"{system}-{op}-{n}.out"
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT), env.get("PYTHONPATH")) if p)
    kind = "kvclient" if system.startswith("kvclient") else system
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no",
        f"--log-file={out.with_suffix('.log')}", sys.executable, "-m", "bench.redis_instructions",
        "--client", kind, op, str(n), seeds,
    ]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, env=env, cwd=ROOT, timeout=RUN_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{system} {op} n={n}: {done.stderr.decode(errors='replace')[-500:]}")
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{out}: no totals line")


def main(argv: list[str] | None = None) -> int:
    """Count every (system, op); print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n1", type=int, default=1000)
    parser.add_argument("--n2", type=int, default=4000)
    parser.add_argument("--tree", type=Path, help="also count kvclient from this source tree")
    parser.add_argument("--tree-name", default="", help="its name (default: its .commit)")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        system, op, n, seeds = args.client
        return _client(system, op, int(n), seeds)
    from tests.redis_cluster import running_cluster

    systems: dict[str, str] = {
        "kvclient": str(ROOT / "client") + os.pathsep + str(ROOT / "protocol")
    }
    if args.tree:
        name = args.tree_name or (args.tree / ".commit").read_text().strip()
        systems[f"kvclient-{name}"] = os.pathsep.join(
            str(args.tree / d) for d in ("client", "protocol")
        )
    systems |= {"RedisCluster": "", "Redis": ""}
    t0, load0 = time.monotonic(), loadavg()
    per: dict[str, dict[str, float]] = {}
    with running_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        seeds = ",".join(cluster.seeds)
        for op in OPS:
            for system, path in systems.items():
                a = _count(system, path, op, args.n1, seeds, Path(tmp))
                b = _count(system, path, op, args.n2, seeds, Path(tmp))
                per.setdefault(system, {})[op] = (b - a) / (args.n2 - args.n1)
                print(f"{system:20} {op:5} {per[system][op]:10,.0f} instr/call", flush=True)
    env = environment()
    lines = [
        "# Client instructions per call on a 3-master Redis Cluster (callgrind)",
        "",
        f"{env.get('cpu', '?')}, Python {env.get('python', '?')}, packages "
        f"{env.get('packages', '?')}; kvmanager {env.get('commit', '?')}; load {load0} at the "
        f"start; {time.monotonic() - t0:.0f} s. Each cell: a fresh client process under "
        f"callgrind, {WARMUP} warm-up calls, then N calls; (total(N2) - total(N1)) / (N2 - N1), "
        f"N1 = {args.n1}, N2 = {args.n2}; user-space instructions of the client only, "
        "`PYTHONHASHSEED=0`. `get`: kvclient `d.get(k)` / redis-py `hget`; `incr`: kvclient "
        "`d.incr(k)` (its request id recorded) / redis-py `hincrby`.",
        "",
        "| system | get instr/call | x RedisCluster | incr instr/call | x RedisCluster |",
        "|---|---:|---:|---:|---:|",
    ]
    for system, ops in per.items():
        cells = [f"{ops[op]:,.0f} | {ops[op] / per['RedisCluster'][op]:.2f}" for op in OPS]
        lines.append(f"| `{system}` | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    base = write_results(ROOT / "bench" / "results", "redis-instructions", report, per)
    print(f"wrote {base}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
