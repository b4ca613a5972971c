"""The raw-socket floor: the least work any Python service can do per round trip.

A minimal key-value server and client speaking the same framing as kvmanager (a 4-byte
big-endian length, then a msgpack payload) with no handshake, no containers, no error
handling beyond closing the connection, and no exceptions on the wire. Whatever kvserve
spends above this floor is the price of its features.

Requests are msgpack arrays ``[op, *args]``; the reply is the bare result::

    ["get", key]            -> value or nil
    ["set", key, value]     -> nil
    ["incr", key]           -> new integer
    ["mget", [key, ...]]    -> [value or nil, ...]
    ["mset", {key: value}]  -> nil
    ["put", name, item]     -> nil
    ["qget", name, timeout] -> item, or nil after `timeout` seconds with the queue empty

Two serving loops: ``epoll`` (one thread, one selector, as kvserve) and ``thread`` (one
blocking thread per connection, as the stdlib manager). Run one with
``python -m bench.floor --mode epoll``; it prints ``floor listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import collections
import queue
import selectors
import signal
import socket
import struct
import threading
import time
from typing import Any, Final

import msgpack

__all__ = ["FloorClient", "serve"]

HEADER: Final = struct.Struct(">I")
_RECV: Final = 256 * 1024
_MAX_FRAME: Final = 64 * 1024 * 1024


class _Framer:
    """Frames with one reused ``msgpack.Packer``: the least a single thread pays per message.

    ``msgpack.packb`` builds a Packer per call (about 0.4 µs); a service that owns its
    connection, as kvserve's loop and kvclient's per-thread connection do, keeps one.
    """

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def __call__(self, value: Any) -> bytes:
        payload: bytes = self._pack(value)
        return HEADER.pack(len(payload)) + payload


class _Conn:
    __slots__ = ("rbuf", "sock", "wbuf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rbuf = bytearray()
        self.wbuf = bytearray()


class _EpollServer:
    """One thread, one selector, non-blocking sockets: kvserve's architecture, minus kvserve."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.store: dict[Any, Any] = {}
        self.queues: dict[str, collections.deque[Any]] = {}
        # A blocked qget waits here with its deadline; a put hands its item straight over.
        self.waiters: dict[str, collections.deque[tuple[_Conn, float]]] = {}
        self.stopped = False
        self.frame = _Framer()  # one thread: one Packer

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        while not self.stopped:
            events = self.sel.select(0.05 if self.waiters else 1.0)
            for key, mask in events:
                conn = key.data
                if conn is None:
                    self._accept()
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ:
                    self._readable(conn)
            if self.waiters:
                self._expire()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, _Conn(sock))

    def _close(self, conn: _Conn) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if not conn.rbuf and len(data) >= 4 and HEADER.unpack_from(data)[0] + 4 == len(data):
            # The common case: exactly one whole request arrived. No buffer copies.
            self._dispatch(conn, msgpack.unpackb(memoryview(data)[4:], strict_map_key=False))
            return
        buf = conn.rbuf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > _MAX_FRAME:
                self._close(conn)
                return
            if len(buf) - pos - 4 < size:
                break
            message = msgpack.unpackb(buf[pos + 4 : pos + 4 + size], strict_map_key=False)
            pos += 4 + size
            self._dispatch(conn, message)
        del buf[:pos]

    def _dispatch(self, conn: _Conn, msg: list[Any]) -> None:
        op = msg[0]
        result: Any = None
        if op == "get":
            result = self.store.get(msg[1])
        elif op == "set":
            self.store[msg[1]] = msg[2]
        elif op == "incr":
            result = self.store[msg[1]] = self.store.get(msg[1], 0) + 1
        elif op == "mget":
            get = self.store.get
            result = [get(k) for k in msg[1]]
        elif op == "mset":
            self.store.update(msg[1])
        elif op == "put":
            waiting = self.waiters.get(msg[1])
            if waiting:
                waiter, _ = waiting.popleft()
                if not waiting:
                    del self.waiters[msg[1]]
                self._send(waiter, self.frame(msg[2]))
            else:
                self.queues.setdefault(msg[1], collections.deque()).append(msg[2])
        elif op == "qget":
            items = self.queues.get(msg[1])
            if items:
                result = items.popleft()
            else:
                deadline = time.monotonic() + float(msg[2])
                self.waiters.setdefault(msg[1], collections.deque()).append((conn, deadline))
                return
        self._send(conn, self.frame(result))

    def _expire(self) -> None:
        now = time.monotonic()
        for name in list(self.waiters):
            waiting = self.waiters[name]
            while waiting and waiting[0][1] <= now:
                conn, _ = waiting.popleft()
                self._send(conn, self.frame(None))
            if not waiting:
                del self.waiters[name]

    def _send(self, conn: _Conn, frame: bytes) -> None:
        if conn.wbuf:
            conn.wbuf += frame
            return
        try:
            sent = conn.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(frame):
            conn.wbuf += memoryview(frame)[sent:]
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.wbuf)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        del conn.wbuf[:sent]
        if not conn.wbuf:
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)


