"""A client "host" for tests/test_multihost.py, run inside a network namespace.

Started as ``ip netns exec NS python tests/netns_client.py MODE ...`` with ``HOME`` holding a
copy of the server's authkey file, as the README's "From another host" asks: nothing but the
address is configured. Every mode writes one JSON report (``--out``), and appends its progress
(one number per line) to ``--progress`` so the test can act mid-workload without pipes.

Modes:

- ``workload``: loop ``incr`` / ``append`` / ``put`` / ``get`` on shared containers, with
  retries on, until the ``--stop`` file exists; report every acknowledged answer, the slowest
  calls and how many retries the client made.
- ``probe``: one ``incr`` (or queue ``put``, ``--call put``) after another with ``retry=None``;
  report every outcome (value or error type) and how long it took, until ``--stop`` exists.
- ``get``: one blocking ``get`` (``--wait`` seconds) on the queue ``handoff``, with retries
  on and a short call timeout; report the item (or that it found none), the time it took and
  the retries.
- ``watch``: follow dict ``cfg`` from revision 0 (each wait ``--wait`` seconds, retries on)
  until ``--stop`` exists; report every event and the retries.
- ``check``: report the final state of the shared containers and the server's stats.
"""

from __future__ import annotations

import argparse
import json
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kvclient
from kvclient.retry import ConstantBackoff, Retry

T = TypeVar("T")

# The call and connect timeouts are short so that a cut link is noticed within a second; the
# retries span far longer than any cut the tests make (100 x 0.2 s, plus the timeouts).
CALL_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
SLOW_CALL = 0.5  # seconds: a call this slow rode out a cut (a healthy call takes ~1 ms)


class CountingBackoff(ConstantBackoff):
    """A constant backoff that counts the retries it was asked about (the client's only hook)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.retries = 0

    def compute(self, failures: int) -> float:
        self.retries += 1
        return super().compute(failures)


class Progress:
    """Appends the number of completed iterations to a file, for the test to poll."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def report(self, done: int) -> None:
        self._file.write(f"{done}\n")

    def close(self) -> None:
        self._file.close()


