"""The restart case: how long a ``--data-dir`` kvserve takes to come back holding N keys.

One data directory (in tempfile's directory, on the disk the report names) goes through:

1. start on the empty directory (``--compact-at 1 TiB``, so nothing is compacted unasked;
   with the default 64 MiB a compaction would start in the middle of the fill), timed: the
   interpreter and imports, the floor under every start;
2. fill with N keys ``key:%08d`` -> distinct 100-char str, ``set_many`` batches of 10,000,
   from one client process; then SIGTERM, timed to the exit (the log is flushed and fsynced);
3. ``rounds`` restarts with everything in the log (replay);
4. ``compact()``, then poll ``stats()`` until ``persistence.compactions`` goes up; the slowest
   ``stats()`` round trip meanwhile is how long the serving loop stalled (a ``stats()`` that
   fails meanwhile is counted and retried: kvserve's ``disk_bytes()`` can race the deletion
   of the segments the snapshot covers);
5. ``rounds`` restarts from the snapshot (and an empty log).

A start is timed from just before the process is spawned to the ``kvserve listening on`` line
on its stdout; kvserve's own ``loaded N containers, X snapshot and Y log records in Zs`` line
(stderr) is reported beside it. Every restart checks the key count. The files were just
written, so they are read from the page cache: these are warm restarts.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from bench.measure import rss_bytes
from bench.systems import Endpoint
from bench.worker import WorkerPool

__all__ = ["RestartResult", "Start", "measure_restart"]

FILL_BATCH: Final = 10_000
_NO_AUTO_COMPACTION: Final = str(1 << 40)
_START_TIMEOUT: Final = 600.0
_STOP_TIMEOUT: Final = 120.0
_COMPACT_TIMEOUT: Final = 600.0
_LOADED = re.compile(r"loaded (\d+) containers, (\d+) snapshot and (\d+) log records in ([0-9.]+)s")


@dataclass
class Start:
    """One timed start of kvserve on the data directory.

    Attributes:
        scenario: ``empty``, ``log`` (every key in the log) or ``snapshot`` (after compaction).
        seconds: process spawn to the ``kvserve listening on`` line.
        load_s: what kvserve itself reports for loading the directory.
        snapshot_records: snapshot records kvserve loaded.
        log_records: log records kvserve replayed.
        keys: keys held after the start (from ``stats()``).
        rss: resident bytes once listening.
        hwm: peak resident bytes during the start (VmHWM): the cost of loading.
        stop_s: SIGTERM to exit of this process.
    """

    scenario: str
    seconds: float = 0.0
    load_s: float = 0.0
    snapshot_records: int = 0
    log_records: int = 0
    keys: int = 0
    rss: int = 0
    hwm: int = 0
    stop_s: float = 0.0


@dataclass
class RestartResult:
    """Everything the restart case measured.

    Attributes:
        keys: keys filled.
        data_dir: where the data directory was.
        fill_s: seconds the fill took, as seen by the client.
        disk_log: bytes on disk with everything in the log.
        disk_snapshot: bytes on disk after the compaction.
        compaction_s: ``compact()`` to ``compactions`` going up, seconds.
        compaction_stall_s: the slowest ``stats()`` round trip during the compaction.
        stats_errors: ``stats()`` calls that failed during the compaction.
        stats_error: the first such failure, else "".
        starts: every timed start, in order.
        error: why the case failed, else "".
    """

    keys: int
    data_dir: str = ""
    fill_s: float = 0.0
    disk_log: int = 0
    disk_snapshot: int = 0
    compaction_s: float = 0.0
    compaction_stall_s: float = 0.0
    stats_errors: int = 0
    stats_error: str = ""
    starts: list[Start] = field(default_factory=list)
    error: str = ""

    def by_scenario(self, scenario: str) -> list[Start]:
        """Return the starts of one scenario."""
        return [s for s in self.starts if s.scenario == scenario]

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


class _Kvserve:
    """One kvserve process on the data directory, started and timed."""

    def __init__(self, data_dir: Path, workdir: Path, key: str, scenario: str) -> None:
        self.start = Start(scenario)
        self.stderr_path = workdir / f"stderr-{scenario}-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KV_", "BENCH_"))}
        env.update(HOME=str(workdir / "home"), KV_AUTHKEY=key)
        argv = [
            sys.executable,
            "-m",
            "kvserve",
            "--port",
            "0",
            "--log-level",
            "info",
            "--data-dir",
            str(data_dir),
            "--compact-at",
            _NO_AUTO_COMPACTION,
        ]
        self._log: IO[bytes] = self.stderr_path.open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, env=env
        )
        line = self._readline(t0 + _START_TIMEOUT)
        self.start.seconds = time.monotonic() - t0
        prefix = "kvserve listening on "
        if not line.startswith(prefix):
            self.stop()
            raise RuntimeError(f"kvserve did not start: stdout {line!r}, stderr {self.tail()!r}")
        host, _, port = line.removeprefix(prefix).strip().rpartition(":")
        self.endpoint = Endpoint("kvserve-everysec", host.strip("[]"), int(port), key)
        self.start.rss, self.start.hwm = rss_bytes(self.proc.pid)
        found = _LOADED.search(self.stderr_path.read_text(errors="replace"))
        if found:
            self.start.snapshot_records = int(found.group(2))
            self.start.log_records = int(found.group(3))
            self.start.load_s = float(found.group(4))

    def _readline(self, deadline: float) -> str:
        assert self.proc.stdout is not None
        # Not readline(): a start that hangs must not hang the benchmark.
        fd = self.proc.stdout.fileno()
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace")

    def tail(self, limit: int = 1000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, timed to the exit (SIGKILL after 120 s)."""
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.start.stop_s = time.monotonic() - t0
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def _client(endpoint: Endpoint) -> Any:
    import kvclient  # imported here: after --tree has put the benchmarked tree on sys.path

    return kvclient.connect((endpoint.host, endpoint.port), endpoint.authkey.encode())


