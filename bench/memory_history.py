"""``python -m bench.memory_history KEYS [ARGS ...]``: kvserve's bytes per key under server options.

For each ARGS (one string of kvserve options, ``""`` for none, e.g. ``"--watch-history 0"``): a
fresh kvserve, its RSS idle and empty, a fill of KEYS keys ``key:%08d`` -> distinct 100-char
str values in ``set_many`` batches of :data:`bench.memory.FILL_BATCH` from this process (as
:mod:`bench.memory` fills it from a worker), its RSS again; one line per ARGS. What the watch
history costs, bench/results/*-memory-history.md.
"""

from __future__ import annotations

import argparse
import time

from bench.measure import rss_bytes
from bench.memory import FILL_BATCH
from bench.systems import KVServeDriver, start_server

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Measure every ARGS in turn and print its bytes per key."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory_history")
    parser.add_argument("keys", type=int)
    parser.add_argument("server_args", nargs="*", help='kvserve options, one string each ("")')
    args = parser.parse_args(argv)
    for options in args.server_args or [""]:
        server = start_server("kvserve", server_args=options.split())
        try:
            time.sleep(0.2)  # start-up allocations settle before the baseline
            empty, _ = rss_bytes(server.pid)
            driver = KVServeDriver(server.endpoint)
            t0 = time.monotonic()
            driver.fill(0, args.keys, FILL_BATCH)
            fill_s = time.monotonic() - t0
            driver.close()
            time.sleep(0.3)
            full, hwm = rss_bytes(server.pid)
        finally:
            server.stop()
        print(
            f"{options or '(default)':28} {(full - empty) / args.keys:6.1f} B/key  "
            f"peak {hwm / 2**20:.0f} MiB  fill {fill_s:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
