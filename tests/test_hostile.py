"""Bad input from the network: each closes (at most) its own connection; data stays intact."""

from __future__ import annotations

import os
import pickle  # only to build the hostile payload; the shipped packages never import it
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

import kvclient
from kvproto.codec import Codec
from kvproto.handshake import client_response, client_verify_welcome
from kvproto.wire import HELLO
from kvserve import Server
from tests.wire import authed_connection, closed_by_peer, raw_connection, recv_frame, send_frame


@pytest.fixture
def seeded(kv: kvclient.Client) -> kvclient.DictProxy:
    d = kv.dict("precious")
    d.update({"a": 1, "b": [1, 2, 3]})
    return d


def assert_intact(address: str, authkey: bytes) -> None:
    """A fresh client is served, and the seeded data is unchanged."""
    with kvclient.connect(address, authkey) as other:
        assert other.dict("precious").copy() == {"a": 1, "b": [1, 2, 3]}


def test_wrong_authkey_is_auth_error_and_server_keeps_serving(
    address: str, authkey: bytes, seeded: kvclient.DictProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(kvclient.AuthError, match="rejected the authkey"):
        kvclient.connect(address, b"not-the-right-key")
    assert_intact(address, authkey)
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1
    assert "wrong authkey" in rejected[0].getMessage()
    assert authkey.decode() not in caplog.text
    assert "not-the-right-key" not in caplog.text


def test_client_rejects_a_server_that_cannot_prove_the_key(authkey: bytes) -> None:
    """A fake server that sends a challenge and then a forged WELCOME must not be trusted."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    import threading

    def fake_server() -> None:
        conn, _ = listener.accept()
        with conn:
            send_frame(conn, b"#KV-CHALLENGE#" + os.urandom(32))
            assert recv_frame(conn) == HELLO
            recv_frame(conn)  # the client's answer, which a fake server cannot check
            send_frame(conn, b"#KV-WELCOME#" + os.urandom(32) + b"\x00\x01")
            conn.recv(1)

    thread = threading.Thread(target=fake_server)
    thread.start()
    try:
        with pytest.raises(kvclient.AuthError, match="could not prove"):
            kvclient.connect(f"127.0.0.1:{port}", authkey)
    finally:
        thread.join(10)
        listener.close()


def test_wire_version_mismatch_is_a_protocol_error(
    address: str, authkey: bytes, seeded: kvclient.DictProxy
) -> None:
    sock = raw_connection(address)
    with sock:
        challenge = recv_frame(sock)
        response, nonce_c = client_response(authkey, challenge)
        send_frame(sock, response[:-2] + b"\x00\x63")  # claim wire version 99
        with pytest.raises(kvclient.ProtocolError, match="server speaks 1"):
            client_verify_welcome(authkey, recv_frame(sock), challenge, nonce_c)
        assert closed_by_peer(sock)
    assert_intact(address, authkey)


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("stage", ["before-auth", "after-auth"])
def test_pickle_payload_is_never_unpickled(
    address: str, authkey: bytes, seeded: kvclient.DictProxy, tmp_path: Path, stage: str
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps((None, "__setitem__", ("a", _Marker(str(marker))), {}))
    # Check the payload really is dangerous, or this test could not fail.
    pickle.loads(payload)[2][1].close()
    assert marker.exists()
    marker.unlink()

    if stage == "before-auth":
        sock = raw_connection(address)
        recv_frame(sock)  # the challenge
    else:
        sock = authed_connection(address, authkey)
    with sock:
        send_frame(sock, payload)
        if stage == "after-auth":
            reply = msgpack.unpackb(recv_frame(sock), raw=False, strict_map_key=False)
            assert reply[0] == "#ERROR"
        assert closed_by_peer(sock)
    assert not marker.exists()
    assert_intact(address, authkey)


@pytest.mark.parametrize("stage", ["before-auth", "after-auth"])
@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # looks like a huge length prefix
        b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",  # a frame of garbage
        # Random bytes behind a length prefix over every limit. (Wholly random bytes can
        # happen to form a valid frame, which gets an answer instead: see the fuzz test.)
        b"\xfe" + os.urandom(63),
    ],
    ids=["http", "garbage-frame", "random"],
)
def test_garbage_bytes_close_only_that_connection(
    address: str, authkey: bytes, seeded: kvclient.DictProxy, junk: bytes, stage: str
) -> None:
    with kvclient.connect(address, authkey) as bystander:
        d = bystander.dict("precious")
        sock = (
            authed_connection(address, authkey)
            if stage == "after-auth"
            else raw_connection(address)
        )
        with sock:
            sock.sendall(junk)
            assert closed_by_peer(sock)
        assert d["a"] == 1  # an already connected client is unaffected
    assert_intact(address, authkey)


def test_huge_length_prefix_closes_before_allocating(
    address: str, authkey: bytes, seeded: kvclient.DictProxy, server: Server
) -> None:
    sock = authed_connection(address, authkey)
    with sock:
        sock.sendall(struct.pack(">I", 0xFFFFFFF0))  # ~4 GiB announced
        assert closed_by_peer(sock)
    small = raw_connection(address)  # before auth the limit is tiny
    with small:
        recv_frame(small)
        small.sendall(struct.pack(">I", 10_000))
        assert closed_by_peer(small)
    assert_intact(address, authkey)


def test_oversized_frame_from_an_authenticated_client(
    authkey: bytes, seeded: kvclient.DictProxy, server: Server
) -> None:
    server.max_frame = 1024
    with kvclient.connect(server.endpoint, authkey, retry=None) as kv:
        with pytest.raises(kvclient.KVConnectionError):
            kv.dict("precious")["big"] = "x" * 4096
        assert kv.dict("precious")["a"] == 1  # the next call reconnects
    assert_intact(server.endpoint, authkey)


def test_truncated_frame_then_disconnect(
    address: str, authkey: bytes, seeded: kvclient.DictProxy
) -> None:
    sock = authed_connection(address, authkey)
    frame = msgpack.packb(["precious", "__setitem__", ["a", "changed"], None])
    sock.sendall(struct.pack(">I", len(frame)) + frame[:-3])  # three bytes short
    sock.close()
    assert_intact(address, authkey)


def test_truncated_handshake_then_disconnect(address: str, authkey: bytes) -> None:
    sock = raw_connection(address)
    recv_frame(sock)
    sock.sendall(struct.pack(">I", 66) + b"\x00" * 10)
    sock.close()
    assert_intact_empty = kvclient.connect(address, authkey)
    assert_intact_empty.ping()
    assert_intact_empty.close()


@pytest.mark.parametrize(
    "message",
    [
        [1, 2, 3],
        "hello",
        {"a": 1},
        ["precious", "__setitem__", "not-a-list", None],
        ["precious", "__setitem__", ["a", 2], "not-a-map"],
        [["unhashable"], "get", [], None],
        ["precious", 42, [], None],
        [None, "shutdown", [], None],
        [None, "batch", ["not-a-list"], None],
        [None, "batch", [[[1, 2]]], None],
    ],
    ids=str,
)
def test_valid_frame_with_wrong_message_shape_gets_an_error_reply(
    address: str, authkey: bytes, seeded: kvclient.DictProxy, message: Any
) -> None:
    sock = authed_connection(address, authkey)
    with sock:
        send_frame(sock, msgpack.packb(message))
        kind, value = Codec().unpack(recv_frame(sock))
        is_batch = isinstance(message, list) and message[:2] == [None, "batch"]
        if is_batch and type(message[2][0]) is list:
            assert kind == "#RETURN"
            assert value[0][0] == "#ERROR"
        else:
            assert kind == "#ERROR", value
            assert isinstance(value, Exception)
        # The connection is still usable for a well-formed request.
        send_frame(sock, msgpack.packb(["precious", "__getitem__", ["a"], None]))
        assert msgpack.unpackb(recv_frame(sock)) == ["#RETURN", 1]
    assert_intact(address, authkey)


def test_replayed_handshake_is_rejected(
    address: str, authkey: bytes, seeded: kvclient.DictProxy
) -> None:
    first = raw_connection(address)
    with first:
        challenge = recv_frame(first)
        response, _ = client_response(authkey, challenge)
        send_frame(first, response)
        recv_frame(first)
    second = raw_connection(address)
    with second:
        recv_frame(second)  # a fresh challenge; the captured response answers the old one
        send_frame(second, response)
        assert recv_frame(second) == b"#KV-FAILURE#"
        assert closed_by_peer(second)
    assert_intact(address, authkey)


def test_silent_connection_is_closed_after_the_handshake_timeout(
    authkey: bytes, seeded: kvclient.DictProxy, server: Server
) -> None:
    server.handshake_timeout = 0.3
    sock = raw_connection(server.endpoint)
    with sock:
        recv_frame(sock)
        assert closed_by_peer(sock, timeout=10)
    assert_intact(server.endpoint, authkey)


def test_unreachable_server_names_address_and_hint(authkey: bytes) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(
        kvclient.KVConnectionError, match=rf"127\.0\.0\.1:{port}.*is kvserve running"
    ):
        kvclient.connect(f"127.0.0.1:{port}", authkey)


def test_connecting_to_something_that_is_not_kvserve(authkey: bytes) -> None:
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def http_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=http_server)
    thread.start()
    try:
        with pytest.raises(kvclient.ProtocolError):
            kvclient.connect(f"127.0.0.1:{port}", authkey, timeout=5)
    finally:
        thread.join(10)
        listener.close()
