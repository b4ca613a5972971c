"""`kvserve` as a user runs it: a real subprocess, its one stdout line, its authkey file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvclient
from tests.conftest import ServerProcess, read_listening_line, start_kvserve


def test_prints_exactly_one_listening_line_and_serves(kvserve_proc: ServerProcess) -> None:
    host, port = kvserve_proc.address.rsplit(":", 1)
    assert host == "127.0.0.1"  # loopback by default
    assert int(port) > 0
    with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey) as kv:
        kv.dict("d")["k"] = "v"
        assert kv.dict("d")["k"] == "v"
    assert kvserve_proc.stop() == 0
    assert kvserve_proc.proc.stdout is not None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_exit_cleanly(clean_env: dict[str, str], authkey: bytes, signum: int) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env)
    read_listening_line(proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out == ""  # nothing after the listening line
    assert "Traceback" not in err
    assert "shutting down" in err


def test_creates_default_authkey_file_and_a_client_uses_it(clean_env: dict[str, str]) -> None:
    proc = start_kvserve(clean_env)
    try:
        address = read_listening_line(proc)
        keyfile = Path(clean_env["HOME"]) / ".config" / "kvmanager" / "authkey"
        assert keyfile.exists()
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(keyfile.parent.stat().st_mode) == 0o700
        assert len(keyfile.read_bytes()) == 32
        # A client process on the same host, no configuration at all.
        code = (
            f"import kvclient; kv = kvclient.connect({address!r}); kv.dict('d')['x'] = 1; "
            "print(kv.dict('d')['x']); kv.close()"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=clean_env, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    key = keyfile.read_bytes()
    assert key.hex() not in err
    assert "authkey from" in err


def test_authkey_file_option_and_key_never_logged(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"a-file-key-of-some-length\n")  # a trailing newline is ignored
    keyfile.chmod(0o600)
    proc = start_kvserve(clean_env, "--authkey-file", str(keyfile), "--log-level", "debug")
    try:
        address = read_listening_line(proc)
        with pytest.raises(kvclient.AuthError):
            kvclient.connect(address, b"wrong-but-long-enough")
        with kvclient.connect(address, b"a-file-key-of-some-length") as kv:
            kv.ping()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "a-file-key-of-some-length" not in err
    assert "wrong" not in err.replace("wrong authkey", "")
    assert err.count("rejected") == 1


def test_missing_authkey_file_is_a_clear_error(clean_env: dict[str, str], tmp_path: Path) -> None:
    proc = start_kvserve(clean_env, "--authkey-file", str(tmp_path / "nope"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == ""
    assert "does not exist" in err
    assert "Traceback" not in err


def test_port_in_use_is_a_clear_error(
    kvserve_proc: ServerProcess, clean_env: dict[str, str]
) -> None:
    port = kvserve_proc.address.rsplit(":", 1)[1]
    env = dict(clean_env, KV_AUTHKEY="k" * 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvserve", "--port", port],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_help_teaches(clean_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvserve", "--help"],
        env=dict(clean_env, COLUMNS="120"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    for needle in ("--host", "--port", "--authkey-file", "--log-level", "0.0.0.0", "authkey"):
        assert needle in out.stdout


def test_ipv6_loopback(clean_env: dict[str, str], authkey: bytes) -> None:
    if not _has_ipv6():
        pytest.skip("IPv6 loopback is not available on this machine")
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env, "--host", "::1")
    try:
        address = read_listening_line(proc)
        assert address.startswith("[::1]:")
        with kvclient.connect(address, authkey) as kv:
            kv.dict("v6")["k"] = 6
            assert kv.dict("v6")["k"] == 6
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _has_ipv6() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_env_address_and_authkey_are_defaults(kvserve_proc: ServerProcess) -> None:
    env = dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)
    code = "import kvclient; kv = kvclient.connect(); kv.ping(); print(kv.endpoint); kv.close()"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kvserve_proc.address
    assert os.environ.get("KV_ADDRESS") != kvserve_proc.address


def _cpu_seconds(pid: int) -> float:
    """The process's on-CPU time, all threads (schedstat: exact, not 10 ms ticks)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9


def test_busy_poll_serves_and_backs_off(clean_env: dict[str, str], authkey: bytes) -> None:
    # 2 ms of polling per request would be obvious: a server that polled after every request
    # of a client pausing 5 ms would spend ~0.2 s of CPU on 100 requests, an idle one would
    # poll forever. Backing off, it spends a few polls on the paced client and none idle.
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env, "--busy-poll-us", "2000")
    try:
        address = read_listening_line(proc)
        with kvclient.connect(address, authkey) as kv:
            d = kv.dict("d")
            for i in range(300):  # back to back: the polls find the next request
                d[i] = str(i)
            assert [d[i] for i in range(300)] == [str(i) for i in range(300)]
            before = _cpu_seconds(proc.pid)
            for i in range(100):
                time.sleep(0.005)
                assert d[i] == str(i)
            paced = _cpu_seconds(proc.pid) - before
            before = _cpu_seconds(proc.pid)
            time.sleep(1.0)
            idle = _cpu_seconds(proc.pid) - before
        assert paced < 0.1, f"{paced:.3f} s of server CPU for 100 paced requests"
        assert idle < 0.05, f"{idle:.3f} s of server CPU in 1 s idle"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("value", ["-1", "10001", "nan"])
def test_busy_poll_out_of_range_is_refused(clean_env: dict[str, str], value: str) -> None:
    proc = start_kvserve(dict(clean_env, KV_AUTHKEY="k" * 20), "--busy-poll-us", value)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "--busy-poll-us" in err
    assert "Traceback" not in err
