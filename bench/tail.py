"""``python -m bench.tail``: where the 1-client latency tail comes from, measured in the server.

On this shared 2-vCPU machine the client's p99 of a GET is a few milliseconds for every
system, the C-like floor included: a request that arrives while the server's vCPU runs someone
else waits for that one's time slice. That says nothing about kvserve. This measures inside
the server process instead, per request, so other processes' load can be told apart:

- the server runs under a wrapper (``python -m bench.tail --wrap OUT -- <server argv>``) that
  times each request from the start of the loop's handler for a readable connection (kvserve
  ``Server._on_readable``, the floor's ``_EpollServer._readable``) to its reply's ``_send``
  (receive, decode, dispatch, encode; not the send itself, which on one vCPU hands the CPU to
  the woken client) with ``perf_counter_ns`` (wall) and ``thread_time_ns`` (this thread's
  CPU), counts the thread's context switches over that span (``getrusage(RUSAGE_THREAD)``:
  a request switched out was preempted by another process, since serving never blocks), and
  records every garbage collection (``gc.callbacks``: generation, pause, in which request);
- SIGUSR1 clears the records (after the client's warm-up), SIGUSR2 writes them as JSON;
- one client process per phase (:mod:`bench.cpu`'s ``--client``, pinned), ``--ops`` operations
  counted for CPU, then as many timed one by one (the end-to-end p50/p99).

Operations: ``get`` and ``set`` of a 100-char str on one key (the benchmark's pattern), and
``grow``: SET of ``{'a': 1, 'b': [1, 2, 3]}`` to ``--ops`` new keys, which adds objects the
collector tracks and so provokes collections (a full one walks every tracked object).

Systems: ``kvserve`` (this tree), ``kvserve-bpN`` (this tree with ``--busy-poll-us N``, from
``--busy-poll-us N``, repeatable), ``kvserve-NAME`` (``--tree DIR``, e.g. main exported with
``git archive``; ``kvserve-NAME-bpN`` with each ``--busy-poll-us``), ``raw``
(:mod:`bench.floor`), ``control`` (no server: the same timing of a fixed piece of work, for
the machine's own tail). Rounds are interleaved (system order
rotating), every server fresh per phase and pinned to cpu 0; ``--pin same`` puts the client on
cpu 0 too, ``--pin cross`` on cpu 1. The server also records how long it waits for the client
between a reply and the next request (what busy polling has to cover). The report,
``bench/results/<date>-tail.md`` and ``.json``: per system and op, median over rounds of the
in-server percentiles of all requests and of those not switched out, the share switched out,
collections per 100k requests and their pauses, the waits, and the client's p50/p99 with the
load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import statistics
import sys
import time
from array import array
from pathlib import Path
from types import FrameType
from typing import Any, Final

if not __package__:  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import (
    AUTHKEY_ENV,
    PHASE_TIMEOUT,
    PINS,
    System,
    _Client,
    _pin_process,
    client_argv,
    client_env,
)
from bench.measure import environment, loadavg, percentile, write_results
from bench.systems import DICT_VALUE, STR_VALUE, Endpoint, make_driver, start_server

__all__ = ["main"]

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
BENCH_ROOT: Final = Path(__file__).resolve().parent.parent
OPS: Final = ("get", "set", "grow")
_CONTROL_REPEAT: Final = 8
_SPIKE: Final = 10.0
"""A request is a spike when its wall time is this many times the median or more."""


# -- the server wrapper -----------------------------------------------------------------------


class _Recorder:
    """Per-request wall, CPU and context switches, and every collection, in one server."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.wall = array("q")
        self.cpu = array("q")
        self.switched = array("b")
        self.gc_in = array("q")  # collector pause inside each request, ns
        # From the end of one reply's send to the start of the next request: how long the
        # server waits for its client (what --busy-poll-us must cover to find it awake).
        self.gaps = array("q")
        self._sent = 0
        self.collections: list[tuple[int, int, int]] = []  # generation, pause ns, request
        self._gc_start = 0
        self._gc_total = 0  # ns paused in collections so far

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter_ns()
        if phase == "start":
            self._gc_start = now
            return
        pause = now - self._gc_start
        self._gc_total += pause
        self.collections.append((int(info["generation"]), pause, len(self.wall)))

    def wrap(self, handler: Any, send: Any) -> tuple[Any, Any]:
        """Return ``handler`` and ``send`` timed: a request lasts from the one to the other.

        Up to the reply's send, not the handler's return: with client and server on one
        vCPU, the send wakes the client, which runs at once and would be counted.
        """
        wall, cpu, switched, gc_in = self.wall, self.cpu, self.switched, self.gc_in
        gaps = self.gaps
        clock, thread_clock = time.perf_counter_ns, time.thread_time_ns
        usage, who = resource.getrusage, resource.RUSAGE_THREAD
        recorder = self
        start: list[Any] = [None, 0, 0, 0]  # rusage, gc total, cpu, wall at the request's start

        def timed(server: Any, conn: Any) -> None:
            start[0] = usage(who)
            start[1] = recorder._gc_total
            start[2] = thread_clock()
            start[3] = clock()
            if recorder._sent:
                gaps.append(start[3] - recorder._sent)
                recorder._sent = 0
            try:
                handler(server, conn)
            finally:
                start[0] = None

        def timed_send(server: Any, conn: Any, payload: Any) -> None:
            u0 = start[0]
            if u0 is not None:  # the first reply of this request
                w1 = clock()
                c1 = thread_clock()
                u1 = usage(who)
                start[0] = None
                wall.append(w1 - start[3])
                cpu.append(c1 - start[2])
                switched.append((u1.ru_nvcsw + u1.ru_nivcsw) != (u0.ru_nvcsw + u0.ru_nivcsw))
                gc_in.append(recorder._gc_total - start[1])
            send(server, conn, payload)
            recorder._sent = clock()

        return timed, timed_send

    def reset(self, signum: int, frame: FrameType | None) -> None:
        for values in (self.wall, self.cpu, self.switched, self.gc_in, self.gaps):
            del values[:]
        self.collections.clear()

    def data(self) -> dict[str, Any]:
        """Return what was recorded (:func:`_analyse` reads it)."""
        return {
            "wall": self.wall.tolist(),
            "cpu": self.cpu.tolist(),
            "switched": self.switched.tolist(),
            "gc_in": self.gc_in.tolist(),
            "gaps": self.gaps.tolist(),
            "collections": self.collections,
            "threshold": gc.get_threshold(),
            "frozen": gc.get_freeze_count(),
            "enabled": gc.isenabled(),
        }

    def dump(self, signum: int, frame: FrameType | None) -> None:
        Path(self.out + ".tmp").write_text(json.dumps(self.data()))
        os.replace(self.out + ".tmp", self.out)


