"""kvctl watch, set --ttl and set --nx: against a real server, in-process and as a process."""

# ruff: noqa: F811

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

import kvclient
from kvclient.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE
from tests.conftest import ServerProcess

# The kvctl fixture is test_cli's (imported, so that pytest finds it here); its parameters
# shadow the import by design.
from tests.test_cli import Kvctl, fails, kvctl, kvctl_script, ok  # noqa: F401


def test_set_nx_exits_1_when_the_key_is_present(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("set", "--nx", "lock", "me"))
    fails(
        kvctl("set", "--nx", "lock", "you"),
        EXIT_NOT_FOUND,
        "KeyExists: key 'lock' is already in dict 'default'\n",
    )
    assert kv.dict("default")["lock"] == "me"


def test_set_ttl_and_nx_combine(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("set", "--ttl", "0.5", "--nx", "-d", "locks", "backup", "host1"))
    assert kvctl("set", "--ttl", "0.5", "--nx", "-d", "locks", "backup", "h2").exit_code == 1
    left = kv.dict("locks").ttl("backup")
    assert left is not None and 0 < left <= 0.5
    deadline = time.monotonic() + 20
    while "backup" in kv.dict("locks"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok(kvctl("set", "--ttl", "30", "--nx", "-d", "locks", "backup", "h2"))
    assert kv.dict("locks")["backup"] == "h2"


@pytest.mark.parametrize("ttl", ["0", "-1", "nan", "inf", "1e12", "soon"])
def test_a_bad_ttl_is_a_usage_error(kvctl: Kvctl, kv: kvclient.Client, ttl: str) -> None:
    result = kvctl("set", f"--ttl={ttl}", "k", "v")
    assert result.exit_code == EXIT_USAGE
    assert "--ttl" in result.stderr
    assert "k" not in kv.dict("default")


def test_watch_prints_one_event_a_line_from_since(kvctl: Kvctl, kv: kvclient.Client) -> None:
    d = kv.dict("cfg")
    d["db"] = "pg"
    d.update({"web": {"port": 80}})
    del d["db"]
    ok(
        kvctl("watch", "cfg", "--since", "0", "--timeout", "0"),
        '1 set db pg\n2 set web {"port": 80}\n3 delete db -\n',
    )
    result = kvctl("watch", "cfg", "--since", "1", "--json", "--count", "1")
    ok(result, result.stdout)
    assert json.loads(result.stdout) == {
        "revision": 2,
        "op": "set",
        "key": "web",
        "value": {"port": 80},
    }
    ok(
        kvctl("watch", "cfg", "--since", "0", "--key", "db", "--timeout", "0"),
        "1 set db pg\n3 delete db -\n",
    )
    ok(
        kvctl("watch", "cfg", "--since", "0", "--prefix", "w", "--timeout", "0"),
        '2 set web {"port": 80}\n',
    )


def test_watch_errors(kvctl: Kvctl, kv: kvclient.Client) -> None:
    fails(
        kvctl("watch", "nothing"),
        EXIT_NOT_FOUND,
        f"NoSuchContainerError: no dict named 'nothing' on {kv.endpoint}; kvctl names lists them\n",
    )
    kv.dict("small")["a"] = 1
    result = kvctl("watch", "small", "--since", "9")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.startswith("CompactedError: revision 9 is ahead")


@pytest.fixture
def shell_env(kvserve_proc: ServerProcess) -> Iterator[dict[str, str]]:
    yield dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)


def test_kvctl_watch_follows_changes_until_ctrl_c(
    shell_env: dict[str, str], kvserve_proc: ServerProcess
) -> None:
    proc = subprocess.Popen(
        [kvctl_script(), "watch", "jobs", "--since", "0"],
        env=shell_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey) as kv:
            d = kv.dict("jobs")
            time.sleep(0.5)  # it may have asked already, or not yet: --since 0 sees it either way
            d["j1"] = "queued"
            line = _readline(proc, 20)
            assert line == "1 set j1 queued\n"
            d["j1"] = "done"
            assert _readline(proc, 20) == "2 set j1 done\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == EXIT_INTERRUPTED
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=20)


def _readline(proc: subprocess.Popen[str], limit: float) -> str:
    box: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(limit)
    assert box, f"no line from kvctl watch within {limit} s"
    return box[0]
