"""Operations: --metrics scraped over HTTP, --slow-ms with kvctl slowlog, --log-format json,
kvctl compact --wait. Real servers (threads and kvserve subprocesses), real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvclient
from kvserve.manager import KVManager
from kvserve.persistence import Persistence
from kvserve.server import Server
from tests.conftest import ServerProcess, read_listening_line, start_kvserve


def _serve(authkey: bytes, **options: Any) -> Server:
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, **options).get_server()
    threading.Thread(target=srv.serve_forever, name="kvserve", daemon=True).start()
    return srv


@pytest.fixture
def metered(authkey: bytes) -> Iterator[Server]:
    """A server in a thread with metrics on a free loopback port."""
    srv = _serve(authkey, metrics=("127.0.0.1", 0))
    yield srv
    srv.stop()
    assert srv.wait_stopped(10)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of ``url`` as ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(
    url: str, ready: Callable[[dict[tuple[str, tuple[tuple[str, str], ...]], float]], bool]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until ``ready`` holds (5 s at most): a request is counted once its reply is out,
    so a client can scrape before the server thread has counted the call it just answered."""
    deadline = time.monotonic() + 5
    samples = scrape(url)
    while not ready(samples) and time.monotonic() < deadline:
        time.sleep(0.02)
        samples = scrape(url)
    return samples


def test_counters_move_as_requests_are_made(metered: Server, authkey: bytes) -> None:
    url = metered.metrics_endpoint
    assert url is not None and url.startswith("http://127.0.0.1:")
    setitem = {"kind": "dict", "op": "__setitem__"}
    with kvclient.connect(metered.endpoint, authkey) as kv:
        d = kv.dict("users")
        d["warm"] = 0  # the pair exists before the first scrape
        before = scrape_until(url, lambda s: sample(s, "kvserve_requests_total", **setitem) >= 1)
        for i in range(3):
            d[f"k{i}"] = i
        with pytest.raises(KeyError):
            d["missing"]
        done = sample(before, "kvserve_requests_total", **setitem) + 3
        after = scrape_until(
            url,
            lambda s: (
                sample(s, "kvserve_requests_total", **setitem) >= done
                and sample(s, "kvserve_errors_total", type="KeyError") >= 1
            ),
        )
        assert (
            sample(after, "kvserve_requests_total", **setitem)
            - sample(before, "kvserve_requests_total", **setitem)
            == 3
        )
        assert sample(after, "kvserve_request_duration_seconds_count", **setitem) == sample(
            after, "kvserve_requests_total", **setitem
        )
        assert sample(after, "kvserve_request_duration_seconds_sum", **setitem) > 0
        assert (
            sample(after, "kvserve_errors_total", type="KeyError")
            - sample(before, "kvserve_errors_total", type="KeyError")
            == 1
        )
        assert sample(after, "kvserve_received_bytes_total") > sample(
            before, "kvserve_received_bytes_total"
        )
        assert sample(after, "kvserve_sent_bytes_total") > sample(
            before, "kvserve_sent_bytes_total"
        )
        assert sample(after, "kvserve_connections", state="authenticated") == 1
        assert sample(after, "kvserve_containers", kind="dict") == 1
        assert sample(after, "kvserve_items", kind="dict") == 4
        assert sample(after, "kvserve_operations_total") >= 5
    # Labels hold kinds and operations, never the container's name or a key.
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert "users" not in text and "k1" not in text and "missing" not in text


def test_parked_calls_and_lease_expiries(metered: Server, authkey: bytes) -> None:
    url = metered.metrics_endpoint
    assert url is not None
    with kvclient.connect(metered.endpoint, authkey) as kv:
        q = kv.queue("jobs")
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
        waiter.start()
        deadline = time.monotonic() + 10
        while sample(scrape(url), "kvserve_parked_calls") != 1:  # bounded by the deadline
            assert time.monotonic() < deadline, "the get never parked"
            time.sleep(0.02)
        q.put("job")
        waiter.join(20)
        assert got == ["job"]
        assert sample(scrape(url), "kvserve_parked_calls") == 0


def test_lease_expiries_are_counted(metered: Server, authkey: bytes) -> None:
    url = metered.metrics_endpoint
    assert url is not None
    # A client process holds a lock with a 1 s lease and is killed: its lease runs out.
    code = (
        "import sys, time, kvclient\n"
        f"kv = kvclient.connect({metered.endpoint!r}, {authkey!r})\n"
        "kv.lock('job', lease=1.0).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    deadline = time.monotonic() + 15
    while sample(scrape(url), "kvserve_lease_expiries_total") < 1:  # bounded by the deadline
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.1)