def _wrap_main(out: str, argv: list[str]) -> None:
    """Run the server ``argv`` (``python -m MODULE ...``) in this process, instrumented."""
    module = argv[argv.index("-m") + 1]
    rest = argv[argv.index("-m") + 2 :]
    recorder = _Recorder(out)
    gc.callbacks.append(recorder.on_gc)
    signal.signal(signal.SIGUSR1, recorder.reset)
    signal.signal(signal.SIGUSR2, recorder.dump)
    if module == "kvserve":
        import kvserve.__main__
        import kvserve.server

        cls: Any = kvserve.server.Server
        cls._on_readable, cls._send = recorder.wrap(cls._on_readable, cls._send)
        sys.argv = ["kvserve", *rest]
        kvserve.__main__.main()
    elif module == "bench.floor":
        import bench.floor

        cls = bench.floor._EpollServer
        cls._readable, cls._send = recorder.wrap(cls._readable, cls._send)
        sys.argv = ["floor", *rest]
        bench.floor.main()
    else:
        raise SystemExit(f"bench.tail --wrap: unknown server module {module!r}")


# -- the client -------------------------------------------------------------------------------


def _client_main(args: argparse.Namespace) -> int:
    """One phase's client (the same stdin/stdout protocol as :mod:`bench.cpu`'s)."""
    os.sched_setaffinity(0, {args.cpu})
    endpoint = Endpoint(args.system, args.host, args.port, os.environ.get(AUTHKEY_ENV, ""))
    driver = make_driver(endpoint)
    try:
        if args.op == "grow":
            op = _grower(driver, args.prefix)
        else:
            op = driver.op(args.op, args.prefix, 0, STR_VALUE, 1)
        for _ in range(args.warmup):
            op()
        print(json.dumps({"warm": True}), flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        deadline = time.monotonic() + PHASE_TIMEOUT
        for i in range(args.ops):
            op()
            if i % 1000 == 0 and time.monotonic() > deadline:
                break
        clock = time.perf_counter_ns
        times = array("q")
        for i in range(args.ops):
            t0 = clock()
            op()
            times.append(clock() - t0)
            if i % 1000 == 0 and time.monotonic() > deadline:
                break
        ordered = sorted(times)
        print(
            json.dumps(
                {
                    "timed": len(ordered),
                    "p50_us": percentile(ordered, 0.50) / 1e3,
                    "p99_us": percentile(ordered, 0.99) / 1e3,
                }
            ),
            flush=True,
        )
        sys.stdin.readline()
        return 0
    finally:
        driver.close()


def _grower(driver: Any, prefix: str) -> Any:
    """Return a callable that SETs a small dict to a new key each call."""
    counter = iter(range(1 << 62))
    if hasattr(driver, "kv"):
        d = driver.kv.dict("bench")
        return lambda: d.__setitem__(f"{prefix}:{next(counter)}", DICT_VALUE)
    call = driver.client.call
    return lambda: call(["set", f"{prefix}:{next(counter)}", DICT_VALUE])


def _control_main(args: argparse.Namespace) -> int:
    """The control: a fixed piece of work of a GET's size, timed like a request, no I/O.

    Whatever tail it shows is the machine's (interrupts, the hypervisor, caches other
    processes emptied), not any server's.
    """
    import msgpack

    os.sched_setaffinity(0, {args.cpu})
    recorder = _Recorder("")
    gc.callbacks.append(recorder.on_gc)
    packer = msgpack.Packer()
    request = packer.pack(["bench", "__getitem__", ["r0:0"], None])
    store = {"r0:0": STR_VALUE}

    def work(server: Any, conn: Any) -> None:
        for _ in range(_CONTROL_REPEAT):  # about a kvserve GET's server time in all
            message = msgpack.unpackb(request, strict_map_key=False)
            reply = packer.pack(["#RETURN", store.get(message[2][0])])
        send(server, conn, reply)

    def sent(server: Any, conn: Any, payload: Any) -> None:
        return None

    timed, send = recorder.wrap(work, sent)
    for _ in range(args.warmup):
        timed(None, None)
    recorder.reset(0, None)
    deadline = time.monotonic() + PHASE_TIMEOUT
    for i in range(2 * args.ops):
        timed(None, None)
        if i % 1000 == 0 and time.monotonic() > deadline:
            break
    print(json.dumps(_analyse(recorder.data())), flush=True)
    return 0


# -- the parent -------------------------------------------------------------------------------


def _phase(
    system: str, path: tuple[str, ...], op: str, rnd: int, args: argparse.Namespace
) -> dict[str, Any]:
    if system == "control":
        return _control_phase(op, rnd, args)
    kind = "raw" if system == "raw" else "kvserve"
    out = Path(f"/tmp/bench-tail-{os.getpid()}-{system}-{op}-{rnd}.json")
    wrapper = [sys.executable, "-m", "bench.tail", "--wrap", str(out), "--"]
    server_args: tuple[str, ...] = ()
    if kind == "kvserve" and "-bp" in system:
        server_args = ("--busy-poll-us", system.rpartition("-bp")[2])
    server = start_server(kind, path, wrapper=wrapper, server_args=server_args)
    result: dict[str, Any] = {"system": system, "op": op, "round": rnd, "load": loadavg()}
    try:
        server_cpu, client_cpu = PINS[args.pin]
        _pin_process(server.pid, server_cpu)
        endpoint = server.endpoint
        env = client_env(System(system, kind, path), endpoint)
        argv = client_argv("bench.tail", endpoint, client_cpu, op, args, f"r{rnd}")
        client = _Client(argv, env)
        try:
            client.read(PHASE_TIMEOUT, f"{system} {op}: warm-up")
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(0.05)  # the handler runs when the loop next wakes: let it
            client.send("go")
            result.update(client.read(2 * PHASE_TIMEOUT + 5, f"{system} {op}: ops"))
            os.kill(server.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            client.close()
        result.update(_analyse(json.loads(out.read_text())))
    finally:
        server.stop()
        out.unlink(missing_ok=True)
    result["load_end"] = loadavg()
    return result


def _control_phase(op: str, rnd: int, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"system": "control", "op": op, "round": rnd, "load": loadavg()}
    argv = [
        sys.executable,
        "-m",
        "bench.tail",
        "--control",
        f"--cpu={PINS[args.pin][0]}",
        f"--ops={args.ops}",
        f"--warmup={args.warmup}",
    ]
    env = {**os.environ, "PYTHONPATH": str(BENCH_ROOT)}
    client = _Client(argv, env)
    try:
        result.update(client.read(PHASE_TIMEOUT + 5, "control"))
    finally:
        client.close()
    result["p50_us"] = result["p99_us"] = 0.0
    result["load_end"] = loadavg()
    return result


def _analyse(data: dict[str, Any]) -> dict[str, Any]:
    wall, cpu, switched, gc_in = data["wall"], data["cpu"], data["switched"], data["gc_in"]
    n = len(wall)
    calm = sorted(w for w, s in zip(wall, switched, strict=True) if not s)
    walls, cpus, gaps = sorted(wall), sorted(cpu), sorted(data.get("gaps", []))

    def q(values: list[int], fraction: float) -> float:
        return percentile(values, fraction) / 1e3

    median = q(calm, 0.5) * 1e3
    spikes = [
        i
        for i, (w, s) in enumerate(zip(wall, switched, strict=True))
        if not s and w >= _SPIKE * median
    ]
    per = 100_000 / n if n else 0.0
    gens = [0, 0, 0]
    pauses: list[int] = []
    for generation, pause, _ in data["collections"]:
        gens[generation] += 1
        pauses.append(pause)
    return {
        "requests": n,
        "switched_share": sum(switched) / n if n else 0.0,
        "wall_p50": q(walls, 0.5),
        "wall_p99": q(walls, 0.99),
        "wall_max": walls[-1] / 1e3 if walls else 0.0,
        "calm_p50": q(calm, 0.5),
        "calm_p99": q(calm, 0.99),
        "calm_p999": q(calm, 0.999),
        "calm_max": calm[-1] / 1e3 if calm else 0.0,
        "cpu_p50": q(cpus, 0.5),
        "cpu_p99": q(cpus, 0.99),
        "spikes_per_100k": len(spikes) * per,
        "spikes_with_gc": sum(1 for i in spikes if gc_in[i]),
        "gc_per_100k": [g * per for g in gens],
        "gc_pause_max_us": max(pauses) / 1e3 if pauses else 0.0,
        "gc_pause_total_us_per_100k": sum(pauses) / 1e3 * per,
        "gc_threshold": data["threshold"],
        "gc_frozen": data["frozen"],
        "gap_p10": q(gaps, 0.10),
        "gap_p50": q(gaps, 0.50),
        "gap_p90": q(gaps, 0.90),
    }


def _systems(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...]]]:
    systems: list[tuple[str, tuple[str, ...]]] = [("kvserve", ())]
    systems += [(f"kvserve-bp{n}", ()) for n in args.busy_poll_us]
    if args.tree:
        tree = args.tree.resolve()
        path = (str(tree / "server"), str(tree / "client"))
        systems.append((f"kvserve-{args.tree_name}", path))
        systems += [(f"kvserve-{args.tree_name}-bp{n}", path) for n in args.busy_poll_us]
    systems.append(("raw", ()))
    if not args.no_control:
        systems.append(("control", ()))
    return systems


