"""``python -m bench.targets``: issue 19's targets table, every ratio from one invocation.

One run measures, in this order, with the measurement code of the other bench modules:

1. :mod:`bench.cpu` phases (one client, GET and SET of a 100-char str; ``same``: server and
   client pinned to cpu 0, ``cross``: client on cpu 1): CPU per op of each side, wall time per
   op (1 / throughput) and, in a separate timed pass, p50 and p99; systems ``kvserve``,
   ``kvserve-bpN`` (``--busy-poll-us N``), ``raw`` (bench/floor.py, epoll) and ``stdlib``.
2. What busy polling costs when it does not pay: the CPU of an idle server over
   ``--idle-s`` seconds, and of a server whose one client sleeps 1 ms before each GET, with
   and without ``--busy-poll-us``.
3. :mod:`bench.run` rounds of the unpinned cases ``get``/``set-str-c4``/``-c16`` and
   ``mget100-str-c1`` against kvserve, the floor, the stdlib manager and Redis + redis-py
   (hiredis; ``redis-server`` started by the bench on a free port).
4. :mod:`bench.memory`: 1,000,000 keys x 100-char str values in kvserve, Redis and a plain
   dict.

With ``--mypyc-python PATH`` (a venv's Python with the compiled build) every kvserve row is
also measured for ``kvserve-mypyc``, its server (and the pinned clients of 1.) run by that
Python, each target judged for it in a row of its own beside the pure build's; the clients of
3. are the worker pool's, this interpreter's pure kvclient, for both.

It prints and writes ``bench/results/<UTC date>-targets.md`` and ``.json``; ``--readme``
rewrites the README's performance table (between ``<!-- perf-table -->`` markers) from it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

if not __package__:  # run as a script, `python bench/targets.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpu, run
from bench.cases import CASES
from bench.measure import environment, loadavg, write_results
from bench.memory import MemoryResult
from bench.report import Phase as RunPhase
from bench.report import Target, _header_table, _memory, _targets, _throughput, ratios
from bench.systems import INTERPRETERS, MYPYC
from bench.worker import WorkerPool

__all__ = ["main"]

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
README: Final = Path(__file__).resolve().parent.parent / "README.md"
ISSUE: Final = 19
LOAD_CASES: Final = ("get-str-c4", "set-str-c4", "get-str-c16", "set-str-c16", "mget100-str-c1")
LOAD_SYSTEMS: Final = ["kvserve", "raw", "stdlib", "redis"]
PAUSE_US: Final = 1000
MARK: Final = "<!-- perf-table -->"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- 2. idle and paced -----------------------------------------------------------------------


def _idle_and_paced(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Server CPU (cores) idle, and with one client sleeping 1 ms before each GET."""
    rows: list[dict[str, Any]] = []
    paced = argparse.Namespace(**{**vars(args), "pause_us": PAUSE_US, "ops": 1000})
    paced.warmup, paced.latency_ops = 100, 0
    systems = [s for s in cpu._systems(args) if s.kind == "kvserve" and not s.path]
    for rnd in range(args.rounds):
        for system in systems:
            server = cpu._start(system)
            try:
                time.sleep(0.5)  # start-up work done
                r0 = cpu._runtimes(server.pid)
                time.sleep(args.idle_s)
                r1 = cpu._runtimes(server.pid)
                idle = sum(ns - r0.get(t, 0) for t, ns in r1.items()) / 1e9 / args.idle_s
                phase = cpu._measure(system, server, "get", "cross", rnd, paced)
            finally:
                server.stop()
            row = {"system": system.name, "round": rnd, "idle_cores": idle}
            row.update(paced_cores=phase.server_cores, paced_us=phase.server_us, error=phase.error)
            rows.append(row)
            _log(
                f"idle/paced r{rnd + 1} {system.name:14} idle {idle:.4f} cores, client pausing "
                f"{PAUSE_US} µs: {phase.server_cores:.4f} cores, {phase.server_us:.1f} µs/op "
                f"{phase.error}"
            )
    return rows


# -- the targets -----------------------------------------------------------------------------


def _cpu_ratio(phases: list[cpu.Phase], name: str, base: str, op: str, pin: str, attr: str) -> Any:
    return _median(cpu._ratio(phases, name, base, op, pin, attr))


def _speed(phases: list[cpu.Phase], name: str, base: str, op: str, pin: str) -> float | None:
    """Throughput of ``name`` over ``base`` (wall per op of base / of name), median of rounds."""
    per_round = cpu._ratio(phases, name, base, op, pin, "wall_us")
    return _median([1 / r for r in per_round if r])


