"""kvserve freezes what start-up built out of the garbage collector before it serves.

A full collection walks every object the collector tracks; with the data loaded from a data
directory (or only kvserve's own modules) that is a pause of milliseconds to seconds in the
middle of some request (``python -m bench.tail``). The probe runs the real ``kvserve``
command in a subprocess whose SIGUSR1 handler prints ``gc.get_freeze_count()``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import kvclient
from tests.conftest import read_listening_line

_PROBE = (
    "import gc, signal, sys\n"
    "import kvserve.__main__ as m\n"
    "signal.signal(signal.SIGUSR1, lambda *a: print('frozen', gc.get_freeze_count(), flush=True))\n"
    "sys.argv = ['kvserve', *sys.argv[1:]]\n"
    "m.main()\n"
)


def _frozen(env: dict[str, str], *args: str, keys: int = 0) -> int:
    """Start kvserve (``args``), optionally store ``keys`` dict values, return its freeze count."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        address = read_listening_line(proc)
        with kvclient.connect(address, env["KV_AUTHKEY"].encode()) as kv:
            d = kv.dict("d")
            for start in range(0, keys, 1000):
                d.update({f"k{i}": {"a": i, "b": [1, 2]} for i in range(start, start + 1000)})
            assert len(d) >= keys  # served as before
        proc.send_signal(signal.SIGUSR1)
        assert proc.stdout is not None
        deadline = time.monotonic() + 10
        line = ""
        while not line.startswith("frozen") and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert line.startswith("frozen"), f"no answer from the probe: {line!r}"
        return int(line.split()[1])
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_startup_objects_are_frozen(clean_env: dict[str, str], authkey: bytes) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    # kvserve's own modules and objects: thousands (22k measured).
    assert _frozen(env) > 5000


def test_data_loaded_from_disk_is_frozen(
    clean_env: dict[str, str], authkey: bytes, tmp_path: Path
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    data = ["--data-dir", str(tmp_path / "data")]
    empty = _frozen(env, *data, keys=5000)  # fills the directory, then restarts from it
    loaded = _frozen(env, *data)
    # Each stored value is a dict holding a list: two tracked objects per key.
    assert loaded - empty >= 2 * 5000
