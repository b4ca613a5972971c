"""The serving loop: one thread, one selector, every connection non-blocking.

Why not the stdlib ``Server``: it runs a thread per connection, and with many clients those
threads convoy on the GIL (the stdlib manager drops to a bimodal 22k-48k GET/s at 16 clients on
two cores, where a single epoll thread holds ~68k). A single loop also makes slowloris cheap
to survive: an unauthenticated connection costs a buffer and a timer, never a thread.

Per connection, the loop reads whatever is available, cuts it into frames (see
:mod:`kvclient.codec`), runs the handshake, then dispatches requests in order. A request that
would block (``Queue.get`` on an empty queue) is *parked* on its queue with its deadline; the
connection's later frames wait behind it, other connections carry on. After every mutating call
on a queue with parked requests, those are retried in FIFO order.
"""

from __future__ import annotations

import collections
import errno
import functools
import heapq
import itertools
import logging
import math
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack

from kvproto import schema
from kvproto._version import __version__
from kvproto.codec import MAX_DEPTH, Codec
from kvproto.errors import (
    KVConnectionError,
    NoSuchContainerError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
)
from kvproto.handshake import ServerHandshake
from kvproto.net import format_address, tune_socket
from kvproto.wire import (
    ERROR,
    MAX_BATCH,
    MAX_FRAME_DEFAULT,
    MAX_HANDSHAKE_FRAME,
    MAX_METHOD,
    MAX_REPLY_FRAME,
    RETURN,
    FrameTooLargeError,
    check_args,
    frame_parts,
    frame_size,
    parse_request,
)
from kvserve.containers import MAX_TIMEOUT, Container, WouldBlock
from kvserve.persistence import LoadReport, Persistence, dump_state, restore_state
from kvserve.store import Registry, Store

__all__ = ["Server"]

log = logging.getLogger("kvserve")

_RECV_SIZE: Final = 256 * 1024
# Server-level calls by what the schema says of them (kvproto.schema).
_LOGGED_PUBLIC: Final = frozenset(
    name for name, op in schema.SERVER.items() if op.is_logged and not op.own_policy
)
_WRITE_PUBLIC: Final = frozenset(
    name for name, op in schema.SERVER.items() if op.mutates and not op.own_policy
)
_REMEMBERED_PUBLIC: Final = frozenset(name for name, op in schema.SERVER.items() if op.mutates)
_MAX_SESSIONS: Final = 65536  # request-id memory: one last answer per client thread
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
_ACCEPT_BACKOFF: Final = (0.05, 1.0)  # first and longest pause after EMFILE and friends
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Timer:
    """One scheduled callback; :meth:`cancel` makes it a no-op and frees what it holds."""

    __slots__ = ("at", "callback")

    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at = at
        self.callback: Callable[[], None] | None = callback

    def __lt__(self, other: _Timer) -> bool:
        return self.at < other.at

    def cancel(self) -> None:
        self.callback = None


class _Conn:
    """State of one client connection."""

    __slots__ = (
        "accounted",
        "authed",
        "backlog",
        "busy",
        "close_after_flush",
        "closed",
        "codec",
        "handshake",
        "hello",
        "key_index",
        "last_active",
        "parked",
        "paused",
        "peer",
        "rbuf",
        "readonly",
        "sock",
        "tls_pending",
        "wbytes",
        "wqueue",
    )

    def __init__(self, sock: socket.socket, peer: str, keys: list[bytes]) -> None:
        self.sock = sock
        self.peer = peer
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
        self.key_index = -1
        self.codec = Codec(encode_exceptions=True, decode_depth=MAX_DEPTH, decode_exceptions=False)
        self.parked: _Waiter | None = None
        self.close_after_flush = False
        self.closed = False


