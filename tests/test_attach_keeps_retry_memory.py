"""Attaching to a container must not cost another client its retry memory.

kvclient used to send ``create`` (get-or-create, idempotent) without a request id; since the
runner derives request ids from kvproto.schema, where ``create`` mutates, every attach carries
one and takes a slot in the server's per-session answer memory (LRU, 65,536 sessions). Fresh
clients that only attach (kvctl invocations, short-lived workers) then evict the remembered
answer of a client whose retry is in flight, and the retried ``incr`` is applied twice.

The memory size is lowered to 4 here so that five attaching clients stand for 65,537.
"""

from __future__ import annotations

import secrets

import pytest

import kvclient
import kvserve.engine
import kvserve.server
from kvclient.connection import Connection


def test_attaching_clients_do_not_evict_a_pending_retry(
    server: kvserve.server.Server, authkey: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvserve.engine, "_MAX_SESSIONS", 4)
    address = server.endpoint
    with kvclient.connect(address, authkey) as kv:
        kv.dict("d")
    host, port = server.address
    conn = Connection((host, port), authkey, 5.0)
    try:
        request = ["d", "incr", ["n", 1, 0], None, [secrets.token_bytes(16), 1]]
        assert conn.call(list(request)) == 1
        for _ in range(5):  # clients that only attach
            with kvclient.connect(address, authkey) as other:
                other.dict("d")
        # The same request again, as a retry after a lost reply: answered, not re-applied.
        assert conn.call(list(request)) == 1
    finally:
        conn.close()
    with kvclient.connect(address, authkey) as kv:
        assert kv.dict("d")["n"] == 1
