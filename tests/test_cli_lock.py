"""`kvctl lock run / acquire / release` against a real kvserve process, from real kvctl processes.

The command run under the lock is a real process too; killing kvctl (kill -9) or stopping it
(SIGSTOP) shows what a crashed or stalled holder does to the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import kvclient
from tests.conftest import ServerProcess
from tests.test_cli import kvctl_script

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def env(kvserve_proc: ServerProcess) -> dict[str, str]:
    return dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)


@pytest.fixture
def kvctl(env: dict[str, str]) -> Run:
    def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kvctl_script(), *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture
def kv(kvserve_proc: ServerProcess) -> Iterator[kvclient.Client]:
    with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey) as client:
        yield client


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start kvctl in a session of its own, so the command it runs can be killed with it."""
    return subprocess.Popen(
        [kvctl_script(), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_held(kv: kvclient.Client, name: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in kv.names():
            holders = kv.lock(name).status()["holders"]
            if holders:
                holder: dict[str, object] = holders[0]
                return holder
        time.sleep(0.02)
    raise AssertionError(f"lock {name!r} was not taken within {timeout} s")


def kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=10)


PY = sys.executable


def test_lock_run_gives_the_token_and_exits_with_the_commands_status(
    kvctl: Run, kv: kvclient.Client
) -> None:
    code = "import os, sys; print(os.environ['KV_FENCING_TOKEN']); sys.exit(7)"
    first = kvctl("lock", "run", "deploy", "--", PY, "-c", code)
    assert (first.returncode, first.stdout, first.stderr) == (7, "1\n", "")
    second = kvctl("lock", "run", "deploy", "--lease", "5", "--", PY, "-c", code)
    assert (second.returncode, second.stdout) == (7, "2\n")
    assert not kv.lock("deploy").locked()  # released when the command ended
    killed = kvctl("lock", "run", "deploy", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + signal.SIGTERM
    missing = kvctl("lock", "run", "deploy", "--", "no-such-command-here")
    assert missing.returncode == 127
    assert missing.stderr == "FileNotFoundError: command not found: no-such-command-here\n"
    assert not kv.lock("deploy").locked()


def test_lock_run_excludes_others_and_renews_its_lease(
    env: dict[str, str], kvctl: Run, kv: kvclient.Client
) -> None:
    holder = start(env, "lock", "run", "job", "--lease", "2", "--", "sleep", "8")
    try:
        token = wait_held(kv, "job")["token"]
        time.sleep(2.5)  # past the 2 s lease: only renewals keep it
        assert kv.lock("job").status()["holders"][0]["token"] == token
        busy = kvctl("lock", "run", "job", "--timeout", "0", "--", "echo", "ran")
        assert (busy.returncode, busy.stdout) == (1, "")
        assert busy.stderr == "LockTimeoutError: lock 'job' is still held after 0 s\n"
        assert holder.wait(timeout=20) == 0
    finally:
        kill_group(holder)
    assert not kv.lock("job").locked()


def test_killed_kvctl_lets_the_lease_expire(
    env: dict[str, str], kvctl: Run, kv: kvclient.Client
) -> None:
    holder = start(env, "lock", "run", "job", "--lease", "2", "--", "sleep", "30")
    try:
        assert wait_held(kv, "job")["token"] == 1
        os.kill(holder.pid, signal.SIGKILL)  # kvctl only: its command keeps running
        killed = time.monotonic()
        # Not freed by the kill itself: the dead holder's lease has more than a second left.
        assert kv.lock("job").acquire(blocking=False) is False
        taken = kvctl("lock", "acquire", "job", "--timeout", "15", "--lease", "5")
        assert (taken.returncode, taken.stdout, taken.stderr) == (0, "2\n", "")
        assert time.monotonic() - killed < 10  # freed by the lease running out
    finally:
        kill_group(holder)


def test_a_stalled_holder_whose_lease_ran_out_exits_3(
    env: dict[str, str], kv: kvclient.Client
) -> None:
    holder = start(env, "lock", "run", "job", "--lease", "1", "--", "sleep", "2")
    try:
        wait_held(kv, "job")
        os.kill(holder.pid, signal.SIGSTOP)  # kvctl stalls; its renewals stop
        successor = kv.lock("job", lease=10)
        assert successor.acquire(timeout=10)  # the token, or True once acquire() returns that
        assert successor.token == 2
        os.kill(holder.pid, signal.SIGCONT)
        _, stderr = holder.communicate(timeout=20)
        assert holder.returncode == 3
        assert stderr == (
            "LeaseLostError: lock 'job' (token 1) was lost while the command ran: its lease "
            "ran out; another holder may have run at the same time\n"
        )
        assert kv.lock("job").status()["holders"][0]["token"] == 2  # the successor's, kept
        successor.release()
    finally:
        kill_group(holder)  # SIGKILL ends a stopped process too


def test_lock_run_serializes_read_modify_write_across_processes(
    env: dict[str, str], kv: kvclient.Client
) -> None:
    # Each step reads n and writes n + 1 with two separate kvctl calls: without the lock,
    # concurrent steps would lose updates.
    step = 'n=$(kvctl get n) && kvctl set n $((n + 1)) && echo "$KV_FENCING_TOKEN"'
    loop = f"for i in 1 2 3; do kvctl lock run counter -- sh -c '{step}' || exit 1; done"
    kv.dict("default")["n"] = "0"
    path = os.path.dirname(kvctl_script()) + os.pathsep + env.get("PATH", "")
    workers = [
        subprocess.Popen(
            ["sh", "-c", loop],
            env=dict(env, PATH=path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    tokens: list[int] = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert (worker.returncode, err) == (0, "")
        tokens += [int(line) for line in out.split()]
    assert kv.dict("default")["n"] == "9"
    assert sorted(tokens) == list(range(1, 10))  # every hold had its own, growing token


def test_acquire_then_release_by_token_from_another_process(
    kvctl: Run, kv: kvclient.Client
) -> None:
    taken = kvctl("lock", "acquire", "deploy", "--lease", "30")
    assert (taken.returncode, taken.stdout, taken.stderr) == (0, "1\n", "")
    assert kv.lock("deploy").locked()  # the hold outlives the kvctl that took it
    busy = kvctl("lock", "acquire", "deploy", "--timeout", "0.2")
    assert (busy.returncode, busy.stdout) == (1, "")
    wrong = kvctl("lock", "release", "deploy", "7")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("NotHeldError: lock 'deploy' is not held with token 7")
    assert kv.lock("deploy").locked()
    done = kvctl("lock", "release", "deploy", "1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not kv.lock("deploy").locked()
    again = kvctl("lock", "release", "deploy", "1")
    assert again.returncode == 1
    nothing = kvctl("lock", "release", "no-such-lock", "1")
    assert nothing.returncode == 1
    assert "no lock named 'no-such-lock'" in nothing.stderr


def test_an_acquired_lock_is_freed_when_its_lease_runs_out(kvctl: Run) -> None:
    assert kvctl("lock", "acquire", "l", "--lease", "0.5").stdout == "1\n"
    started = time.monotonic()
    again = kvctl("lock", "acquire", "l", "--timeout", "10", "--json")
    assert again.returncode == 0
    assert again.stdout == '{"name": "l", "token": 2, "lease": 30.0}\n'
    assert time.monotonic() - started < 10


def test_sigterm_to_kvctl_reaches_the_command_and_the_lock_is_released(
    env: dict[str, str], kv: kvclient.Client
) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    holder = start(env, "lock", "run", "job", "--", PY, "-c", code)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        assert kv.lock("job").locked()
        holder.send_signal(signal.SIGTERM)  # kvctl only, not its process group
        assert holder.wait(timeout=20) == 42  # the command's own exit status
        assert not kv.lock("job").locked()
    finally:
        kill_group(holder)
