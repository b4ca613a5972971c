"""The serving loop: one thread, one selector, every connection non-blocking.

Why not the stdlib ``Server``: it runs a thread per connection, and with many clients those
threads convoy on the GIL (the stdlib manager drops to a bimodal 22k-48k GET/s at 16 clients on
two cores, where a single epoll thread holds ~68k). A single loop also makes slowloris cheap
to survive: an unauthenticated connection costs a buffer and a timer, never a thread.

This module owns the I/O: the listener and accept (with its limits and backoff), TLS, the
handshake, receive buffers and framing (see :mod:`kvproto.wire`), replies (sent at once when
nothing is queued, else queued; large ones encoded a slice per loop turn), backpressure and
the server-wide buffer budgets, timers, idle and handshake deadlines, and the connection
counts in ``stats``. What a decoded request does is the engine's (:mod:`kvserve.engine`):
dispatch, the read-only policy, request-id memory, parking, leases, the log. The loop must not
know which operations exist; the engine must not know that sockets do. With a data directory,
replies wait for the log (:mod:`kvserve.durability`).

Per connection, the loop reads whatever is available, cuts it into frames, runs the handshake,
then hands requests to the engine in order. A request the engine parks (``Queue.get`` on an
empty queue) holds the connection's later frames behind it; other connections carry on.
"""

from __future__ import annotations

import collections
import errno
import functools
import heapq
import itertools
import logging
import math
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgpack

from kvproto.codec import EXT_TUPLE, MAX_DEPTH, PLAIN, Codec
from kvproto.errors import KVConnectionError, KVError, ProtocolError, RemoteError
from kvproto.handshake import ServerHandshake
from kvproto.limits import MAX_REQUEST_VALUES
from kvproto.net import format_address, tune_socket
from kvproto.wire import (
    ERROR,
    HEADER,
    MAX_FRAME_DEFAULT,
    MAX_HANDSHAKE_FRAME,
    MAX_REPLY_FRAME,
    FrameTooLargeError,
    frame_parts,
    frame_size,
)
from kvserve.counters import Counters
from kvserve.durability import HeldReplies
from kvserve.engine import Engine, Waiter
from kvserve.persistence import LoadReport, Persistence
from kvserve.store import Registry, Store

if TYPE_CHECKING:
    from kvserve.metrics import MetricsServer

__all__ = ["MetricsError", "Server"]

log = logging.getLogger("kvserve")

_RECV_SIZE: Final = 256 * 1024
# The longest the loop sleeps in one select(): epoll takes its timeout as an int of
# milliseconds (OverflowError past ~24.8 days), and a long sleep would hide a clock bug.
# Timers further away simply take several sleeps.
_MAX_SLEEP: Final = 3600.0
# Backpressure: stop reading requests from a client with this much unsent output (it pipelines
# and does not read its replies), resume below the low mark. One reply may overshoot.
_WRITE_HIGH: Final = 1024 * 1024
_WRITE_LOW: Final = 256 * 1024
# A connection's unfinished input above this size counts against the server-wide budget.
_PARTIAL_BIG: Final = 1024 * 1024
# Replies holding more items than this are encoded a slice at a time, one slice per loop turn,
# so a copy() or dump of a million keys does not hold every other client for its whole
# encoding (measured by `python -m bench.stalls`).
_SLICE_ITEMS: Final = 8192
# Requests dispatched for one connection per loop turn: frames that waited (behind a parked
# call, a sliced reply, or pipelined in one burst) must not hold the loop for seconds.
_FRAMES_PER_TURN: Final = 256
_ACCEPTS_PER_TURN: Final = 64
# First and longest pause after EMFILE and friends. Not Final: mypyc (the optional compiled
# build) loses a Final tuple whose first item is a float (mypyc/mypyc#1183: NameError).
_ACCEPT_BACKOFF: tuple[float, float] = (0.05, 1.0)
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EPOLLIN: Final = getattr(select, "EPOLLIN", 1)
_EPOLLOUT: Final = getattr(select, "EPOLLOUT", 4)
# Replies up to this size are sent with one send() of header + payload when nothing is queued
# (the same size below which frame_parts joins them).
_DIRECT_SEND: Final = 64 * 1024
# --busy-poll-us: at most 10 ms; after polls that found nothing twice or more in a row, the
# loop skips polling for 1, 2, 4, ... up to this many turns (reset by a poll that finds one).
_BUSY_POLL_MAX: Final = 0.01
_BUSY_POLL_BACKOFF: Final = 64


class MetricsError(KVError):
    """The metrics endpoint could not be started (its address is in use, say)."""


class _Timer:
    """One scheduled callback; :meth:`cancel` makes it a no-op and frees what it holds."""

    __slots__ = ("at", "callback", "timers")

    def __init__(self, timers: _Timers, at: float, callback: Callable[[], None]) -> None:
        self.timers = timers
        self.at = at
        self.callback: Callable[[], None] | None = callback

    def __lt__(self, other: _Timer) -> bool:
        return self.at < other.at

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.timers.cancelled()


class _Timers:
    """The loop's timer heap; the engine's :class:`~kvserve.engine.Scheduler`."""

    def __init__(self) -> None:
        self.heap: list[_Timer] = []
        self._cancelled = 0

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        """Run ``callback`` from the loop after ``delay`` seconds; return its cancellable timer.

        Delays come from validated arguments (see :func:`kvserve.containers.check_timeout`);
        a non-finite one here is a bug, refused before it can freeze the heap's order (nan)
        or the loop's sleep (inf).
        """
        if not math.isfinite(delay):
            raise ValueError(f"timer delay must be finite, not {delay!r}")
        timer = _Timer(self, time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self.heap, timer)
        return timer

    def cancelled(self) -> None:
        self._cancelled += 1
        # Cancelled timers stay in the heap until they come due; rebuild it when they are
        # the majority, so a stream of answered long-timeout waits cannot grow it.
        if self._cancelled > 64 and self._cancelled * 2 > len(self.heap):
            self.heap = [t for t in self.heap if t.callback is not None]
            heapq.heapify(self.heap)
            self._cancelled = 0

    def discard_first(self) -> None:
        """Drop the earliest timer, a cancelled one (the loop calls this)."""
        heapq.heappop(self.heap)
        self._cancelled = max(0, self._cancelled - 1)

    def run_due(self) -> None:
        """Run every timer that is due."""
        now = time.monotonic()
        timers = self.heap
        while timers and timers[0].at <= now:
            timer = heapq.heappop(timers)
            callback = timer.callback
            if callback is None:
                self._cancelled = max(0, self._cancelled - 1)
                continue
            timer.callback = None
            try:
                callback()
            except Exception:
                # A failing timer must cost that timer, never the loop.
                log.exception("internal error in a timer callback")
            timers = self.heap  # a cancel() may have rebuilt it


