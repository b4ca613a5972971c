"""Hostile and careless clients, organised by the property each test proves (issue 12).

Every test runs against a real ``kvserve`` subprocess (so a crash, a segfault or a stall is
seen as what it is), on loopback, bounded in time, and ends by asserting the common property:
the server process is alive, a probe client on a fresh connection is answered within 1 s, and
the data seeded before the attack is intact. The attacker is asserted to get the documented
error. Properties:

- ``test_numbers_*``: every number from the wire is validated before use; the loop's own waits
  are clamped; timers of answered waiters are removed.
- ``test_decoding_*``: decoding is linear and depth-bounded by what the encoder can re-encode;
  nothing a client can store crashes a later read, dump or compaction.
- ``test_memory_*``: each connection's memory is bounded (unsent replies, partial frames,
  parked calls); idle means no complete request.
- ``test_connections_*``: unauthenticated connections cannot lock keyed clients out.
- ``test_errors_*``: a request that fails on the server is answered, whatever its size.
- ``test_readonly_*``: the read-only key creates nothing, changes nothing, logs nothing and
  cannot touch other sessions' retry state.
- ``test_log_*``: memory and the log never disagree (a call that raises halfway, drop order).
"""

from __future__ import annotations

import math
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

import kvclient
from kvclient.codec import Codec
from tests.conftest import read_listening_line, start_kvserve
from tests.wire import authed_connection, recv_frame, send_frame

PROBE_SECONDS = 1.0
pytestmark = pytest.mark.timeout(60)


@dataclass
class Target:
    """A kvserve subprocess under attack, with a full key and a read-only key."""

    proc: subprocess.Popen[str]
    address: str
    authkey: bytes
    readonly_key: bytes
    data_dir: Path | None
    env: dict[str, str]
    args: tuple[str, ...] = ()
    seeded: dict[str, Any] = field(default_factory=lambda: {"a": 1, "t": (1, "x"), "b": b"\0"})

    def client(self, *, readonly: bool = False, **kwds: Any) -> kvclient.Client:
        kwds.setdefault("retry", None)
        key = self.readonly_key if readonly else self.authkey
        return kvclient.connect(self.address, key, **kwds)

    def seed(self) -> None:
        with self.client() as kv:
            kv.dict("precious").update(self.seeded)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def assert_serving(self) -> None:
        """The common property: alive, a fresh client answered within 1 s, data intact."""
        assert self.proc.poll() is None, f"kvserve died: {self.stderr_tail()}"
        started = time.monotonic()
        with self.client(timeout=PROBE_SECONDS, call_timeout=PROBE_SECONDS) as probe:
            probe.ping()
            assert probe.dict("precious").copy() == self.seeded
        assert time.monotonic() - started < PROBE_SECONDS * 2

    def stderr_tail(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-2000:]

    def restart(self) -> None:
        """Stop cleanly (SIGTERM) and start again on a new port with the same data dir."""
        self.stop()
        self.proc = start_kvserve(self.env, *self.args)
        self.address = read_listening_line(self.proc)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(15)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def make_target(
    clean_env: dict[str, str], tmp_path: Path, authkey: bytes
) -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def make(*args: str, data: bool = False) -> Target:
        ro = tmp_path / f"ro-{len(started)}"
        ro_key = secrets.token_hex(16).encode()
        ro.write_bytes(ro_key)
        ro.chmod(0o600)
        extra = ["--readonly-authkey-file", str(ro), *args]
        data_dir = None
        if data:
            data_dir = tmp_path / f"data-{len(started)}"
            extra += ["--data-dir", str(data_dir)]
        env = dict(clean_env, KV_AUTHKEY=authkey.decode())
        proc = start_kvserve(env, *extra)
        target = Target(
            proc, read_listening_line(proc), authkey, ro_key, data_dir, env, tuple(extra)
        )
        started.append(target)
        target.seed()
        return target

    yield make
    for target in started:
        if target.proc.poll() is None:
            target.stop()


