"""The Prometheus endpoint (``kvserve --metrics``): series read from the server at scrape time.

The serving loop counts in plain numbers (:mod:`kvserve.counters`); :class:`ServerCollector`
reads them, and the server's gauges (connections, parked calls, containers, log size), only
when something scrapes ``/metrics``. Each server has a registry of its own, never
``prometheus_client``'s global one, so several servers in one process (tests, embedding) each
expose their own numbers. ``prometheus_client``'s HTTP server answers from a thread of its own,
so a scrape never waits for the loop, and the loop never waits for a scrape.

The series (all prefixed ``kvserve_``):

=======================================  =========  =====================================
``requests_total{kind,op}``              counter    requests handled (a batch is one)
``request_duration_seconds{kind,op}``    histogram  arrival to reply handed to the socket
``operations_total``                     counter    calls, each call of a batch counted
``errors_total{type}``                   counter    errors answered, by exception type
``connections{state}``                   gauge      ``authenticated``, ``readonly`` (of
                                                    those), ``pending`` (authenticating)
``connections_refused_total``            counter    over ``--max-connections``/pending
``parked_calls``                         gauge      blocked calls waiting (Queue.get, ...)
``containers{kind}``, ``items{kind}``    gauge      containers, and what they hold
``received_bytes_total``                 counter    from clients
``sent_bytes_total``                     counter    to clients
``lease_expiries_total``                 counter    holds released by their lease
``slow_requests_total``                  counter    requests over ``--slow-ms``
``log_bytes``                            gauge      snapshot + log on disk (``--data-dir``)
``fsync_duration_seconds``               histogram  fdatasync of the log (``--data-dir``)
``compactions_total``                    counter    snapshots written (``--data-dir``)
``compaction_failures``                  gauge      failures in a row (``--data-dir``)
``compacting``                           gauge      1 while a compaction runs
``uptime_seconds``, ``build_info``       gauge      since start; ``version`` label
``process_resident_memory_bytes``, ...   gauge,     the process (``prometheus_client``'s
                                         counter    ProcessCollector: memory, CPU seconds,
                                                    open and max fds, start time; Linux)
=======================================  =========  =====================================

Labels carry kinds, operations and exception type names only: never container names, keys
or values (a name is data, and one label value per name would grow without bound).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

from kvproto._version import __version__
from kvserve.counters import LATENCY_BOUNDS, Histogram

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from kvserve.engine import Engine

__all__ = ["MetricsServer", "Observed", "ServerCollector"]


class Observed(Protocol):
    """What the collector reads of a server (:class:`kvserve.server.Server` is one).

    Not the class itself: the server imports this module, and this module must not import
    the server back.
    """

    engine: Engine
    refused_connections: int

    def connection_counts(self) -> dict[str, int]:
        """Return connections now: ``authenticated``, ``readonly``, ``pending``."""


_LE = [*(repr(bound) for bound in LATENCY_BOUNDS), "+Inf"]


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    """Return the cumulative ``(le, count)`` pairs of a histogram, +Inf last."""
    running = 0
    out = []
    for le, count in zip(_LE, list(hist.counts), strict=True):
        running += count
        out.append((le, float(running)))
    return out


class ServerCollector(Collector):
    """Read one server's numbers at scrape time (runs on the metrics HTTP thread).

    Args:
        server: the server to report on.
    """

    def __init__(self, server: Observed) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """Yield every series (see the module docstring)."""
        server = self.server
        engine = server.engine
        counters = engine.counters
        requests = CounterMetricFamily(
            "kvserve_requests",
            "Requests handled, by container kind and operation.",
            labels=["kind", "op"],
        )
        durations = HistogramMetricFamily(
            "kvserve_request_duration_seconds",
            "Seconds from a request's arrival to its reply's hand-off to the socket.",
            labels=["kind", "op"],
        )
        # Copied first: the loop may add a pair while this runs on another thread.
        for (kind, op), hist in sorted(list(counters.requests.items())):
            buckets = _buckets(hist)
            requests.add_metric([kind, op], buckets[-1][1])
            durations.add_metric([kind, op], buckets, hist.total)
        yield requests
        yield durations
        yield CounterMetricFamily(
            "kvserve_operations",
            "Operations served, each call of a batch counted.",
            value=engine.ops_served,
        )
        errors = CounterMetricFamily(
            "kvserve_errors", "Errors answered to clients, by exception type.", labels=["type"]
        )
        for name, count in sorted(list(counters.errors.items())):
            errors.add_metric([name], count)
        yield errors
        connections = GaugeMetricFamily(
            "kvserve_connections",
            "Client connections: authenticated (readonly: of those, with the read-only key), "
            "pending (still authenticating).",
            labels=["state"],
        )
        facts = server.connection_counts()
        for state in ("authenticated", "readonly", "pending"):
            connections.add_metric([state], facts[state])
        yield connections
        yield CounterMetricFamily(
            "kvserve_connections_refused",
            "Connections closed for --max-connections or --max-pending.",
            value=server.refused_connections,
        )
        yield GaugeMetricFamily(
            "kvserve_parked_calls",
            "Blocked calls waiting on the server (Queue.get, Lock.acquire, Event.wait, ...).",
            value=sum(len(queue) for queue in list(engine.parked.values())),
        )
        containers = GaugeMetricFamily(
            "kvserve_containers", "Containers, by kind.", labels=["kind"]
        )
        items = GaugeMetricFamily(
            "kvserve_items",
            "Items held (keys, elements, attributes, holders), by container kind.",
            labels=["kind"],
        )
        by_kind: dict[str, list[int]] = {}
        for obj in list(engine.store.objects.values()):
            tally = by_kind.setdefault(obj.kind, [0, 0])
            tally[0] += 1
            tally[1] += obj.size()
        for kind, (count, size) in sorted(by_kind.items()):
            containers.add_metric([kind], count)
            items.add_metric([kind], size)
        yield containers
        yield items
        yield CounterMetricFamily(
            "kvserve_received_bytes", "Bytes received from clients.", value=counters.bytes_in
        )
        yield CounterMetricFamily(
            "kvserve_sent_bytes", "Bytes sent to clients.", value=counters.bytes_out
        )
        yield CounterMetricFamily(
            "kvserve_lease_expiries",
            "Lock, semaphore and condition holds released because their lease ran out.",
            value=counters.lease_expiries,
        )
        yield CounterMetricFamily(
            "kvserve_slow_requests",
            "Requests that took --slow-ms or longer.",
            value=counters.slow_requests,
        )
        yield from self._persistence()
        yield GaugeMetricFamily(
            "kvserve_uptime_seconds",
            "Seconds since the server started.",
            value=time.time() - engine.started,
        )
        yield InfoMetricFamily("kvserve_build", "The kvserve version.", {"version": __version__})

    def _persistence(self) -> Iterator[Metric]:
        persist = self.server.engine.persist
        if persist is None:
            return
        try:
            disk = persist.disk_bytes()
        except OSError:  # the directory went away; the loop reports that on its own
            disk = 0
        yield GaugeMetricFamily(
            "kvserve_log_bytes", "Bytes of the snapshot and log files on disk.", value=disk
        )
        fsyncs = HistogramMetricFamily(
            "kvserve_fsync_duration_seconds", "Seconds each fdatasync of the log took."
        )
        fsyncs.add_metric([], _buckets(persist.fsync_times), persist.fsync_times.total)
        yield fsyncs
        yield CounterMetricFamily(
            "kvserve_compactions", "Snapshots written by compaction.", value=persist.compactions
        )
        yield GaugeMetricFamily(
            "kvserve_compaction_failures",
            "Compactions that failed in a row (0 after one succeeds).",
            value=persist.compaction_failures,
        )
        yield GaugeMetricFamily(
            "kvserve_compacting",
            "1 while a compaction is being written.",
            value=1 if persist.compacting else 0,
        )


_MAX_SCRAPERS = 16  # connections served at once; more are closed at once
_SCRAPE_TIMEOUT = 10.0  # seconds a connection may take to send its request and read


class _QuietHandler(WSGIRequestHandler):
    """No access log; a socket timeout, so a silent connection cannot hold its thread."""

    timeout = _SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (prometheus_client's own handler does the same)."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most ``_MAX_SCRAPERS`` at once.

    prometheus_client's server accepts without limit and never times a connection out: idle
    connections used up the process's descriptors and locked kvserve clients out.
    """

    def __init__(self, *args: Any, **kwds: Any) -> None:
        self._slots = threading.BoundedSemaphore(_MAX_SCRAPERS)
        super().__init__(*args, **kwds)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """``/metrics`` of one server over HTTP, from ``prometheus_client``'s server in a thread.

    Args:
        server: the kvserve server to report on.
        host: address to bind (default loopback: the endpoint has no authentication).
        port: TCP port; 0 picks a free one (see :attr:`address`).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, server: Observed, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        # The process's own memory, CPU and descriptors (from /proc; nothing elsewhere),
        # prefixed like the rest. Per process: servers embedded in one process share them.
        ProcessCollector(namespace="kvserve", registry=self.registry)
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("_Server", (_BoundedServer,), {"address_family": family})
        httpd: WSGIServer = make_server(
            str(sockaddr[0]), port, make_wsgi_app(self.registry), server_class, _QuietHandler
        )
        thread = threading.Thread(target=httpd.serve_forever, name="kvserve-metrics", daemon=True)
        thread.start()
        self._httpd = httpd
        self._thread: threading.Thread = thread
        bound: Any = httpd.server_address
        self.address: tuple[str, int] = (str(bound[0]), int(bound[1]))

    def close(self) -> None:
        """Stop answering and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