class _Conn:
    """State of one client connection; the engine's :class:`~kvserve.engine.Session`."""

    __slots__ = (
        "accounted",
        "authed",
        "backlog",
        "busy",
        "caller",
        "close_after_flush",
        "closed",
        "codec",
        "final",
        "handshake",
        "handshake_timer",
        "hello",
        "key_index",
        "last_active",
        "parked",
        "paused",
        "peer",
        "rbuf",
        "readonly",
        "server",
        "sock",
        "tls_pending",
        "wbytes",
        "wqueue",
    )

    def __init__(self, server: Server, sock: socket.socket, peer: str, keys: list[bytes]) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.caller = b"conn:%d" % id(self)
        self.tls_pending = False
        self.readonly = False
        self.last_active = time.monotonic()
        self.rbuf = bytearray()
        # Unsent output, in order: small frames as bytes, big payloads as views (never copied).
        self.wqueue: collections.deque[bytes | memoryview] = collections.deque()
        self.wbytes = 0  # replies not yet written (queued or held for the log), bytes
        self.paused = False  # not reading: too much unsent output (see _WRITE_HIGH)
        self.accounted = 0  # len(rbuf) as counted in Server._buffered
        self.busy = False  # a reply is being encoded in slices; later requests wait
        self.backlog = False  # complete frames wait for the next turn (_FRAMES_PER_TURN)
        self.hello = False  # sent its first handshake frame (a real client does at once)
        self.authed = False
        self.handshake: ServerHandshake | None = ServerHandshake(keys)
        self.handshake_timer: _Timer | None = None
        self.key_index = -1
        self.codec = Codec(
            encode_exceptions=True,
            decode_depth=MAX_DEPTH,
            decode_exceptions=False,
            decode_values=MAX_REQUEST_VALUES,
        )
        self.parked: Waiter | None = None
        self.close_after_flush = False
        # With close_after_flush: the reply that must go out before closing, while it waits
        # for the log (see Server._undecodable); None once sent, or when nothing waits.
        self.final: bytes | None = None
        self.closed = False

    def late_reply(self, kind: str, value: Any) -> None:
        """Send the answer to this connection's parked call."""
        server = self.server
        if kind == ERROR:
            server.counters.error(value)
        server._reply(self, kind, value)
        if server.idle_timeout:  # idle from the answer on, not from when the call came
            self.last_active = time.monotonic()

    def resume(self) -> None:
        """Handle the frames that waited behind the parked call, from the next loop turn.

        Not at once: resume is called while another connection's request is dispatched (a
        put answering this parked get), and this connection's next frame may wake a third
        one, and so on: 160 pipelined connections chained that way overflowed the stack
        (RecursionError) and left the rest of the chain parked for ever.
        """
        if self.rbuf and not self.closed:
            self.server._call_later(0.0, functools.partial(self.server._process, self))


