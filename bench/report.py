"""Results: one phase's numbers, medians over rounds, ratios, targets, Markdown and JSON.

Ratios are computed round by round (kvserve's round-2 number over the stdlib's round-2 number,
measured seconds apart) and then summarized as median [min-max]: on a shared machine the load
drifts over minutes, and a ratio of two numbers taken side by side is what stays meaningful.
The durability cases are reported apart, against the in-memory kvserve of the same round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from bench.cases import DURABILITY_SYSTEMS
from bench.memory import MemoryResult
from bench.restart import RestartResult, Start
from bench.systems import SYSTEM_LABELS

__all__ = [
    "BASELINES",
    "NOISE_CORES",
    "Phase",
    "Target",
    "durability_targets",
    "evaluate_targets",
    "markdown",
    "ratios",
    "summary_json",
]

BASELINES: Final = ("stdlib", "raw", "redis")
NOISE_CORES: Final = 0.2
"""CPU (cores) used by other processes during a window above which a cell is marked †."""


@dataclass
class Phase:
    """One case against one system in one round.

    Attributes:
        case: case name.
        system: system name.
        round: 0-based round number.
        ops_per_s: operations per second, all counted clients together (batch items count).
        p50_us: median latency per call (one round trip), all counted clients pooled.
        p99_us: 99th percentile latency per call.
        max_us: slowest call.
        ops: operations counted.
        client_cpu_us: client CPU (user + sys, all clients) per operation.
        client_sys: share of the clients' CPU spent in the kernel.
        server_cpu_us: server CPU per operation.
        server_sys: share of the server's CPU spent in the kernel.
        server_cores: server CPU seconds per wall second.
        client_cores: clients' CPU seconds per wall second.
        machine_cores: whole machine busy CPU seconds per wall second.
        softirq_cores: kernel softirq time (loopback TCP) per wall second.
        steal_cores: time the hypervisor gave our vCPUs to other guests, per wall second.
        other_cores: what other processes used (machine - clients - server - softirq).
        server_switches: server context switches per operation (voluntary + involuntary).
        server_writes: server write(2) calls per operation (socket sends not included): for a
            ``--data-dir`` kvserve, log writes; under ``--fsync always`` each is followed by
            one fdatasync, so 1 / this is the records that shared one fsync.
        server_write_bytes: bytes the server passed to write(2) per operation (log bytes).
        server_disk_bytes: bytes the server caused to be written to storage per operation,
            counted by the 4 KiB page (a page rewritten after its write-back counts again).
        clients: per-client numbers.
        error: why the phase failed, else "".
    """

    case: str
    system: str
    round: int
    ops_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    ops: int = 0
    client_cpu_us: float = 0.0
    client_sys: float = 0.0
    server_cpu_us: float = 0.0
    server_sys: float = 0.0
    server_cores: float = 0.0
    client_cores: float = 0.0
    machine_cores: float = 0.0
    softirq_cores: float = 0.0
    steal_cores: float = 0.0
    other_cores: float = 0.0
    server_switches: float = 0.0
    server_writes: float = 0.0
    server_write_bytes: float = 0.0
    server_disk_bytes: float = 0.0
    clients: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the phase produced numbers."""
        return not self.error and self.ops > 0


@dataclass
class Target:
    """One line of the issue's targets table, evaluated.

    Attributes:
        name: what is compared.
        op: ``>=`` or ``<=``.
        threshold: required ratio.
        details: ``(label, median ratio)`` per pair compared; None when not measured.
        issue: the issue that set the target.
        unit: ``x`` for a ratio; anything else is printed after the number (``B/key``).
        context: ``(label, median ratio)`` pairs printed for comparison but not judged (the
            cross-vCPU row's speed without ``--busy-poll-us``: the target is with it).
    """

    name: str
    op: str
    threshold: float
    details: list[tuple[str, float | None]]
    issue: int = 4
    unit: str = "x"
    context: list[tuple[str, float | None]] = field(default_factory=list)

    @property
    def measured(self) -> float | None:
        """The worst of the pairs (lowest for ``>=``, highest for ``<=``)."""
        values = [v for _, v in self.details if v is not None]
        if not values:
            return None
        return min(values) if self.op == ">=" else max(values)

    @property
    def verdict(self) -> str:
        """PASS when every measured pair meets the threshold, MISS otherwise, n/a if none."""
        worst = self.measured
        if worst is None:
            return "n/a"
        ok = worst >= self.threshold if self.op == ">=" else worst <= self.threshold
        return "PASS" if ok else "MISS"


