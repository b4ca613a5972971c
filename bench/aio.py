"""``python -m bench.aio``: kvclient.aio against threads on the sync client and redis.asyncio.

Issue 15's benchmark. One op, ``GET`` of a 100-byte str (``await d.get(k)``, ``d.get(k)``,
``await r.get(k)``), driven by N concurrent callers in **one client process**:

- ``aio``: N tasks on one :func:`kvclient.aio.connect` client (its pool: ``max_connections``
  64 by default, what a user gets);
- ``threads``: N threads on one :func:`kvclient.connect` client (a connection per thread);
- ``redis-asyncio``: N tasks on one ``redis.asyncio.Redis`` (hiredis) against a
  ``redis-server`` started here, over a ``BlockingConnectionPool`` of 64 (the same bound);

at N = 1, 16, 256, and as the reference of the target, ``procs``: 16 processes each with one
sync client (one caller each). Target: ``aio`` at 256 >= 0.8x ``procs``, and ``aio`` above
``redis-asyncio`` at every N.

Each server is pinned to CPU 0 and every client process to CPU 1 (``os.sched_setaffinity``;
on a 2-CPU machine the clients share one core, as one asyncio process has). Configurations run
in interleaved rounds (``--rounds``, shuffled order each round); a round measures ``--seconds``
of calls after a warm-up, all client processes starting at one instant. Reported per
configuration: ops/s (median over rounds), p50 and p99 latency of single calls (over every
call of the median round), and CPU microseconds per op of the client process(es) and of the
server, both measured over the timed window. Results go to ``bench/results/<date>-aio.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import select
import statistics
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import environment, loadavg, percentile, sample_process
from bench.systems import Server, SkipSystemError, start_server, value_for

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "k0"
VALUE = value_for(0)
SERVER_CPU, CLIENT_CPU = 0, 1
WARMUP = 0.5  # seconds of calls after every caller is ready, before the window
READY_WAIT = 10.0  # seconds after the first caller is warm before going without the rest
CLIENT_TIMEOUT = 120.0  # seconds a client process may take to get ready, or to finish
SAMPLES_PER_PROCESS = 200_000  # latencies kept by each client process (evenly spaced)


@dataclass(frozen=True)
class Config:
    """One measured configuration: a client mode, N callers, and how many client processes."""

    mode: str  # aio, threads, redis-asyncio, procs
    n: int  # callers per process
    processes: int = 1

    @property
    def name(self) -> str:
        if self.mode == "procs":
            return f"{self.processes} sync processes"
        return f"{self.mode} N={self.n}"

    @property
    def system(self) -> str:
        return "redis" if self.mode == "redis-asyncio" else "kvserve"


# -- the client process -----------------------------------------------------------------------


def _pin_client() -> None:
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CLIENT_CPU} if CLIENT_CPU in cpus or len(cpus) > 1 else cpus)


class _Window:
    """The timed window, told by the parent once every caller of this process is warm.

    Callers call from the start; each counts as warm after its first call. When all are, the
    process prints ``ready``; the parent answers (stdin) with the window's start and stop
    (``time.perf_counter`` values: CLOCK_MONOTONIC, the same in every process), read here by
    a thread, which also measures this process's CPU time over the window.
    """

    def __init__(self, callers: int) -> None:
        self.start = self.stop = math.inf
        self.cpu = 0.0
        self._unwarmed = callers
        self.starved = 0
        self._said_ready = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def warm(self) -> None:
        with self._lock:
            self._unwarmed -= 1
            if self._unwarmed == 0:
                self._ready()
            elif self._timer is None:
                # A pool that is not first come first served may starve some callers for
                # ever (redis.asyncio's BlockingConnectionPool at N=256): go without them.
                self._timer = threading.Timer(READY_WAIT, self._ready_anyway)
                self._timer.daemon = True
                self._timer.start()

    def _ready(self) -> None:
        if not self._said_ready:
            self._said_ready = True
            print("ready", flush=True)

    def _ready_anyway(self) -> None:
        with self._lock:
            self.starved = self._unwarmed
            self._ready()

    @staticmethod
    def _cpu_now() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def _run(self) -> None:
        start, stop = (float(x) for x in sys.stdin.readline().split())
        self.start, self.stop = start, stop
        time.sleep(max(0.0, start - time.perf_counter()))
        cpu0 = self._cpu_now()
        time.sleep(max(0.0, stop - time.perf_counter()))
        self.cpu = self._cpu_now() - cpu0

    def join(self) -> None:
        self._thread.join(10)

    def tally(self, got: Any, t0: int, t1: int, lat: array[int]) -> int:
        """Check one call's answer; record its latency if in the window. Return 1 if it
        counted, 0 if before the window, -1 once the window is over (stop calling)."""
        if got != VALUE:
            raise AssertionError(f"read {got!r}")
        now = t1 / 1e9
        if now >= self.stop:
            return -1
        if now < self.start:
            return 0
        lat.append((t1 - t0) // 1000)
        return 1


async def _run_tasks(get: Callable[[], Any], n: int, window: _Window, lat: array[int]) -> int:
    """Run ``n`` tasks calling ``await get()`` until the window ends; record latencies in it."""
    counts = [0] * n

    async def caller(i: int) -> None:
        clock = time.perf_counter_ns
        done = 0
        if await get() != VALUE:
            raise AssertionError("wrong value")
        window.warm()
        while True:
            t0 = clock()
            got = await get()
            t1 = clock()
            counted = window.tally(got, t0, t1, lat)
            if counted < 0:
                break
            done += counted
        counts[i] = done

    await asyncio.gather(*(caller(i) for i in range(n)))
    return sum(counts)


def _run_threads(get: Callable[[], Any], n: int, window: _Window, lat: array[int]) -> int:
    """As :func:`_run_tasks`, with ``n`` threads calling ``get()``."""
    counts = [0] * n
    lats = [array("q") for _ in range(n)]

    def caller(i: int) -> None:
        clock = time.perf_counter_ns
        mine = lats[i]
        done = 0
        if get() != VALUE:
            raise AssertionError("wrong value")
        window.warm()
        while True:
            t0 = clock()
            got = get()
            t1 = clock()
            counted = window.tally(got, t0, t1, mine)
            if counted < 0:
                break
            done += counted
        counts[i] = done

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLIENT_TIMEOUT)
    for mine in lats:
        lat.extend(mine)
    return sum(counts)


def _client(args: argparse.Namespace) -> int:
    """One client process: connect, warm up, say ready, measure the window it is given."""
    _pin_client()
    lat: array[int] = array("q")
    window = _Window(args.n)
    if args.mode in ("aio", "redis-asyncio"):

        async def main() -> int:
            if args.mode == "aio":
                import kvclient.aio

                async with kvclient.aio.connect(args.address, args.authkey) as kv:
                    d = await kv.dict("bench")
                    return await _run_tasks(lambda: d.get(KEY), args.n, window, lat)
            import redis.asyncio

            # The same bound as kvclient.aio's pool; redis-py's default pool raises
            # MaxConnectionsError past 100 concurrent calls instead of waiting.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                f"redis://{args.address}",
                max_connections=64,
                timeout=CLIENT_TIMEOUT,
                socket_timeout=CLIENT_TIMEOUT,
                decode_responses=True,
            )
            r = redis.asyncio.Redis(connection_pool=pool)
            try:
                return await _run_tasks(lambda: r.get(KEY), args.n, window, lat)
            finally:
                await r.aclose()

        ops = asyncio.run(main())
    else:
        import kvclient

        with kvclient.connect(args.address, args.authkey) as kv:
            d = kv.dict("bench")
            ops = _run_threads(lambda: d.get(KEY), args.n, window, lat)
    window.join()
    step = max(1, len(lat) // SAMPLES_PER_PROCESS)
    result = {"ops": ops, "cpu": window.cpu, "starved": window.starved, "lat": list(lat[::step])}
    print(json.dumps(result), flush=True)
    return 0


# -- the parent -------------------------------------------------------------------------------

AUTHKEY_ENV = "BENCH_AUTHKEY"


def _configs(ns: list[int], procs: int) -> list[Config]:
    modes = ("aio", "threads", "redis-asyncio")
    return [Config(mode, n) for n in ns for mode in modes] + [Config("procs", 1, procs)]


def _measure(config: Config, server: Server, seconds: float) -> dict[str, Any]:
    """Run one configuration once; return its throughput, latency and CPU per op."""
    endpoint = server.endpoint
    argv = [
        sys.executable,
        "-m",
        "bench.aio",
        "--client",
        "--mode",
        "threads" if config.mode == "procs" else config.mode,
        "--n",
        str(config.n),
        "--address",
        f"{endpoint.host}:{endpoint.port}",
    ]
    env = dict(os.environ, **{AUTHKEY_ENV: endpoint.authkey})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
    )
    clients = [
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        for _ in range(config.processes)
    ]
    try:
        _wait_ready(clients, config)
        start = time.perf_counter() + WARMUP
        stop = start + seconds
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(f"{start!r} {stop!r}\n")
            c.stdin.flush()
        time.sleep(max(0.0, start - time.perf_counter()))
        before = sample_process(server.pid)
        time.sleep(max(0.0, stop - time.perf_counter()))
        after = sample_process(server.pid)
    except BaseException:
        for c in clients:
            c.kill()
            c.wait(10)
        raise
    outs = [c.communicate(timeout=CLIENT_TIMEOUT)[0] for c in clients]
    if any(c.returncode for c in clients):
        raise RuntimeError(f"{config.name}: a client failed ({[c.returncode for c in clients]})")
    results = [json.loads(out) for out in outs]
    ops = sum(r["ops"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    server_cpu = 0.0
    if before is not None and after is not None:
        server_cpu = (after.user + after.system) - (before.user + before.system)
    return {
        "ops_s": ops / seconds,
        "p50_us": percentile(lat, 0.50),
        "p99_us": percentile(lat, 0.99),
        "client_cpu_us_per_op": 1e6 * sum(r["cpu"] for r in results) / max(ops, 1),
        "server_cpu_us_per_op": 1e6 * server_cpu / max(ops, 1),
        "starved": sum(r["starved"] for r in results),
        "loadavg": loadavg(),
    }


def _wait_ready(clients: list[subprocess.Popen[str]], config: Config) -> None:
    """Wait (bounded) until every client process has printed ``ready``."""
    deadline = time.monotonic() + CLIENT_TIMEOUT
    waiting = {c.stdout: c for c in clients if c.stdout is not None}
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{config.name}: clients not ready in {CLIENT_TIMEOUT} s")
        readable, _, _ = select.select(list(waiting), [], [], left)
        for stream in readable:
            line = stream.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{config.name}: a client said {line!r}, not ready")
            del waiting[stream]


def _fill(servers: dict[str, Server]) -> None:
    import kvclient

    kv_end = servers["kvserve"].endpoint
    with kvclient.connect(f"{kv_end.host}:{kv_end.port}", kv_end.authkey) as kv:
        kv.dict("bench")[KEY] = VALUE
    if "redis" in servers:
        import redis

        r_end = servers["redis"].endpoint
        with redis.Redis(host=r_end.host, port=r_end.port) as r:
            r.set(KEY, VALUE)


def _ratio(rounds: list[dict[str, dict[str, Any]]], a: str, b: str) -> float | None:
    """Median over rounds of ``ops/s of a / ops/s of b`` measured in the same round."""
    ratios = [r[a]["ops_s"] / r[b]["ops_s"] for r in rounds if a in r and b in r and r[b]["ops_s"]]
    return statistics.median(ratios) if ratios else None


def _report(
    env: dict[str, Any],
    configs: list[Config],
    rounds: list[dict[str, dict[str, Any]]],
    ns: list[int],
) -> tuple[str, dict[str, Any]]:
    rows = []
    summary: dict[str, Any] = {}
    for config in configs:
        runs = [r[config.name] for r in rounds if config.name in r]
        if not runs:
            continue
        median = sorted(runs, key=lambda m: m["ops_s"])[len(runs) // 2]
        summary[config.name] = dict(median, rounds=[m["ops_s"] for m in runs])
        low, high = min(m["ops_s"] for m in runs), max(m["ops_s"] for m in runs)
        rows.append(
            f"| {config.name} | {median['ops_s']:,.0f} | {low:,.0f}-{high:,.0f} "
            f"| {median['p50_us']:.0f} | {median['p99_us']:.0f} "
            f"| {median['client_cpu_us_per_op']:.1f} | {median['server_cpu_us_per_op']:.1f} |"
        )
    ratios: dict[str, float | None] = {}
    lines = []
    procs = next((c.name for c in configs if c.mode == "procs"), "")
    for n in ns:
        for other, target in (("redis-asyncio", 1.0), ("threads", None)):
            key = f"aio N={n} / {other} N={n}"
            ratios[key] = value = _ratio(rounds, f"aio N={n}", f"{other} N={n}")
            verdict = (
                ""
                if target is None or value is None
                else (" (target > 1: met)" if value > target else " (target > 1: **missed**)")
            )
            lines.append(f"- {key}: {'-' if value is None else f'{value:.2f}x'}{verdict}")
    top = max(ns)
    key = f"aio N={top} / {procs}"
    value = _ratio(rounds, f"aio N={top}", procs) if procs else None
    if value is not None:
        ratios[key] = value
        verdict = "met" if value >= 0.8 else "**missed**"
        lines.append(f"- {key}: {value:.2f}x (target >= 0.8x: {verdict})")
    packages = env.get("packages", {})
    text = "\n".join(
        [
            f"# bench.aio: kvclient.aio vs sync threads vs redis.asyncio ({env['date']})",
            "",
            f"Machine: {env['nproc']} CPUs, {env['cpu']}, Linux {env['kernel']}, Python "
            f"{env['python']}; redis-py {packages.get('redis')}, hiredis "
            f"{packages.get('hiredis')}, {env['redis_server']}; commit {env['commit']}; load "
            f"{env['loadavg_start']} at start.",
            "",
            "GET of a 100-byte str; server pinned to CPU 0, client process(es) to CPU 1. "
            f"{len(rounds)} interleaved rounds; ops/s is the median round (range over rounds), "
            "p50/p99 of single calls in that round, CPU per op over the timed window.",
            "",
            "| configuration | ops/s | range | p50 us | p99 us | client CPU us/op "
            "| server CPU us/op |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Ratios (median over rounds of the per-round ratio of ops/s):",
            "",
            *lines,
            "",
        ]
    )
    return text, {"environment": env, "summary": summary, "ratios": ratios, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--client``, one client process of it)."""
    parser = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window per run")
    parser.add_argument("--n", default="1,16,256", help="callers per client, comma-separated")
    parser.add_argument("--procs", type=int, default=16, help="sync processes (the reference)")
    parser.add_argument("--only", action="append", help="configurations whose name has this")
    parser.add_argument("--name", default="aio", help="results file: <date>-<name>.md")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        args.n = int(args.n)
        args.authkey = os.environ.get(AUTHKEY_ENV, "")
        return _client(args)
    ns = [int(n) for n in args.n.split(",")]
    root = Path(__file__).resolve().parent.parent
    # A tree exported with its commit written beside it (bench/README.md: --tree) says so.
    env = environment(root if (root / ".commit").is_file() else None)
    servers: dict[str, Server] = {}
    try:
        servers["kvserve"] = start_server("kvserve")
        try:
            servers["redis"] = start_server("redis")
        except SkipSystemError as exc:
            print(f"redis: {exc}", file=sys.stderr)
        for server in servers.values():
            os.sched_setaffinity(server.pid, {SERVER_CPU})
        _fill(servers)
        configs = [
            c
            for c in _configs(ns, args.procs)
            if c.system in servers and (not args.only or any(o in c.name for o in args.only))
        ]
        rounds: list[dict[str, dict[str, Any]]] = []
        failures: list[str] = []
        rng = random.Random()
        for i in range(args.rounds):
            order = list(configs)
            rng.shuffle(order)
            rounds.append({})
            for config in order:
                try:
                    result = _measure(config, servers[config.system], args.seconds)
                except RuntimeError as exc:  # recorded, and left out of the table
                    print(f"round {i + 1}: {exc}", file=sys.stderr, flush=True)
                    failures.append(f"round {i + 1}: {exc}")
                    continue
                rounds[-1][config.name] = result
                print(
                    f"round {i + 1}: {config.name}: {result['ops_s']:,.0f} ops/s, "
                    f"p99 {result['p99_us']:.0f} us",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    env["loadavg_end"] = loadavg()
    text, data = _report(env, configs, rounds, ns)
    if failures:
        text += "\nRuns that failed (left out above):\n\n" + "".join(f"- {f}\n" for f in failures)
        data["failures"] = failures
    print(text)
    if not args.no_write:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stamp}-{args.name}.md").write_text(text)
        (RESULTS / f"{stamp}-{args.name}.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
