"""``python -m bench.instructions``: instructions per operation of the server and of the client.

CPU seconds per op (:mod:`bench.cpu`) on this shared 2-vCPU VM swing by 20% and more between
two runs of the same code. This counts what does not swing: user-space instructions executed,
with valgrind's callgrind (``perf stat -e instructions:u`` would be faster, but this VM exposes
no hardware counters to the guest).

One measurement: one side (``server`` or ``client``) of one system runs under callgrind, the
other side natively; a fresh client process connects, does ``--warmup`` ops, then ``n`` ops of
one kind (GET or SET of a 100-char str), and exits; the server is then stopped with SIGTERM.
Callgrind's total for the whole process is taken at ``n = N1`` and at ``n = N2`` (two fresh
runs), and ``(total(N2) - total(N1)) / (N2 - N1)`` is the instruction count of one op: start-up,
imports, connecting, warm-up and shutdown are the same in both runs and cancel. Every process
runs with ``PYTHONHASHSEED=0``, so dict and set layouts repeat (kvserve's server counts still vary
by up to ~2% of a run; bench/README.md).

Systems, in one invocation, as in :mod:`bench.cpu`: ``kvserve`` (this tree), ``kvserve-NAME``
(``--tree DIR``: its kvserve, kvclient and, when it has one, kvproto), ``raw``
(:mod:`bench.floor`) and ``stdlib`` (:mod:`bench.stdlib_server`). With ``--rounds 2`` or more
every measurement is repeated and the report shows the spread: the check that this is
deterministic. The report goes to ``bench/results/<date>-instructions.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

if not __package__:  # run as a script, `python bench/instructions.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import BATCH
from bench.cpu import System, client_env
from bench.measure import environment, loadavg, write_results
from bench.systems import (
    INTERPRETERS,
    MYPYC,
    STR_VALUE,
    Endpoint,
    Server,
    python_for,
    start_server,
)

__all__ = ["Measurement", "main"]

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
BENCH_ROOT: Final = Path(__file__).resolve().parent.parent
OPS: Final = ("get", "set", "mget")
"""``mget``: a batched GET of :data:`bench.cases.BATCH` keys (``get_many``, a pipeline of GETs on
Redis); counted per call, reported per call and per key."""
DEFAULT_OPS: Final = ("get", "set")
SIDES: Final = ("server", "client")
RUN_TIMEOUT: Final = 180.0
"""Seconds one run (client start, warm-up and ops, or the counted server's exit) may take."""
HASH_SEED: Final = {"PYTHONHASHSEED": "0"}
_AUTHKEY_ENV: Final = "BENCH_CPU_AUTHKEY"  # what bench.cpu.client_env sets


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the client process -----------------------------------------------------------------------


def _client_main(args: argparse.Namespace) -> int:
    """Connect, run ``--warmup`` then ``--ops`` ops, print one JSON line, exit."""
    from bench.systems import make_driver

    endpoint = Endpoint(args.system, args.host, args.port, os.environ.get(_AUTHKEY_ENV, ""))
    driver = make_driver(endpoint)
    try:
        op = driver.op(args.op, args.prefix, 0, STR_VALUE, BATCH)
        for _ in range(args.warmup + args.ops):  # bounded: the parent kills a slow run
            op()
        module = sys.modules.get("kvclient")
        where = str(getattr(module, "__file__", "")) if module else ""
    finally:
        driver.close()
    print(json.dumps({"ops": args.ops, "kvclient": where}), flush=True)
    return 0


# -- the parent -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One system, one op, one counted side, one round: instructions at N1 and N2 ops."""

    system: str
    op: str
    side: str
    round: int
    n1: int
    n2: int
    total_n1: int = 0
    total_n2: int = 0
    seconds: float = 0.0
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether both runs gave a count."""
        return not self.error

    @property
    def per_op(self) -> float:
        """Instructions per op: the difference of the two totals over the difference of ops."""
        return (self.total_n2 - self.total_n1) / (self.n2 - self.n1)

    @property
    def fixed(self) -> float:
        """Instructions not proportional to the ops: start-up, warm-up, shutdown."""
        return self.total_n1 - self.n1 * self.per_op


def _valgrind(out_file: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_file}",
        "--dump-line=no",  # only the total is read: keep the dump small
        "--log-file=" + str(out_file.with_suffix(".log")),
    ]


def _read_total(out_file: Path) -> int:
    """Return the ``totals:`` (or ``summary:``) line of a callgrind output file."""
    if not out_file.is_file():
        log = out_file.with_suffix(".log")
        tail = log.read_text(errors="replace")[-600:] if log.is_file() else ""
        raise RuntimeError(f"callgrind wrote no {out_file.name}; its log ends: {tail}")
    for line in out_file.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{out_file}: no totals line")


def _client_argv(endpoint: Endpoint, op: str, n: int, warmup: int) -> list[str]:
    return [
        python_for(endpoint.system),
        "-m",
        "bench.instructions",
        "--client",
        f"--system={endpoint.system}",
        f"--host={endpoint.host}",
        f"--port={endpoint.port}",
        f"--op={op}",
        f"--ops={n}",
        f"--warmup={warmup}",
        "--prefix=instr",  # the same key in every run: the two totals must differ only in ops
    ]


def _run_client(argv: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    try:
        done = subprocess.run(
            argv, capture_output=True, env=env, cwd=BENCH_ROOT, timeout=RUN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: client did not finish within {RUN_TIMEOUT:.0f} s") from None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        err = done.stderr.decode(errors="replace")[-600:]
        raise RuntimeError(f"{what}: client exited {done.returncode}: {err}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _stop(server: Server, what: str) -> None:
    """SIGTERM the server and wait for it (under valgrind its shutdown is slow), then clean up."""
    if server.alive():
        server.proc.terminate()
        try:
            server.proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.stop()  # SIGKILL after 5 s more: callgrind then writes nothing
            raise RuntimeError(f"{what}: server did not exit within {RUN_TIMEOUT:.0f} s") from None
    server.stop()


def _count(system: System, op: str, side: str, n: int, warmup: int, scratch: Path) -> int:
    """Return callgrind's instruction total of the ``side`` process for one run of ``n`` ops."""
    what = f"{system.name} {op} {side} n={n}"
    out_file = scratch / f"{system.name}-{op}-{side}-{n}.out"
    out_file.unlink(missing_ok=True)
    counted = _valgrind(out_file)
    server = start_server(system.kind, system.path, counted if side == "server" else (), HASH_SEED)
    try:
        env = client_env(system, server.endpoint) | HASH_SEED
        argv = _client_argv(server.endpoint, op, n, warmup)
        result = _run_client(counted + argv if side == "client" else argv, env, what)
        expected = system.path[1] if system.path else str(BENCH_ROOT / "client")
        if system.kind == "kvserve" and not result["kvclient"].startswith(expected):
            raise RuntimeError(f"{what}: client imported {result['kvclient']}, not {expected}")
    finally:
        _stop(server, what)
    return _read_total(out_file)


def _prime(system: System, args: argparse.Namespace) -> None:
    """Run server and client natively once: bytecode caches written before any count."""
    server = start_server(system.kind, system.path, (), HASH_SEED)
    try:
        for op in args.ops:
            env = client_env(system, server.endpoint) | HASH_SEED
            _run_client(_client_argv(server.endpoint, op, 10, 10), env, f"{system.name} prime")
    finally:
        _stop(server, f"{system.name} prime")


def _systems(args: argparse.Namespace) -> list[System]:
    systems = [System("kvserve", "kvserve", (), "kvserve + kvclient + kvproto, this tree")]
    if args.tree:
        tree = args.tree.resolve()
        # The other tree's kvproto too when it has one (bench.cpu takes this tree's).
        path = tuple(str(tree / d) for d in ("server", "client", "protocol") if (tree / d).is_dir())
        has = "kvserve + kvclient" + (" + kvproto" if (tree / "protocol").is_dir() else "")
        systems.append(System(f"kvserve-{args.tree_name}", "kvserve", path, f"{has}, {tree}"))
    systems += [
        System("raw", "raw", (), "raw-socket floor (bench/floor.py, epoll, 1 thread)"),
        System("stdlib", "stdlib", (), "stdlib BaseManager + registered dict"),
    ]
    if args.mypyc_python:
        INTERPRETERS[MYPYC] = str(args.mypyc_python)
        label = f"kvserve + kvclient compiled with mypyc, {args.mypyc_python}"
        systems.insert(1, System(MYPYC, MYPYC, (), label))
    if args.systems and "redis" in args.systems:
        label = f"redis-server + redis-py (hiredis); `mget` is a pipeline({BATCH}) of GETs"
        systems.append(System("redis", "redis", (), label))
    if args.systems:
        # --systems raw,other: kvserve and the --tree one always run (they are compared).
        systems = [s for s in systems if s.kind in ("kvserve", MYPYC) or s.name in args.systems]
    return systems


def run(args: argparse.Namespace) -> list[Measurement]:
    """Run every round; return every measurement, failed ones with their error."""
    systems = _systems(args)
    measurements: list[Measurement] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    counted = sum(s.kind != "redis" or "client" in args.side for s in systems)
    total = args.rounds * len(args.side) * len(args.ops) * counted
    done = 0
    try:
        for system in systems:
            _prime(system, args)
        for rnd in range(args.rounds):
            k = rnd % len(systems)
            order = systems[k:] + systems[:k]
            for side in args.side:
                for op in args.ops:
                    for system in order:
                        if side == "server" and system.kind == "redis":
                            continue  # redis-server is not Python: only its client is counted
                        done += 1
                        m = Measurement(system.name, op, side, rnd, args.n1, args.n2)
                        t0 = time.monotonic()
                        try:
                            # Alternate which of the two runs comes first.
                            ns = (args.n1, args.n2) if rnd % 2 == 0 else (args.n2, args.n1)
                            totals = {
                                n: _count(system, op, side, n, args.warmup, scratch) for n in ns
                            }
                            m.total_n1, m.total_n2 = totals[args.n1], totals[args.n2]
                        except RuntimeError as exc:
                            m.error = str(exc)
                        m.seconds = time.monotonic() - t0
                        measurements.append(m)
                        if m.ok:
                            _log(
                                f"[{done}/{total}] r{rnd + 1} {side:6} {op} {system.name:16} "
                                f"{m.per_op:10,.0f} instr/op  fixed {m.fixed / 1e6:7.1f} M  "
                                f"({m.seconds:.0f} s)"
                            )
                        else:
                            _log(f"[{done}/{total}] {m.error}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return measurements


# -- the report -------------------------------------------------------------------------------


def _values(ms: list[Measurement], system: str, op: str, side: str) -> list[float]:
    return [m.per_op for m in ms if m.ok and (m.system, m.op, m.side) == (system, op, side)]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> float | None:
    """(max - min) / median over rounds, or None with fewer than two rounds."""
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else None


def summary(
    ms: list[Measurement], systems: list[System], sides: list[str], ops: list[str]
) -> list[dict[str, Any]]:
    """Return one row per (op, system): median instructions per op per side, spread, ratios."""
    rows: list[dict[str, Any]] = []
    for op in ops:
        for system in systems:
            row: dict[str, Any] = {"op": op, "system": system.name}
            for side in sides:
                values = _values(ms, system.name, op, side)
                row[side] = _median(values)
                row[f"{side}_rounds"] = values
                row[f"{side}_spread"] = _spread(values)
                for base in ("raw", "stdlib"):
                    mine, theirs = row[side], _median(_values(ms, base, op, side))
                    row[f"{side}_x_{base}"] = mine / theirs if mine and theirs else None
            if all(row[side] is not None for side in sides) and len(sides) == 2:
                row["total"] = sum(row[side] for side in sides)
            rows.append(row)
    return rows


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(
    header: dict[str, Any],
    args: argparse.Namespace,
    ms: list[Measurement],
    systems: list[System],
) -> str:
    """Return the report: the method, instructions per op, this tree against the other."""
    rows = summary(ms, systems, args.side, args.ops)
    spreads = [s for r in rows for side in args.side if (s := r.get(f"{side}_spread")) is not None]
    out = [
        "# kvmanager benchmark: instructions per operation (callgrind)",
        "",
        f"Machine: {header.get('cpu', '?')}, {header.get('nproc', '?')} CPUs, kernel "
        f"{header.get('kernel', '?')}; Python {header.get('python', '?')}; "
        f"{header.get('valgrind', '?')}; kvmanager {header.get('commit', '?')}; load average "
        f"{header.get('loadavg_start', '?')} at the start, {header.get('loadavg_end', '?')} at "
        f"the end; {header.get('wall_s', 0):.0f} s.",
        "",
        f"One client, {', '.join(args.ops)} of a 100-char str (`mget`: {BATCH} keys per call, "
        "`get_many` on kvserve and stdlib, the floor's mget, a redis-py pipeline of GETs). "
        "The counted process (the server for "
        "`server`, the client for `client`) runs under `valgrind --tool=callgrind`, the other "
        f"natively; a fresh client connects, runs {args.warmup:,} warm-up ops and then N ops; "
        "the server then gets SIGTERM. Instructions per op = (total at N2 - total at N1) / "
        f"(N2 - N1), N1 = {args.n1:,}, N2 = {args.n2:,}: start-up, imports, connecting, "
        "warm-up and shutdown cancel. User-space instructions only: no kernel time (syscalls, "
        "loopback TCP), no cache misses, no stalls. `PYTHONHASHSEED=0` everywhere. "
        f"Cells: median over {args.rounds} round(s).",
        "",
        "| op | system | server instr/op | client instr/op | server+client "
        "| server x raw | client x raw | server x stdlib | client x stdlib |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [_num(row.get("server")), _num(row.get("client")), _num(row.get("total"))]
        cells += [_x(row.get(f"{side}_x_{base}")) for base in ("raw", "stdlib") for side in SIDES]
        out.append(f"| {row['op']} | `{row['system']}` | " + " | ".join(cells) + " |")
    if "mget" in args.ops:
        out += [
            "",
            f"`mget` per key (instructions per call / {BATCH}):",
            "",
            "| system | server instr/key | client instr/key | server+client |",
            "|---|---:|---:|---:|",
        ]
        for row in rows:
            if row["op"] == "mget":
                per_key = [row.get(key) for key in ("server", "client", "total")]
                nums = [_num(c / BATCH if c is not None else None) for c in per_key]
                out.append(f"| `{row['system']}` | " + " | ".join(nums) + " |")
    other = next((s.name for s in systems if s.path), None)
    if other:
        out += [
            "",
            f"This tree against `{other}` (`kvserve` / `{other}`, instructions per op):",
            "",
            "| op | server | client | server+client |",
            "|---|---:|---:|---:|",
        ]
        by = {(r["op"], r["system"]): r for r in rows}
        for op in args.ops:
            mine, theirs = by[(op, "kvserve")], by[(op, other)]
            cells = []
            for key in ("server", "client", "total"):
                a, b = mine.get(key), theirs.get(key)
                cells.append(_x(a / b) if a and b else "-")
            out.append(f"| {op} | " + " | ".join(cells) + " |")
    if spreads:
        out += [
            "",
            f"Determinism: over {args.rounds} rounds (every count taken afresh, with the N1 "
            "and N2 runs in the opposite order in odd rounds), the largest (max - min) / median "
            f"of any cell is {max(spreads) * 100:.3f}% (median of the cells: "
            f"{statistics.median(spreads) * 100:.3f}%).",
            "",
            "| op | system | server spread | client spread |",
            "|---|---|---:|---:|",
        ]
        for row in rows:
            cells = [
                "-" if (s := row.get(f"{side}_spread")) is None else f"{s * 100:.3f}%"
                for side in SIDES
            ]
            out.append(f"| {row['op']} | `{row['system']}` | " + " | ".join(cells) + " |")
    out += ["", "Systems:", ""]
    out += [f"- `{s.name}`: {s.label}" for s in systems]
    failed = [m for m in ms if not m.ok]
    if failed:
        out += ["", "Failed measurements:", ""]
        out += [f"- {m.system} {m.op} {m.side} round {m.round + 1}: {m.error}" for m in failed]
    out.append("")
    return "\n".join(out)


# -- the command line -------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="Instructions per op (callgrind) of server and client: kvserve, kvserve "
        "from another tree, the raw-socket floor, the stdlib manager.",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument("--n1", type=int, default=2_000, help="ops of the short run (2000)")
    parser.add_argument("--n2", type=int, default=7_000, help="ops of the long run (7000)")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up ops (default 500)")
    parser.add_argument("--side", default="server,client", help="comma list of server, client")
    parser.add_argument(
        "--kinds", default=",".join(DEFAULT_OPS), help=f"comma list of {', '.join(OPS)} (get,set)"
    )
    parser.add_argument(
        "--systems",
        type=lambda text: [s for s in text.split(",") if s],
        help="of raw, stdlib, redis: the baselines to count (default raw and stdlib; kvserve "
        "always runs; redis: its client side only)",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        help="also count kvserve/kvclient from this source tree (a checkout or a "
        "`git archive` export holding server/ and client/)",
    )
    parser.add_argument(
        "--tree-name", help="its name in the tables (default: its .commit file, or its dir name)"
    )
    parser.add_argument(
        "--mypyc-python",
        type=Path,
        help=f"also count `{MYPYC}`: server and client run by this Python, of a venv with the "
        "compiled build (`KVMANAGER_MYPYC=1 pip install '.[bench]'`)",
    )
    parser.add_argument(
        "--name", default="instructions", help="results file name suffix (default instructions)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no files")
    # The client of one run, started by the parent; not for use by hand.
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--system", "--host", "--op", "--prefix"):  # of the client process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ops", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return args
    args.side = [s for s in args.side.split(",") if s]
    if not args.side or any(s not in SIDES for s in args.side):
        parser.error(f"--side takes a comma list of {', '.join(SIDES)}")
    args.ops = [s for s in args.kinds.split(",") if s]
    if not args.ops or any(s not in OPS for s in args.ops):
        parser.error(f"--kinds takes a comma list of {', '.join(OPS)}")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be 1..10")
    if not 0 <= args.n1 < args.n2 <= 200_000 or not 0 <= args.warmup <= 100_000:
        parser.error("need 0 <= --n1 < --n2 <= 200,000 and --warmup 0..100,000")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
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
    """Count, print the report, write it with the raw numbers; return the exit code."""
    args = _parse_args(argv)
    if args.client:
        return _client_main(args)
    t0 = time.monotonic()
    header = environment(args.tree)
    if args.tree:
        header["commit"] = f"{environment(None)['commit']}, and {header['commit']}"
    header["valgrind"] = subprocess.run(
        ["valgrind", "--version"], capture_output=True, text=True, check=False, timeout=10
    ).stdout.strip()
    systems = _systems(args)
    try:
        ms = run(args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.monotonic() - t0
    report = markdown(header, args, ms, systems)
    print(report)
    if not args.no_write:
        data = {
            "header": header,
            "params": {
                "rounds": args.rounds,
                "n1": args.n1,
                "n2": args.n2,
                "warmup": args.warmup,
                "sides": args.side,
                "hash_seed": HASH_SEED["PYTHONHASHSEED"],
            },
            "systems": [asdict(s) for s in systems],
            "measurements": [asdict(m) | {"per_op": m.per_op} for m in ms if m.ok]
            + [asdict(m) for m in ms if not m.ok],
            "summary": summary(ms, systems, args.side, args.ops),
        }
        base = write_results(args.out, args.name, report, data)
        _log(f"wrote {base}.md and {base}.json")
    failed = [m for m in ms if not m.ok]
    if failed:
        _log(f"{len(failed)} measurement(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