def evaluate(
    cpu_phases: list[cpu.Phase],
    paced: list[dict[str, Any]],
    load: list[RunPhase],
    memory: list[MemoryResult],
    bp: str,
    builds: tuple[str, ...] = ("kvserve",),
) -> list[Target]:
    """Issue 19's targets from this run's numbers.

    ``builds``: the kvserve systems judged, each in rows of its own (``kvserve``, and
    ``kvserve-mypyc`` with ``--mypyc-python``); busy polling's rows are the pure build's.
    """
    targets: list[Target] = []
    for name in builds:
        targets += _build_targets(cpu_phases, load, memory, name)
        if name == "kvserve":
            targets += _busy_poll_targets(cpu_phases, paced, bp)
    # Pure and compiled side by side: each target's rows together, in the issue's order
    # (busy polling's after the same-vCPU speeds, as the issue lists them).
    names = [t.name for t in _build_targets([], [], [], "kvserve")]
    names[5:5] = [t.name for t in _busy_poll_targets([], [], bp)]
    order = {n: i for i, n in enumerate(names)}
    return sorted(targets, key=lambda t: order.get(t.name.split(" [")[0], len(order)))


def _build_targets(
    cpu_phases: list[cpu.Phase], load: list[RunPhase], memory: list[MemoryResult], name: str
) -> list[Target]:
    """The rows of one build (``name``): CPU per op, throughput, latency, memory."""
    tag = "" if name == "kvserve" else f" [`{name}`]"
    targets = [
        Target(
            f"server CPU per {op.upper()} vs floor server, same vCPU{tag}",
            "<=",
            limit,
            [(name, _cpu_ratio(cpu_phases, name, "raw", op, "same", "server_us"))],
            ISSUE,
        )
        for op, limit in (("get", 1.10), ("set", 1.25))
    ]
    targets.append(
        Target(
            f"client CPU per GET / SET vs floor client, same vCPU{tag}",
            "<=",
            1.0,
            [
                (op, _cpu_ratio(cpu_phases, name, "raw", op, "same", "client_us"))
                for op in ("get", "set")
            ],
            ISSUE,
        )
    )
    for base, limit, what in (("raw", 0.90, "floor"), ("stdlib", 1.45, "stdlib manager")):
        targets.append(
            Target(
                f"1-client GET/s, same vCPU, vs {what}{tag}",
                ">=",
                limit,
                [(name, _speed(cpu_phases, name, base, "get", "same"))],
                ISSUE,
            )
        )
    for clients in (4, 16):
        for base, limit in (("raw", 1.0), ("stdlib", 1.6), ("redis", 1.5)):
            pairs: list[tuple[str, float | None]] = []
            for op in ("get", "set"):
                case = f"{op}-str-c{clients}"
                pairs.append((case, _median(ratios(load, (case, name), (case, base)))))
            targets.append(
                Target(
                    f"{clients} clients unpinned, GET/SET vs {base}{tag}", ">=", limit, pairs, ISSUE
                )
            )
    case = "mget100-str-c1"
    targets.append(
        Target(
            f"batched 100 GET vs redis-py pipeline(100) + hiredis{tag}",
            ">=",
            8.0,
            [(case, _median(ratios(load, (case, name), (case, "redis"))))],
            ISSUE,
        )
    )
    p99: list[tuple[str, float | None]] = []
    for op in ("get", "set"):
        mine = [p for p in cpu_phases if p.ok and p.system == name and p.pin == "same"]
        p99.append((op, _median([p.p99_us / p.p50_us for p in mine if p.op == op and p.p50_us])))
    targets.append(Target(f"p99 / p50, 1 client, same vCPU{tag}", "<=", 1.5, p99, ISSUE))
    mem = {m.system: m for m in memory if not m.error}
    targets.append(
        Target(
            (f"memory, {memory[0].keys:,} keys x 100 B str" if memory else "memory") + tag,
            "<=",
            200,
            [(name, mem[name].bytes_per_key if name in mem else None)],
            ISSUE,
            unit="B/key",
        )
    )
    return targets


