"""``python -m bench.redis_queue_commands``: Redis commands per queue operation, A/B by tree.

What a queue ``put``/``get`` costs on the Valkey/Redis backend, counted by the server, so the
figure does not depend on the machine's load: ``CONFIG RESETSTAT``, N operations, then ``INFO
commandstats`` (Redis counts every command a script calls there too). Per operation it
reports the round trips (``EVALSHA``, ``BLMOVE``/``BLPOP``: what the client sends) and the
commands the scripts ran, plus the server's µs per ``EVALSHA`` (its own accounting; noisy
on a loaded machine, unlike the counts). Scenarios, on one standalone ``redis-server``:

- ``put``: ``q.put(i)`` on an unbounded queue;
- ``get``: ``q.get()`` (may wait) on a queue with a backlog;
- ``get_nowait``: the same with ``get_nowait()``;
- ``handoff``: a consumer thread blocked in ``q.get()`` on the empty queue, woken by one
  ``put`` (counts are for the put and the get together).

``--baseline TREE`` runs the same in a source tree exported from another commit (``git
archive <commit> | tar -x -C TREE``), in a child process with that tree's packages first on
``sys.path``; rounds alternate between the trees. Writes
``bench/results/<date>-<time>-redis-queue-commands.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
_ROUND_TRIPS = ("evalsha", "eval", "blmove", "blpop")
_SCENARIOS = ("put", "get", "get_nowait", "handoff")


def _stats(r: Any) -> dict[str, tuple[int, float]]:
    """``INFO commandstats``: command -> (calls, usec per call)."""
    found = r.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec_per_call"]))
        for key, v in found.items()
    }


def _measure(url: str, scenario: str, ops: int) -> dict[str, Any]:
    """Run ``ops`` operations of ``scenario`` with this process's kvclient; count them."""
    import redis

    import kvclient

    r = redis.Redis.from_url(url)
    with kvclient.connect(url) as kv:
        name = f"bench-{scenario}-{time.monotonic_ns()}"
        q = kv.queue(name)
        if scenario in ("get", "get_nowait"):
            for i in range(ops):
                q.put(i)
        q.qsize()  # the scripts are loaded before the count starts
        done = threading.Event()
        consumer: threading.Thread | None = None
        if scenario == "handoff":

            def consume() -> None:
                for _ in range(ops):
                    q.get(timeout=30)
                    done.set()

            consumer = threading.Thread(target=consume)
        r.config_resetstat()
        if consumer is not None:
            consumer.start()
        for i in range(ops):
            if scenario == "put":
                q.put(i)
            elif scenario == "get":
                q.get()
            elif scenario == "get_nowait":
                q.get_nowait()
            else:
                time.sleep(0.005)  # the consumer is back in its wait
                done.clear()
                q.put(i)
                assert done.wait(30)
        if consumer is not None:
            consumer.join(60)
        stats = _stats(r)
    r.close()
    for command in list(stats):  # the count's own, and a new connection's HELLO
        if command.startswith(("config", "info", "hello", "client")):
            del stats[command]
    trips = sum(stats.get(c, (0, 0.0))[0] for c in _ROUND_TRIPS)
    inner = {c: n / ops for c, (n, _us) in stats.items() if c not in _ROUND_TRIPS}
    return {
        "round_trips": trips / ops,
        "in_script": sum(inner.values()),
        "by_command": {c: round(v, 3) for c, v in sorted(inner.items())},
        "evalsha_us": stats.get("evalsha", (0, 0.0))[1],
    }


def _child(url: str, ops: int) -> None:
    import kvclient

    assert Path(kvclient.__file__).is_relative_to(
        Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    )
    print(
        json.dumps({s: _measure(url, s, ops if s != "handoff" else ops // 10) for s in _SCENARIOS})
    )


def _run_tree(tree: Path, url: str, ops: int) -> dict[str, Any]:
    # This module from this tree (cwd), kvclient and kvproto from ``tree`` (before the
    # installed ones).
    paths = [str(tree / part) for part in ("client", "protocol", "server")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = [sys.executable, "-m", "bench.redis_queue_commands", "--child", url]
    out = subprocess.run(
        [*command, "--ops", str(ops)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode:
        raise RuntimeError(f"{tree}: {out.stderr}")
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and write the report."""
    from tests.redis_cluster import Standalone

    from bench.measure import environment, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="a tree of another commit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.ops)
        return 0
    trees = {"this tree": ROOT}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    server = Standalone().start()
    try:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for n in range(args.rounds):
            order = list(trees) if n % 2 == 0 else list(reversed(trees))
            for name in order:
                runs[name].append(_run_tree(trees[name], server.url, args.ops))
    finally:
        server.stop()
    env = environment()
    lines = [
        "# Redis commands per queue operation",
        "",
        f"{env['date']}, {env['redis_server']}, load {env['loadavg_start']}; "
        f"{args.rounds} rounds (trees alternating) x {args.ops} ops ({args.ops // 10} for "
        "handoff). Counts from `INFO commandstats` (the same every round); µs per EVALSHA: "
        "median over rounds, the server's own accounting.",
        "",
    ]
    for name, tree in trees.items():
        lines.append(f"- {name}: {tree} ({environment(tree)['commit']})")
    lines += [
        "",
        "| scenario | tree | round trips/op | in-script commands/op | µs/EVALSHA | commands |",
        "|---|---|---:|---:|---:|---|",
    ]
    for scenario in _SCENARIOS:
        for name in trees:
            first = runs[name][0][scenario]
            us = statistics.median(run[scenario]["evalsha_us"] for run in runs[name])
            commands = ", ".join(f"{c} {v:g}" for c, v in first["by_command"].items())
            lines.append(
                f"| {scenario} | {name} | {first['round_trips']:.2f} | {first['in_script']:.2f} "
                f"| {us:.1f} | {commands} |"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    path = write_results(
        ROOT / "bench" / "results", "redis-queue-commands", report, {"env": env, "runs": runs}
    )
    print(f"wrote {path}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
