"""attack2: a chain of parked calls woken one by another must not overflow the stack."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from tests.test_faults_wire import Target, make_target  # noqa: F401
from tests.wire import authed_connection, recv_frame

pytestmark = pytest.mark.timeout(90)
CHAIN = 300  # bounded; under --max-connections


def _frame(message: list[Any]) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


def test_attack2_a_chain_of_woken_parked_calls_answers_every_call_exactly_once(
    make_target: Callable[..., Target],  # noqa: F811
) -> None:
    target = make_target()
    with target.client() as kv:
        for i in range(CHAIN + 1):
            kv.queue(f"q{i}")
    socks = []
    for i in range(CHAIN):
        sock = authed_connection(target.address, target.authkey)
        token = b"chain-%d" % i
        # Connection i waits on q{i}; behind it waits a put into q{i+1}, which wakes i+1.
        sock.sendall(
            _frame([f"q{i}", "get", [True, None], None, [token, 1]])
            + _frame([f"q{i + 1}", "put", [i, True, None], None, [token, 2]])
        )
        socks.append(sock)
    time.sleep(0.5)
    with target.client() as kv:
        kv.queue("q0").put("go")
    codec_replies = []
    for sock in socks:
        sock.settimeout(20)
        codec_replies.append([msgpack.unpackb(recv_frame(sock)) for _ in range(2)])
        sock.close()
    for i, (got, put) in enumerate(codec_replies):
        assert got == ["#RETURN", "go" if i == 0 else i - 1], (i, got)
        assert put == ["#RETURN", None], (i, put)
    with target.client() as kv:
        last = kv.queue(f"q{CHAIN}")
        assert last.qsize() == 1 and last.get(timeout=1) == CHAIN - 1
        assert all(kv.queue(f"q{i}").qsize() == 0 for i in range(CHAIN))
    target.assert_serving()