_COLUMNS: Final = (
    ("requests", "requests", "{:,.0f}"),
    ("switched out %", "switched_share", "{:.2%}"),
    ("p50 µs", "calm_p50", "{:.1f}"),
    ("p99 µs", "calm_p99", "{:.1f}"),
    ("p99/p50", "calm_ratio", "{:.2f}"),
    ("p99.9 µs", "calm_p999", "{:.1f}"),
    ("max µs", "calm_max", "{:.0f}"),
    ("all: p99/p50", "wall_ratio", "{:.1f}"),
    ("CPU p50 / p99 µs", "cpu", "{}"),
    ("spikes /100k", "spikes_per_100k", "{:.1f}"),
    ("gc /100k (gen 0,1,2)", "gc", "{}"),
    ("gc max pause µs", "gc_pause_max_us", "{:.0f}"),
    ("server waits p10 / p50 / p90 µs", "gap", "{}"),
    ("client p50 / p99 µs", "client", "{}"),
    ("client p99/p50", "client_ratio", "{:.1f}"),
)


def _row(results: list[dict[str, Any]]) -> list[str]:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in results))

    cells = []
    for _, key, fmt in _COLUMNS:
        if key == "calm_ratio":
            value: Any = statistics.median(r["calm_p99"] / r["calm_p50"] for r in results)
        elif key == "wall_ratio":
            value = statistics.median(r["wall_p99"] / r["wall_p50"] for r in results)
        elif key == "client_ratio":
            ratios = [r["p99_us"] / r["p50_us"] for r in results if r["p50_us"]]
            value = statistics.median(ratios) if ratios else 0.0
        elif key == "cpu":
            value = f"{med('cpu_p50'):.1f} / {med('cpu_p99'):.1f}"
        elif key == "gap":
            value = " / ".join(f"{med(f'gap_p{p}'):.0f}" for p in (10, 50, 90))
        elif key == "client":
            value = f"{med('p50_us'):.0f} / {med('p99_us'):.0f}"
        elif key == "gc":
            value = ", ".join(
                f"{statistics.median(r['gc_per_100k'][g] for r in results):.0f}" for g in range(3)
            )
        else:
            value = med(key)
        cells.append(fmt.format(value))
    return cells


