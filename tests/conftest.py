"""Fixtures: real kvserve servers on port 0 (in a thread, or as a subprocess) and clients."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvclient
from kvserve import KVManager, Server


@pytest.fixture
def authkey() -> bytes:
    return secrets.token_hex(16).encode()


@pytest.fixture
def server(authkey: bytes) -> Iterator[Server]:
    """A real server in a thread of this process (fast to start)."""
    srv = KVManager(("127.0.0.1", 0), authkey=authkey).get_server()
    thread = threading.Thread(target=srv.serve_forever, name="kvserve", daemon=True)
    thread.start()
    yield srv
    srv.stop()
    assert srv.wait_stopped(10), "server loop did not stop"
    thread.join(10)


@pytest.fixture
def address(server: Server) -> str:
    return server.endpoint


@pytest.fixture
def kv(address: str, authkey: bytes) -> Iterator[kvclient.Client]:
    with kvclient.connect(address, authkey) as client:
        yield client


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str
    authkey: bytes
    env: dict[str, str]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def start_kvserve(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start `python -m kvserve --port 0 ...`; the caller reads the listening line."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvserve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_listening_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kvserve listening on "):
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"kvserve did not start: {line!r} {err}")
    return line.removeprefix("kvserve listening on ").strip()


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with a private HOME and no KV_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    env["HOME"] = str(tmp_path / "home")
    return env


@pytest.fixture
def kvserve_proc(clean_env: dict[str, str], authkey: bytes) -> Iterator[ServerProcess]:
    """A real `kvserve` subprocess on port 0, authkey passed by environment."""
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env)
    sp = ServerProcess(proc, read_listening_line(proc), authkey, env)
    yield sp
    sp.stop()
