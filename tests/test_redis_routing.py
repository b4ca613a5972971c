"""Where the Valkey/Redis backend's calls go: a slot migrating between masters (ASK, TRYAGAIN,
then MOVED), on a real cluster of this module's own (tests/redis_cluster.py).

A slot migrates as ``redis-cli --cluster reshard`` moves it: ``CLUSTER SETSLOT IMPORTING`` on
the target, ``MIGRATING`` on the source, ``MIGRATE ... KEYS`` (atomic per call), then
``SETSLOT NODE`` everywhere. Each script names every key of its container, some of which may
not exist (an empty dict has no data hash), and Redis runs a multi-key command during a
migration only on the node that has all of its keys; otherwise it answers ``TRYAGAIN``. So
while its slot migrates a container's scripts are retried (``KVConnectionError``, retryable)
and complete, exactly once, when the migration does; a one-key command follows ``ASK`` to the
target; and the first call after the move gets ``MOVED`` and updates the slot map.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

import kvclient
from kvclient.retry import ConstantBackoff, Retry
from tests.redis_cluster import Cluster, Node, require, running_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require()
    with running_cluster(3, 0) as running:
        yield running


def _asking_calls(node: Node) -> int:
    for line in node.cli("info", "commandstats").splitlines():
        if line.startswith("cmdstat_asking:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


def test_a_container_whose_slot_migrates_keeps_working_through_ask_and_moved(
    cluster: Cluster,
) -> None:
    url = "redis-cluster://" + ",".join(cluster.seeds)
    meta = b"kv{moving}:m"
    slot = key_slot(meta)
    source = cluster.master_of(meta.decode())
    assert source is not None
    target = next(node for node in cluster.nodes if node is not source)
    source_id, target_id = (n.cli("cluster", "myid").strip() for n in (source, target))
    retrying = Retry(ConstantBackoff(0.05), retries=200)
    with (
        kvclient.connect(url, retry=retrying) as kv,
        kvclient.connect(url, retry=None) as strict,
        kvclient.connect(url) as cached,
    ):
        d = kv.dict("moving")
        d.update({"a": 1, "b": 2})
        cached_nodes: Any = cached._backend.nodes  # type: ignore[attr-defined]
        assert cached.dict("moving")["a"] == 1
        assert cached_nodes._slots[slot] == ("127.0.0.1", source.port)

        assert target.cli("cluster", "setslot", str(slot), "importing", source_id).strip() == "OK"
        assert source.cli("cluster", "setslot", str(slot), "migrating", target_id).strip() == "OK"
        # The source has some of the container's keys, not all it names: TRYAGAIN.
        with pytest.raises(kvclient.KVConnectionError, match="retrying helps"):
            strict.dict("moving")["a"]

        keys = source.cli("cluster", "getkeysinslot", str(slot), "100").split()
        # Not kv{moving}:k, which the scripts name too.
        assert sorted(keys) == sorted(f"kv{{moving}}:{suffix}" for suffix in "mrdo")
        moved = source.cli("migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *keys)
        assert moved.strip() == "OK"
        assert source.cli("cluster", "getkeysinslot", str(slot), "100").split() == []

        # The source has none of them now and answers ASK: a one-key command follows it.
        strict_nodes: Any = strict._backend.nodes  # type: ignore[attr-defined]
        asked = _asking_calls(target)
        assert strict_nodes.execute(meta, "HGET", meta, "kind") == b"dict"
        assert _asking_calls(target) == asked + 1
        # A script follows it too, and the target, lacking some keys it names, says TRYAGAIN.
        with pytest.raises(kvclient.KVConnectionError, match="retrying helps"):
            strict.dict("moving")["a"]
        assert _asking_calls(target) >= asked + 2

        # A call made now is retried until the migration completes, then applied once.
        got: list[Any] = []
        waiting = threading.Thread(target=lambda: got.append(d.setdefault("c", 3)))
        waiting.start()
        time.sleep(0.5)
        assert got == [] and waiting.is_alive(), "it ran during the migration"
        for node in (target, source, *(n for n in cluster.nodes if n not in (source, target))):
            assert node.cli("cluster", "setslot", str(slot), "node", target_id).strip() == "OK"
        waiting.join(30)
        assert got == [3]

        # A client whose map still names the source gets MOVED, and follows and keeps it.
        assert cached_nodes._slots[slot] == ("127.0.0.1", source.port)
        cached.dict("moving")["e"] = 5
        assert cached_nodes._slots[slot] == ("127.0.0.1", target.port)
        assert d.copy() == {"a": 1, "b": 2, "c": 3, "e": 5}
        assert source.cli("cluster", "countkeysinslot", str(slot)).strip() == "0"
        assert int(target.cli("cluster", "countkeysinslot", str(slot)).strip()) >= 3
