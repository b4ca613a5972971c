"""The startup case (issue 18): one shell command, process start to exit, next to its peers.

Each row is a whole process run to its exit, as a shell script calling it in a loop pays it:

- ``python -c pass``: the interpreter alone, the floor under any Python CLI;
- ``kvctl get``: the installed ``kvctl`` script, ``get`` of a 100-char str from a fresh kvserve
  on 127.0.0.1 (the fast path, :mod:`kvclient._kvctl`);
- ``kvctl get (typer)``: the same with ``KVCTL_NO_FAST_PATH=1``, through the typer app, as
  every other command runs;
- ``kvctl names`` (typer, for a command without a fast path);
- ``redis-cli GET``: the same GET against a fresh redis-server (skipped, with the reason,
  when redis-cli or redis-server is not installed).

With ``every_command`` (``python -m bench --only startup --startup-every-command``), a row
for each kvctl command as well, each marked ``fast`` (served by :mod:`kvclient._kvctl`) or
``typer``: every command that succeeds repeatably against a fresh server (not ``dump``,
``restore``, ``compact``, ``slowlog``, ``drop``, ``top``, ``lock acquire/release``, whose
runs would not be alike), with the data they read seeded first.

The rows run interleaved, one run of each in turn (the order rotating), so that load from
elsewhere on the machine falls on all of them alike; each run's wall time is taken around
``subprocess.run``, with the CPU time of the child from ``resource.getrusage``. The verdict
line compares the medians: issue 18 asks ``kvctl get`` for at most 5x ``python -c pass``.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.measure import environment, loadavg, write_results
from bench.systems import Server, SkipSystemError, start_server, value_for

__all__ = ["StartupResult", "main", "measure_startup"]

TARGET_RATIO: Final = 5.0
_RUN_TIMEOUT: Final = 30.0


def _rank(sorted_values: list[float], fraction: float) -> float:
    """Return the ``fraction`` quantile (nearest rank, as bench.measure.percentile)."""
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class Row:
    """One command's runs: wall and CPU seconds of each."""

    name: str
    argv: list[str]
    env: dict[str, str]
    expect: bytes | None  # None: any output
    code: int = 0
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Return count, median, p90, p99 and max wall ms, and the median CPU ms."""
        wall = sorted(self.wall)
        return {
            "name": self.name,
            "argv": " ".join(self.argv),
            "runs": len(wall),
            "median_ms": statistics.median(wall) * 1e3 if wall else 0.0,
            "p90_ms": _rank(wall, 0.90) * 1e3 if wall else 0.0,
            "p99_ms": _rank(wall, 0.99) * 1e3 if wall else 0.0,
            "max_ms": wall[-1] * 1e3 if wall else 0.0,
            "cpu_median_ms": statistics.median(self.cpu) * 1e3 if self.cpu else 0.0,
        }


@dataclass
class StartupResult:
    """What :func:`measure_startup` measured, and what it skipped and why."""

    rows: list[Row]
    skipped: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """Return the summaries and the raw wall times (ms)."""
        return {
            "rows": [row.summary() for row in self.rows],
            "raw_wall_ms": {row.name: [w * 1e3 for w in row.wall] for row in self.rows},
            "skipped": self.skipped,
        }

    def ratio(self, name: str) -> float | None:
        """Return the median of row ``name`` over the median of ``python -c pass``."""
        by_name = {row.name: row for row in self.rows}
        base, row = by_name.get("python -c pass"), by_name.get(name)
        if base is None or row is None or not base.wall or not row.wall:
            return None
        return float(statistics.median(row.wall) / statistics.median(base.wall))


def _timed(row: Row) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        row.argv, env=row.env, capture_output=True, timeout=_RUN_TIMEOUT, check=False
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != row.code or row.expect not in (None, done.stdout):
        raise RuntimeError(
            f"{row.name}: exit {done.returncode}, stdout {done.stdout[:80]!r}, "
            f"stderr {done.stderr[-300:]!r}"
        )
    row.wall.append(wall)
    row.cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def _kvctl() -> str:
    script = Path(sys.executable).parent / "kvctl"
    if not script.exists():
        raise SystemExit(f"bench: {script} missing: install the project (pip install -e .)")
    return str(script)


def _redis_row(value: str) -> tuple[Row | None, Server | None, str]:
    cli = shutil.which("redis-cli")
    if cli is None:
        return None, None, "redis-cli is not installed (apt-get install redis-server) - skipped"
    try:
        server = start_server("redis")
    except SkipSystemError as exc:
        return None, None, str(exc)
    port = str(server.endpoint.port)
    subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", port, "SET", "greeting", value],
        capture_output=True,
        check=True,
        timeout=_RUN_TIMEOUT,
    )
    argv = [cli, "-h", "127.0.0.1", "-p", port, "GET", "greeting"]
    return Row("redis-cli GET", argv, dict(os.environ), value.encode() + b"\n"), server, ""


def _command_rows(kvctl: str, env: dict[str, str], value: str) -> list[Row]:
    """Return a row per kvctl command not in the main rows, after seeding the data they read."""
    seed = [
        ["list", "push", "jobs", *(f"j{i}" for i in range(5))],
        ["queue", "put", "inbox", *(f"m{i}" for i in range(2000))],
        ["ns", "set", "cfg", "mode", "fast"],
        ["value", "set", "hits", "0"],
        ["lock", "run", "deploy", "--", "true"],
        ["set", "same", "v"],
    ]
    for argv in seed:
        subprocess.run([kvctl, *argv], env=env, check=True, timeout=_RUN_TIMEOUT)
    table: list[tuple[str, list[str], bytes | None, int]] = [
        ("set (fast)", ["set", "scratch", "v"], b"", 0),
        ("incr (fast)", ["incr", "-d", "counters", "n"], None, 0),
        ("set --json (typer)", ["set", "--json", "doc", '{"a": 1}'], b"", 0),
        ("get --bytes (typer)", ["get", "--bytes", "greeting"], value.encode(), 0),
        ("del (typer)", ["del", "never-there"], b"0\n", 1),
        ("keys (typer)", ["keys", "greet*"], b"greeting\n", 0),
        ("cas (typer)", ["cas", "same", "v", "v"], b"", 0),
        ("mget (typer)", ["mget", "same"], b'{"same": "v"}\n', 0),
        ("mset (typer)", ["mset", "m1", "a", "m2", "b"], b"", 0),
        ("ping (typer)", ["ping"], None, 0),
        ("stats (typer)", ["stats"], None, 0),
        ("list push (typer)", ["list", "push", "jobs", "j"], b"", 0),
        ("list pop (typer)", ["list", "pop", "jobs"], None, 0),
        ("list range (typer)", ["list", "range", "jobs", "0", "2"], b"j0\nj1\n", 0),
        ("list len (typer)", ["list", "len", "jobs"], None, 0),
        ("queue put (typer)", ["queue", "put", "inbox", "m"], b"", 0),
        ("queue get (typer)", ["queue", "get", "inbox", "--no-wait"], None, 0),
        ("queue size (typer)", ["queue", "size", "inbox"], None, 0),
        ("ns get (typer)", ["ns", "get", "cfg", "mode"], b"fast\n", 0),
        ("ns set (typer)", ["ns", "set", "cfg", "mode", "fast"], b"", 0),
        ("ns show (typer)", ["ns", "show", "cfg"], b'{"mode": "fast"}\n', 0),
        ("value get (typer)", ["value", "get", "hits"], None, 0),
        ("value set (typer)", ["value", "set", "hits", "0"], b"", 0),
        ("value incr (typer)", ["value", "incr", "hits"], None, 0),
        ("lock status (typer)", ["lock", "status", "deploy"], None, 0),
        ("lock run -- true (typer)", ["lock", "run", "deploy", "--", "true"], b"", 0),
    ]
    return [Row(f"kvctl {name}", [kvctl, *argv], env, out, code) for name, argv, out, code in table]


def measure_startup(runs: int, log: Any = print, every_command: bool = False) -> StartupResult:
    """Run every row ``runs`` times, interleaved; return the wall and CPU times.

    Args:
        runs: runs of each row.
        log: where progress notes go.
        every_command: add a row for each kvctl command (see the module docstring).

    Raises:
        RuntimeError: a command failed or printed something else than expected.
    """
    value = value_for(0)
    servers: list[Server] = []
    skipped: dict[str, str] = {}
    try:
        kvserve = start_server("kvserve")
        servers.append(kvserve)
        endpoint = kvserve.endpoint
        # Without PYTHONDONTWRITEBYTECODE: the warm-up run then caches the bytecode of an
        # editable install as an installed wheel has it; compiling kvclient.cli from source
        # on every call would add ~100 ms that no user pays.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KV") and k != "PYTHONDONTWRITEBYTECODE"
        }
        env |= {
            "KV_AUTHKEY": endpoint.authkey,
            "KV_ADDRESS": f"{endpoint.host}:{endpoint.port}",
            "HOME": str(kvserve.workdir / "home"),
        }
        kvctl = _kvctl()
        subprocess.run([kvctl, "set", "greeting", value], env=env, check=True, timeout=_RUN_TIMEOUT)
        typer_env = dict(env, KVCTL_NO_FAST_PATH="1")
        names = b"NAME     KIND  SIZE\ndefault  dict  1\n"
        rows = [
            Row("python -c pass", [sys.executable, "-c", "pass"], env, b""),
            Row("kvctl get", [kvctl, "get", "greeting"], env, value.encode() + b"\n"),
            Row("kvctl get (typer)", [kvctl, "get", "greeting"], typer_env, value.encode() + b"\n"),
            Row("kvctl names (typer)", [kvctl, "names"], env, None if every_command else names),
        ]
        if every_command:
            rows += _command_rows(kvctl, env, value)
        redis_row, redis_server, why = _redis_row(value)
        if redis_row is None:
            skipped["redis-cli GET"] = why
            log(f"startup: {why}")
        else:
            rows.append(redis_row)
            assert redis_server is not None
            servers.append(redis_server)
        for row in rows:  # warm the page cache and the .pyc files; not counted
            _timed(row)
            row.wall.clear()
            row.cpu.clear()
        for i in range(runs):
            k = i % len(rows)
            for row in rows[k:] + rows[:k]:
                _timed(row)
    finally:
        for server in servers:
            server.stop()
    return StartupResult(rows, skipped)


def markdown(result: StartupResult, header: dict[str, Any], runs: int) -> str:
    """Return the report: machine, one table row per command, the verdict."""
    cpu = header.get("cpu", "?")
    out = [
        "# kvmanager benchmark: startup (issue 18)",
        "",
        f"Machine: {cpu}, {header.get('nproc', '?')} CPUs, kernel {header.get('kernel', '?')}; "
        f"Python {header.get('python', '?')}; kvmanager {header.get('commit', '?')}; "
        f"{runs} interleaved runs per command; load average {header.get('loadavg_start', '?')} "
        f"at the start, {header.get('loadavg_end', '?')} at the end. Wall time is process "
        "start to exit; CPU is the child's user + system time; bytecode cached (.pyc), as in "
        "an installed wheel.",
        "",
        "| command | runs | median ms | p90 ms | p99 ms | max ms | CPU median ms | x python |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        s = row.summary()
        ratio = result.ratio(row.name)
        out.append(
            f"| `{row.name}` | {s['runs']} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | "
            f"{s['p99_ms']:.1f} | {s['max_ms']:.1f} | {s['cpu_median_ms']:.1f} | "
            f"{ratio:.2f} |"
        )
    for name, why in result.skipped.items():
        out.append(f"| `{name}` | - | skipped: {why} | | | | | |")
    ratio = result.ratio("kvctl get")
    verdict = "unmeasured" if ratio is None else ("met" if ratio <= TARGET_RATIO else "MISSED")
    out += [
        "",
        f"Target (issue 18): `kvctl get` median at most {TARGET_RATIO:g}x `python -c pass`: "
        f"{'-' if ratio is None else f'{ratio:.2f}x'}, **{verdict}**.",
        "",
    ]
    return "\n".join(out)


def main(
    runs: int, out_dir: Path, write: bool, name: str = "startup", every_command: bool = False
) -> int:
    """Measure, print the report, write it with the raw numbers; return the exit code."""
    header = environment(None)
    result = measure_startup(
        runs, log=lambda m: print(m, file=sys.stderr, flush=True), every_command=every_command
    )
    header["loadavg_end"] = loadavg()
    report = markdown(result, header, runs)
    print(report)
    if write:
        data = {"header": header, "runs": runs, "startup": result.to_json()}
        base = write_results(out_dir, name, report, data)
        print(f"wrote {base}.md and {base}.json", file=sys.stderr)
    return 0