def _busy_poll_targets(
    cpu_phases: list[cpu.Phase], paced: list[dict[str, Any]], bp: str
) -> list[Target]:
    """The rows of ``--busy-poll-us``: cross-vCPU speed, and what polling costs when idle."""
    targets = [
        Target(
            f"1-client GET/s, cross vCPU, `{bp}` vs floor and stdlib",
            ">=",
            2.0,
            [(base, _speed(cpu_phases, bp, base, "get", "cross")) for base in ("raw", "stdlib")],
            ISSUE,
            context=[
                (f"{base} (no busy poll)", _speed(cpu_phases, "kvserve", base, "get", "cross"))
                for base in ("raw", "stdlib")
            ],
        )
    ]
    idle = [r["idle_cores"] for r in paced if r["system"] == bp]
    targets.append(
        Target(
            f"idle server CPU with `{bp}` (cores; adaptive: burns none)",
            "<=",
            0.001,
            [("idle", max(idle) if idle else None)],
            ISSUE,
            unit="cores",
        )
    )
    by_round = {(r["system"], r["round"]): r["paced_cores"] for r in paced if not r["error"]}
    paced_x = [
        by_round[(bp, rnd)] / by_round[("kvserve", rnd)]
        for (name, rnd) in by_round
        if name == bp and by_round.get(("kvserve", rnd))
    ]
    targets.append(
        Target(
            f"server CPU, one client pausing {PAUSE_US} µs per GET: `{bp}` / without",
            "<=",
            1.10,
            [("cores", _median(paced_x))],
            ISSUE,
        )
    )
    return targets


# -- the report ------------------------------------------------------------------------------


