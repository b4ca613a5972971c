"""`kvctl top` and the facts it reads from `stats`: against real servers, piped and on a terminal.

The rates are checked against a load whose size the test knows: a client thread calling
``incr`` as fast as it can, whose exact count the server's per-operation table must end at.
The terminal view runs the installed ``kvctl`` on a pseudo-terminal (:mod:`pty`), the piped
one on a pipe; both as separate processes, as a user runs them.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import Result

import kvclient
from kvclient.cli import EXIT_OK
from tests.conftest import ServerProcess, read_listening_line, start_kvserve
from tests.test_cli import Kvctl, free_port, invoke, kvctl_script

# The columns of a line, as a script splits them (`awk`, `read -a`).
HEADER_LINE = "clients containers keys ops/s requests/s memory log fsync-ms compactions busiest"
HEADER = HEADER_LINE.split()
CLEAR = "\x1b[H\x1b[2J"


@pytest.fixture
def kvctl(address: str, authkey: bytes, tmp_path: Path) -> Kvctl:
    """kvctl in this process (CliRunner) against the threaded `server` (no request timing)."""

    def run(*args: str) -> Result:
        env: dict[str, str | None] = {"KV_AUTHKEY": authkey.decode(), "HOME": str(tmp_path)}
        return invoke(["--address", address, *args], env)

    return run


@pytest.fixture
def timed(clean_env: dict[str, str], authkey: bytes, tmp_path: Path) -> Iterator[ServerProcess]:
    """A kvserve process that times requests (--slow-ms) and fsyncs every write."""
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    args = ["--data-dir", str(tmp_path / "data"), "--fsync", "always", "--slow-ms", "60000"]
    proc = start_kvserve(env, *args)
    sp = ServerProcess(proc, read_listening_line(proc), authkey, env)
    yield sp
    sp.stop()


@contextmanager
def incr_load(address: str, authkey: bytes) -> Iterator[list[int]]:
    """Call ``incr("hits", "home")`` in a loop while the block runs; then the count made."""
    stop = threading.Event()
    done: list[int] = []
    connected = threading.Event()

    def load() -> None:
        with kvclient.connect(address, authkey) as client:
            hits = client.dict("hits")
            n = 0
            connected.set()
            while not stop.is_set():
                hits.incr("home")
                n += 1
            done.append(n)

    worker = threading.Thread(target=load)
    worker.start()
    assert connected.wait(10)
    try:
        yield done
    finally:
        stop.set()
        worker.join(10)
    assert len(done) == 1


def run_kvctl(sp: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(sp.env, KV_ADDRESS=sp.address)
    return subprocess.run(
        [kvctl_script(), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def run_on_a_terminal(sp: ServerProcess, *args: str) -> tuple[int, str]:
    """Run kvctl with its stdout on a pseudo-terminal; return its status and what it wrote."""
    env = dict(sp.env, KV_ADDRESS=sp.address, COLUMNS="100", LINES="30")
    master, slave = pty.openpty()
    proc = subprocess.Popen([kvctl_script(), *args], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(10), out.decode()


# -- against the threaded server: no request timing, no data dir -------------------------


def test_top_rates_follow_the_load(kvctl: Kvctl, address: str, authkey: bytes) -> None:
    with incr_load(address, authkey) as done:
        busy = kvctl("top", "--interval", "0.3", "--count", "2", "--json")
    assert (busy.exit_code, busy.stderr) == (EXIT_OK, "")
    lines = [json.loads(line) for line in busy.stdout.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["ops_per_s"] > 50  # thousands a second on loopback
        assert line["keys"] == 1 and line["containers"] == 1
        assert line["clients"] >= 2
        assert line["requests_per_s_by_op"] is None  # this server does not count them
        assert line["fsync_ms"] is None
        assert line["memory"]["rss_bytes"] > 1 << 20
        assert line["memory"]["peak_rss_bytes"] >= line["memory"]["rss_bytes"]
    assert lines[1]["ops"] - lines[0]["ops"] <= done[0] + 10  # the load's, and top's own
    idle = kvctl("top", "-i", "0.2", "-n", "2", "--json")
    for line in map(json.loads, idle.stdout.splitlines()):
        assert line["ops_per_s"] < 30  # only top's own stats calls now


def test_top_prints_a_header_then_a_row_per_interval(
    kvctl: Kvctl, address: str, authkey: bytes
) -> None:
    with kvclient.connect(address, authkey) as kv:
        kv.dict("d").update(a=1, b=2)
    result = kvctl("top", "-i", "0.1", "-n", "2")
    assert (result.exit_code, result.stderr) == (EXIT_OK, "")
    header, *rows = result.stdout.splitlines()
    assert header.split() == HEADER
    assert len(rows) == 2
    for row in rows:
        cells = dict(zip(HEADER, row.split(), strict=True))
        assert (cells["containers"], cells["keys"]) == ("1", "2")
        assert (cells["log"], cells["fsync-ms"], cells["compactions"]) == ("-", "-", "-")
        assert cells["busiest"] == "-"  # not counted by this server
        assert cells["memory"].endswith("MiB")
        assert int(cells["clients"]) >= 1 and int(cells["ops/s"]) >= 0


def test_top_repeats_its_header_every_20_lines(kvctl: Kvctl) -> None:
    result = kvctl("top", "-i", "0.01", "-n", "21", "--lines")
    lines = result.stdout.splitlines()
    assert len(lines) == 23
    assert [i for i, line in enumerate(lines) if line.split() == HEADER] == [0, 21]


def test_stats_reports_memory_and_says_requests_by_op_are_not_counted(kvctl: Kvctl) -> None:
    facts = json.loads(kvctl("stats", "--json").stdout)
    assert facts["requests_by_op"] is None
    assert facts["memory"]["rss_bytes"] > 1 << 20
    rows = dict(line.split(None, 1) for line in kvctl("stats").stdout.splitlines())
    assert rows["requests_by_op"].startswith("- (counted when kvserve runs with --metrics-port")
    assert rows["memory"].endswith(" MiB") and " MiB resident, peak " in rows["memory"]


@pytest.mark.parametrize("args", [["-i", "0"], ["-i", "-1"], ["-i", "nan"], ["-n", "0"]])
def test_top_bad_interval_or_count_is_a_usage_error(kvctl: Kvctl, args: list[str]) -> None:
    result = kvctl("top", *args)
    assert result.exit_code == 2
    assert result.stdout == ""


# -- against a kvserve process that times requests and fsyncs ------------------------------


def test_top_by_operation_and_fsync_latency(timed: ServerProcess) -> None:
    with incr_load(timed.address, timed.authkey) as done:
        busy = run_kvctl(timed, "top", "-i", "0.3", "-n", "3", "--json")
        piped = run_kvctl(timed, "top", "-i", "0.3", "-n", "2")
    assert (busy.returncode, busy.stderr) == (0, "")
    lines = [json.loads(line) for line in busy.stdout.splitlines()]
    assert len(lines) == 3
    for line in lines:
        by_op = line["requests_per_s_by_op"]
        assert by_op["dict.incr"] > 50
        assert next(iter(by_op)) == "dict.incr"  # busiest first
        assert line["fsync_ms"] > 0  # --fsync always: an fdatasync per group of writes
        assert line["persistence"]["fsyncs"] > 0
    first, last = lines[0]["requests_by_op"], lines[-1]["requests_by_op"]
    assert last["dict.incr"]["count"] > first["dict.incr"]["count"]
    assert last["dict.incr"]["seconds"] > first["dict.incr"]["seconds"] > 0
    assert last["server.stats"]["count"] - first["server.stats"]["count"] == 2  # top's own
    assert lines[-1]["persistence"]["fsyncs"] > lines[0]["persistence"]["fsyncs"]

    # Piped: a header and a line per interval, no escape codes, cells without spaces.
    assert (piped.returncode, piped.stderr) == (0, "")
    assert "\x1b" not in piped.stdout
    header, *rows = piped.stdout.splitlines()
    assert header.split() == HEADER and len(rows) == 2
    for row in rows:
        cells = dict(zip(HEADER, row.split(), strict=True))
        assert cells["busiest"].startswith("dict.incr=")
        assert float(cells["fsync-ms"]) > 0
        assert cells["log"].endswith("iB") and cells["compactions"] == "0"

    # Every incr the load made is in the table, exactly: counted before its reply was sent.
    facts = json.loads(run_kvctl(timed, "stats", "--json").stdout)
    assert facts["requests_by_op"]["dict.incr"]["count"] == done[0]
    with kvclient.connect(timed.address, timed.authkey) as kv:
        assert kv.dict("hits")["home"] == done[0]
    text = run_kvctl(timed, "stats").stdout
    rows_by_key = dict(line.split(None, 1) for line in text.splitlines())
    assert rows_by_key["requests_by_op"].startswith(f"dict.incr {done[0]}, ")


def test_top_on_a_terminal_refreshes_in_place(timed: ServerProcess) -> None:
    with incr_load(timed.address, timed.authkey):
        status, out = run_on_a_terminal(timed, "top", "-i", "0.3", "-n", "2")
        status_lines, lines_out = run_on_a_terminal(timed, "top", "-i", "0.3", "-n", "1", "-l")
    assert status == 0, out
    screens = out.split(CLEAR)
    assert screens[0] == "" and len(screens) == 3  # cleared and redrawn once per interval
    for screen in screens[1:]:
        text = screen.replace("\r\n", "\n")
        assert f"at {timed.address}, up " in text
        assert "fsync " in text and " ms mean" in text
        table = text[text.index("REQUESTS/S") :].splitlines()
        assert table[0].split() == ["REQUESTS/S", "MEAN", "MS", "KIND.OP"]
        rate, mean_ms, name = table[1].split()
        assert name == "dict.incr" and int(rate) > 50 and float(mean_ms) > 0
    # --lines: a line per interval on a terminal too, no escape codes.
    assert status_lines == 0
    assert "\x1b" not in lines_out
    assert lines_out.splitlines()[0].split() == HEADER


def test_top_rides_through_a_server_restart_without_negative_rates(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    port = str(free_port())
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    args = ["--port", port, "--data-dir", str(tmp_path / "data")]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvserve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        read_listening_line(proc)
        return proc

    first = start()
    sp = ServerProcess(first, f"127.0.0.1:{port}", authkey, env)
    with kvclient.connect(sp.address, authkey) as kv:
        for _ in range(300):  # counts the restarted server will not have
            kv.dict("d").incr("n")
    top = subprocess.Popen(
        [kvctl_script(), "top", "-i", "0.4", "-n", "6", "--json"],
        env=dict(env, KV_ADDRESS=sp.address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = None
    try:
        assert top.stdout is not None
        head = top.stdout.readline()  # top is running, against the first server
        sp.stop()
        second = start()
        out, err = top.communicate(timeout=60)
        out = head + out
    finally:
        if top.poll() is None:
            top.kill()
            top.communicate(timeout=10)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
    assert (top.returncode, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 6
    uptimes = [line["uptime"] for line in lines]
    assert any(later < earlier for earlier, later in itertools.pairwise(uptimes))  # restarted
    assert all(line["ops_per_s"] >= 0 and line["requests_per_s"] >= 0 for line in lines)
