"""Raw wire helpers for tests that speak the protocol by hand (hostile and fault tests)."""

from __future__ import annotations

import socket
import struct

from kvproto.address import parse_address
from kvproto.handshake import client_response, client_verify_welcome
from kvproto.wire import HELLO


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    return _recv_exact(sock, size)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the server closes the connection (reads drain to EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def raw_connection(address: str, hello: bool = True) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hello:
        send_frame(sock, HELLO)
    return sock


def authed_connection(address: str, authkey: bytes) -> socket.socket:
    sock = raw_connection(address)
    challenge = recv_frame(sock)
    response, nonce_c = client_response(authkey, challenge)
    send_frame(sock, response)
    client_verify_welcome(authkey, recv_frame(sock), challenge, nonce_c)
    return sock