class _ThreadServer:
    """One blocking thread per connection: the stdlib manager's architecture, minus pickle."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.store: dict[Any, Any] = {}
        self.queues: dict[str, queue.Queue[Any]] = {}
        self.lock = threading.Lock()

    def serve(self) -> None:
        while True:
            sock, _ = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_conn, args=(sock,), daemon=True).start()

    def _queue(self, name: str) -> queue.Queue[Any]:
        with self.lock:
            return self.queues.setdefault(name, queue.Queue())

    def _serve_conn(self, sock: socket.socket) -> None:
        client = FloorClient.__new__(FloorClient)
        client.sock = sock
        frame = _Framer()  # this connection's thread's own
        store = self.store
        with sock:
            while True:
                try:
                    msg = client.recv()
                except (OSError, EOFError):
                    return
                op = msg[0]
                result: Any = None
                if op == "get":
                    result = store.get(msg[1])
                elif op == "set":
                    store[msg[1]] = msg[2]
                elif op == "incr":
                    with self.lock:
                        result = store[msg[1]] = store.get(msg[1], 0) + 1
                elif op == "mget":
                    result = [store.get(k) for k in msg[1]]
                elif op == "mset":
                    store.update(msg[1])
                elif op == "put":
                    self._queue(msg[1]).put(msg[2])
                elif op == "qget":
                    try:
                        result = self._queue(msg[1]).get(timeout=float(msg[2]))
                    except queue.Empty:
                        result = None
                try:
                    sock.sendall(frame(result))
                except OSError:
                    return


class FloorClient:
    """A blocking client for the floor server: one frame out, one frame back.

    Args:
        address: ``(host, port)`` of a floor server.
    """

    sock: socket.socket
    frame: _Framer

    def __init__(self, address: tuple[str, int]) -> None:
        self.frame = _Framer()
        self.sock = socket.create_connection(address, 10.0)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, message: list[Any]) -> Any:
        """Send one request and return its reply."""
        self.sock.sendall(self.frame(message))
        return self.recv()

    def recv(self) -> Any:
        """Receive one frame and decode it."""
        sock = self.sock
        data = sock.recv(65536)
        while len(data) < 4:
            more = sock.recv(65536)
            if not more:
                raise EOFError
            data += more
        (size,) = HEADER.unpack_from(data)
        if len(data) == size + 4:
            return msgpack.unpackb(memoryview(data)[4:], strict_map_key=False)
        buf = bytearray(size)
        view = memoryview(buf)
        got = len(data) - 4
        view[:got] = memoryview(data)[4:]
        while got < size:
            n = sock.recv_into(view[got:])
            if not n:
                raise EOFError
            got += n
        return msgpack.unpackb(buf, strict_map_key=False)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def serve(mode: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Bind, print ``floor listening on HOST:PORT``, and serve until SIGTERM.

    Args:
        mode: ``"epoll"`` (one thread) or ``"thread"`` (a thread per connection).
        host: address to bind (default loopback).
        port: TCP port; 0 (the default) picks a free one.
    """
    listener = socket.create_server((host, port), backlog=1024)
    bound = listener.getsockname()
    server: _EpollServer | _ThreadServer
    server = _EpollServer(listener) if mode == "epoll" else _ThreadServer(listener)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"floor listening on {bound[0]}:{bound[1]}", flush=True)
    try:
        server.serve()
    except (SystemExit, KeyboardInterrupt):
        pass


def main() -> None:
    """``python -m bench.floor [--mode epoll|thread]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=["epoll", "thread"], default="epoll")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(args.mode, port=args.port)


if __name__ == "__main__":
    main()
