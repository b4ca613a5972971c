"""``python -m bench.stalls``: how long each O(n) operation holds the serving loop.

kvserve serves every client from one loop, so an operation that is O(n) in a container's size
delays every other client for as long as it runs. This measures that delay directly: a probe
client pings in a tight loop on its own connection while another client runs the operation on
a container of ``--items`` items (default 1,000,000), and the probe's longest wait is the
stall. Results go to ``bench/results/<date>-stalls.md``, scaled to a million items.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

if not __package__:  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvclient

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"


class _Probe:
    """Pings on its own connection, in its own process, until stopped; keeps the longest.

    A process, not a thread: decoding a large reply in the measuring client holds its GIL,
    which a probe thread would count as a server stall.
    """

    def __init__(self, address: str, authkey: bytes) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._longest = ctx.Value("d", 0.0)
        self._proc = ctx.Process(
            target=_probe_main, args=(address, authkey, self._stop, self._ready, self._longest)
        )

    @property
    def longest(self) -> float:
        return float(self._longest.value)

    def __enter__(self) -> _Probe:
        self._proc.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(60)


def _probe_main(address: str, authkey: bytes, stop: Any, ready: Any, longest: Any) -> None:
    with kvclient.connect(address, authkey, call_timeout=600) as kv:
        for _ in range(100):
            kv.ping()
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            kv.ping()
            longest.value = max(longest.value, time.perf_counter() - started)


def _fill(kv: kvclient.Client, items: int) -> None:
    chunk = 10_000
    d, lst = kv.dict("d"), kv.list("l")
    for start in range(0, items, chunk):
        d.set_many({f"key:{i}": "v" * 100 for i in range(start, start + chunk)})
        lst.extend([(i * 7919) % items for i in range(start, start + chunk)])


def main(argv: list[str] | None = None) -> None:
    """Start a kvserve, fill it, time each O(n) operation against a probe, write the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.stalls", description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    items: int = args.items
    authkey = os.urandom(16).hex().encode()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, KV_AUTHKEY=authkey.decode())
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvserve", "--port", "0", "--data-dir", f"{tmp}/data"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[-1]
        rows: list[tuple[str, float, float]] = []
        try:
            with kvclient.connect(address, authkey, call_timeout=600) as kv:
                _fill(kv, items)
                d, lst = kv.dict("d"), kv.list("l")
                ops: list[tuple[str, Callable[[], Any]]] = [
                    ("list.sort()", lst.sort),
                    ("list.sort(reverse=True)", lambda: lst.sort(reverse=True)),
                    ("list.reverse()", lst.reverse),
                    ("list[:] (copy)", lambda: lst[:]),
                    ("list.index(missing)", lambda: _ignore(lambda: lst.index(-1))),
                    ("list.count(x)", lambda: lst.count(1)),
                    ("missing in list", lambda: -1 in lst),
                    ("list.insert(0, x)", lambda: lst.insert(0, -2)),
                    ("list.remove(x) (first)", lambda: lst.remove(-2)),
                    ("dict.keys()", d.keys),
                    ("dict.values()", d.values),
                    ("dict.copy()", d.copy),
                    ("dict.items()", d.items),
                    ("kv.dump()", kv.dump),
                    ("kv.compact() (starts it)", kv.compact),
                ]
                for label, op in ops:
                    with _Probe(address, authkey) as probe:
                        started = time.perf_counter()
                        op()
                        wall = time.perf_counter() - started
                        time.sleep(0.05)
                    rows.append((label, wall, probe.longest))
                    print(f"{label:28} {wall * 1000:9.1f} ms  stall {probe.longest * 1000:9.1f} ms")
        finally:
            proc.terminate()
            proc.wait(30)
    _write(rows, items)


def _ignore(func: Callable[[], Any]) -> None:
    try:
        func()
    except ValueError:
        pass


def _write(rows: list[tuple[str, float, float]], items: int) -> None:
    scale = 1_000_000 / items
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    lines = [
        f"# Loop stalls of O(n) operations ({items:,} items; ms scaled to 1M items)",
        "",
        f"Run {stamp} UTC on {os.cpu_count()} CPUs; python {sys.version.split()[0]}.",
        "The stall is the longest ping another client saw while the operation ran.",
        "",
        "| operation | wall ms / 1M | stall ms / 1M |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{label}` | {wall * 1000 * scale:.0f} | {stall * 1000 * scale:.0f} |"
        for label, wall, stall in rows
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{stamp}-stalls.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