class Server:
    """A kvmanager server bound to an address, served by :meth:`serve_forever`.

    The constructor signature is ``multiprocessing.managers.Server``'s, so ``KVManager`` can
    use it wherever BaseManager would build its own.

    Args:
        registry: the manager's typeid registry (what kinds exist).
        address: ``(host, port)``; port 0 picks a free port (see :attr:`address`).
        authkey: the key clients must prove they know.
        serializer: must be ``"msgpack"``; accepted for BaseManager compatibility.
        max_frame: largest request accepted after authentication, bytes (default 64 MiB).
        handshake_timeout: seconds a connection may take to authenticate (default 5).
        persistence: keep the data on disk (see :mod:`kvserve.persistence`); None: memory only.
        shutdown_timeout: seconds :meth:`stop` spends sending the last replies (default 5).
        tls: serve TLS only, with this server-side context (see :func:`kvserve.tls`).
        readonly_authkey: a second key whose clients may read everything and change nothing.
        max_connections: authenticated connections beyond this are closed at once (default
            1024).
        max_pending: connections still authenticating, at most (default 64): the oldest is
            closed to admit a new one, so unauthenticated floods cannot lock keyed clients out.
        max_buffered: bytes of unfinished requests held for all connections together
            (default 256 MiB, at least 2 x ``max_frame``); a connection whose partial request
            grows past 1 MiB while the total is above this is closed.
        max_unsent: bytes of replies waiting for all clients together (default 1 GiB, at
            least 4 x ``max_frame``); a client with more than 1 MiB waiting whose new reply
            goes over it is closed.
        idle_timeout: close authenticated connections silent this long, seconds (default
            None: never). Connections waiting in a queue call are not idle.
        backlog: listen backlog.
        metrics: serve Prometheus metrics over HTTP on this ``(host, port)`` (see
            :mod:`kvserve.metrics`; port 0 picks one, :attr:`metrics_address` says which);
            None (default): no metrics endpoint.
        slow_ms: log requests taking this many milliseconds or more, and keep the newest
            for ``kvctl slowlog`` (default None: no slow-request log).
        busy_poll: after a loop turn, poll the sockets without sleeping for up to this many
            seconds before blocking in epoll (default 0: never). It saves the wake-up of a
            sleeping server (~20 µs of kernel time per request when client and server run
            on different CPUs) at the price of CPU spent polling; adaptive: a second poll in
            a row that found nothing makes the loop skip polling for the next 1, then 2, 4,
            ... 64 turns, so an idle server sleeps and a client pausing between calls costs
            little, while one late request (its client lost its CPU once) costs nothing.
        history: ``(count, age in seconds)``: the changes each container keeps for ``watch``
            (default None: 1,000 changes, one hour; see :mod:`kvserve.history`).
    """

    def __init__(
        self,
        registry: Registry,
        address: tuple[str, int],
        authkey: bytes,
        serializer: str = "msgpack",
        *,
        max_frame: int = MAX_FRAME_DEFAULT,
        handshake_timeout: float = 5.0,
        backlog: int = 1024,
        persistence: Persistence | None = None,
        shutdown_timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
        readonly_authkey: bytes | None = None,
        max_connections: int = 1024,
        idle_timeout: float | None = None,
        max_pending: int = 64,
        max_buffered: int = 256 * 1024 * 1024,
        max_unsent: int = 1024 * 1024 * 1024,
        metrics: tuple[str, int] | None = None,
        slow_ms: float | None = None,
        busy_poll: float = 0.0,
        history: tuple[int, float] | None = None,
    ) -> None:
        if serializer != "msgpack":
            raise ValueError(f"kvserve speaks msgpack only, not {serializer!r}")
        if not authkey:
            raise ValueError("an authkey is required")
        self.registry = registry
        self.keys = [bytes(authkey)]
        if readonly_authkey:
            if bytes(readonly_authkey) == self.keys[0]:
                raise ValueError("the read-only authkey must differ from the authkey")
            self.keys.append(bytes(readonly_authkey))
        self.tls = tls
        self.max_connections = max_connections
        if max_pending < 1 or max_connections < 1:
            raise ValueError("max_pending and max_connections must be at least 1")
        self.max_pending = max_pending
        self.max_buffered = max(max_buffered, 2 * max_frame)
        self._pending: dict[_Conn, None] = {}  # still authenticating, oldest first
        self._authed = 0
        self._readonly_authed = 0
        self._buffered = 0  # sum of every connection's len(rbuf)
        self._unsent = 0  # sum of every connection's wbytes
        self.max_unsent = max(max_unsent, 4 * max_frame)
        self._accept_backoff = 0.0  # > 0 while accepting is paused (EMFILE and friends)
        self._accept_errors = 0
        self.idle_timeout = idle_timeout
        self.refused_connections = 0
        if not 0.0 <= busy_poll <= _BUSY_POLL_MAX:
            raise ValueError(f"busy_poll must be 0..{_BUSY_POLL_MAX} seconds, not {busy_poll!r}")
        self.busy_poll = busy_poll
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self._persist = persistence
        self.fatal_error: str | None = None  # why the loop stopped on its own; kvserve exits 1
        self._timers = _Timers()
        self.counters = Counters(slow_ms, _log_slow)
        # What serves a decoded frame, chosen once. An attribute, not a method reassigned on
        # the instance: a class compiled by mypyc (the optional build) refuses that.
        self._serve: Callable[[_Conn, bytes | memoryview], None] = self._on_request
        self._timed = metrics is not None or slow_ms is not None
        if self._timed:
            self._serve = self._on_request_timed
            self.counters.timing = True
        # Opens (loads) the persistence.
        self.engine = Engine(registry, self._timers, persistence, self.counters, history)
        self.engine.connection_stats = self._connection_stats
        # With persistence, replies wait in _held until the log holds their writes.
        self._held: HeldReplies[_Conn] | None = None
        if persistence is not None:
            self._held = HeldReplies(persistence, self.engine.store)
        host, port = address
        try:
            self._listener = _bind(host or "127.0.0.1", port, backlog)
        except BaseException:
            if persistence is not None:
                persistence.close()
            raise
        bound = self._listener.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        self._metrics: MetricsServer | None = None
        self.metrics_address: tuple[str, int] | None = None  # where /metrics is served
        if metrics is not None:
            try:
                # Imported only when asked for: prometheus_client costs ~100 ms to import.
                from kvserve.metrics import MetricsServer  # noqa: PLC0415

                self._metrics = MetricsServer(self, *metrics)
            except BaseException as exc:
                self._listener.close()
                if persistence is not None:
                    persistence.close()
                if isinstance(exc, OSError):
                    where = format_address(*metrics)
                    raise MetricsError(
                        f"cannot serve metrics on {where} ({exc.strerror or exc}); "
                        "pick another --metrics-port"
                    ) from None
                raise
            self.metrics_address = self._metrics.address
        self._selector = selectors.DefaultSelector()
        # epoll's poll and the selector's table, for _select (selectors' own select() is
        # ~80 bytecodes a call, a tenth of a GET's); None on another selector, or on a Python
        # whose EpollSelector no longer has these private attributes (3.11-3.13 do): then
        # select() serves, as on any other selector.
        self._epoll_poll: Callable[[float, int], list[tuple[int, int]]] | None = None
        self._fd_to_key: dict[int, selectors.SelectorKey] = {}
        if isinstance(self._selector, selectors.EpollSelector):
            epoll = getattr(self._selector, "_selector", None)
            table = getattr(self._selector, "_fd_to_key", None)
            if isinstance(epoll, select.epoll) and isinstance(table, dict):
                self._epoll_poll = epoll.poll
                self._fd_to_key = table
        self._recv_view = memoryview(bytearray(_RECV_SIZE))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: set[_Conn] = set()
        self._stop = threading.Event()
        self._done = threading.Event()

    # What the engine owns, under the names the server always had.

    @property
    def store(self) -> Store:
        """The containers served."""
        return self.engine.store

    @property
    def load_report(self) -> LoadReport | None:
        """What was loaded from the data directory at start-up (None without one)."""
        return self.engine.load_report

    @property
    def started(self) -> float:
        """When the server was built, ``time.time()``."""
        return self.engine.started

    @property
    def ops_served(self) -> int:
        """Operations answered, each call of a batch counted."""
        return self.engine.ops_served

    @property
    def requests_served(self) -> int:
        """Request frames answered."""
        return self.engine.requests_served

    def remember(self, token: bytes, seq: int, kind: str, value: Any) -> None:
        """Record the answer to request ``seq`` of session ``token`` (for retries)."""
        self.engine.remember(token, seq, kind, value)

    def stats(self) -> dict[str, Any]:
        """Return server facts for ``kvctl stats``."""
        return self.engine.stats()

    def connection_counts(self) -> dict[str, int]:
        """Return connections now: ``authenticated``, ``readonly`` (of those), ``pending``."""
        return {
            "authenticated": self._authed,
            "readonly": self._readonly_authed,
            "pending": len(self._pending),
        }

    @property
    def metrics_endpoint(self) -> str | None:
        """``http://host:port/metrics`` when metrics are served, else None."""
        if self.metrics_address is None:
            return None
        return f"http://{format_address(*self.metrics_address)}/metrics"

    def _connection_stats(self) -> dict[str, Any]:
        return {
            "clients": sum(1 for c in self._conns if c.authed),
            "refused_connections": self.refused_connections,
        }

    @property
    def endpoint(self) -> str:
        """``host:port`` the server listens on."""
        return format_address(*self.address)

    # -- lifecycle -----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called (from a signal handler or another thread)."""
        sel = self._selector
        self._listener.setblocking(False)
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        if self.idle_timeout:
            self._call_later(self.idle_timeout / 2, self._sweep_idle)
        self.engine.start()  # leases restored from disk run out on time too
        timers = self._timers
        held = self._held
        busy = self.busy_poll
        skip = 0  # loop turns left without busy polling (after a poll that found nothing)
        # Turns to skip after the next miss: 0 after a hit, so one miss alone (a client that
        # lost its vCPU once) costs nothing; a second in a row skips 1, then 2, 4, ... 64.
        backoff = 0
        try:
            while not self._stop.is_set():
                # Inline, not a method of _Timers: this runs once per request served.
                timeout = None
                heap = timers.heap
                while heap and heap[0].callback is None:
                    timers.discard_first()  # cancelled: nothing to wake up for
                if heap:
                    # Comparisons, not min(max()): two builtin calls per turn.
                    timeout = heap[0].at - time.monotonic()
                    if timeout < 0.0:
                        timeout = 0.0
                    elif timeout > _MAX_SLEEP:
                        timeout = _MAX_SLEEP
                if not busy:
                    self._handle(self._select(timeout))
                elif skip or (timeout is not None and timeout < busy):
                    skip = max(0, skip - 1)
                    self._handle(self._select(timeout))
                else:
                    # Busy polling: the next request of a client that comes straight back
                    # finds this thread running instead of asleep in epoll_wait.
                    events = self._select(0)
                    if not events:
                        end = time.monotonic() + busy
                        while not events and time.monotonic() < end:
                            events = self._select(0)
                    if events:
                        backoff = 0
                    else:
                        skip, backoff = backoff, min(2 * backoff or 1, _BUSY_POLL_BACKOFF)
                        if timeout is not None:
                            timeout = max(0.0, timeout - busy)
                        events = self._select(timeout)
                    self._handle(events)
                if timers.heap and timers.heap[0].at <= time.monotonic():
                    timers.run_due()
                if held:
                    held.gather(self._poll)
                    self._release_held()
        finally:
            self._shutdown()

    def _handle(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        accept = False
        for key, mask in events:
            conn = key.data
            if conn is None:
                accept = True  # after the others: handshakes under way come before new ones
            elif conn is self._wake_r:
                self._drain_wakeups()
            elif conn.tls_pending:
                self._tls_handshake(conn)
            else:
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._on_readable(conn)
                except Exception:
                    # A bug (or MemoryError) serving one connection costs that connection,
                    # never the server.
                    log.exception("internal error serving %s; closing that connection", conn.peer)
                    self._close(conn)
        if accept:
            self._accept()

    def _select(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]:
        """``self._selector.select(timeout)``, for epoll with less work per call and event.

        The same result: a key per ready fd still registered, with its events as selectors
        maps them (anything but EPOLLOUT reads, anything but EPOLLIN writes) masked by what
        the key waits for.
        """
        poll = self._epoll_poll
        if poll is None:
            return self._selector.select(timeout)
        keys = self._fd_to_key
        try:
            # epoll rounds a timeout up to whole milliseconds itself, as selectors does.
            fd_events = poll(-1.0 if timeout is None else timeout, len(keys) or 1)
        except InterruptedError:
            return []
        ready = []
        for fd, event in fd_events:
            key = keys.get(fd)
            if key is not None:
                if event == _EPOLLIN:
                    ready.append((key, key.events & selectors.EVENT_READ))
                else:
                    mask = selectors.EVENT_READ if event & ~_EPOLLOUT else 0
                    if event & ~_EPOLLIN:
                        mask |= selectors.EVENT_WRITE
                    ready.append((key, mask & key.events))
        return ready

    def _poll(self, timeout: float) -> None:
        self._handle(self._select(timeout))

    def stop(self) -> None:
        """Ask the loop to stop; safe from any thread and from signal handlers."""
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def close(self) -> None:
        """Release the sockets and the data directory of a server that was never served."""
        if not self._done.is_set():
            self._shutdown()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the loop has exited and released its sockets."""
        return self._done.wait(timeout)

    def _shutdown(self) -> None:
        """Stop accepting, answer what is pending, flush the log, then close everything.

        Requests already received were handled by the last loop iteration. Parked queue calls
        are answered with KVConnectionError, which clients treat like a lost connection: they
        retry (the call was not applied) against the restarted server.
        """
        try:
            self._selector.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        self._listener.close()
        if self._metrics is not None:
            self._metrics.close()
        self.engine.stop_waiters(KVConnectionError(f"kvserve at {self.endpoint} is shutting down"))
        if self._held:
            self._release_held()
        self._drain_writes(time.monotonic() + self.shutdown_timeout)
        for conn in list(self._conns):
            self._close(conn)
        if self._persist is not None:
            self._persist.close()
        for sock in (self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()
        self._done.set()

    def _drain_writes(self, deadline: float) -> None:
        """Send what is still buffered for clients, for at most until ``deadline``."""
        pending = [c for c in self._conns if c.wqueue and not c.closed]
        while pending and time.monotonic() < deadline:
            for conn in pending:
                self._flush(conn)
            pending = [c for c in pending if c.wqueue and not c.closed]
            if pending:
                time.sleep(0.005)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # -- timers --------------------------------------------------------------------------

    def _call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        return self._timers.call_later(delay, callback)

    # -- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_TURN):  # then serve the handshakes already under way
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause_accepting(exc)
                else:
                    log.warning("accept failed: %s", exc)
                return
            if self._accept_backoff:
                log.warning(
                    "accepting connections again (%d accept() failures while paused)",
                    self._accept_errors,
                )
                self._accept_backoff = 0.0
                self._accept_errors = 0
            peer = format_address(str(addr[0]), int(addr[1]))
            if self._authed >= self.max_connections:
                # Refuse quickly, before any handshake work; existing clients are unaffected.
                self.refused_connections += 1
                if self.refused_connections % 100 == 1:
                    log.warning(
                        "refusing %s: %d connections is the --max-connections limit "
                        "(%d refused so far)",
                        peer,
                        self.max_connections,
                        self.refused_connections,
                    )
                sock.close()
                continue
            sock.setblocking(False)
            tune_socket(sock)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            if len(self._pending) >= self.max_pending:
                # Make room by closing the connection that has been authenticating longest:
                # a flood of never-authenticating connections then churns through this small
                # table, while a keyed client (one round trip) finishes before its turn comes.
                # Oldest silent one first: a real client sends HELLO at once, so a flood of
                # connections that say nothing cannot push it out mid-handshake.
                oldest = next((c for c in self._pending if not c.hello), None) or next(
                    iter(self._pending)
                )
                self.refused_connections += 1
                if self.refused_connections % 100 == 1:
                    log.warning(
                        "closing %s: %d connections are authenticating (--max-pending); "
                        "%d closed so far",
                        oldest.peer,
                        self.max_pending,
                        self.refused_connections,
                    )
                self._close(oldest)
            conn = _Conn(self, sock, peer, self.keys)
            self._conns.add(conn)
            self._pending[conn] = None
            self._selector.register(sock, selectors.EVENT_READ, conn)
            conn.handshake_timer = self._call_later(
                self.handshake_timeout, functools.partial(self._handshake_expired, conn)
            )
            if self.tls is not None:
                conn.tls_pending = True
                self._tls_handshake(conn)
            else:
                assert conn.handshake is not None
                self._send_now(conn, conn.handshake.challenge)

    def _pause_accepting(self, exc: OSError) -> None:
        """Stop polling the listener for a while: accept() fails until descriptors free up.

        The listener stays readable while the connection waits in the backlog, so retrying
        at once would spin the loop and fill the log; existing clients go on being served.
        """
        self._accept_errors += 1
        first = not self._accept_backoff
        first_pause, longest = _ACCEPT_BACKOFF
        self._accept_backoff = min(longest, self._accept_backoff * 2 or first_pause)
        if first:
            log.warning(
                "cannot accept connections (%s); pausing new connections, serving existing "
                "ones (raise `ulimit -n` or --max-connections/--max-pending down)",
                exc.strerror or exc,
            )
        try:
            self._selector.unregister(self._listener)
        except (KeyError, ValueError):
            return
        self._call_later(self._accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._stop.is_set() or self._listener.fileno() < 0:
            return
        try:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
        except (KeyError, ValueError):
            return
        self._accept()

    def _tls_handshake(self, conn: _Conn) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, conn)
            return
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            log.warning("rejected %s: TLS handshake failed (%s)", conn.peer, reason)
            self._close(conn)
            return
        conn.tls_pending = False
        self._selector.modify(sock, selectors.EVENT_READ, conn)
        assert conn.handshake is not None
        self._send_now(conn, conn.handshake.challenge)

    def _sweep_idle(self) -> None:
        assert self.idle_timeout is not None
        cutoff = time.monotonic() - self.idle_timeout
        for conn in list(self._conns):
            if conn.authed and conn.parked is None and conn.last_active < cutoff:
                log.info("closing %s: idle for %.0fs", conn.peer, self.idle_timeout)
                self._close(conn)
        self._call_later(self.idle_timeout / 2, self._sweep_idle)

    def _handshake_expired(self, conn: _Conn) -> None:
        if not conn.authed and not conn.closed:
            log.info("closing %s: no handshake within %.1fs", conn.peer, self.handshake_timeout)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if conn.authed:
            self._authed -= 1
            self._readonly_authed -= conn.readonly
        else:
            self._pending.pop(conn, None)
        self._buffered -= conn.accounted
        conn.accounted = 0
        self._unsent -= conn.wbytes
        conn.wbytes = 0
        conn.rbuf = bytearray()
        conn.wqueue.clear()
        # A dead client's parked get must not take an item; its dump cursors are freed.
        self.engine.forget(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _on_readable(self, conn: _Conn) -> None:
        if conn.paused or conn.backlog or conn.busy:
            return  # replies unread, or requests already waiting: leave the rest in the kernel
        sock = conn.sock
        view = self._recv_view
        while True:
            try:
                # Into one preallocated buffer: a fresh 256 KiB bytes per recv() costs an
                # mmap/mremap/munmap and page faults per request (a third of the server's CPU).
                n = sock.recv_into(view)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:  # renegotiation-like state; wait until writable
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
                return
            except OSError:
                self._close(conn)
                return
            if not n:
                self._close(conn)
                return
            self.counters.bytes_in += n
            if (
                n > 4
                and conn.authed
                and not conn.rbuf
                and conn.parked is None
                and not (conn.busy or conn.backlog or conn.close_after_flush)
                and conn.wbytes <= _WRITE_HIGH
                and HEADER.unpack_from(view)[0] == n - 4
                and n - 4 <= self.max_frame
            ):
                # Exactly one whole request, the common case (a client waiting for each
                # reply): the same checks as _frames, without buffering or the frame loop.
                try:
                    if self._timed:
                        self._serve(conn, view[4:n])
                    else:
                        # _on_request, inline (a Python call per request less).
                        payload = view[4:n]
                        try:
                            message = conn.codec.unpack(payload)
                        except ProtocolError as exc:
                            self._undecodable(conn, exc)
                        else:
                            reply = self.engine.handle(conn, message, payload)
                            if reply is not None:
                                if reply[0] == ERROR:
                                    self.counters.error(reply[1])
                                self._reply(conn, reply[0], reply[1])
                except Exception:
                    log.exception("internal error serving %s; closing that connection", conn.peer)
                    self._close(conn)
                    return
                if self.idle_timeout:  # only the idle sweep reads it
                    conn.last_active = time.monotonic()
                if conn.wbytes > _WRITE_HIGH and not conn.paused and not conn.closed:
                    conn.paused = True
                    self._set_events(conn)
            else:
                self._process(conn, view[:n])
            # TLS may hold decrypted bytes that select() cannot see; plain sockets are
            # level-triggered, so one recv per event is enough.
            if (
                conn.closed
                or self.tls is None
                or not isinstance(sock, ssl.SSLSocket)
                or not sock.pending()
            ):
                return

    def _process(self, conn: _Conn, chunk: memoryview | None = None) -> None:
        """Dispatch every complete frame received on ``conn`` (buffered, then ``chunk``), in order.

        The common case, nothing buffered, decodes straight from the receive buffer; only an
        incomplete tail (or frames waiting behind a parked request) is copied into ``rbuf``.
        """
        if chunk is not None and not conn.rbuf:
            used = self._frames(conn, chunk)
            if used < len(chunk) and not conn.closed:
                conn.rbuf += chunk[used:]
        else:
            if chunk is not None:
                conn.rbuf += chunk
            if not conn.rbuf:
                return
            buf = memoryview(conn.rbuf)
            try:
                used = self._frames(conn, buf)
            finally:
                buf.release()  # before resizing rbuf below
            if used and not conn.closed:
                try:
                    del conn.rbuf[:used]
                except BufferError:
                    # Something still holds a view of a frame (a bug elsewhere, since
                    # engine.scrub): copy the tail instead of failing the whole loop.
                    log.warning("a frame view outlived its request on %s", conn.peer)
                    conn.rbuf = conn.rbuf[used:]
        if conn.closed:
            return
        held = len(conn.rbuf)
        if held != conn.accounted:
            grew = held > conn.accounted
            self._buffered += held - conn.accounted
            conn.accounted = held
            if grew and held > _PARTIAL_BIG and self._buffered > self.max_buffered:
                log.warning(
                    "closing %s: %d bytes of unfinished requests are buffered for all "
                    "clients, over the %d-byte budget",
                    conn.peer,
                    self._buffered,
                    self.max_buffered,
                )
                self._close(conn)
                return
        if conn.parked is not None and held > self.max_frame + 4:
            log.warning("closing %s: too much data sent while waiting", conn.peer)
            self._close(conn)

    def _frames(self, conn: _Conn, buf: memoryview) -> int:
        """Dispatch the complete frames at the start of ``buf``; return the bytes used."""
        pos = 0
        budget = _FRAMES_PER_TURN
        try:
            while (
                not conn.closed
                and conn.parked is None
                and not conn.close_after_flush
                and conn.wbytes <= _WRITE_HIGH
                and not conn.busy
            ):
                limit = self.max_frame if conn.authed else MAX_HANDSHAKE_FRAME
                try:
                    size = frame_size(buf, pos, limit)
                except FrameTooLargeError as exc:
                    looks_tls = not conn.authed and bytes(buf[pos : pos + 2]) == b"\x16\x03"
                    log.warning(
                        "closing %s: %d-byte frame over the %d-byte limit%s",
                        conn.peer,
                        exc.size,
                        limit,
                        " (a TLS ClientHello: this server does not use TLS)" if looks_tls else "",
                    )
                    self._close(conn)
                    return pos
                if size < 0:
                    break
                end = pos + 4 + size
                if len(buf) < end:
                    break
                if budget == 0:
                    conn.backlog = True
                    self._call_later(0.0, functools.partial(self._continue, conn))
                    break
                budget -= 1
                payload = buf[pos + 4 : end]
                pos = end
                if conn.authed:
                    self._serve(conn, payload)
                else:
                    self._on_handshake(conn, bytes(payload))
        except Exception:
            # A bug in dispatch must cost one connection, never the server.
            log.exception("internal error serving %s; closing that connection", conn.peer)
            self._close(conn)
            return pos
        if pos and conn.authed and self.idle_timeout:
            conn.last_active = time.monotonic()  # idle means no complete request, not no byte
        if conn.wbytes > _WRITE_HIGH and not conn.paused and not conn.closed:
            conn.paused = True
            self._set_events(conn)
        return pos

    def _continue(self, conn: _Conn) -> None:
        conn.backlog = False
        self._process(conn)

    def _on_handshake(self, conn: _Conn, payload: bytes) -> None:
        conn.hello = True
        hs = conn.handshake
        assert hs is not None
        reply = hs.answer(payload)
        if reply is None:
            return  # the client's hello; its response comes next
        self._send_now(conn, reply)
        conn.handshake = None
        if hs.ok:
            del self._pending[conn]
            readonly = hs.key_index == 1
            if readonly and self._readonly_authed >= max(1, self.max_connections // 2):
                # Half the slots at most: 1024 idle read-only connections locked every
                # full-key client out.
                self.refused_connections += 1
                log.warning(
                    "closing %s: read-only connections may use half of --max-connections (%d)",
                    conn.peer,
                    self.max_connections,
                )
                conn.close_after_flush = True
                self._flush(conn)
                return
            if self._authed >= self.max_connections:  # others finished authenticating first
                self.refused_connections += 1
                log.warning("closing %s: --max-connections (%d) reached", conn.peer, self._authed)
                conn.close_after_flush = True
                self._flush(conn)
                return
            self._authed += 1
            self._readonly_authed += readonly
            conn.last_active = time.monotonic()
            conn.authed = True
            if conn.handshake_timer is not None:
                # Not left to expire: while any timer is pending, every loop turn reads the
                # clock for its select() timeout (the loop drops cancelled timers at the top).
                conn.handshake_timer.cancel()
                conn.handshake_timer = None
            conn.key_index = hs.key_index
            conn.readonly = hs.key_index == 1
        else:
            log.warning("rejected %s: %s", conn.peer, hs.reason)
            conn.close_after_flush = True
            self._flush(conn)

    # -- writing -------------------------------------------------------------------------

    def _release_held(self) -> None:
        """Make the log hold every applied write, then release the replies that wait on it."""
        assert self._held is not None
        self._held.release(self._send_now, self._log_failed)

    def _log_failed(self, conns: list[_Conn], reason: str) -> None:
        if self.fatal_error is None:
            self.fatal_error = reason
            log.critical("%s; stopping without acknowledging", self.fatal_error)
        for conn in conns:
            self._close(conn)
        self.stop()

    def _send(self, conn: _Conn, payload: bytes) -> None:
        if len(payload) > MAX_REPLY_FRAME:
            # No client accepts it (and beyond 4 GiB no frame can say its length).
            payload = conn.codec.pack(
                [
                    ERROR,
                    ValueError(
                        f"the reply would be {len(payload)} bytes, over the {MAX_REPLY_FRAME}-byte "
                        "limit of a reply; read it in parts (get_many, slices)"
                    ),
                ]
            )
        size = len(payload) + 4
        conn.wbytes += size
        self._unsent += size
        if self._unsent > self.max_unsent and conn.wbytes > _WRITE_HIGH:
            # Backpressure bounds each connection to 1 MiB plus one reply, but a reply may be
            # a 100 MB copy(): many clients asking and never reading would add up without a
            # limit. Over the shared budget, the client that asked for this one is closed.
            log.warning(
                "closing %s: %d bytes of replies wait for clients that do not read them, over "
                "the %d-byte budget",
                conn.peer,
                self._unsent,
                self.max_unsent,
            )
            # Not here: _send runs inside dispatch and parked-call retries, which must not see
            # a connection vanish under them. The reply is freed with the connection.
            self._call_later(0.0, functools.partial(self._close, conn))
        if self._held is not None:
            self._held.hold(conn, payload)
            return
        self._send_now(conn, payload)

    def _send_now(self, conn: _Conn, payload: bytes) -> None:
        if conn.closed:
            return
        queue = conn.wqueue
        was_idle = not queue
        queue.extend(frame_parts(payload))
        if payload is conn.final:
            conn.final = None  # the last reply of a closing connection, released by the log
            if was_idle:
                self._write(conn)
                if conn.closed:
                    return
                if conn.wqueue:
                    self._set_events(conn)  # closed by _flush once written
                else:
                    self._close(conn)
            return
        if was_idle:
            # Send now; what the kernel does not take waits for the socket to become writable.
            self._write(conn)
            if conn.wqueue and not conn.closed:
                self._set_events(conn)

    def _write(self, conn: _Conn) -> None:
        """Send as much queued output as the socket takes, without copying payloads."""
        queue = conn.wqueue
        sock = conn.sock
        try:
            while queue:
                try:
                    if len(queue) == 1 or isinstance(sock, ssl.SSLSocket):
                        sent = sock.send(queue[0])
                    else:
                        sent = sock.sendmsg(list(itertools.islice(queue, 64)))
                except (
                    BlockingIOError,
                    InterruptedError,
                    ssl.SSLWantWriteError,
                    ssl.SSLWantReadError,
                ):
                    return
                except OSError:
                    self._close(conn)
                    return
                self.counters.bytes_out += sent
                written = min(sent, conn.wbytes)
                conn.wbytes -= written
                self._unsent -= written
                while sent:
                    first = queue[0]
                    if sent >= len(first):
                        sent -= len(first)
                        queue.popleft()
                    else:
                        queue[0] = memoryview(first)[sent:]
                        return  # the kernel buffer is full
        finally:
            if conn.paused and conn.wbytes <= _WRITE_LOW and not conn.closed:
                # Not from here: _write runs inside request dispatch, which must not nest.
                self._call_later(0.0, functools.partial(self._resume, conn))

    def _resume(self, conn: _Conn) -> None:
        """Read from a paused connection again, starting with the requests it already sent."""
        if conn.closed or not conn.paused or conn.wbytes > _WRITE_LOW:
            return
        conn.paused = False
        self._set_events(conn)
        self._process(conn)

    def _set_events(self, conn: _Conn) -> None:
        """Poll ``conn`` for reading unless paused, and for writing while output is queued."""
        events = 0 if conn.paused else selectors.EVENT_READ
        if conn.wqueue:
            events |= selectors.EVENT_WRITE
        if events:
            try:
                self._selector.modify(conn.sock, events, conn)
            except KeyError:
                self._selector.register(conn.sock, events, conn)
        else:
            # Paused with nothing queued (its replies wait for the log): not polled at all.
            # Polled for reading, a readable socket woke every select() (a spin while group
            # commit gathers) only for _on_readable to ignore it.
            try:
                self._selector.unregister(conn.sock)
            except KeyError:
                pass

    def _flush(self, conn: _Conn) -> None:
        if conn.wqueue:
            self._write(conn)
            if conn.wqueue or conn.closed:
                return
            self._set_events(conn)
        if conn.close_after_flush and conn.final is None:
            self._close(conn)

    def _reply(self, conn: _Conn, kind: str, value: Any) -> None:
        """Encode a reply and send it (queued behind earlier output, or held for the log)."""
        payload = None
        if type(value) in PLAIN:  # the usual reply (a str, None): no hooks, nothing to check
            try:
                payload = conn.codec.pack_plain([kind, value])
            except (ValueError, OverflowError):
                pass  # a lone surrogate in a str, say: pack() below says what failed
        elif type(value) in _SLICEABLE and _larger_than(value, _SLICE_ITEMS):
            conn.busy = True
            parts = [b"\x92", conn.codec.pack(kind)]
            self._next_slice(conn, _encode_in_slices(conn.codec, value, parts), parts)
            return
        if payload is None:
            try:
                payload = conn.codec.pack([kind, value])
            except TypeError as exc:
                payload = conn.codec.pack([ERROR, RemoteError("TypeError", str(exc))])
        if (
            self._held is None
            and not conn.wqueue
            and len(payload) <= _DIRECT_SEND
            and not conn.paused
            and not conn.closed
        ):
            # The common reply: nothing waits before it, so it goes out in one send() with
            # no queueing or accounting (a small reply cannot reach the budgets in _send).
            # Only what the kernel does not take is queued, as _send_now would.
            data = HEADER.pack(len(payload)) + payload
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            self.counters.bytes_out += sent
            if sent < len(data):
                rest = memoryview(data)[sent:]
                conn.wbytes += len(rest)
                self._unsent += len(rest)
                conn.wqueue.append(rest)
                self._set_events(conn)
            return
        self._send(conn, payload)

    def _next_slice(self, conn: _Conn, slices: Iterator[None], parts: list[bytes]) -> None:
        """Encode one more slice of a large reply; send it once the last slice is done."""
        if conn.closed:
            return
        try:
            next(slices)
        except StopIteration:
            payload = b"".join(parts)
        except TypeError as exc:
            payload = conn.codec.pack([ERROR, RemoteError("TypeError", str(exc))])
        except Exception:
            # From a timer, not dispatch: nothing else would close it, and a busy connection
            # is never read again.
            log.exception("internal error encoding a reply for %s; closing it", conn.peer)
            parts.clear()
            conn.busy = False
            self._close(conn)
            return
        else:
            self._call_later(0.0, functools.partial(self._next_slice, conn, slices, parts))
            return
        parts.clear()
        conn.busy = False
        self._send(conn, payload)
        self._call_later(0.0, functools.partial(self._process, conn))

    # -- requests ------------------------------------------------------------------------

    def _on_request(self, conn: _Conn, payload: bytes | memoryview) -> None:
        try:
            message = conn.codec.unpack(payload)
        except ProtocolError as exc:
            self._undecodable(conn, exc)
            return
        reply = self.engine.handle(conn, message, payload)
        if reply is not None:
            if reply[0] == ERROR:
                self.counters.error(reply[1])
            self._reply(conn, reply[0], reply[1])

    def _on_request_timed(self, conn: _Conn, payload: bytes | memoryview) -> None:
        """:meth:`_on_request`, timed and counted by kind and operation (metrics, slow log).

        A method of its own, chosen once in ``__init__``: a server without metrics or a
        slow-request log pays nothing for them, not even a test per request.
        """
        started = time.perf_counter()
        try:
            message = conn.codec.unpack(payload)
        except ProtocolError as exc:
            self._undecodable(conn, exc)
            return
        reply = self.engine.handle(conn, message, payload)
        # Plain numbers (kvserve.counters), read when something scrapes them; counted before
        # the reply goes out, so a client holding its reply finds its call in the metrics.
        self.counters.request(self.engine.store.objects, message, time.perf_counter() - started)
        if reply is not None:
            if reply[0] == ERROR:
                self.counters.error(reply[1])
            self._reply(conn, reply[0], reply[1])

    def _undecodable(self, conn: _Conn, exc: ProtocolError) -> None:
        log.warning("closing %s: %s", conn.peer, exc)
        self.counters.error(exc)
        # Through _send, not _send_now: with a data directory the replies to the requests
        # before this one may still wait for the log, and this error must not overtake them
        # (nor close the connection under them: _send_now closes it once they are written).
        payload = conn.codec.pack([ERROR, exc])
        conn.close_after_flush = True
        if self._held is not None:
            conn.final = payload
        self._send(conn, payload)
        if self._held is None:
            self._flush(conn)


def _log_slow(entry: dict[str, Any]) -> None:
    """Log one slow request: what it was and how long it took, never its values."""
    where = "" if entry["name"] is None else f" on {entry['name']!r}"
    log.warning(
        "slow request: %s.%s%s took %.1f ms",
        entry["kind"],
        entry["op"],
        where,
        entry["ms"],
        extra={"slow_request": entry},
    )


_SLICEABLE: Final = (list, dict, tuple)
_NESTING: Final = frozenset({list, dict, tuple})
_HEADER_PACKER: Final = msgpack.Packer()


def _larger_than(value: list[Any] | dict[Any, Any] | tuple[Any, ...], limit: int) -> bool:
    """Return whether ``value`` holds more than ``limit`` items, counting nested lists/dicts.

    Stops counting at ``limit``: the cost is bounded whatever the size of the value.
    """
    budget = limit
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        budget -= len(item)
        if budget < 0:
            return True
        children = item.values() if type(item) is dict else item
        if _NESTING.isdisjoint(map(type, children)):
            continue  # flat: checked at C speed
        for child in children:
            if type(child) is list or type(child) is dict or type(child) is tuple:
                stack.append(child)
    return False


def _encode_in_slices(codec: Codec, value: Any, out: list[bytes]) -> Iterator[None]:
    """Append the msgpack encoding of ``value`` to ``out``, pausing about every slice of items.

    Writes exactly what ``codec.pack(value)`` would. A list or dict is written as its header,
    then its items: runs of plain items are packed ``_SLICE_ITEMS`` at a time as one list (or
    dict) whose own header is cut off, so the C packer does the work; a nested list or dict of
    more than 64 items (a dump's container states) is opened the same way, smaller ones are
    packed whole. The loop serves other connections between slices.
    """
    budget = [_SLICE_ITEMS]
    yield from _encode_value(codec, value, out, budget)


def _encode_value(codec: Codec, value: Any, out: list[bytes], budget: list[int]) -> Iterator[None]:
    if type(value) is tuple:
        # An ext whose payload is the items as an array: encoded in slices like a list,
        # then wrapped (its header holds the payload's length, known only at the end).
        inner: list[bytes] = []
        yield from _encode_value(codec, list(value), inner, budget)
        out.append(_HEADER_PACKER.pack_ext_type(EXT_TUPLE, b"".join(inner)))
    elif type(value) is list:
        out.append(_HEADER_PACKER.pack_array_header(len(value)))
        start = 0
        while start < len(value):
            piece = value[start : start + _SLICE_ITEMS]
            weight = 1
            if any(type(x) is tuple for x in piece):
                # Each tuple is an ext packed through Python (~10 us): smaller runs, each
                # item counted 16 times against the slice.
                piece = piece[: _SLICE_ITEMS // 16]
                weight = 16
            start += len(piece)
            if any(
                type(x) is list or type(x) is dict or (type(x) is tuple and _larger_than(x, 64))
                for x in piece
            ):
                for item in piece:
                    yield from _encode_item(codec, item, out, budget)
            else:
                yield from _encode_run(
                    codec, piece, _HEADER_PACKER.pack_array_header, out, budget, weight
                )
    elif type(value) is dict:
        out.append(_HEADER_PACKER.pack_map_header(len(value)))
        items = iter(value.items())
        while piece_map := dict(itertools.islice(items, _SLICE_ITEMS)):
            if any(type(v) in _SLICEABLE for v in piece_map.values()):
                for key, item in piece_map.items():
                    out.append(codec.pack(key))
                    yield from _encode_item(codec, item, out, budget)
            else:
                yield from _encode_run(
                    codec, piece_map, _HEADER_PACKER.pack_map_header, out, budget
                )
    else:
        out.append(codec.pack(value))


def _encode_run(
    codec: Codec,
    run: list[Any] | dict[Any, Any],
    header: Callable[[int], bytes],
    out: list[bytes],
    budget: list[int],
    weight: int = 1,
) -> Iterator[None]:
    """Pack a run of plain items in one C call, without the header of the run itself."""
    encoded = codec.pack(run)
    out.append(encoded[len(header(len(run))) :])
    budget[0] -= len(run) * weight
    if budget[0] <= 0:
        budget[0] = _SLICE_ITEMS
        yield


def _encode_item(codec: Codec, item: Any, out: list[bytes], budget: list[int]) -> Iterator[None]:
    if type(item) in _SLICEABLE and _larger_than(item, 64):
        yield from _encode_value(codec, item, out, budget)
        return
    out.append(codec.pack(item))
    # A tuple is packed through Python (an ext): ~16 times a plain item, per item in it.
    cost = 16 if type(item) is tuple else 1
    budget[0] -= cost * (1 + (len(item) if type(item) in _SLICEABLE else 0))
    if budget[0] <= 0:
        budget[0] = _SLICE_ITEMS
        yield


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
