"""Clients ride through lost connections and restarts without wrong or doubled answers."""

from __future__ import annotations

import multiprocessing as mp
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvclient.retry import ConstantBackoff, Retry
from tests.aio_adapter import Connect
from tests.conftest import ServerProcess, read_listening_line, start_kvserve
from tests.workers import mixed_worker

# forkserver: one clean interpreter is started, then 32 children fork from it cheaply (spawn
# would start 32 interpreters; plain fork would copy this test process and its threads).
FORKSERVER = mp.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["kvclient", "tests.workers"])


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def _relay_frame(src: socket.socket, dst: socket.socket) -> bytes | None:
    header = _recv_exact(src, 4)
    if header is None:
        return None
    body = _recv_exact(src, struct.unpack(">I", header)[0])
    if body is None:
        return None
    dst.sendall(header + body)
    return body


class ChaosProxy:
    """A TCP proxy that swallows every `every`-th reply and drops the connection.

    The server has applied that call; the client only sees its connection die. Without
    request ids, the client's retry would apply the call a second time. ``every=0`` drops
    none; ``split_at=n`` delivers each reply after the handshake in two pieces, its first
    ``n`` bytes and, 20 ms later, the rest, as a proxy or a congested path may.
    """

    def __init__(self, target: tuple[str, int], every: int, split_at: int | None = None) -> None:
        self.target = target
        self.every = every
        self.split_at = split_at
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._count = 0
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.target)
        with client, server:
            handshake = ((server, client), (client, server), (client, server), (server, client))
            for src, dst in handshake:
                if _relay_frame(src, dst) is None:  # the handshake, untouched
                    return
            while True:
                header = _recv_exact(client, 4)
                if header is None:
                    return
                body = _recv_exact(client, struct.unpack(">I", header)[0])
                if body is None:
                    return
                server.sendall(header + body)
                reply_header = _recv_exact(server, 4)
                if reply_header is None:
                    return
                reply = _recv_exact(server, struct.unpack(">I", reply_header)[0])
                if reply is None:
                    return
                with self._lock:
                    self._count += 1
                    drop = self.every > 0 and self._count % self.every == 0
                    self.dropped += drop
                if drop:
                    return  # the applied call's reply is lost with the connection
                whole = reply_header + reply
                if self.split_at is not None:
                    client.sendall(whole[: self.split_at])
                    time.sleep(0.02)  # the client's first recv() gets the first piece only
                    whole = whole[self.split_at :]
                client.sendall(whole)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for t in self._threads:
            t.join(10)


@pytest.fixture
def chaos(server: Any) -> Iterator[ChaosProxy]:
    proxy = ChaosProxy(server.address, every=7)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("split_at", [1, 2, 3, 4, 5, 6, 9])
def test_a_reply_split_anywhere_is_read_whole(server: Any, authkey: bytes, split_at: int) -> None:
    """A reply's first recv() of 3 bytes was taken for a whole frame (ProtocolError)."""
    proxy = ChaosProxy(server.address, every=0, split_at=split_at)
    try:
        with kvclient.connect(proxy.address, authkey, retry=None) as kv:
            d = kv.dict(f"split{split_at}")
            d["s"] = "x" * 100
            assert d["s"] == "x" * 100
            assert d.incr("n") == 1
            assert d.get("missing") is None
            d["t"] = (1, 2)
            assert d["t"] == (1, 2)
            assert proxy._count >= 6
    finally:
        proxy.close()


