"""A real Valkey/Redis Cluster of ``redis-server`` processes on loopback, for tests and by hand.

The cluster backend (issue 16) is tested against the real engine, never a fake: this starts
``masters`` masters with ``replicas`` replicas each (default 3 + 3), each its own
``redis-server`` process on 127.0.0.1 with its own directory, joins them with
``redis-cli --cluster create``, and waits until ``cluster_state:ok`` and every replica is
attached. Every wait is bounded; :meth:`Cluster.stop` kills every process it started.

By hand::

    python -m tests.redis_cluster            # start, print the seed address, wait for Ctrl-C

Ports are chosen free (the port and its cluster bus port, port + 10000), so parallel runs and
other services on the machine do not collide.

Unlike deploy/redis-cluster/compose.yaml (whose own command lines tests/test_deploy_redis.py
runs), the nodes keep no AOF, set no ``min-replicas-to-write`` and fail over after a 2 s node
timeout: the failover tests need a master that acknowledges writes no replica has, and a
killed node that comes back empty. With ``tls`` the nodes listen on TLS only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "Cluster",
    "ClusterError",
    "Standalone",
    "TLSFiles",
    "available",
    "free_port_pair",
    "require",
    "running_cluster",
]

_BUS_OFFSET: Final = 10000
_START_TIMEOUT: Final = 30.0
_NODE_TIMEOUT_MS: Final = 2000


class ClusterError(RuntimeError):
    """The cluster could not be started or did not become healthy in time."""


def available() -> str | None:
    """Return None if redis-server and redis-cli are on PATH, else why not."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH (apt-get install redis-server)"
    return None


def require() -> None:
    """In a test: skip it without redis-server, or fail it in CI, where ``.ci/run`` installs it."""
    import pytest

    reason = available()
    if reason is not None:
        if os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}:
            pytest.fail(f"the Valkey/Redis tests must run in CI: {reason}")
        pytest.skip(reason)


def free_port_pair(taken: set[int]) -> int:
    """Return a free loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port in taken or port + _BUS_OFFSET > 65535 or port + _BUS_OFFSET in taken:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + _BUS_OFFSET))
            except OSError:
                continue
        return port
    raise ClusterError("no free port pair (port and port + 10000) found in 200 tries")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS-only nodes: the CA both sides trust, and a certificate with its key.

    The nodes serve with the certificate and present it to each other (cluster bus,
    replication); redis-cli presents it too (``tls-auth-clients`` is on by default).
    """

    ca: Path
    cert: Path
    key: Path

    def server_args(self, port: int) -> list[str]:
        """redis-server options: TLS only, on ``port``, between nodes too."""
        return [
            *("--port", "0", "--tls-port", str(port)),
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca)),
            *("--tls-cluster", "yes", "--tls-replication", "yes"),
        ]

    def cli_args(self) -> list[str]:
        """redis-cli options to reach such a node."""
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.cert), "--key", str(self.key)]