def workload(args: argparse.Namespace) -> dict[str, Any]:
    backoff = CountingBackoff(0.2)
    stop: Path = args.stop
    incrs: list[int] = []
    got: list[Any] = []
    slow: list[dict[str, Any]] = []
    progress = Progress(args.progress)

    def timed(name: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.monotonic()
        result = call(*args, **kwargs)
        took = time.monotonic() - start
        if took >= SLOW_CALL:
            slow.append({"call": name, "start": start, "seconds": round(took, 3)})
        return result

    with kvclient.connect(
        args.address,
        timeout=CONNECT_TIMEOUT,
        call_timeout=CALL_TIMEOUT,
        retry=Retry(backoff, retries=100),
    ) as kv:
        counter, appended, work = kv.dict("counter"), kv.list("appended"), kv.queue("work")
        i = 0
        progress.report(0)
        try:
            while i < args.min_ops or not stop.exists():
                item = [args.id, i]
                incrs.append(timed("incr", counter.incr, "n"))
                timed("append", appended.append, item)
                # With a timeout, or these calls would have no call timeout at all: a cut link
                # would block them until TCP gives up, and the retries would never start.
                timed("put", work.put, item, timeout=1)
                # Never waits on the server: this client put an item first, and every client
                # takes at most as many items as it put.
                got.append(timed("get", work.get, timeout=1))
                i += 1
                progress.report(i)
        finally:
            progress.close()
    return {
        "id": args.id,
        "ops": i,
        "incrs": incrs,
        "got": got,
        "slow": slow,
        "retries": backoff.retries,
    }


def probe(args: argparse.Namespace) -> dict[str, Any]:
    stop: Path = args.stop
    outcomes: list[dict[str, Any]] = []
    progress = Progress(args.progress)
    with kvclient.connect(
        args.address, timeout=CONNECT_TIMEOUT, call_timeout=CALL_TIMEOUT, retry=None
    ) as kv:
        counter, items = kv.dict("probe"), kv.queue("probe-items")
        ok = 0
        progress.report(0)
        try:
            while not stop.exists():
                start = time.monotonic()
                value: int | None = None
                error: str | None = None
                message: str | None = None
                try:
                    if args.call == "put":
                        items.put(len(outcomes))  # no timeout, as most code calls it
                    else:
                        value = counter.incr("n")
                except kvclient.KVError as exc:
                    error, message = type(exc).__name__, str(exc)
                else:
                    ok += 1
                took = time.monotonic() - start
                outcomes.append(
                    {
                        "start": start,
                        "seconds": round(took, 3),
                        "value": value,
                        "error": error,
                        "message": message,
                    }
                )
                progress.report(ok)
                if error is not None:
                    time.sleep(0.1)  # an unreachable network fails at once; do not spin
        finally:
            progress.close()
        # The number of calls the server applied, whatever the client heard.
        deadline = time.monotonic() + 30
        while True:
            try:
                applied = items.qsize() if args.call == "put" else counter["n"]
                break
            except kvclient.KVConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return {"outcomes": outcomes, "applied": applied}


def get(args: argparse.Namespace) -> dict[str, Any]:
    backoff = CountingBackoff(0.2)
    progress = Progress(args.progress)
    # The call timeout is the grace on top of the wait: this get times out on the client
    # `wait + 0.5` seconds after it was sent.
    with kvclient.connect(
        args.address,
        timeout=CONNECT_TIMEOUT,
        call_timeout=0.5,
        retry=Retry(backoff, retries=100),
    ) as kv:
        handoff = kv.queue("handoff")
        progress.report(0)
        progress.close()
        start = time.monotonic()
        try:
            item, empty = handoff.get(timeout=args.wait), False
        except queue.Empty:
            item, empty = None, True
        took = time.monotonic() - start
    return {"item": item, "empty": empty, "seconds": round(took, 3), "retries": backoff.retries}


def watch(args: argparse.Namespace) -> dict[str, Any]:
    """Follow dict ``cfg`` from revision 0 until ``--stop`` exists; report every event."""
    backoff = CountingBackoff(0.2)
    progress = Progress(args.progress)
    events: list[list[Any]] = []
    with kvclient.connect(
        args.address,
        timeout=CONNECT_TIMEOUT,
        call_timeout=CALL_TIMEOUT,
        retry=Retry(backoff, retries=100),
    ) as kv:
        cfg = kv.dict("cfg")
        revision = 0
        progress.report(0)
        try:
            while not args.stop.exists():
                # Each server-side wait lasts at most --wait seconds, so a reply lost in a cut
                # is noticed within --wait plus the call timeout; the watch then resumes.
                w = cfg.watch(since=revision, timeout=args.wait)
                for event in w:
                    events.append([event.revision, event.op, event.key, event.value])
                    progress.report(len(events))
                revision = w.revision or revision
        finally:
            progress.close()
    return {"events": events, "retries": backoff.retries}


def check(args: argparse.Namespace) -> dict[str, Any]:
    with kvclient.connect(args.address, retry=Retry(ConstantBackoff(0.2), retries=50)) as kv:
        leftover = []
        work = kv.queue("work")
        while True:
            try:
                leftover.append(work.get_nowait())
            except queue.Empty:
                break
        return {
            "n": kv.dict("counter").get("n", 0),
            "appended": kv.list("appended").copy(),
            "leftover": leftover,
            "stats": kv.stats(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["workload", "probe", "get", "watch", "check"])
    parser.add_argument("address", help="host:port of kvserve")
    parser.add_argument("--out", type=Path, required=True, help="write the JSON report here")
    parser.add_argument("--progress", type=Path, help="append progress counts here")
    parser.add_argument("--stop", type=Path, help="stop looping once this file exists")
    parser.add_argument("--id", type=int, default=0, help="this client's number")
    parser.add_argument("--min-ops", type=int, default=1, help="iterations before --stop counts")
    parser.add_argument("--call", choices=["incr", "put"], default="incr", help="what probe calls")
    parser.add_argument("--wait", type=float, default=2.0, help="seconds get waits for an item")
    args = parser.parse_args()
    modes: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "workload": workload,
        "probe": probe,
        "get": get,
        "watch": watch,
        "check": check,
    }
    report = modes[args.mode](args)
    # Written whole, then renamed: the test never reads half a report.
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
