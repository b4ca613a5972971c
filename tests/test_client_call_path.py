"""The blocking client's call path: settings reaching open connections, the fast request packer.

Against real kvserve processes; the fast packer against the reference encoding
(:func:`kvproto.wire.request` through :meth:`kvproto.codec.Codec.pack_request`) with
hypothesis, over a real socket to a peer that records each request's bytes.
"""

from __future__ import annotations

import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvclient
from kvclient.connection import Connection
from kvproto.codec import MAX_DEPTH, Codec, Ref
from kvproto.handshake import ServerHandshake
from kvproto.wire import RETURN_HEAD, request
from tests.conftest import ServerProcess
from tests.wire import recv_frame, send_frame

_NIL = RETURN_HEAD + b"\xc0"  # [RETURN, None]


class _Recorder:
    """A peer speaking the server's side of the handshake, then recording request payloads.

    Every request is answered ``[RETURN, None]``; :meth:`next_payload` hands them over in order.
    """

    def __init__(self, authkey: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.authkey = authkey
        self.payloads: list[bytes] = []
        self.got = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        with sock:
            handshake = ServerHandshake([self.authkey])
            send_frame(sock, handshake.challenge)
            while not handshake.ok:
                answer = handshake.answer(recv_frame(sock))
                if answer is not None:
                    send_frame(sock, answer)
            try:
                while True:
                    self.payloads.append(recv_frame(sock))
                    self.got.release()
                    send_frame(sock, _NIL)
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[Connection, _Recorder]]:
    authkey = secrets.token_bytes(32)
    recorder = _Recorder(authkey)
    conn = Connection(recorder.address, authkey, 10.0)
    yield conn, recorder
    conn.close()
    recorder.close()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # beyond 64 bits: the bigint ext
    | st.floats(allow_nan=False)  # nan != nan: compared by bytes anyway, but kept readable
    | st.text(max_size=40)  # with lone surrogates: refused by both encoders alike
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3)
        | st.builds(Ref, st.sampled_from(["dict", "list"]), st.text(min_size=1, max_size=8))
    ),
    max_leaves=20,
)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


_messages = st.tuples(
    st.none() | st.text(max_size=20),
    st.sampled_from(["__setitem__", "__getitem__", "incr", "append", "set_many"]),
    st.lists(
        _values
        | st.text(min_size=100, max_size=300)  # a payload over MAX_DEPTH bytes, scalar args
        | st.builds(_nested, st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3), st.text(max_size=130)),
        max_size=3,
    ),
    st.none() | st.dictionaries(st.text(max_size=5), _values, max_size=2),
    st.none() | st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages)
def test_the_fast_request_encoder_writes_the_reference_bytes(
    recorded: tuple[Connection, _Recorder], parts: tuple[Any, ...]
) -> None:
    conn, recorder = recorded
    ident, method, args, kwds, rid = parts
    message = request(ident, method, args, kwds, None if rid is None else list(rid))
    reference = Codec(encode_depth=MAX_DEPTH, decode_depth=None)
    try:
        expected = reference.pack_request(list(message))
    except TypeError:
        with pytest.raises(TypeError):
            conn.call(message)
        assert not conn.closed  # nothing was sent: the connection stays usable
        return
    assert conn.call(message) is None
    assert recorder.got.acquire(timeout=10)
    assert recorder.payloads.pop(0) == expected


def _stalled_call_seconds(kv: kvclient.Client, proc: ServerProcess) -> float:
    """Seconds until a GET to the stopped server fails (bounded: the test's timeout)."""
    d = kv.dict("d")
    proc.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(kvclient.KVConnectionError):
            d["k"]
        return time.monotonic() - start
    finally:
        proc.proc.send_signal(signal.SIGCONT)


def test_a_new_call_timeout_reaches_the_open_connection(kvserve_proc: ServerProcess) -> None:
    with kvclient.connect(
        kvserve_proc.address, kvserve_proc.authkey, call_timeout=8.0, retry=None
    ) as kv:
        kv.dict("d")["k"] = 1  # this thread's connection is open, with the 8 s timeout
        kv.call_timeout = 0.3  # was only read by connections opened after it
        assert kv.call_timeout == 0.3
        assert _stalled_call_seconds(kv, kvserve_proc) < 4


def test_a_new_call_timeout_reaches_other_threads_connections(
    kvserve_proc: ServerProcess,
) -> None:
    with kvclient.connect(
        kvserve_proc.address, kvserve_proc.authkey, call_timeout=8.0, retry=None
    ) as kv:
        d = kv.dict("d")
        opened = threading.Event()
        go = threading.Event()
        took: list[float] = []

        def worker() -> None:
            d["k"] = 1  # the worker's own connection, opened with the 8 s timeout
            opened.set()
            assert go.wait(20)
            start = time.monotonic()
            try:
                d["k"]
            except kvclient.KVConnectionError:
                took.append(time.monotonic() - start)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert opened.wait(20)
        kv.call_timeout = 0.3
        kvserve_proc.proc.send_signal(signal.SIGSTOP)
        try:
            go.set()
            thread.join(20)
        finally:
            kvserve_proc.proc.send_signal(signal.SIGCONT)
        assert not thread.is_alive()
        assert took and took[0] < 4
