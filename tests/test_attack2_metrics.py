"""attack2: the metrics endpoint (no authkey) must not starve the kvserve port."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

import kvclient
from tests.conftest import read_listening_line

pytestmark = pytest.mark.timeout(60)


def _metrics_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    for _ in range(20):
        line = proc.stderr.readline()
        if "metrics on " in line:
            return line.split("metrics on ", 1)[1].strip()
    raise AssertionError("no metrics line")


def test_attack2_idle_http_connections_to_metrics_do_not_lock_out_kvserve_clients(
    clean_env: dict[str, str], authkey: bytes
) -> None:
    """Idle connections to /metrics (no key needed) must not use up the server's descriptors.

    The kvserve port bounds unauthenticated connections (--max-pending 64, oldest closed); the
    metrics port accepts without limit, a thread and a descriptor each, never timed out.
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvserve", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=limit,
    )
    socks: list[socket.socket] = []
    try:
        address = read_listening_line(proc)
        url = urllib.parse.urlsplit(_metrics_url(proc))
        with kvclient.connect(address, authkey, retry=None) as kv:
            kv.dict("d")["k"] = 1
        for _ in range(100):  # bounded: at most 100 idle TCP connections, nothing sent
            try:
                socks.append(socket.create_connection((url.hostname, url.port), timeout=2))
            except TimeoutError:
                break  # the metrics listener stopped accepting: the process is out of fds
        time.sleep(0.5)
        started = time.monotonic()
        with kvclient.connect(address, authkey, retry=None, timeout=1.0, call_timeout=1.0) as kv:
            assert kv.dict("d")["k"] == 1
        assert time.monotonic() - started < 2.0
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.communicate(timeout=15)