def _latency_and_paced(cpu_phases: list[cpu.Phase], paced: list[dict[str, Any]]) -> list[str]:
    out = [
        "",
        "## Latency (1 client, separate timed pass) and busy polling's cost",
        "",
        "| pin | op | system | p50 µs | p99 µs | p99/p50 |",
        "|---|---|---|---:|---:|---:|",
    ]
    keys = sorted({(p.pin, p.op, p.system) for p in cpu_phases if p.ok and p.p50_us})
    for pin, op, system in keys:
        mine = [p for p in cpu_phases if p.ok and (p.pin, p.op, p.system) == (pin, op, system)]
        out.append(
            f"| {pin} | {op} | `{system}` | {cpu._cell([p.p50_us for p in mine])} | "
            f"{cpu._cell([p.p99_us for p in mine])} | "
            f"{cpu._ratio_cell([p.p99_us / p.p50_us for p in mine if p.p50_us])} |"
        )
    out += [
        "",
        f"Server CPU in cores (CPU seconds per second), idle, and with one client (cpu 1) "
        f"sleeping {PAUSE_US} µs before each GET; median [min-max] over rounds.",
        "",
        "| system | idle cores | paced-client cores | paced-client server µs/op |",
        "|---|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["system"] for r in paced):
        good = [r for r in paced if r["system"] == name and not r["error"]]

        def cell(key: str, rows: list[dict[str, Any]] = good, digits: int = 4) -> str:
            values = [r[key] for r in rows]
            if not values:
                return "-"
            return (
                f"{statistics.median(values):.{digits}f} "
                f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
            )

        out.append(
            f"| `{name}` | {cell('idle_cores')} | {cell('paced_cores')} | "
            f"{cell('paced_us', digits=1)} |"
        )
    return out


def readme_table(data: dict[str, Any], source: str) -> str:
    """Return the README's performance table from a targets results JSON."""
    targets: list[dict[str, Any]] = data["targets"]
    load = data["header"].get("loadavg_start", "?").split()[0]
    load_end = data["header"].get("loadavg_end", "?").split()[0]

    def num(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}x" if unit == "x" else f"{value:.3g} {unit}"

    lines = [
        MARK,
        f"Issue 19's targets, from `{source}` (one run of `python -m bench.targets` on a shared "
        f"2-vCPU VM, load average {load} at the start and {load_end} at the end; medians of "
        "per-round ratios):",
        "",
        "| target | required | measured | |",
        "|---|---|---|---|",
    ]
    for t in targets:
        unit = t.get("unit", "x")
        required = f"{t['threshold']:g}x" if unit == "x" else f"{t['threshold']:g} {unit}"
        pairs = ", ".join(
            [f"{label} {num(v, unit)}" for label, v in t["details"]]
            + [f"{label} {num(v, unit)} (for comparison)" for label, v in t.get("context", [])]
        )
        verdict = {"PASS": "met", "MISS": "missed", "n/a": "not measured"}[t["verdict"]]
        lines.append(f"| {t['name']} | {t['op']} {required} | {pairs} | {verdict} |")
    lines.append(MARK)
    return "\n".join(lines)


def write_readme(data: dict[str, Any], source: str, readme: Path = README) -> None:
    """Replace the table between the two markers in the README (error if they are missing)."""
    text = readme.read_text()
    pattern = re.compile(re.escape(MARK) + ".*?" + re.escape(MARK), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{readme}: needs exactly one pair of {MARK} markers")
    table = readme_table(data, source)
    readme.write_text(pattern.sub(lambda _: table, text))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--ops", type=int, default=20_000, help="pinned ops/phase (20000)")
    parser.add_argument("--warmup", type=int, default=2_000, help="pinned warm-up ops (2000)")
    parser.add_argument("--latency-ops", type=int, default=10_000, help="timed pass (10000)")
    parser.add_argument("--busy-poll-us", type=int, default=50, help="kvserve-bpN (50)")
    parser.add_argument("--idle-s", type=float, default=2.0, help="idle window, s (2)")
    parser.add_argument("--duration", type=float, default=2.0, help="unpinned phase, s (2)")
    parser.add_argument("--keys", type=int, default=1_000_000, help="memory keys (1e6)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory case")
    parser.add_argument("--no-load", action="store_true", help="skip the unpinned cases")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="targets", help="results file suffix (targets)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--readme",
        type=Path,
        metavar="RESULTS_JSON",
        help="only rewrite README.md's performance table from this results JSON, then exit",
    )
    parser.add_argument(
        "--mypyc-python",
        type=Path,
        metavar="PATH",
        help=f"also measure `{MYPYC}`: kvserve (and the pinned clients) run by this Python, of "
        "a venv with the compiled build (`KVMANAGER_MYPYC=1 pip install '.[bench]'`); "
        "skipped when not given",
    )
    args = parser.parse_args(argv)
    if args.mypyc_python:
        check = subprocess.run(
            [str(args.mypyc_python), "-c", "import kvserve.engine as e; print(e.__file__)"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if check.returncode != 0 or not check.stdout.strip().endswith(".so"):
            parser.error(f"--mypyc-python {args.mypyc_python}: its kvserve is not compiled")
        INTERPRETERS[MYPYC] = str(args.mypyc_python)
    if not args.busy_poll_us > 0:
        parser.error("--busy-poll-us must be > 0 (its targets compare with and without)")
    # What bench.cpu's own functions read.
    args.pin, args.tree, args.tree_name, args.pause_us = ["same", "cross"], None, None, 0
    # What bench.run's read.
    args.systems, args.no_restart = _load_systems(), True
    return args


def _builds() -> tuple[str, ...]:
    """The kvserve systems measured: the pure one, and the compiled one when given."""
    return ("kvserve", MYPYC) if MYPYC in INTERPRETERS else ("kvserve",)


def _load_systems() -> list[str]:
    return [*_builds(), *LOAD_SYSTEMS[1:]]


def main(argv: list[str] | None = None) -> int:
    """Measure everything, print the report, write it; return the exit code."""
    args = _parse_args(argv)
    if args.readme:
        data = json.loads(args.readme.read_text())
        write_readme(data, str(args.readme.resolve().relative_to(README.parent)))
        return 0
    t0 = time.monotonic()
    header = environment(None)
    systems = _load_systems()
    header.update(rounds=args.rounds, duration=args.duration, systems=systems, skipped={})
    bp = f"kvserve-bp{args.busy_poll_us}"
    pool = WorkerPool()
    try:
        cpu_phases = cpu.run(args)
        paced = _idle_and_paced(args)
        load: list[RunPhase] = []
        memory: list[MemoryResult] = []
        if not args.no_load:
            cases = [c for c in CASES if c.name in LOAD_CASES]
            pool.ensure(max(c.clients for c in cases))
            load = run._run_rounds(args, cases, systems, pool, header["skipped"])
        if not args.no_memory:
            args.systems = [*_builds(), "redis"]
            memory = run._run_memory(args, pool, header["skipped"])
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    finally:
        pool.close()
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.monotonic() - t0
    targets = evaluate(cpu_phases, paced, load, memory, bp, _builds())
    out = [f"# kvmanager benchmark: issue {ISSUE}'s targets", ""]
    out += _header_table(header)
    out += _targets(targets)
    cpu_md = cpu.markdown(header, args, cpu_phases, cpu._systems(args))
    out += ["", cpu_md.replace("# kvmanager benchmark: CPU", "## CPU", 1)]
    out += _latency_and_paced(cpu_phases, paced)
    if load:
        out += _throughput(load, [s for s in systems if s not in header["skipped"]])
    if memory:
        out += _memory(memory)
    report = "\n".join(out) + "\n"
    print(report)
    if not args.no_write:
        data = {
            "header": header,
            "cpu_phases": [asdict(p) for p in cpu_phases],
            "paced": paced,
            "load_phases": [asdict(p) for p in load],
            "memory": [m.to_json() for m in memory],
            "targets": [
                {**asdict(t), "measured": t.measured, "verdict": t.verdict} for t in targets
            ],
        }
        base = write_results(args.out, args.name, report, data)
        _log(f"wrote {base}.md and {base}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
