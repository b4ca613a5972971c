"""The memory case: server RSS holding N keys ``key:%08d`` -> distinct 100-char str values.

Each server is started fresh, its RSS read while idle, then filled from one client process
in batches of 10,000 (kvserve ``set_many``, stdlib ``update``, raw ``mset``, Redis ``MSET``)
and read again. The reference is the same dict built inside a fresh plain Python process
(``python -m bench.memory --plain N``), which prints its own RSS before and after as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import rss_bytes
from bench.systems import SkipSystemError, start_server, value_for
from bench.worker import PhaseError, WorkerPool

__all__ = ["MemoryResult", "measure_plain", "measure_server"]

FILL_BATCH = 10_000


@dataclass
class MemoryResult:
    """RSS of one system before and after holding ``keys`` keys.

    Attributes:
        system: system name, or ``plain-dict``.
        keys: number of keys stored.
        rss_empty: bytes, idle and empty.
        rss_full: bytes, holding every key.
        hwm: peak RSS (VmHWM), bytes.
        fill_s: seconds the fill took, as seen by the client.
        error: why the measurement failed or was skipped, else "".
    """

    system: str
    keys: int
    rss_empty: int = 0
    rss_full: int = 0
    hwm: int = 0
    fill_s: float = 0.0
    error: str = ""

    @property
    def delta(self) -> int:
        """Bytes the data added."""
        return self.rss_full - self.rss_empty

    @property
    def bytes_per_key(self) -> float:
        """Added bytes per key."""
        return self.delta / self.keys if self.keys else 0.0

    def to_json(self) -> dict[str, Any]:
        """Return the fields and the derived numbers as a JSON-ready dict."""
        return {**asdict(self), "delta": self.delta, "bytes_per_key": self.bytes_per_key}


def measure_server(system: str, pool: WorkerPool, keys: int) -> MemoryResult:
    """Start ``system`` fresh, fill it with ``keys`` keys, and return its RSS before and after."""
    result = MemoryResult(system, keys)
    try:
        server = start_server(system)
    except (SkipSystemError, RuntimeError) as exc:
        result.error = str(exc)
        return result
    try:
        time.sleep(0.2)  # let start-up allocations settle before the baseline
        result.rss_empty, _ = rss_bytes(server.pid)
        result.fill_s = pool.fill(server.endpoint, keys, FILL_BATCH)
        time.sleep(0.2)
        result.rss_full, result.hwm = rss_bytes(server.pid)
    except (PhaseError, OSError) as exc:
        result.error = str(exc)
    finally:
        server.stop()
    return result


def measure_plain(keys: int) -> MemoryResult:
    """Build the same dict in a fresh plain Python process; return its RSS before and after."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--plain", str(keys)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
            env=env,
        )
        data = json.loads(out.stdout)
    except (subprocess.SubprocessError, ValueError) as exc:
        return MemoryResult("plain-dict", keys, error=f"plain dict build failed: {exc}")
    return MemoryResult("plain-dict", keys, **data)


def _plain(keys: int) -> None:
    pid = os.getpid()
    rss_empty, _ = rss_bytes(pid)
    t0 = time.perf_counter()
    data: dict[str, str] = {}
    for lo in range(0, keys, FILL_BATCH):
        data.update({f"key:{i:08d}": value_for(i) for i in range(lo, min(lo + FILL_BATCH, keys))})
    fill_s = time.perf_counter() - t0
    rss_full, hwm = rss_bytes(pid)
    assert len(data) == keys
    print(json.dumps({"rss_empty": rss_empty, "rss_full": rss_full, "hwm": hwm, "fill_s": fill_s}))


def main() -> None:
    """``python -m bench.memory --plain N``: the plain-dict reference, as one JSON line."""
    parser = argparse.ArgumentParser(description="Plain-dict memory reference for bench.")
    parser.add_argument("--plain", type=int, required=True, metavar="KEYS")
    _plain(parser.parse_args().plain)


if __name__ == "__main__":
    main()