def test_lost_replies_never_double_apply(chaos: ChaosProxy, authkey: bytes, kv: Any) -> None:
    errors: list[BaseException] = []
    fast = Retry(ConstantBackoff(0.001), retries=5)

    def work() -> None:
        try:
            with kvclient.connect(chaos.address, authkey, retry=fast) as c:
                d, lst, q = c.dict("d"), c.list("l"), c.queue("q")
                for i in range(100):
                    d.incr("n")
                    lst.append(i)
                    q.put(i)
                for _ in range(100):
                    q.get(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert chaos.dropped > 50  # many replies really were lost
    assert kv.dict("d")["n"] == 300
    assert Counter(kv.list("l").copy()) == Counter({i: 3 for i in range(100)})
    assert kv.queue("q").qsize() == 0  # 300 puts and 300 gets, each exactly once


def test_gives_up_after_the_retries_naming_address_and_attempts(
    connect: Connect,
    kvserve_proc: ServerProcess,
) -> None:
    kv = connect(
        kvserve_proc.address, kvserve_proc.authkey, retry=Retry(ConstantBackoff(0.01), retries=3)
    )
    with kv:
        d = kv.dict("d")
        d["x"] = 1
        kvserve_proc.stop()
        with pytest.raises(kvclient.KVConnectionError) as excinfo:
            d["x"] = 2
    message = str(excinfo.value)
    assert kvserve_proc.address in message
    assert "after 4 attempts" in message


def test_a_timed_out_call_never_hands_its_reply_to_the_next_call(
    connect: Connect,
    kvserve_proc: ServerProcess,
) -> None:
    """The stdlib bug: after an interrupted call, the next call read the previous reply."""
    with connect(kvserve_proc.address, kvserve_proc.authkey, call_timeout=0.3, retry=None) as kv:
        d = kv.dict("d")
        d["a"] = "A"
        d["b"] = "B"
        kvserve_proc.proc.send_signal(signal.SIGSTOP)  # the server stalls with our request
        try:
            with pytest.raises(kvclient.KVTimeoutError, match="timed out"):
                d["a"]
        finally:
            kvserve_proc.proc.send_signal(signal.SIGCONT)
        # The server now answers "A" to the abandoned call; it must not reach this one.
        assert d["b"] == "B"
        assert d["a"] == "A"


def test_interrupt_mid_call_discards_the_connection(kv: kvclient.Client) -> None:
    q = kv.queue("q")
    d = kv.dict("d")
    d["k"] = "value"
    fired = threading.Event()

    def interrupt() -> None:
        time.sleep(0.3)
        fired.set()
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: install the default handler, or Ctrl-C never arrives and the get times out.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt):
            q.get(timeout=30)  # blocked when Ctrl-C arrives
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fired.is_set()
    q2 = kv.queue("q")
    q2.put("item")  # the abandoned get must not take this item...
    assert d["k"] == "value"  # ...nor answer this call
    assert q2.get(timeout=5) == "item"


def test_sigterm_wakes_blocked_getters_with_a_clear_error(kvserve_proc: ServerProcess) -> None:
    with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey, retry=None) as kv:
        q = kv.queue("q")
        result: list[BaseException] = []

        def get() -> None:
            try:
                q.get(timeout=60)
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=get)
        t.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert kvserve_proc.stop() == 0
        t.join(30)
        assert time.monotonic() - start < 20
    assert len(result) == 1
    assert isinstance(result[0], kvclient.KVConnectionError)
    assert "shutting down" in str(result[0])


@pytest.mark.parametrize("restart", [False, True], ids=["steady", "restart-midway"])
def test_32_processes_mixed_workload_exact_totals(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path, restart: bool
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    data = ["--data-dir", str(tmp_path / "data")]
    proc = start_kvserve(env, *data)
    address = read_listening_line(proc)
    n_procs, n_ops = 32, 40
    go = FORKSERVER.Event()
    workers = [
        FORKSERVER.Process(target=mixed_worker, args=(address, authkey, w, n_ops, go))
        for w in range(n_procs)
    ]
    try:
        for w in workers:
            w.start()
        with kvclient.connect(address, authkey) as kv:
            # Everyone connected first: connect() fails fast by design, so a worker still
            # starting when the server is killed would fail without it meaning anything.
            deadline = time.monotonic() + 60
            while kv.dict("ready").get("n", 0) < n_procs:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        go.set()
        if restart:
            with kvclient.connect(address, authkey) as kv:
                deadline = time.monotonic() + 60
                while kv.dict("mix").get("total", 0) < n_procs * n_ops // 4:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            proc = start_kvserve(env, *data, "--port", address.rsplit(":", 1)[1])
            read_listening_line(proc)
        for w in workers:
            w.join(120)
            assert w.exitcode == 0
        with kvclient.connect(address, authkey) as kv:
            assert kv.dict("mix")["total"] == n_procs * n_ops
            appended = kv.list("appended").copy()
            expected = {(w, i) for w in range(n_procs) for i in range(n_ops)}
            assert sorted(map(tuple, appended)) == sorted(expected)
            got = kv.list("got").copy()
            assert sorted(map(tuple, got)) == sorted(expected)  # each item consumed once
            assert kv.queue("work").qsize() == 0
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        proc.terminate()
        proc.communicate(timeout=30)