def markdown(
    header: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]]
) -> str:
    """Return the report."""
    systems = [name for name, _ in _systems(args)]
    out = [
        "# kvmanager benchmark: the latency tail, measured inside the server (issue 19)",
        "",
        f"Machine: {header['cpu']}, {header['nproc']} CPUs, kernel {header['kernel']}; Python "
        f"{header['python']}; kvmanager {header['commit']}; load average "
        f"{header['loadavg_start']} at the start, {header['loadavg_end']} at the end; "
        f"{header['wall_s']:.0f} s. Pin `{args.pin}` (server cpu {PINS[args.pin][0]}, client "
        f"cpu {PINS[args.pin][1]}); {args.rounds} interleaved rounds, {args.warmup:,} warm-up "
        f"ops, then {args.ops:,} ops and {args.ops:,} more timed by the client; a fresh "
        "server per phase. Method: `python -m bench.tail` (its docstring).",
        "",
        "In the server, per request (from the loop's handler for a readable connection to "
        "the reply's send: receive, decode, dispatch, encode): wall time of the requests "
        "**not switched out** (p50, p99, p99.9, max), the share that was switched out (the "
        "thread lost its vCPU mid-request: other processes' load), p99/p50 of all of them, "
        "thread CPU time, spikes (not switched out, wall >= "
        f"{_SPIKE:.0f}x the median) and garbage collections per 100k requests. Client: "
        "round trip p50/p99 of the timed pass. Cells: median over rounds.",
        "",
        "| op | system | " + " | ".join(title for title, _, _ in _COLUMNS) + " |",
        "|---|---|" + "---:|" * len(_COLUMNS),
    ]
    for op in args.ops_kinds:
        for system in systems:
            mine = [
                r for r in results if (r["system"], r["op"]) == (system, op) and "requests" in r
            ]
            if not mine:
                out.append(f"| {op} | `{system}` | failed |")
                continue
            out.append(f"| {op} | `{system}` | " + " | ".join(_row(mine)) + " |")
    out += ["", "Load average at each phase's start:", ""]
    out += [f"- r{r['round'] + 1} {r['op']} `{r['system']}`: {r['load']}" for r in results]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.tail``: see the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wrap"]:
        _wrap_main(argv[1], argv[argv.index("--") + 1 :])
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--pin", choices=sorted(PINS), default="same")
    parser.add_argument("--only", dest="ops_kinds", action="append", choices=OPS)
    parser.add_argument("--tree", type=Path)
    parser.add_argument("--tree-name", default="base")
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        action="append",
        default=[],
        help="add kvserve-bpN: this tree with --busy-poll-us N (repeatable)",
    )
    parser.add_argument("--name", default="tail")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-control", action="store_true", help="skip the control")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    for name in ("system", "host", "prefix", "op"):
        parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    for name in ("port", "cpu"):
        parser.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return _client_main(args)
    if args.control:
        return _control_main(args)
    args.ops_kinds = args.ops_kinds or list(OPS)
    header = environment(args.tree)
    started = time.monotonic()
    systems = _systems(args)
    results: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
        for op in args.ops_kinds:
            for name, path in order:
                try:
                    result = _phase(name, path, op, rnd, args)
                except RuntimeError as exc:
                    result = {"system": name, "op": op, "round": rnd, "error": str(exc)}
                    print(f"r{rnd + 1} {op} {name}: {exc}", file=sys.stderr, flush=True)
                else:
                    print(
                        f"r{rnd + 1} {op:4} {name:14} calm p50 {result['calm_p50']:6.1f} p99 "
                        f"{result['calm_p99']:7.1f} µs, switched {result['switched_share']:.2%}"
                        f", gc/100k {result['gc_per_100k']}, client p50 {result['p50_us']:.0f}"
                        f" p99 {result['p99_us']:.0f} µs, load {result['load']}",
                        file=sys.stderr,
                        flush=True,
                    )
                results.append(result)
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.monotonic() - started
    report = markdown(header, args, results)
    print(report)
    if not args.no_write:
        base = write_results(RESULTS_DIR, args.name, report, {"header": header, "results": results})
        print(f"wrote {base}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
