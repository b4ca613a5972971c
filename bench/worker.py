"""Client processes: a pool of spawned workers, each driving one server per phase.

The workers are started once per run (spawning 16 interpreters per phase would cost more than
a phase) and talk to the parent over a pipe. One phase goes:

1. the parent sends each worker a :class:`Job`; the worker connects, stores what it will
   read, checks one read, and answers ``ready`` (nothing is timed yet);
2. the parent sends ``go`` with a start and end time on CLOCK_MONOTONIC, shared by all
   processes on Linux; every worker sleeps until the start, so all windows overlap;
3. each worker calls its operation in a loop until the end time, timing every call with
   ``time.perf_counter_ns``, and sends back a :class:`ClientResult`; then it disconnects.

Every wait is bounded: a worker that does not answer in time is killed and replaced, and the
phase is reported as failed.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from bench.cases import Case
from bench.systems import Driver, Endpoint, make_driver

__all__ = ["ClientResult", "Job", "PhaseError", "WorkerPool"]

MAX_OPS: Final = 5_000_000
"""Upper bound on timed calls per client per phase (the loop is bounded in count and time)."""

_SETUP_TIMEOUT: Final = 60.0
_IDLE_TIMEOUT: Final = 3600.0


class PhaseError(Exception):
    """A phase could not be run or did not finish; the message says which worker and why."""


@dataclass(frozen=True)
class Job:
    """What one worker does in one phase."""

    endpoint: Endpoint
    case: Case
    index: int
    prefix: str


@dataclass
class ClientResult:
    """What one worker measured in one phase.

    Attributes:
        index: the worker's number.
        ops: timed calls completed (round trips, not batch items).
        elapsed_ns: from the worker's first timed call to the end of the window.
        utime: user CPU seconds in the window (getrusage).
        stime: system CPU seconds in the window.
        nvcsw: voluntary context switches in the window.
        nivcsw: involuntary context switches in the window.
        latencies: ``array('q')`` bytes, one duration in ns per call.
    """

    index: int
    ops: int
    elapsed_ns: int
    utime: float
    stime: float
    nvcsw: int
    nivcsw: int
    latencies: bytes


def _timed_loop(op: Callable[[], object], start_ns: int, end_ns: int) -> tuple[int, array[int]]:
    delay = (start_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)
    # perf_counter and monotonic are the same clock on Linux; an offset keeps this correct
    # where they are not, at no cost per call.
    clock = time.perf_counter_ns
    end = end_ns + (clock() - time.monotonic_ns())
    latencies: array[int] = array("q")
    append = latencies.append
    t0 = first = clock()
    for _ in range(MAX_OPS):
        if t0 >= end:
            break
        op()
        t1 = clock()
        append(t1 - t0)
        t0 = t1
    return max(1, min(t0, end) - first), latencies


def _run(job: Job, op: Callable[[], object], start_ns: int, end_ns: int) -> ClientResult:
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed, latencies = _timed_loop(op, start_ns, end_ns)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return ClientResult(
        index=job.index,
        ops=len(latencies),
        elapsed_ns=elapsed,
        utime=ru1.ru_utime - ru0.ru_utime,
        stime=ru1.ru_stime - ru0.ru_stime,
        nvcsw=ru1.ru_nvcsw - ru0.ru_nvcsw,
        nivcsw=ru1.ru_nivcsw - ru0.ru_nivcsw,
        latencies=latencies.tobytes(),
    )


def _worker_main(conn: Connection, index: int) -> None:
    driver: Driver | None = None
    job: Job | None = None
    op: Callable[[], object] | None = None
    try:
        while conn.poll(_IDLE_TIMEOUT):
            message = conn.recv()
            command = message[0]
            try:
                if command == "exit":
                    break
                if command == "job":
                    job = message[1]
                    assert job is not None
                    case = job.case
                    driver = make_driver(job.endpoint, binary=not isinstance(case.payload, str))
                    op = driver.op(case.role(index), job.prefix, index, case.payload, case.batch)
                    conn.send(("ready", None))
                elif command == "go":
                    assert job is not None and op is not None
                    conn.send(("result", _run(job, op, message[1], message[2])))
                elif command == "fill":
                    endpoint, start, stop, batch = message[1:]
                    driver = make_driver(endpoint)
                    t0 = time.perf_counter()
                    driver.fill(start, stop, batch)
                    conn.send(("filled", time.perf_counter() - t0))
                elif command != "abort":
                    raise ValueError(f"unknown command {command!r}")
            except Exception as exc:
                detail = traceback.format_exception_only(exc)[-1].strip()
                conn.send(("error", f"worker {index}: {detail}"))
            if command != "job" and driver is not None:
                try:
                    driver.close()
                except Exception:  # a failing close must not kill the worker
                    pass
                driver = op = job = None
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass


class _Worker:
    def __init__(self, ctx: Any, index: int) -> None:
        self.index = index
        self.conn, child = multiprocessing.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=_worker_main, args=(child, index), name=f"bench-client-{index}", daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, message: tuple[Any, ...]) -> None:
        self.conn.send(message)

    def recv(self, timeout: float, expect: str) -> Any:
        try:
            if not self.conn.poll(timeout):
                raise PhaseError(f"worker {self.index}: no answer within {timeout:.0f} s")
            kind, value = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise PhaseError(f"worker {self.index}: no answer, it died ({exc!r})") from None
        if kind == "error":
            raise PhaseError(str(value))
        if kind != expect:
            raise PhaseError(f"worker {self.index}: expected {expect!r}, got {kind!r}")
        return value

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(("exit",))
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


class WorkerPool:
    """Spawned client processes, created on first need and reused for every phase.

    Args:
        lead: seconds between the ``go`` message and the start of the timed window, so that
            every worker is asleep waiting for the same instant before it arrives.
    """

    def __init__(self, lead: float = 0.05) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self.lead = lead

    def ensure(self, count: int) -> None:
        """Start workers until there are at least ``count``."""
        while len(self._workers) < count:
            self._workers.append(_Worker(self._ctx, len(self._workers)))

    def _replace(self, worker: _Worker) -> None:
        worker.proc.kill()
        worker.proc.join(5)
        worker.conn.close()
        self._workers[worker.index] = _Worker(self._ctx, worker.index)

    def run_phase(
        self,
        endpoint: Endpoint,
        case: Case,
        prefix: str,
        duration: float,
        on_window: Callable[[int, int], None],
    ) -> list[ClientResult]:
        """Run one case against one server; return each client's result.

        Args:
            endpoint: the server.
            case: the workload (``case.clients`` workers take part).
            prefix: key prefix unique to this phase.
            duration: seconds of the timed window.
            on_window: called in this process with the window's (start, end) monotonic ns; it
                samples the server's CPU at both instants and returns after the end.

        Raises:
            PhaseError: a worker failed to connect, prepare or finish in time.
        """
        self.ensure(case.clients)
        workers = self._workers[: case.clients]
        for worker in workers:
            worker.send(("job", Job(endpoint, case, worker.index, prefix)))
        errors: list[str] = []
        for worker in workers:
            try:
                worker.recv(_SETUP_TIMEOUT, "ready")
            except PhaseError as exc:
                errors.append(str(exc))
                if "no answer" in str(exc):
                    self._replace(worker)
        if errors:
            for worker in workers:
                if worker.proc.is_alive():
                    worker.send(("abort",))
            raise PhaseError("; ".join(errors))
        start = time.monotonic_ns() + int(self.lead * 1e9)
        end = start + int(duration * 1e9)
        for worker in workers:
            worker.send(("go", start, end))
        on_window(start, end)
        results: list[ClientResult] = []
        for worker in workers:
            try:
                results.append(worker.recv(duration + _SETUP_TIMEOUT, "result"))
            except PhaseError as exc:
                errors.append(str(exc))
                if "no answer" in str(exc):
                    self._replace(worker)
        if errors:
            raise PhaseError("; ".join(errors))
        return results

    def fill(self, endpoint: Endpoint, count: int, batch: int, timeout: float = 600.0) -> float:
        """Store ``count`` keys from worker 0 in batches; return the seconds it took.

        Raises:
            PhaseError: the fill failed or took longer than ``timeout`` seconds.
        """
        self.ensure(1)
        worker = self._workers[0]
        worker.send(("fill", endpoint, 0, count, batch))
        try:
            seconds: float = worker.recv(timeout, "filled")
        except PhaseError as exc:
            if "no answer" in str(exc):
                self._replace(worker)
            raise
        return seconds

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.stop()
        self._workers.clear()
