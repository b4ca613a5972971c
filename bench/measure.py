"""Measurements around a phase: server CPU and I/O, machine CPU, percentiles, the run's header.

Server CPU comes from ``/proc/PID/stat`` through psutil (all threads of the process), its I/O
from ``/proc/PID/io``, machine CPU from ``/proc/stat``; all are sampled at the start and the
end of the timed window by the parent process, which sleeps in between. Clients measure their
own CPU with getrusage. For the durability cases the header also names the filesystem the data
directories are on and how long one ``fdatasync`` of an appended record takes there.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "MachineSample",
    "ProcessSample",
    "environment",
    "filesystem",
    "fsync_probe",
    "loadavg",
    "percentile",
    "rss_bytes",
    "sample_machine",
    "sample_process",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessSample:
    """CPU seconds, context switches and I/O of one process (all its threads) at one instant.

    Attributes:
        user: user CPU seconds.
        system: kernel CPU seconds.
        voluntary: voluntary context switches.
        involuntary: involuntary context switches.
        writes: write(2)-family calls (``syscw``). Socket sends are not among them, so for
            kvserve this counts writes to its log: one per loop iteration that had records.
        write_chars: bytes passed to those calls (``wchar``).
        disk_bytes: bytes the process caused to be written to storage (``write_bytes``),
            counted by the page: rewriting a page that was already written back counts again.
    """

    user: float
    system: float
    voluntary: int
    involuntary: int
    writes: int = 0
    write_chars: int = 0
    disk_bytes: int = 0


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
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        voluntary, involuntary = _thread_switches(pid)
    except (psutil.Error, OSError):
        return None
    try:
        io = proc.io_counters()
        writes, write_chars, disk_bytes = (
            int(io.write_count),
            int(io.write_chars),
            int(io.write_bytes),
        )
    except (psutil.Error, OSError, AttributeError):  # no /proc/PID/io (kernel without taskstats)
        writes = write_chars = disk_bytes = 0
    return ProcessSample(
        float(times.user),
        float(times.system),
        voluntary,
        involuntary,
        writes,
        write_chars,
        disk_bytes,
    )


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


def filesystem(path: str | Path) -> str:
    """Return what ``path`` is stored on: ``"ext4 /dev/vda (mounted on /)"``, from the mounts."""
    target = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, device, fstype)
    except OSError:
        return "?"
    mount, device, fstype = best
    return f"{fstype} {device} (mounted on {mount})"


def fsync_probe(directory: str | Path | None = None, count: int = 200) -> dict[str, float]:
    """Time ``fdatasync`` after appending one 150-byte record, as ``--fsync always`` does.

    Args:
        directory: where to put the scratch file (default: tempfile's directory, where the
            durable servers keep their data).
        count: appends to time (bounded: at most 10 s in all).

    Returns:
        ``{"p50_us", "p90_us", "max_us", "count"}`` over the timed appends.
    """
    record = b"r" * 150
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=directory) as tmp:
        fd = os.open(os.path.join(tmp, "probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            deadline = time.monotonic() + 10.0
            for _ in range(count):
                t0 = time.perf_counter()
                os.write(fd, record)
                os.fdatasync(fd)
                times.append((time.perf_counter() - t0) * 1e6)
                if time.monotonic() > deadline:
                    break
        finally:
            os.close(fd)
    times.sort()
    return {
        "p50_us": statistics.median(times),
        "p90_us": times[int(0.9 * (len(times) - 1))],
        "max_us": times[-1],
        "count": float(len(times)),
    }


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


def write_results(out: Path, name: str, report: str, data: dict[str, Any]) -> Path:
    """Write ``report`` and ``data`` to ``out/<UTC date>-<name>.md`` and ``.json``.

    Returns the path without its suffix (what the callers log).
    """
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    base = out / f"{stamp}-{name}"
    base.with_suffix(".md").write_text(report)
    base.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return base
