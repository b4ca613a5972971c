"""TLS to Valkey/Redis (``rediss://``, ``redis-clusters://``) against real TLS-only redis-servers.

A throwaway CA (trustme, made at test time) signs the nodes' certificate (for 127.0.0.1) and
a client certificate; the servers listen on TLS only and require a client certificate (Redis's
default ``tls-auth-clients yes``); the cluster's nodes speak TLS to each other too
(``tls-cluster``, ``tls-replication``). Each failure says what it is: an unknown CA or a wrong
host name is ``TLSError``, a plain client at a TLS port ``KVConnectionError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

import kvclient
from tests.redis_cluster import Standalone, TLSFiles, require, running_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca, node cert and key (127.0.0.1), client cert and key, and another CA's cert."""
    base = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    paths = {name: base / f"{name}.pem" for name in ("ca", "node", "node-key", "client")}
    paths.update(client_key=base / "client-key.pem", other_ca=base / "other-ca.pem")
    ca.cert_pem.write_to_path(str(paths["ca"]))
    node = ca.issue_cert("127.0.0.1")
    node.cert_chain_pems[0].write_to_path(str(paths["node"]))
    node.private_key_pem.write_to_path(str(paths["node-key"]))
    client = ca.issue_cert("worker")
    client.cert_chain_pems[0].write_to_path(str(paths["client"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    return paths


def _files(pki: dict[str, Path]) -> TLSFiles:
    return TLSFiles(ca=pki["ca"], cert=pki["node"], key=pki["node-key"])


def _client_files(pki: dict[str, Path]) -> dict[str, Any]:
    return {"ca": pki["ca"], "cert": pki["client"], "key": pki["client_key"]}


@pytest.fixture(scope="module")
def server(pki: dict[str, Path]) -> Iterator[Standalone]:
    require()
    running = Standalone(tls=_files(pki)).start()
    yield running
    running.stop()


def test_rediss_reaches_a_tls_only_server_with_files_or_env(
    server: Standalone, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.url.startswith("rediss://127.0.0.1:")
    with kvclient.connect(server.url, **_client_files(pki)) as kv:
        kv.dict("tls")["k"] = (1, b"x")
        assert kv.dict("tls")["k"] == (1, b"x")
    monkeypatch.setenv("KV_TLS_CA", str(pki["ca"]))
    monkeypatch.setenv("KV_TLS_CERT", str(pki["client"]))
    monkeypatch.setenv("KV_TLS_KEY", str(pki["client_key"]))
    with kvclient.connect(server.url) as kv:
        assert kv.dict("tls")["k"] == (1, b"x")


def test_tls_failures_say_what_failed(
    server: Standalone, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("KV_TLS_CA", "KV_TLS_CERT", "KV_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    files = _client_files(pki)
    assert server.node is not None
    port = server.node.port
    with pytest.raises(kvclient.TLSError, match="certificate verify failed"):
        kvclient.connect(server.url, retry=None, **dict(files, ca=pki["other_ca"]))
    # The certificate names 127.0.0.1, not localhost: the host name is checked.
    with pytest.raises(kvclient.TLSError, match="certificate verify failed"):
        kvclient.connect(f"rediss://localhost:{port}/0", retry=None, **files)
    # The server requires a client certificate, and closes the connection without one.
    with pytest.raises(kvclient.TLSError, match=r"certificate required|may require a client cert"):
        kvclient.connect(server.url, retry=None, ca=pki["ca"])
    # A plain client at the TLS port.
    with pytest.raises(kvclient.KVConnectionError):
        kvclient.connect(f"redis://127.0.0.1:{port}/0", retry=None, call_timeout=2)
    with pytest.raises(ValueError, match="tls=False refuses it"):
        kvclient.connect(server.url, tls=False)


def test_redis_clusters_routes_and_replicates_over_tls(pki: dict[str, Path]) -> None:
    require()
    with running_cluster(3, 1, tls=_files(pki)) as cluster:
        url = "redis-clusters://" + cluster.seeds[0]
        # Confirmed writes: each reached a replica over TLS replication.
        with kvclient.connect(url, durability="replica", **_client_files(pki)) as kv:
            names = [f"c{i}" for i in range(12)]
            for name in names:
                kv.dict(name)["n"] = name
            assert [kv.dict(name)["n"] for name in names] == names
            nodes: Any = kv._backend.nodes  # type: ignore[attr-defined]
            served = {nodes.node_for(f"kv{{{name}}}:m".encode()) for name in names}
            # CLUSTER SLOTS over TLS names the nodes' TLS ports: every master serves some.
            assert len(served) == 3
            assert served <= {("127.0.0.1", node.port) for node in cluster.nodes}
            assert sorted(kv.names()) == sorted(names)