def test_each_server_has_its_own_registry(metered: Server, authkey: bytes) -> None:
    other = _serve(authkey, metrics=("127.0.0.1", 0))
    try:
        assert other.metrics_endpoint != metered.metrics_endpoint
        with kvclient.connect(other.endpoint, authkey) as kv:
            kv.dict("d")["x"] = 1
        mine, theirs = metered.metrics_endpoint, other.metrics_endpoint
        assert mine is not None and theirs is not None
        key = {"kind": "dict", "op": "__setitem__"}
        assert sample(scrape(theirs), "kvserve_requests_total", **key) == 1
        assert sample(scrape(mine), "kvserve_requests_total", **key) == 0
    finally:
        other.stop()
        assert other.wait_stopped(10)
    # Stopping the server stops its metrics endpoint too.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(theirs, timeout=5)


def test_persistence_series(tmp_path: Path, authkey: bytes) -> None:
    srv = _serve(
        authkey, metrics=("127.0.0.1", 0), persistence=Persistence(tmp_path / "data", "always")
    )
    try:
        url = srv.metrics_endpoint
        assert url is not None
        with kvclient.connect(srv.endpoint, authkey) as kv:
            kv.dict("d")["x"] = 1
            before = scrape(url)
            assert sample(before, "kvserve_fsync_duration_seconds_count") >= 1
            assert sample(before, "kvserve_log_bytes") > 0
            assert kv.compact()
            srv.engine.persist.wait_compaction(10)  # type: ignore[union-attr]
        after = scrape(url)
        assert (
            sample(after, "kvserve_compactions_total")
            == sample(before, "kvserve_compactions_total") + 1
        )
        assert sample(after, "kvserve_compacting") == 0
    finally:
        srv.stop()
        assert srv.wait_stopped(10)


def test_no_metrics_endpoint_by_default(server: Server) -> None:
    assert server.metrics_address is None and server.metrics_endpoint is None


def test_slowlog_through_the_engine_keeps_names_not_values(authkey: bytes) -> None:
    srv = _serve(authkey, slow_ms=0)
    try:
        with kvclient.connect(srv.endpoint, authkey) as kv:
            kv.dict("accounts")["alice"] = "s3cret-value"
            found = kv.call(None, None, "slowlog", [])
        assert found["slow_ms"] == 0
        ops = [(e["kind"], e["op"], e["name"]) for e in found["entries"]]
        assert ops[:2] == [("dict", "__setitem__", "accounts"), ("server", "create", None)]
        assert "s3cret" not in json.dumps(found) and "alice" not in json.dumps(found)
    finally:
        srv.stop()
        assert srv.wait_stopped(10)


# -- through the kvserve and kvctl commands -------------------------------------------------


def _metrics_url(proc: subprocess.Popen[str]) -> str:
    """Read stderr up to the "metrics on URL" line kvserve logs before it listens."""
    assert proc.stderr is not None
    for _ in range(20):  # it comes within the first few lines
        line = proc.stderr.readline()
        if "metrics on " in line:
            return line.split("metrics on ", 1)[1].strip().strip('"}').split('"')[0]
    raise AssertionError("kvserve did not say where its metrics are")