def _restart(result: RestartResult, data_dir: Path, workdir: Path, key: str, scenario: str) -> None:
    server = _Kvserve(data_dir, workdir, key, scenario)
    result.starts.append(server.start)
    try:
        kv = _client(server.endpoint)
        try:
            server.start.keys = int(kv.stats()["keys"])
        finally:
            kv.close()
    finally:
        server.stop()
    if server.start.keys != result.keys:
        raise RuntimeError(f"{scenario} restart holds {server.start.keys} keys, not {result.keys}")


def _compact(result: RestartResult, endpoint: Endpoint) -> None:
    from kvclient.errors import RemoteError

    kv = _client(endpoint)
    try:
        before = int(kv.stats()["persistence"]["compactions"])
        t0 = time.monotonic()
        if not kv.compact():
            raise RuntimeError("compact() answered False: a compaction was already running")
        stall = 0.0
        while time.monotonic() - t0 < _COMPACT_TIMEOUT:
            c0 = time.monotonic()
            try:
                persistence = kv.stats()["persistence"]
            except RemoteError as exc:
                result.stats_errors += 1
                result.stats_error = result.stats_error or str(exc)
                continue
            finally:
                stall = max(stall, time.monotonic() - c0)
            if persistence["last_error"]:
                raise RuntimeError(f"compaction failed: {persistence['last_error']}")
            if int(persistence["compactions"]) > before:
                result.compaction_s = time.monotonic() - t0
                result.compaction_stall_s = stall
                result.disk_snapshot = int(persistence["disk_bytes"])
                return
            time.sleep(0.01)
        raise RuntimeError(f"compaction did not finish within {_COMPACT_TIMEOUT:.0f} s")
    finally:
        kv.close()


def measure_restart(pool: WorkerPool, keys: int, rounds: int) -> RestartResult:
    """Fill a data directory with ``keys`` keys and time restarts from the log and a snapshot.

    Args:
        pool: the client processes (worker 0 fills).
        keys: keys to fill.
        rounds: timed restarts per scenario.

    Returns:
        The measurements; ``error`` says what failed, if anything did.
    """
    result = RestartResult(keys)
    workdir = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    (workdir / "home").mkdir()
    data_dir = workdir / "data"
    result.data_dir = str(data_dir)
    key = secrets.token_hex(16)
    try:
        server = _Kvserve(data_dir, workdir, key, "empty")
        result.starts.append(server.start)
        try:
            result.fill_s = pool.fill(server.endpoint, keys, FILL_BATCH)
            kv = _client(server.endpoint)
            try:
                result.disk_log = int(kv.stats()["persistence"]["disk_bytes"])
            finally:
                kv.close()
        finally:
            server.stop()
        for _ in range(rounds):
            _restart(result, data_dir, workdir, key, "log")
        server = _Kvserve(data_dir, workdir, key, "compact")
        try:
            _compact(result, server.endpoint)
        finally:
            server.stop()
        for _ in range(rounds):
            _restart(result, data_dir, workdir, key, "snapshot")
    except Exception as exc:  # kvclient errors too: the report says what failed, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
