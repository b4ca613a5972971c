"""The Valkey/Redis Cluster harness itself: it starts a healthy cluster and fails over.

The cluster backend's conformance runs build on this; here only the harness is checked, with
redis-cli, so a broken harness is told apart from a broken backend. Without redis-server the
tests skip with the reason, except in CI (``CI=true``), where a missing engine is a failure:
``.ci/run`` installs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.redis_cluster import Cluster, require, running_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require()
    with running_cluster() as running:
        yield running


def _role(node_cli_output: str) -> str:
    for line in node_cli_output.splitlines():
        if line.startswith("role:"):
            return line.split(":", 1)[1].strip()
    return "?"


def test_the_cluster_has_three_masters_three_synced_replicas_and_every_slot(
    cluster: Cluster,
) -> None:
    info = cluster.nodes[0].cli("cluster", "info")
    assert "cluster_state:ok" in info
    assert "cluster_slots_ok:16384" in info
    roles = sorted(_role(node.cli("info", "replication")) for node in cluster.nodes)
    assert roles == ["master"] * 3 + ["slave"] * 3


def test_a_key_written_through_one_node_is_read_through_another(cluster: Cluster) -> None:
    first, last = cluster.nodes[0], cluster.nodes[-1]
    assert first.cli("-c", "set", "harness:{k}", "v1").strip() == "OK"
    assert last.cli("-c", "get", "harness:{k}").strip() == "v1"


def test_killing_a_master_promotes_its_replica_and_keeps_its_data(cluster: Cluster) -> None:
    seed = cluster.nodes[0]
    assert seed.cli("-c", "set", "harness:{failover}", "kept").strip() == "OK"
    slot = seed.cli("cluster", "keyslot", "harness:{failover}").strip()
    owner_port = None
    for line in seed.cli("cluster", "nodes").splitlines():
        fields = line.split()
        if "master" in fields[2] and any(_covers(rng, int(slot)) for rng in fields[8:]):
            owner_port = int(fields[1].split(":")[1].split("@")[0])
    assert owner_port is not None
    # Let the write reach the replica before the master dies (WAIT 1 replica, 5 s at most,
    # after a write on the same connection: WAIT counts what that connection wrote).
    owner = next(node for node in cluster.nodes if node.port == owner_port)
    assert owner.replicated("harness:{failover}:probe") == 1
    cluster.kill(owner)
    survivor = next(node for node in cluster.nodes if node.port != owner_port)
    deadline = time.monotonic() + 30
    value = ""
    while time.monotonic() < deadline:
        value = survivor.cli("-c", "get", "harness:{failover}").strip()
        if value == "kept" and "cluster_state:ok" in survivor.cli("cluster", "info"):
            break
        time.sleep(0.2)
    assert value == "kept"


def _covers(slot_range: str, slot: int) -> bool:
    if slot_range.startswith("["):
        return False  # a slot being migrated
    low, _, high = slot_range.partition("-")
    return int(low) <= slot <= int(high or low)