def _stop(proc: subprocess.Popen[str]) -> int:
    """Stop a kvserve subprocess (SIGTERM), close its pipes, return its exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(10)
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _kvctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "kvctl"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def kvserve_env(clean_env: dict[str, str], authkey: bytes) -> dict[str, str]:
    return dict(clean_env, KV_AUTHKEY=authkey.decode())


def test_kvserve_metrics_port_scraped_over_http(kvserve_env: dict[str, str]) -> None:
    proc = start_kvserve(kvserve_env, "--metrics-port", "0")
    try:
        address = read_listening_line(proc)
        url = _metrics_url(proc)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        env = dict(kvserve_env, KV_ADDRESS=address)
        before = sample(scrape(url), "kvserve_requests_total", kind="dict", op="__setitem__")
        assert _kvctl(env, "set", "k", "v").returncode == 0
        scraped = scrape(url)
        after = sample(scraped, "kvserve_requests_total", kind="dict", op="__setitem__")
        assert after == before + 1
        assert sample(scraped, "kvserve_process_resident_memory_bytes") > 1 << 20
        assert sample(scraped, "kvserve_process_open_fds") >= 3
    finally:
        assert _stop(proc) == 0


def test_kvserve_metrics_address_in_use_exits_3(kvserve_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kvserve", "--port", "0", "--metrics", f"127.0.0.1:{port}"],
            env=kvserve_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 3
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "nonsense"], "is not HOST:PORT"),
        (["--metrics", "127.0.0.1:99999"], "out of range"),
        (["--metrics-port", "1", "--metrics", "127.0.0.1:2"], "not both"),
        (["--log-format", "xml"], "must be text or json"),
        (["--slow-ms", "-1"], "--slow-ms"),
    ],
)
def test_kvserve_bad_operations_flags_exit_2(
    kvserve_env: dict[str, str], args: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvserve", "--port", "0", *args],
        env=kvserve_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_kvserve_help_documents_the_operations_flags(kvserve_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvserve", "--help"],
        env=dict(kvserve_env, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    for flag in ("--metrics-port", "--metrics HOST:PORT", "--slow-ms", "--log-format"):
        assert flag in result.stdout


def test_slow_ms_json_logs_and_kvctl_slowlog(kvserve_env: dict[str, str]) -> None:
    proc = start_kvserve(kvserve_env, "--slow-ms", "0", "--log-format", "json")
    try:
        address = read_listening_line(proc)
        env = dict(kvserve_env, KV_ADDRESS=address)
        assert _kvctl(env, "set", "-d", "accounts", "alice", "s3cret").returncode == 0
        table = _kvctl(env, "slowlog")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["TIME", "KIND", "OP", "CONTAINER", "MS"]
        assert any(line.split()[2:5] == ["dict", "__setitem__", "accounts"] for line in lines)
        assert lines[-1].endswith("over 0 ms since start")
        as_json = _kvctl(env, "slowlog", "-n", "2", "--json")
        assert as_json.returncode == 0, as_json.stderr
        entries = json.loads(as_json.stdout)
        assert len(entries) == 2
        assert set(entries[0]) == {"at", "kind", "op", "name", "ms"}
        assert "s3cret" not in table.stdout + as_json.stdout
        proc.terminate()
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        records = [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        _stop(proc)
    assert {r["level"] for r in records} <= {"debug", "info", "warning", "error", "critical"}
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    slow = [r["slow_request"] for r in records if "slow_request" in r]
    assert {"kind": "dict", "op": "__setitem__", "name": "accounts"}.items() <= slow[1].items()
    assert not any("s3cret" in json.dumps(r) for r in records)


def test_kvctl_slowlog_when_the_server_keeps_none(kvserve_proc: ServerProcess) -> None:
    env = dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)
    result = _kvctl(env, "slowlog")
    assert result.returncode == 1
    assert "keeps no slow-request log; start it with --slow-ms MS" in result.stderr
    assert "Traceback" not in result.stderr


def test_kvctl_compact_wait(kvserve_env: dict[str, str], tmp_path: Path) -> None:
    proc = start_kvserve(kvserve_env, "--data-dir", str(tmp_path / "data"))
    try:
        env = dict(kvserve_env, KV_ADDRESS=read_listening_line(proc))
        assert _kvctl(env, "set", "k", "v").returncode == 0
        text = _kvctl(env, "compact", "--wait")
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith("compacted in ") and "on disk" in text.stdout
        as_json = _kvctl(env, "compact", "--wait", "--json")
        assert as_json.returncode == 0, as_json.stderr
        facts = json.loads(as_json.stdout)
        assert facts["compactions"] == 2 and facts["disk_bytes_after"] > 0
        plain = _kvctl(env, "compact")
        assert plain.returncode == 0 and plain.stdout.strip() in ("started", "running")
    finally:
        assert _stop(proc) == 0


def test_kvctl_compact_wait_without_data_dir_fails(kvserve_env: dict[str, str]) -> None:
    proc = start_kvserve(kvserve_env)
    try:
        env = dict(kvserve_env, KV_ADDRESS=read_listening_line(proc))
        result = _kvctl(env, "compact", "--wait")
        assert result.returncode == 3
        assert "--data-dir" in result.stderr and "Traceback" not in result.stderr
    finally:
        assert _stop(proc) == 0


def test_the_grafana_dashboard_uses_only_series_kvserve_serves(
    tmp_path: Path, authkey: bytes
) -> None:
    import re

    dashboard = json.loads(
        (Path(__file__).parent.parent / "deploy" / "grafana-kvserve.json").read_text()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bkvserve_[a-z_]+", expr)}
    assert len(used) >= 15
    srv = _serve(
        authkey, metrics=("127.0.0.1", 0), persistence=Persistence(tmp_path / "data", "always")
    )
    try:
        with kvclient.connect(srv.endpoint, authkey) as kv:
            kv.dict("d")["x"] = 1
            with pytest.raises(KeyError):
                kv.dict("d")["y"]
        assert srv.metrics_endpoint is not None
        served = {name for name, _ in scrape(srv.metrics_endpoint)}
    finally:
        srv.stop()
        assert srv.wait_stopped(10)
    assert used - served == set()