# -- aggregation ---------------------------------------------------------------------------


def _by_round(phases: Iterable[Phase], case: str, system: str) -> dict[int, Phase]:
    return {p.round: p for p in phases if p.case == case and p.system == system and p.ok}


def ratios(
    phases: list[Phase],
    a: tuple[str, str],
    b: tuple[str, str],
    metric: Callable[[Phase], float] = lambda p: p.ops_per_s,
) -> list[float]:
    """Return ``metric(a) / metric(b)`` for each round where both (case, system) succeeded."""
    ra, rb = _by_round(phases, *a), _by_round(phases, *b)
    return [metric(ra[r]) / metric(rb[r]) for r in sorted(ra.keys() & rb.keys()) if metric(rb[r])]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> float | None:
    return max(values) / min(values) if values and min(values) > 0 else None


# -- targets -------------------------------------------------------------------------------

_GETSET: Final = ("get-str", "set-str", "get-dict", "set-dict")


def evaluate_targets(phases: list[Phase], memory: list[MemoryResult]) -> list[Target]:
    """Evaluate the issue's targets from this run's numbers (medians of per-round ratios)."""

    def vs(clients: int, baseline: str) -> list[tuple[str, float | None]]:
        return [
            (
                f"{c}-c{clients}",
                _median(
                    ratios(phases, (f"{c}-c{clients}", "kvserve"), (f"{c}-c{clients}", baseline))
                ),
            )
            for c in _GETSET
        ]

    targets = [
        Target("GET/SET, 1 client vs stdlib manager", ">=", 1.10, vs(1, "stdlib")),
        Target("GET/SET, 1 client vs raw-socket floor", ">=", 0.90, vs(1, "raw")),
        Target("GET/SET, 4 clients vs stdlib manager", ">=", 1.30, vs(4, "stdlib")),
        Target("GET/SET, 16 clients vs stdlib manager", ">=", 2.0, vs(16, "stdlib")),
    ]
    stable: list[tuple[str, float | None]] = []
    for c in _GETSET:
        rounds = _by_round(phases, f"{c}-c16", "kvserve")
        spread = _spread([p.ops_per_s for p in rounds.values()]) if len(rounds) > 1 else None
        stable.append((f"{c}-c16", spread))
    targets.append(Target("GET/SET, 16 clients: max/min over rounds", "<=", 1.25, stable))
    targets.append(
        Target(
            "batched 100 keys vs redis-py pipeline(100) + hiredis",
            ">=",
            2.5,
            [
                (n, _median(ratios(phases, (n, "kvserve"), (n, "redis"))))
                for n in ("mget100-str-c1", "mset100-str-c1")
            ],
        )
    )
    targets.append(
        Target(
            "batched 100 keys vs kvserve single-op",
            ">=",
            25.0,
            [
                (
                    "mget100 / get-str-c1",
                    _median(
                        ratios(phases, ("mget100-str-c1", "kvserve"), ("get-str-c1", "kvserve"))
                    ),
                ),
                (
                    "mset100 / set-str-c1",
                    _median(
                        ratios(phases, ("mset100-str-c1", "kvserve"), ("set-str-c1", "kvserve"))
                    ),
                ),
            ],
        )
    )
    targets.append(
        Target(
            "vs Redis + redis-py (hiredis), 1/4/16 clients",
            ">=",
            1.15,
            [pair for n in (1, 4, 16) for pair in vs(n, "redis")],
        )
    )
    mem = {m.system: m for m in memory if not m.error}
    mem_ratio = None
    if "kvserve" in mem and "plain-dict" in mem and mem["plain-dict"].delta > 0:
        mem_ratio = mem["kvserve"].delta / mem["plain-dict"].delta
    keys = memory[0].keys if memory else 0
    targets.append(
        Target(
            "memory vs plain dict (RSS delta)",
            "<=",
            1.10,
            [(f"{keys:,} keys", mem_ratio)],
        )
    )
    p99: list[tuple[str, float | None]] = []
    for c in _GETSET:
        rounds = _by_round(phases, f"{c}-c1", "kvserve")
        p99.append((f"{c}-c1", _median([p.p99_us / p.p50_us for p in rounds.values() if p.p50_us])))
    targets.append(Target("p99 latency / p50, 1 client", "<=", 1.6, p99))
    return targets


