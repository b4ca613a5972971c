"""``python -m bench``: run every case against every system, print and save the tables.

Order of work: for each round, start every system's server fresh; then for each case, run it
against each system in turn (A B C, A B C, ...; the order rotates every round so no system
always goes first); then stop the servers. The durability cases (issue 6) then do the same,
in rounds of their own, against the in-memory kvserve and kvserve with ``--data-dir`` under
each ``--fsync`` policy; the restart case fills a data directory and times restarts; last,
the memory case starts each server once more, fresh. Results go to
``bench/results/<date>-<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, Final

if not __package__:  # run as a script, `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpu, instructions, startup
from bench.cases import CASES, DURABILITY, DURABILITY_SYSTEMS, Case, select_cases
from bench.measure import (
    MachineSample,
    ProcessSample,
    environment,
    filesystem,
    fsync_probe,
    loadavg,
    percentile,
    sample_machine,
    sample_process,
    write_results,
)
from bench.memory import MemoryResult, measure_plain, measure_server
from bench.report import (
    Phase,
    durability_targets,
    evaluate_targets,
    markdown,
    phase_json,
    summary_json,
)
from bench.restart import RestartResult, measure_restart
from bench.systems import (
    ALL_SYSTEMS,
    DEFAULT_SYSTEMS,
    MYPYC,
    Server,
    SkipSystemError,
    start_server,
)
from bench.worker import ClientResult, PhaseError, WorkerPool

__all__ = ["main"]

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
MEMORY_SYSTEMS: Final = ("kvserve", MYPYC, "stdlib", "raw", "redis")
_GROUP_WORDS: Final = ("memory", "restart", "startup", "cpu", "instructions")
"""``--only`` words that select a measurement that is not a case."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure_phase(
    pool: WorkerPool, server: Server, case: Case, rnd: int, duration: float, prefix: str
) -> Phase:
    phase = Phase(case.name, server.endpoint.system, rnd)
    samples: dict[str, Any] = {}

    def on_window(start_ns: int, end_ns: int) -> None:
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        samples["p0"], samples["m0"] = sample_process(server.pid), sample_machine()
        time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
        samples["p1"], samples["m1"] = sample_process(server.pid), sample_machine()

    try:
        results = pool.run_phase(server.endpoint, case, prefix, duration, on_window)
    except PhaseError as exc:
        phase.error = str(exc)
        if not server.alive():
            phase.error += f"; server exited: {server.stderr_tail(500)}"
        return phase
    _fill_phase(phase, case, results, samples)
    return phase


def _fill_phase(
    phase: Phase, case: Case, results: list[ClientResult], samples: dict[str, Any]
) -> None:
    counted = [r for r in results if case.counted(r.index)]
    latencies: list[int] = []
    for r in counted:
        lat = array("q")
        lat.frombytes(r.latencies)
        per_client = sorted(lat)
        phase.clients.append(
            {
                "index": r.index,
                "ops": r.ops,
                "ops_per_s": r.ops * case.batch / (r.elapsed_ns / 1e9),
                "p50_us": percentile(per_client, 0.50) / 1e3,
                "p99_us": percentile(per_client, 0.99) / 1e3,
                "max_us": (per_client[-1] if per_client else 0) / 1e3,
            }
        )
        latencies.extend(per_client)
    latencies.sort()
    phase.ops = sum(r.ops for r in counted) * case.batch
    phase.ops_per_s = sum(r.ops * case.batch / (r.elapsed_ns / 1e9) for r in counted)
    phase.p50_us = percentile(latencies, 0.50) / 1e3
    phase.p99_us = percentile(latencies, 0.99) / 1e3
    phase.max_us = (latencies[-1] if latencies else 0) / 1e3
    ops = max(phase.ops, 1)
    client_cpu = sum(r.utime + r.stime for r in results)
    client_sys = sum(r.stime for r in results)
    phase.client_cpu_us = client_cpu / ops * 1e6
    phase.client_sys = client_sys / client_cpu if client_cpu else 0.0
    p0: ProcessSample | None = samples.get("p0")
    p1: ProcessSample | None = samples.get("p1")
    m0: MachineSample | None = samples.get("m0")
    m1: MachineSample | None = samples.get("m1")
    if p0 and p1 and m0 and m1 and m1.wall > m0.wall:
        wall = m1.wall - m0.wall
        server_cpu = (p1.user - p0.user) + (p1.system - p0.system)
        phase.server_cpu_us = server_cpu / ops * 1e6
        phase.server_sys = (p1.system - p0.system) / server_cpu if server_cpu else 0.0
        phase.server_cores = server_cpu / wall
        switches = (p1.voluntary - p0.voluntary) + (p1.involuntary - p0.involuntary)
        # Threads that exit during the window take their counts with them: clamp at 0.
        phase.server_switches = max(0, switches) / (ops / case.batch)
        phase.client_cores = client_cpu / wall
        phase.machine_cores = (m1.busy - m0.busy) / wall
        phase.softirq_cores = (m1.softirq - m0.softirq) / wall
        phase.steal_cores = (m1.steal - m0.steal) / wall
        phase.other_cores = max(
            0.0,
            phase.machine_cores - phase.client_cores - phase.server_cores - phase.softirq_cores,
        )
        phase.server_writes = (p1.writes - p0.writes) / ops
        phase.server_write_bytes = (p1.write_chars - p0.write_chars) / ops
        phase.server_disk_bytes = (p1.disk_bytes - p0.disk_bytes) / ops


