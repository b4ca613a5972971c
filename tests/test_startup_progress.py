"""kvserve says what start-up is doing: what it loads, progress while it loads, the totals.

The data directory is real and large enough to take about a second or more to load here (a
snapshot and 300,000 logged writes after it, written by :class:`Persistence` itself, the code
a running server logs with); kvserve is a real process, started on it with
``--progress-interval`` short enough that a load of that size must log several progress lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvserve.manager import KVManager
from kvserve.persistence import Persistence, apply_record
from kvserve.store import Store
from tests.conftest import read_listening_line, start_kvserve

SNAPSHOT_KEYS = 20_000
LOGGED = 300_000
KEYS = 50_000
INTERVAL = 0.2


def _on_disk(path: Path) -> int:
    """Bytes of the snapshot and log segments in ``path`` (each start adds a segment)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".kvs", ".kvl"))


def _write_data_dir(path: Path) -> None:
    """Fill ``path`` with a snapshot, then LOGGED writes in the log."""
    persist = Persistence(path, "no", compact_at=1 << 40)
    store = Store(KVManager._registry)
    persist.open(store)

    def write(record: list[Any]) -> None:
        apply_record(store, record)
        persist.append(record)

    write([None, "create", ["dict", "big"], {}])
    for i in range(SNAPSHOT_KEYS):
        write(["big", "__setitem__", [f"s{i}", i], {}])
    persist.flush()
    assert persist.compact(store)
    persist.wait_compaction(30)
    for i in range(LOGGED):
        write(["big", "__setitem__", [f"k{i % KEYS}", i], {}])
        if i % 10_000 == 0:
            persist.flush()
    persist.flush()
    persist.close()


@pytest.fixture(scope="module")
def big_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "data"
    _write_data_dir(path)
    return path


def _start(
    env: dict[str, str], data: Path, *args: str, check: Callable[[str], None] | None = None
) -> str:
    """Start kvserve on ``data``, ``check(address)`` while it runs; return all of its stderr."""
    proc = start_kvserve(env, "--data-dir", str(data), *args)
    try:
        address = read_listening_line(proc)
        if check is not None:
            check(address)
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return err


def test_startup_logs_what_it_loads_its_progress_and_the_totals(
    clean_env: dict[str, str], authkey: bytes, big_data_dir: Path
) -> None:
    data, on_disk = big_data_dir, _on_disk(big_data_dir)
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    err = _start(env, data, "--log-format", "json", "--progress-interval", str(INTERVAL))
    lines = [json.loads(line) for line in err.splitlines()]
    startup = [line["startup"] for line in lines if "startup" in line]
    first, *progress, last = startup
    assert first == {"phase": "loading", "path": str(data), "bytes": on_disk}
    assert "from " + str(data) in lines[0]["message"]
    assert last["phase"] == "loaded"
    assert last["bytes"] == on_disk
    assert last["log_records"] == LOGGED
    assert last["snapshot_records"] >= 1
    assert last["containers"] == 1
    # A load of this size takes several intervals; each of them gets its line, moving on.
    assert last["seconds"] >= 3 * INTERVAL, "the data directory loaded too fast to test"
    assert len(progress) >= last["seconds"] / INTERVAL / 2
    assert {p["phase"] for p in progress} == {"progress"}
    done = [p["bytes_done"] for p in progress]
    records = [p["records"] for p in progress]
    assert done == sorted(done) and records == sorted(records)
    assert done[0] > 0 and done[-1] <= on_disk
    assert records[-1] <= LOGGED + last["snapshot_records"]
    messages = [line["message"] for line in lines]
    assert any(m.startswith(f"loaded {on_disk / (1 << 20):.1f} MiB from {data}") for m in messages)


def test_text_logs_and_no_progress_lines_with_interval_0(
    clean_env: dict[str, str], authkey: bytes, big_data_dir: Path
) -> None:
    data, on_disk = big_data_dir, _on_disk(big_data_dir)
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())

    def all_there(address: str) -> None:
        with kvclient.connect(address, authkey) as kv:
            big = kv.dict("big")
            assert len(big) == SNAPSHOT_KEYS + KEYS
            assert big[f"k{(LOGGED - 1) % KEYS}"] == LOGGED - 1
            assert big["s7"] == 7

    err = _start(env, data, "--progress-interval", "0", check=all_there)
    mib = f"{on_disk / (1 << 20):.1f} MiB"
    loading = [line for line in err.splitlines() if " loading " in line]
    assert len(loading) == 1, err
    assert f"kvserve INFO loading {mib} from {data}: a " in loading[0]
    assert "snapshot and " in loading[0] and " of log in " in loading[0]
    assert f"kvserve INFO loaded {mib} from {data} in " in err
    assert f": 1 container, {SNAPSHOT_KEYS // 10_000} snapshot and {LOGGED} log records" in err


def test_an_empty_data_dir_logs_no_loading_line(clean_env: dict[str, str], authkey: bytes) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    err = _start(env, Path(clean_env["HOME"]) / "fresh")
    assert "loading" not in err and "loaded" not in err
    assert "data in " in err


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "soon"])
def test_a_bad_progress_interval_is_a_usage_error(clean_env: dict[str, str], value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvserve", "--port", "0", "--progress-interval", value],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--progress-interval" in done.stderr