@dataclass
class Node:
    """One redis-server process of the cluster."""

    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    tls: TLSFiles | None = None

    def _cli(self) -> list[str]:
        return ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *self._tls_args()]

    def _tls_args(self) -> list[str]:
        return [] if self.tls is None else self.tls.cli_args()

    def port_args(self) -> list[str]:
        """redis-server options for where it listens (TLS only when the node has ``tls``)."""
        if self.tls is None:
            return ["--port", str(self.port)]
        return self.tls.server_args(self.port)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``redis-cli -p PORT ARGS...`` and return its output."""
        out = subprocess.run(
            [*self._cli(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return out.stdout

    def replicated(self, key: str, timeout_ms: int = 5000) -> int:
        """Write ``key`` here, then ``WAIT 1``: how many replicas have everything written so far.

        One connection for both: ``WAIT`` counts the replicas that have *that connection's*
        writes, so a ``WAIT`` on a fresh connection returns at once and proves nothing. A
        replica that has this write has every earlier one (the stream is in order). ``key``
        must be in a slot this node serves (give it the hash tag of the keys in question).
        """
        out = subprocess.run(
            self._cli(),
            input=f"SET {key} 1\nWAIT 1 {timeout_ms}\n",
            capture_output=True,
            text=True,
            timeout=timeout_ms / 1000 + 10,
            check=False,
        )
        lines = out.stdout.split()
        if lines[:1] != ["OK"] or len(lines) < 2:
            raise ClusterError(f"SET then WAIT on {self.port} answered {out.stdout!r}")
        return int(lines[1])


@dataclass
class Cluster:
    """A running cluster; use :func:`running_cluster` or :meth:`start` / :meth:`stop`."""

    masters: int = 3
    replicas: int = 1
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kv-cluster-")))
    nodes: list[Node] = field(default_factory=list)
    _owns_base: bool = True
    tls: TLSFiles | None = None

    @property
    def seeds(self) -> list[str]:
        """Every node's ``host:port``, masters first as created."""
        return [node.address for node in self.nodes]

    def start(self) -> Cluster:
        """Start the processes, create the cluster, wait until it is healthy.

        Raises:
            ClusterError: a process died, or the cluster was not healthy within 30 s (the
                message carries the last state seen and the nodes' logs' tails).
        """
        reason = available()
        if reason is not None:
            raise ClusterError(reason)
        taken: set[int] = set()
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                port = free_port_pair(taken)
                taken.update({port, port + _BUS_OFFSET})
                node = Node(port, self.base / str(port), tls=self.tls)
                node.directory.mkdir(parents=True)
                self._spawn(node)
                self.nodes.append(node)
            deadline = time.monotonic() + _START_TIMEOUT
            self._wait(
                lambda: all(n.cli("ping").strip() == "PONG" for n in self.nodes), deadline, "ping"
            )
            create = subprocess.run(
                [
                    "redis-cli",
                    *([] if self.tls is None else self.tls.cli_args()),
                    "--cluster",
                    "create",
                    *self.seeds,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=_START_TIMEOUT,
                check=False,
            )
            if create.returncode != 0:
                raise ClusterError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}")
            self._wait(self.healthy, deadline, "cluster_state:ok with every replica attached")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _spawn(node: Node) -> None:
        node.proc = subprocess.Popen(
            [
                "redis-server",
                *node.port_args(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(_NODE_TIMEOUT_MS),
                "--dir",
                str(node.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                # A replica's full sync starts at once, not after the default 5 s wait for
                # more replicas to share it: a start-up and a restarted node wait on it.
                "--repl-diskless-sync-delay",
                "0",
                "--logfile",
                "redis.log",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run is not theirs to get
        )

    def restart(self, node: Node) -> None:
        """Start a killed node again: it rejoins (a killed master as a replica of its successor)."""
        if node.proc is not None and node.proc.poll() is None:
            raise ClusterError(f"node {node.port} is still running")
        self._spawn(node)

    def _wait(self, check: Callable[[], bool], deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise ClusterError(
                        f"redis-server on port {node.port} exited ({node.proc.returncode}): "
                        f"{self._log_tail(node)}"
                    )
            if check():
                return
            time.sleep(0.1)
        tails = "; ".join(f"{n.port}: {self._log_tail(n)}" for n in self.nodes)
        raise ClusterError(f"timed out waiting for {what}; logs: {tails}")

    @staticmethod
    def _log_tail(node: Node) -> str:
        try:
            return (node.directory / "redis.log").read_text()[-300:].replace("\n", " | ")
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        """Whether every node says ``cluster_state:ok`` and the expected replicas are attached."""
        for node in self.nodes:
            if "cluster_state:ok" not in node.cli("cluster", "info"):
                return False
        masters = replicas = 0
        for line in self.nodes[0].cli("cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 8 or fields[7] != "connected":
                continue
            flags = fields[2].split(",")
            if "fail" in flags or "fail?" in flags:
                return False
            if "master" in flags:
                masters += 1
            elif "slave" in flags and fields[3] != "-":
                replicas += 1
        if masters != self.masters or replicas != self.masters * self.replicas:
            return False
        # Attached is not synced: a failover before the first sync would lose everything.
        return all(
            "master_link_status:up" in node.cli("info", "replication")
            for node in self.nodes
            if "role:slave" in node.cli("info", "replication")
        )

    def master_of(self, key: str, ask: Node | None = None) -> Node | None:
        """Return the node serving ``key``'s slot as master as ``ask`` sees it (None: none now)."""
        witness = ask or self.nodes[0]
        slot = int(witness.cli("cluster", "keyslot", key).strip())
        for line in witness.cli("cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                first, _, last = part.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    port = int(fields[1].split(":")[1].split("@")[0])
                    return next(n for n in self.nodes if n.port == port)
        return None

    def replica_of(self, master: Node) -> Node:
        """Return the (first) replica attached to ``master``.

        Raises:
            ClusterError: it has none.
        """
        for line in master.cli("info", "replication").splitlines():
            if line.startswith("slave0:"):
                port = int(line.split("port=", 1)[1].split(",", 1)[0])
                return next(n for n in self.nodes if n.port == port)
        raise ClusterError(f"node {master.port} has no replica attached")

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one node (failover tests)."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)
            node.proc.wait(10)

    def stop(self) -> None:
        """Kill every node and remove the directory. Safe to call more than once."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(10)
        if self._owns_base:
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(
    masters: int = 3, replicas: int = 1, tls: TLSFiles | None = None
) -> Iterator[Cluster]:
    """Start a cluster for the ``with`` block (TLS only with ``tls``), stop it after."""
    cluster = Cluster(masters, replicas, tls=tls).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main() -> int:
    """Start a cluster, print its seeds, and keep it up until interrupted."""
    started = time.monotonic()
    with running_cluster() as cluster:
        print(f"cluster up in {time.monotonic() - started:.1f}s: {','.join(cluster.seeds)}")
        print(f"redis-cluster://{cluster.seeds[0]}  (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())


@dataclass
class Standalone:
    """One plain ``redis-server`` (no cluster) on a free loopback port, for the standalone tests."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kv-redis-")))
    node: Node | None = None
    tls: TLSFiles | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://`` with TLS)."""
        assert self.node is not None
        return f"redis{'' if self.tls is None else 's'}://{self.node.address}/0"

    def start(self) -> Standalone:
        """Start it and wait until it answers PING (bounded: 30 s).

        Raises:
            ClusterError: it did not start.
        """
        reason = available()
        if reason is not None:
            raise ClusterError(reason)
        port = free_port_pair(set())
        node = Node(port, self.base, tls=self.tls)
        node.proc = subprocess.Popen(
            [
                "redis-server",
                *node.port_args(),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.base),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.node = node
        deadline = time.monotonic() + _START_TIMEOUT
        while node.cli("ping").strip() != "PONG":
            if node.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ClusterError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Kill it and remove its directory."""
        if self.node is not None and self.node.proc is not None:
            self.node.proc.kill()
            self.node.proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