@pytest.fixture
def target(make_target: Callable[..., Target]) -> Target:
    return make_target()


def _request(sock: Any, message: list[Any], codec: Codec | None = None) -> list[Any]:
    codec = codec or Codec()
    send_frame(sock, msgpack.packb(message, use_bin_type=True))
    reply: list[Any] = codec.unpack(recv_frame(sock))
    return reply


# -- numbers from the wire ------------------------------------------------------------------

BAD_TIMEOUTS = [1e9, math.inf, -math.inf, math.nan, -1.0, 1e300]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_numbers_bad_timeouts_are_refused_and_the_loop_keeps_its_timers(
    target: Target, timeout: float
) -> None:
    with target.client() as kv:
        q, lock = kv.queue("q"), kv.lock("l")
        kv.event("e")
        with pytest.raises(ValueError, match="timeout"):
            q.get(timeout=timeout)
        if math.isnan(timeout) or timeout not in (math.inf, -1):  # as threading
            with pytest.raises(ValueError, match="timeout"):
                lock.acquire(timeout=timeout)
    # The read-only key reached this crash too. (Sync proxies read inf as "for ever" and a
    # negative timeout as "do not wait", as threading does.)
    if math.isnan(timeout) or 1e8 < timeout < math.inf:
        with target.client(readonly=True) as ro, pytest.raises(ValueError, match="timeout"):
            ro.event("e").wait(timeout=timeout)
    # Timers still fire on time: a nan in the heap used to freeze them all.
    with target.client() as kv:
        started = time.monotonic()
        with pytest.raises(queue.Empty):
            kv.queue("q").get(timeout=0.2)
        assert 0.15 < time.monotonic() - started < 1.5
    target.assert_serving()


def test_numbers_bad_timeouts_sent_raw_are_refused(target: Target) -> None:
    """Bypassing the client: the server itself validates what arrives."""
    with target.client() as kv:
        kv.queue("rawq")
        kv.lock("rawl")
    sock = authed_connection(target.address, target.authkey)
    with sock:
        for timeout in (math.nan, math.inf, 1e12, "5", True):
            kind, value = _request(sock, ["rawq", "get", [True, timeout], None])
            assert kind == "#ERROR", (timeout, value)
            assert isinstance(value, TypeError | ValueError), value
            kind, value = _request(sock, ["rawl", "acquire", [b"me", True, timeout, 5.0], None])
            assert kind == "#ERROR", (timeout, value)
        for lease in (math.nan, math.inf, 0, -1, 1e9):
            kind, value = _request(sock, ["rawl", "acquire", [b"me", True, 1.0, lease], None])
            assert kind == "#ERROR" and isinstance(value, ValueError), (lease, value)
    target.assert_serving()


def test_numbers_answered_long_waits_leave_nothing_behind(target: Target) -> None:
    """Each answered get(timeout=1e6) used to keep its timer (and request) for 11 days."""
    rounds = 3000
    got = threading.Semaphore(0)
    with target.client() as kv, target.client() as worker:
        q, wq = kv.queue("long"), worker.queue("long")

        def consume() -> None:
            for _ in range(rounds + 100):
                wq.get(timeout=1e6)  # parked: the producer waits until we are back here
                got.release()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        for _ in range(100):  # warm up allocator arenas before measuring
            q.put(1)
            assert got.acquire(timeout=10)
        before = target.rss_kib()
        for _ in range(rounds):
            time.sleep(0.0005)  # let the consumer's next get arrive and park first
            q.put("x" * 200)
            assert got.acquire(timeout=10)
        thread.join(10)
        grown = target.rss_kib() - before
    print(f"rss grew {grown} KiB over {rounds} answered parked gets")
    assert grown < 2048, f"server grew {grown} KiB for {rounds} answered waits"
    target.assert_serving()