def _rotate(systems: list[str], rnd: int) -> list[str]:
    k = rnd % len(systems) if systems else 0
    return systems[k:] + systems[:k]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark kvserve against the stdlib manager, a raw-socket floor and Redis.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 0.5 s per case, 100k keys for memory and restart",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 2; quick 0.5)")
    parser.add_argument("--keys", type=int, help="memory case keys (default 1e6; quick 1e5)")
    parser.add_argument(
        "--restart-keys", type=int, help="restart case keys (default 1e6; quick 1e5)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        help="run only cases whose name contains CASE (repeatable; 'memory', 'restart', and "
        "'durability' for the durability cases and the restart; 'cpu', alone, for "
        "python -m bench.cpu; 'instructions', alone, for python -m bench.instructions)",
    )
    parser.add_argument(
        "--systems",
        help=f"comma list from {','.join(ALL_SYSTEMS)} (default {','.join(DEFAULT_SYSTEMS)})",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory case")
    parser.add_argument("--no-restart", action="store_true", help="skip the restart case")
    parser.add_argument(
        "--startup-runs",
        type=int,
        default=200,
        help="runs of each command in the startup case (default 200; quick 30)",
    )
    parser.add_argument(
        "--startup-every-command",
        action="store_true",
        help="the startup case times every kvctl command too (fast path and typer)",
    )
    parser.add_argument("--name", help="results file name suffix (default quick/full)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no files")
    parser.add_argument(
        "--tree",
        type=Path,
        help="benchmark kvserve/kvclient from this source tree (a checkout or a `git archive` "
        "export holding server/ and client/) instead of the installed ones",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and systems, exit")
    args = parser.parse_args(argv)
    args.rounds_given = args.rounds  # --only cpu has its own default
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (0.5 if args.quick else 2.0)
    args.keys = args.keys or (100_000 if args.quick else 1_000_000)
    args.restart_keys = args.restart_keys or (100_000 if args.quick else 1_000_000)
    args.name = args.name or ("quick" if args.quick else "full")
    if args.quick:
        args.startup_runs = min(args.startup_runs, 30)
    systems = args.systems.split(",") if args.systems else list(DEFAULT_SYSTEMS)
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(ALL_SYSTEMS)}")
    args.systems = systems
    if args.only and "cpu" in args.only and set(args.only) != {"cpu"}:
        # With --tree the main cases would run the other tree's kvserve in this process, and
        # bench.cpu would then compare that tree with itself.
        parser.error("--only cpu runs alone (python -m bench.cpu has more options)")
    if args.only and "instructions" in args.only and set(args.only) != {"instructions"}:
        parser.error(
            "--only instructions runs alone (python -m bench.instructions has more options)"
        )
    if args.rounds < 1 or args.rounds > 20 or not 0.1 <= args.duration <= 60:
        parser.error("--rounds must be 1..20 and --duration 0.1..60 s")
    if not 1 <= args.keys <= 10_000_000 or not 1 <= args.restart_keys <= 10_000_000:
        parser.error("--keys and --restart-keys must be 1..10,000,000")
    return args


def _run_rounds(
    args: argparse.Namespace,
    cases: list[Case],
    systems: list[str],
    pool: WorkerPool,
    skipped: dict[str, str],
) -> list[Phase]:
    phases: list[Phase] = []
    if not cases:
        return phases
    total = len(cases) * len(systems) * args.rounds
    done = 0
    for rnd in range(args.rounds):
        servers: dict[str, Server] = {}
        try:
            for system in systems:
                if system in skipped:
                    continue
                try:
                    servers[system] = start_server(system)
                except SkipSystemError as exc:
                    skipped[system] = str(exc)
                    _log(f"{system}: {exc}")
                except RuntimeError as exc:
                    _log(f"{system}: could not start: {exc}")
            for case in cases:
                for system in _rotate(systems, rnd):
                    done += 1
                    server = servers.get(system)
                    if server is None:
                        continue
                    if not server.alive():
                        _log(f"{system}: server died, restarting: {server.stderr_tail(300)}")
                        server.stop()
                        servers[system] = server = start_server(system)
                    prefix = f"r{rnd}:{case.name}"
                    phase = _measure_phase(pool, server, case, rnd, args.duration, prefix)
                    phases.append(phase)
                    if phase.ok:
                        _log(
                            f"[{done}/{total}] r{rnd + 1} {case.name:18} {system:16} "
                            f"{phase.ops_per_s:>10,.0f} ops/s  p50 {phase.p50_us:7.1f} µs  "
                            f"p99 {phase.p99_us:8.1f} µs  cpu/op c {phase.client_cpu_us:5.1f} "
                            f"s {phase.server_cpu_us:5.1f} µs"
                        )
                    else:
                        _log(f"[{done}/{total}] r{rnd + 1} {case.name} {system}: {phase.error}")
        finally:
            for server in servers.values():
                server.stop()
    return phases


def _run_memory(
    args: argparse.Namespace, pool: WorkerPool, skipped: dict[str, str]
) -> list[MemoryResult]:
    results: list[MemoryResult] = []
    for system in (s for s in MEMORY_SYSTEMS if s in args.systems and s not in skipped):
        _log(f"memory: filling {system} with {args.keys:,} keys")
        results.append(measure_server(system, pool, args.keys))
        if results[-1].error:
            _log(f"memory: {system}: {results[-1].error}")
    _log(f"memory: plain dict with {args.keys:,} keys")
    results.append(measure_plain(args.keys))
    return results


def _run_restart(args: argparse.Namespace, pool: WorkerPool) -> RestartResult:
    _log(f"restart: filling a data directory with {args.restart_keys:,} keys")
    result = measure_restart(pool, args.restart_keys, args.rounds)
    for start in result.starts:
        _log(
            f"restart: {start.scenario:8} {start.seconds:6.2f} s to listening (kvserve: loaded "
            f"{start.snapshot_records} snapshot + {start.log_records} log records in "
            f"{start.load_s:.2f} s), stop {start.stop_s:.2f} s"
        )
    if result.error:
        _log(f"restart: {result.error}")
    return result


def _select(args: argparse.Namespace) -> tuple[list[Case], bool, bool]:
    """Return the cases, and whether to run the restart and the memory case."""
    only: list[str] = args.only or []
    words = [w for w in only if w not in _GROUP_WORDS]
    cases = select_cases(words or None) if words or not only else []
    run_restart = not args.no_restart and (not only or "restart" in only or DURABILITY in only)
    run_memory = not args.no_memory and (not only or "memory" in only)
    return cases, run_restart, run_memory


def _use_tree(tree: Path) -> None:
    # Spawned clients inherit sys.path, servers get PYTHONPATH: both then import kvserve and
    # kvclient from the tree. Nothing has imported kvclient in this process yet.
    paths = [str(tree.resolve() / "server"), str(tree.resolve() / "client")]
    for path in paths:
        if not Path(path).is_dir():
            raise SystemExit(f"bench: --tree {tree}: no {path} directory")
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return the process exit code (0 when every phase ran)."""
    args = _parse_args(argv)
    if args.list:
        print("cases:", " ".join(c.name for c in CASES), "restart memory startup cpu instructions")
        print("systems:", " ".join(ALL_SYSTEMS), f"(default: {' '.join(DEFAULT_SYSTEMS)})")
        print(f"groups: {DURABILITY} (durable-* cases against {', '.join(DURABILITY_SYSTEMS)}")
        print("        and the restart case)")
        return 0
    if args.only and set(args.only) == {"startup"}:
        # Process start-up times only: no servers of the other cases, a report of its own.
        name = "startup-commands" if args.startup_every_command else "startup"
        return startup.main(
            args.startup_runs, args.out, not args.no_write, name, args.startup_every_command
        )
    if args.only and set(args.only) == {"cpu"}:
        # CPU per op, pinned (bench/cpu.py): its own systems and report. There --tree is run
        # beside this tree's kvserve, not instead of it.
        cpu_argv = ["--out", str(args.out)]
        cpu_argv += ["--rounds", str(args.rounds_given)] if args.rounds_given else []
        cpu_argv += ["--tree", str(args.tree)] if args.tree else []
        cpu_argv += ["--no-write"] if args.no_write else []
        return cpu.main(cpu_argv)
    if args.only and set(args.only) == {"instructions"}:
        # Instructions per op under callgrind (bench/instructions.py), the same way as cpu.
        instr_argv = ["--out", str(args.out)]
        instr_argv += ["--rounds", str(args.rounds_given)] if args.rounds_given else []
        instr_argv += ["--tree", str(args.tree)] if args.tree else []
        instr_argv += ["--no-write"] if args.no_write else []
        return instructions.main(instr_argv)
    cases, run_restart, run_memory = _select(args)
    main_cases = [c for c in cases if c.group != DURABILITY]
    durable_cases = [c for c in cases if c.group == DURABILITY]
    if args.tree:
        _use_tree(args.tree)
    t0 = time.monotonic()
    header = environment(args.tree)
    header.update(rounds=args.rounds, duration=args.duration, systems=args.systems, skipped={})
    if durable_cases or run_restart:
        header["durability"] = {
            "systems": list(DURABILITY_SYSTEMS),
            "data_dir_fs": f"{tempfile.gettempdir()}: {filesystem(tempfile.gettempdir())}",
            "fdatasync": fsync_probe(),
        }
    skipped: dict[str, str] = header["skipped"]
    pool = WorkerPool()
    restart: RestartResult | None = None
    try:
        pool.ensure(max((c.clients for c in cases), default=1))
        phases = _run_rounds(args, main_cases, args.systems, pool, skipped)
        durable = _run_rounds(args, durable_cases, list(DURABILITY_SYSTEMS), pool, skipped)
        restart = _run_restart(args, pool) if run_restart else None
        memory = _run_memory(args, pool, skipped) if run_memory else []
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    finally:
        pool.close()
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.monotonic() - t0
    targets = evaluate_targets(phases, memory) + durability_targets(durable)
    title = f"kvmanager benchmark: {args.name}" + (
        f" (--quick: {args.duration:g} s per case, not for comparing)" if args.quick else ""
    )
    report = markdown(title, header, phases, memory, targets, durable, restart)
    print(report)
    if not args.no_write:
        data = {
            "header": header,
            "phases": [phase_json(p) for p in phases + durable],
            "summary": summary_json(phases, args.systems),
            "durability": {
                "summary": summary_json(durable, list(DURABILITY_SYSTEMS)),
                "restart": restart.to_json() if restart else None,
            },
            "memory": [m.to_json() for m in memory],
            "targets": [
                {
                    "issue": t.issue,
                    "name": t.name,
                    "op": t.op,
                    "threshold": t.threshold,
                    "measured": t.measured,
                    "verdict": t.verdict,
                    "details": t.details,
                }
                for t in targets
            ],
        }
        base = write_results(args.out, args.name, report, data)
        _log(f"wrote {base}.md and {base}.json")
    failed = [p for p in phases + durable if not p.ok]
    if failed:
        _log(f"{len(failed)} phase(s) failed")
    restart_failed = restart is not None and bool(restart.error)
    if "startup" in (args.only or []):
        # Asked for beside other cases: run after them, with its report of its own.
        startup.main(args.startup_runs, args.out, not args.no_write)
    return 1 if failed or restart_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
