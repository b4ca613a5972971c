"""Socket options both ends set on a TCP connection, and how an endpoint is written.

Setting options is not I/O on the stream: no byte is read or written here.
"""

from __future__ import annotations

import socket
from typing import Final

__all__ = ["format_address", "tune_socket"]

_KEEPALIVE: Final = (
    ("TCP_KEEPIDLE", 10),
    ("TCP_KEEPINTVL", 5),
    ("TCP_KEEPCNT", 4),
    ("TCP_USER_TIMEOUT", 30_000),  # milliseconds
)


def tune_socket(sock: socket.socket) -> None:
    """Set TCP_NODELAY and dead-peer detection on a connected TCP socket (both ends use this).

    Nagle's algorithm would hold a request behind the previous one's ACK (the stdlib's 40 ms
    stall). Keepalive probes after 10 s of silence and TCP_USER_TIMEOUT on unacknowledged
    data (Linux) turn a peer that vanished behind a cut link into an error within about 30 s,
    even in a call that is allowed to wait for ever (a queue get with no timeout).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
