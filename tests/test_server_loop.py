"""The server loop's own epoll polling gives what the selectors module would, and its timers."""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import kvclient
from kvserve.manager import KVManager
from kvserve.server import Server

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="epoll is Linux's")


def test_select_matches_selectors_for_read_write_and_hangup() -> None:
    server = KVManager(("127.0.0.1", 0), authkey=b"k" * 32).get_server()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        sel = server._selector
        assert server._epoll_poll is not None  # Linux: the loop polls epoll itself
        (a, a_peer), (b, b_peer), (c, c_peer), (d, _d_peer) = pairs
        for sock in (a, b, c, d):
            sock.setblocking(False)
        sel.register(a, selectors.EVENT_READ, "a")  # readable
        sel.register(b, selectors.EVENT_READ | selectors.EVENT_WRITE, "b")  # both
        sel.register(c, selectors.EVENT_READ, "c")  # peer gone: hangup
        sel.register(d, selectors.EVENT_WRITE, "d")  # writable only, nothing to read
        a_peer.send(b"x")
        b_peer.send(b"x")
        c_peer.close()
        deadline = time.monotonic() + 5
        while len(sel.select(0)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        ours = sorted((key.data, mask) for key, mask in server._select(0))
        theirs = sorted((key.data, mask) for key, mask in sel.select(0))
        assert ours == theirs
        assert dict(ours) == {
            "a": selectors.EVENT_READ,
            "b": selectors.EVENT_READ | selectors.EVENT_WRITE,
            "c": selectors.EVENT_READ,
            "d": selectors.EVENT_WRITE,
        }
        sel.unregister(a)  # an fd no longer registered is not reported
        assert "a" not in {key.data for key, _ in server._select(0)}
        start = time.monotonic()
        for sock in (b, c, d):
            sel.unregister(sock)
        assert server._select(0.05) == []  # nothing ready: waits out the timeout
        assert time.monotonic() - start >= 0.04
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
        server.close()


@contextlib.contextmanager
def _serving(authkey: bytes, **options: Any) -> Iterator[Server]:
    """Run an in-process server with ``options`` in a thread; stop it on leaving."""
    server = KVManager(("127.0.0.1", 0), authkey=authkey, **options).get_server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        assert server.wait_stopped(10)
        thread.join(10)


def test_an_authenticated_connection_leaves_no_timer_pending() -> None:
    # A pending timer makes every loop turn read the clock for select()'s timeout: the
    # handshake's is cancelled once the client is in, and the loop drops cancelled timers.
    authkey = b"k" * 32
    with (
        _serving(authkey, handshake_timeout=60.0) as server,
        kvclient.connect(server.endpoint, authkey) as kv,
    ):
        d = kv.dict("d")
        d["k"] = 1
        assert d["k"] == 1  # a loop turn after the handshake's
        assert [t for t in server._timers.heap if t.callback is not None] == []
        assert server._timers.heap == []


def test_a_parked_call_answered_late_starts_its_idle_time_at_the_answer() -> None:
    # last_active was set when the call came in: the sweep closed the connection right
    # after the parked get was answered, though it had been waiting, not idle.
    import msgpack

    from tests.wire import authed_connection, closed_by_peer, recv_frame, send_frame

    authkey = b"k" * 32
    with (
        _serving(authkey, idle_timeout=1.0) as server,
        kvclient.connect(server.endpoint, authkey) as kv,
    ):
        q = kv.queue("q")
        sock = authed_connection(server.endpoint, authkey)
        with sock:
            send_frame(sock, msgpack.packb(["q", "get", [True, 10.0], None]))
            time.sleep(2.0)  # parked past the idle timeout: waiting, not idle
            q.put(1)
            reply = msgpack.unpackb(recv_frame(sock), strict_map_key=False)
            assert reply[1] == 1, reply
            time.sleep(0.4)  # well under the idle timeout since the answer
            assert not closed_by_peer(sock, 0.3)
            assert closed_by_peer(sock, 5)  # and idle from then on


def test_the_loop_polls_epoll_itself_where_the_selector_is_epoll() -> None:
    # _select falls back to selectors' select() when EpollSelector lacks the private
    # attributes it reads; on this Python it has them, so a silent fallback is a regression.
    import selectors

    with _serving(b"k" * 32) as server:
        if isinstance(server._selector, selectors.EpollSelector):
            assert server._epoll_poll is not None
            assert server._fd_to_key is getattr(server._selector, "_fd_to_key")  # noqa: B009
        else:
            assert server._epoll_poll is None