_IN_MEMORY: Final = DURABILITY_SYSTEMS[0]


def durability_targets(phases: list[Phase]) -> list[Target]:
    """Evaluate issue 6's targets from the durability phases (none when there are none)."""
    if not phases:
        return []
    cases = ("durable-set-str-c1", "durable-set-str-c4")
    everysec = [
        (case, _median(ratios(phases, (case, "kvserve-everysec"), (case, _IN_MEMORY))))
        for case in cases
    ]
    group = _median(ratios(phases, (cases[1], "kvserve-always"), (cases[0], "kvserve-always")))
    return [
        Target("SET, --fsync everysec vs in-memory kvserve", ">=", 0.85, everysec, issue=6),
        Target(
            "SET, --fsync always: 4 clients / 1 client (group commit)",
            ">=",
            3.0,
            [("durable-set-str-c4 / -c1", group)],
            issue=6,
        ),
    ]


# -- formatting ----------------------------------------------------------------------------


def _n(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    if value >= 1e3:
        return f"{value / 1e3:.2f}k"
    return f"{value:.0f}"


def _us(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _range(values: list[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return "-"
    mid = fmt(statistics.median(values))
    if len(values) == 1:
        return mid
    return f"{mid} [{fmt(min(values))}-{fmt(max(values))}]"


def _ratio_cell(values: list[float]) -> str:
    return _range(values, lambda v: f"{v:.2f}") + ("x" if values else "")


def _cases_in_order(phases: list[Phase]) -> list[str]:
    seen: dict[str, None] = {}
    for p in phases:
        seen.setdefault(p.case, None)
    return list(seen)


def _systems_in_order(phases: list[Phase], systems: list[str]) -> list[str]:
    present = {p.system for p in phases}
    return [s for s in systems if s in present]


def _header_table(header: dict[str, Any]) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in header["packages"].items())
    rows = [
        ("date (start)", header["date"]),
        ("nproc / CPU", f"{header['nproc']} / {header['cpu']}"),
        ("kernel", header["kernel"]),
        ("python", f"{header['implementation']} {header['python']}"),
        ("packages", packages),
        ("redis-server", header["redis_server"]),
        ("kvmanager commit", header["commit"]),
        ("loadavg start / end", f"{header['loadavg_start']} / {header.get('loadavg_end', '?')}"),
        ("rounds x window", f"{header['rounds']} interleaved rounds x {header['duration']:g} s"),
        ("systems", ", ".join(header["systems"])),
        ("wall time", f"{header.get('wall_s', 0):.0f} s"),
    ]
    rows += [(f"skipped: {k}", v) for k, v in header.get("skipped", {}).items()]
    durability = header.get("durability")
    if durability:
        sync = durability["fdatasync"]
        rows.append(("durability systems", ", ".join(durability["systems"])))
        rows.append(("durable data dirs on", durability["data_dir_fs"]))
        rows.append(
            (
                "fdatasync after a 150 B append",
                f"p50 {_us(sync['p50_us'])} µs, p90 {_us(sync['p90_us'])} µs, max "
                f"{_us(sync['max_us'])} µs ({sync['count']:.0f} timed, before the cases)",
            )
        )
    lines = ["| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def markdown(
    title: str,
    header: dict[str, Any],
    phases: list[Phase],
    memory: list[MemoryResult],
    targets: list[Target],
    durable: list[Phase] | None = None,
    restart: RestartResult | None = None,
) -> str:
    """Return the whole report as Markdown."""
    systems = _systems_in_order(phases, list(header["systems"]))
    out = [f"# {title}", ""]
    out += _header_table(header)
    if phases:
        out += _throughput(phases, systems)
    if durable:
        out += _durability(durable)
    if restart is not None:
        out += _restart(restart)
    if memory:
        out += _memory(memory)
    out += _targets(targets)
    present = systems + _systems_in_order(durable or [], list(DURABILITY_SYSTEMS))
    labels = {s: SYSTEM_LABELS[s] for s in present}
    out += ["", "Systems: " + "; ".join(f"`{s}` = {label}" for s, label in labels.items()), ""]
    return "\n".join(out)


def _throughput(phases: list[Phase], systems: list[str]) -> list[str]:
    out = [
        "",
        "## Throughput, latency, CPU per operation",
        "",
        "ops/s: median [min-max] over the rounds, all clients together; batched cases count "
        "each of the 100 keys, the queue case counts items delivered to the consumer. "
        "Latency: one call (one round trip), all clients pooled, median over rounds of each "
        "round's p50 / p99. `x X`: median of the per-round ratios to system X in the same "
        "case. CPU µs/op: CPU seconds of all clients / of the server over the window per "
        "operation, (kernel share). `†`: in some round other processes used more than "
        f"{NOISE_CORES} cores.",
        "",
        "| case | system | ops/s | p50 µs | p99 µs | "
        + " | ".join(f"x {b}" for b in BASELINES)
        + " | client µs/op | server µs/op | server cores | ctx sw/op |",
        "|---|---|---|---|---|" + "---|" * len(BASELINES) + "---|---|---|---|",
    ]
    for case in _cases_in_order(phases):
        for system in systems:
            rounds = _by_round(phases, case, system)
            failed = [p for p in phases if p.case == case and p.system == system and not p.ok]
            if not rounds:
                why = failed[0].error[:120] if failed else "not run"
                out.append(f"| {case} | {system} | failed: {why} |" + " |" * (8 + len(BASELINES)))
                continue
            ps = list(rounds.values())
            noisy = "†" if any(p.other_cores > NOISE_CORES for p in ps) else ""
            failed_note = f" ({len(failed)} failed)" if failed else ""
            cells = [
                case,
                system,
                _range([p.ops_per_s for p in ps], _n) + noisy + failed_note,
                _us(statistics.median(p.p50_us for p in ps)),
                _us(statistics.median(p.p99_us for p in ps)),
            ]
            for base in BASELINES:
                if base == system:
                    cells.append("1")
                else:
                    cells.append(_x(_median(ratios(phases, (case, system), (case, base)))))
            med = statistics.median
            cells += [
                f"{med(p.client_cpu_us for p in ps):.1f} ({med(p.client_sys for p in ps):.0%})",
                f"{med(p.server_cpu_us for p in ps):.1f} ({med(p.server_sys for p in ps):.0%})",
                f"{med(p.server_cores for p in ps):.2f}",
                f"{med(p.server_switches for p in ps):.2f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    if "kvserve" in systems:
        out += [
            "",
            "## kvserve against each baseline (per-round ratios of ops/s)",
            "",
            "| case | " + " | ".join(f"kvserve / {b}" for b in systems if b != "kvserve") + " |",
            "|---|" + "---|" * (len(systems) - 1),
        ]
        for case in _cases_in_order(phases):
            cells = [case]
            for base in systems:
                if base != "kvserve":
                    cells.append(_ratio_cell(ratios(phases, (case, "kvserve"), (case, base))))
            out.append("| " + " | ".join(cells) + " |")
    return out


def _memory(memory: list[MemoryResult]) -> list[str]:
    plain = next((m for m in memory if m.system == "plain-dict" and not m.error), None)
    out = [
        "",
        f"## Memory: {memory[0].keys:,} keys `key:%08d` x distinct 100-char str values",
        "",
        "Server RSS idle and empty, then after the fill (batches of 10,000 from one client). "
        "`plain-dict`: the same dict built in a fresh plain Python process.",
        "",
        "| system | RSS empty MiB | RSS full MiB | Δ MiB | bytes/key | x plain dict "
        "| peak RSS MiB | fill s | keys/s fill |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 1024 * 1024
    for m in memory:
        if m.error:
            out.append(f"| {m.system} | failed: {m.error[:160]} | | | | | | | |")
            continue
        rel = _x(m.delta / plain.delta) if plain and plain.delta > 0 else "-"
        out.append(
            f"| {m.system} | {m.rss_empty / mib:.1f} | {m.rss_full / mib:.1f} | "
            f"{m.delta / mib:.1f} | {m.bytes_per_key:.0f} | {rel} | {m.hwm / mib:.1f} | "
            f"{m.fill_s:.2f} | {_n(m.keys / m.fill_s) if m.fill_s else '-'} |"
        )
    return out


def _durability(phases: list[Phase]) -> list[str]:
    systems = _systems_in_order(phases, list(DURABILITY_SYSTEMS))
    out = [
        "",
        "## Durability (issue 6): SET of a 100-char str, in memory and with `--data-dir`",
        "",
        "Rounds of their own, interleaved like the others; every server is fresh each round, "
        "its data directory in its scratch directory (see `durable data dirs on`). "
        f"`x in-memory`: median of the per-round ratios to `{_IN_MEMORY}` (no `--data-dir`) "
        "in the same case. `log writes/op`: the server's write(2) calls per SET (socket "
        "sends are not write(2)); under `always` each is followed by one fdatasync, so "
        "`SETs/write` is how many SETs shared one fsync (group commit). `log B/op`: bytes "
        "written to the log per SET; `disk B/op`: bytes the kernel counted for writing back, "
        "by the 4 KiB page.",
        "",
        "| case | system | ops/s | p50 µs | p99 µs | x in-memory | server µs/op "
        "| server cores | log writes/op | SETs/write | log B/op | disk B/op |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median
    for case in _cases_in_order(phases):
        for system in systems:
            rounds = _by_round(phases, case, system)
            failed = [p for p in phases if p.case == case and p.system == system and not p.ok]
            if not rounds:
                why = failed[0].error[:120] if failed else "not run"
                out.append(f"| {case} | {system} | failed: {why} |" + " |" * 9)
                continue
            ps = list(rounds.values())
            noisy = "†" if any(p.other_cores > NOISE_CORES for p in ps) else ""
            writes = med(p.server_writes for p in ps)
            in_memory = (
                "1"
                if system == _IN_MEMORY
                else _ratio_cell(ratios(phases, (case, system), (case, _IN_MEMORY)))
            )
            cells = [
                case,
                system,
                _range([p.ops_per_s for p in ps], _n) + noisy,
                _us(med(p.p50_us for p in ps)),
                _us(med(p.p99_us for p in ps)),
                in_memory,
                f"{med(p.server_cpu_us for p in ps):.1f} ({med(p.server_sys for p in ps):.0%})",
                f"{med(p.server_cores for p in ps):.2f}",
                f"{writes:.2f}",
                f"{1 / writes:.2f}" if writes > 0 else "-",
                f"{med(p.server_write_bytes for p in ps):.0f}",
                f"{med(p.server_disk_bytes for p in ps):.0f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    group = ratios(
        phases,
        ("durable-set-str-c4", "kvserve-always"),
        ("durable-set-str-c1", "kvserve-always"),
    )
    if group:
        out += [
            "",
            "Group commit, `always` with 4 clients over `always` with 1 client (per-round "
            f"ratios): {_ratio_cell(group)}; the same for in-memory kvserve: "
            + _ratio_cell(
                ratios(
                    phases,
                    ("durable-set-str-c4", _IN_MEMORY),
                    ("durable-set-str-c1", _IN_MEMORY),
                )
            )
            + ".",
        ]
    return out


def _start_cells(starts: list[Start]) -> list[str]:
    mib = 1024 * 1024
    med = statistics.median
    return [
        str(len(starts)),
        _range([s.seconds for s in starts], lambda v: f"{v:.2f}"),
        _range([s.load_s for s in starts], lambda v: f"{v:.2f}"),
        f"{med(s.snapshot_records for s in starts):.0f} + {med(s.log_records for s in starts):.0f}",
        f"{med(s.keys for s in starts):,.0f}",
        f"{med(s.rss for s in starts) / mib:.0f}",
        f"{med(s.hwm for s in starts) / mib:.0f}",
        _range([s.stop_s for s in starts], lambda v: f"{v:.2f}"),
    ]


def _restart(result: RestartResult) -> list[str]:
    mib = 1024 * 1024
    out = [
        "",
        f"## Restart (issue 6): {result.keys:,} keys x distinct 100-char str in `--data-dir`",
        "",
        "A start is timed from spawning `kvserve` to its `kvserve listening on` line; `kvserve "
        "load s` is its own `loaded ... in Zs` (stderr). `log`: every key in the log "
        "(`set_many` batches of 10,000, `--compact-at 1 TiB` so nothing was compacted "
        "unasked); `snapshot`: after `compact()`. `empty`: the first start, on an empty "
        "directory: the interpreter and imports. `stop s`: SIGTERM to exit. Warm page cache: "
        "the files were just written. median [min-max] over the starts.",
        "",
    ]
    if result.error:
        out += [f"Failed: {result.error[:400]}", ""]
    out += [
        "| scenario | starts | start -> listening s | kvserve load s | records (snapshot + log) "
        "| keys | RSS after start MiB | peak RSS in start MiB | stop s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in ("empty", "log", "snapshot"):
        starts = result.by_scenario(scenario)
        if starts:
            out.append("| " + " | ".join([scenario, *_start_cells(starts)]) + " |")
    rate = f" ({_n(result.keys / result.fill_s)} keys/s)" if result.fill_s else ""
    out += [
        "",
        f"Fill: {result.fill_s:.2f} s{rate}. On disk: {result.disk_log / mib:.1f} MiB of log, "
        f"{result.disk_snapshot / mib:.1f} MiB after the compaction. Compaction: "
        f"{result.compaction_s:.2f} s from `compact()` to `compactions` going up; the slowest "
        f"`stats()` round trip meanwhile (the serving loop's stall): "
        f"{result.compaction_stall_s * 1e3:.0f} ms.",
    ]
    if result.stats_errors:
        out += [
            "",
            f"`stats()` failed {result.stats_errors} time(s) during the compaction (retried): "
            f"{result.stats_error[:200]}",
        ]
    return out


def _targets(targets: list[Target]) -> list[str]:
    measured = [t for t in targets if t.measured is not None]
    out = [
        "",
        "## Targets (medians of per-round ratios, this run)",
        "",
    ]
    if not measured:
        return [*out, "None measured in this run."]
    out += [
        "| issue | target | required | measured (worst pair) | verdict | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for t in measured:

        def fmt(value: float | None, t: Target = t) -> str:
            if t.unit == "x" or value is None:
                return _x(value)
            return f"{value:.3g} {t.unit}"

        detail = ", ".join(
            [f"{label} {fmt(v)}" for label, v in t.details]
            + [f"{label} {fmt(v)} (for comparison)" for label, v in t.context]
        )
        required = f"{t.threshold:g}x" if t.unit == "x" else f"{t.threshold:g} {t.unit}"
        out.append(
            f"| {t.issue} | {t.name} | {t.op} {required} | {fmt(t.measured)} | "
            f"{t.verdict} | {detail} |"
        )
    skipped = [t.name for t in targets if t.measured is None]
    if skipped:
        out += ["", f"Not measured in this run: {'; '.join(skipped)}."]
    return out


def summary_json(phases: list[Phase], systems: list[str]) -> list[dict[str, Any]]:
    """Return per (case, system) medians and ratio lists, for the JSON file."""
    rows: list[dict[str, Any]] = []
    for case in _cases_in_order(phases):
        for system in systems:
            rounds = _by_round(phases, case, system)
            if not rounds:
                continue
            ps = list(rounds.values())
            rows.append(
                {
                    "case": case,
                    "system": system,
                    "ops_per_s": [p.ops_per_s for p in ps],
                    "ops_per_s_median": statistics.median(p.ops_per_s for p in ps),
                    "p50_us_median": statistics.median(p.p50_us for p in ps),
                    "p99_us_median": statistics.median(p.p99_us for p in ps),
                    "ratios": {
                        base: ratios(phases, (case, system), (case, base))
                        for base in systems
                        if base != system
                    },
                }
            )
    return rows


def phase_json(phase: Phase) -> dict[str, Any]:
    """Return one phase as a JSON-ready dict."""
    return asdict(phase)
