"""Measurements around a phase: server CPU, machine CPU, percentiles, and the run's header.

Server CPU comes from ``/proc/PID/stat`` through psutil (all threads of the process), machine
CPU from ``/proc/stat``; both are sampled at the start and the end of the timed window by the
parent process, which sleeps in between. Clients measure their own CPU with getrusage.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "MachineSample",
    "ProcessSample",
    "environment",
    "loadavg",
    "percentile",
    "rss_bytes",
    "sample_machine",
    "sample_process",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessSample:
    """CPU seconds and context switches of one process (all its threads) at one instant."""

    user: float
    system: float
    voluntary: int
    involuntary: int


@dataclass(frozen=True)
class MachineSample:
    """Machine-wide CPU seconds (all cores) at one instant, from ``/proc/stat``."""

    wall: float
    busy: float
    softirq: float
    steal: float


def _thread_switches(pid: int) -> tuple[int, int]:
    # /proc/PID/status counts the main thread only; a thread-per-connection server switches
    # in its other threads, so add up every task.
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # the thread exited meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def sample_process(pid: int) -> ProcessSample | None:
    """Return the CPU times (all threads) of ``pid``, or None if it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
        voluntary, involuntary = _thread_switches(pid)
    except (psutil.Error, OSError):
        return None
    return ProcessSample(float(times.user), float(times.system), voluntary, involuntary)


def sample_machine() -> MachineSample:
    """Return busy, softirq and steal CPU seconds summed over cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is in user.
    # Steal (the hypervisor ran someone else on our vCPU) is not work done here: it is kept
    # apart, as a measure of noise from neighbours.
    busy = sum(fields[:3]) + fields[5] + fields[6]
    return MachineSample(
        time.monotonic(), busy / _CLK_TCK, fields[6] / _CLK_TCK, fields[7] / _CLK_TCK
    )


def rss_bytes(pid: int) -> tuple[int, int]:
    """Return ``(VmRSS, VmHWM)`` of ``pid`` in bytes."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Return the ``fraction`` quantile (nearest rank) of already sorted values; 0 if empty."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def loadavg() -> str:
    """Return ``/proc/loadavg`` as one string."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git(*args: str, repo: Path | None = None) -> str:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _commit(tree: Path | None) -> str:
    if tree is not None and (tree / ".commit").is_file():
        # A `git archive` export has no .git; whoever exported it wrote the commit here.
        return f"{(tree / '.commit').read_text().strip()} (tree {tree})"
    repo = tree or Path(__file__).resolve().parent.parent
    commit = _git("rev-parse", "--short", "HEAD", repo=repo)
    if not commit:
        return f"? (tree {tree})" if tree else "?"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", repo=repo))
    return f"{commit}{' (dirty)' if dirty else ''}" + (f" (tree {tree})" if tree else "")


def environment(tree: Path | None = None) -> dict[str, Any]:
    """Return the facts a result is meaningless without: machine, versions, load.

    Args:
        tree: the source tree benchmarked, when not the installed kvmanager.
    """
    redis_exe = shutil.which("redis-server")
    redis_version = ""
    if redis_exe:
        redis_version = subprocess.run(
            [redis_exe, "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "packages": {
            name: _version(name) for name in ("kvmanager", "msgpack", "redis", "hiredis", "psutil")
        },
        "redis_server": redis_version or "not installed",
        "commit": _commit(tree),
        "loadavg_start": loadavg(),
    }
