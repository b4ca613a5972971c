"""Several hosts made of network namespaces: the README's "From another host" flow, and failures.

The ``net`` fixture builds a small network with ``ip netns``: a switch (a bridge in its own
namespace) and three hosts plugged into it with veth pairs, in a random ``10.X.Y.0/24``. One host
runs ``kvserve --host 0.0.0.0``; the other two run clients (``tests/netns_client.py``) with a
copy of the server's authkey file in their own ``HOME``, configured with nothing but the address.
The host's own interfaces are never touched: every link lives inside the test's namespaces.

Then a client's link is cut (on the client, or at the switch, which drops packets silently) or
the server is killed mid-workload, and the totals must be exact afterwards: every ``incr``
answer distinct and gap-free, every item appended and consumed exactly once, including the
item whose reply to a parked ``get`` was lost in the cut. Without retries, a cut must give a
clean ``KVTimeoutError`` within the call timeout, and the next calls must succeed.

Needs root (``ip netns`` needs CAP_NET_ADMIN and CAP_SYS_ADMIN); skipped, with the reason,
only when a namespace cannot be created and entered.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CLIENT_SCRIPT = Path(__file__).with_name("netns_client.py")
KVCTL = Path(sys.executable).with_name("kvctl")
IP_TIMEOUT = 10.0  # seconds for any one `ip` command
CUT = 3.0  # seconds a link stays down: longer than any call's timeout in netns_client
CALL_TIMEOUT = 1.0  # netns_client's call and connect timeouts


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )


def _must(command: str) -> None:
    """Run ``ip COMMAND`` (split on spaces); raise with its stderr if it fails."""
    result = _ip(*command.split())
    if result.returncode != 0:
        raise RuntimeError(f"`ip {command}` failed: {result.stderr.strip()}")


@pytest.fixture(scope="module")
def netns_usable() -> None:
    """Skip unless a network namespace can be created and entered here."""
    name = f"kvprobe-{secrets.token_hex(3)}"
    try:
        created = _ip("netns", "add", name)
    except FileNotFoundError:
        pytest.skip("needs the `ip` command (iproute2) to create network namespaces")
    if created.returncode != 0:
        pytest.skip(
            "cannot create a network namespace (needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN): "
            + created.stderr.strip()
        )
    try:
        entered = subprocess.run(
            ["ip", "netns", "exec", name, "true"],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
    finally:
        _ip("netns", "del", name)
    if entered.returncode != 0:
        pytest.skip(f"cannot enter a network namespace: {entered.stderr.strip()}")


@dataclass
class Host:
    """One namespace plugged into the switch: ``eth0`` inside, ``port`` on the switch."""

    ns: str
    ip: str
    port: str
    home: Path


@dataclass
class Network:
    """A switch namespace and its hosts; every process started in them is stopped on teardown."""

    root: Path
    env: dict[str, str]
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = field(
        default_factory=lambda: f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
    )
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"kvnet-{self.token}"

    def _add_namespace(self, name: str) -> None:
        _must(f"netns add {name}")
        self.namespaces.append(name)
        _must(f"-n {name} link set lo up")

    def build(self, *names: str) -> None:
        switch = self.switch
        self._add_namespace(switch)
        _must(f"-n {switch} link add br0 type bridge")
        _must(f"-n {switch} link set br0 up")
        for number, name in enumerate(names, start=1):
            host = Host(
                ns=f"kv{name}-{self.token}",
                ip=f"{self.subnet}.{number}",
                port=f"p-{name}",
                home=self.root / name / "home",
            )
            host.home.mkdir(parents=True)
            self._add_namespace(host.ns)
            _must(f"-n {switch} link add {host.port} type veth peer name eth0 netns {host.ns}")
            _must(f"-n {switch} link set {host.port} master br0")
            _must(f"-n {switch} link set {host.port} up")
            _must(f"-n {host.ns} addr add {host.ip}/24 dev eth0")
            _must(f"-n {host.ns} link set eth0 up")
            self.hosts[name] = host

    def destroy(self) -> None:
        """Kill what runs in the namespaces, then delete them; best effort, never raises."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass  # reported by the namespace's pid list below
            if proc.stdout is not None:
                proc.stdout.close()
        for name in self.namespaces:
            try:
                # Whatever is still inside (a child of ours) would keep the namespace alive.
                for pid in _ip("netns", "pids", name).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                _ip("netns", "del", name)
            except (OSError, subprocess.SubprocessError):
                pass

    def host_env(self, host: Host, **extra: str) -> dict[str, str]:
        return dict(self.env, HOME=str(host.home), **extra)

    def spawn(
        self, host: Host, argv: list[str], log: Path, *, stdout_pipe: bool = False, **env: str
    ) -> subprocess.Popen[str]:
        """Start ``argv`` on ``host``; stderr (and stdout unless piped) goes to ``log``."""
        with log.open("a") as log_file:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.ns, *argv],
                stdout=subprocess.PIPE if stdout_pipe else log_file,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.host_env(host, **env),
            )
        self.procs.append(proc)
        return proc

    def run(self, host: Host, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` to completion (bounded), capturing its output."""
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.host_env(host, **env),
            check=False,
        )

    def set_link(self, host: Host, up: bool, *, at_switch: bool) -> None:
        """Take ``host``'s link down or up, on the host itself or at its switch port.

        Down on the host, the route goes with it and new connections fail at once (network
        unreachable). Down at the switch, the host sees nothing: packets just vanish, and
        new connections time out, as when a cable or a router fails further away.
        """
        state = "up" if up else "down"
        if at_switch:
            _must(f"-n {self.switch} link set {host.port} {state}")
        else:
            _must(f"-n {host.ns} link set eth0 {state}")


@pytest.fixture
def net(netns_usable: None, tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Network]:
    """A switch with three hosts on it: ``server``, ``c1`` and ``c2``."""
    network = Network(tmp_path, clean_env)
    try:
        network.build("server", "c1", "c2")
        yield network
    finally:
        network.destroy()


# -- the server --------------------------------------------------------------------------------


def _wait_listening(proc: subprocess.Popen[str], log: Path, timeout: float = 20) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("kvserve listening on "):
        proc.kill()
        raise AssertionError(f"kvserve did not start: {line!r}\n{log.read_text()}")
    return line.removeprefix("kvserve listening on ").strip()


@dataclass
class KvServe:
    """``kvserve --host 0.0.0.0`` on a host, as the README starts it for other hosts."""

    net: Network
    on: Host
    args: list[str]
    log: Path
    host: str = "0.0.0.0"
    proc: subprocess.Popen[str] | None = None
    port: int = 0

    @property
    def address(self) -> str:
        """The address other hosts use: the server host's own, whatever was bound."""
        return f"{self.on.ip}:{self.port}"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait for the listening line."""
        argv = [sys.executable, "-m", "kvserve", "--host", self.host, "--port", str(self.port)]
        proc = self.net.spawn(self.on, [*argv, *self.args], self.log, stdout_pipe=True)
        self.proc = proc
        listening = _wait_listening(proc, self.log)
        assert listening.startswith(f"{self.host}:")
        self.port = int(listening.rsplit(":", 1)[1])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(10)


@pytest.fixture
def kvserve(net: Network, tmp_path: Path) -> KvServe:
    """A running server keeping its data in a directory, its authkey copied to c1 and c2."""
    server = KvServe(
        net, net.hosts["server"], ["--data-dir", str(tmp_path / "data")], tmp_path / "kvserve.log"
    )
    # A key made here rather than by kvserve: see test_a_key_kvserve_creates_always_lets_...
    key = authkey_file(server.on)
    key.parent.mkdir(mode=0o700, parents=True)
    key.touch(mode=0o600)
    key.write_text(secrets.token_hex(32))
    server.start()
    for name in ("c1", "c2"):
        copy_authkey(server.on, net.hosts[name])
    return server


def authkey_file(host: Host) -> Path:
    return host.home / ".config" / "kvmanager" / "authkey"


def copy_authkey(source: Host, dest: Host) -> None:
    """What the README asks of the user: copy the file to the same path, keep it 0600."""
    target = authkey_file(dest)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(authkey_file(source), target)
    target.chmod(0o600)


# -- clients -----------------------------------------------------------------------------------


@dataclass
class ClientRun:
    """One ``netns_client.py`` process and the files it reports through."""

    proc: subprocess.Popen[str]
    out: Path
    progress: Path
    log: Path

    def done(self) -> int:
        """Iterations (workload) or successful calls (probe) so far."""
        try:
            lines = self.progress.read_text().split()
        except FileNotFoundError:
            return -1
        return int(lines[-1]) if lines else -1

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until ``done() >= count``; return the seconds it took."""
        start = time.monotonic()
        while self.done() < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"client exited early:\n{self.log.read_text()}")
            if time.monotonic() - start > timeout:
                raise AssertionError(
                    f"client stuck at {self.done()} < {count} after {timeout}s:\n"
                    f"{self.log.read_text()}"
                )
            time.sleep(0.02)
        return time.monotonic() - start

    def finish(self, timeout: float = 30) -> dict[str, Any]:
        """Wait for the process (the stop file must exist); return its report."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"client did not stop:\n{self.log.read_text()}") from None
        assert code == 0, f"client failed ({code}):\n{self.log.read_text()}"
        report: dict[str, Any] = json.loads(self.out.read_text())
        return report


def start_client(
    net: Network, host: Host, mode: str, address: str, name: str, *extra: str
) -> ClientRun:
    work = net.root / name
    work.mkdir(exist_ok=True)
    run = ClientRun(
        proc=net.spawn(
            host,
            [
                sys.executable,
                str(CLIENT_SCRIPT),
                mode,
                address,
                "--out",
                str(work / "out.json"),
                "--progress",
                str(work / "progress"),
                "--stop",
                str(net.root / "stop"),
                *extra,
            ],
            work / "log",
        ),
        out=work / "out.json",
        progress=work / "progress",
        log=work / "log",
    )
    return run


def final_state(net: Network, address: str) -> dict[str, Any]:
    """Read the shared containers from c2 (the queue is drained into ``leftover``)."""
    out = net.root / "check.json"
    result = net.run(
        net.hosts["c2"], [sys.executable, str(CLIENT_SCRIPT), "check", address, "--out", str(out)]
    )
    assert result.returncode == 0, result.stderr
    state: dict[str, Any] = json.loads(out.read_text())
    return state


# -- the README flow ---------------------------------------------------------------------------


def test_from_another_host_as_the_readme_says(net: Network, tmp_path: Path) -> None:
    server_host, c1, c2 = net.hosts["server"], net.hosts["c1"], net.hosts["c2"]
    # No key given: the first start creates ~/.config/kvmanager/authkey on the server host.
    server = KvServe(net, server_host, [], tmp_path / "kvserve.log")
    server.start()
    key = authkey_file(server_host)
    assert key.stat().st_mode & 0o777 == 0o600
    assert "without TLS" in server.log.read_text()  # 0.0.0.0 in the clear is said out loud

    # A client host without the file is told what to do, in one line.
    refused = net.run(c1, [str(KVCTL), "ping"], KV_ADDRESS=server.address)
    assert refused.returncode == 3
    assert refused.stderr.startswith("AuthError: authkey file ")
    assert "copy it from the server host" in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line, no traceback

    copy_authkey(server_host, c1)
    copy_authkey(server_host, c2)
    ok = net.run(c1, [str(KVCTL), "set", "greeting", "hello"], KV_ADDRESS=server.address)
    assert (ok.returncode, ok.stderr) == (0, "")
    got = net.run(c2, [str(KVCTL), "get", "greeting"], KV_ADDRESS=server.address)
    assert (got.returncode, got.stdout, got.stderr) == (0, "hello\n", "")

    # The README's Python session, from the other client host, with only the address.
    code = (
        "import kvclient\n"
        f"kv = kvclient.connect({server.address!r})\n"
        "hits = kv.dict('hits')\n"
        "print(hits.incr('home'), kv.dict('default')['greeting'])\n"
        "kv.close()\n"
    )
    session = net.run(c2, [sys.executable, "-c", code])
    assert (session.returncode, session.stdout, session.stderr) == (0, "1 hello\n", "")
    assert server.stop() == 0

    # Without --host, the server listens on the server host's loopback only: other hosts are
    # refused, and told so in one line.
    local_only = KvServe(net, server_host, [], tmp_path / "local.log", host="127.0.0.1")
    local_only.start()
    unreachable = net.run(c1, [str(KVCTL), "ping"], KV_ADDRESS=local_only.address)
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith(
        f"KVConnectionError: could not connect to {local_only.address} (connection refused)"
    )
    assert unreachable.stderr.count("\n") == 1
    assert local_only.stop() == 0


def test_a_key_kvserve_creates_always_lets_clients_in(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    """Whatever random bytes the first start draws, a client reading the same file gets in."""
    # One key in 128 ends in a newline byte; make this one do so (the handshake's nonces are
    # drawn later and stay random).
    code = (
        "import secrets, sys\n"
        "real = secrets.token_bytes\n"
        "def first_ends_in_newline(n=None):\n"
        "    secrets.token_bytes = real\n"
        "    return real(n)[:-1] + b'\\n'\n"
        "secrets.token_bytes = first_ends_in_newline\n"
        "sys.argv = ['kvserve', '--port', '0']\n"
        "from kvserve.__main__ import main\n"
        "main()\n"
    )
    log = tmp_path / "kvserve.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=clean_env,
        )
    try:
        address = _wait_listening(proc, log)
        home = Path(clean_env["HOME"])
        created = (home / ".config" / "kvmanager" / "authkey").read_bytes()
        # The first draw ended in a newline, which readers strip: kvserve drew again.
        assert not created.endswith((b"\r", b"\n"))
        ping = subprocess.run(
            [str(KVCTL), "-a", address, "ping"],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env,
            check=False,
        )
        assert (ping.returncode, ping.stderr) == (0, "")
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


# -- cutting the network, killing the server ---------------------------------------------------


@contextmanager
def link_cut(net: Network, host: Host, *, at_switch: bool) -> Iterator[None]:
    """Keep ``host``'s link down for the ``with`` block (see :meth:`Network.set_link`)."""
    net.set_link(host, False, at_switch=at_switch)
    try:
        yield
    finally:
        net.set_link(host, True, at_switch=at_switch)


@pytest.mark.parametrize("disruption", ["client-link-down", "switch-port-down", "server-killed"])
def test_a_cut_or_a_crash_mid_workload_gives_exact_totals(
    net: Network, kvserve: KvServe, disruption: str
) -> None:
    address = kvserve.address
    c1 = start_client(net, net.hosts["c1"], "workload", address, "c1", "--id", "1")
    c2 = start_client(net, net.hosts["c2"], "workload", address, "c2", "--id", "2")
    c1.wait_for(50, timeout=20)
    c2.wait_for(50, timeout=20)

    if disruption == "server-killed":
        kvserve.kill()
        time.sleep(CUT)
        kvserve.start()  # same port, same data directory
    else:
        with link_cut(net, net.hosts["c1"], at_switch=disruption == "switch-port-down"):
            before = (c1.done(), c2.done())
            time.sleep(CUT)
            during = (c1.done(), c2.done())
        # An iteration in flight when the link went down may have finished; no other could.
        assert during[0] - before[0] <= 1, "c1 made progress through a cut link"
        assert during[1] - before[1] >= 20, "c2 stalled while only c1's link was cut"
    resumed_at = (c1.done(), c2.done())
    recovery = max(c1.wait_for(resumed_at[0] + 1, 10), c2.wait_for(resumed_at[1] + 1, 10))
    c1.wait_for(resumed_at[0] + 20, 10)  # well past the outage
    (net.root / "stop").touch()
    reports = [c1.finish(), c2.finish()]
    state = final_state(net, address)

    total = sum(r["ops"] for r in reports)
    incrs = [n for r in reports for n in r["incrs"]]
    # Every incr answered once with its own number, none lost, none applied twice.
    assert sorted(incrs) == list(range(1, total + 1))
    assert state["n"] == total
    expected = Counter((r["id"], i) for r in reports for i in range(r["ops"]))
    assert Counter(tuple(item) for item in state["appended"]) == expected
    got = Counter(tuple(item) for r in reports for item in r["got"])
    assert got == expected  # every item consumed exactly once...
    assert state["leftover"] == []  # ...and nothing left behind

    # The outage was felt (else this test could not fail), and ridden out promptly.
    disrupted = reports if disruption == "server-killed" else reports[:1]
    for r in disrupted:
        assert r["retries"] > 0, r
        assert r["slow"], r
    slowest = max(call["seconds"] for r in reports for call in r["slow"])
    assert slowest < CUT + 5, reports
    assert recovery < 5


def test_an_item_handed_to_a_get_whose_link_is_cut_is_delivered_exactly_once(
    net: Network, kvserve: KvServe
) -> None:
    """The reply to a parked get is lost in a cut; the get's retry must still receive it."""
    c1, c2 = net.hosts["c1"], net.hosts["c2"]
    wait = 3.0  # the get's own timeout; netns_client adds 0.5 s of call timeout on top
    getter = start_client(net, c1, "get", kvserve.address, "c1", "--wait", str(wait))
    getter.wait_for(0, timeout=20)
    started = time.monotonic()
    time.sleep(0.3)  # the get is parked on the server now: the queue is empty
    with link_cut(net, c1, at_switch=True):
        # The server hands the item to the parked get and sends the reply into the cut link.
        put = net.run(
            c2, [str(KVCTL), "queue", "put", "handoff", "the-item"], KV_ADDRESS=kvserve.address
        )
        assert (put.returncode, put.stderr) == (0, "")
        put_at = time.monotonic() - started
        # Else the item waited in the queue for the retry, and this test proved nothing.
        assert put_at < wait - 0.2, f"the put came {put_at:.1f}s late: too slow a machine"
        # The get times out on the client (wait + 0.5 s) while the link is still down.
        time.sleep(wait + 1 - put_at)
    report = getter.finish()
    assert (report["item"], report["empty"]) == ("the-item", False), report
    assert report["retries"] > 0  # the reply really was lost, and the get was retried
    assert report["seconds"] > wait + 0.5
    size = net.run(c2, [str(KVCTL), "queue", "size", "handoff"], KV_ADDRESS=kvserve.address)
    assert (size.returncode, size.stdout) == (0, "0\n")


@pytest.mark.parametrize(
    ("call", "at_switch"),
    [
        ("incr", False),
        ("incr", True),
        pytest.param("put", True),
    ],
    ids=["incr-client-link-down", "incr-switch-port-down", "put-switch-port-down"],
)
def test_without_retries_a_cut_link_times_out_cleanly_then_recovers(
    net: Network, kvserve: KvServe, call: str, at_switch: bool
) -> None:
    probe = start_client(net, net.hosts["c1"], "probe", kvserve.address, "c1", "--call", call)
    probe.wait_for(20, timeout=20)
    with link_cut(net, net.hosts["c1"], at_switch=at_switch):
        time.sleep(CUT)
    probe.wait_for(probe.done() + 20, timeout=30)
    (net.root / "stop").touch()
    report = probe.finish()

    outcomes = report["outcomes"]
    failed = [o for o in outcomes if o["error"] is not None]
    slowest = max(o["seconds"] for o in outcomes)
    assert failed, f"the cut went unnoticed; the slowest call took {slowest}s"
    # The call in flight when the link went down times out: no hang, no wrong answer.
    assert failed[0]["error"] == "KVTimeoutError"
    assert "timed out" in failed[0]["message"]
    assert kvserve.address in failed[0]["message"]
    assert {o["error"] for o in failed} <= {"KVTimeoutError", "KVConnectionError"}
    assert slowest < CALL_TIMEOUT + 0.5
    # The calls after the last failure succeed, on their own.
    last_failure = outcomes.index(failed[-1])
    after = outcomes[last_failure + 1 :]
    assert len(after) >= 20
    assert all(o["error"] is None for o in after)
    if call == "incr":
        values = [o["value"] for o in outcomes if o["error"] is None]
        assert values == sorted(set(values))  # every answer new and in order
    # A call that timed out may still have been applied (its request was on the wire): the
    # server's count lies between what was acknowledged and what was attempted.
    acknowledged = len(outcomes) - len(failed)
    assert acknowledged <= report["applied"] <= acknowledged + len(failed)


def test_a_watcher_on_another_host_follows_a_link_cut_without_losing_an_event(
    net: Network, kvserve: KvServe
) -> None:
    c1, c2 = net.hosts["c1"], net.hosts["c2"]
    watcher = start_client(net, c1, "watch", kvserve.address, "c1", "--wait", "1.0")
    watcher.wait_for(0, timeout=20)

    def set_keys(*keys: str) -> None:
        for key in keys:
            done = net.run(
                c2, [str(KVCTL), "set", "-d", "cfg", key, f"v-{key}"], KV_ADDRESS=kvserve.address
            )
            assert done.returncode == 0, done.stderr

    set_keys("a", "b", "c")
    watcher.wait_for(3, timeout=20)
    with link_cut(net, c1, at_switch=True):  # packets dropped silently, replies lost
        set_keys("d", "e", "f")
        time.sleep(CUT)
        assert watcher.done() == 3, "the watcher heard through a cut link"
    took = watcher.wait_for(6, timeout=20)
    set_keys("g")
    watcher.wait_for(7, timeout=20)
    (net.root / "stop").touch()
    report = watcher.finish()
    events = report["events"]
    assert [e[0] for e in events] == list(range(1, 8))  # none lost, none repeated
    assert [(e[1], e[2], e[3]) for e in events] == [("set", k, f"v-{k}") for k in "abcdefg"]
    assert report["retries"] > 0  # the cut was felt
    assert took < 10
