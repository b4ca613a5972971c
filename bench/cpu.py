"""``python -m bench.cpu``: CPU time per operation of the server and of the client, pinned.

On a 2-vCPU machine wall throughput swings with whether the client and the server happen to
share a vCPU, so this measures what does not: CPU seconds per operation of the server process
and of the client process, for one client doing GET and SET of a 100-char str, with both pinned
to the same vCPU (``same``: server and client on cpu 0) and to different ones (``cross``: server
on cpu 0, client on cpu 1).

One phase: a fresh client process (``python -m bench.cpu --client``, pinned, talking to the
parent over its stdin and stdout) connects, stores what it reads, runs ``--warmup`` operations
and says ``warm``; the parent samples the server's CPU (all its threads, from /proc) and says
``go``; the client runs exactly ``--ops`` operations, measuring its own CPU with getrusage, and
reports; the parent samples the server again. Server CPU per op is the server's user + system
delta over the ops; the client's likewise. A phase that takes more than 60 s is aborted.

Systems, all in one invocation: ``kvserve`` (this tree), ``kvserve-NAME`` (kvserve, kvclient and,
when it has one, kvproto from ``--tree DIR``), ``raw`` (the raw-socket floor, :mod:`bench.floor`,
epoll mode) and ``stdlib`` (:mod:`bench.stdlib_server`). Rounds are interleaved: each round starts
every server fresh, pinned, then runs every (pin, op) against every system, the system order
rotating each round. The report, median [min-max] over rounds per cell and the median of per-round
ratios, goes to ``bench/results/<date>-cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

if not __package__:  # run as a script, `python bench/cpu.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import (
    environment,
    loadavg,
    percentile,
    sample_machine,
    sample_process,
    write_results,
)
from bench.systems import INTERPRETERS, MYPYC, STR_VALUE, Endpoint, Server, python_for, start_server

__all__ = ["Phase", "client_argv", "client_env", "main"]

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
BENCH_ROOT: Final = Path(__file__).resolve().parent.parent
PINS: Final = {"same": (0, 0), "cross": (0, 1)}
"""Pin mode -> (server cpu, client cpu)."""
OPS: Final = ("get", "set")
PHASE_TIMEOUT: Final = 60.0
"""Seconds one phase (client start, warm-up, or the measured ops) may take before it is aborted."""
BUSY_OTHER: Final = 0.2
"""Cores of other processes' work during a phase above which its cells are marked noisy."""
AUTHKEY_ENV: Final = "BENCH_CPU_AUTHKEY"
"""Where a phase's client process finds the server's authkey (never on its command line)."""
_DEADLINE_EVERY: Final = 1000
"""The client looks at the clock once per this many ops (a clock read costs ~50 ns)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the client process -----------------------------------------------------------------------


def _client_main(args: argparse.Namespace) -> int:
    """Run one phase's client; speak to the parent over stdin/stdout, one JSON line each."""
    from bench.systems import make_driver

    os.sched_setaffinity(0, {args.cpu})
    endpoint = Endpoint(args.system, args.host, args.port, os.environ.get(AUTHKEY_ENV, ""))
    driver = make_driver(endpoint)
    try:
        op = driver.op(args.op, args.prefix, 0, STR_VALUE, 1)
        if args.pause_us:
            op = _paced(op, args.pause_us / 1e6)
        for _ in range(args.warmup):
            op()
        module = sys.modules.get("kvclient")
        where = str(getattr(module, "__file__", "")) if module else ""
        affinity = sorted(os.sched_getaffinity(0))
        print(json.dumps({"warm": True, "kvclient": where, "cpus": affinity}), flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        deadline = time.monotonic() + PHASE_TIMEOUT
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        done = 0
        # Bounded in count (args.ops) and in time (checked every _DEADLINE_EVERY ops).
        while done < args.ops:
            for _ in range(min(_DEADLINE_EVERY, args.ops - done)):
                op()
            done += min(_DEADLINE_EVERY, args.ops - done)
            if time.monotonic() > deadline:
                break
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        result = {
            "ops": done,
            "wall": wall,
            "utime": ru1.ru_utime - ru0.ru_utime,
            "stime": ru1.ru_stime - ru0.ru_stime,
            "switches": (ru1.ru_nvcsw - ru0.ru_nvcsw) + (ru1.ru_nivcsw - ru0.ru_nivcsw),
            **_latencies(op, args.latency_ops, deadline),
        }
        print(json.dumps(result), flush=True)
        # Stay connected until the parent has sampled the server: the stdlib manager's thread
        # for this connection exits when it closes, and takes its CPU time with it.
        sys.stdin.readline()
        return 0
    finally:
        driver.close()


def _paced(op: Callable[[], object], pause: float) -> Callable[[], object]:
    """Return ``op`` that sleeps ``pause`` seconds before each call (an idle-ish client)."""

    def paced() -> object:
        time.sleep(pause)
        return op()

    return paced


def _latencies(op: Callable[[], object], count: int, deadline: float) -> dict[str, float]:
    """Time ``count`` more calls one by one, after the CPU window: p50 and p99 in µs.

    A separate pass, so the two clock reads per call are not in the CPU per op.
    """
    if count <= 0:
        return {}
    clock = time.perf_counter_ns
    times = array("q")
    for _ in range(count):
        t0 = clock()
        op()
        times.append(clock() - t0)
        if len(times) % _DEADLINE_EVERY == 0 and time.monotonic() > deadline:
            break
    ordered = sorted(times)
    return {
        "p50_us": percentile(ordered, 0.50) / 1e3,
        "p99_us": percentile(ordered, 0.99) / 1e3,
    }


# -- the parent -------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """One column of the comparison: a server kind, and the tree it runs from."""

    name: str
    kind: str
    """``kvserve``, ``raw`` or ``stdlib``: what :func:`bench.systems.start_server` starts."""
    path: tuple[str, ...] = ()
    """Directories first on ``PYTHONPATH`` for server and client (another tree's)."""
    label: str = ""
    server_args: tuple[str, ...] = ()
    """More server options (kvserve's ``--busy-poll-us N``)."""


@dataclass
class Phase:
    """One system, one op, one pin mode, one round: CPU per op of both processes."""

    system: str
    op: str
    pin: str
    round: int
    ops: int = 0
    server_us: float = 0.0
    client_us: float = 0.0
    wall_us: float = 0.0
    server_sys: float = 0.0
    client_sys: float = 0.0
    client_switches: float = 0.0
    server_cores: float = 0.0
    """Server CPU seconds per wall second over the ops (what a paced client costs it)."""
    p50_us: float = 0.0
    """Round-trip latency of the separate timed pass after the ops (``--latency-ops``)."""
    p99_us: float = 0.0
    other_cores: float = 0.0
    steal_cores: float = 0.0
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the phase ran to its end."""
        return not self.error


def _pin_process(pid: int, cpu: int) -> list[int]:
    """Pin every thread of ``pid`` to ``cpu``; return the cpus each thread is then allowed."""
    # sched_setaffinity on the pid moves only the main thread; kvserve and the stdlib manager
    # may already have others, and threads started later inherit from whichever thread starts
    # them, so set every task.
    allowed: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            os.sched_setaffinity(tid, {cpu})
            allowed |= os.sched_getaffinity(tid)
        except (ProcessLookupError, FileNotFoundError):  # the thread exited meanwhile
            continue
    return sorted(allowed)


def _runtimes(pid: int) -> dict[int, int]:
    """Return each thread's on-CPU nanoseconds (user + system), from ``schedstat``."""
    # Not /proc/PID/stat's utime + stime (psutil): those count in clock ticks of 10 ms, which
    # over 20,000 ops is 0.5 µs/op, too coarse for a server spending ~8 µs/op. schedstat's
    # first field is the scheduler's exact runtime of the thread; threads started during the
    # phase count from 0, a thread exiting during it (none do here) would be lost.
    times: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread exited meanwhile
            continue
    return times


class _Client:
    """A running client process; every read from it is bounded by a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=BENCH_ROOT,
        )

    def read(self, timeout: float, what: str) -> dict[str, Any]:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else b""
        if not line:
            self.kill()
            stderr = self.proc.stderr.read()[-600:] if self.proc.stderr else b""
            cause = f"no answer within {timeout:.0f} s" if not ready else "client exited"
            raise RuntimeError(f"{what}: {cause}; client stderr: {stderr.decode(errors='replace')}")
        value: dict[str, Any] = json.loads(line)
        return value

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


def client_argv(
    module: str, endpoint: Endpoint, cpu: int, op: str, args: argparse.Namespace, prefix: str
) -> list[str]:
    """Return the command of one phase's client process (``python -m MODULE --client ...``)."""
    return [
        python_for(endpoint.system),
        "-m",
        module,
        "--client",
        f"--system={endpoint.system}",
        f"--host={endpoint.host}",
        f"--port={endpoint.port}",
        f"--cpu={cpu}",
        f"--op={op}",
        f"--ops={args.ops}",
        f"--warmup={args.warmup}",
        f"--prefix={prefix}",
    ]


def client_env(system: System, endpoint: Endpoint) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KV_", "BENCH_"))}
    env[AUTHKEY_ENV] = endpoint.authkey  # not on the command line, where ps shows it
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (*system.path, str(BENCH_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    return env


def _measure(
    system: System, server: Server, op: str, pin: str, rnd: int, args: argparse.Namespace
) -> Phase:
    phase = Phase(system.name, op, pin, rnd)
    server_cpu, client_cpu = PINS[pin]
    endpoint = server.endpoint
    argv = [
        *client_argv("bench.cpu", endpoint, client_cpu, op, args, f"r{rnd}:{pin}:{op}"),
        f"--pause-us={args.pause_us}",
        f"--latency-ops={args.latency_ops}",
    ]
    what = f"{system.name} {op} {pin} round {rnd + 1}"
    # Again each phase: a thread the server started since (stdlib: one per connection)
    # inherited the pin, but a mistake here would silently turn `same` into `cross`.
    allowed = _pin_process(server.pid, server_cpu)
    if allowed != [server_cpu]:
        phase.error = f"{what}: server threads allowed on cpus {allowed}, not [{server_cpu}]"
        return phase
    client = _Client(argv, client_env(system, endpoint))
    try:
        warm = client.read(PHASE_TIMEOUT, f"{what}: start and warm-up")
        expected = system.path[1] if system.path else ""
        if system.kind == "kvserve" and expected and not warm["kvclient"].startswith(expected):
            raise RuntimeError(f"{what}: client imported {warm['kvclient']}, not from {expected}")
        if warm["cpus"] != [client_cpu]:
            raise RuntimeError(f"{what}: client runs on cpus {warm['cpus']}, not [{client_cpu}]")
        p0, r0, m0 = sample_process(server.pid), _runtimes(server.pid), sample_machine()
        client.send("go")
        result = client.read(PHASE_TIMEOUT + 5, f"{what}: {args.ops:,} ops")
        p1, r1, m1 = sample_process(server.pid), _runtimes(server.pid), sample_machine()
    except RuntimeError as exc:
        phase.error = str(exc)
        client.kill()
        return phase
    finally:
        client.close()
    if result["ops"] < args.ops:
        phase.error = (
            f"{what}: aborted after {PHASE_TIMEOUT:.0f} s with {result['ops']:,} of "
            f"{args.ops:,} ops done; is the machine overloaded?"
        )
        return phase
    if p0 is None or p1 is None:
        phase.error = f"{what}: server exited: {server.stderr_tail(500)}"
        return phase
    ops = result["ops"]
    server_s = sum(ns - r0.get(tid, 0) for tid, ns in r1.items()) / 1e9
    ticks_s = (p1.user - p0.user) + (p1.system - p0.system)
    client_s = result["utime"] + result["stime"]
    phase.ops = ops
    phase.server_us = server_s / ops * 1e6
    phase.client_us = client_s / ops * 1e6
    phase.wall_us = result["wall"] / ops * 1e6
    # The user/system split exists only in ticks: a rough share, from the ticks' own total.
    phase.server_sys = (p1.system - p0.system) / ticks_s if ticks_s else 0.0
    phase.client_sys = result["stime"] / client_s if client_s else 0.0
    phase.client_switches = result["switches"] / ops
    phase.p50_us = result.get("p50_us", 0.0)
    phase.p99_us = result.get("p99_us", 0.0)
    if result["wall"] > 0:
        phase.server_cores = server_s / result["wall"]
    wall = m1.wall - m0.wall
    if wall > 0:
        # Everything else the machine did meanwhile (other users, this parent): the noise.
        phase.other_cores = max(0.0, ((m1.busy - m0.busy) - server_s - client_s) / wall)
        # The hypervisor running someone else on our vCPUs: slower ops, not more CPU per op.
        phase.steal_cores = (m1.steal - m0.steal) / wall
    phase.details = {"kvclient": warm["kvclient"], "server_ticks_us": ticks_s / ops * 1e6}
    return phase


def _systems(args: argparse.Namespace) -> list[System]:
    systems = [System("kvserve", "kvserve", (), "kvserve + kvclient, this tree")]
    if args.tree:
        tree = args.tree.resolve()
        # The other tree's kvproto too when it has one, as bench.instructions does (a compiled
        # tree's kvserve and kvclient need their own compiled kvproto).
        path = tuple(str(tree / d) for d in ("server", "client", "protocol") if (tree / d).is_dir())
        has = "kvserve + kvclient" + (" + kvproto" if (tree / "protocol").is_dir() else "")
        systems.append(System(f"kvserve-{args.tree_name}", "kvserve", path, f"{has}, {tree}"))
    if args.busy_poll_us:
        n = args.busy_poll_us
        systems.append(
            System(
                f"kvserve-bp{n}",
                "kvserve",
                (),
                f"kvserve --busy-poll-us {n}, this tree",
                ("--busy-poll-us", str(n)),
            )
        )
    if MYPYC in INTERPRETERS:
        label = f"kvserve + kvclient compiled with mypyc, {INTERPRETERS[MYPYC]}"
        systems.append(System(MYPYC, MYPYC, (), label))
    systems += [
        System("raw", "raw", (), "raw-socket floor (bench/floor.py, epoll, 1 thread)"),
        System("stdlib", "stdlib", (), "stdlib BaseManager + registered dict"),
    ]
    return systems


def _start(system: System) -> Server:
    server = start_server(system.kind, system.path, server_args=system.server_args)
    try:
        allowed = _pin_process(server.pid, PINS["same"][0])
        if allowed != [PINS["same"][0]]:
            raise RuntimeError(f"{system.name}: server threads allowed on cpus {allowed}")
    except BaseException:
        server.stop()
        raise
    return server


def run(args: argparse.Namespace) -> list[Phase]:
    """Run every round; return every phase, failed ones with their error."""
    systems = _systems(args)
    phases: list[Phase] = []
    total = args.rounds * len(args.pin) * len(OPS) * len(systems)
    done = 0
    for rnd in range(args.rounds):
        servers: dict[str, Server] = {}
        try:
            for system in systems:
                servers[system.name] = _start(system)
            k = rnd % len(systems)
            order = systems[k:] + systems[:k]
            pins = args.pin if rnd % 2 == 0 else args.pin[::-1]
            for pin in pins:
                for op in OPS:
                    for system in order:
                        done += 1
                        phase = _measure(system, servers[system.name], op, pin, rnd, args)
                        phases.append(phase)
                        if phase.ok:
                            _log(
                                f"[{done}/{total}] r{rnd + 1} {pin:5} {op} {system.name:16} "
                                f"server {phase.server_us:5.1f} µs/op  client "
                                f"{phase.client_us:5.1f} µs/op  wall {phase.wall_us:5.1f} µs/op"
                                f"  other {phase.other_cores:.2f} steal "
                                f"{phase.steal_cores:.2f} cores"
                            )
                        else:
                            _log(f"[{done}/{total}] {phase.error}")
        finally:
            for server in servers.values():
                server.stop()
    return phases


# -- the report -------------------------------------------------------------------------------


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def _ratio(phases: list[Phase], name: str, base: str, op: str, pin: str, attr: str) -> list[float]:
    """Return the per-round ratios of ``attr`` for system ``name`` over system ``base``."""
    by_round: dict[tuple[str, int], float] = {
        (p.system, p.round): getattr(p, attr)
        for p in phases
        if p.ok and p.op == op and p.pin == pin
    }
    return [
        value / by_round[(base, rnd)]
        for (system, rnd), value in by_round.items()
        if system == name and by_round.get((base, rnd))
    ]


def _ratio_cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def summary(phases: list[Phase], systems: list[System], pins: list[str]) -> list[dict[str, Any]]:
    """Return one row per (pin, op, system): medians, spreads and ratios to raw and stdlib."""
    rows: list[dict[str, Any]] = []
    for pin in pins:
        for op in OPS:
            for system in systems:
                mine = [
                    p for p in phases if p.ok and (p.system, p.op, p.pin) == (system.name, op, pin)
                ]
                row: dict[str, Any] = {"pin": pin, "op": op, "system": system.name}
                for attr in ("server_us", "client_us", "wall_us"):
                    values = [getattr(p, attr) for p in mine]
                    row[attr] = values
                row["total_us"] = [p.server_us + p.client_us for p in mine]
                row["noisy"] = any(p.other_cores > BUSY_OTHER for p in mine)
                row["rounds"] = len(mine)
                for base in ("raw", "stdlib"):
                    for attr in ("server_us", "client_us"):
                        row[f"{attr}_x_{base}"] = _ratio(phases, system.name, base, op, pin, attr)
                rows.append(row)
    return rows


def markdown(
    header: dict[str, Any], args: argparse.Namespace, phases: list[Phase], systems: list[System]
) -> str:
    """Return the report: how it was measured, the CPU table, this tree against the other."""
    rows = summary(phases, systems, args.pin)
    cpu_model = header.get("cpu", "?")
    out = [
        "# kvmanager benchmark: CPU per operation, pinned (issue 14)",
        "",
        f"Machine: {cpu_model}, {header.get('nproc', '?')} CPUs, kernel "
        f"{header.get('kernel', '?')}; Python {header.get('python', '?')}; kvmanager "
        f"{header.get('commit', '?')}; load average {header.get('loadavg_start', '?')} at the "
        f"start, {header.get('loadavg_end', '?')} at the end; {header.get('wall_s', 0):.0f} s.",
        "",
        f"One client, GET and SET of a 100-char str: {args.warmup:,} warm-up ops, then "
        f"{args.ops:,} measured ops per phase; {args.rounds} interleaved rounds, servers started "
        "fresh each round. `same`: server and client pinned to cpu 0; `cross`: server on cpu 0, "
        "client on cpu 1. CPU is user + system seconds of the whole process (all threads) over "
        "the measured ops, per op. Cells: **median [min-max] over rounds**, in µs/op; ratios "
        "are the median [min-max] of per-round ratios. `†`: in some round other processes "
        f"used more than {BUSY_OTHER} of a core during the phase.",
        "",
        "| pin | op | system | server µs/op | client µs/op | server+client | wall µs/op "
        "| server x raw | client x raw | server x stdlib | client x stdlib |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mark = " †" if row["noisy"] else ""
        if not row["rounds"]:
            out.append(f"| {row['pin']} | {row['op']} | `{row['system']}` | failed |||||||| |")
            continue
        cells = [
            _cell(row["server_us"]),
            _cell(row["client_us"]),
            _cell(row["total_us"]),
            _cell(row["wall_us"]),
        ]
        ratios = [
            _ratio_cell(row[f"{attr}_x_{base}"])
            for base in ("raw", "stdlib")
            for attr in ("server_us", "client_us")
        ]
        out.append(
            f"| {row['pin']} | {row['op']} | `{row['system']}`{mark} | "
            + " | ".join(cells + ratios)
            + " |"
        )
    other = next((s.name for s in systems if s.path), None)
    if other:
        out += [
            "",
            f"This tree against `{other}` (`kvserve` / `{other}`, per-round ratios, median "
            "[min-max]): the same code gives the noise level; a change is real only well "
            "outside it.",
            "",
            "| pin | op | server | client |",
            "|---|---|---:|---:|",
        ]
        for pin in args.pin:
            for op in OPS:
                server = _ratio(phases, "kvserve", other, op, pin, "server_us")
                client = _ratio(phases, "kvserve", other, op, pin, "client_us")
                out.append(f"| {pin} | {op} | {_ratio_cell(server)} | {_ratio_cell(client)} |")
    out += ["", "Systems:", ""]
    out += [f"- `{s.name}`: {s.label}" for s in systems]
    failed = [p for p in phases if not p.ok]
    if failed:
        out += ["", "Failed phases:", ""]
        out += [f"- {p.error}" for p in failed]
    out.append("")
    return "\n".join(out)


# -- the command line -------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu",
        description="CPU time per op of server and client, pinned to the same or to different "
        "vCPUs: kvserve, kvserve from another tree, the raw-socket floor, the stdlib manager.",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--ops", type=int, default=20_000, help="measured ops (default 20000)")
    parser.add_argument("--warmup", type=int, default=2_000, help="warm-up ops (default 2000)")
    parser.add_argument(
        "--latency-ops",
        type=int,
        default=0,
        help="after the measured ops, time this many more one by one for p50/p99 (default 0)",
    )
    parser.add_argument(
        "--pause-us",
        type=int,
        default=0,
        help="the client sleeps this long before each op (default 0: back to back)",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        default=0,
        help="also run kvserve (this tree) with --busy-poll-us N, as kvserve-bpN (default: not)",
    )
    parser.add_argument(
        "--pin", default="same,cross", help="comma list of same, cross (default both)"
    )
    parser.add_argument(
        "--tree",
        type=Path,
        help="also benchmark kvserve/kvclient from this source tree (a checkout or a "
        "`git archive` export holding server/ and client/)",
    )
    parser.add_argument(
        "--tree-name", help="its name in the tables (default: its .commit file, or its dir name)"
    )
    parser.add_argument("--name", default="cpu", help="results file name suffix (default cpu)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no files")
    # The client side of one phase, started by the parent; not for use by hand.
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--system", "--host", "--op", "--prefix"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return args
    args.pin = [p for p in args.pin.split(",") if p]
    if not args.pin or any(p not in PINS for p in args.pin):
        parser.error(f"--pin takes a comma list of {', '.join(PINS)}")
    if not 1 <= args.rounds <= 50 or not 100 <= args.ops <= 1_000_000:
        parser.error("--rounds must be 1..50 and --ops 100..1,000,000")
    if not 0 <= args.warmup <= 100_000:
        parser.error("--warmup must be 0..100,000")
    needed = max(cpu for pin in args.pin for cpu in PINS[pin])
    if needed not in os.sched_getaffinity(0):
        parser.error(f"--pin {','.join(args.pin)} needs cpu {needed}, not available here")
    if args.tree:
        for sub in ("server/kvserve", "client/kvclient"):
            if not (args.tree / sub).is_dir():
                parser.error(f"--tree {args.tree}: no {sub} directory")
        if not args.tree_name:
            commit = args.tree / ".commit"
            args.tree_name = (
                commit.read_text().strip() if commit.is_file() else args.tree.resolve().name
            )
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the report, write it with the raw numbers; return the exit code."""
    args = _parse_args(argv)
    if args.client:
        return _client_main(args)
    t0 = time.monotonic()
    header = environment(args.tree)
    if args.tree:
        # environment(tree) names the other tree's commit; the report's line names both.
        header["commit"] = f"{environment(None)['commit']}, and {header['commit']}"
    systems = _systems(args)
    try:
        phases = run(args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.monotonic() - t0
    report = markdown(header, args, phases, systems)
    print(report)
    if not args.no_write:
        data = {
            "header": header,
            "params": {
                "rounds": args.rounds,
                "ops": args.ops,
                "warmup": args.warmup,
                "pins": {
                    pin: dict(zip(("server_cpu", "client_cpu"), PINS[pin], strict=True))
                    for pin in args.pin
                },
            },
            "systems": [asdict(s) for s in systems],
            "phases": [asdict(p) for p in phases],
            "summary": summary(phases, systems, args.pin),
        }
        base = write_results(args.out, args.name, report, data)
        _log(f"wrote {base}.md and {base}.json")
    failed = [p for p in phases if not p.ok]
    if failed:
        _log(f"{len(failed)} phase(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