class _Waiter:
    """A parked request: who asked, what, and until when."""

    __slots__ = ("blocked", "conn", "done", "message", "name", "rid", "timer")

    def __init__(
        self,
        conn: _Conn,
        name: str,
        message: list[Any],
        blocked: WouldBlock,
        rid: list[Any] | None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.message = message
        self.blocked = blocked
        self.rid = rid
        self.done = False
        self.timer: _Timer | None = None


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
    ) -> None:
        if serializer != "msgpack":
            raise ValueError(f"kvserve speaks msgpack only, not {serializer!r}")
        if not authkey:
            raise ValueError("an authkey is required")
        self.registry = registry
        self.store = Store(registry)
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
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.started = time.time()
        self.ops_served = 0  # operations, counting each call of a batch
        self.requests_served = 0  # request frames
        # token -> (seq, kind, value) of each client session's last answered request.
        self._sessions: dict[bytes, tuple[int, str, Any]] = {}
        self._persist = persistence
        self.fatal_error: str | None = None  # why the loop stopped on its own; kvserve exits 1
        # With persistence, replies wait in _held until the log holds their writes.
        self._held: list[tuple[_Conn, bytes]] | None = None
        self.load_report: LoadReport | None = None
        if persistence is not None:
            self.load_report = persistence.open(self.store, self.remember)
            self._held = []
        host, port = address
        try:
            self._listener = _bind(host or "127.0.0.1", port, backlog)
        except BaseException:
            if persistence is not None:
                persistence.close()
            raise
        bound = self._listener.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        self._selector = selectors.DefaultSelector()
        self._recv_view = memoryview(bytearray(_RECV_SIZE))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: set[_Conn] = set()
        self._parked: dict[str, collections.deque[_Waiter]] = {}
        self._deadlines: dict[str, _Timer] = {}  # container name -> its next expire() timer
        self._last_group = 0  # writers in the last group commit (--fsync always)
        self._timers: list[_Timer] = []
        self._cancelled_timers = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._public: dict[str, Callable[..., Any]] = {
            "create": self._create,
            "names": self.store.names,
            "describe": self.store.describe,
            "drop": self._drop,
            "ping": lambda: None,
            "stats": self.stats,
            "get_methods": self._get_methods,
            "number_of_objects": lambda: len(self.store.objects),
            "compact": self._compact,
            "dump": lambda: dump_state(self.store),
            "restore": self._restore,
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
        self._schedule_deadlines()  # leases restored from disk run out on time too
        try:
            while not self._stop.is_set():
                timeout = None
                if self._timers:
                    timeout = min(_MAX_SLEEP, max(0.0, self._timers[0].at - time.monotonic()))
                self._handle(sel.select(timeout))
                if self._timers:
                    self._run_timers()
                if self._held:
                    self._gather_commit_group()
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

    def _gather_commit_group(self) -> None:
        """Under ``--fsync always``, wait a moment for writers missing from this group.

        Group commit shares one fsync among the writes handled in one loop iteration. Clients
        do not arrive in lockstep, so a group often closes one straggler short (4 writers
        split 3 + 1, two fsyncs). Like PostgreSQL's commit_delay, wait up to half the last
        fsync (at most 2 ms) when the previous group was larger than this one; a single writer
        never waits.
        """
        persist = self._persist
        assert persist is not None and self._held is not None
        if persist.fsync != "always":
            return
        group = len({id(conn) for conn, _ in self._held})
        if group >= self._last_group:
            self._last_group = group
            return
        deadline = time.monotonic() + min(0.002, persist.last_sync_seconds / 2)
        while group < self._last_group:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._handle(self._selector.select(left))
            group = len({id(conn) for conn, _ in self._held})
        self._last_group = group

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
        stopping = KVConnectionError(f"kvserve at {self.endpoint} is shutting down")
        for name in list(self._parked):
            for waiter in self._parked.pop(name):
                self._finish(waiter)
                waiter.conn.parked = None
                self._reply(waiter.conn, ERROR, stopping)
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
        """Run ``callback`` from the loop after ``delay`` seconds; return its cancellable timer.

        Delays come from validated arguments (see :func:`kvserve.containers.check_timeout`);
        a non-finite one here is a bug, refused before it can freeze the heap's order (nan)
        or the loop's sleep (inf).
        """
        if not math.isfinite(delay):
            raise ValueError(f"timer delay must be finite, not {delay!r}")
        timer = _Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def _cancel_timer(self, timer: _Timer | None) -> None:
        if timer is None or timer.callback is None:
            return
        timer.cancel()
        self._cancelled_timers += 1
        # Cancelled timers stay in the heap until they come due; rebuild it when they are
        # the majority, so a stream of answered long-timeout waits cannot grow it.
        if self._cancelled_timers > 64 and self._cancelled_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if t.callback is not None]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0].at <= now:
            timer = heapq.heappop(timers)
            callback = timer.callback
            if callback is None:
                self._cancelled_timers = max(0, self._cancelled_timers - 1)
                continue
            timer.callback = None
            try:
                callback()
            except Exception:
                # A failing timer must cost that timer, never the loop.
                log.exception("internal error in a timer callback")

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
            conn = _Conn(sock, peer, self.keys)
            self._conns.add(conn)
            self._pending[conn] = None
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._call_later(
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
        waiter = conn.parked
        if waiter is not None:
            # A dead client's parked get must not swallow the next item.
            self._finish(waiter)
            queue = self._parked.get(waiter.name)
            if queue is not None:
                try:
                    queue.remove(waiter)
                except ValueError:
                    pass
                if not queue:
                    del self._parked[waiter.name]
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
            self._process(conn, view[:n])
            # TLS may hold decrypted bytes that select() cannot see; plain sockets are
            # level-triggered, so one recv per event is enough.
            if conn.closed or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
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
                    # _scrub): copy the tail instead of failing the whole loop.
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
                    self._on_request(conn, payload)
                else:
                    self._on_handshake(conn, bytes(payload))
        except Exception:
            # A bug in dispatch must cost one connection, never the server.
            log.exception("internal error serving %s; closing that connection", conn.peer)
            self._close(conn)
            return pos
        if pos and conn.authed:
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
            conn.key_index = hs.key_index
            conn.readonly = hs.key_index == 1
        else:
            log.warning("rejected %s: %s", conn.peer, hs.reason)
            conn.close_after_flush = True
            self._flush(conn)

    # -- writing -------------------------------------------------------------------------

    def _release_held(self) -> None:
        """Make the log hold every applied write, then release the replies that wait on it."""
        assert self._persist is not None and self._held is not None
        held, self._held = self._held, []
        try:
            self._persist.flush()
        except OSError as exc:
            # The writes are applied in memory but not logged: acknowledging them would be a
            # lie. Fail those calls loudly and stop; a restart replays what the log holds.
            if self.fatal_error is None:
                self.fatal_error = str(self._persist.failed or exc)
                log.critical("%s; stopping without acknowledging", self.fatal_error)
            for conn, _ in held:
                self._close(conn)
            self.stop()
            return
        for conn, payload in held:
            self._send_now(conn, payload)
        if self._persist.should_compact():
            try:
                self._persist.compact(self.store)
            except OSError:
                pass  # logged and counted by Persistence; a failed log write stops us next time

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
            self._held.append((conn, payload))
            return
        self._send_now(conn, payload)

    def _send_now(self, conn: _Conn, payload: bytes) -> None:
        if conn.closed:
            return
        queue = conn.wqueue
        was_idle = not queue
        queue.extend(frame_parts(payload))
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
        # Paused with nothing queued: its replies wait for the log (released at the end of
        # this iteration); _on_readable ignores it meanwhile.
        self._selector.modify(conn.sock, events or selectors.EVENT_READ, conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.wqueue:
            self._write(conn)
            if conn.wqueue or conn.closed:
                return
            self._set_events(conn)
        if conn.close_after_flush:
            self._close(conn)

    def _reply(self, conn: _Conn, kind: str, value: Any) -> None:
        if type(value) in _SLICEABLE and _larger_than(value, _SLICE_ITEMS):
            conn.busy = True
            parts = [b"\x92", conn.codec.pack(kind)]
            self._next_slice(conn, _encode_in_slices(conn.codec, value, parts), parts)
            return
        try:
            payload = conn.codec.pack([kind, value])
        except TypeError as exc:
            payload = conn.codec.pack([ERROR, RemoteError("TypeError", str(exc))])
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
            log.warning("closing %s: %s", conn.peer, exc)
            self._send_now(conn, conn.codec.pack([ERROR, exc]))
            conn.close_after_flush = True
            self._flush(conn)
            return
        try:
            rid = parse_request(message)
        except ProtocolError as exc:
            self._reply(conn, ERROR, exc)
            return
        ident, method = message[0], message[1]
        self.ops_served += 1
        self.requests_served += 1
        if rid is not None and (conn.readonly or not self._changes_state(ident, method)):
            # Calls that change nothing are safe to retry without an id: remembering their
            # answers would pin them (a copy() of a big list per id) and let a stream of
            # pings evict other sessions' answers, so a retried incr ran twice. The
            # read-only key must not read or evict other sessions' answers either.
            rid = None
        if rid is not None:
            cached = self._sessions.get(rid[0])
            if cached is not None and cached[0] >= rid[1]:
                # A retry of a call that was already applied: answer it, do not apply again.
                if cached[0] == rid[1]:
                    self._reply(conn, cached[1], cached[2])
                else:
                    self._reply(conn, ERROR, ProtocolError("stale request id"))
                return
        ident = message[0]
        try:
            if ident is None:
                result = self._call_public(conn, message, rid)
            else:
                result = self._call(message, rid, conn, payload)
        except WouldBlock as wb:
            self._park(conn, message, wb, rid)
            return
        except Exception as exc:
            self._answer(conn, rid, ERROR, exc)
            return
        self._answer(conn, rid, RETURN, result)
        if ident in self._parked:
            self._retry_parked(ident)

    def _changes_state(self, ident: str | None, method: str) -> bool:
        """Whether a call may change state (its answer is remembered for retries)."""
        if ident is None:
            return method in _REMEMBERED_PUBLIC
        obj = self.store.objects.get(ident)
        # Unknown container: the call fails; keep the id so its error is remembered too.
        return obj is None or method in obj.mutating or method in obj.caller_methods

    def _answer(self, conn: _Conn, rid: list[Any] | None, kind: str, value: Any) -> None:
        if kind == ERROR and isinstance(value, BaseException):
            _scrub(value)
        if rid is not None:
            self.remember(rid[0], rid[1], kind, value)
        self._reply(conn, kind, value)

    def remember(self, token: bytes, seq: int, kind: str, value: Any) -> None:
        """Record the answer to request ``seq`` of session ``token`` (for retries)."""
        sessions = self._sessions
        sessions.pop(token, None)  # re-insert: the dict's order is least recently used first
        sessions[token] = (seq, kind, value)
        if len(sessions) > _MAX_SESSIONS:
            del sessions[next(iter(sessions))]

    def _call(
        self,
        message: list[Any],
        rid: list[Any] | None = None,
        conn: _Conn | None = None,
        raw: bytes | memoryview | None = None,
    ) -> Any:
        ident, method, args, kwds = message
        obj = self.store.get(ident)
        if method not in self.store.exposed[ident]:
            raise AttributeError(f"{obj.kind} {ident!r} has no method {method!r}")
        check_args(args, kwds)
        if conn is not None and conn.readonly and method in obj.mutating:
            raise ReadOnlyError(
                f"this connection authenticated with the read-only key; {method!r} on "
                f"{ident!r} would change it"
            )
        if method in obj.caller_methods:
            # The session token when the call has a request id (stable across reconnects),
            # else the connection. Put into the message, so the log replays the same owner
            # (and a parked call, retried, finds it there already).
            caller = rid[0] if rid is not None else b"conn:%d" % id(conn)
            if kwds and kwds.get("caller", caller) != caller:
                raise ProtocolError("'caller' is set by the server, not the client")
            kwds = message[3] = {**(kwds or {}), "caller": caller}
        failed: Exception | None = None
        with obj.lock:
            try:
                result = (
                    getattr(obj, method)(*args, **kwds) if kwds else getattr(obj, method)(*args)
                )
            except WouldBlock:
                if obj.journal:
                    self._log_journal(ident, obj)
                raise  # not applied: it is logged when a retry completes it
            except Exception as exc:
                # A mutating call may raise halfway (delete_many(["a", ["x"]]) deletes "a",
                # then fails on the list; sort() of mixed types leaves the list reordered).
                # It is logged all the same: replay raises the same way at the same point,
                # so memory and the log never disagree. (Validating everything first would
                # have to be done, and kept right, in every method.)
                failed = exc
            if obj.journal:
                self._log_journal(ident, obj)
        if method in obj.mutating:
            if self._persist is not None:
                if raw is not None and method not in obj.caller_methods:
                    # The frame as received is already the record, [name, method, args,
                    # kwds(, rid)]: log its bytes rather than pack the same list again.
                    self._persist.append_encoded(raw)
                else:
                    self._persist.append(message if rid is None else [*message, rid])
            if type(obj).next_deadline is not Container.next_deadline:
                self._schedule_deadline(ident, obj)
        if failed is not None:
            raise failed
        return result

    def _log_journal(self, name: str, obj: Container) -> None:
        entries, obj.journal = obj.journal, []
        if self._persist is not None:
            for method, args in entries:
                self._persist.append([name, method, args, None])

    def _schedule_deadlines(self) -> None:
        """Ask every container that uses timers when it next needs one (start-up, restore)."""
        for name, obj in list(self.store.objects.items()):
            if type(obj).next_deadline is not Container.next_deadline:
                self._schedule_deadline(name, obj)

    def _schedule_deadline(self, name: str, obj: Container) -> None:
        with obj.lock:
            at = obj.next_deadline()
        if at is None:
            return
        scheduled = self._deadlines.get(name)
        if scheduled is not None:
            if scheduled.at <= at:
                return  # an earlier timer will run and reschedule
            self._cancel_timer(scheduled)  # superseded: do not let them pile up
        self._deadlines[name] = self._call_later(
            at - time.monotonic(), lambda: self._on_deadline(name)
        )

    def _on_deadline(self, name: str) -> None:
        del self._deadlines[name]
        obj = self.store.objects.get(name)
        if obj is None:
            return
        with obj.lock:
            obj.expire(time.monotonic())
            if obj.journal:
                self._log_journal(name, obj)
        if name in self._parked:
            self._retry_parked(name)
        self._schedule_deadline(name, obj)

    def _call_public(self, conn: _Conn, message: list[Any], rid: list[Any] | None) -> Any:
        _, method, args, kwds = message
        check_args(args, kwds)
        if method == "batch":
            return self._batch(args, rid, conn)
        if method in schema.STDLIB_NOOPS:
            return None
        func = self._public.get(method)
        if func is None:
            raise AttributeError(f"kvserve has no function {method!r}")
        if method == "create":
            return self._create_request(conn, message, rid)
        if conn.readonly and method in _WRITE_PUBLIC:
            raise ReadOnlyError(
                "this connection authenticated with the read-only key; "
                f"{method!r} would change the server"
            )
        result = func(*args, **(kwds or {}))
        if self._persist is not None and method in _LOGGED_PUBLIC:
            self._persist.append(message if rid is None else [*message, rid])
        return result

    def _create_request(self, conn: _Conn, message: list[Any], rid: list[Any] | None) -> Any:
        """Attach to a container, creating it first if needed (and allowed).

        The kind and name are taken the way Python binds ``create(kind, name, *args,
        **kwds)``, positional or keyword, so no spelling of the request skips a check. Only a
        call that creates something is logged: attaching changes nothing.
        """
        _, _, args, kwds = message
        rest = list(args)
        options = dict(kwds or {})
        kind = rest.pop(0) if rest else options.pop("kind", None)
        name = rest.pop(0) if rest else options.pop("name", None)
        existing = self.store.objects.get(name) if type(name) is str else None
        if existing is None and conn.readonly:
            raise ReadOnlyError(
                "this connection authenticated with the read-only key; creating "
                f"{name!r} would change the server"
            )
        if type(kind) is not str or len(kind) > MAX_METHOD:
            raise TypeError("the container kind must be a str of at most 64 chars")
        result = self._create(kind, name, *rest, **options)
        if existing is None and self._persist is not None:
            record = [None, "create", [kind, name, *rest], options]
            self._persist.append(record if rid is None else [*record, rid])
        return result

    def _batch(self, args: list[Any], rid: list[Any] | None, conn: _Conn) -> list[list[Any]]:
        if len(args) != 1 or type(args[0]) is not list:
            raise ProtocolError("malformed batch: expected one array of requests")
        if len(args[0]) > MAX_BATCH:
            # One batch runs in one loop turn: 4M entries held every other client 4.9 s.
            raise ProtocolError(f"a batch holds at most {MAX_BATCH} calls (kvclient splits them)")
        results: list[list[Any]] = []
        touched: set[str] = set()
        for index, message in enumerate(args[0]):
            if type(message) is not list or not 4 <= len(message) <= 5 or message[0] is None:
                results.append([ERROR, ProtocolError("malformed request in batch")])
                continue
            del message[4:]  # the batch's own request id covers its calls
            sub_rid = None if rid is None else [rid[0], rid[1], index]
            try:
                results.append([RETURN, self._call(message, sub_rid, conn)])
                touched.add(message[0])
            except WouldBlock as wb:  # a batch never waits
                if wb.on_timeout is not None:
                    results.append([ERROR, wb.on_timeout])
                else:
                    results.append([RETURN, wb.result])
            except Exception as exc:
                _scrub(exc)
                results.append([ERROR, exc])
        self.ops_served += len(results) - 1
        for name in touched & self._parked.keys():
            self._retry_parked(name)
        return results

    # -- server-level functions ----------------------------------------------------------

    def _create(self, kind: str, name: str, *args: Any, **kwds: Any) -> list[Any]:
        self.store.create(kind, name, *args, **kwds)
        return [name, sorted(self.store.exposed[name])]

    def _get_methods(self, token: Any) -> list[str]:
        name = token[-1] if isinstance(token, list | tuple) else token
        self.store.get(name)
        return sorted(self.store.exposed[name])

    def _drop(self, name: str) -> bool:
        existed = self.store.drop(name)
        for waiter in self._parked.pop(name, ()):
            self._finish(waiter)
            waiter.conn.parked = None
            self._reply(waiter.conn, ERROR, NoSuchContainerError(f"container {name!r} was dropped"))
            # Its next requests wait until the drop is logged (after this returns): run now,
            # a write to the re-created container would be logged before the drop, and a
            # restart would replay the drop over an acknowledged write.
            self._call_later(0.0, functools.partial(self._process, waiter.conn))
        return existed

    def _compact(self) -> bool:
        if self._persist is None:
            raise ValueError("this server keeps no data on disk (start it with --data-dir)")
        # compact() flushes first: records queued in this iteration belong to the segments
        # the snapshot covers. If that flush fails they stay queued, this call fails, and
        # _release_held stops the server before any of their replies is sent.
        return self._persist.compact(self.store)

    def _restore(self, dump: Any) -> int:
        count = restore_state(self.store, dump)
        self._schedule_deadlines()
        return count

    def stats(self) -> dict[str, Any]:
        """Return server facts for ``kvctl stats``."""
        objects = list(self.store.objects.values())
        return {
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "clients": sum(1 for c in self._conns if c.authed),
            "containers": len(objects),
            "keys": sum(obj.size() for obj in objects),
            "refused_connections": self.refused_connections,
            "ops": self.ops_served,
            "requests": self.requests_served,
            "persistence": None
            if self._persist is None
            else {
                "data_dir": str(self._persist.dir),
                "fsync": self._persist.fsync,
                "disk_bytes": self._persist.disk_bytes(),
                "compactions": self._persist.compactions,
                "compacting": self._persist.compacting,
                "compaction_failures": self._persist.compaction_failures,
                "last_error": self._persist.last_error,
            },
        }

    # -- parking -------------------------------------------------------------------------

    def _park(self, conn: _Conn, message: list[Any], wb: WouldBlock, rid: list[Any] | None) -> None:
        name = message[0]
        _scrub(wb)
        if wb.timeout is not None and not 0 <= wb.timeout <= MAX_TIMEOUT:
            # Every kind checks its timeouts with check_timeout(); this guards the loop
            # against one that forgot (a bad timeout must never reach the timer heap).
            self._answer(conn, rid, ERROR, ValueError(f"bad timeout {wb.timeout!r}"))
            return
        waiter = _Waiter(conn, name, message, wb, rid)
        conn.parked = waiter
        self._parked.setdefault(name, collections.deque()).append(waiter)
        if wb.timeout is not None:
            waiter.timer = self._call_later(wb.timeout, lambda: self._expire(waiter))

    def _finish(self, waiter: _Waiter) -> None:
        """Mark a parked call answered or withdrawn, and cancel its timeout."""
        waiter.done = True
        self._cancel_timer(waiter.timer)
        waiter.timer = None

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.done:
            return
        self._finish(waiter)
        queue = self._parked.get(waiter.name)
        if queue is not None:
            queue.remove(waiter)
            if not queue:
                del self._parked[waiter.name]
        conn = waiter.conn
        conn.parked = None
        wb = waiter.blocked
        if wb.on_expire is not None:
            obj = self.store.objects.get(waiter.name)
            if obj is not None:
                with obj.lock:
                    wb.on_expire()
        if wb.on_timeout is not None:
            self._answer(conn, waiter.rid, ERROR, wb.on_timeout)
        else:
            self._answer(conn, waiter.rid, RETURN, wb.result)
        if wb.on_expire is not None and waiter.name in self._parked:
            self._retry_parked(waiter.name)
        self._process(conn)

    def _retry_parked(self, name: str) -> None:
        """Retry the requests parked on ``name`` in arrival order, answering those that finish.

        A container with ``strict_fifo`` stops at the first request that still blocks, so no
        later one overtakes it; the others retry every parked request. Answered requests may
        change the container again (a get frees room for a put), so this loops until a whole
        pass answers nothing.
        """
        queue = self._parked.get(name)
        obj = self.store.objects.get(name)
        strict = obj.strict_fifo if obj is not None else True
        resumed: list[_Conn] = []
        progress = True
        while queue and progress:
            progress = False
            for waiter in list(queue):
                cached = self._sessions.get(waiter.rid[0]) if waiter.rid else None
                if cached is not None and waiter.rid is not None and cached[0] == waiter.rid[1]:
                    # The same request parked twice (a retry arrived before the server saw
                    # the first connection die): the first was answered; repeat that answer.
                    self._reply(waiter.conn, cached[1], cached[2])
                else:
                    try:
                        result = self._call(waiter.message, waiter.rid, waiter.conn)
                    except WouldBlock as again:
                        if strict and again.in_line:
                            break
                        continue
                    except Exception as exc:
                        self._answer(waiter.conn, waiter.rid, ERROR, exc)
                    else:
                        self._answer(waiter.conn, waiter.rid, RETURN, result)
                queue.remove(waiter)
                self._finish(waiter)
                waiter.conn.parked = None
                resumed.append(waiter.conn)
                progress = True
        if queue is not None and not queue:
            self._parked.pop(name, None)
        for conn in resumed:
            self._process(conn)


_SLICEABLE: Final = (list, dict)
_NESTING: Final = frozenset({list, dict})
_HEADER_PACKER: Final = msgpack.Packer()


def _larger_than(value: list[Any] | dict[Any, Any], limit: int) -> bool:
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
            if type(child) is list or type(child) is dict:
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
    if type(value) is list:
        out.append(_HEADER_PACKER.pack_array_header(len(value)))
        start = 0
        while start < len(value):
            piece = value[start : start + _SLICE_ITEMS]
            if any(type(x) is tuple for x in piece):
                # Each tuple is an ext packed through Python (~10 us): smaller slices.
                piece = piece[: _SLICE_ITEMS // 16]
            start += len(piece)
            if any(type(x) is list or type(x) is dict for x in piece):
                for item in piece:
                    yield from _encode_item(codec, item, out, budget)
            else:
                yield from _encode_run(codec, piece, _HEADER_PACKER.pack_array_header, out, budget)
    elif type(value) is dict:
        out.append(_HEADER_PACKER.pack_map_header(len(value)))
        items = iter(value.items())
        while piece_map := dict(itertools.islice(items, _SLICE_ITEMS)):
            if any(type(v) is list or type(v) is dict for v in piece_map.values()):
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
) -> Iterator[None]:
    """Pack a run of plain items in one C call, without the header of the run itself."""
    encoded = codec.pack(run)
    out.append(encoded[len(header(len(run))) :])
    budget[0] -= len(run)
    if budget[0] <= 0:
        budget[0] = _SLICE_ITEMS
        yield


def _encode_item(codec: Codec, item: Any, out: list[bytes], budget: list[int]) -> Iterator[None]:
    if (type(item) is list or type(item) is dict) and _larger_than(item, 64):
        yield from _encode_value(codec, item, out, budget)
        return
    out.append(codec.pack(item))
    budget[0] -= 1 + (len(item) if type(item) is list or type(item) is dict else 0)
    if budget[0] <= 0:
        budget[0] = _SLICE_ITEMS
        yield


def _scrub(exc: BaseException) -> None:
    """Drop the traceback and chained exceptions of an exception the server keeps.

    Answers are remembered for retries and parked calls keep their WouldBlock: a traceback
    would keep every frame's locals alive with them, among them views of the connection's
    receive buffer (which then cannot be resized: BufferError) and whole request payloads.
    """
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None


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
