"""deploy/redis-cluster/compose.yaml, checked without a Docker engine.

The file is parsed as Compose reads it (YAML with its ``<<`` merge keys; ``$$`` is a literal
``$``). Statically: six nodes with the options README's "Outgrowing one host" promises, a
password that must be set, a node timeout kvclient's default Retry outlasts. Live: the nodes'
and the ``create`` service's command lines run exactly as written, with only the binary
(``valkey-server`` -> this machine's ``redis-server``), the ports, the data directory and a
loopback bind swapped in; the six form a cluster, kvclient reaches it with ``REDIS_PASSWORD``
from the environment, and ``min-replicas-to-write`` refuses a write no replica would get.
What is not exercised: the image, Docker's networking and restart policy, and Valkey itself.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import kvclient
from kvclient.retry import ExponentialWithJitterBackoff, Retry
from tests.redis_cluster import Cluster, Node, free_port_pair, require

pytestmark = pytest.mark.timeout(120)

COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "redis-cluster" / "compose.yaml"
NODES = [f"node{i}" for i in range(1, 7)]
# Measured (README): a killed master's slots failed over the node timeout + about 2 s later.
ELECTION_S = 2.0


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _script(service: dict[str, Any]) -> str:
    """The shell script of a service's ``sh -c '...'`` command, ``$$`` read as ``$``."""
    argv = shlex.split(service["command"].replace("$$", "$"))
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, argv
    return argv[2]


def _server_options(script: str) -> dict[str, str]:
    """``--name value`` pairs of the ``exec valkey-server ...`` script."""
    argv = shlex.split(script)
    assert argv[:2] == ["exec", "valkey-server"], argv
    pairs = argv[2:]
    assert len(pairs) % 2 == 0 and all(p.startswith("--") for p in pairs[::2]), pairs
    return {name[2:]: value for name, value in zip(pairs[::2], pairs[1::2], strict=True)}


def _retry_floor(retry: Retry) -> float:
    """The least time the default Retry spends waiting over all its retries (seconds)."""
    backoff = retry.backoff
    assert isinstance(backoff, ExponentialWithJitterBackoff)
    return sum(
        min(backoff.cap, backoff.base * 2.0**failures) / 2
        for failures in range(1, retry.retries + 1)
    )


def test_compose_nodes_have_the_options_the_readme_promises() -> None:
    compose = _compose()
    services = compose["services"]
    assert sorted(services) == sorted([*NODES, "create"])
    ports = []
    for name in NODES:
        node = services[name]
        assert node["network_mode"] == "host", name  # nodes announce their own address
        assert node["image"].startswith("valkey/valkey:"), name
        ports.append(int(node["environment"]["PORT"]))
        # Its environment replaces x-node's: the password must be required here too.
        assert node["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?"), name
        assert node["volumes"] == [f"{name}:/data"]
        options = _server_options(_script(node))
        assert options["port"] == "$PORT"
        assert options["cluster-enabled"] == "yes"
        assert options["appendonly"] == "yes"
        assert int(options["min-replicas-to-write"]) >= 1
        assert options["requirepass"] == options["masterauth"] == "$REDIS_PASSWORD"
        assert options["dir"] == "/data"
        failover_s = int(options["cluster-node-timeout"]) / 1000 + ELECTION_S
        floor = _retry_floor(Retry())
        assert failover_s < floor, f"a failover (~{failover_s} s) outlasts Retry ({floor} s)"
    assert len(set(ports)) == 6
    # Every use of the password fails loudly when it is unset, never runs without one.
    uses = re.findall(r"\$\{REDIS_PASSWORD[^}]*\}", COMPOSE.read_text())
    assert uses and all(use.startswith("${REDIS_PASSWORD:?") for use in uses), uses
    create = _script(services["create"])
    assert re.findall(r"127\.0\.0\.1:(\d+)", create) == [str(p) for p in ports]
    assert "--cluster-replicas 1" in create


@pytest.fixture
def composed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The compose file's six nodes and its create step, run here with redis-server."""
    require()
    password = secrets.token_hex(24)
    monkeypatch.setenv("REDIS_PASSWORD", password)
    monkeypatch.setenv("REDISCLI_AUTH", password)  # for the harness's redis-cli calls
    services = _compose()["services"]
    cluster = Cluster(3, 1, base=tmp_path)
    taken: set[int] = set()
    ports: dict[str, int] = {}
    try:
        for name in NODES:
            port = free_port_pair(taken)
            taken.update({port, port + 10000})
            ports[str(services[name]["environment"]["PORT"])] = port
            node = Node(port, tmp_path / name)
            node.directory.mkdir()
            script = _script(services[name]).replace("valkey-server", "redis-server", 1)
            script = script.replace("--dir /data", f"--dir {shlex.quote(str(node.directory))}")
            node.proc = subprocess.Popen(
                ["sh", "-c", f"{script} --bind 127.0.0.1 --logfile redis.log"],
                env=dict(os.environ, PORT=str(port)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            cluster.nodes.append(node)
        create = _script(services["create"]).replace("valkey-cli", "redis-cli")
        for composed_port, port in ports.items():
            create = re.sub(rf"\b{composed_port}\b", str(port), create)
        done = subprocess.run(
            ["sh", "-c", create], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        deadline = time.monotonic() + 30
        while not cluster.healthy():
            assert time.monotonic() < deadline, "the composed cluster did not become healthy"
            time.sleep(0.2)
        yield cluster
    finally:
        cluster.stop()


def test_the_composed_cluster_serves_kvclient_and_refuses_unreplicated_writes(
    composed: Cluster,
) -> None:
    for node in composed.nodes:
        assert node.cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
    url = "redis-cluster://" + composed.seeds[0]  # the password comes from REDIS_PASSWORD
    with pytest.raises(kvclient.AuthError):
        kvclient.connect(url.replace("://", "://default:wrong@"), retry=None)
    with (
        kvclient.connect(url, retry=Retry(retries=40)) as kv,
        kvclient.connect(url, retry=None) as strict,
    ):
        d = kv.dict("composed")
        d["k"] = 1
        master = composed.master_of("kv{composed}:m")
        assert master is not None
        replica = composed.replica_of(master)
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            assert master.cli("client", "kill", "type", "replica").strip() == "1"
            # min-replicas-to-write 1: no replica in sync, so the master refuses the write
            # instead of acknowledging one a failover would lose (retryable).
            with pytest.raises(kvclient.KVConnectionError, match="NOREPLICAS"):
                strict.dict("composed")["lost?"] = 1
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        d["after"] = 2  # retried until the replica is back in sync
        assert d.copy() == {"k": 1, "after": 2}
